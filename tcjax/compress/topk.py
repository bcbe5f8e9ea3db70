"""Top-k by any given importance scores: the common core of score-then-select pruning."""

from tcjax.compress import primitives as P
from tcjax.compress.registry import register


@register("topk", family="sampling", stages=("vit", "post_vit", "post_proj", "llm"),
          needs=("scores",), paper="generic score-based top-k pruning", token_sharded=True)
def topk(tokens, budget, *, scores=None):
  """Keep the `budget` tokens with the highest `scores: float[B, N]`, in original order.

  NaN scores rank as -inf (see `primitives.rank_key`).
  """
  P.check_tokens(tokens, "topk")
  budget = P.check_budget(tokens, budget, "topk")
  scores = P.check_scores(tokens, scores, "topk")
  return P.select_top(tokens, scores, budget)
