"""The demo (`python -m experiments.demo`) runs every registered method and draws each one."""

import os

import numpy as np
import pytest
from PIL import Image

from tcjax.compress import METHODS

from experiments import demo


@pytest.mark.slow  # every method compiled at 256 and 1024 tokens
def test_demo_runs_every_method_and_writes_pictures(tmp_path):
  rows = demo.main(["--budgets", "16", "--out", str(tmp_path), "--reps", "1"])
  assert sorted(r["method"] for r in rows) == sorted(METHODS)
  for r in rows:
    withdrawn = r["method"] == "vtw"  # every visual token withdrawn: an all-padding output
    assert (r["kept"] == 0 if withdrawn else 1 <= r["kept"]) and r["kept"] <= r["budget"] <= r["n"]
    assert r["ms"] > 0 and r["block_ratio"] > 0
    img = np.asarray(Image.open(os.path.join(tmp_path, f"{r['method']}_16.png")))
    frames = 1 if r["input"] == "image" else demo.FRAMES
    assert img.shape == (demo.SIZE, demo.SIZE * frames, 3)


def test_picture_marks_kept_dropped_and_merged():
  import jax.numpy as jnp
  import tcjax
  from tcjax import compress
  img = np.random.default_rng(0).uniform(size=(1, demo.SIZE, demo.SIZE, 3)).astype(np.float32)
  x = jnp.asarray(demo.features(demo.patchify(img[0])))[None]
  t = tcjax.Tokens.from_grid(x, (demo.GRID, demo.GRID))
  p = demo.PATCH
  # topk keeping patch 0 only: patch 0 in full colour, patch 1 dimmed
  out = compress.topk(t, 1, scores=jnp.arange(256.0)[None] * -1)
  pic = np.asarray(demo.picture(img, out, t.grid), np.float32) / 255
  np.testing.assert_allclose(pic[:p, :p], img[0, :p, :p], atol=1 / 255)
  np.testing.assert_allclose(pic[:p, p:2 * p], 0.25 * img[0, :p, p:2 * p] + 0.15, atol=1 / 255)
  # pooling to one token paints the whole photo with its mean patch colour
  pic = np.asarray(demo.picture(img, compress.pool(t, 1), t.grid), np.float32) / 255
  np.testing.assert_allclose(pic, np.broadcast_to(img[0].mean((0, 1)), pic.shape), atol=1 / 255)
