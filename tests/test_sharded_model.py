"""The model under sharded `jax.jit` on 8 simulated CPU devices equals one device.

Meshes over (data, seq): (8,) = data parallel, (2, 4) and (1, 8) shard the token axis, so the
decoder runs ring attention (sliding window included, Gemma 2). Parameters are placed by the
regex rules of configs/sharding.py (FSDP over data).

Equality to 1e-5 is checked in float64 (`jax.enable_x64`): in float32, any change of reduction
order (a batch of 1 per device, an FSDP-sharded contraction, ring attention's online softmax)
moves logits of this small random model by up to ~2e-5 through its layers, even for pure data
parallelism with replicated weights; the float32 run is checked to give the same tokens and
logits within that noise (1e-4).
"""

import dataclasses
import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import tcjax
from configs.sharding import PALIGEMMA_RULES
from tcjax.nn import PaliGemma, learned
from tcjax.parallel import make_mesh, shard_params
from test_model import CONFIGS, IMG, inputs, make_params

MESHES = {"8": (("data", 8),), "2x4": (("data", 2), ("seq", 4)), "1x8": (("data", 1), ("seq", 8))}
PLANS = {
    "none": None,
    "fastv": (("llm", {"method": "fastv", "layer": 2, "keep": 0.5}),),
    "pool+pdrop": (("post_vit", {"method": "pool", "budget": 4}),
                   ("llm", {"method": "pyramiddrop", "layers": (1, 3), "ratios": (0.5, 0.25)})),
}
B = 8


@functools.lru_cache(maxsize=None)
def _data():
  model, params, _ = make_params(CONFIGS[2], seed=11)
  image, text, mask_ar = inputs(seed=12, B=B)
  return model, params, image, text, mask_ar


@pytest.fixture(scope="module")
def model_and_data():
  return _data()


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64) if np.issubdtype(np.asarray(a).dtype,
                                                                          np.floating) else a, tree)


def _sharded(mesh, params, *arrays):
  batch = NamedSharding(mesh, P("data"))
  return shard_params(params, mesh, PALIGEMMA_RULES), [jax.device_put(a, batch) for a in arrays]


def _run(model, plan):
  """One jitted function per plan: (forward logits, greedy tokens after the prompt)."""
  m = model if plan is None else model.with_plan(plan)

  def run(p, i, t, a):
    logits = m.apply({"params": p}, i, t, a)[0]
    return logits, tcjax.generate(m, p, i, t[:, :6], max_new_tokens=4)

  return jax.jit(run)


@functools.lru_cache(maxsize=None)
def _one_device(plan_name):
  model, params, image, text, mask_ar = _data()
  with jax.enable_x64(True):
    return jax.device_get(_run(model, PLANS[plan_name])(_f64(params), _f64(image), text, mask_ar))


# Every mesh without and with a compression plan (in-LLM pruning, and pooling + PyramidDrop).
CASES = [("8", "none"), ("8", "fastv"), ("2x4", "none"), ("2x4", "pool+pdrop"), ("1x8", "none"),
         ("1x8", "fastv")]


@pytest.mark.parametrize("mesh_name, plan_name", CASES)
def test_sharded_forward_and_generation_equal_one_device(mesh_name, plan_name):
  model, params, image, text, mask_ar = _data()
  want_logits, want_tokens = _one_device(plan_name)
  with jax.enable_x64(True):
    mesh = make_mesh(MESHES[mesh_name], axis_types="auto")
    with jax.set_mesh(mesh):
      sp, (si, st, sa) = _sharded(mesh, _f64(params), _f64(image), text, mask_ar)
      logits, tokens = _run(model, PLANS[plan_name])(sp, si, st, sa)
    assert logits.dtype == jnp.float64
  np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(tokens), want_tokens)


