"""Key-norm saliency: rank tokens by the norm of their attention keys, no attention weights needed.

FlashAttention-compatible saliency. ViTCoP (arXiv 2601.17818,
official code) keeps the tokens with the SMALLEST L2 norm of the head-averaged keys (small key
norm ~ high received attention): the default, `order="smallest", norm="l2"`. DART
(arXiv 2502.11494) picks its pivots by the LARGEST L1 norm of the keys: `order="largest",
norm="l1"`.

Signal: `keys: float[B, N, Dk]` (head-averaged, or heads concatenated: the L1/L2 ranking of
concatenated heads is what DART uses). NaN/inf: a token whose norm is NaN ranks last; an infinite
norm is the largest (kept first with "largest", last with "smallest").
"""

import jax.numpy as jnp

from tcjax.compress import primitives as P
from tcjax.compress.registry import register


@register("keynorm", family="sampling", stages=("vit", "llm"), needs=("keys",),
          paper="key-norm saliency: ViTCoP (arXiv 2601.17818), DART pivots (arXiv 2502.11494)",
          token_sharded=True)
def keynorm(tokens, budget, *, keys=None, order="smallest", norm="l2"):
  """Keep the `budget` tokens with the smallest (or largest) key norms, in original order.

  Args:
    tokens: N tokens.
    budget: tokens kept.
    keys: float[B, N, Dk].
    order: "smallest" (ViTCoP, default) or "largest" (DART pivots) norms are kept.
    norm: "l2" (default) or "l1".
  """
  P.check_tokens(tokens, "keynorm")
  budget = P.check_budget(tokens, budget, "keynorm")
  b, n, _ = tokens.x.shape
  keys = P.check_array(keys, "keys", "keynorm", (b, n, None)).astype(jnp.float32)
  if norm == "l2":
    size = jnp.sqrt(jnp.sum(keys * keys, -1))
  elif norm == "l1":
    size = jnp.sum(jnp.abs(keys), -1)
  else:
    raise ValueError(f"keynorm: norm must be 'l1' or 'l2', got {norm!r}")
  if order == "smallest":
    scores = -size
  elif order == "largest":
    scores = size
  else:
    raise ValueError(f"keynorm: order must be 'smallest' or 'largest', got {order!r}")
  return P.select_top(tokens, scores, budget)
