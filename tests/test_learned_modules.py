"""Learned compressors as modules (tcjax/nn/{tokenlearner,perceiver,qformer,ldpv2}.py): the
Tokens contract under jit with batch > 1, the bookkeeping of resampled tokens, option and input
errors."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tcjax
from tcjax.compress.primitives import gather_static
from tcjax.nn import learned

D = 16
# Small sizes so each module compiles in a moment (the defaults are the papers').
SMALL = {
    "tokenlearner": dict(bottleneck_dim=8),
    "perceiver": dict(depth=2, heads=2, head_dim=8),
    "qformer": dict(width=16, depth=2, heads=2, mlp_dim=32, use_text=False),
    "ldpv2": dict(mlp_dim=24),
}


def image_tokens(batch=3, grid=(8, 8), seed=0):
  x = jax.random.normal(jax.random.key(seed), (batch, grid[0] * grid[1], D))
  return tcjax.Tokens.from_grid(x, grid)


def run(name, tokens, budget, seed=0, **kw):
  """(params, jitted apply) of compressor `name` (SMALL options, overridden by kw)."""
  module = learned.make(name, budget, **{**SMALL[name], **kw})
  sig = {}
  if module.__class__.__name__ == "QFormer" and module.use_text:
    b = tokens.x.shape[0]
    sig = dict(text=jax.random.normal(jax.random.key(7), (b, 5, 12)),
               text_mask=jnp.arange(5)[None] < jnp.array([5, 3, 2])[:b, None])
  params = module.init(jax.random.key(seed), tokens, **sig)
  return params, jax.jit(lambda p, t: module.apply(p, t, **sig))


def check_contract(out, tokens, budget):
  b = tokens.x.shape[0]
  chex.assert_shape(out.x, (b, budget, D))
  chex.assert_shape(out.pos, (b, budget, 3))
  chex.assert_shape([out.size, out.mask], (b, budget))
  chex.assert_shape(out.src, tokens.src.shape)
  assert out.grid == tokens.grid
  assert bool(jnp.isfinite(out.x).all())
  # Every patch is carried by exactly one valid output token, and sizes count the patches.
  src = np.asarray(out.src)
  assert ((src >= 0) & (src < budget)).all()
  np.testing.assert_allclose(np.asarray(out.size).sum(-1), tokens.num_patches, rtol=1e-5)
  assert bool(out.mask.all()) and bool((out.size > 0).all())


@pytest.mark.parametrize("name,budget", [("tokenlearner", 8), ("perceiver", 8), ("qformer", 8),
                                         ("ldpv2", 16)])
def test_shapes_and_budget_under_jit(name, budget):
  tokens = image_tokens()
  params, f = run(name, tokens, budget)
  out = f(params, tokens)
  check_contract(out, tokens, budget)
  # Batch rows are independent: example 1 alone gives the same tokens.
  one = jax.tree.map(lambda a: a[1:2], tokens)
  chex.assert_trees_all_close(f(params, one).x[0], out.x[1], atol=1e-5)


def test_qformer_text_changes_the_tokens_and_padding_does_not():
  tokens = image_tokens()
  module = learned.make("qformer", 8, **{**SMALL["qformer"], "use_text": True})
  text = jax.random.normal(jax.random.key(7), (3, 5, 12))
  mask = jnp.arange(5)[None] < jnp.array([5, 3, 2])[:, None]
  params = module.init(jax.random.key(0), tokens, text=text, text_mask=mask)
  f = jax.jit(lambda p, t, tx, m: module.apply(p, t, text=tx, text_mask=m))
  out = f(params, tokens, text, mask)
  check_contract(out, tokens, 8)
  # Prompt padding is masked: changing it changes nothing; changing the prompt does.
  noisy = jnp.where(mask[..., None], text, 100.0)
  chex.assert_trees_all_close(f(params, tokens, noisy, mask).x, out.x, atol=1e-5)
  other = text.at[:, 0].add(1.0)
  assert float(jnp.abs(f(params, tokens, other, mask).x - out.x).max()) > 1e-3
  assert "text_proj" in params["params"] and "text_pos" in params["params"]


def test_tokenlearner_is_a_convex_mix_of_the_input():
  """v1.1's slots are softmax-weighted sums of the raw inputs: inside their range, and a
  constant input gives that constant."""
  tokens = image_tokens(batch=2)
  params, f = run("tokenlearner", tokens, 4)
  const = tokens.replace(x=jnp.ones_like(tokens.x) * 3.0)
  chex.assert_trees_all_close(f(params, const).x, jnp.full((2, 4, D), 3.0), atol=1e-5)
  out = f(params, tokens).x
  assert bool((out <= tokens.x.max(1, keepdims=True) + 1e-5).all())
  assert bool((out >= tokens.x.min(1, keepdims=True) - 1e-5).all())


def test_tokenlearner_per_frame_on_clips():
  x = jax.random.normal(jax.random.key(1), (2, 4 * 16, D))
  clip = tcjax.Tokens.from_video(x, frames=4, grid=(4, 4))
  params, f = run("tokenlearner", clip, 8)
  out = f(params, clip)
  check_contract(out, clip, 8)
  # Two slots per frame, each looking at its own frame only.
  np.testing.assert_array_equal(np.asarray(out.pos[..., 0]), np.repeat(np.arange(4), 2)[None]
                                .repeat(2, 0))
  np.testing.assert_allclose(np.asarray(out.size).reshape(2, 4, 2).sum(-1), 16.0, rtol=1e-5)
  frame_of_src = np.asarray(out.src) // 2  # each patch is carried by a slot of its own frame
  np.testing.assert_array_equal(frame_of_src, np.repeat(np.arange(4), 16)[None].repeat(2, 0))
  with pytest.raises(ValueError, match="divisible by its 4 frames"):
    run("tokenlearner", clip, 6)
  params, f = run("tokenlearner", clip, 6, per_frame=False)  # one set of maps over the clip
  check_contract(f(params, clip), clip, 6)


def test_tokenlearner_frames_fixes_the_parameter_shape():
  """Per-frame maps: budget // F MLP outputs for a clip of F frames, `budget` for an image. An
  input the parameters do not fit is refused by name, not by a shape error inside Flax."""
  image = image_tokens(batch=2, grid=(4, 4))
  clip = tcjax.Tokens.from_video(jax.random.normal(jax.random.key(1), (2, 4 * 16, D)),
                                 frames=4, grid=(4, 4))
  params, _ = run("tokenlearner", image, 8)  # frames=None: shaped by the image
  assert params["params"]["map_out"]["kernel"].shape == (8, 8)
  module = learned.make("tokenlearner", 8, **SMALL["tokenlearner"])
  with pytest.raises(ValueError, match="hold 8 maps per frame.*needs 2.*frames=4"):
    module.apply(params, clip)
  params, f = run("tokenlearner", clip, 8, frames=4)
  assert params["params"]["map_out"]["kernel"].shape == (8, 2)
  check_contract(f(params, clip), clip, 8)
  with pytest.raises(ValueError, match="frames=4 shapes its maps for clips of 4 frames"):
    learned.make("tokenlearner", 8, frames=4, **SMALL["tokenlearner"]).apply(params, image)
  with pytest.raises(ValueError, match="per_frame=False it has no effect"):
    run("tokenlearner", clip, 8, frames=4, per_frame=False)
  for bad in (0, 2.0, True):
    with pytest.raises(ValueError, match="frames must be a positive int"):
      run("tokenlearner", clip, 8, frames=bad)


def test_padding_tokens_are_ignored():
  """Masked (padding) input tokens get no weight: their features never reach the output."""
  tokens = image_tokens()
  keep = jnp.arange(64)[None] < jnp.array([64, 40, 20])[:, None]
  padded = tokens.replace(mask=keep, size=jnp.where(keep, 1.0, 0.0),
                          src=jnp.where(keep, tokens.src, -1))
  for name in ("tokenlearner", "perceiver", "qformer"):
    params, f = run(name, padded, 8)
    out = f(params, padded)
    noisy = f(params, padded.replace(x=jnp.where(keep[..., None], padded.x, 1e3)))
    chex.assert_trees_all_close(noisy.x, out.x, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out.size.sum(-1)), [64, 40, 20], rtol=1e-5)
    assert ((np.asarray(out.src) >= 0) == np.asarray(keep)).all()


def test_resampled_bookkeeping():
  """pos = the input token a slot weights most; src = the slot weighting a patch most; size =
  soft shares of the patches."""
  tokens = image_tokens(batch=1, grid=(2, 2))
  w = jnp.array([[[0.7, 0.1, 0.0, 0.0], [0.3, 0.9, 1.0, 0.5]]])
  out = learned.resampled(tokens, jnp.zeros((1, 2, D)), w)
  np.testing.assert_array_equal(np.asarray(out.pos[0]), [[0, 0, 0], [0, 1, 0]])
  np.testing.assert_array_equal(np.asarray(out.src[0]), [0, 1, 1, 1])
  np.testing.assert_allclose(np.asarray(out.size[0]), [0.7 + 0.1, 0.3 + 0.9 + 1.0 + 1.0],
                             rtol=1e-6)


def test_ldpv2_pools_like_pool_and_keeps_its_bookkeeping():
  tokens = image_tokens()
  params, f = run("ldpv2", tokens, 16)
  out = f(params, tokens)
  ref = tcjax.compress.pool(tokens, 16)
  for field in ("pos", "size", "mask", "src"):
    np.testing.assert_array_equal(np.asarray(getattr(out, field)),
                                  np.asarray(getattr(ref, field)))
  assert params["params"]["peg"]["kernel"].shape == (3, 3, 1, D)  # depthwise
  with pytest.raises(ValueError, match="not reachable"):
    run("ldpv2", tokens, 10)
  with pytest.raises(ValueError, match="full grid"):
    run("ldpv2", gather_static(tokens, range(32)), 8)  # 32 of the 64 patches: no grid


def test_bad_options_and_inputs_are_refused():
  tokens = image_tokens()
  with pytest.raises(ValueError, match="unknown option"):
    learned.make("perceiver", 8, num_latents=8)
  with pytest.raises(ValueError, match="unknown learned compressor"):
    learned.make("resampler", 8)
  with pytest.raises(ValueError, match=r"budget must be in \[1, N=64\]"):
    run("perceiver", tokens, 65)
  with pytest.raises(ValueError, match="budget must be a static Python int"):
    run("tokenlearner", tokens, 8.0)
  with pytest.raises(ValueError, match="heads must be a positive int"):
    run("perceiver", tokens, 8, heads=0)
  with pytest.raises(ValueError, match="not divisible by heads"):
    run("qformer", tokens, 8, heads=3)
  with pytest.raises(ValueError, match="needs signal `text`"):
    module = learned.make("qformer", 8, **{**SMALL["qformer"], "use_text": True})
    module.init(jax.random.key(0), tokens)
  with pytest.raises(ValueError, match="more than max_text=4"):
    run("qformer", tokens, 8, use_text=True, max_text=4)