def test_sharded_float32_within_reduction_noise(model_and_data):
  model, params, image, text, mask_ar = model_and_data
  m = model.with_plan(PLANS["fastv"])
  forward = jax.jit(lambda p, i, t, a: m.apply({"params": p}, i, t, a)[0])
  gen = jax.jit(lambda p, i, t: tcjax.generate(m, p, i, t, max_new_tokens=4))
  want_logits, want_tokens = forward(params, image, text, mask_ar), gen(params, image, text[:, :6])
  mesh = make_mesh(MESHES["2x4"], axis_types="auto")
  with jax.set_mesh(mesh):
    sp, (si, st, sa) = _sharded(mesh, params, image, text, mask_ar)
    logits, tokens = forward(sp, si, st, sa), gen(sp, si, st[:, :6])
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=1e-4, rtol=1e-4)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want_tokens))


def test_sharded_video_explicit_axes_equals_one_device(model_and_data):
  """A clip on Explicit (data 2, seq 4) axes: frames spread over all 8 devices, pooling per frame,
  temporal merging (which needs whole examples: the model gathers them on purpose), then FastV
  in the ring-attention decoder. Forward logits and generation equal one device."""
  model, params, _, text, mask_ar = model_and_data
  clip = np.random.default_rng(13).uniform(-1, 1, (2, 4, 16, 16, 3)).astype(np.float32)
  clip[:, 2] = clip[:, 1]  # a repeated frame: temporal merging has something to merge
  plan = (("post_vit", {"method": "pool", "keep": 0.25}),
          ("post_vit", {"method": "temporal_merge", "budget": 10}),
          ("llm", {"method": "fastv", "layer": 1, "keep": 0.5}))
  run = _run(model, plan)
  with jax.enable_x64(True):
    p64, c64 = _f64(params), _f64(clip)
    want_logits, want_tokens = run(p64, c64, text[:2], mask_ar[:2])
    mesh = make_mesh(MESHES["2x4"], axis_types="explicit")
    with jax.set_mesh(mesh):
      sp, (sc, st, sa) = _sharded(mesh, p64, c64, text[:2], mask_ar[:2])
      logits, tokens = run(sp, sc, st, sa)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want_tokens))


def test_generation_on_explicit_axes_with_a_data_axis_of_one(model_and_data):
  """data 1 x seq 8 on Explicit axes, a 5-token prompt and 3 new tokens (neither the prefill
  nor the cache divides by 8): the prefill's values came out replicated while its keys were
  batch-sharded (through RoPE's positions), and the decoding loop's first in-place write
  refused the pair with a ShardingTypeError. Greedy tokens equal one device's (float64)."""
  model, params, image, text, _ = model_and_data
  gen = jax.jit(lambda p, i, t: tcjax.generate(model, p, i, t, max_new_tokens=3))
  with jax.enable_x64(True):
    p64, i64 = _f64(params), _f64(image)
    want = np.asarray(gen(p64, i64, text[:, :5]))
    mesh = make_mesh(MESHES["1x8"], axis_types="explicit")
    with jax.set_mesh(mesh):
      sp, (si, st) = _sharded(mesh, p64, i64, text[:, :5])
      got = np.asarray(gen(sp, si, st))
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_three_frame_clips_equal_one_device(model_and_data, axis_type):
  """Two 3-frame clips on (data 2, seq 4): the 6 frames do not divide the 8 devices, so the ViT
  spreads them over data alone; temporal merging after per-frame pooling, and FrameFusion with
  the ViT's scores folded back from 2 frame chunks, give the one-device tokens (float64)."""
  model, params, _, _, _ = model_and_data
  clip = np.random.default_rng(13).uniform(-1, 1, (2, 3, 16, 16, 3))
  clip[:, 2] = clip[:, 1]
  plans = {1: (("post_vit", {"method": "pool", "keep": 0.25}),
               ("post_vit", {"method": "temporal_merge", "budget": 10})),
           2: (("post_proj", {"method": "framefusion", "keep": 0.6}),)}
  mesh = make_mesh(MESHES["2x4"], axis_types=axis_type)
  with jax.enable_x64(True):
    p64 = _f64(params)
    for chunks, plan in plans.items():
      m = PaliGemma(dataclasses.replace(model.config, plan=plan, frame_chunks=chunks))
      embed = jax.jit(lambda p, c, m=m: m.apply({"params": p}, c, method=m.embed_image)[1])
      want = jax.device_get(embed(p64, clip))
      with jax.set_mesh(mesh):
        sp, (sc,) = _sharded(mesh, p64, clip)
        got = jax.device_get(embed(sp, sc))
      _assert_same_tokens(got, want, atol=1e-12)


