"""The learned frame embedding (`PaliGemmaConfig.frame_embedding`, `llm/frame_embedding`): a
clip's visual tokens enter the decoder as the plain model's inputs plus their frame's row, after
the plan's compression, exactly once on every path; images and frame_embedding=0 are unchanged;
checkpoints and `config.grow` carry the table. Expected values are NumPy (`paligemma_ref`), or
the model without the table."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import paligemma_ref as ref
import tcjax.checkpoints as ckpt
from tcjax import bundled
from tcjax.checkpoints import hf as hf_ckpt
from tcjax.nn import PaliGemma, PaliGemmaConfig
from tcjax.train import TrainState, loop, make_train_step
from tcjax.train.grow import grow_decoder

import test_model

PLAIN = test_model.CONFIGS[1]
K = 4  # table rows
F = 3  # frames of the test clips
N = test_model.N  # tokens per frame
WITH = dataclasses.replace(PLAIN, frame_embedding=K)


def _params():
  """(plain params, flat NumPy plain params, random table float32[K, E]) (shared weights)."""
  _, params, flat = test_model.make_params(PLAIN)
  table = np.random.default_rng(7).normal(size=(K, PLAIN.llm.width)).astype(np.float32)
  return params, flat, table


def _with_table(params, table):
  return {**params, "llm": {**params["llm"], "frame_embedding": jnp.asarray(table)}}


def _clip(seed=3, B=2, frames=F):
  return np.random.default_rng(seed).uniform(-1, 1, (B, frames, 16, 16, 3)).astype(np.float32)


def _embed(config):
  m = PaliGemma(config)
  return jax.jit(lambda p, im, t: m.apply({"params": p}, im, t,
                                          method=m.embed_image_and_text))


def _logits(config):
  m = PaliGemma(config)
  return jax.jit(lambda p, im, t, a: m.apply({"params": p}, im, t, a)[0])


PLANS = {
    "none": (),
    # drops tokens: 10 survivors from 3 frames
    "topk": (("post_proj", {"method": "topk", "budget": 10}),),
    # an adaptive count per example: padding slots (mask False) in the output
    "adaptive": (("post_proj", {"method": "adaptive_mass", "budget": 20, "mass": 0.2}),),
    # merges tokens across frames: a merged token keeps its representative's frame
    "temporal_merge": (("post_vit", {"method": "temporal_merge", "budget": 30}),),
}


@pytest.mark.parametrize("plan_name", sorted(PLANS))
def test_clip_inputs_are_the_plain_inputs_plus_each_tokens_frame_row(plan_name):
  plan = PLANS[plan_name]
  params, _, table = _params()
  clip, text = _clip(), np.full((2, 5), 7, np.int32)
  x0, valid0, ar0, img0, _ = _embed(dataclasses.replace(PLAIN, plan=plan))(params, clip, text)
  x, valid, ar, img, _ = _embed(dataclasses.replace(WITH, plan=plan))(
      _with_table(params, table), clip, text)
  n = img.num_tokens
  # The plan saw the same features: the same tokens survive, from the same patches.
  for field in ("pos", "mask", "src", "size"):
    np.testing.assert_array_equal(np.asarray(getattr(img, field)),
                                  np.asarray(getattr(img0, field)), err_msg=field)
  np.testing.assert_array_equal(np.asarray(valid), np.asarray(valid0))
  np.testing.assert_array_equal(np.asarray(ar), np.asarray(ar0))
  frame = np.asarray(img.pos[..., 0])
  mask = np.asarray(img.mask)
  if plan_name == "none":  # frame-major raster order: token i comes from frame i // N
    np.testing.assert_array_equal(frame, np.tile(np.repeat(np.arange(F), N), (2, 1)))
  else:
    assert n < F * N
  if plan_name == "adaptive":
    assert not mask.all()  # the case where padding exists
  want = np.asarray(x0).copy()
  want[:, :n] += np.where(mask[..., None], table[frame], 0)  # padding gets no row
  np.testing.assert_allclose(np.asarray(x), want, rtol=1e-6, atol=1e-6)
  # Text embeddings are untouched; the returned Tokens carry the decoder input.
  np.testing.assert_array_equal(np.asarray(x[:, n:]), np.asarray(x0[:, n:]))
  np.testing.assert_array_equal(np.asarray(img.x), np.asarray(x[:, :n]))


def test_clip_logits_match_numpy_reference_on_every_path():
  """__call__ on a clip equals the NumPy reference fed frame-wise ViT tokens plus the table's
  rows; prefill from the image and from `embed_image`'s tokens (image_tokens=) both equal its
  last logits: the table is added exactly once on either path."""
  params, flat, table = _params()
  clip = _clip(seed=4)
  _, text, mask_ar = test_model.inputs(seed=5)
  B = clip.shape[0]
  zimg = np.concatenate([ref.image_embed(flat, PLAIN, clip[:, f]) + table[f] for f in range(F)], 1)
  x = np.concatenate([zimg, ref.embed_text(flat, PLAIN, text)], 1)
  ar = np.concatenate([np.zeros((B, F * N)), mask_ar], 1)
  want = ref.decoder(flat, PLAIN, x, ar)[0][:, F * N:]
  p = _with_table(params, table)
  got = _logits(WITH)(p, clip, text, mask_ar)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
  # ... and the table matters here: the plain model is far from it.
  assert np.abs(np.asarray(_logits(PLAIN)(params, clip, text, mask_ar)) - want).max() > 1e-2

  m = PaliGemma(WITH)
  prefill = jax.jit(lambda p, im, t, toks: m.apply({"params": p}, im, t, method=m.prefill,
                                                   image_tokens=toks)[0])
  _, toks, _ = jax.jit(lambda p, im: m.apply({"params": p}, im, method=m.embed_image))(p, clip)
  # embed_image's tokens are the plain projected ones: no row in them yet
  np.testing.assert_allclose(np.asarray(toks.x), np.concatenate(
      [ref.image_embed(flat, PLAIN, clip[:, f]) for f in range(F)], 1), atol=1e-4, rtol=1e-4)
  text_prompt = text[:, :test_model.T_PREFIX]
  s = F * N + test_model.T_PREFIX  # image + prompt, all prefix
  want_last = ref.decoder(flat, PLAIN, x[:, :s], np.zeros((B, s)))[0][:, -1]
  np.testing.assert_allclose(np.asarray(prefill(p, clip, text_prompt, None)), want_last,
                             atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(prefill(p, None, text_prompt, toks)), want_last,
                             atol=1e-4, rtol=1e-4)


def test_images_get_nothing_and_frame_embedding_0_has_no_table():
  params, _, table = _params()
  image, text, mask_ar = test_model.inputs(seed=6)
  plain = _logits(PLAIN)(params, image, text, mask_ar)
  np.testing.assert_array_equal(np.asarray(_logits(WITH)(_with_table(params, table), image, text,
                                                         mask_ar)), np.asarray(plain))
  # A one-frame clip is an image as far as the table goes (grid frames == 1).
  one = _logits(WITH)(_with_table(params, table), image[:, None], text, mask_ar)
  np.testing.assert_array_equal(np.asarray(one), np.asarray(plain))
  assert PaliGemmaConfig().frame_embedding == 0
  assert not any("frame" in k for k in ckpt.param_shapes(PLAIN))
  assert ckpt.param_shapes(WITH)["llm/frame_embedding"] == (K, PLAIN.llm.width)
  # Fresh init: a zero table (a new table changes nothing until trained).
  m = PaliGemma(WITH)
  fresh = jax.jit(lambda: m.init(jax.random.key(0), image[:1], text[:1], mask_ar[:1]))()
  np.testing.assert_array_equal(np.asarray(fresh["params"]["llm"]["frame_embedding"]),
                                np.zeros((K, PLAIN.llm.width), np.float32))


def test_more_frames_than_rows_is_refused_at_trace_time():
  params, _, table = _params()
  small = dataclasses.replace(PLAIN, frame_embedding=2)
  p = _with_table(params, table[:2])
  m = PaliGemma(small)
  text = np.full((2, 5), 7, np.int32)
  with pytest.raises(ValueError, match="3 frames, but the frame embedding has 2 rows"):
    jax.eval_shape(lambda p: m.apply({"params": p}, _clip(), text), p)
  toks = jax.eval_shape(lambda p: m.apply({"params": p}, _clip(), method=m.embed_image), p)[1]
  with pytest.raises(ValueError, match="3 frames"):
    jax.eval_shape(lambda p, t: m.apply({"params": p}, None, text, image_tokens=t,
                                        method=m.prefill), p, toks)
  # Two frames fit two rows.
  jax.eval_shape(lambda p: m.apply({"params": p}, _clip(frames=2), text), p)


@pytest.mark.parametrize("value", [-1, True, 1.5, "4", None])
def test_bad_field_values_are_refused(value):
  with pytest.raises(ValueError, match="frame_embedding must be an int >= 0"):
    dataclasses.replace(PLAIN, frame_embedding=value)


def test_batch_of_clips_is_per_example_and_bf16_follows_the_embeddings():
  params, _, table = _params()
  clip, text = _clip(seed=8, B=3), np.full((3, 5), 7, np.int32)
  p = _with_table(params, table)
  x = _embed(WITH)(p, clip, text)[0]
  for b in range(3):  # each example alone gives its rows of the batch
    np.testing.assert_allclose(np.asarray(_embed(WITH)(p, clip[b:b + 1], text[b:b + 1])[0][0]),
                               np.asarray(x[b]), rtol=1e-5, atol=2e-5)  # ViT batch noise
  bf = jax.tree.map(lambda a: a.astype(jnp.bfloat16), p)
  xb, _, _, img, _ = _embed(WITH)(bf, clip.astype(jnp.bfloat16), text)
  assert xb.dtype == jnp.bfloat16 and img.x.dtype == jnp.bfloat16
  x0 = _embed(PLAIN)(jax.tree.map(lambda a: a.astype(jnp.bfloat16), params),
                     clip.astype(jnp.bfloat16), text)[0]
  rows = np.asarray(jnp.asarray(table, jnp.bfloat16), np.float32)[np.repeat(np.arange(F), N)]
  want = np.asarray(x0, np.float32)
  want[:, :F * N] += rows
  np.testing.assert_allclose(np.asarray(xb, np.float32), want, rtol=2e-2, atol=2e-2)


def test_explicit_mesh_equals_one_device():
  """On Explicit (data 2, seq 4) axes the rows are gathered with the batch sharding of the
  tokens they join; the decoder input equals one device's."""
  from configs.sharding import PALIGEMMA_RULES  # pylint: disable=g-import-not-at-top
  from tcjax.parallel import make_mesh, shard_params  # pylint: disable=g-import-not-at-top
  params, _, table = _params()
  p = _with_table(params, table)
  # 4 frames: 2 x 3 frames over 8 devices fails in temporal_merge's vmap without a table too
  clip, text = _clip(seed=9, frames=4), np.full((2, 5), 7, np.int32)
  plan = (("post_vit", {"method": "temporal_merge", "budget": 30}),)
  embed = _embed(dataclasses.replace(WITH, plan=plan))
  want = embed(p, clip, text)[0]
  mesh = make_mesh((("data", 2), ("seq", 4)), axis_types="explicit")
  with jax.set_mesh(mesh):
    sp = shard_params(p, mesh, PALIGEMMA_RULES)
    batch = NamedSharding(mesh, P("data"))
    got = embed(sp, jax.device_put(clip, batch), jax.device_put(text, batch))[0]
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


