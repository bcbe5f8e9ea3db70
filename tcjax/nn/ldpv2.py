"""LDPv2, MobileVLM V2's lightweight downsample projector (Chu et al., arXiv 2402.03766).

Axis legend: B batch, F frames, N = F*h*w tokens in, K = F*h'*w' tokens out, D features.

MobileVLM V2 (`LDPNetV2Projector`): a pointwise MLP (Linear -> GELU -> Linear), average pooling
of the square grid to 12 x 12, and a positional-encoding generator (PEG: a 3 x 3 depthwise
convolution with bias, added back as a residual), flattened in raster order. Here the output
grid follows the budget instead of a fixed 12 x 12: k x k windows of each frame with
K = F * ceil(h/k) * ceil(w/k) (k = 2 is MobileVLM's 576 -> 144, PaliGemma's 256 -> 64), pooled
size-weighted in ceil mode like `tcjax.compress.pool` (same windows, same bookkeeping: each token
takes the position of its window's top-left patch, `size` = patches covered). Uneven adaptive
windows are avoided on purpose. The MLP keeps the token width (it sits before or after the
model's own linear projector rather than replacing it).
"""

from __future__ import annotations

from typing import Optional

import flax.linen as nn

from tcjax.compress import primitives as P
from tcjax.compress.pool import pool_window_for_budget
from tcjax.nn import learned
from tcjax.parallel.mesh import batch_reshape, constrain
from tcjax.tokens import Tokens


@learned.register("ldpv2", family="pooling",
                  paper="LDPv2, MobileVLM V2 arXiv 2402.03766 (Meituan-AutoML/MobileVLM)")
class LDPv2(nn.Module):
  """Pointwise MLP -> k x k average pooling -> PEG (3 x 3 depthwise conv + residual).

  Attributes:
    budget: F * ceil(h/k) * ceil(w/k) for some window k (the error lists the valid values).
    mlp_dim: hidden width of the pointwise MLP (None: the token width D, as MobileVLM's
      Linear(C -> D) -> GELU -> Linear(D -> D) with D the output width).
  """

  budget: int
  mlp_dim: Optional[int] = None

  @nn.compact
  def __call__(self, tokens: Tokens) -> Tokens:
    """tokens: the raw grid float[B, F*h*w, D] -> K tokens float[B, K, D] on a k x k coarser
    grid, in raster order per frame."""
    tokens = learned.check_input(tokens, self.budget, "ldpv2")
    if self.mlp_dim is not None:
      learned.check_positive("ldpv2", mlp_dim=self.mlp_dim)
    f, h, w = P.check_grid_tokens(tokens, "ldpv2")
    k = pool_window_for_budget(tokens.grid, self.budget, "ldpv2")
    b, _, d = tokens.x.shape
    x = nn.Dense(self.mlp_dim or d, name="mlp_in")(tokens.x)
    x = nn.Dense(d, name="mlp_out")(nn.gelu(x, approximate=False))
    pooled = P.pool_grid(tokens.replace(x=x.astype(tokens.x.dtype)), k)
    ho, wo = P.pooled_grid(h, w, k)
    # Each frame's grid whole on one device (batch over `data`): on Auto axes XLA may otherwise
    # split the depthwise convolution as the decoder's shardings propagate back, and did so
    # wrongly (jax 0.10: two 2 x 2 grids on (data 2, seq 4), weights narrower than the
    # activations, e.g. bf16 in a float32 run: features off by O(1), the embedding alone right).
    grid = constrain(batch_reshape(pooled.x, (b * f, ho, wo, d)), "data")
    # PEG: a depthwise 3 x 3 convolution (zero padding) gives each token its neighbourhood,
    # i.e. a position code generated from the content; residual as in MobileVLM V2.
    peg = nn.Conv(d, (3, 3), padding="SAME", feature_group_count=d, name="peg")(grid)
    x = batch_reshape(grid + peg, (b, self.budget, d))
    return pooled.replace(x=x.astype(tokens.x.dtype))
