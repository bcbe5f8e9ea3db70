"""experiments.diagnose_reading: the patches it reads for a glyph are the glyph's pixels."""

import numpy as np

from experiments import diagnose_reading
from tcjax.data import testbed


def test_glyph_patches_hand_worked():
  # A glyph at (y, x) = (8, 12) px covers rows 8-15, columns 12-19: patches (2, 3), (2, 4),
  # (3, 3), (3, 4) of the 16 x 16 grid.
  assert diagnose_reading._glyph_patches({"y": 8, "x": 12}) == [35, 36, 51, 52]


def test_glyph_patches_hold_every_drawn_pixel():
  # Every pixel brighter than the background lies in the patches of some glyph of the scene.
  for i in range(8):
    ex = testbed.example("number", "val", 0, i)
    img = (ex["image"] + 1) / 2  # back to [0, 1]
    lit = np.zeros((16, 16), bool)
    for d in ex["scene"]["digits"]:
      for p in diagnose_reading._glyph_patches(d):
        lit[p // 16, p % 16] = True
    bright = img.max(-1) > 0.2
    covered = np.kron(lit, np.ones((4, 4), bool))
    assert bright.any() and not (bright & ~covered).any()
