"""SigLIP ViT image tower (big_vision `vit.py` structure, no pooling head), with ViT-stage hooks.

Axis legend: B batch (frames folded in for video), N tokens, D width, H heads, h head dim,
L layers, M MLP width.

Pre-LN blocks: x += Attn(LN0(x)); [ToMe merge]; x += MLP(LN1(x)); then `encoder_norm`.
Parameters are big_vision's, stacked over layers (`Transformer/encoderblock/...` [L, ...]).
Runs of layers where the token count stays fixed go through one `lax.scan`; a layer where a
plan acts (ToMe, a selection after it, the layer whose attention feeds later stages) runs on its
own, with the same stacked parameters.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence, Tuple

import jax.numpy as jnp

from tcjax import compress
from tcjax.compress import primitives as cp
from tcjax.nn import layers as nl
from tcjax.nn import plan as plan_lib
from tcjax.nn.config import SiglipConfig
from tcjax.parallel.mesh import batch_reshape
from tcjax.tokens import Tokens

_BLOCK = ("Transformer", "encoderblock")


def patch_embed(p, image, cfg: SiglipConfig):
  """float[B, H, W, 3] -> float[B, N, D]: the conv stem as one matmul over patches, + pos emb."""
  b, hh, ww, c = image.shape
  ps = cfg.patch_size
  if (hh, ww) != (cfg.image_size, cfg.image_size) or c != 3:
    raise ValueError(f"image must be [B, {cfg.image_size}, {cfg.image_size}, 3], "
                     f"got {image.shape}")
  g = cfg.image_size // ps
  patches = batch_reshape(image, (b, g, ps, g, ps, c)).transpose(0, 1, 3, 2, 4, 5)
  patches = batch_reshape(patches, (b, g * g, ps * ps * c))
  kernel = p["embedding"]["kernel"].reshape(-1, cfg.width)  # HWIO -> [p*p*3, D], same order
  x = patches.astype(kernel.dtype) @ kernel + p["embedding"]["bias"]
  return x + p["pos_embedding"]


def _attn_half(p, x, bias, cfg: SiglipConfig):
  """x + Attn(LN0(x)) and the (q, k) it used. bias: float[B, N] per-key logit bias or None."""
  mha = p["MultiHeadDotProductAttention_0"]
  y = nl.layer_norm(x, p["LayerNorm_0"]["scale"], p["LayerNorm_0"]["bias"], cfg.norm_eps)
  q, k, v = (jnp.einsum("bnd,dhk->bnhk", y, mha[n]["kernel"]) + mha[n]["bias"]
             for n in ("query", "key", "value"))
  scale = q.shape[-1] ** -0.5
  o = nl.attention(q, k, v, bias=bias, scale=scale)
  return x + jnp.einsum("bnhk,hkd->bnd", o, mha["out"]["kernel"]) + mha["out"]["bias"], q, k


def _mlp_half(p, x, cfg: SiglipConfig):
  mlp = p["MlpBlock_0"]
  y = nl.layer_norm(x, p["LayerNorm_1"]["scale"], p["LayerNorm_1"]["bias"], cfg.norm_eps)
  h = nl.gelu(y @ mlp["Dense_0"]["kernel"] + mlp["Dense_0"]["bias"])
  return x + h @ mlp["Dense_1"]["kernel"] + mlp["Dense_1"]["bias"]


def _run(stacked, x, bias, lo: int, hi: int, cfg: SiglipConfig):
  """Layers [lo, hi) as one scan (token count fixed)."""
  if hi <= lo:
    return x

  def body(x, args):
    p = args[0]
    x, _, _ = _attn_half(p, x, bias, cfg)
    return _mlp_half(p, x, cfg), None

  return nl.scan_layers(body, x, stacked, lo, hi, remat=cfg.remat)[0]


def key_bias(tokens: Tokens, prop_attn: bool):
  """float32[B, N] attention bias for keys: ToMe's proportional attention log(size) when on
  (`tome.attention_bias`), and in any case a large negative bias on padding."""
  if prop_attn:
    return compress.tome.attention_bias(tokens)
  return jnp.where(tokens.mask, 0.0, nl.NEG_INF)


def _signals(q, k, tokens: Tokens, bias):
  """ViT signals of one layer: mean received attention (SigLIP has no [CLS] row), head-mean
  keys and the keys per head (the key projection, bias included)."""
  received = nl.received_attention(q, k, bias=bias, scale=q.shape[-1] ** -0.5,
                                   query_mask=tokens.mask)
  received = jnp.where(tokens.mask, received, 0.0)
  return {"attn": received[:, None, :], "scores": received, "keys": k.mean(2), "keys_heads": k}


def encode(p, image, cfg: SiglipConfig, plan=(), *, want_signals: Sequence[int] = (),
           rng_seed: int = 0) -> Tuple[Tokens, Dict[int, Dict[str, Any]], Dict[str, Any]]:
  """Runs the tower on `image: float[B, H, W, 3]` in [-1, 1].

  Args:
    p: the `img` parameter subtree (without `head`).
    plan: the normalized compression plan; its "vit" entries act here.
    want_signals: the ViT layers (in [0, depth)) whose attention / keys the later stages need.

  Returns:
    (tokens after `encoder_norm`, in raster order; signals {layer: {"attn": float32[B, 1, N],
     "scores": float32[B, N], "keys": float32[B, N, h], "keys_heads": float32[B, N, H, h]}} for
     each layer of `want_signals`; aux {"vit_tokens": tuple of tokens entering each layer}).
  """
  depth = cfg.depth
  stacked = p["Transformer"]["encoderblock"]
  x = patch_embed(p, image, cfg)
  tokens = Tokens.from_grid(x, cfg.grid)
  r_sched, prop_attn = plan_lib.tome_schedule(plan, depth)
  selections = plan_lib.vit_selections(plan, depth)
  want_signals = set(want_signals)
  special = sorted({l for l in range(depth) if r_sched[l]} | set(selections) | want_signals)
  merged = False  # once ToMe merged, keys carry sizes: proportional attention from then on
  selected = False  # after a selection, padding may exist (fixed-capacity methods)
  signals: Dict[int, Dict[str, Any]] = {}
  signal_count = {}
  counts = []
  lo = 0
  for l in special + [depth]:
    bias = key_bias(tokens, prop_attn and merged) if (merged or selected) else None
    tokens = tokens.replace(x=_run(stacked, tokens.x, bias, lo, l, cfg))
    counts += [tokens.num_tokens] * (l - lo)
    if l == depth:
      break
    pl = nl.layer_params(stacked, l)
    counts.append(tokens.num_tokens)
    x, q, k = _attn_half(pl, tokens.x, bias, cfg)
    if l in want_signals:
      signals[l] = _signals(q, k, tokens, bias)
      signal_count[l] = tokens.num_tokens
    if r_sched[l]:
      tokens = compress.tome.bipartite_merge(tokens.replace(x=x), r_sched[l], keys=k.mean(2))
      merged = True
      x = tokens.x
    tokens = tokens.replace(x=_mlp_half(pl, x, cfg))
    for i, opts in selections.get(l, ()):
      if r_sched[l]:
        raise ValueError(f"plan[{i}]: a selection after ViT layer {l} cannot share the layer "
                         "with a ToMe merge (its signals predate the merge)")
      sig = _signals(q, k, tokens, bias)
      tokens = plan_lib.run_entry(opts, tokens, sig, "vit", f"plan[{i}] (vit, {opts['method']})",
                                  rng_seed)
      selected = True
    lo = l + 1
  if merged:  # ToMe scrambles the order on purpose; the LLM gets raster order back
    tokens = cp.sort_by_position(tokens)
  for l, count in signal_count.items():
    if tokens.num_tokens != count:
      raise ValueError(f"post-ViT signals come from ViT layer {l} ({count} tokens) but the ViT "
                       f"stage changed the tokens after it ({tokens.num_tokens}); set "
                       "signal_layer to the last layer that changes them, or move the "
                       "ViT-stage methods earlier")
  enc = p["Transformer"]["encoder_norm"]
  tokens = tokens.replace(x=nl.layer_norm(tokens.x, enc["scale"], enc["bias"], cfg.norm_eps))
  return tokens, signals, {"vit_tokens": tuple(counts)}


def frames_to_video(tokens: Tokens, frames: int) -> Tokens:
  """Per-frame tokens float[B*T, n, D] (grid (1, h, w)) -> one clip's tokens float[B, T*n, D]
  with (frame, row, col) positions and `src` over the T*h*w patches of grid (T, h, w)."""
  bt, n, d = tokens.x.shape
  if bt % frames:
    raise ValueError(f"{bt} frame-batched examples are not a multiple of frames={frames}")
  b = bt // frames
  _, h, w = tokens.grid
  frame = jnp.arange(frames, dtype=jnp.int32)
  pos = batch_reshape(tokens.pos, (b, frames, n, 3)).at[..., 0].set(frame[None, :, None])
  src = batch_reshape(tokens.src, (b, frames, h * w))
  src = jnp.where(src >= 0, src + frame[None, :, None] * n, -1)
  return Tokens(x=batch_reshape(tokens.x, (b, frames * n, d)),
                pos=batch_reshape(pos, (b, frames * n, 3)),
                size=batch_reshape(tokens.size, (b, frames * n)),
                mask=batch_reshape(tokens.mask, (b, frames * n)),
                src=batch_reshape(src, (b, frames * h * w)), grid=(frames, h, w))


def video_signals(signals, frames: int):
  """Per-frame ViT signals {layer: {name: [B*T, ...]}} -> per-clip: attn [B, 1, T*n], scores
  [B, T*n], keys [B, T*n, h], keys_heads [B, T*n, H, h]."""
  out = {}
  for layer, named in signals.items():
    out[layer] = {}
    for name, v in named.items():
      bt = v.shape[0]
      if name == "attn":
        v = batch_reshape(v, (bt // frames, 1, v.size // bt * frames))
      else:  # token axis 1: the frames' tokens joined
        v = batch_reshape(v, (bt // frames, v.shape[1] * frames) + v.shape[2:])
      out[layer][name] = v
  return out