# -------------------------------------------------------------------------------------------
# Checkpoints


def test_npz_round_trip_with_the_table_and_old_checkpoints_load(tmp_path):
  params, flat, table = _params()
  p = _with_table(params, table)
  path = tmp_path / "with.npz"
  ckpt.save_big_vision(path, p)
  model, loaded = ckpt.load_big_vision(path)
  assert model.config.frame_embedding == K
  np.testing.assert_array_equal(np.asarray(loaded["llm"]["frame_embedding"]), table)
  assert ckpt.flatten(loaded).keys() == ckpt.flatten(p).keys()
  # bf16 files too (2-byte void records)
  ckpt.save_big_vision(tmp_path / "bf16.npz", p, dtype="bfloat16")
  model, loaded = ckpt.load_big_vision(tmp_path / "bf16.npz", dtype="float32")
  assert model.config.frame_embedding == K
  np.testing.assert_array_equal(np.asarray(loaded["llm"]["frame_embedding"]),
                                table.astype(jnp.bfloat16).astype(np.float32))
  # A checkpoint without the table (every one written before it existed) loads as before.
  ckpt.save_big_vision(tmp_path / "old.npz", params)
  model, loaded = ckpt.load_big_vision(tmp_path / "old.npz")
  assert model.config == PLAIN and "frame_embedding" not in loaded["llm"]
  z, bundled_flat = ckpt.big_vision.open_npz(bundled.CHECKPOINT)
  with z:
    assert ckpt.infer_config(bundled_flat).frame_embedding == 0
  # A config with the table refuses a file without it, naming the key.
  with pytest.raises(ValueError, match="llm/frame_embedding"):
    ckpt.load_big_vision(tmp_path / "old.npz", WITH)


