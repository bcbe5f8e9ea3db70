"""TokenLearner v1.1 (Ryoo et al., arXiv 2106.11297): learned spatial attention maps to K tokens.

Axis legend: B batch, F frames, N tokens in, K tokens out (the budget), D features.

v1.1 (scenic's `TokenLearnerModuleV11`): LayerNorm -> MLP (Dense(bottleneck) -> GELU ->
Dense(K), Xavier-uniform kernels, biases ~ N(0, 1e-6)) gives one logit per (token, slot); a
softmax over the tokens turns each slot's logits into a spatial map, and slot k is the map's
weighted sum of the *un-normalised* input. Scenic applies it to each frame of a video (K per
frame); here `per_frame` does so for raw clip grids (budget split evenly over the frames).
Dropout (scenic's default rate is 0) is left out: the loop trains deterministically.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tcjax.nn import learned
from tcjax.parallel.mesh import batch_reshape
from tcjax.tokens import Tokens


@learned.register("tokenlearner", family="pooling",
                  paper="TokenLearner v1.1, arXiv 2106.11297 (scenic token_learner)")
class TokenLearner(nn.Module):
  """Learned spatial maps, one per output token.

  Attributes:
    budget: K, output tokens (per clip; split over the frames when `per_frame`).
    bottleneck_dim: hidden width of the map MLP (scenic: 64).
    per_frame: on a raw clip grid, K / F maps per frame over that frame's tokens (scenic's
      video placement); False: K maps over all the clip's tokens at once.
  """

  budget: int
  bottleneck_dim: int = 64
  per_frame: bool = True

  @nn.compact
  def __call__(self, tokens: Tokens) -> Tokens:
    """tokens: N tokens float[B, N, D] -> K tokens float[B, K, D] (`learned.resampled`)."""
    tokens = learned.check_input(tokens, self.budget, "tokenlearner")
    learned.check_positive("tokenlearner", bottleneck_dim=self.bottleneck_dim)
    b, n, d = tokens.x.shape
    frames = tokens.grid[0]
    split = self.per_frame and frames > 1
    if split and (not tokens.is_raw_grid or self.budget % frames):
      raise ValueError(f"tokenlearner: per_frame needs the raw clip grid {tokens.grid} and a "
                       f"budget divisible by its {frames} frames; got N={n}, budget "
                       f"{self.budget} (or pass per_frame=False)")
    f = frames if split else 1
    k = self.budget // f
    h = nn.LayerNorm(epsilon=1e-6, name="norm")(tokens.x)
    dense = lambda out, name: nn.Dense(
        out, kernel_init=nn.initializers.xavier_uniform(),
        bias_init=nn.initializers.normal(stddev=1e-6), name=name)
    logits = dense(k, "map_out")(nn.gelu(dense(self.bottleneck_dim, "map_hidden")(h)))
    # [B, N, k] -> per frame [B, F, k, n]: each slot's softmax runs over its frame's tokens.
    logits = jnp.swapaxes(batch_reshape(logits, (b, f, n // f, k)), -1, -2)
    valid = batch_reshape(tokens.mask, (b, f, 1, n // f))
    maps = learned.masked_softmax(logits, valid)
    xf = batch_reshape(tokens.x, (b, f, n // f, d))
    x = jnp.einsum("bfkn,bfnd->bfkd", maps, xf.astype(maps.dtype))
    x = batch_reshape(x, (b, f * k, d))
    # Slot (frame g, k) weights only frame g's tokens: a block-diagonal [B, F*k, N] map.
    eye = jnp.eye(f, dtype=maps.dtype)
    weights = jnp.einsum("bfkn,fg->bfkgn", maps, eye)
    weights = batch_reshape(weights, (b, f * k, n))
    return learned.resampled(tokens, x, weights)
