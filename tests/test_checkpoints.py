"""big_vision .npz and orbax checkpoints: round trips, bf16 void arrays, whole-tree validation."""

import dataclasses
import os
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest

import tcjax.checkpoints as ckpt
from tcjax.nn.config import GemmaConfig, PaliGemmaConfig, SiglipConfig

IMG = SiglipConfig(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=4, image_size=16)
CONFIGS = {
    # Gemma 1, multi-query (q_einsum + kv_einsum)
    "gemma1": PaliGemmaConfig(img=IMG, llm=GemmaConfig(
        version=1, vocab_size=50, width=24, depth=2, mlp_dim=48, num_heads=2, num_kv_heads=1,
        head_dim=8)),
    # Gemma 2, as many KV heads as query heads (qkv_einsum), post norms
    "gemma2": PaliGemmaConfig(img=IMG, llm=GemmaConfig(
        version=2, vocab_size=50, width=24, depth=3, mlp_dim=48, num_heads=2, num_kv_heads=2,
        head_dim=8, query_pre_attn_scalar=8, attn_logits_softcap=50.0,
        final_logits_softcap=30.0, sliding_window=4096)),
}
# with tcjax's frame table llm/frame_embedding [3, 24] (PaliGemmaConfig.frame_embedding)
CONFIGS["gemma1_frames"] = dataclasses.replace(CONFIGS["gemma1"], frame_embedding=3)


def random_params(config, seed=0):
  rng = np.random.default_rng(seed)
  flat = {k: rng.normal(size=s).astype(np.float32) for k, s in ckpt.param_shapes(config).items()}
  return ckpt.unflatten(flat)


def flat_np(params):
  return {k: np.asarray(v) for k, v in ckpt.flatten(params).items()}


