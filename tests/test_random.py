"""`random`: a uniform random subset, kept in order, reproducible from the key."""

import chex
import jax
import jax.numpy as jnp
import numpy as np

from tcjax import compress

from helpers import check_contract, make_tokens


def test_random_same_key_same_subset_other_key_differs():
  t = make_tokens(2, 1, (8, 8))
  a = compress.random(t, 16, rng=jax.random.key(0))
  b = compress.random(t, 16, rng=jax.random.key(0))
  c = compress.random(t, 16, rng=jax.random.key(1))
  chex.assert_trees_all_equal(a, b)
  assert not np.array_equal(a.src, c.src)
  assert not np.array_equal(a.src[0], a.src[1])  # each example draws its own subset
  check_contract(a, 16, 2)


def test_random_full_budget_is_identity():
  t = make_tokens(2, 1, (3, 5))
  chex.assert_trees_all_equal(compress.random(t, 15, rng=jax.random.key(3)), t)


def test_random_is_uniform():
  # 4000 draws of 2 out of 8: every token is kept with probability 1/4 (std of the estimate
  # sqrt(0.25 * 0.75 / 4000) ~ 0.007, so 0.03 is > 4 sigma).
  t = make_tokens(1, 1, (2, 4))
  keys = jax.random.split(jax.random.key(7), 4000)
  src = jax.jit(jax.vmap(lambda k: compress.random(t, 2, rng=k).src[0]))(keys)
  freq = np.asarray(src >= 0).mean(0)
  np.testing.assert_allclose(freq, 0.25, atol=0.03)


def test_random_never_keeps_padding_while_valid_tokens_remain():
  t = make_tokens(1, 1, (2, 4))
  t = t.replace(mask=jnp.array([[True, False, True, False, True, True, False, True]]))
  for seed in range(5):
    out = compress.random(t, 5, rng=jax.random.key(seed))
    assert bool(out.mask.all())
