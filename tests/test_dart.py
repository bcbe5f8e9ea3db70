"""DART: hand-worked pivots and a NumPy re-implementation of the pivot-duplication selection."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tcjax
from tcjax import compress
from tcjax.compress.dart import default_pivots

from helpers import check_contract, make_tokens


@functools.lru_cache(maxsize=None)
def _jitted(budget, num_pivots, with_text):
  if with_text:
    return jax.jit(lambda t, k, tx, tm: compress.dart(t, budget, keys=k, text=tx, text_mask=tm,
                                                       num_pivots=num_pivots))
  return jax.jit(lambda t, k: compress.dart(t, budget, keys=k, num_pivots=num_pivots))


def reference(x, keys, budget, n_piv, text=None, text_mask=None, n_txt=4):
  """One example: pivots by L1 key norm, then every guide takes its least-similar tokens."""
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  xn = unit(x)
  norm = np.abs(keys).sum(-1)
  pivots = list(np.argsort(-norm, kind="stable")[:n_piv])
  guides = [xn[p] for p in pivots]
  if text is not None:
    t_norm = np.where(text_mask, np.abs(text).sum(-1), -np.inf)
    for i in np.argsort(-t_norm, kind="stable")[:n_txt]:
      if text_mask[i]:
        guides.append(unit(text[i]))
  rest = budget - n_piv
  quotas = [rest // len(guides) + (g < rest % len(guides)) for g in range(len(guides))]
  kept = set(int(p) for p in pivots)
  for g, q in zip(guides, quotas):
    sim = xn @ g
    for j in np.argsort(sim, kind="stable"):
      if q == 0:
        break
      if int(j) not in kept:
        kept.add(int(j))
        q -= 1
  return sorted(kept)


def kept(out, b=0):
  return np.flatnonzero(np.asarray(out.src[b]) >= 0)


def test_hand_worked():
  # 2-D features at 0, 20, 45, 90, 135, 180 degrees; keys make token 2 (45 deg) the pivot.
  # Budget 3 = pivot + the 2 tokens least similar to 45 deg: 180 (cos 135) and 135 (cos 90).
  ang = np.deg2rad([0.0, 20.0, 45.0, 90.0, 135.0, 180.0])
  x = jnp.asarray(np.stack([np.cos(ang), np.sin(ang)], -1)[None], jnp.float32)
  keys = jnp.array([[[1.0, 0.5], [0.5, 0.5], [3.0, -2.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0]]])
  out = compress.dart(tcjax.Tokens.from_grid(x, (2, 3)), 3, keys=keys, num_pivots=1)
  np.testing.assert_array_equal(out.src[0], [-1, -1, 0, -1, 1, 2])
  # Two pivots (2 by L1 norm 5, then 5 by norm 2), 2 places: pivot 2 would take 180 deg, but that is
  # pivot 5 itself, so it takes 135; pivot 5 takes the token least similar to 180: 0 deg.
  out = compress.dart(tcjax.Tokens.from_grid(x, (2, 3)), 4, keys=keys, num_pivots=2)
  np.testing.assert_array_equal(kept(out), [0, 2, 4, 5])


def test_default_pivots_scale_with_budget():
  assert [default_pivots(b) for b in (1, 16, 64, 128, 576)] == [1, 1, 4, 8, 8]


@settings(max_examples=15, deadline=None)
@given(case=st.sampled_from([(8, 8, 16), (8, 8, 30), (5, 7, 11), (1, 9, 9)]),
       num_pivots=st.sampled_from([None, 1, 3]), seed=st.integers(0, 10_000))
def test_matches_reference(case, num_pivots, seed):
  h, w, budget = case
  t = make_tokens(2, 1, (h, w), dim=8, seed=seed)
  keys = jax.random.normal(jax.random.key(seed + 7), (2, h * w, 5))
  out = _jitted(budget, num_pivots, False)(t, keys)
  check_contract(out, budget, 2)
  n_piv = default_pivots(budget) if num_pivots is None else num_pivots
  for b in range(2):
    np.testing.assert_array_equal(
        kept(out, b), reference(np.asarray(t.x[b]), np.asarray(keys[b]), budget, n_piv))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.sampled_from([16, 23]))
def test_text_pivots_match_reference(seed, budget):
  t = make_tokens(2, 1, (8, 8), dim=8, seed=seed)
  keys = jax.random.normal(jax.random.key(seed + 7), (2, 64, 5))
  text = jax.random.normal(jax.random.key(seed + 8), (2, 6, 8))
  text_mask = jnp.array([[True] * 6, [True, True, False, True, False, False]])
  out = _jitted(budget, 2, True)(t, keys, text, text_mask)
  check_contract(out, budget, 2)
  for b in range(2):
    ref = reference(np.asarray(t.x[b]), np.asarray(keys[b]), budget, 2, np.asarray(text[b]),
                    np.asarray(text_mask[b]))
    np.testing.assert_array_equal(kept(out, b), ref)


def test_text_changes_selection_but_is_not_kept():
  t = make_tokens(1, 1, (8, 8), dim=8, seed=1)
  keys = jax.random.normal(jax.random.key(2), (1, 64, 5))
  plain = compress.dart(t, 20, keys=keys)
  text = jax.random.normal(jax.random.key(3), (1, 4, 8))
  guided = compress.dart(t, 20, keys=keys, text=text)
  assert guided.count()[0] == 20 and guided.src.shape == (1, 64)
  assert not np.array_equal(kept(plain), kept(guided))


def test_bad_options():
  t = make_tokens(1, 1, (4, 4))
  keys = jnp.ones((1, 16, 3))
  for bad in (0, 5, 1.5):
    with pytest.raises(ValueError, match="num_pivots"):
      compress.dart(t, 4, keys=keys, num_pivots=bad)
  with pytest.raises(ValueError, match="text"):
    compress.dart(t, 4, keys=keys, text=jnp.ones((1, 3, 7)))
  with pytest.raises(ValueError, match="text_mask"):
    compress.dart(t, 4, keys=keys, text=jnp.ones((1, 3, 8)), text_mask=jnp.ones((1, 2), bool))


def test_budget_of_pivots_only():
  t = make_tokens(1, 1, (4, 4), seed=3)
  keys = jnp.zeros((1, 16, 3)).at[0, 9].set(5.0).at[0, 2].set(-4.0)
  out = compress.dart(t, 2, keys=keys, num_pivots=2)
  np.testing.assert_array_equal(kept(out), [2, 9])
