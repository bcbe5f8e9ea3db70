"""Uniform (strided) spatial sampling: keep an evenly spread sub-grid of patches in every frame.

A fixed, content-agnostic baseline (the "spatial sampling" rows of pruning papers' tables).
The sub-grid h' x w' (frames * h' * w' == budget, aspect closest to h : w) comes from
`grid_for_budget`; its rows are the input rows nearest to the centres of h' equal bands, i.e.
row floor((i + 1/2) * h / h'), and likewise for columns.

Fallback: a budget that is not frames * h' * w' for a sub-grid that fits (e.g. a prime budget)
keeps evenly spaced raster indices floor((i + 1/2) * N / budget) over the whole clip instead.
"""

import numpy as np

from tcjax.compress import primitives as P
from tcjax.compress.registry import register


def uniform_indices(grid, budget):
  """Static int[budget] raster indices of the patches `uniform` keeps on `grid = (T, h, w)`."""
  t, h, w = grid
  try:
    hh, ww = P.grid_for_budget(h, w, budget, frames=t)
  except ValueError:  # does not factor into a sub-grid: evenly spaced raster indices
    n = t * h * w
    return ((np.arange(budget) + 0.5) * n / budget).astype(np.int64)
  rows = ((np.arange(hh) + 0.5) * h / hh).astype(np.int64)
  cols = ((np.arange(ww) + 0.5) * w / ww).astype(np.int64)
  f, r, c = np.meshgrid(np.arange(t), rows, cols, indexing="ij")
  return ((f * h + r) * w + c).reshape(-1)


@register("uniform", family="sampling", stages=("post_vit", "post_proj"),
          paper="strided spatial sampling baseline")
def uniform(tokens, budget):
  """Keep an evenly spread sub-grid of `budget` patches (see the module docstring).

  Args:
    tokens: raw grid tokens (N == T * h * w).
    budget: tokens kept; T * h' * w' for a sub-grid, otherwise evenly spaced raster indices.
  """
  P.check_tokens(tokens, "uniform")
  budget = P.check_budget(tokens, budget, "uniform")
  P.check_grid_tokens(tokens, "uniform")
  return P.gather_static(tokens, uniform_indices(tokens.grid, budget))
