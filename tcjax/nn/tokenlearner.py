"""TokenLearner v1.1 (Ryoo et al., arXiv 2106.11297): learned spatial attention maps to K tokens.

Axis legend: B batch, F frames, N tokens in, K tokens out (the budget), D features.

v1.1 (scenic's `TokenLearnerModuleV11`): LayerNorm -> MLP (Dense(bottleneck) -> GELU ->
Dense(K), Xavier-uniform kernels, biases ~ N(0, 1e-6)) gives one logit per (token, slot); a
softmax over the tokens turns each slot's logits into a spatial map, and slot k is the map's
weighted sum of the *un-normalised* input. Scenic applies it to each frame of a video (K per
frame); here `per_frame` does so for raw clip grids (budget split evenly over the frames).
Dropout (scenic's default rate is 0) is left out: the loop trains deterministically.

Per-frame maps make the parameters depend on the input: the MLP has budget // F outputs for a
clip of F frames and `budget` for an image. Left to the first input (`frames=None`), a
TokenLearner initialised on images cannot run on clips, and a training run on clips is
initialised on a dummy image; `frames=F` fixes the shape to clips of F frames
(`learned.dummy_inputs` then initialises on such a clip). Either way an input the parameters do
not fit raises a ValueError that says so, not a shape error from deep inside Flax.
"""

from __future__ import annotations

from typing import Optional

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
    frames: the frame count F the parameters are shaped for, with `per_frame` (a positive int;
      1 = images); None: whatever the first input has. Inputs of another frame count raise.
  """

  budget: int
  bottleneck_dim: int = 64
  per_frame: bool = True
  frames: Optional[int] = None

  @nn.compact
  def __call__(self, tokens: Tokens) -> Tokens:
    """tokens: N tokens float[B, N, D] -> K tokens float[B, K, D] (`learned.resampled`)."""
    tokens = learned.check_input(tokens, self.budget, "tokenlearner")
    learned.check_positive("tokenlearner", bottleneck_dim=self.bottleneck_dim)
    if self.frames is not None:
      learned.check_positive("tokenlearner", frames=self.frames)
      if not self.per_frame:
        raise ValueError("tokenlearner: frames shapes per-frame maps; with per_frame=False it "
                         "has no effect (leave it out)")
    b, n, d = tokens.x.shape
    frames = tokens.grid[0]
    split = self.per_frame and frames > 1
    if self.per_frame and self.frames is not None and frames != self.frames:
      raise ValueError(f"tokenlearner: frames={self.frames} shapes its maps for clips of "
                       f"{self.frames} frames ({self.budget // self.frames} per frame), got an "
                       f"input of {frames} (pass per_frame=False for one set of maps over any "
                       f"input)")
    if split and (not tokens.is_raw_grid or self.budget % frames):
      raise ValueError(f"tokenlearner: per_frame needs the raw clip grid {tokens.grid} and a "
                       f"budget divisible by its {frames} frames; got N={n}, budget "
                       f"{self.budget} (or pass per_frame=False)")
    f = frames if split else 1
    k = self.budget // f
    have = self.variables.get("params", {}).get("map_out")
    if have is not None and have["kernel"].shape[-1] != k:
      # Parameters made for another frame count (e.g. initialised on an image, run on a clip).
      raise ValueError(f"tokenlearner: its parameters hold {have['kernel'].shape[-1]} maps per "
                       f"frame, this input of {frames} frame(s) needs {k} (budget {self.budget}"
                       f"{', per_frame' if split else ''}); initialise it for this input with "
                       f"frames={frames}, or use per_frame=False")
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
