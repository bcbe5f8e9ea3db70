"""Hand-worked examples for `topk` and `pool`, NaN handling, and a sharded token axis."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

import tcjax
from tcjax import compress
from tcjax.parallel import make_mesh

from helpers import check_contract, make_tokens, np_tree

# The property tests run the method under jit: one compilation per drawn shape instead of one
# per primitive op of the eager call (~2x less time per example), same results.
_topk = jax.jit(compress.topk, static_argnums=1)
_pool = jax.jit(compress.pool, static_argnums=1, static_argnames="window")


def test_topk_hand_worked():
  # 2x3 grid, scores pick patches 4, 1, 5 -> kept in raster order 1, 4, 5.
  x = jnp.arange(6, dtype=jnp.float32).reshape(1, 6, 1)
  t = tcjax.Tokens.from_grid(x, (2, 3))
  out = compress.topk(t, 3, scores=jnp.array([[0.1, 0.8, 0.2, 0.0, 0.9, 0.5]]))
  np.testing.assert_array_equal(out.x[0, :, 0], [1, 4, 5])
  np.testing.assert_array_equal(out.pos[0], [[0, 0, 1], [0, 1, 1], [0, 1, 2]])
  np.testing.assert_array_equal(out.src[0], [-1, 0, -1, -1, 1, 2])


def test_topk_nan_scores_are_least_important():
  x = jnp.arange(5, dtype=jnp.float32).reshape(1, 5, 1)
  t = tcjax.Tokens.from_grid(x, (1, 5))
  scores = jnp.array([[jnp.nan, -jnp.inf, 3.0, jnp.nan, 1.0]])
  out = compress.topk(t, 2, scores=scores)
  np.testing.assert_array_equal(out.x[0, :, 0], [2, 4])  # NaN never beats a real score
  out = compress.topk(t, 4, scores=scores)  # budget beyond the real scores: -inf, then NaN by index
  np.testing.assert_array_equal(out.x[0, :, 0], [0, 1, 2, 4])
  out = compress.topk(t, 3, scores=jnp.full((1, 5), jnp.nan))
  np.testing.assert_array_equal(out.x[0, :, 0], [0, 1, 2])  # all NaN: the first tokens, in order


def test_topk_ties_go_to_lower_index():
  t = make_tokens(1, 1, (2, 4))
  out = compress.topk(t, 3, scores=jnp.ones((1, 8)))
  np.testing.assert_array_equal(out.src[0], [0, 1, 2, -1, -1, -1, -1, -1])


@settings(max_examples=15, deadline=None)
@given(h=st.sampled_from([1, 3, 4]), w=st.sampled_from([2, 5]), seed=st.integers(0, 1000))
def test_topk_full_budget_is_identity(h, w, seed):
  t = make_tokens(2, 1, (h, w), seed=seed)
  scores = jax.random.normal(jax.random.key(seed), (2, h * w))
  out = _topk(t, h * w, scores=scores)
  chex.assert_trees_all_equal(out, t)


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_topk_with_token_axis_sharded(axis_type):
  t = make_tokens(2, 1, (8, 8), seed=1)
  scores = jax.random.normal(jax.random.key(2), (2, 64))
  mesh = make_mesh((("data", 2), ("seq", 4)), axis_types=axis_type)
  tok_axis = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", "seq")))
  t_s = t.replace(x=tok_axis(t.x), pos=tok_axis(t.pos), size=tok_axis(t.size),
                  mask=tok_axis(t.mask), src=tok_axis(t.src))
  with jax.set_mesh(mesh):
    out = jax.jit(lambda t, s: compress.topk(t, 20, scores=s))(t_s, tok_axis(scores))
  chex.assert_trees_all_close(jax.device_get(out), compress.topk(t, 20, scores=scores))


def test_pool_hand_worked():
  # 3x3 grid pooled 2x2 in ceil mode -> 2x2 windows covering 4, 2, 2, 1 patches.
  x = jnp.arange(9, dtype=jnp.float32).reshape(1, 9, 1)
  out = compress.pool(tcjax.Tokens.from_grid(x, (3, 3)), 4)
  np.testing.assert_allclose(out.x[0, :, 0], [(0 + 1 + 3 + 4) / 4, (2 + 5) / 2, (6 + 7) / 2, 8])
  np.testing.assert_array_equal(out.size[0], [4, 2, 2, 1])
  np.testing.assert_array_equal(out.src[0], [0, 0, 1, 0, 0, 1, 2, 2, 3])
  np.testing.assert_array_equal(out.pos[0, :, 1:], [[0, 0], [0, 2], [2, 0], [2, 2]])


def test_pool_rejects_unreachable_budget():
  with pytest.raises(ValueError, match="valid budgets"):
    compress.pool(make_tokens(1, 1, (8, 8)), 10)


@settings(max_examples=15, deadline=None)
@given(h=st.sampled_from([1, 5, 8]), w=st.sampled_from([3, 8]), k=st.integers(1, 3),
       frames=st.sampled_from([1, 2]))
def test_pool_conserves_mass(h, w, k, frames):
  t = make_tokens(2, frames, (h, w), seed=h * w + k)
  ho, wo = -(-h // k), -(-w // k)
  out = _pool(t, frames * ho * wo, window=k)
  check_contract(out, frames * ho * wo, 2)
  o, x = np_tree(out), np.asarray(t.x)  # sums in NumPy: no eager op to compile per shape
  np.testing.assert_allclose(o.size.sum(-1), frames * h * w)
  np.testing.assert_allclose((o.x * o.size[..., None]).sum(1), x.sum(1), rtol=1e-4, atol=1e-4)


def test_to_grid_roundtrip():
  t = make_tokens(2, 1, (4, 4), seed=0)
  out = compress.pool(t, 4)
  grid = compress.to_grid(out, out.x)
  assert grid.shape == (2, 1, 4, 4, 8)
  np.testing.assert_allclose(grid[:, 0, 0, 1], out.x[:, 0])
  ids = compress.to_grid(out, jnp.broadcast_to(jnp.arange(4), (2, 4)), fill=-1)
  np.testing.assert_array_equal(ids[0, 0], [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]])
