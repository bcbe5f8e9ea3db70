"""Parity with HF transformers PaliGemma (PyTorch CPU as the oracle) through tcjax.checkpoints.load_hf.

Tiny random PaliGemma 1 (Gemma, multi-query) and PaliGemma 2 (Gemma 2: GQA, soft-caps, sliding
window, query scalar) models are built with transformers, every weight (norm scales included) is
randomised so that no convention (the (1 + scale) norms, transposes, head reshapes) can hide behind
an init of zeros or ones, saved with save_pretrained and loaded by tcjax.
"""

import copy
import json
import os

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
import transformers

import paligemma_ref
import tcjax
import tcjax.checkpoints as ckpt
from tcjax.checkpoints import hf as hf_ckpt

N_IMG = 16          # (32 / 8)^2 image tokens
V_REAL = 120        # <image> = 120, rows 120..127 are HF's image token + padding
IMAGE_TOKEN = 120


def hf_config(version):
  vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                image_size=32, patch_size=8, projection_dim=48, vision_use_head=False)
  text = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              head_dim=16, vocab_size=128)
  if version == 1:
    text.update(model_type="gemma", num_key_value_heads=1)
  else:
    # window 24: covers image + prompt (prefix attention is then the same in both), and binds
    # during decoding; small caps so that the tanh soft-capping really acts.
    text.update(model_type="gemma2", num_hidden_layers=3, num_key_value_heads=2,
                sliding_window=24, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
                final_logit_softcapping=3.0)
  return transformers.PaliGemmaConfig(vision_config=vision, text_config=text,
                                      image_token_index=IMAGE_TOKEN, projection_dim=48)


def build_hf(version, seed):
  torch.manual_seed(seed)
  model = transformers.PaliGemmaForConditionalGeneration(hf_config(version))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(torch.randn_like(p) * 0.5)  # far from both 0 and 1
      elif p.ndim == 1:
        p.copy_(torch.randn_like(p) * 0.1)
      else:
        fan_in = p[0].numel()
        p.copy_(torch.randn_like(p) / np.sqrt(fan_in))
  model.config._attn_implementation = "eager"  # pylint: disable=protected-access
  model.config.text_config._attn_implementation = "eager"
  model.config.vision_config._attn_implementation = "eager"
  return model.eval()


@pytest.fixture(scope="module", params=[1, 2], ids=["paligemma1", "paligemma2"])
def hf_dir(request, tmp_path_factory):
  version = request.param
  hf = build_hf(version, seed=version)
  path = str(tmp_path_factory.mktemp(f"pg{version}"))
  hf.save_pretrained(path)
  return version, hf, path


@pytest.fixture(scope="module")
def pair(hf_dir):
  version, hf, path = hf_dir
  model, params = ckpt.load_hf(path)
  return version, hf, path, model, params


def inputs(seed, B=2, T_prefix=6, T_suffix=5):
  rng = np.random.default_rng(seed)
  image = rng.uniform(-1, 1, size=(B, 32, 32, 3)).astype(np.float32)
  text = rng.integers(3, V_REAL, size=(B, T_prefix + T_suffix)).astype(np.int32)
  text[:, 0] = 2  # BOS
  mask_ar = np.concatenate([np.zeros((B, T_prefix)), np.ones((B, T_suffix))], 1).astype(np.int32)
  return image, text, mask_ar


def hf_logits(hf, image, text, mask_ar):
  B = text.shape[0]
  ids = np.concatenate([np.full((B, N_IMG), IMAGE_TOKEN), text], 1)
  types = np.concatenate([np.zeros((B, N_IMG)), mask_ar], 1)
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids, dtype=torch.long),
             pixel_values=torch.tensor(image.transpose(0, 3, 1, 2)),
             attention_mask=torch.ones(ids.shape, dtype=torch.long),
             token_type_ids=torch.tensor(types, dtype=torch.long))
  return out.logits.numpy()[:, N_IMG:, :V_REAL]


def test_converted_weights_reproduce_hf_in_numpy(hf_dir):
  # The HF -> big_vision mapping alone, checked without tcjax.nn: a NumPy forward pass over the
  # converted big_vision-named weights gives HF's logits.
  _, hf, path = hf_dir
  cfg, state = hf_ckpt.read_hf_dir(path)
  config = hf_ckpt.config_from_hf(cfg)
  flat = hf_ckpt.convert_state(state, config, cfg["text_config"]["vocab_size"])
  image, text, mask_ar = inputs(seed=2)
  want = hf_logits(hf, image, text, mask_ar)
  got = paligemma_ref.paligemma_logits(flat, config, image, text, mask_ar)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_config_from_hf(pair):
  version, _, _, model, _ = pair
  cfg = model.config
  assert cfg.llm.version == version and cfg.llm.vocab_size == V_REAL
  assert (cfg.img.width, cfg.img.depth, cfg.img.patch_size, cfg.img.image_size) == (32, 2, 8, 32)
  assert (cfg.llm.width, cfg.llm.head_dim, cfg.llm.mlp_dim) == (48, 16, 96)
  if version == 2:
    assert (cfg.llm.num_kv_heads, cfg.llm.sliding_window, cfg.llm.query_pre_attn_scalar,
            cfg.llm.attn_logits_softcap, cfg.llm.final_logits_softcap) == (2, 24, 24, 5.0, 3.0)
  else:
    assert cfg.llm.num_kv_heads == 1 and cfg.llm.final_logits_softcap is None


