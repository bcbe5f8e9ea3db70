"""FasterVLM: "[CLS] Attention is All You Need for Training-Free Visual Token Pruning".

Zhang et al., arXiv 2412.01818v1. Official code (Theia-4869/FasterVLM) ranks the patches by the
[CLS] row of the vision tower's attention at `select_layer = -2`, averaged over heads, keeps the
top K and preserves raster order. Towers without a [CLS] token (SigLIP) have no such row; there
the score is the attention each patch receives, averaged over the given query rows (e.g. all
patch rows of that layer, or a subset).

Signal: `attn: float[B, Q, N]`, attention probabilities (already averaged over heads) from Q
query tokens to the N patches. Pass the single [CLS] row (Q = 1) for CLIP-style towers.
NaN: a token whose reduced score is NaN ranks last (see `primitives.rank_key`); with
`reduce="mean"` one NaN entry in a token's column makes its score NaN.
"""

from tcjax.compress import primitives as P
from tcjax.compress.registry import register


@register("fastervlm", family="sampling", stages=("post_vit",), needs=("attn",),
          paper="FasterVLM, arXiv 2412.01818v1", token_sharded=True)
def fastervlm(tokens, budget, *, attn=None, reduce="mean"):
  """Keep the `budget` patches with the highest [CLS] / mean received attention, in order.

  Args:
    tokens: N patch tokens.
    budget: tokens kept.
    attn: float[B, Q, N] attention rows (mean over heads).
    reduce: "mean" over the Q rows (a single CLS row, or SigLIP's mean received attention) or
      "cls" (row 0 only, when the rows include the [CLS] row first).
  """
  P.check_tokens(tokens, "fastervlm")
  budget = P.check_budget(tokens, budget, "fastervlm")
  b, n, _ = tokens.x.shape
  attn = P.check_array(attn, "attn", "fastervlm", (b, None, n)).astype("float32")
  if attn.shape[1] == 0:
    raise ValueError("fastervlm: `attn` needs at least one query row")
  if reduce == "mean":
    scores = attn.mean(1)
  elif reduce == "cls":
    scores = attn[:, 0]
  else:
    raise ValueError(f"fastervlm: reduce must be 'mean' or 'cls', got {reduce!r}")
  return P.select_top(tokens, scores, budget)
