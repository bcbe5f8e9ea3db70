"""Gemma 1 / Gemma 2 decoder (big_vision `ppp/gemma.py` parameters), prefill with in-LLM pruning,
and KV-cached decoding.

Axis legend: B batch, S sequence (image tokens first, then text), C cache capacity, E width,
H query heads, K key/value heads, h head dim, F MLP width, V vocabulary, L layers (Ls in one
segment), N image tokens, T text tokens.

Layer: x += [post_attention_norm](Attn(pre_attention_norm(x))); x += [post_ffw_norm](GeGLU(
pre_ffw_norm(x))) with RMSNorm x * (1 + scale), RoPE on the two halves of the head dim, queries
scaled by `query_pre_attn_scalar ** -0.5` (Gemma 2) or `head_dim ** -0.5`, Gemma 2 logit
soft-caps and a sliding window on even (local) layers. Attention mask: big_vision's prefix-LM
rule (image + prefix bidirectional, suffix causal) over valid tokens.

In-LLM pruning (`plan.LLMHook`) splits the layers into segments of fixed sequence length; each
segment runs as one `lax.scan` over its stacked parameters and owns its slice of the KV cache,
so layers after a pruning step cache only the retained tokens (and, for a method registered with
`llm_kv="all"`, the earlier segments mask the pruned image entries out of their caches too).
Positions after a step follow the hook's `positions` (`plan.POSITIONS`): with "original" the
retained tokens keep their RoPE positions and decoding continues from the last position + 1;
with "reindex" (official PyramidDrop and SparseVLM v1.5) the survivors are renumbered by rank
among the valid tokens (`renumber`: image survivors 0..n'-1, the text right after), and each
segment decodes from its own cache length, so the layers before the step keep numbering past
the tokens they still hold (`Segment.pos_offset`; caches that dropped pruned entries with
`llm_kv="all"` keep their own numbering, holes included). A merging method's output hidden states
replace the image tokens' (each at its representative's position); so do the tokens a selecting
method merged on the side (SparseVLM v1.5's recycled clusters: their size grew).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
from flax import struct

from tcjax import compress
from tcjax.nn import layers as nl
from tcjax.nn import plan as plan_lib
from tcjax.nn.config import GemmaConfig
from tcjax.parallel import attention as par_attn
from tcjax.parallel.mesh import (batch_reshape, constrain, context_mesh, match_batch,
                                 mesh_axis, sharded_axis, unshard_axis)
from tcjax.tokens import Tokens


@struct.dataclass
class Seq:
  """The decoder's input sequence: N image tokens, then T text tokens.

  x: float[B, S, E]; pos: int32[B, S] RoPE positions; valid: bool[B, S]; mask_ar: int32[B, S]
  (0 = prefix, 1 = causal suffix); n_img: static N.
  """

  x: jax.Array
  pos: jax.Array
  valid: jax.Array
  mask_ar: jax.Array
  n_img: int = struct.field(pytree_node=False)


@struct.dataclass
class Segment:
  """KV cache of layers [first_layer, first_layer + Ls), which all see the same tokens.

  k, v: float[Ls, B, C, K, h] (post-RoPE keys); pos: int32[B, C]; valid: bool[B, C];
  length: static entries written by prefill (decoding appends at length + step);
  first_layer: static; pos_offset: int32[B] or None (0): a decoded token's position in these
  layers is `Cache.next_pos + pos_offset` (a segment before a step with positions="reindex"
  numbers its tokens past the ones the later layers dropped); n_img: static count of the image
  entries at its head; img_ids: int32[B, n_img] or None: which token each image entry is (its
  position entering the decoder, unchanged by renumbering; decode-time policies key on it).
  """

  k: jax.Array
  v: jax.Array
  pos: jax.Array
  valid: jax.Array
  length: int = struct.field(pytree_node=False)
  first_layer: int = struct.field(pytree_node=False)
  pos_offset: Any = None
  n_img: int = struct.field(pytree_node=False, default=0)
  img_ids: Any = None


@struct.dataclass
class Cache:
  """segments: tuple of Segment; step: int32[] tokens decoded; next_pos: int32[B] the position
  of the next token in the last segment (every segment's, unless a step renumbered positions:
  `Segment.pos_offset`).

  Decode-time KV policies (`plan.DecodeHook`, the plan's decode stage) ride in the cache, so
  that `decode_step` needs no plan: decode_hooks (static) says which policies act from which
  layer, decode_state holds each one's state (a pytree batched on axis 0), n_image (static) is
  the number of image tokens that entered the decoder (their positions entering it, the
  segments' `img_ids`, are 0 .. n_image - 1: the range of the keep tables).
  """

  segments: Tuple[Segment, ...]
  step: jax.Array
  next_pos: jax.Array
  decode_state: Tuple[Any, ...] = ()
  decode_hooks: Tuple[Any, ...] = struct.field(pytree_node=False, default=())
  n_image: int = struct.field(pytree_node=False, default=0)


def renumber(valid) -> jax.Array:
  """int32[B, S] RoPE positions counting the valid tokens of `valid: bool[B, S]`: each valid
  token's rank among them (0..n-1 in order; padding repeats the last one before it, 0 at the
  start). The decoder's input positions (big_vision: cumsum(input_mask) - 1), and the
  survivors' after a step with positions="reindex"."""
  return jnp.maximum(jnp.cumsum(valid.astype(jnp.int32), 1) - 1, 0)


def scale(cfg: GemmaConfig) -> float:
  return float(cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5


def is_local(cfg: GemmaConfig, layer):
  """Gemma 2's even layers attend within a sliding window (`layer` may be traced inside a layer
  scan: then a traced bool on Gemma 2, and False otherwise)."""
  return cfg.version == 2 and bool(cfg.sliding_window) and layer % 2 == 0


def take_rows(table, idx):
  """table float[R, E], idx int32[B, T] -> float[B, T, E] rows `table[idx]`, batch-sharded like
  idx on Explicit mesh axes (where a gather must be told where its rows go)."""
  spec = getattr(jax.typeof(idx).sharding, "spec", None)
  if spec is not None and any(a is not None for a in spec):
    return table.at[idx].get(out_sharding=jax.sharding.PartitionSpec(spec[0], None, None))
  return table[idx]


def embed_text(p, text, cfg: GemmaConfig):
  """int32[B, T] -> float[B, T, E], scaled by sqrt(E) as Gemma does."""
  emb = p["embedder"]["input_embedding"]
  x = take_rows(emb, text)
  return x * jnp.sqrt(jnp.asarray(cfg.width, nl.compute_dtype(emb))).astype(emb.dtype)


def logits(p, x, cfg: GemmaConfig):
  """final norm, tied output embedding, Gemma 2 final soft-cap: float[..., E] -> float[..., V]."""
  return readout(p, final_norm(p, x, cfg), cfg)


def final_norm(p, x, cfg: GemmaConfig):
  """The final RMSNorm: float[..., E] last-layer states -> float[..., E] as the output embedding
  reads them."""
  return nl.rms_norm(x, p["final_norm"]["scale"], cfg.norm_eps)


def readout(p, x, cfg: GemmaConfig):
  """Tied output embedding and Gemma 2 final soft-cap of normed states: float[..., E] ->
  float[..., V]."""
  out = jnp.einsum("...e,ve->...v", x, p["embedder"]["input_embedding"])
  return nl.softcap(out, cfg.final_logits_softcap)


def _project(p, x, pos, cfg: GemmaConfig):
  """q [B, T, H, h], k / v [B, T, K, h] with RoPE on q and k."""
  q, k, v = _qkv(p, x, cfg)
  return nl.rope(q, pos, cfg.rope_base), nl.rope(k, pos, cfg.rope_base), v


def _qkv(p, x, cfg: GemmaConfig):
  """q [B, T, H, h], k / v [B, T, K, h] before RoPE."""
  a = p["attn"]
  y = nl.rms_norm(x, p["pre_attention_norm"]["scale"], cfg.norm_eps)
  if "qkv_einsum" in a:
    w = a["qkv_einsum"]["w"]
    q, k, v = (jnp.einsum("btd,hdk->bthk", y, w[i]) for i in range(3))
  else:
    q = jnp.einsum("btd,hdk->bthk", y, a["q_einsum"]["w"])
    w = a["kv_einsum"]["w"]
    k, v = (jnp.einsum("btd,hdk->bthk", y, w[i]) for i in range(2))
  return q, k, v


def _finish(p, x, o, cfg: GemmaConfig):
  """Attention output projection, residuals and the GeGLU MLP."""
  o = jnp.einsum("bthk,hkd->btd", o, p["attn"]["attn_vec_einsum"]["w"])
  if cfg.version == 2:
    o = nl.rms_norm(o, p["post_attention_norm"]["scale"], cfg.norm_eps)
  x = x + o
  y = nl.rms_norm(x, p["pre_ffw_norm"]["scale"], cfg.norm_eps)
  w = p["mlp"]["gating_einsum"]
  h = nl.gelu(y @ w[0]) * (y @ w[1])
  h = h @ p["mlp"]["linear"]
  if cfg.version == 2:
    h = nl.rms_norm(h, p["post_ffw_norm"]["scale"], cfg.norm_eps)
  return x + h


def mask_rows(seq: Seq, start: int, cfg: GemmaConfig, local):
  """bool[B, S - start, S]: what query rows start.. may attend. big_vision's prefix-LM rule over
  valid keys; on Gemma 2's local layers (`local` may be traced) also query pos - key pos <
  window, except between two prefix tokens, which always see each other (as transformers builds
  PaliGemma 2's mask)."""
  cum = jnp.cumsum(seq.mask_ar.astype(jnp.int32), axis=-1)
  allowed = (cum[:, None, :] <= cum[:, start:, None]) & seq.valid[:, None, :]
  if not (cfg.version == 2 and cfg.sliding_window):
    return allowed
  near = (seq.pos[:, start:, None] - seq.pos[:, None, :]) < cfg.sliding_window
  prefix = cum == 0
  near |= prefix[:, start:, None] & prefix[:, None, :]
  return allowed & (near | ~jnp.asarray(local))


def ring_mesh():
  """The context mesh when its `seq` axis shards the sequence (ring attention), else None."""
  mesh = context_mesh()
  return mesh if mesh_axis(mesh, "seq") else None


def self_attention(q, k, v, seq: Seq, layer, cfg: GemmaConfig, masks=None):
  """Prefill self-attention of one layer (`layer` may be traced inside a scan).

  On a mesh with a `seq` axis: ring attention (`tcjax.parallel.ring_attention`), the mask built
  block by block from (cumsum(mask_ar), valid, position), never as an S x S array. Otherwise the
  fused `jax.nn.dot_product_attention` path with `masks` = (global, local) from `mask_rows`.
  """
  mesh = ring_mesh()
  if mesh is not None:
    window = cfg.sliding_window if cfg.version == 2 else None
    return par_attn.ring_attention(
        q, k, v, mesh=mesh, axis="seq", batch_axis=mesh_axis(mesh, "data"), mask_ar=seq.mask_ar,
        kv_valid=seq.valid, scale=scale(cfg), softcap=cfg.attn_logits_softcap,
        positions=seq.pos, window=window or None, local=is_local(cfg, layer))
  return nl.attention(q, k, v, mask=_layer_mask(cfg, layer, *masks), scale=scale(cfg),
                      cap=cfg.attn_logits_softcap)


def seq_masks(seq: Seq, cfg: GemmaConfig):
  """(global, local) masks bool[B, S, S] for the dense path; None under ring attention."""
  if ring_mesh() is not None:
    return None
  glob = mask_rows(seq, 0, cfg, False)
  if not (cfg.version == 2 and cfg.sliding_window):
    return glob, glob
  return glob, mask_rows(seq, 0, cfg, True)


def _run_segment(layers, seq: Seq, masks, lo: int, hi: int, cfg: GemmaConfig):
  """Layers [lo, hi) as one scan: (x out, k [Ls, B, S, K, h], v)."""
  def body(x, args):
    p, l, _ = args
    q, k, v = _project(p, x, seq.pos, cfg)
    x = _finish(p, x, self_attention(q, k, v, seq, l, cfg, masks), cfg)
    return constrain(x, "data", "seq"), (k, v)

  return nl.scan_layers(body, seq.x, layers, lo, hi, remat=cfg.remat)


def _layer_mask(cfg: GemmaConfig, layer, glob, loc):
  """The mask of (traced) layer index `layer`: the local one on sliding-window layers."""
  if loc is glob:
    return glob
  return jnp.where(is_local(cfg, layer), loc, glob)


def prefill(p, seq: Seq, img: Tokens, cfg: GemmaConfig, hooks: Sequence[plan_lib.LLMHook] = (),
            *, cache_size: int = 0, decode_hooks: Sequence[plan_lib.DecodeHook] = (),
            image_signals: Optional[Dict[str, Any]] = None
            ) -> Tuple[jax.Array, Seq, Cache, Dict[str, Any]]:
  """Runs every decoder layer over `seq`, pruning image tokens where `hooks` say.

  Args:
    p: the `llm` parameter subtree.
    seq: image + text sequence (`embed` order); img: the N image tokens' bookkeeping
      (pos / size / mask / src of their origin on the image grid), x unused.
    hooks: pruning steps (plan.llm_hooks), sorted by layer; a hook's `vit_layer` resolved.
    cache_size: extra cache entries reserved for decoding.
    decode_hooks: decode-time KV policies (plan.decode_hooks); their state starts in the cache.
    image_signals: per-image-token signals from before the decoder that hooks may need:
      {"vit_scores": {ViT layer: float32[B, N]}} (`PaliGemma.embed_image`).

  Returns:
    (x: float[B, S', E] output of the last layer, the final Seq (S' = N' + T tokens), the KV
     cache, aux {"llm_tokens": static tokens entering each layer, "llm_valid_tokens":
     int32[B, L] valid tokens entering each layer, "image_tokens_kept": int32[B],
     "llm_kept_pos": per hook int32[B, N'] the positions the kept image tokens had entering
     the decoder (which tokens stay; -1 on padding), "llm_positions": per cache segment (in
     layer order, as `Cache.segments`) int32[B, S_j] the RoPE positions its layers use (-1 on
     padding), "llm_attn": per hook the float32[B, T, N] prompt-row attention it scored with
     (mean over heads; None when the method needs none)}).
  """
  depth = cfg.depth
  layers = p["layers"]
  at = {}
  for h in hooks:
    if h.layer in at:
      raise ValueError(f"two llm-stage methods prune at decoder layer {h.layer}; "
                       "combine them into one or use different layers")
    at[h.layer] = h
  rows = _text_rows(seq, hooks)
  n_initial = seq.n_img
  # Per-image-token signals carried along the pruning steps (gathered with the kept tokens).
  carried = {("vit_scores", l): v
             for l, v in dict((image_signals or {}).get("vit_scores", {})).items()}
  image_count = img.count() if any("image_count" in h.signals for h in hooks) else None
  segments, counts, valid_counts, kept_pos, attn_rows = [], [], [], [], []
  seg_img = []  # image tokens at the head of each segment's cache
  orig = seq.pos  # each token's position entering the decoder: which token it is
  seg_orig, seg_pos = [], []  # per segment: its tokens' `orig`, and their RoPE positions
  lo = 0
  for stop in sorted(at) + [depth]:
    seq = seq.replace(x=constrain(seq.x, "data", "seq"))
    masks = seq_masks(seq, cfg)
    need_prev = stop in at and at[stop].attn_from == "prev" and stop > lo
    hi = stop - 1 if need_prev else stop
    ks, vs = [], []
    x = seq.x
    if hi > lo:
      x, (k, v) = _run_segment(layers, seq, masks, lo, hi, cfg)
      ks, vs = [k], [v]
    prev = None
    if need_prev:  # layer stop-1 on its own: its q and k are the hook's signals
      pl = nl.layer_params(layers, hi)
      q0, k0, v = _qkv(pl, x, cfg)
      q, k = nl.rope(q0, seq.pos, cfg.rope_base), nl.rope(k0, seq.pos, cfg.rope_base)
      x = _finish(pl, x, self_attention(q, k, v, seq, hi, cfg, masks), cfg)
      ks, vs = ks + [k[None]], vs + [v[None]]
      prev = (q, k, hi, q0, k0)
    seq = seq.replace(x=x)
    if stop > lo:
      segments.append(_segment(ks, vs, seq, lo, cache_size))
      seg_img.append(seq.n_img)
      seg_orig.append(orig)
      seg_pos.append(seq.pos)
      counts += [seq.x.shape[1]] * (stop - lo)
      valid_counts += [seq.valid.sum(-1)] * (stop - lo)
    if stop == depth:
      break
    hook = at[stop]
    if prev is None:  # attn_from "next": layer `stop`'s own projections of its input
      pl = nl.layer_params(layers, stop)
      q0, k0, _ = _qkv(pl, seq.x, cfg)
      prev = (nl.rope(q0, seq.pos, cfg.rope_base), nl.rope(k0, seq.pos, cfg.rope_base), stop,
              q0, k0)
    extra = {}
    if "image_count" in hook.signals:
      extra["image_count"] = image_count
    if "vit_scores" in hook.signals:
      if ("vit_scores", hook.vit_layer) not in carried:
        raise ValueError(f"llm {hook.method} at layer {hook.layer} needs signal 'vit_scores' "
                         f"(ViT layer {hook.vit_layer}'s attention), which the decoder only has "
                         "when the model embeds the image itself (not from image_tokens=)")
      extra["vit_scores"] = carried[("vit_scores", hook.vit_layer)]
    n_img = seq.n_img
    seq, img, attn, idx = _prune(p, seq, img, hook, prev, rows.get(hook.rows), n_initial, cfg,
                                 extra)
    carried = {key: jnp.take_along_axis(v, idx, 1) for key, v in carried.items()}
    orig = unshard_axis(orig, 1)
    orig = jnp.concatenate([jnp.take_along_axis(orig[:, :n_img], idx, 1), orig[:, n_img:]], 1)
    if hook.positions == "reindex":
      seq = seq.replace(pos=renumber(seq.valid))
    elif hook.positions != "original":
      raise ValueError(f"llm {hook.method} at layer {hook.layer}: positions must be one of "
                       f"{plan_lib.POSITIONS}, got {hook.positions!r}")
    kept_pos.append(jnp.where(img.mask, orig[:, :seq.n_img], -1))
    if hook.kv == "all":  # the earlier layers' caches drop the pruned image tokens too
      segments = [_keep_image_entries(sg, n_sg, o, kept_pos[-1])
                  for sg, n_sg, o in zip(segments, seg_img, seg_orig)]
    attn_rows.append(attn)
    lo = stop
  next_pos = _next_pos(seq.pos, seq.valid)
  if any(h.positions != "original" for h in hooks):
    # Each segment decodes from its own numbering: the next position after its last token.
    segments = [sg.replace(pos_offset=_next_pos(sp, sg.valid[:, :sg.length]) - next_pos)
                for sg, sp in zip(segments, seg_pos)]
  if decode_hooks:  # which token each segment's image entry is: the policies key on it
    segments = [sg.replace(img_ids=o[:, :sg.n_img]) for sg, o in zip(segments, seg_orig)]
  states = []
  for h in decode_hooks:  # each decode-time policy's state before the first step
    seg = _segment_of(segments, h.signal_layer)
    states.append(compress.init_decode(h.method, seg.valid[:, :seg.n_img], **dict(h.options)))
  cache = Cache(segments=tuple(segments), step=jnp.zeros((), jnp.int32), next_pos=next_pos,
                decode_state=tuple(states), decode_hooks=tuple(decode_hooks), n_image=n_initial)
  aux = {"llm_tokens": tuple(counts), "llm_valid_tokens": jnp.stack(valid_counts, -1),
         "image_tokens_kept": img.count(), "llm_kept_pos": tuple(kept_pos),
         "llm_positions": tuple(jnp.where(sg.valid[:, :sg.length], sp, -1)
                                for sg, sp in zip(segments, seg_pos)),
         "llm_attn": tuple(attn_rows)}
  return x, seq, cache, aux


def _next_pos(pos, valid):
  """int32[B]: the position after the last valid token's."""
  return jnp.take_along_axis(pos, _last_valid(valid)[:, None], 1)[:, 0] + 1


def _keep_image_entries(seg: Segment, n_img: int, orig, kept) -> Segment:
  """The segment with its first `n_img` (image) cache entries valid only where their token (its
  position entering the decoder, `orig: int32[B, S]`) is one of `kept: int32[B, K]` (-1: none);
  those positions are unique per example."""
  hit = (orig[:, :n_img, None] == kept[:, None, :]).any(-1)
  return seg.replace(valid=seg.valid.at[:, :n_img].set(seg.valid[:, :n_img] & hit))


def _last_valid(valid):
  """int32[B] index of the last valid token."""
  s = valid.shape[1]
  return (s - 1 - jnp.argmax(valid[:, ::-1], axis=1)).astype(jnp.int32)


def _segment(ks, vs, seq: Seq, first_layer: int, cache_size: int) -> Segment:
  # The stacked k / v [L, B, S, K, h] batch-sharded like the positions: on Explicit mesh axes
  # the projections can come out typed differently (v replicated, k batch-sharded through
  # RoPE's positions, with a data axis of size 1), and the decoding loop's in-place writes of
  # batch-sharded entries need the buffers typed alike.
  k = match_batch(jnp.concatenate(ks, 0) if len(ks) > 1 else ks[0], seq.pos, axis=1)
  v = match_batch(jnp.concatenate(vs, 0) if len(vs) > 1 else vs[0], seq.pos, axis=1)
  pad = ((0, 0), (0, 0), (0, cache_size), (0, 0), (0, 0))
  return Segment(k=jnp.pad(k, pad), v=jnp.pad(v, pad),
                 pos=jnp.pad(seq.pos, ((0, 0), (0, cache_size))),
                 valid=jnp.pad(seq.valid, ((0, 0), (0, cache_size))),
                 length=seq.x.shape[1], first_layer=first_layer, n_img=seq.n_img)


def _text_rows(seq: Seq, hooks) -> Dict[Any, jax.Array]:
  """{rows function: bool[B, T]} for each distinct `hook.rows` (a method's `llm_rows`, e.g.
  SparseVLM's raters), called once on the decoder's input embeddings: image x float[B, N, E],
  text x float[B, T, E], the valid prompt rows bool[B, T] and the valid image tokens bool[B, N]."""
  n = seq.n_img
  text_ok = seq.valid[:, n:] & (seq.mask_ar[:, n:] == 0)
  out = {}
  for fn in dict.fromkeys(h.rows for h in hooks if h.rows is not None):
    out[fn] = fn(seq.x[:, :n], seq.x[:, n:], text_ok, seq.valid[:, :n])
  return out


def _prune(p, seq: Seq, img: Tokens, hook, prev, own_rows, n_initial: int, cfg: GemmaConfig,
           extra=None):
  """Applies one llm-stage hook to the image part of `seq`; returns (seq, img, attn rows,
  int32[B, N'] the image token each output slot comes from). The survivors keep their
  positions (the caller renumbers them for positions="reindex").

  Computes the signals the hook's method declared (`hook.sources`, the decoder signals named in
  `compress.registry.SIGNALS`) and hands each to the argument it feeds (`hook.signals`);
  own_rows: bool[B, T] the method's own text rows (`hook.rows`) or None. extra: signals
  computed before the decoder ({"vit_scores": float32[B, N], "image_count": int32[B]}), for the
  hooks that need them."""
  n = seq.n_img
  where = f"llm {hook.method} at layer {hook.layer}"
  budget, size_options = plan_lib.hook_size(hook, n, n_initial, where)
  # Splitting image from text and gathering the kept tokens slice the token axis: on Explicit
  # `seq` shards that axis is gathered here, once per pruning step, on purpose (the next
  # segment shards the shorter sequence again). Auto axes leave it to XLA.
  seq = jax.tree.map(lambda a: unshard_axis(a, 1), seq)
  q, k, layer = prev[:3]  # post-RoPE; prev[3:] the same before RoPE
  q, k = unshard_axis(q, 1), unshard_axis(k, 1)
  text_ok = seq.valid[:, n:] & (seq.mask_ar[:, n:] == 0)  # prompt rows score; suffix never
  if own_rows is not None:  # the method's own rows among them (SparseVLM's raters)
    text_ok = text_ok & own_rows
  x_img, x_txt = seq.x[:, :n], seq.x[:, n:]
  normed = lambda a: nl.rms_norm(a, p["final_norm"]["scale"], cfg.norm_eps)
  if hook.features == "final_norm":  # what the method compares (DART)
    x_img = normed(x_img)
  elif hook.features != "hidden":
    raise ValueError(f"llm {hook.method} at layer {hook.layer}: unknown features "
                     f"{hook.features!r}")
  want = set(hook.sources)  # the decoder signals the plan entry passes (plan.entry_signals)
  signals = {"text": x_txt, "text_mask": text_ok,
             "rng": jax.random.fold_in(jax.random.key(hook.seed), hook.layer), **(extra or {})}
  if "text_normed" in want:
    signals["text_normed"] = normed(x_txt)
  rows = None
  if {"attn", "scores", "attn_heads"} & want:
    qa, ka = q, k
    if hook.attn == "raw":  # before RoPE, every valid token a key, no prefix-LM structure
      qa, ka = unshard_axis(prev[3], 1), unshard_axis(prev[4], 1)
      mask = jnp.broadcast_to(seq.valid[:, None, :], (q.shape[0], q.shape[1] - n, q.shape[1]))
    else:
      mask = mask_rows(seq, n, cfg, is_local(cfg, layer))
    per_head = "attn_heads" in want
    rows = nl.attention_rows(qa[:, n:], ka, mask=mask, scale=scale(cfg),
                             cap=cfg.attn_logits_softcap, per_head=per_head)[..., :n]
    if per_head:  # [B, H, T, N]
      signals["attn_heads"] = rows
      rows = rows.mean(1)
    signals["attn"] = rows  # [B, T, N]
    last = _last_valid(text_ok)
    signals["scores"] = jnp.take_along_axis(rows, last[:, None, None], 1)[:, 0]
  if "rope_logits" in want:  # the RoPE term alone: all-ones queries and keys at these positions
    ones = lambda m: jnp.ones((q.shape[0], m, 1, cfg.head_dim), jnp.float32)
    rq = nl.rope(ones(seq.x.shape[1] - n), seq.pos[:, n:], cfg.rope_base)[:, :, 0]
    rk = nl.rope(ones(n), seq.pos[:, :n], cfg.rope_base)[:, :, 0]
    signals["rope_logits"] = jnp.einsum("bth,bnh->btn", rq, rk) / jnp.sqrt(
        jnp.float32(cfg.head_dim))
  flat = lambda a: batch_reshape(a, a.shape[:2] + (a.shape[2] * a.shape[3],))  # heads x dims
  # Keys of layer K-1 (or K), post-RoPE as the KV cache holds them: per KV head [B, *, K, h],
  # KV heads concatenated [B, *, K * h], or their mean [B, *, h]; image tokens, then text.
  for name, part in (("keys", k[:, :n]), ("text_keys", k[:, n:])):
    if name in want:
      signals[name] = part.mean(2)
    if name + "_concat" in want:
      signals[name + "_concat"] = flat(part)
  if "keys_heads" in want:
    signals["keys_heads"] = k[:, :n]
  missing = sorted(want - set(signals))
  if missing:
    raise ValueError(f"llm {hook.method} at layer {hook.layer}: the decoder has no signal(s) "
                     f"{missing}")
  kw = {arg: signals[src] for arg, src in zip(hook.signals, hook.sources)}
  kw.update(dict(hook.options), **size_options)
  before = img.replace(x=x_img)
  after = compress.apply(hook.method, before, budget, **kw)
  take = lambda a, idx: jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), 1)
  if compress.METHODS[hook.method].family == "merging":
    # A merge: the image hidden states are the method's merged ones, at their representatives'
    # positions.
    idx = representatives(before, after)
    x_new = after.x.astype(seq.x.dtype)
  else:
    idx = kept_indices(before, after)
    # A selected token keeps its hidden state; a token the method merged on the side (its size
    # grew: SparseVLM v1.5's recycled clusters) takes the method's features, averaged states.
    selected = after.size == take(before.size, idx)
    x_new = jnp.where(selected[..., None], take(seq.x[:, :n], idx),
                      after.x.astype(seq.x.dtype))
  new_valid = jnp.concatenate([after.mask, seq.valid[:, n:]], 1)
  seq = Seq(x=jnp.concatenate([x_new, seq.x[:, n:]], 1),
            pos=jnp.concatenate([take(seq.pos[:, :n], idx), seq.pos[:, n:]], 1),
            valid=new_valid,
            mask_ar=jnp.concatenate([take(seq.mask_ar[:, :n], idx), seq.mask_ar[:, n:]], 1),
            n_img=budget)
  return seq, after.replace(x=seq.x[:, :budget]), rows, idx