def _assert_same_tokens(got, want, atol):
  """The bookkeeping equal, the features to `atol`."""
  for field in ("pos", "size", "mask", "src"):
    np.testing.assert_array_equal(getattr(got, field), getattr(want, field), err_msg=field)
  np.testing.assert_allclose(got.x, want.x, rtol=0, atol=atol)


# Every registered learned compressor, tiny, as a plan entry for an input of f frames of the 4 x 4
# patch grid (LDPv2's budget follows the grid, TokenLearner's is split over a clip's frames).
# The Q-Former at post_proj reads the prompt (queries concatenated with its rows).
LEARNED_ENTRIES = {
    "ldpv2": lambda f: ("post_vit", {"method": "ldpv2", "budget": 4 * f, "mlp_dim": 4}),
    "perceiver": lambda f: ("post_vit", {"method": "perceiver", "budget": 4, "depth": 2,
                                         "heads": 2, "head_dim": 4, "ff_mult": 1}),
    "qformer": lambda f: ("post_proj", {"method": "qformer", "budget": 4, "width": 8, "depth": 2,
                                        "heads": 2, "mlp_dim": 8}),
    "tokenlearner": lambda f: ("post_vit", {"method": "tokenlearner", "budget": 2 * f,
                                            "bottleneck_dim": 4}),
}


def test_learned_entries_cover_every_learned_compressor():
  assert set(LEARNED_ENTRIES) == set(learned.LEARNED)


@functools.lru_cache(maxsize=None)
def _learned_one_device(name, frames):
  """(jitted forward -> (text logits, image Tokens entering the decoder), params with the
  compressor's init, float64 inputs, the one-device result) for two images (frames 0) or two
  clips of `frames` frames."""
  model, params, image, text, mask_ar = _data()
  image, text, mask_ar = image[:2], text[:2], mask_ar[:2]
  if frames:
    image = np.random.default_rng(13).uniform(-1, 1, (2, frames, 16, 16, 3))
  m = model.with_plan((LEARNED_ENTRIES[name](max(frames, 1)),))
  with jax.enable_x64(True):
    args = (_f64(image), text, mask_ar)
    init = jax.jit(lambda *a: m.init(jax.random.key(1), *a)["params"][learned.SUBTREE])
    # The compressor's float32 init beside float64 towers: weights narrower than the activations,
    # as bf16 weights in a float32 run (where XLA split LDPv2's depthwise convolution wrongly).
    p64 = {**_f64(params), learned.SUBTREE: init(*args)}

    @jax.jit
    def run(p, *a):
      logits, _, img, _ = m.apply({"params": p}, *a, method=m.features)
      return logits, img

    return run, p64, args, jax.device_get(run(p64, *args))


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
@pytest.mark.parametrize("name", sorted(LEARNED_ENTRIES))
def test_learned_compressors_equal_one_device(name, axis_type):
  """Each learned compressor in the model's forward on (data 2, seq 4), for two images and for
  two 4-frame clips (their frames over all 8 devices, gathered per example before the
  compressor), gives the one-device image tokens and logits: the bookkeeping equal, the rest
  to 1e-12 in float64 (the decoder's ring attention, and on Auto axes the partitioner's split of
  the towers' FSDP-sharded contractions, change reduction orders)."""
  mesh = make_mesh(MESHES["2x4"], axis_types=axis_type)
  for frames in (0, 4):
    run, p64, args, (want_logits, want) = _learned_one_device(name, frames)
    with jax.enable_x64(True), jax.set_mesh(mesh):
      sp, sargs = _sharded(mesh, p64, *args)
      logits, got = jax.device_get(run(sp, *sargs))
    _assert_same_tokens(got, want, atol=1e-12)
    np.testing.assert_allclose(logits, want_logits, rtol=0, atol=1e-12)
