"""`resize`: PyTorch bilinear parity, antialias option, hand-worked weights and bookkeeping."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tcjax
from tcjax import compress

from helpers import check_contract, make_tokens


def test_resize_hand_worked():
  # 4x4 -> 2x2: output centres sit at 0.5 and 2.5 in input pixels, so each output is the mean
  # of a 2x2 block (no antialias); every block is carried by its output, pos = nearest patch.
  x = jnp.arange(16, dtype=jnp.float32).reshape(1, 16, 1)
  out = compress.resize(tcjax.Tokens.from_grid(x, (4, 4)), 4)
  np.testing.assert_allclose(out.x[0, :, 0], [2.5, 4.5, 10.5, 12.5])
  np.testing.assert_array_equal(out.size[0], [4, 4, 4, 4])
  np.testing.assert_array_equal(out.src[0], [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3])
  np.testing.assert_array_equal(out.pos[0, :, 1:], [[1, 1], [1, 3], [3, 1], [3, 3]])


def test_resize_antialias_hand_worked():
  # 4 -> 2 with antialias: triangle of half-width 2 around centre 0.5 -> weights 0.75, 0.75,
  # 0.25 on x0, x1, x2 (x_-1 out of range), normalised by 1.75.
  x = jnp.array([[[1.0], [2.0], [4.0], [8.0]]])
  out = compress.resize(tcjax.Tokens.from_grid(x, (4, 1)), 2, antialias=True)
  np.testing.assert_allclose(out.x[0, :, 0], [(0.75 * 1 + 0.75 * 2 + 0.25 * 4) / 1.75,
                                              (0.25 * 2 + 0.75 * 4 + 0.75 * 8) / 1.75], rtol=1e-6)


@pytest.mark.parametrize("grid, budget", [((8, 8), 16), ((6, 9), 6), ((27, 27), 196)])
def test_resize_matches_torch_interpolate(grid, budget):
  h, w = grid
  t = make_tokens(2, 1, grid, dim=3, seed=1)
  out = compress.resize(t, budget)
  check_contract(out, budget, 2)
  img = torch.from_numpy(np.array(t.x)).reshape(2, h, w, 3).permute(0, 3, 1, 2)
  # the sub-grid size, read from the src map (each output row/col carries some patches)
  src = np.asarray(out.src[0]).reshape(h, w)
  hh, ww = len(np.unique(src[:, 0])), len(np.unique(src[0]))
  assert hh * ww == budget
  ref = torch.nn.functional.interpolate(img, size=(hh, ww), mode="bilinear",
                                        align_corners=False, antialias=False)
  ref = ref.permute(0, 2, 3, 1).reshape(2, budget, 3).numpy()
  np.testing.assert_allclose(out.x, ref, atol=1e-5)


def test_resize_video_is_per_frame():
  t = make_tokens(1, 2, (4, 4), dim=2)
  out = compress.resize(t, 8)
  check_contract(out, 8, 1)
  single = compress.resize(tcjax.Tokens.from_grid(t.x[:, 16:], (4, 4)), 4)
  np.testing.assert_allclose(out.x[:, 4:], single.x, atol=1e-6)


def test_resize_full_budget_is_identity():
  t = make_tokens(2, 1, (3, 5))
  out = compress.resize(t, 15)
  np.testing.assert_allclose(out.x, t.x, atol=1e-6)
  np.testing.assert_array_equal(out.src, t.src)
  np.testing.assert_array_equal(out.pos, t.pos)


def test_resize_rejects_budget_without_subgrid():
  with pytest.raises(ValueError, match="budget"):
    compress.resize(make_tokens(1, 1, (4, 4)), 5)