def representatives(before: Tokens, after: Tokens) -> jax.Array:
  """int32[B, K]: for each output token of a merge (or a selection), the input token whose
  position it took, its representative (matched on `pos`, unique among valid tokens). An output
  slot of padding points at input 0; its mask is False."""
  hit = (after.linear_pos()[:, :, None] == before.linear_pos()[:, None, :]) & before.mask[:, None]
  return jnp.argmax(hit, axis=-1).astype(jnp.int32)


def kept_indices(before: Tokens, after: Tokens) -> jax.Array:
  """int32[B, K]: for each output token, the input token that carried its origin patch: the
  token itself for a selection, the representative of a merge (whose `pos` it took).

  Read off `before.src` at each output token's origin. A padding slot points at input 0; its
  mask is False, so its contents never count.
  """
  idx = jnp.take_along_axis(before.src, after.linear_pos(), 1)
  return jnp.where(after.mask & (idx >= 0), idx, 0).astype(jnp.int32)


def _write(buf, new, slot):
  """`buf[:, slot] = new[:, 0]` for a cache buffer [B, C, ...] and one new entry [B, 1, ...].

  A dynamic_update_slice (in place under jit), except when C is sharded over an Explicit mesh
  axis, where the write is a select against a one-hot slot mask: every shard keeps its block
  and the one holding the slot takes the entry (a pass over the cache, as attention makes).
  """
  if sharded_axis(buf, 1) is not None:
    hit = (jnp.arange(buf.shape[1]) == slot).reshape((1, -1) + (1,) * (buf.ndim - 2))
    return jnp.where(hit, new, buf)
  zero = jnp.zeros((), jnp.int32)  # index operands must share one integer type (x64 too)
  return jax.lax.dynamic_update_slice(buf, new, (zero, slot) + (zero,) * (buf.ndim - 2))


