"""Perceiver resampler (Flamingo, Alayrac et al., arXiv 2204.14198): K learned latents
cross-attend to the visual tokens.

Axis legend: B batch, N visual tokens, K latents (the budget), S = N + K keys, H heads, h head
dim, D features.

As open_flamingo's `PerceiverResampler`: latents ~ N(0, 1) shared over the batch; each layer
normalises the media and the latents separately, queries come from the latents, keys and values
from [media ; latents], multi-head attention without biases, a residual, then a LayerNorm ->
Linear(ff_mult * D) -> GELU -> Linear feed-forward with a residual; a final LayerNorm. The media
are every token of the input (a clip's frames are one set, as Flamingo flattens them); padding
tokens are masked out of the keys. Defaults are open_flamingo's (depth 6, 8 heads of 64).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from tcjax.nn import learned
from tcjax.nn.layers import compute_dtype
from tcjax.tokens import Tokens


class PerceiverBlock(nn.Module):
  """One resampler layer: latents float[B, K, D] attend to media float[B, N, D]."""

  heads: int
  head_dim: int
  ff_mult: int

  @nn.compact
  def __call__(self, media, latents, media_mask):
    """-> (latents float[B, K, D], attention float32[B, H, K, N] on the media; float64
    for float64 inputs)."""
    d = latents.shape[-1]
    hd = (self.heads, self.head_dim)
    m = nn.LayerNorm(epsilon=1e-5, name="norm_media")(media)
    q_in = nn.LayerNorm(epsilon=1e-5, name="norm_latents")(latents)
    kv_in = jnp.concatenate([m, q_in], axis=1)
    q = nn.DenseGeneral(hd, use_bias=False, name="query")(q_in)  # [B, K, H, h]
    k = nn.DenseGeneral(hd, use_bias=False, name="key")(kv_in)   # [B, S, H, h]
    v = nn.DenseGeneral(hd, use_bias=False, name="value")(kv_in)
    logits = jnp.einsum("bkhd,bshd->bhks", q, k) * self.head_dim ** -0.5
    kmask = jnp.concatenate([media_mask, learned.per_example(jnp.ones(latents.shape[1], bool),
                                                             media_mask)], axis=1)
    attn = learned.masked_softmax(logits, kmask[:, None, None, :])
    o = jnp.einsum("bhks,bshd->bkhd", attn.astype(v.dtype), v)
    latents = latents + nn.DenseGeneral(d, axis=(-2, -1), use_bias=False, name="out")(o)
    y = nn.LayerNorm(epsilon=1e-5, name="norm_ff")(latents)
    y = nn.Dense(self.ff_mult * d, use_bias=False, name="ff_in")(y)
    y = nn.Dense(d, use_bias=False, name="ff_out")(nn.gelu(y, approximate=False))
    return latents + y, attn[..., :media.shape[1]]


@learned.register("perceiver", family="cross_modal",
                  paper="Perceiver resampler, Flamingo arXiv 2204.14198 (open_flamingo)")
class PerceiverResampler(nn.Module):
  """K learned latents -> K tokens.

  Attributes:
    budget: K, the number of latents (output tokens).
    depth, heads, head_dim, ff_mult: as open_flamingo (6, 8, 64, 4).
  """

  budget: int
  depth: int = 6
  heads: int = 8
  head_dim: int = 64
  ff_mult: int = 4

  @nn.compact
  def __call__(self, tokens: Tokens) -> Tokens:
    """tokens: N tokens float[B, N, D] -> K tokens float[B, K, D] (`learned.resampled`, the
    weights being the last layer's head-mean attention on the input tokens)."""
    tokens = learned.check_input(tokens, self.budget, "perceiver")
    learned.check_positive("perceiver", depth=self.depth, heads=self.heads,
                           head_dim=self.head_dim, ff_mult=self.ff_mult)
    d = tokens.x.shape[-1]
    lat = self.param("latents", nn.initializers.normal(stddev=1.0), (self.budget, d))
    x = tokens.x.astype(compute_dtype(tokens.x))
    latents = learned.per_example(lat, x)  # batch-sharded like the media (Explicit axes)
    attn = None
    for i in range(self.depth):
      latents, attn = PerceiverBlock(self.heads, self.head_dim, self.ff_mult,
                                     name=f"block_{i}")(x, latents, tokens.mask)
    out = nn.LayerNorm(epsilon=1e-5, name="norm_out")(latents)
    return learned.resampled(tokens, out, attn.mean(1))
