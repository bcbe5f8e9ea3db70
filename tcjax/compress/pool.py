"""k x k average pooling on the patch grid (Gemma 3's pre-projector pooling, LLaVA 2x2 pooling).

Gemma 3 (arXiv 2503.19786) average-pools the 64x64 SigLIP grid 4x4 before its projector; LLaVA-
OneVision / LLaVA-Video average-pool video frames 2x2. Pooling is size-weighted and in ceil mode:
an edge window that hangs over the grid averages the patches it covers (nothing is dropped).
"""

from tcjax.compress import primitives as P
from tcjax.compress.registry import register


def pool_window_for_budget(grid, budget, method="pool"):
  """The window k whose ceil-mode pooling of `grid = (T, h, w)` gives exactly `budget` tokens."""
  t, h, w = grid
  options = {}
  for k in range(1, max(h, w) + 1):
    ho, wo = P.pooled_grid(h, w, k)
    options.setdefault(t * ho * wo, k)
  if budget not in options:
    raise ValueError(f"{method}: budget {budget} is not reachable by k x k pooling of a "
                     f"{t}x{h}x{w} grid; valid budgets: {sorted(options, reverse=True)}")
  return options[budget]


@register("pool", family="pooling", stages=("post_vit", "post_proj"),
          paper="k x k average pooling (Gemma 3, arXiv 2503.19786; LLaVA-OneVision)")
def pool(tokens, budget, *, window=None):
  """Average-pool each frame k x k so that exactly `budget` tokens remain.

  Args:
    tokens: raw grid tokens (N == T * h * w).
    budget: T * ceil(h/k) * ceil(w/k) for some k (the error lists the valid values).
    window: the k to use; by default the k that gives `budget`.
  """
  P.check_tokens(tokens, "pool")
  budget = P.check_budget(tokens, budget, "pool")
  P.check_grid_tokens(tokens, "pool")
  k = pool_window_for_budget(tokens.grid, budget) if window is None else window
  t, h, w = tokens.grid
  ho, wo = P.pooled_grid(h, w, k)
  if t * ho * wo != budget:
    raise ValueError(f"pool: window {k} gives {t * ho * wo} tokens, not budget {budget}")
  return P.pool_grid(tokens, k)