def _write_layer(stack, new, layer, slot):
  """`stack[layer][:, slot] = new[:, 0]` for a segment's stacked cache [L, B, C, ...] and one
  new entry [B, 1, ...] (`_write` on one layer, the others untouched): one dynamic_update_slice,
  in place in the decoding loop."""
  if sharded_axis(stack, 2) is not None:  # C over an Explicit mesh axis: `_write`'s select
    return stack.at[layer].set(_write(stack[layer], new, slot))
  zero = jnp.zeros((), jnp.int32)
  return jax.lax.dynamic_update_slice(
      stack, new[None], (jnp.asarray(layer, jnp.int32), zero, slot) + (zero,) * (stack.ndim - 3))


def decode_step(p, token, cache: Cache, cfg: GemmaConfig) -> Tuple[jax.Array, Cache]:
  """One token `int32[B]` through every layer with the cache -> (logits float[B, V], cache).

  The token goes at position `cache.next_pos` (+ the segment's `pos_offset`) and into cache slot
  `length + step` of every segment (the same slot for the whole batch; per-example positions
  keep RoPE right for prompts of different lengths). A cache that is full clamps the slot:
  reserve `cache_size`.

  Decode-time KV policies (`cache.decode_hooks`, from the plan's decode stage): a policy acting
  from layer L steps once per token, on the decode signals it declares, computed at layer L - 1
  (the new token's attention row there: that layer runs on its own), or before the first layer
  when it reads no attention; its keep mask over the image entries becomes a table by token
  (`Segment.img_ids`, the position entering the decoder), and every layer >= L (in any
  segment) attends only the image entries it keeps. The cache stays whole: pruned entries are
  masked, never removed. Without policies the step is the plain segment-by-segment scan.
  """
  x = embed_text(p, token[:, None], cfg)
  hooks = cache.decode_hooks
  states = list(cache.decode_state)
  tables = [None] * len(hooks)  # per policy: bool[B, n_image] keep table by token
  reads_attn = [bool({"attn", "attn_heads"} & set(h.signals)) for h in hooks]
  for i, h in enumerate(hooks):  # policies that read no attention decide before layer 0
    if not reads_attn[i]:
      states[i], tables[i] = _policy_step(h, states[i], cache, None)
  segments = []
  for seg in cache.segments:
    pos = cache.next_pos if seg.pos_offset is None else cache.next_pos + seg.pos_offset
    slot = (seg.length + cache.step).astype(jnp.int32)
    seg_pos = _write(seg.pos, pos[:, None], slot)
    seg_valid = _write(seg.valid, jnp.ones_like(seg.valid[:, :1]), slot)
    glob = seg_valid[:, None, :]
    loc = glob
    if cfg.version == 2 and cfg.sliding_window:
      loc = glob & ((pos[:, None, None] - seg_pos[:, None, :]) < cfg.sliding_window)
    lo = seg.first_layer
    hi = lo + seg.k.shape[0]
    ks, vs = seg.k, seg.v
    # Layers whose attention row a policy reads run on their own; the rest in scans.
    cuts = sorted({h.layer - 1 for i, h in enumerate(hooks)
                   if reads_attn[i] and lo <= h.layer - 1 < hi})
    start = lo
    for stop in cuts + [hi]:
      masks = _policy_masks(hooks, tables, seg, cache.n_image)
      if stop > start:
        x, ks, vs = _decode_layers(p, x, ks, vs, start, stop, lo, slot, pos, glob, loc, masks,
                                   cfg)
      if stop == hi:
        break
      x, ks, vs, rows = _decode_layer_rows(p, x, ks, vs, stop, lo, slot, pos, glob, loc, masks,
                                           cfg)
      for i, h in enumerate(hooks):
        if reads_attn[i] and h.layer - 1 == stop:
          states[i], tables[i] = _policy_step(h, states[i], cache, rows)
      start = stop + 1
    segments.append(seg.replace(k=ks, v=vs, pos=seg_pos, valid=seg_valid))
  out = logits(p, x[:, 0], cfg)
  return out, cache.replace(segments=tuple(segments), step=cache.step + 1,
                            next_pos=cache.next_pos + 1, decode_state=tuple(states))