def test_logits_match_hf(pair):
  _, hf, _, model, params = pair
  image, text, mask_ar = inputs(seed=0)
  want = hf_logits(hf, image, text, mask_ar)
  got, _ = jax.jit(model.apply)({"params": params}, image, text, mask_ar)
  assert got.shape == want.shape
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)


def test_greedy_generation_matches_hf(pair):
  _, hf, _, model, params = pair
  image, text, _ = inputs(seed=1, T_prefix=6, T_suffix=0)
  B, T = text.shape
  steps = 10
  ids = np.concatenate([np.full((B, N_IMG), IMAGE_TOKEN), text], 1)
  with torch.no_grad():
    seq = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                      pixel_values=torch.tensor(image.transpose(0, 3, 1, 2)),
                      attention_mask=torch.ones(ids.shape, dtype=torch.long),
                      token_type_ids=torch.zeros(ids.shape, dtype=torch.long),
                      max_new_tokens=steps, do_sample=False,
                      # tcjax's vocabulary ends before <image> and HF's padding rows
                      suppress_tokens=list(range(V_REAL, 128)))
  want = seq.numpy()[:, ids.shape[1]:]
  got = np.asarray(tcjax.generate(model, params, image, text, max_new_tokens=steps))
  assert got.shape == (B, steps)
  eos = hf.config.text_config.eos_token_id
  for b in range(B):  # HF stops at EOS and pads; compare up to and including the first EOS
    n = next((i + 1 for i, t in enumerate(got[b]) if t == eos), steps)
    np.testing.assert_array_equal(got[b, :n], want[b, :n])


def _read_state(path):
  return hf_ckpt.read_safetensors(os.path.join(path, "model.safetensors"))


@pytest.mark.parametrize("layout", ["transformers4", "newer"])
def test_other_key_layouts_and_shards(pair, tmp_path, layout):
  _, _, path, _, params = pair
  state = _read_state(path)  # transformers 5 writes language_model.model.* / vision_tower.*
  canon = {hf_ckpt.canonical_name(k): v for k, v in state.items()}
  if layout == "transformers4":
    ren = {"language_model.": "language_model.model.", "vision_tower.": "vision_tower.vision_model.",
           "multi_modal_projector.": "multi_modal_projector."}
    lm_head = "language_model.lm_head.weight"
  else:
    ren = {"language_model.": "model.language_model.",
           "vision_tower.": "model.vision_tower.vision_model.",
           "multi_modal_projector.": "model.multi_modal_projector."}
    lm_head = "lm_head.weight"
  new = {}
  for k, v in canon.items():
    pre = next(p for p in ren if k.startswith(p))
    new[ren[pre] + k[len(pre):]] = v
  new[lm_head] = canon["language_model.embed_tokens.weight"]  # tied copy, as older files hold
  names = sorted(new)  # two shards + index, as save_pretrained writes for big models
  shards = {"model-00001-of-00002.safetensors": names[::2],
            "model-00002-of-00002.safetensors": names[1::2]}
  for fname, keys in shards.items():
    save_file({k: new[k] for k in keys}, str(tmp_path / fname))
  with open(tmp_path / "model.safetensors.index.json", "w") as f:
    json.dump({"metadata": {}, "weight_map": {k: fn for fn, ks in shards.items() for k in ks}}, f)
  with open(os.path.join(path, "config.json")) as f:
    (tmp_path / "config.json").write_text(f.read())
  _, loaded = ckpt.load_hf(str(tmp_path))
  a, b = ckpt.flatten(params), ckpt.flatten(loaded)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(np.asarray(b[k]), np.asarray(a[k]), err_msg=k)


def test_hf_errors_name_every_bad_tensor(pair):
  _, _, path, model, _ = pair
  state = _read_state(path)
  del state["language_model.model.layers.1.mlp.up_proj.weight"]
  state["vision_tower.encoder.layers.0.self_attn.q_proj.weight"] = np.zeros((32, 31), np.float32)
  state["language_model.model.layers.9.mlp.up_proj.weight"] = np.zeros((96, 48), np.float32)
  with pytest.raises(ValueError) as e:
    hf_ckpt.convert_state(state, model.config, 128)
  msg = str(e.value)
  for k in ("language_model.layers.1.mlp.up_proj.weight",
            "vision_tower.encoder.layers.0.self_attn.q_proj.weight: got (32, 31), expected (32, 32)",
            "language_model.layers.9.mlp.up_proj.weight"):
    assert k in msg, (k, msg)
  assert "1 missing, 1 unexpected, 1 wrong shape" in msg


def test_untied_lm_head_is_refused(pair):
  _, _, path, model, _ = pair
  state = _read_state(path)
  state["lm_head.weight"] = state["language_model.model.embed_tokens.weight"] + 1.0
  with pytest.raises(ValueError, match="lm_head"):
    hf_ckpt.convert_state(state, model.config, 128)


def test_bf16_safetensors(hf_dir, tmp_path):
  # bf16 safetensors are read through ml_dtypes, bit-exact with torch's bf16 weights.
  _, hf, path = hf_dir
  copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(str(tmp_path))
  state = hf_ckpt.read_safetensors(str(tmp_path / "model.safetensors"))
  f32 = _read_state(path)
  assert state.keys() == f32.keys()
  for k, a in state.items():
    assert a.dtype == ml_dtypes.bfloat16, k
    np.testing.assert_array_equal(a.astype(np.float32),
                                  torch.tensor(f32[k]).to(torch.bfloat16).float().numpy())