def test_hf_conversion_refuses_a_frame_table():
  with pytest.raises(ValueError, match="HF PaliGemma has no frame embedding table"):
    hf_ckpt.convert_state({}, WITH, PLAIN.llm.vocab_size)
  with pytest.raises(ValueError, match="HF PaliGemma has no frame embedding table"):
    hf_ckpt.hf_to_big_vision({}, WITH)
  assert hf_ckpt.hf_shapes(PLAIN, PLAIN.llm.vocab_size)  # no table: as before


# -------------------------------------------------------------------------------------------
# Growing a trained checkpoint


def test_grown_table_answers_as_before_and_learns():
  params, _, _ = _params()
  clip = _clip(seed=10)
  _, text, mask_ar = test_model.inputs(seed=11)
  cfg = ml_collections.ConfigDict({"grow": {"frame_embedding": K}, "seed": 0})
  model, grown = loop.grown(cfg, PaliGemma(PLAIN), params)
  assert model.config == WITH
  t = grown["llm"]["frame_embedding"]
  assert t.shape == (K, PLAIN.llm.width) and t.dtype == jnp.float32 and not np.asarray(t).any()
  assert {k: tuple(np.shape(v)) for k, v in ckpt.flatten(grown).items()} == \
      ckpt.param_shapes(WITH)
  np.testing.assert_array_equal(np.asarray(_logits(WITH)(grown, clip, text, mask_ar)),
                                np.asarray(_logits(PLAIN)(params, clip, text, mask_ar)))
  # One training step on the clip: rows of the clip's frames move, the unused row does not.
  batch = {"image": clip, "text": text, "mask_ar": mask_ar,
           "mask_loss": mask_ar, "input_mask": np.ones_like(text, bool)}
  state = TrainState.create(apply_fn=model.apply, params=grown, tx=optax.sgd(1.0))
  state, _ = jax.jit(make_train_step(model))(state, batch)
  moved = np.abs(np.asarray(state.params["llm"]["frame_embedding"])).max(-1)
  assert (moved[:F] > 0).all() and moved[F] == 0