def _decode_mask(cfg: GemmaConfig, layer, glob, loc, masks):
  """bool[B, 1, C]: what the new token may attend at (traced) layer `layer`: the layer's mask,
  and for each active policy [(first layer, bool[B, 1, C])] its mask from that layer on."""
  m = _layer_mask(cfg, layer, glob, loc)
  for first, keep in masks:
    m = m & jnp.where(layer >= first, keep, True)
  return m


def _decode_layers(p, x, ks, vs, start, stop, lo, slot, pos, glob, loc, masks, cfg):
  """Layers [start, stop) of a segment starting at `lo` as one scan, writing the new entry."""

  # The segment's stacked cache rides in the loop's carry and each layer writes its one new
  # entry in place: as scanned inputs / outputs, every step copied the whole cache several
  # times (10 decoding steps of the bundled model, 64 examples at 282 slots: 178 -> 71 ms).
  def body(carry, args):
    x, ks, vs = carry
    pl, l, _ = args
    q, k, v = _project(pl, x, pos[:, None], cfg)
    ks = _write_layer(ks, k.astype(ks.dtype), l - lo, slot)
    vs = _write_layer(vs, v.astype(vs.dtype), l - lo, slot)
    o = nl.attention(q, ks[l - lo], vs[l - lo], mask=_decode_mask(cfg, l, glob, loc, masks),
                     scale=scale(cfg), cap=cfg.attn_logits_softcap)
    return (_finish(pl, x, o, cfg), ks, vs), None

  (x, ks, vs), _ = nl.scan_layers(body, (x, ks, vs), p["layers"], start, stop)
  return x, ks, vs


