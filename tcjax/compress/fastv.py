"""FastV: "An Image is Worth 1/2 Tokens After Layer 2" (Chen et al., arXiv 2403.06764).

At decoder layer K, rank the visual tokens by the attention they received in layer K-1 (mean
over heads) and keep the top ones, in original order and with their original positions (official
`position_ids = keep_indexs` in pkunlp-icler/FastV `src/transformers/src/transformers/models/
llama/modeling_llama.py` and `src/FastV/lmms-eval/fastv_kvcache.py`: the plan entry's default
`positions="original"`; "reindex" renumbers them).
Official code uses only the LAST token's attention row (`query="last"`, the default); the paper's
wording is the attention received from the other tokens (`query="mean"`: mean over the given
query rows, e.g. the text tokens).

Signal: `attn: float[B, Q, N]`, the attention probabilities from Q query rows (e.g. the prompt
tokens) to the N visual tokens, averaged over heads; compute just these rows beside the fused
kernel. Optional `text_mask: bool[B, Q]` marks valid query rows (padding rows never count;
"last" then means the last valid row). NaN: a token whose score is NaN ranks last
(`primitives.rank_key`); with `query="mean"` one NaN in a valid row's column makes it NaN.
"""

import jax.numpy as jnp

from tcjax.compress import primitives as P
from tcjax.compress.registry import register


@register("fastv", family="sampling", stages=("llm",), needs=("attn",),
          paper="FastV, arXiv 2403.06764", token_sharded=True,
          default_signals=("text_mask",))  # padding rows never score
def fastv(tokens, budget, *, attn=None, text_mask=None, query="last"):
  """Keep the `budget` visual tokens most attended by the chosen query rows, in order.

  Args:
    tokens: N visual tokens.
    budget: tokens kept.
    attn: float[B, Q, N] attention rows (mean over heads) restricted to the visual columns.
    text_mask: optional bool[B, Q], valid query rows.
    query: "last" (official: the last valid row) or "mean" (paper: mean over valid rows).
  """
  P.check_tokens(tokens, "fastv")
  budget = P.check_budget(tokens, budget, "fastv")
  b, n, _ = tokens.x.shape
  attn = P.check_array(attn, "attn", "fastv", (b, None, n)).astype(jnp.float32)
  q = attn.shape[1]
  if q == 0:
    raise ValueError("fastv: `attn` needs at least one query row")
  if text_mask is None:
    valid = jnp.ones((b, q), bool)
  else:
    valid = P.check_array(text_mask, "text_mask", "fastv", (b, q), floating=False).astype(bool)
  if query == "last":
    last = q - 1 - jnp.argmax(valid[:, ::-1], axis=1)  # last valid row (row 0 if none valid)
    scores = jnp.take_along_axis(attn, last[:, None, None], axis=1)[:, 0]
  elif query == "mean":
    w = valid.astype(jnp.float32)
    scores = jnp.einsum("bq,bqn->bn", w, jnp.where(valid[..., None], attn, 0.0))
    scores = scores / jnp.maximum(w.sum(1), 1.0)[:, None]
  else:
    raise ValueError(f"fastv: query must be 'last' or 'mean', got {query!r}")
  return P.select_top(tokens, scores, budget)