def test_grow_refuses_a_second_table_and_bad_sizes():
  params, _, table = _params()
  with pytest.raises(ValueError, match="only to a model without one"):
    grow_decoder(_with_table(params, table), WITH, frame_embedding=8)
  with pytest.raises(ValueError, match="only to a model without one"):
    grow_decoder(_with_table(params, table), WITH, frame_embedding=2)
  with pytest.raises(ValueError, match="frame_embedding must be an int >= 0"):
    grow_decoder(params, PLAIN, frame_embedding=-3)
  # Other fields still grow a model that has a table, keeping it.
  config, grown = grow_decoder(_with_table(params, table), WITH, llm_depth=5)
  assert config.frame_embedding == K and config.llm.depth == 5
  np.testing.assert_array_equal(np.asarray(grown["llm"]["frame_embedding"]), table)
  # Unknown grow fields are still refused.
  with pytest.raises(ValueError, match="unknown fields"):
    loop.grown(ml_collections.ConfigDict({"grow": {"frame_rows": 4}, "seed": 0}),
               PaliGemma(PLAIN), params)


def test_training_config_field_reaches_the_model_config():
  from configs import testbed  # pylint: disable=g-import-not-at-top
  cfg = testbed.get_config("smoke")
  assert loop.model_config(cfg).frame_embedding == 0
  cfg.model.frame_embedding = 8  # the testbed's clips: 8 video frames, 4 audio segments
  assert loop.model_config(cfg).frame_embedding == 8
  assert "llm/frame_embedding" in ckpt.param_shapes(loop.model_config(cfg))
