"""SlowFast: slow frames intact, fast frames pooled, budget validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcjax import compress
from tcjax.compress.slowfast import slow_frame_indices, slowfast_budgets

from helpers import check_contract, make_tokens


def pooled_numpy(frame, k):
  """Ceil-mode k x k mean of one frame `[h, w, D]`, raster order of windows."""
  h, w, _ = frame.shape
  return np.stack([frame[r:r + k, c:c + k].reshape(-1, frame.shape[-1]).mean(0)
                   for r in range(0, h, k) for c in range(0, w, k)])


@pytest.mark.parametrize("budget,slow,k", [(28, 1, 2), (40, 2, 2), (19, 1, 4), (64, 4, 2)])
def test_slow_frames_intact_fast_frames_pooled(budget, slow, k):
  t = make_tokens(2, 4, (4, 4), dim=5, seed=budget)
  out = jax.jit(lambda t: compress.slowfast(t, budget))(t)
  check_contract(out, budget, 2)
  x = np.asarray(t.x).reshape(2, 4, 4, 4, 5)
  slow_set = set(slow_frame_indices(4, slow).tolist())
  start = 0
  for f in range(4):
    if f in slow_set:
      sl = slice(start, start + 16)
      np.testing.assert_array_equal(out.x[:, sl], t.x[:, f * 16:(f + 1) * 16])  # exact
      np.testing.assert_array_equal(out.pos[:, sl], t.pos[:, f * 16:(f + 1) * 16])
      np.testing.assert_array_equal(out.size[:, sl], 1.0)
      start += 16
    else:
      m = (-(-4 // k)) ** 2
      for b in range(2):
        np.testing.assert_allclose(out.x[b, start:start + m], pooled_numpy(x[b, f], k),
                                   rtol=1e-5, atol=1e-6)
      np.testing.assert_array_equal(out.size[:, start:start + m], k * k)
      start += m
  assert start == budget
  np.testing.assert_allclose(out.size.sum(-1), 64.0)


def test_slow_frames_evenly_spaced():
  assert slow_frame_indices(8, 2).tolist() == [0, 4]
  assert slow_frame_indices(8, 3).tolist() == [0, 2, 5]
  assert slow_frame_indices(4, 4).tolist() == [0, 1, 2, 3]


def test_options_fix_the_configuration():
  t = make_tokens(1, 4, (4, 4), seed=1)
  # 3 slow frames + 1 frame pooled 4x4: 48 + 1.
  out = compress.slowfast(t, 49, slow_frames=3)
  np.testing.assert_array_equal(out.x[0, :16], t.x[0, :16])
  assert slowfast_budgets((4, 4, 4), slow_frames=3) == {52: (3, 2), 49: (3, 4)}
  with pytest.raises(ValueError, match="valid budgets: \\[52, 49\\]"):
    compress.slowfast(t, 28, slow_frames=3)
  with pytest.raises(ValueError, match="slow_frames"):
    compress.slowfast(t, 28, slow_frames=0)
  with pytest.raises(ValueError, match="fast_window"):
    compress.slowfast(t, 28, fast_window=1)


def test_unreachable_budget_lists_valid_ones():
  t = make_tokens(1, 4, (4, 4))
  with pytest.raises(ValueError, match="valid budgets: \\[64, 52, 49, 40, 34, 28, 19\\]"):
    compress.slowfast(t, 30)
  with pytest.raises(ValueError, match="full grid"):
    compress.slowfast(compress.pool(t, 16), 16)
