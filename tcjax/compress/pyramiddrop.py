"""PyramidDrop: FastV-style drops at several decoder layers, a fixed ratio of the image tokens each.

Xing et al., "PyramidDrop: Accelerating Your Large Vision-Language Models via Pyramid Visual
Redundancy Reduction", arXiv 2410.17247 (CVPR 2025). Official code: Cooperx521/PyramidDrop,
`llava/model/modeling_llama_pdrop.py`.

Axis legend: N image tokens entering the decoder, n image tokens present at a step.

A schedule, not a method of its own: a plan entry `("llm", {"method": "pyramiddrop", "layers":
(l_1, ..., l_m), "ratios": (r_1, ..., r_m)})` runs one `fastv` step at the input of each layer
l_i, keeping int(N * r_i) image tokens (at most the n present, at least one) ranked by the
attention of the last prompt token (`query="last"`, official `pdrop_rank_drop`), from layer
l_i's own projections of its input (attn_from "next": the official computes the last token's
attention at the stage's first layer before running it).

Positions (official, the schedule's default "reindex"): `pdrop_rank_drop` gives the kept
sequence the positions 0..len-1, and decoding lowers the position by the tokens dropped at each
stage (`pdrop_forward`), i.e. each layer decodes at its own cache length; "original" keeps them.
"""

from __future__ import annotations

from typing import Tuple

from tcjax.compress.fastv import fastv as _step  # noqa: F401  (registers the step method)
from tcjax.compress.registry import register_schedule


def step_size(key: str, ratio, n: int, n_initial: int, options) -> Tuple[int, dict]:
  """(tokens kept out of the `n` present, no extra option): `ratio` of the `n_initial` image
  tokens that entered the decoder, at most n, at least 1."""
  del key, options
  if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
    raise ValueError(f"ratio must be in (0, 1], got {ratio!r}")
  return max(1, min(n, int(n_initial * ratio))), {}


SCHEDULE = register_schedule(
    "pyramiddrop", step="fastv", sizes={"ratios": "fraction"}, size=step_size,
    fixed={"query": "last"}, signals=("attn", "text_mask"), attn_from="next",
    positions="reindex", paper="PyramidDrop, arXiv 2410.17247 (CVPR 2025)")
