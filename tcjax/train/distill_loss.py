"""Distillation loss terms, as per-position values that `step.masked_mean` averages exactly as
it averages the cross-entropy (per example, or per token).

Axis legend: B batch, T text tokens, V vocabulary, E decoder width, N student image tokens,
M patches of the teacher's grid (frames * h * w).
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tcjax.tokens import Tokens


def _f32(x):
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def kl_per_token(teacher_logits: jax.Array, student_logits: jax.Array,
                 temperature: float) -> jax.Array:
  """float32[B, T - 1]: KL(teacher || student) of the next-token distributions at position t
  (the logits float[B, T, V] that predict text[t + 1], as the cross-entropy reads them), both
  softened by `temperature` and scaled by its square, which keeps the gradient's size about the
  same for any temperature (Hinton et al., arXiv 1503.02531)."""
  t = jax.nn.log_softmax(_f32(teacher_logits[:, :-1]) / temperature, axis=-1)
  s = jax.nn.log_softmax(_f32(student_logits[:, :-1]) / temperature, axis=-1)
  return (jnp.exp(t) * (t - s)).sum(-1) * temperature ** 2


def hidden_mse(teacher_hidden: jax.Array, student_hidden: jax.Array) -> jax.Array:
  """float32[B, T]: the squared difference of two models' text states float[B, T, E], averaged
  over the features (one value per text position)."""
  return jnp.mean((_f32(student_hidden) - _f32(teacher_hidden)) ** 2, axis=-1)


def fine_src(student: Tokens, grid: Tuple[int, int, int]) -> jax.Array:
  """int32[B, M]: for each patch of the teacher's `grid` (frames, h, w), the student token that
  carries it (-1: none).

  The student's own grid is the teacher's (a compressed student: its `src` as is) or coarser by
  whole factors (a larger patch: each teacher patch lies inside one student patch, whose token
  carries it). ValueError for grids that do not nest.
  """
  grid = tuple(grid)
  if tuple(student.grid) == grid:
    return student.src
  (ft, ht, wt), (fs, hs, ws) = grid, student.grid
  if ft != fs or ht % hs or wt % ws:
    raise ValueError(f"the student's patch grid {student.grid} does not tile the teacher's "
                     f"{grid} (same frames, rows and columns divided by whole factors)")
  f, r, c = np.unravel_index(np.arange(ft * ht * wt), grid)
  covering = (f * hs + r // (ht // hs)) * ws + c // (wt // ws)  # static: a gather of src
  return student.src[:, covering]


def pool_onto(teacher_x: jax.Array, src: jax.Array, num_tokens: int
              ) -> Tuple[jax.Array, jax.Array]:
  """The teacher's patch tokens averaged over the patches each student token carries.

  teacher_x: float[B, M, E], one token per patch (raster order, frame-major); src: int32[B, M]
  the student token carrying each patch (-1: dropped). Returns (float32[B, N, E] means, zero
  where a token carries no patch; float32[B, N] patches per token).
  """
  n = num_tokens
  seg = jnp.where(src >= 0, src, n)  # dropped patches go to an extra bucket, then away

  def one(x, s):
    sums = jax.ops.segment_sum(_f32(x), s, num_segments=n + 1)[:n]
    count = jax.ops.segment_sum(jnp.ones(s.shape, jnp.float32), s, num_segments=n + 1)[:n]
    return sums / jnp.maximum(count, 1.0)[:, None], count

  return jax.vmap(one)(teacher_x, seg)


def image_mse(student: Tokens, teacher: Tokens) -> Tuple[jax.Array, jax.Array]:
  """The student's image tokens against the teacher's averaged over the patches each carries.

  student: its projected image Tokens (x float[B, N, E], any plan or a coarser grid); teacher:
  the uncompressed model's (one token per patch of its grid). Returns (float32[B, N] squared
  error averaged over the features, float32[B, N] weight: 1 on valid tokens carrying a patch).
  """
  if not teacher.is_raw_grid:
    raise ValueError(f"the teacher's image tokens must be its raw patch grid {teacher.grid}, "
                     f"got {teacher.num_tokens} tokens (the teacher runs without a plan)")
  src = fine_src(student, teacher.grid)
  target, count = pool_onto(teacher.x, src, student.num_tokens)
  err = jnp.mean((_f32(student.x) - target) ** 2, axis=-1)
  weight = ((count > 0) & student.mask).astype(jnp.float32)
  return err, weight
