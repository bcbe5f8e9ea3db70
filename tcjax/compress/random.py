"""Random pruning: a uniformly random subset of the tokens, kept in their original order.

The baseline every pruning paper reports against (e.g. FastV's mask variant with K=0 drops a random
subset, arXiv 2403.06764). Each example of the batch draws its own subset from one key.
"""

import jax

from tcjax.compress import primitives as P
from tcjax.compress.registry import register


@register("random", family="sampling", stages=("vit", "post_vit", "post_proj", "llm"),
          needs=("rng",), paper="random subset baseline (e.g. FastV K=0 ablation, arXiv 2403.06764)",
          token_sharded=True)
def random(tokens, budget, *, rng=None):
  """Keep `budget` tokens drawn uniformly without replacement, in original order.

  Args:
    tokens: any tokens; padding is never kept while valid tokens remain.
    budget: tokens kept.
    rng: a jax.random key; `uniform(rng, [B, N])` noise ranks the tokens.
  """
  P.check_tokens(tokens, "random")
  budget = P.check_budget(tokens, budget, "random")
  rng = P.check_rng(rng, "random")
  noise = jax.random.uniform(rng, tokens.mask.shape)  # top-k of iid noise = uniform subset
  return P.select_top(tokens, noise, budget)
