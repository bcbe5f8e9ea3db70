"""Temporal merging: repeated frames, hand-worked merges, mass conservation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tcjax
from tcjax import compress

from helpers import check_contract, make_tokens


@functools.lru_cache(maxsize=None)
def _jitted(budget, threshold, merge=True):
  return jax.jit(lambda t: compress.temporal_merge(t, budget, threshold=threshold, merge=merge))


def test_repeating_frames_keep_one_copy():
  frame = jax.random.normal(jax.random.key(0), (2, 1, 16, 8))
  clip = tcjax.Tokens.from_video(jnp.tile(frame, (1, 4, 1, 1)).reshape(2, 64, 8), 4, (4, 4))
  out = _jitted(40, 0.9)(clip)
  check_contract(out, 40, 2)
  np.testing.assert_array_equal(out.count(), [16, 16])
  np.testing.assert_allclose(out.x[:, :16], frame[:, 0], rtol=1e-6)
  np.testing.assert_array_equal(out.size[:, :16], 4.0)
  np.testing.assert_array_equal(out.pos[:, :16, 0], 0)  # frame 0 carries every frame
  np.testing.assert_array_equal(out.src, np.tile(np.arange(16), 4)[None].repeat(2, 0))
  assert not out.mask[:, 16:].any()


def test_hand_worked():
  # 3 frames of a 1x2 grid. Location 0 never changes; location 1 changes at frame 2.
  x = jnp.array([[[1.0, 0.0], [0.0, 1.0],   # frame 0
                  [1.0, 0.0], [0.0, 3.0],   # frame 1: both repeat (cos 1)
                  [1.0, 0.0], [1.0, 0.0]]])  # frame 2: location 1 turns (cos 0)
  t = tcjax.Tokens.from_video(x, 3, (1, 2))
  out = compress.temporal_merge(t, 3)
  np.testing.assert_array_equal(out.src[0], [0, 1, 0, 1, 0, 2])
  np.testing.assert_allclose(out.x[0], [[1, 0], [0, 2], [1, 0]])
  np.testing.assert_array_equal(out.size[0], [3, 2, 1])
  np.testing.assert_array_equal(out.pos[0], [[0, 0, 0], [0, 0, 1], [2, 0, 1]])
  # Budget = one frame: frame 2 location 1 folds into frame 0's token too.
  out = compress.temporal_merge(t, 2)
  np.testing.assert_allclose(out.x[0], [[1, 0], [1 / 3, 4 / 3]], rtol=1e-6)
  # Dropping instead of merging (DyCoke's TTM): the merged tokens vanish.
  out = compress.temporal_merge(t, 3, merge=False)
  np.testing.assert_array_equal(out.src[0], [0, 1, -1, -1, -1, 2])
  np.testing.assert_allclose(out.x[0], [[1, 0], [0, 1], [1, 0]])


def test_most_novel_tokens_win_the_budget():
  # Frame 1 differs from frame 0 by an angle that grows with the location.
  ang = np.deg2rad([5.0, 60.0, 30.0, 90.0])
  f1 = np.stack([np.cos(ang), np.sin(ang)], -1)
  x = np.concatenate([np.tile([[1.0, 0.0]], (4, 1)), f1])[None].astype(np.float32)
  t = tcjax.Tokens.from_video(jnp.asarray(x), 2, (2, 2))
  out = compress.temporal_merge(t, 6, threshold=None)
  np.testing.assert_array_equal(out.src[0], [0, 1, 2, 3, 0, 4, 2, 5])


@settings(max_examples=15, deadline=None)
@given(budget=st.sampled_from([16, 23, 40, 64]), threshold=st.sampled_from([None, 0.3]),
       seed=st.integers(0, 10_000))
def test_mass_conserved(budget, threshold, seed):
  t = make_tokens(2, 4, (4, 4), dim=6, seed=seed)
  out = _jitted(budget, threshold)(t)
  check_contract(out, budget, 2)
  np.testing.assert_allclose(out.size.sum(-1), 64.0)  # every patch is carried
  np.testing.assert_allclose((out.x * out.size[..., None]).sum(1), t.x.sum(1), atol=1e-4)
  if threshold is None:
    np.testing.assert_array_equal(out.count(), [budget, budget])


def test_needs_video():
  image = make_tokens(1, 1, (4, 4))
  with pytest.raises(ValueError, match="2 frames"):
    compress.temporal_merge(image, 8)
  clip = make_tokens(1, 2, (4, 4))
  with pytest.raises(ValueError, match="budget"):
    compress.temporal_merge(clip, 15)
  # Any raster-ordered subset works: neighbours are found by origin position, not by index.
  some = compress.topk(clip, 20, scores=jnp.arange(32.0)[None])
  out = compress.temporal_merge(some, 16, threshold=None)
  check_contract(out, 16, 1)
  np.testing.assert_allclose(float(out.size.sum()), 20.0)


def test_after_per_frame_pooling():
  """Pooling each frame first (4x) and merging in time after: frames that repeat the previous
  one are folded into it, whatever the per-frame layout."""
  import jax
  import numpy as np
  from tcjax import compress
  from helpers import check_contract
  rng = np.random.default_rng(0)
  f0, f2 = rng.normal(size=(2, 16, 8)).astype(np.float32)
  clip = np.stack([f0, f0, f2, f2])[None].reshape(1, 64, 8)  # frames 1 and 3 repeat
  tokens = tcjax.Tokens.from_video(clip, frames=4, grid=(4, 4))
  pooled = compress.pool(tokens, 16)  # 2x2 windows: 4 tokens per frame, size 4 each
  out = compress.temporal_merge(pooled, 12)
  check_contract(out, 12, 1)
  assert int(out.count()[0]) == 8  # frames 0 and 2 kept, 1 and 3 merged into them
  np.testing.assert_array_equal(np.asarray(out.pos[0, :8, 0]), [0] * 4 + [2] * 4)
  np.testing.assert_allclose(np.asarray(out.size[0, :8]), 8.0)
  np.testing.assert_allclose(np.asarray(out.x[0, :4]), np.asarray(pooled.x[0, :4]), atol=1e-6)
  np.testing.assert_allclose(np.asarray(out.x[0, 4:8]), np.asarray(pooled.x[0, 8:12]), atol=1e-6)
