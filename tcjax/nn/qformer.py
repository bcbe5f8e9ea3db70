"""A Q-Former resampler (BLIP-2, arXiv 2301.12597) with optional instruction conditioning
(InstructBLIP, arXiv 2305.06500): K learned queries, optionally beside the prompt, read the
visual tokens through cross-attention.

Axis legend: B batch, N visual tokens, K queries (the budget), T prompt tokens, S = K + T,
H heads, h head dim, W Q-Former width, D token width, E prompt-embedding width.

The structure follows LAVIS's `Qformer.py` / `blip2_vicuna_instruct.py` (read, not copied):
  1. Queries ~ N(0, 0.02), no position embedding. With text, the prompt's embeddings (here the
     decoder's own input embeddings, through a learned Linear(E -> W), instead of a second
     tokenizer) get learned absolute positions; one LayerNorm over [queries ; prompt].
  2. Each BERT layer (post-LN, biases): self-attention shared by queries and prompt,
     bidirectional, prompt padding masked; every `cross_every`-th layer (0, 2, 4, ...) the
     queries alone cross-attend to the visual tokens (LayerNorm'd, `ln_vision`); separate
     feed-forward networks for the query and the prompt rows.
  3. The K query rows -> Linear(W -> D): the output tokens.
Official sizes are BERT-base (12 layers, 768 wide, 12 heads, 3072 MLP, 32 queries, prompts cut
at 128); those are the defaults. Dropout is left out (deterministic training).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from tcjax.nn import learned
from tcjax.nn.layers import compute_dtype
from tcjax.tokens import Tokens

_LN_EPS = 1e-12  # BERT's LayerNorm epsilon


class BertAttention(nn.Module):
  """Multi-head attention + output Dense + residual + LayerNorm (BERT's post-LN block)."""

  heads: int

  @nn.compact
  def __call__(self, x, kv, kv_mask):
    """x float[B, Q, W] attends to kv float[B, S, Dkv] (kv_mask bool[B, S]) -> (float[B, Q, W],
    attention float32[B, H, Q, S]; float64 for float64 inputs)."""
    w = x.shape[-1]
    hd = (self.heads, w // self.heads)
    init = nn.initializers.normal(stddev=0.02)  # BERT's initializer range
    q = nn.DenseGeneral(hd, kernel_init=init, name="query")(x)
    k = nn.DenseGeneral(hd, kernel_init=init, name="key")(kv)
    v = nn.DenseGeneral(hd, kernel_init=init, name="value")(kv)
    logits = jnp.einsum("bqhd,bshd->bhqs", q, k) * hd[1] ** -0.5
    attn = learned.masked_softmax(logits, kv_mask[:, None, None, :])
    o = jnp.einsum("bhqs,bshd->bqhd", attn.astype(v.dtype), v)
    o = nn.DenseGeneral(w, axis=(-2, -1), kernel_init=init, name="out")(o)
    return nn.LayerNorm(epsilon=_LN_EPS, name="norm")(x + o), attn


class BertFeedForward(nn.Module):
  """Dense(mlp) -> GELU -> Dense(W) + residual + LayerNorm."""

  mlp_dim: int

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.normal(stddev=0.02)
    y = nn.Dense(self.mlp_dim, kernel_init=init, name="dense_in")(x)
    y = nn.Dense(x.shape[-1], kernel_init=init, name="dense_out")(nn.gelu(y, approximate=False))
    return nn.LayerNorm(epsilon=_LN_EPS, name="norm")(x + y)


def _text_signals(opts, stage):
  del stage
  return ("text", "text_mask") if opts.get("use_text") else ()


@learned.register("qformer", family="cross_modal",
                  paper="Q-Former, BLIP-2 arXiv 2301.12597; instruction-aware, InstructBLIP "
                        "arXiv 2305.06500 (LAVIS)",
                  signals=_text_signals,
                  stage_defaults={"post_vit": {"use_text": False},
                                  "post_proj": {"use_text": True}})
class QFormer(nn.Module):
  """K learned queries (optionally seeing the prompt) -> K tokens.

  Attributes:
    budget: K, the number of queries (InstructBLIP: 32).
    width, depth, heads, mlp_dim: the Q-Former's BERT sizes (768, 12, 12, 3072).
    cross_every: the queries cross-attend to the image in layers 0, cross_every, ... (2).
    use_text: the queries see the prompt (InstructBLIP); needs the `text` / `text_mask`
      signals, so only at post_proj, where it is the default (off at post_vit).
    max_text: prompt tokens with a learned position (128); a longer prompt is refused.
  """

  budget: int
  width: int = 768
  depth: int = 12
  heads: int = 12
  mlp_dim: int = 3072
  cross_every: int = 2
  use_text: Optional[bool] = None
  max_text: int = 128

  @nn.compact
  def __call__(self, tokens: Tokens, text=None, text_mask=None) -> Tokens:
    """tokens: N tokens float[B, N, D]; text: float[B, T, E] prompt embeddings with text_mask
    bool[B, T] (False: padding or not prompt), when use_text -> K tokens float[B, K, D]
    (`learned.resampled`, the weights being the last cross-attention's head mean)."""
    tokens = learned.check_input(tokens, self.budget, "qformer")
    learned.check_positive("qformer", width=self.width, depth=self.depth, heads=self.heads,
                           mlp_dim=self.mlp_dim, cross_every=self.cross_every,
                           max_text=self.max_text)
    if self.width % self.heads:
      raise ValueError(f"qformer: width {self.width} is not divisible by heads {self.heads}")
    if self.use_text is None:
      raise ValueError("qformer: use_text must be True or False (a plan entry sets it from "
                       "its stage)")
    d = tokens.x.shape[-1]
    k = self.budget
    init = nn.initializers.normal(stddev=0.02)
    # Batch-sharded like the tokens (Explicit axes: concatenated with the prompt's rows).
    h = learned.per_example(self.param("queries", init, (k, self.width)), tokens.x)
    row_mask = learned.per_example(jnp.ones(k, bool), tokens.x)
    if self.use_text:
      if text is None:
        raise ValueError("qformer: use_text=True needs signal `text` (the prompt's embeddings:"
                         " call the model with text, at post_proj)")
      text, text_mask = learned.check_text(tokens, text, text_mask, "qformer")
      t = text.shape[1]
      if t > self.max_text:
        raise ValueError(f"qformer: the prompt has {t} tokens, more than max_text="
                         f"{self.max_text}")
      pos = self.param("text_pos", init, (self.max_text, self.width))[:t]
      th = nn.Dense(self.width, kernel_init=init, name="text_proj")(
          text.astype(compute_dtype(text)))
      h = jnp.concatenate([h, th + pos], axis=1)
      row_mask = jnp.concatenate([row_mask, text_mask], axis=1)
    h = nn.LayerNorm(epsilon=_LN_EPS, name="embed_norm")(h)
    image = nn.LayerNorm(epsilon=1e-6, name="ln_vision")(
        tokens.x.astype(compute_dtype(tokens.x)))
    weights = None
    for i in range(self.depth):
      h, _ = BertAttention(self.heads, name=f"layer_{i}_self")(h, h, row_mask)
      hq, ht = h[:, :k], h[:, k:]
      if i % self.cross_every == 0:
        hq, attn = BertAttention(self.heads, name=f"layer_{i}_cross")(hq, image, tokens.mask)
        weights = attn.mean(1)
      hq = BertFeedForward(self.mlp_dim, name=f"layer_{i}_ffn_query")(hq)
      if self.use_text and i < self.depth - 1:  # the last layer's text rows feed nothing
        ht = BertFeedForward(self.mlp_dim, name=f"layer_{i}_ffn_text")(ht)
      h = jnp.concatenate([hq, ht], axis=1)
    out = nn.Dense(d, name="out_proj")(h[:, :k])
    return learned.resampled(tokens, out, weights)
