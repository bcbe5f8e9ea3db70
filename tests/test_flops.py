"""Analytic FLOP counts (tcjax.eval.flops) against hand-worked numbers."""

import pytest

from tcjax.eval import flops
from tcjax.nn.config import GemmaConfig, PaliGemmaConfig, SiglipConfig

G = GemmaConfig(version=1, vocab_size=10, width=4, depth=2, mlp_dim=6, num_heads=2,
                num_kv_heads=1, head_dim=2)
V = SiglipConfig(width=4, depth=1, mlp_dim=8, num_heads=2, patch_size=2, image_size=4)


def test_llm_layer_by_hand():
  # n = 3: q,o 2*3*4*4 = 96; k,v (one KV head of 2) 2*3*4*2 = 48; QK^T and AV 2*3*3*4 = 72;
  # GeGLU 3*3*4*6 = 216 -> 432 multiply-accumulates = 864 FLOPs.
  assert flops.llm_layer_flops(3, G) == 864
  # decode: 1 query over 5 keys: 2*1*4*4 + 2*1*4*2 + 2*1*5*4 + 3*1*4*6 = 32+16+40+72 = 160 MACs
  assert flops.llm_layer_flops(1, G, n_kv=5) == 320
  assert flops.decode_step_flops(G, [4, 4]) == 2 * 320 + 2 * 4 * 10


def test_prefill_by_hand():
  cfg = PaliGemmaConfig(img=V, llm=G)
  # ViT: 4 patches; stem 4*(2*2*3)*4 = 192; layer 4*4*16 + 2*16*4 + 2*4*4*8 = 256+128+256 = 640.
  # projector 4*4*4 = 64; LLM 2 layers of n = 4 + 1 text token = 5, + 1 logits row.
  out = flops.prefill_flops(cfg, text_len=1)
  assert out["vit"] == 2 * (192 + 640)
  assert out["projector"] == 2 * 64
  n = 5
  layer = 2 * (2 * n * 4 * 4 + 2 * n * 4 * 2 + 2 * n * n * 4 + 3 * n * 4 * 6)
  assert out["llm"] == 2 * layer + 2 * 4 * 10
  assert out["total"] == out["vit"] + out["projector"] + out["llm"]
  # compressed: 2 image tokens to the LLM, then only 1 token in layer 1 (FastV-style)
  small = flops.prefill_flops(cfg, text_len=1, image_tokens_to_llm=2, llm_tokens_per_layer=[3, 2])
  assert small["llm"] == flops.llm_layer_flops(3, G) + flops.llm_layer_flops(2, G) + 80
  assert small["projector"] == 2 * 2 * 16
  with pytest.raises(ValueError, match="tokens_per_layer"):
    flops.prefill_flops(cfg, text_len=1, llm_tokens_per_layer=[3])


def test_tome_merges_before_the_mlp():
  # 4 tokens enter the layer, ToMe merges 1 after attention: the MLP (2 n D M = 2*n*4*8) runs on
  # 3. Attention part 4*4*16 + 2*16*4 = 384; MLP 2*3*4*8 = 192 -> 576 MACs.
  assert flops.vit_layer_flops(4, V, merged=1) == 2 * 576
  cfg = PaliGemmaConfig(img=V, llm=G)
  out = flops.prefill_flops(cfg, text_len=1, vit_tokens_per_layer=[4], vit_merged_per_layer=[1])
  assert out["vit"] == 2 * (192 + 576)
  assert out["projector"] == 2 * 3 * 16  # 3 tokens leave the ViT
  with pytest.raises(ValueError, match="merged_per_layer"):
    flops.vit_flops(V, [4], [1, 1])
