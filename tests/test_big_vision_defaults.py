"""big_vision defaults: PaliGemma 2 `.npz` config inference, and the `mu` ViT variant.

big_vision's PaliGemma 2 runs Gemma 2 WITHOUT the final-logit soft-cap and WITHOUT a sliding
window (its colabs build the model with `final_logits_softcap=0.0`; its attention has no local
layers), so a PaliGemma 2 `.npz` must load that way. The expected logits come from the NumPy
float64 forward in paligemma_ref, given hyper-parameters written down here from big_vision's
definitions, not from tcjax's config inference.
"""

import types

import jax
import numpy as np

import paligemma_ref
import tcjax.checkpoints as ckpt
from tcjax.nn.config import GemmaConfig, PaliGemmaConfig, SiglipConfig

# big_vision's vit.decode_variant("mu/8") at 16 x 16 pixels: width 32, depth 1, MLP 128, 2 heads.
REF_IMG = types.SimpleNamespace(width=32, depth=1, mlp_dim=128, num_heads=2, patch_size=8,
                                image_size=16, norm_eps=1e-6)
# A tiny Gemma 2 as big_vision's PaliGemma 2 runs it: post norms, attention soft-cap 50, query
# scale head_dim ** -0.5, no final-logit soft-cap, no sliding window. Two query heads share one
# KV head (q_einsum + kv_einsum).
REF_LLM = types.SimpleNamespace(version=2, vocab_size=64, width=32, depth=2, mlp_dim=64,
                                num_heads=2, num_kv_heads=1, head_dim=16, norm_eps=1e-6,
                                rope_base=10_000.0, query_pre_attn_scalar=16,
                                attn_logits_softcap=50.0, final_logits_softcap=None,
                                sliding_window=None)
REF = types.SimpleNamespace(img=REF_IMG, llm=REF_LLM)


def test_mu_variant_is_big_vision_mu():
  v = SiglipConfig.from_variant("mu/8", image_size=16)
  assert (v.width, v.depth, v.mlp_dim, v.num_heads, v.patch_size) == (32, 1, 128, 2, 8)


def random_flat(seed=0):
  """Random big_vision-named params of the tiny model (shapes from tcjax's tree table)."""
  g = REF_LLM
  shapes_config = PaliGemmaConfig(
      img=SiglipConfig.from_variant("mu/8", image_size=16),
      llm=GemmaConfig(version=2, vocab_size=g.vocab_size, width=g.width, depth=g.depth,
                      mlp_dim=g.mlp_dim, num_heads=g.num_heads, num_kv_heads=g.num_kv_heads,
                      head_dim=g.head_dim))
  rng = np.random.default_rng(seed)
  flat = {}
  for k, s in ckpt.param_shapes(shapes_config).items():
    # Small weights keep the float32 model close to the float64 reference; a unit-scale
    # embedding makes the logits large enough (|logit| up to ~40) for a soft-cap of 30 to show.
    scale = 1.0 if k == "llm/embedder/input_embedding" else 0.3 if k.endswith("scale") else 0.15
    flat[k] = (rng.normal(size=s) * scale).astype(np.float32)
  return flat


def inputs(seed=0, B=2, T_prefix=3, T_suffix=3):
  rng = np.random.default_rng(seed)
  image = rng.uniform(-1, 1, size=(B, 16, 16, 3)).astype(np.float32)
  text = rng.integers(0, REF_LLM.vocab_size, size=(B, T_prefix + T_suffix)).astype(np.int32)
  mask_ar = np.concatenate([np.zeros((B, T_prefix)), np.ones((B, T_suffix))], 1).astype(np.int32)
  return image, text, mask_ar


def test_gemma2_npz_loads_without_final_softcap_or_window(tmp_path):
  flat = random_flat()
  path = tmp_path / "pg2.npz"
  ckpt.save_big_vision(path, ckpt.unflatten(flat))
  model, params = ckpt.load_big_vision(path)  # config inferred from the shapes

  llm = model.config.llm
  assert llm.version == 2
  assert llm.final_logits_softcap is None and llm.sliding_window is None
  assert llm.attn_logits_softcap == 50.0 and llm.query_pre_attn_scalar == 16
  assert (llm.num_heads, llm.num_kv_heads, llm.head_dim) == (2, 1, 16)
  img = model.config.img
  assert (img.width, img.depth, img.mlp_dim, img.num_heads) == (32, 1, 128, 2)

  image, text, mask_ar = inputs()
  want = paligemma_ref.paligemma_logits(flat, REF, image, text, mask_ar)
  got, _ = jax.jit(model.apply)({"params": params}, image, text, mask_ar)
  got = np.asarray(got)
  assert got.shape == want.shape == (2, 6, REF_LLM.vocab_size)
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)

  # The test has teeth: Gemma 2's final soft-cap of 30 would move these logits well past the
  # tolerance (a window of 4096 cannot bind on 10 tokens, so only the config shows it is off).
  capped = types.SimpleNamespace(img=REF_IMG, llm=types.SimpleNamespace(
      **{**vars(REF_LLM), "final_logits_softcap": 30.0}))
  want_capped = paligemma_ref.paligemma_logits(flat, capped, image, text, mask_ar)
  assert np.abs(want_capped - want).max() > 0.1
