"""SlowFast video tokens: a few frames at full grid ("slow"), the rest pooled ("fast").

LLaVA-Video: Zhang et al., "Video Instruction Tuning with Synthetic Data", arXiv 2410.02713
(LLaVA-NeXT code, `add_faster_video`: every `faster_token_stride`-th frame is slow, the others
are pooled with a larger stride). In LLaVA-Video the slow frames are themselves 2x2-pooled
(27x27 -> 13x13) and the fast ones 4x4-pooled; here slow frames keep their full grid and fast
frames are k x k average-pooled (size-weighted, ceil mode), so pool first with `pool` to get
the LLaVA-Video configuration. The model's learned separator / newline tokens are not part of
this transform.

Axis legend: B batch, T frames, N = T * h * w tokens, D features.

Budget: `slow * h * w + (T - slow) * ceil(h / k) * ceil(w / k)`; the budget picks the
configuration (smallest window first, then fewest slow frames) unless `slow_frames` /
`fast_window` fix it.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import jax.numpy as jnp
import numpy as np

from tcjax.compress import primitives as P
from tcjax.compress.registry import register


def slowfast_budgets(grid, slow_frames: Optional[int] = None,
                     fast_window: Optional[int] = None) -> Dict[int, Tuple[int, int]]:
  """Every reachable budget of `grid = (T, h, w)` -> its (slow_frames, fast_window)."""
  t, h, w = grid
  windows = range(2, max(h, w, 2) + 1) if fast_window is None else [fast_window]
  slows = range(1, t + 1) if slow_frames is None else [slow_frames]
  out = {}
  for k in windows:
    ho, wo = P.pooled_grid(h, w, k)
    for s in slows:
      out.setdefault(s * h * w + (t - s) * ho * wo, (s, k))
  return out


def slow_frame_indices(frames: int, slow: int) -> np.ndarray:
  """`slow` evenly spaced frames starting at frame 0 (every (T/slow)-th frame)."""
  return np.arange(slow) * frames // slow


def slowfast_assign(grid, slow: int, k: int):
  """Static slot of every patch and representative (top-left patch) of every slot."""
  t, h, w = grid
  ho, wo = P.pooled_grid(h, w, k)
  is_slow = np.zeros(t, bool)
  is_slow[slow_frame_indices(t, slow)] = True
  per_frame = np.where(is_slow, h * w, ho * wo)
  base = np.concatenate([[0], np.cumsum(per_frame)[:-1]])
  tt, rr, cc = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
  local = np.where(is_slow[tt], rr * w + cc, (rr // k) * wo + cc // k)
  assign = (base[tt] + local).reshape(-1).astype(np.int32)
  _, rep = np.unique(assign, return_index=True)  # first patch in raster order = top-left
  return assign, rep.astype(np.int32), np.flatnonzero(is_slow)


@register("slowfast", family="pooling", stages=("post_vit", "post_proj"),
          paper="LLaVA-Video SlowFast, Zhang et al., arXiv 2410.02713")
def slowfast(tokens, budget, *, slow_frames=None, fast_window=None):
  """Keep evenly spaced slow frames whole and k x k-pool the other frames.

  Args:
    tokens: raw video tokens (N == T * h * w).
    budget: `slow * h * w + (T - slow) * ceil(h/k) * ceil(w/k)`; the error lists valid values.
    slow_frames: number of full-grid frames (evenly spaced from frame 0); default: from budget.
    fast_window: pooling window k >= 2 of the other frames; default: from budget.

  Returns:
    `budget` tokens in raster order: slow frames exactly as given, fast frames pooled.
  """
  name = "slowfast"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  t, h, w = P.check_grid_tokens(tokens, name)
  for opt, val, low, high in (("slow_frames", slow_frames, 1, t),
                              ("fast_window", fast_window, 2, max(h, w, 2))):
    if val is not None and (isinstance(val, bool) or not isinstance(val, int)
                            or not low <= val <= high):
      raise ValueError(f"{name}: {opt} must be an int in [{low}, {high}], got {val!r}")
  options = slowfast_budgets(tokens.grid, slow_frames, fast_window)
  if budget not in options:
    fixed = ", ".join(f"{k}={v}" for k, v in (("slow_frames", slow_frames),
                                              ("fast_window", fast_window)) if v is not None)
    raise ValueError(f"{name}: budget {budget} is not reachable for a {t}x{h}x{w} clip"
                     f"{' with ' + fixed if fixed else ''}; valid budgets: "
                     f"{sorted(options, reverse=True)}")
  slow, k = options[budget]
  assign, rep, _ = slowfast_assign(tokens.grid, slow, k)
  b = tokens.x.shape[0]
  assign = jnp.broadcast_to(jnp.asarray(assign), (b, assign.size))
  rep = jnp.broadcast_to(jnp.asarray(rep), (b, rep.size))
  return P.merge(tokens, jnp.where(tokens.mask, assign, -1), rep)
