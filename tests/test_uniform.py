"""`uniform`: strided sub-grid sampling, hand-worked index sets."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import tcjax
from tcjax import compress

from helpers import check_contract, make_tokens


def kept(out):
  return np.flatnonzero(np.asarray(out.src[0]) >= 0)


@pytest.mark.parametrize("frames, grid, budget, expect", [
    # 4x4 -> 2x2: band centres (i + 1/2) * 2 -> rows/cols 1, 3.
    (1, (4, 4), 4, [5, 7, 13, 15]),
    # 2x6 -> 1x3: row floor(0.5 * 2) = 1, cols floor((j + 1/2) * 2) = 1, 3, 5.
    (1, (2, 6), 3, [7, 9, 11]),
    # 5 is prime and 1x5 / 5x1 do not fit 4x4: raster floor((i + 1/2) * 16 / 5).
    (1, (4, 4), 5, [1, 4, 8, 11, 14]),
    # two frames, 2x2 in each.
    (2, (4, 4), 8, [5, 7, 13, 15, 21, 23, 29, 31]),
])
def test_uniform_hand_worked(frames, grid, budget, expect):
  t = make_tokens(2, frames, grid)
  out = compress.uniform(t, budget)
  np.testing.assert_array_equal(kept(out), expect)
  np.testing.assert_array_equal(out.x, np.asarray(t.x)[:, expect])
  check_contract(out, budget, 2)


def test_uniform_full_budget_is_identity():
  t = make_tokens(2, 1, (3, 5))
  chex.assert_trees_all_equal(compress.uniform(t, 15), t)


def test_uniform_needs_raw_grid():
  t = compress.uniform(make_tokens(1, 1, (4, 4)), 4)
  with pytest.raises(ValueError, match="grid"):
    compress.uniform(t, 2)
