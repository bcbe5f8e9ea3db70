"""Text-relevance pruning: keep the visual tokens most relevant to the prompt's text embeddings.

The cross-modal top-k of the survey's text-guided family. By default every valid text token
counts and relevance is cosine similarity: raw dot products between visual and text embeddings
are dominated by the norm gap between the modalities (e.g. Gemma scales text embeddings by
sqrt(d)), so `similarity="dot"` is an option, not the default.

`raters="above_mean"` borrows SparseVLM's rater rule (Zhang et al., arXiv 2410.04417;
`primitives.above_mean_raters`): M = softmax over the text tokens of the visual-text relevance S
(N x T); r_j = mean over the visual tokens of M[:, j]; the raters are the text tokens with
r_j > mean(r) (every valid text token if none beats the mean). Visual tokens are then scored by
their mean relevance S to the raters. This is not SparseVLM: SparseVLM scores the visual tokens
by the raters' attention inside the decoder, over several layers (`tcjax.compress.sparsevlm`).

Padding text tokens (`text_mask` False) never count, whatever their values. An example with no
valid text token scores every visual token 0 and keeps the first ones. NaN: a visual token whose
score is NaN (NaN features or NaN valid text) ranks last (`primitives.rank_key`).
"""

import jax.numpy as jnp

from tcjax.compress import primitives as P
from tcjax.compress.registry import register


def relevance(x, text, similarity):
  """float32[B, N, T] visual-text relevance: cosine (default) or raw dot product."""
  if similarity == "cosine":
    x, text = P.l2_normalize(x), P.l2_normalize(text)
  elif similarity != "dot":
    raise ValueError(f"text_relevance: similarity must be 'cosine' or 'dot', got {similarity!r}")
  return jnp.einsum("bnd,btd->bnt", x.astype(jnp.float32), text.astype(jnp.float32))


@register("text_relevance", family="cross_modal", stages=("post_proj", "llm"),
          needs=("text", "text_mask"),
          paper="text-guided top-k; above-mean raters as SparseVLM's (arXiv 2410.04417)",
          token_sharded=True)
def text_relevance(tokens, budget, *, text=None, text_mask=None, similarity="cosine",
                   raters="all"):
  """Keep the `budget` visual tokens with the highest mean relevance to the (rater) text tokens.

  Args:
    tokens: N visual tokens, features in the same space as `text`.
    budget: tokens kept.
    text: float[B, T, D] prompt embeddings.
    text_mask: bool[B, T], False marks padding.
    similarity: "cosine" (default) or "dot".
    raters: "all" valid text tokens, or "above_mean" (SparseVLM's rater rule).
  """
  P.check_tokens(tokens, "text_relevance")
  budget = P.check_budget(tokens, budget, "text_relevance")
  b, n, d = tokens.x.shape
  text = P.check_array(text, "text", "text_relevance", (b, None, d))
  valid = P.check_array(text_mask, "text_mask", "text_relevance", (b, text.shape[1]),
                        floating=False).astype(bool)
  text = jnp.where(valid[..., None], text, 0.0)  # padding values never reach the maths
  s = relevance(tokens.x, text, similarity)
  if raters == "above_mean":
    weight = P.above_mean_raters(s, valid, tokens.mask)
  elif raters == "all":
    weight = valid
  else:
    raise ValueError(f"text_relevance: raters must be 'all' or 'above_mean', got {raters!r}")
  w = weight.astype(jnp.float32)
  scores = jnp.where(weight[:, None], s, 0.0).sum(-1) / jnp.maximum(w.sum(1), 1.0)[:, None]
  return P.select_top(tokens, scores, budget)
