"""`pyramid`: hand-worked levels, nesting (level l+1 == 2x2 pooling of level l), mass conservation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tcjax
from tcjax import compress
from tcjax.compress.pyramid import pyramid_budgets, pyramid_levels

from helpers import check_contract, make_tokens


def test_pyramid_hand_worked():
  x = jnp.arange(16, dtype=jnp.float32).reshape(1, 16, 1)
  t = tcjax.Tokens.from_grid(x, (4, 4))
  assert pyramid_budgets(t.grid) == [16, 4, 1]
  mid = compress.pyramid(t, 4)
  # blocks {0,1,4,5}, {2,3,6,7}, {8,9,12,13}, {10,11,14,15}
  np.testing.assert_allclose(mid.x[0, :, 0], [2.5, 4.5, 10.5, 12.5])
  np.testing.assert_array_equal(mid.size[0], [4, 4, 4, 4])
  top = compress.pyramid(t, 1)
  np.testing.assert_allclose(top.x[0, :, 0], [7.5])
  np.testing.assert_array_equal(top.src[0], np.zeros(16))


def test_pyramid_odd_grid_levels():
  assert pyramid_budgets((1, 27, 27)) == [729, 196, 49, 16, 4, 1]
  assert pyramid_budgets((2, 16, 16)) == [512, 128, 32, 8, 2]
  with pytest.raises(ValueError, match="valid budgets"):
    compress.pyramid(make_tokens(1, 1, (8, 8)), 8)


def pool2x2_np(x, size, h, w):
  """Size-weighted 2x2 ceil-mode pooling of a [h*w, D] grid, written independently in NumPy."""
  ho, wo = -(-h // 2), -(-w // 2)
  xs, ss = np.zeros((ho * wo, x.shape[1])), np.zeros(ho * wo)
  for r in range(h):
    for c in range(w):
      k = (r // 2) * wo + c // 2
      xs[k] += size[r * w + c] * x[r * w + c]
      ss[k] += size[r * w + c]
  return xs / ss[:, None], ss, ho, wo


@settings(max_examples=10, deadline=None)
@given(grid=st.sampled_from([(4, 4), (5, 3), (6, 6), (7, 2)]), seed=st.integers(0, 100))
def test_pyramid_levels_nest(grid, seed):
  t = make_tokens(1, 1, grid, dim=3, seed=seed)
  levels = pyramid_levels(t)
  assert [lv.num_tokens for lv in levels] == pyramid_budgets(t.grid)
  h, w = grid
  for fine, coarse in zip(levels, levels[1:]):
    x, s, h2, w2 = pool2x2_np(np.asarray(fine.x[0], np.float64), np.asarray(fine.size[0]), h, w)
    np.testing.assert_allclose(coarse.x[0], x, atol=1e-5)
    np.testing.assert_allclose(coarse.size[0], s)
    # every patch's coarse token is the 2x2 window of its fine token
    fsrc = np.asarray(fine.src[0])
    np.testing.assert_array_equal(coarse.src[0], ((fsrc // w) // 2) * w2 + (fsrc % w) // 2)
    h, w = h2, w2
  for lv in levels:  # mass: sizes cover every patch, size-weighted sums preserved
    check_contract(lv, lv.num_tokens, 1)
    np.testing.assert_allclose(float(lv.size.sum()), t.num_patches)
    np.testing.assert_allclose((lv.size[..., None] * lv.x).sum(1), t.x.sum(1), atol=1e-4)


def test_pyramid_full_budget_is_identity():
  t = make_tokens(2, 1, (3, 5))
  out = compress.pyramid(t, 15)
  np.testing.assert_allclose(out.x, t.x, atol=1e-6)
  np.testing.assert_array_equal(out.src, t.src)
