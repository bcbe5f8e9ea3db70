"""NumPy float64 reference forward of PaliGemma 1/2 in big_vision conventions (test oracle).

Written independently of tcjax.nn from the published architecture: SigLIP (pre-LN ViT, tanh-GELU),
linear projector, Gemma / Gemma 2 with RMSNorm (1 + scale), RoPE on the two halves of the head
dimension, GQA, GeGLU, prefix-LM mask, soft-caps, and the sliding window of even Gemma 2 layers
as transformers applies it (causal window, prefix block always fully visible).
"""

import numpy as np


def _gelu(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def _ln(x, s, b, eps):
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * s + b


def _rms(x, s, eps):
  return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1 + s)


def _softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def _rope(x, pos, base):  # x [B, T, H, h]; rotate the two halves of the head dim
  h = x.shape[-1] // 2
  freq = base ** (-np.arange(h) / h)
  ang = pos[:, :, None, None] * freq
  a, b = x[..., :h], x[..., h:]
  return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], -1)


def image_embed(p, cfg, image):
  """NumPy float64 SigLIP + projector: image float[B, H, W, 3] -> zimg [B, N, E]."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  v = cfg.img
  B, P = image.shape[0], v.patch_size
  G = v.image_size // P
  patches = image.reshape(B, G, P, G, P, 3).transpose(0, 1, 3, 2, 4, 5).reshape(B, G * G, -1)
  x = patches @ p["img/embedding/kernel"].reshape(-1, v.width) + p["img/embedding/bias"]
  x = x + p["img/pos_embedding"]
  blk = "img/Transformer/encoderblock/"
  mha = blk + "MultiHeadDotProductAttention_0/"
  for l in range(v.depth):
    y = _ln(x, p[blk + "LayerNorm_0/scale"][l], p[blk + "LayerNorm_0/bias"][l], v.norm_eps)
    q, k, vv = (np.einsum("bnd,dhk->bnhk", y, p[mha + n + "/kernel"][l]) + p[mha + n + "/bias"][l]
                for n in ("query", "key", "value"))
    a = _softmax(np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1]))
    o = np.einsum("bhqs,bshk->bqhk", a, vv)
    x = x + np.einsum("bqhk,hkd->bqd", o, p[mha + "out/kernel"][l]) + p[mha + "out/bias"][l]
    y = _ln(x, p[blk + "LayerNorm_1/scale"][l], p[blk + "LayerNorm_1/bias"][l], v.norm_eps)
    h = _gelu(y @ p[blk + "MlpBlock_0/Dense_0/kernel"][l] + p[blk + "MlpBlock_0/Dense_0/bias"][l])
    x = x + h @ p[blk + "MlpBlock_0/Dense_1/kernel"][l] + p[blk + "MlpBlock_0/Dense_1/bias"][l]
  x = _ln(x, p["img/Transformer/encoder_norm/scale"], p["img/Transformer/encoder_norm/bias"],
          v.norm_eps)
  return x @ p["img/head/kernel"] + p["img/head/bias"]


def decoder(p, cfg, x, ar, pos=None, prune=None, attn_layers=(), at_layer=None, hide=None,
            hidden=None, override=None, states=None):
  """NumPy float64 Gemma over embeddings x [B, S, E] with mask_ar `ar` [B, S] (image tokens 0).

  pos: RoPE positions [B, S] (default 0..S-1). prune: {layer K: keep bool[B, S_K]}, the tokens
  entering layer K that stay (the same count in every example); pruned tokens keep their
  positions. attn_layers: layers whose full attention probabilities [B, H, S, S] to return
  (also, under ("raw", layer), their queries and keys before RoPE: q [B, S, H, h], k [B, S, K, h]).
  at_layer: {layer K: fn(x, pos, ar, attentions so far) -> (x, pos, ar)}, applied to the tokens
  entering layer K after `prune` (e.g. a merge). hide: (positions [B, P], start): query rows at
  RoPE position >= start never attend to keys at those positions, in any layer (tokens dropped
  from every layer's KV cache after prefill); or a list of rules (positions [B, P], start,
  first_layer, stop): rows at positions in [start, stop) hide those keys in layers >=
  first_layer (decode-time KV policies: -1 pads positions).
  hidden: a dict to fill with {layer: the hidden states [B, S_K, E] entering it}, or None.
  override: {layer K: x [B, S_K, E]}: the hidden states entering layer K (after its pruning)
  replaced, e.g. by merged tokens. states: a dict that receives "hidden", the final tokens'
  last-layer states after the final norm [B, S', E].
  Returns (logits of every final token [B, S', V], {layer: attention}, final positions).
  """
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  g = cfg.llm
  B, S = ar.shape
  pos = np.broadcast_to(np.arange(S, dtype=np.float64), (B, S)) if pos is None else pos
  pos = np.asarray(pos, np.float64)
  ar = np.asarray(ar)
  L = "llm/layers/"
  H, K, hd = g.num_heads, g.num_kv_heads, g.head_dim
  attns = {}
  for l in range(g.depth):
    if prune and l in prune:
      keep = np.asarray(prune[l])
      sel = [np.nonzero(keep[b])[0] for b in range(B)]
      x = np.stack([x[b, sel[b]] for b in range(B)])
      pos = np.stack([pos[b, sel[b]] for b in range(B)])
      ar = np.stack([ar[b, sel[b]] for b in range(B)])
    if at_layer and l in at_layer:
      x, pos, ar = at_layer[l](x, pos, ar, attns)
    if override and l in override:
      x = np.asarray(override[l], np.float64)
    if hidden is not None:
      hidden[l] = x
    cum = np.cumsum(ar, 1)
    allowed = cum[:, None, :] <= cum[:, :, None]  # [B, q, k] prefix-LM (big_vision make_attn_mask)
    prefix = ar == 0
    both_prefix = prefix[:, :, None] & prefix[:, None, :]
    y = _rms(x, p[L + "pre_attention_norm/scale"][l], g.norm_eps)
    if K == H:
      w = p[L + "attn/qkv_einsum/w"][l]
      wq, wk, wv = w[0], w[1], w[2]
    else:
      wq, wk, wv = p[L + "attn/q_einsum/w"][l], p[L + "attn/kv_einsum/w"][l][0], p[L + "attn/kv_einsum/w"][l][1]
    q0, k0 = np.einsum("btd,hdk->bthk", y, wq), np.einsum("btd,hdk->bthk", y, wk)
    if l in attn_layers:
      attns[("raw", l)] = (q0, k0)
    q = _rope(q0, pos, g.rope_base)
    k = _rope(k0, pos, g.rope_base)
    vv = np.einsum("btd,hdk->bthk", y, wv)
    q = q * (g.query_pre_attn_scalar or hd) ** -0.5
    k = np.repeat(k, H // K, axis=2)
    vv = np.repeat(vv, H // K, axis=2)
    logit = np.einsum("bqhk,bshk->bhqs", q, k)
    if g.attn_logits_softcap:
      logit = np.tanh(logit / g.attn_logits_softcap) * g.attn_logits_softcap
    m = allowed
    if g.version == 2 and g.sliding_window and l % 2 == 0:
      near = (pos[:, :, None] - pos[:, None, :]) < g.sliding_window
      m = (m & near) | both_prefix
    for rule in ([] if hide is None else hide if isinstance(hide, list) else [hide]):
      hidden_pos, start = rule[:2]
      first = rule[2] if len(rule) > 2 else 0
      stop = rule[3] if len(rule) > 3 else np.inf
      if l < first:
        continue
      hidden_keys = (pos[:, :, None] == np.asarray(hidden_pos)[:, None, :]).any(-1)  # [B, keys]
      rows = (pos >= start) & (pos < stop)  # [B, q]
      m = m & ~(rows[:, :, None] & hidden_keys[:, None, :])
    logit = np.where(m[:, None], logit, -1e30)
    a = _softmax(logit)
    if l in attn_layers:
      attns[l] = a
    o = np.einsum("bhqs,bshk->bqhk", a, vv)
    o = np.einsum("bqhk,hkd->bqd", o, p[L + "attn/attn_vec_einsum/w"][l])
    if g.version == 2:
      o = _rms(o, p[L + "post_attention_norm/scale"][l], g.norm_eps)
    x = x + o
    y = _rms(x, p[L + "pre_ffw_norm/scale"][l], g.norm_eps)
    gw = p[L + "mlp/gating_einsum"][l]
    h = (_gelu(y @ gw[0]) * (y @ gw[1])) @ p[L + "mlp/linear"][l]
    if g.version == 2:
      h = _rms(h, p[L + "post_ffw_norm/scale"][l], g.norm_eps)
    x = x + h
  x = _rms(x, p["llm/final_norm/scale"], g.norm_eps)
  if states is not None:
    states["hidden"] = x
  logits = x @ p["llm/embedder/input_embedding"].T
  if g.final_logits_softcap:
    logits = np.tanh(logits / g.final_logits_softcap) * g.final_logits_softcap
  return logits, attns, pos


def embed_text(p, cfg, text):
  emb = np.asarray(p["llm/embedder/input_embedding"], np.float64)
  return emb[text] * np.sqrt(cfg.llm.width)


def paligemma_logits(p, cfg, image, text, mask_ar):
  """NumPy float64 forward of big_vision-named params: text logits [B, T, V]."""
  zimg = image_embed(p, cfg, image)
  x = np.concatenate([zimg, embed_text(p, cfg, text)], 1)
  N = zimg.shape[1]
  ar = np.concatenate([np.zeros((text.shape[0], N)), mask_ar], 1)
  logits, _, _ = decoder(p, cfg, x, ar)
  return logits[:, N:]


def paligemma_features(p, cfg, image, text, mask_ar):
  """NumPy float64: (text logits [B, T, V], text states after the final norm [B, T, E],
  projected image tokens [B, N, E])."""
  zimg = image_embed(p, cfg, image)
  x = np.concatenate([zimg, embed_text(p, cfg, text)], 1)
  N = zimg.shape[1]
  ar = np.concatenate([np.zeros((text.shape[0], N)), mask_ar], 1)
  states = {}
  logits, _, _ = decoder(p, cfg, x, ar, states=states)
  return logits[:, N:], states["hidden"][:, N:], zimg
