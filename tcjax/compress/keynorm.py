"""Key-norm saliency: rank tokens by the norm of their attention keys, no attention weights needed.

FlashAttention-compatible saliency. ViTCoP (arXiv 2601.17818, official code chaser682/ViTCoP,
`vitcop_modeling_llama.py`) prunes at a decoder layer K by the key cache of layer K-1 (post-RoPE,
one entry per key/value head), averaged over the heads, and keeps the tokens with the SMALLEST
L2 norm (small key norm ~ high received attention): the default, `heads="mean", order="smallest",
norm="l2"`. This is ViTCoP's deep-layer rule alone (its shallow layer also clusters the tokens);
in the decoder the kept tokens keep their positions (`position_ids = all_keep`: the kept tokens'
indices, for the deep rule alone their original positions; the plan entry's default
`positions="original"`).
DART (arXiv 2502.11494) picks its pivots by the LARGEST L1 norm of the keys with the heads
concatenated: `heads="concat", order="largest", norm="l1"`.

The two head reductions rank differently as soon as there is more than one key/value head
(Gemma 2's grouped-query attention, any ViT): the norm of the mean is not the norm of the
concatenation. With one head they agree.

Signal: `keys_heads: float[B, N, K, h]`, the keys per key/value head (the decoder: post-RoPE keys
of layer K-1, or K with attn_from="next"; the ViT: the key projection of the signal layer).
NaN/inf: a token whose norm is NaN ranks last; an infinite norm is the largest (kept first with
"largest", last with "smallest").
"""

import jax.numpy as jnp

from tcjax.compress import primitives as P
from tcjax.compress.registry import register


@register("keynorm", family="sampling", stages=("vit", "llm"), needs=("keys_heads",),
          paper="key-norm saliency: ViTCoP (arXiv 2601.17818), DART pivots (arXiv 2502.11494)",
          token_sharded=True)
def keynorm(tokens, budget, *, keys_heads=None, heads="mean", order="smallest", norm="l2"):
  """Keep the `budget` tokens with the smallest (or largest) key norms, in original order.

  Args:
    tokens: N tokens.
    budget: tokens kept.
    keys_heads: float[B, N, K, h] keys per key/value head.
    heads: "mean" (ViTCoP, default: the norm of the head-mean key) or "concat" (the norm of the
      heads concatenated, DART's convention).
    order: "smallest" (ViTCoP, default) or "largest" (DART pivots) norms are kept.
    norm: "l2" (default) or "l1".
  """
  P.check_tokens(tokens, "keynorm")
  budget = P.check_budget(tokens, budget, "keynorm")
  b, n, _ = tokens.x.shape
  keys = P.check_array(keys_heads, "keys_heads", "keynorm", (b, n, None, None)).astype(jnp.float32)
  if heads == "mean":
    keys = keys.mean(2)  # [B, N, h]
  elif heads == "concat":
    keys = keys.reshape(b, n, -1)  # [B, N, K * h]
  else:
    raise ValueError(f"keynorm: heads must be 'mean' or 'concat', got {heads!r}")
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
