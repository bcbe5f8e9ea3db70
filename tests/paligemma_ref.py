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


def paligemma_logits(p, cfg, image, text, mask_ar):
  """NumPy float64 forward of big_vision-named params: text logits [B, T, V]."""
  p = {k: np.asarray(v, np.float64) for k, v in p.items()}
  v, g = cfg.img, cfg.llm
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
  zimg = x @ p["img/head/kernel"] + p["img/head/bias"]

  emb = p["llm/embedder/input_embedding"]
  ztxt = emb[text] * np.sqrt(g.width)
  x = np.concatenate([zimg, ztxt], 1)
  N, S = zimg.shape[1], x.shape[1]
  ar = np.concatenate([np.zeros((B, N)), mask_ar], 1)
  cum = np.cumsum(ar, 1)
  allowed = cum[:, None, :] <= cum[:, :, None]  # [B, q, k] prefix-LM (big_vision make_attn_mask)
  i, j = np.arange(S)[:, None], np.arange(S)[None, :]
  prefix = ar == 0
  both_prefix = prefix[:, :, None] & prefix[:, None, :]
  pos = np.broadcast_to(np.arange(S, dtype=np.float64), (B, S))
  L = "llm/layers/"
  H, K, hd = g.num_heads, g.num_kv_heads, g.head_dim
  for l in range(g.depth):
    y = _rms(x, p[L + "pre_attention_norm/scale"][l], g.norm_eps)
    if K == H:
      w = p[L + "attn/qkv_einsum/w"][l]
      wq, wk, wv = w[0], w[1], w[2]
    else:
      wq, wk, wv = p[L + "attn/q_einsum/w"][l], p[L + "attn/kv_einsum/w"][l][0], p[L + "attn/kv_einsum/w"][l][1]
    q = _rope(np.einsum("btd,hdk->bthk", y, wq), pos, g.rope_base)
    k = _rope(np.einsum("btd,hdk->bthk", y, wk), pos, g.rope_base)
    vv = np.einsum("btd,hdk->bthk", y, wv)
    q = q * (g.query_pre_attn_scalar or hd) ** -0.5
    k = np.repeat(k, H // K, axis=2)
    vv = np.repeat(vv, H // K, axis=2)
    logit = np.einsum("bqhk,bshk->bhqs", q, k)
    if g.attn_logits_softcap:
      logit = np.tanh(logit / g.attn_logits_softcap) * g.attn_logits_softcap
    m = allowed
    if g.version == 2 and g.sliding_window and l % 2 == 0:
      m = (m & ((i - j) < g.sliding_window)) | both_prefix
    logit = np.where(m[:, None], logit, -1e30)
    o = np.einsum("bhqs,bshk->bqhk", _softmax(logit), vv)
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
  logits = x[:, N:] @ emb.T
  if g.final_logits_softcap:
    logits = np.tanh(logits / g.final_logits_softcap) * g.final_logits_softcap
  return logits
