"""Analytic FLOPs of a PaliGemma forward pass, per layer, with compressed token counts.

Counted in FLOPs = 2 x multiply-accumulates of the matrix products (norms, softmax, RoPE and the
compression methods themselves are ignored: they are O(n d), not O(n d^2)). For a decoder layer
with n tokens, width d, MLP width m, H query heads and K key/value heads of size h this is
2 x (2 n d (H h) + 2 n d (K h) + 2 n^2 (H h) + 3 n d m), i.e. the usual 4nd^2 + 2n^2 d + 3ndm
multiply-accumulates (GeGLU has three MLP matrices) with the K/V projections scaled to K heads
(GQA / MQA). SigLIP layers are 4nD^2 + 2n^2 D + 2nDM (plain two-matrix MLP); in a layer where
ToMe merges r tokens (between attention and MLP) the MLP runs on n - r.

`tcjax.eval.cost.stage_flops` compares these counts with XLA's count of the compiled stages.
"""

from __future__ import annotations

from typing import Optional, Sequence

from tcjax.nn.config import GemmaConfig, PaliGemmaConfig, SiglipConfig


def vit_layer_flops(n: int, cfg: SiglipConfig, *, merged: int = 0) -> float:
  """One ViT layer entered by n tokens; `merged` of them merged by ToMe before the MLP."""
  D, M = cfg.width, cfg.mlp_dim
  return 2.0 * (4 * n * D * D + 2 * n * n * D + 2 * (n - merged) * D * M)


def vit_flops(cfg: SiglipConfig, tokens_per_layer: Optional[Sequence[int]] = None,
              merged_per_layer: Optional[Sequence[int]] = None) -> float:
  """Patch embedding + encoder layers; tokens_per_layer: tokens entering each layer (ToMe, a
  vit-stage selection); merged_per_layer: tokens ToMe merges inside each layer, between its
  attention and its MLP (`plan.tome_schedule`; None: none)."""
  n0 = cfg.num_patches
  tokens = list(tokens_per_layer) if tokens_per_layer is not None else [n0] * cfg.depth
  merged = list(merged_per_layer) if merged_per_layer is not None else [0] * cfg.depth
  if len(tokens) != cfg.depth or len(merged) != cfg.depth:
    raise ValueError(f"tokens_per_layer / merged_per_layer have {len(tokens)} / {len(merged)} "
                     f"entries for {cfg.depth} ViT layers")
  stem = 2.0 * n0 * cfg.patch_size ** 2 * 3 * cfg.width
  return stem + sum(vit_layer_flops(n, cfg, merged=r) for n, r in zip(tokens, merged))


def llm_layer_flops(n: int, cfg: GemmaConfig, *, n_kv: Optional[int] = None) -> float:
  """One decoder layer: n query tokens attending over n_kv keys (default n: prefill)."""
  n_kv = n if n_kv is None else n_kv
  d, m, hq, hk = cfg.width, cfg.mlp_dim, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  proj = 2 * n * d * hq + 2 * n * d * hk
  attn = 2 * n * n_kv * hq
  mlp = 3 * n * d * m
  return 2.0 * (proj + attn + mlp)


def llm_flops(cfg: GemmaConfig, tokens_per_layer: Sequence[int], *, logits_tokens: int = 1
              ) -> float:
  """Prefill of the decoder; tokens_per_layer: sequence length entering each layer."""
  if len(tokens_per_layer) != cfg.depth:
    raise ValueError(f"tokens_per_layer has {len(tokens_per_layer)} entries for "
                     f"{cfg.depth} decoder layers")
  head = 2.0 * logits_tokens * cfg.width * cfg.vocab_size
  return sum(llm_layer_flops(n, cfg) for n in tokens_per_layer) + head


def decode_step_flops(cfg: GemmaConfig, cache_per_layer: Sequence[int]) -> float:
  """One generated token attending over cache_per_layer[l] cached entries (+ itself)."""
  head = 2.0 * cfg.width * cfg.vocab_size
  return sum(llm_layer_flops(1, cfg, n_kv=c + 1) for c in cache_per_layer) + head


def prefill_flops(config: PaliGemmaConfig, *, text_len: int,
                  vit_tokens_per_layer: Optional[Sequence[int]] = None,
                  image_tokens_to_llm: Optional[int] = None,
                  llm_tokens_per_layer: Optional[Sequence[int]] = None,
                  logits_tokens: int = 1,
                  vit_merged_per_layer: Optional[Sequence[int]] = None) -> dict:
  """FLOPs of image encoding + projector + decoder prefill for ONE example.

  Args:
    vit_tokens_per_layer: tokens entering each ViT layer (None: all patches everywhere).
    vit_merged_per_layer: tokens ToMe merges inside each ViT layer, before its MLP (None: none).
    image_tokens_to_llm: image tokens after any post-ViT compression (None: what the ViT emits).
    llm_tokens_per_layer: total tokens (image + text) entering each decoder layer (None: image
      tokens + text_len everywhere), e.g. what a FastV plan reports.
  Returns: {"vit", "projector", "llm", "total"}.
  """
  v, g = config.img, config.llm
  vit = vit_flops(v, vit_tokens_per_layer, vit_merged_per_layer)
  out_vit = (vit_tokens_per_layer[-1] - (vit_merged_per_layer[-1] if vit_merged_per_layer else 0)
             if vit_tokens_per_layer is not None else v.num_patches)
  n_img = out_vit if image_tokens_to_llm is None else image_tokens_to_llm
  proj = 2.0 * n_img * v.width * g.width
  if llm_tokens_per_layer is None:
    llm_tokens_per_layer = [n_img + text_len] * g.depth
  llm = llm_flops(g, llm_tokens_per_layer, logits_tokens=logits_tokens)
  return {"vit": vit, "projector": proj, "llm": llm, "total": vit + proj + llm}