def _decode_layer_rows(p, x, ks, vs, layer, lo, slot, pos, glob, loc, masks, cfg):
  """Decoder layer `layer` alone, with the new token's attention probabilities per query head
  over the segment's cache: (x, ks, vs, float32[B, H, C])."""
  pl = nl.layer_params(p["layers"], layer)
  q, k, v = _project(pl, x, pos[:, None], cfg)
  ks = _write_layer(ks, k.astype(ks.dtype), layer - lo, slot)
  vs = _write_layer(vs, v.astype(vs.dtype), layer - lo, slot)
  mask = _decode_mask(cfg, layer, glob, loc, masks)
  o = nl.attention(q, ks[layer - lo], vs[layer - lo], mask=mask, scale=scale(cfg),
                   cap=cfg.attn_logits_softcap)
  rows = nl.attention_rows(q, ks[layer - lo], mask=mask, scale=scale(cfg),
                           cap=cfg.attn_logits_softcap, per_head=True)[:, :, 0]
  return _finish(pl, x, o, cfg), ks, vs, rows


def _segment_of(segments, layer: int) -> Segment:
  """The cache segment holding decoder layer `layer`."""
  for seg in segments:
    if seg.first_layer <= layer < seg.first_layer + seg.k.shape[0]:
      return seg
  raise ValueError(f"no cache segment holds decoder layer {layer}")