def test_checkpoints_is_an_attribute_of_the_package():
  # In a fresh interpreter: here `import tcjax.checkpoints` has already set the attribute.
  code = "import tcjax; tcjax.checkpoints.load_hf; tcjax.checkpoints.load_big_vision"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                       text=True, timeout=300, check=False)
  assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_shapes_match_model_init(name):
  config = CONFIGS[name]
  model = ckpt.big_vision.make_model(config)
  v = config.img
  image = jax.ShapeDtypeStruct((1, v.image_size, v.image_size, 3), np.float32)
  text = jax.ShapeDtypeStruct((1, 4), np.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), image, text, text)["params"]
  got = {k: tuple(x.shape) for k, x in ckpt.flatten(shapes).items()}
  assert got == ckpt.param_shapes(config)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_npz_round_trip_float32(tmp_path, name):
  config = CONFIGS[name]
  params = random_params(config)
  path = tmp_path / "p.npz"
  ckpt.save_big_vision(path, params)
  model, loaded = ckpt.load_big_vision(path)  # config inferred from the shapes
  inferred = model.config if hasattr(model, "config") else ckpt.infer_config(ckpt.read_npz(path))
  # Gemma 2 from .npz: big_vision's PaliGemma 2 has no final-logit soft-cap and no window.
  want_llm = config.llm if config.llm.version == 1 else dataclasses.replace(
      config.llm, query_pre_attn_scalar=8, final_logits_softcap=None, sliding_window=None)
  assert inferred.img == config.img and inferred.llm == want_llm
  assert inferred.frame_embedding == config.frame_embedding
  a, b = flat_np(params), flat_np(loaded)
  assert a.keys() == b.keys()
  for k in a:
    assert b[k].dtype == np.float32, k
    np.testing.assert_array_equal(b[k], a[k], err_msg=k)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_npz_round_trip_bfloat16(tmp_path, name):
  config = CONFIGS[name]
  params = random_params(config, seed=1)
  path = tmp_path / "p.bf16.npz"
  ckpt.save_big_vision(path, params, dtype="bfloat16")
  with np.load(path) as z:  # stored like big_vision's bf16 files: 2-byte void records
    assert {z[k].dtype.str for k in z.files} == {"|V2"}
  _, loaded = ckpt.load_big_vision(path, config)
  a, b = flat_np(params), flat_np(loaded)
  for k in a:
    assert b[k].dtype == ml_dtypes.bfloat16, k
    np.testing.assert_array_equal(b[k], a[k].astype(ml_dtypes.bfloat16), err_msg=k)
  # dtype= casts on load: bf16 -> f32 is exact
  _, f32 = ckpt.load_big_vision(path, config, dtype="float32")
  for k in a:
    np.testing.assert_array_equal(np.asarray(ckpt.flatten(f32)[k]),
                                  a[k].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_npz_hand_written_void_file(tmp_path):
  # A file written the way big_vision does it, without tcjax: bf16 bits under a params/ prefix.
  config = CONFIGS["gemma1"]
  flat = flat_np(random_params(config, seed=2))
  raw = {"params/" + k: v.astype(ml_dtypes.bfloat16).view("V2") for k, v in flat.items()}
  np.savez(tmp_path / "bv.npz", **raw)
  _, loaded = ckpt.load_big_vision(tmp_path / "bv.npz", config)
  for k, v in flat.items():
    np.testing.assert_array_equal(np.asarray(ckpt.flatten(loaded)[k]),
                                  v.astype(ml_dtypes.bfloat16))


def test_npz_errors_name_every_bad_key(tmp_path):
  config = CONFIGS["gemma1"]
  flat = flat_np(random_params(config))
  del flat["llm/layers/mlp/linear"]
  del flat["img/head/bias"]
  flat["llm/layers/attn/extra"] = np.zeros(3, np.float32)
  flat["img/pos_embedding"] = np.zeros((1, 15, 16), np.float32)
  np.savez(tmp_path / "bad.npz", **flat)
  with pytest.raises(ValueError) as e:
    ckpt.load_big_vision(tmp_path / "bad.npz", config)
  msg = str(e.value)
  for k in ("llm/layers/mlp/linear", "img/head/bias", "llm/layers/attn/extra",
            "img/pos_embedding: got (1, 15, 16), expected (1, 16, 16)"):
    assert k in msg, (k, msg)
  assert "2 missing, 1 unexpected, 1 wrong shape" in msg
  assert "nothing was loaded" in msg


def test_infer_config_needs_the_key_params(tmp_path):
  flat = flat_np(random_params(CONFIGS["gemma1"]))
  del flat["img/embedding/kernel"]
  np.savez(tmp_path / "bad.npz", **flat)
  with pytest.raises(ValueError, match="img/embedding/kernel"):
    ckpt.load_big_vision(tmp_path / "bad.npz")


def test_orbax_round_trip(tmp_path):
  config = CONFIGS["gemma2"]
  params = jax.tree.map(np.asarray, random_params(config, seed=3))
  params["llm"]["final_norm"]["scale"] = params["llm"]["final_norm"]["scale"].astype(
      ml_dtypes.bfloat16)
  ckpt.save_orbax(tmp_path / "ck", params)
  for like in (None, params, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                          params)):
    out = ckpt.restore_orbax(tmp_path / "ck", like=like)
    a, b = flat_np(params), flat_np(out)
    assert a.keys() == b.keys()
    for k in a:
      assert b[k].dtype == a[k].dtype, k
      np.testing.assert_array_equal(b[k], a[k])


def test_orbax_restore_validates_against_like(tmp_path):
  params = jax.tree.map(np.asarray, random_params(CONFIGS["gemma1"]))
  ckpt.save_orbax(tmp_path / "ck", params)
  like = jax.tree.map(lambda x: x, params)
  del like["img"]["head"]
  like["llm"]["new"] = np.zeros(2, np.float32)
  like["llm"]["final_norm"]["scale"] = np.zeros(5, np.float32)
  with pytest.raises(ValueError) as e:
    ckpt.restore_orbax(tmp_path / "ck", like=like)
  msg = str(e.value)
  for k in ("llm/new", "img/head/kernel", "img/head/bias", "llm/final_norm/scale: got (24,)"):
    assert k in msg, (k, msg)
  with pytest.raises(ValueError, match="no orbax checkpoint"):
    ckpt.restore_orbax(tmp_path / "nowhere")
