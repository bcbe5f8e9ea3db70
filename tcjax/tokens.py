"""The `Tokens` pytree: the contract every compression method takes and returns.

Axis legend: B batch, N tokens now, M original patches (frames * h * w), D features.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
from flax import struct

from tcjax.parallel.mesh import match_batch


@struct.dataclass
class Tokens:
  """A batch of visual tokens and where they came from.

  Attributes:
    x: float[B, N, D] features.
    pos: int32[B, N, 3] (frame, row, col) of the token's origin on the patch grid.
    size: float32[B, N] how many original patches the token stands for (1 raw, 0 padding).
    mask: bool[B, N] False marks padding in a fixed-capacity output.
    src: int32[B, M] for each original patch, the output token that carries it, -1 if dropped.
    grid: static (frames, h, w) of the original patch grid; M == frames * h * w.
  """

  x: jax.Array
  pos: jax.Array
  size: jax.Array
  mask: jax.Array
  src: jax.Array
  grid: Tuple[int, int, int] = struct.field(pytree_node=False, default=(1, 1, 1))

  @property
  def num_tokens(self) -> int:
    return self.x.shape[-2]

  @property
  def num_patches(self) -> int:
    frames, h, w = self.grid
    return frames * h * w

  @property
  def is_raw_grid(self) -> bool:
    """True when the tokens are still exactly the original patch grid (static check only)."""
    return self.num_tokens == self.num_patches

  @classmethod
  def from_grid(cls, x, grid: Tuple[int, int]) -> "Tokens":
    """Raw patch tokens of one image. `x: float[B, h*w, D]` in raster order."""
    h, w = _check_grid(grid, "grid", 2)
    return cls.from_video(x, frames=1, grid=(h, w))

  @classmethod
  def from_video(cls, x, frames: int, grid: Tuple[int, int]) -> "Tokens":
    """Raw patch tokens of a clip. `x: float[B, T*h*w, D]`, frame-major, raster order in a frame."""
    h, w = _check_grid(grid, "grid", 2)
    if not isinstance(frames, int) or frames <= 0:
      raise ValueError(f"frames must be a positive int, got {frames!r}")
    x = jnp.asarray(x)
    if x.ndim != 3:
      raise ValueError(f"x must be float[B, N, D], got shape {x.shape}")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"x must be floating point, got dtype {x.dtype}")
    b, n, _ = x.shape
    if n != frames * h * w:
      raise ValueError(
          f"grid {frames}x{h}x{w} = {frames * h * w} patches does not match x with N={n} tokens")
    t_idx, r_idx, c_idx = jnp.unravel_index(jnp.arange(n, dtype=jnp.int32), (frames, h, w))
    pos = jnp.stack([t_idx, r_idx, c_idx], axis=-1).astype(jnp.int32)
    return cls(
        x=x,
        pos=jnp.broadcast_to(pos, (b, n, 3)),
        size=jnp.ones((b, n), jnp.float32),
        mask=jnp.ones((b, n), bool),
        src=jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n)),
        grid=(frames, h, w),
    ).sharded_like_x()

  def sharded_like_x(self) -> "Tokens":
    """These tokens with the batch axis of pos, size, mask and src sharded like x's, their
    other axes kept (`parallel.mesh.match_batch`): on Explicit mesh axes a `vmap` over x, pos
    and mask needs one batch sharding. A no-op on Auto axes, without a mesh, or when they agree."""
    batched = lambda a: match_batch(a, self.x)
    return self.replace(pos=batched(self.pos), size=batched(self.size), mask=batched(self.mask),
                        src=batched(self.src))

  def linear_pos(self) -> jax.Array:
    """int32[B, N] raster index (frame-major) of each token's origin on the original grid."""
    frames, h, w = self.grid
    return (self.pos[..., 0] * h + self.pos[..., 1]) * w + self.pos[..., 2]

  def count(self) -> jax.Array:
    """int32[B] number of valid (non-padding) tokens."""
    return self.mask.sum(-1).astype(jnp.int32)


def _check_grid(grid, name, rank):
  if (not isinstance(grid, (tuple, list)) or len(grid) != rank
      or not all(isinstance(g, int) and g > 0 for g in grid)):
    raise ValueError(f"{name} must be a tuple of {rank} positive ints, got {grid!r}")
  return tuple(grid)