def _position_table(ids, keep, n_image: int):
  """bool[B, n_image]: True for the tokens of the entries `keep: bool[B, n]` marks (`ids:
  int32[B, n]`, each entry's position entering the decoder, in 0 .. n_image - 1)."""
  idx = jnp.where(keep, ids, n_image)  # out of range: dropped
  return jax.vmap(lambda i: jnp.zeros((n_image,), bool).at[i].set(True, mode="drop"))(idx)


def _read_table(table, seg: Segment):
  """bool[B, n_img] the table's value at each image entry of `seg` (by `seg.img_ids`)."""
  return jnp.take_along_axis(table, jnp.clip(seg.img_ids, 0, table.shape[1] - 1), 1)


def _policy_masks(hooks, tables, seg: Segment, n_image: int):
  """[(first layer, bool[B, 1, C])] of the policies that have decided: for `seg`'s cache, each
  one's kept image entries and every other entry."""
  out = []
  c = seg.k.shape[2]
  for h, table in zip(hooks, tables):
    if table is None:
      continue
    img = _read_table(table, seg)
    rest = jnp.ones((img.shape[0], c - seg.n_img), bool)
    out.append((h.layer, jnp.concatenate([img, rest], 1)[:, None, :]))
  return out


def _policy_step(hook, state, cache: Cache, rows):
  """One decoding step of a decode-time policy: (state, keep table bool[B, n_image]).

  rows: float32[B, H, C] the new token's attention at layer hook.layer - 1 (None for a policy
  reading no attention)."""
  seg = _segment_of(cache.segments, hook.signal_layer)
  n = seg.n_img
  valid = seg.valid[:, :n]
  kw = dict(hook.options)
  if "attn" in hook.signals:
    kw["attn"] = rows[..., :n].mean(1)
  if "attn_heads" in hook.signals:
    kw["attn_heads"] = rows[..., :n]
  if "kept" in hook.signals:  # the entries that reach the last layer's cache
    last = cache.segments[-1]
    final = _position_table(last.img_ids, last.valid[:, :last.n_img], cache.n_image)
    kw["kept"] = _read_table(final, seg) & valid
  state, keep = compress.apply_decode(hook.method, state, valid=valid, **kw)
  return state, _position_table(seg.img_ids, keep & valid, cache.n_image)
