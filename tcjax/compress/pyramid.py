"""Matryoshka nested pooling pyramid (M3: Matryoshka Multimodal Models, arXiv 2405.17430).

M3 trains one model on nested, coarse-to-fine token sets made by average-pooling the patch grid;
at test time the budget picks the granularity. Level l is 2x2 pooling applied l times
(16x16 -> 8x8 -> 4x4 -> 2x2 -> 1x1). Pooling is size-weighted and in ceil mode, so 2x2 pooling
applied l times equals one 2^l x 2^l pooling (the windows nest) and odd grids lose nothing
(27 -> 14 -> 7 -> 4 -> 2 -> 1).

The official code pools after the projector (post_proj); the paper describes pooling the vision
tokens (post_vit): both stages are allowed, the caller picks where to apply it. M3's own last
level of a 24x24 grid is one 24x24 pool (9 -> 1 token); here every level is a 2x2 step, so a 24x24
grid has levels 576, 144, 36, 9, 4, 1.
"""

from typing import List

from tcjax.compress import primitives as P
from tcjax.compress.registry import register


def pyramid_budgets(grid) -> List[int]:
  """Token counts of the levels 0, 1, ... of the pyramid on `grid = (T, h, w)`."""
  t, h, w = grid
  out, k = [], 1
  while True:
    ho, wo = P.pooled_grid(h, w, k)
    out.append(t * ho * wo)
    if ho == 1 and wo == 1:
      return out
    k *= 2


def pyramid_levels(tokens) -> list:
  """Every level of the pyramid of raw grid tokens, finest (the input) first, down to 1 per frame."""
  P.check_tokens(tokens, "pyramid")
  P.check_grid_tokens(tokens, "pyramid")
  return [P.pool_grid(tokens, 2 ** level) for level in range(len(pyramid_budgets(tokens.grid)))]


@register("pyramid", family="pooling", stages=("post_vit", "post_proj"),
          paper="M3, Matryoshka Multimodal Models (arXiv 2405.17430)")
def pyramid(tokens, budget, *, level=None):
  """The pyramid level with exactly `budget` tokens (2x2 pooling applied `level` times).

  Args:
    tokens: raw grid tokens (N == T * h * w).
    budget: one of `pyramid_budgets(tokens.grid)` (the error lists them).
    level: the level to use; by default the level that has `budget` tokens.
  """
  P.check_tokens(tokens, "pyramid")
  budget = P.check_budget(tokens, budget, "pyramid")
  P.check_grid_tokens(tokens, "pyramid")
  budgets = pyramid_budgets(tokens.grid)
  if level is None:
    if budget not in budgets:
      raise ValueError(f"pyramid: budget {budget} is not a level of the {tokens.grid} grid; "
                       f"valid budgets: {budgets}")
    level = budgets.index(budget)
  if not 0 <= level < len(budgets) or budgets[level] != budget:
    raise ValueError(f"pyramid: level {level} does not give budget {budget}; levels: {budgets}")
  return P.pool_grid(tokens, 2 ** level)
