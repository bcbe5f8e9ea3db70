"""CDPruner: instruction-conditioned diversity by a conditional DPP, greedy MAP inference.

Zhang et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for Token Pruning
in MLLMs", arXiv 2506.10967, NeurIPS 2025 (official code: Theia-4869/CDPruner,
`llava/model/llava_arch.py::encode_images`).

Axis legend: B batch, N visual tokens, D features, T text tokens, K budget (greedy steps).

Official behaviour (followed here), per image, after the projector, in float32:
  1. Similarity S = cosine of the projected tokens (`F_hat F_hat^T`).
  2. Relevance r_i = mean over the instruction's text embeddings of the NEGATED cosine between
     token i and the text, then min-max normalised: (r - min + 1e-6) / (max - min).
  3. Kernel L = diag(r) S diag(r).
  4. Greedy MAP (Chen et al.'s incremental Cholesky) for K steps: d2 = diag(L), rows c = 0; each
     step picks j = argmax d2 (first index on ties), e = (L[j] - sum_t c_t[j] c_t) / sqrt(d2[j]),
     stores e as the next row, d2 -= e^2, d2[j] = -inf.
  5. The K picks are kept in raster order (a boolean mask); in the LLM the survivors take
     contiguous positions (PaliGemma numbers the valid image tokens 0.. after post_proj).

Port to PaliGemma (which has no text tower aligned with its vision tower): the official relevance
compares CLIP's projected penultimate-layer patch embeddings with CLIP text embeddings of the raw
question (one per 77-token chunk). Here `text` is whatever the stage provides in the tokens'
space - after the projector, the Gemma input embeddings of the prompt tokens; at the `llm` stage,
the prompt rows' hidden states - and the mean runs over its valid tokens (`text_mask`). Tokens and
text share one space, so S and the relevance read the same features.

Options where the official behaviour is specific to its setting:
  - `sign="negative"` (default, the official code) or `"positive"`: the maintainers negated the
    cosine because CLIP's patch embeddings in LLaVA are anti-aligned with the text (issues #9,
    #14), which contradicts the paper's wording (issue #22); for other encoders the sign is an
    empirical question, hence the option.
  - `normalize="example"` (default) or `"batch"`: the official min / max run over the whole
    tensor batch, which at its evaluation batch size 1 is the one image (all crops of it for
    LLaVA-NeXT). Across a batch of unrelated examples that would make one example's selection
    depend on the others, so the default is per example; "batch" is the literal code.
  - `theta`: the official file carries, commented out, r <- exp(alpha r) with
    alpha = theta / (2 (1 - theta)) (a relevance / diversity trade-off); None (default) leaves it
    out, as the official code runs.
Robustness beyond the official code (the same selections wherever the official picks are not
decided by rounding):
  - a residual d2 <= `EXHAUSTED` (1e-5) times the kernel's largest diagonal entry counts as
    exhausted. Residuals get there when the picks outnumber the kernel's rank (duplicate tokens,
    N > D): float32 rounding leaves them at ~1e-6, so the official picks there are noise (they
    differ between compilations), and at d2 <= 0 the official loop takes sqrt of a non-positive
    number, turns NaN and picks duplicates. Once every remaining valid token is exhausted, the
    picks follow the relevance (the kernel's diagonal, ties by index) and add no row, so they
    stay distinct and deterministic. (Chen et al.'s reference stops at d2 < 1e-10 in float64.)
  - padding tokens and tokens with non-finite features or relevance are picked only after every
    valid token, in index order, and kept after the valid ones; text padding never counts; with
    no valid text, or a relevance that is constant over the example (max == min, where the
    official divides by zero), every relevance is 1 and the selection is the plain DPP on S.
Cost: the cosine Gram matrix (`primitives.gram`) up to `GRAM_MAX_TOKENS` tokens, then K steps of
O(i N) each (the official einsum over the i picks so far, `greedy_map`); on CPU one example at a
time.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from tcjax.compress import primitives as P
from tcjax.compress.registry import register
from tcjax.compress.text_relevance import relevance as text_cosine
from tcjax.parallel.mesh import batch_shards, map_batch

# Largest N for which the N x N similarity matrix is kept by default (4 N^2 bytes per example);
# above it each greedy step recomputes one row from the features.
GRAM_MAX_TOKENS = 4096
# A residual d2 at most this fraction of the kernel's largest diagonal entry counts as exhausted:
# float32 rounding leaves residuals of ~1e-6 of it where the kernel has no rank left.
EXHAUSTED = 1e-5


def conditional_relevance(x, text, text_mask, valid, *, sign="negative", normalize="example",
                          theta=None):
  """float32[B, N] CDPruner relevance of each visual token to the instruction.

  Args:
    x: float[B, N, D] visual tokens; text: float[B, T, D] instruction embeddings (same space);
    text_mask: bool[B, T] valid text tokens; valid: bool[B, N] tokens that count in the min-max.
    sign, normalize, theta: see the module docstring.

  Returns:
    (relevance float32[B, N], finite bool[B, N]): min-max normalised relevance (0 where not
    finite) and which tokens have a finite one.
  """
  cos = text_cosine(x, jnp.where(text_mask[..., None], text, 0.0), "cosine")  # [B, N, T]
  w = text_mask.astype(jnp.float32)
  mean = jnp.einsum("bnt,bt->bn", jnp.where(text_mask[:, None], cos, 0.0), w)
  mean = mean / jnp.maximum(w.sum(1), 1.0)[:, None]
  r = -mean if sign == "negative" else mean
  ok = valid & jnp.isfinite(r)
  axes = (0, 1) if normalize == "batch" else (1,)
  lo = jnp.where(ok, r, jnp.inf).min(axes, keepdims=True)
  hi = jnp.where(ok, r, -jnp.inf).max(axes, keepdims=True)
  spread = hi - lo
  flat = ~(spread > 0)  # constant relevance, a single valid token, or none: relevance 1
  r = jnp.where(flat, 1.0, (r - lo + 1e-6) / jnp.where(flat, 1.0, spread))
  if theta is not None:
    r = jnp.exp(theta / (2.0 * (1.0 - theta)) * r)
  return jnp.where(ok, r, 0.0), ok


def greedy_map(row, diag, rel, valid, budget: int, tol: float = EXHAUSTED) -> jax.Array:
  """int32[budget] greedy MAP picks of the conditional DPP of one example, in pick order.

  Args:
    row: j -> float32[N], row j of the similarity S (zero for invalid tokens).
    diag: float32[N] diagonal of S.
    rel: float32[N] relevance (0 for invalid tokens); the kernel is rel_i S_ij rel_j.
    valid: bool[N] tokens that may be picked before the others.
    budget: picks K.
    tol: a residual d2 at most `tol` times the largest diagonal entry of the kernel counts as
      exhausted (module docstring).

  Each step picks, in this order of preference: the valid token with the largest residual d2
  above the tolerance (the official rule, which then adds a row); else the valid token with the
  largest kernel diagonal (relevance); else the first invalid one. Ties go to the lower index.

  The rows c_t are stored in blocks of `_row_block(budget)` rows, one `fori_loop` per block:
  step i's projection sum_t c_t[j] c_t reads only the blocks written so far (the finished ones
  and the current one), not all K rows, most of them still zero: ~(1 + 1/blocks) / 2 of the
  memory traffic of the K x N matrix-vector product, which dominates the steps (the finished
  blocks are read-only constants of the later loops, so no row slice is copied).
  """
  n = rel.shape[0]
  quality = rel * rel * diag  # the kernel's diagonal: the official initial d2
  floor = tol * jnp.where(valid, quality, 0.0).max()

  def body(i, state, done, first):
    c, d2, taken, picks = state
    free = valid & ~taken
    live = free & (d2 > floor)
    j = jnp.where(live.any(), jnp.argmax(jnp.where(live, d2, -jnp.inf)),
                  jnp.where(free.any(), jnp.argmax(jnp.where(free, quality, -jnp.inf)),
                            jnp.argmin(taken)))
    add = live[j]
    kernel_row = rel[j] * rel * row(j)
    proj = jnp.einsum("t,tn->n", c[:, j], c)
    for block in done:
      proj = proj + jnp.einsum("t,tn->n", block[:, j], block)
    e = (kernel_row - proj) / jnp.sqrt(jnp.where(add, d2[j], 1.0))
    e = jnp.where(add, e, 0.0)
    return (c.at[i - first].set(e), d2 - e * e, taken.at[j].set(True),
            picks.at[i].set(j.astype(jnp.int32)))

  # Built from `valid` so that under vmap every buffer carries the batch (and its sharding on
  # Explicit mesh axes: indexing an unbatched buffer with batched indices is refused there).
  none = valid[:1] & False
  d2, taken, picks = quality, jnp.zeros((n,), bool) | none, jnp.zeros((budget,), jnp.int32) + none
  rows = _row_block(budget)
  done = []
  for first in range(0, budget, rows):
    last = min(first + rows, budget)
    c = jnp.where(none[None], 1.0, jnp.zeros((last - first, n), jnp.float32))
    step = functools.partial(body, done=tuple(done), first=first)
    c, d2, taken, picks = jax.lax.fori_loop(first, last, step, (c, d2, taken, picks))
    done.append(c)
  return picks


def _row_block(budget: int) -> int:
  """Rows per block of `greedy_map`'s Cholesky rows: K / 8, at least 64 (each block is a loop of
  its own; at K = 1024 on CPU 8 blocks took 0.6x the time of 1, 4 blocks 0.7x)."""
  return max(64, -(-budget // 8))


@register("cdpruner", family="cross_modal", stages=("post_proj", "llm"),
          needs=("text", "text_mask"),
          paper="CDPruner, Zhang et al., arXiv 2506.10967 (NeurIPS 2025)")
def cdpruner(tokens, budget, *, text=None, text_mask=None, sign="negative", normalize="example",
             theta=None, cache_gram=None):
  """Keep the `budget` tokens of the greedy MAP of a DPP conditioned on the instruction.

  Args:
    tokens: N visual tokens; official: the projected tokens (post_proj).
    budget: tokens kept (official `--visual_token_num`, e.g. 64 / 128 / 192 of 576).
    text: float[B, T, D] instruction embeddings in the tokens' space (the prompt's Gemma
      embeddings after the projector).
    text_mask: bool[B, T], False marks text padding.
    sign: "negative" (official code: negated cosine) or "positive" (the paper's wording).
    normalize: relevance min-max per "example" (default) or over the whole "batch" (literal).
    theta: None (official) or a float in [0, 1): relevance exp(theta / (2 (1 - theta)) r).
    cache_gram: keep the N x N similarity (True), recompute a row per step (False), or None:
      when N <= GRAM_MAX_TOKENS. Same selection up to float rounding.

  Returns:
    `budget` tokens in raster order (padding last), original positions in `pos`.
  """
  name = "cdpruner"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  b, n, d = tokens.x.shape
  text = P.check_array(text, "text", name, (b, None, d))
  text_mask = P.check_array(text_mask, "text_mask", name, (b, text.shape[1]),
                            floating=False).astype(bool)
  if sign not in ("negative", "positive"):
    raise ValueError(f"{name}: sign must be 'negative' or 'positive', got {sign!r}")
  if normalize not in ("example", "batch"):
    raise ValueError(f"{name}: normalize must be 'example' or 'batch', got {normalize!r}")
  if theta is not None and (isinstance(theta, bool) or not isinstance(theta, (int, float))
                            or not 0.0 <= theta < 1.0):
    raise ValueError(f"{name}: theta must be None or a number in [0, 1), got {theta!r}")
  if cache_gram is not None and not isinstance(cache_gram, bool):
    raise ValueError(f"{name}: cache_gram must be None, True or False, got {cache_gram!r}")
  xn = P.l2_normalize(tokens.x)
  valid = tokens.mask & jnp.all(jnp.isfinite(xn), -1)
  rel, ok = conditional_relevance(tokens.x, text, text_mask, valid, sign=sign,
                                  normalize=normalize, theta=theta)
  chex.assert_shape([rel, ok], (b, n))
  valid = valid & ok
  xn = jnp.where(valid[..., None], xn, 0.0)  # invalid tokens: zero rows of S, never in a row
  use_gram = n <= GRAM_MAX_TOKENS if cache_gram is None else cache_gram

  def one(x1, r1, v1):
    if use_gram:
      s = P.gram(x1)
      return greedy_map(lambda j: s[j], jnp.diagonal(s), r1, v1, budget)
    row = lambda j: jnp.einsum("nd,d->n", x1, x1[j], preferred_element_type=jnp.float32)
    return greedy_map(row, jnp.einsum("nd,nd->n", x1, x1), r1, v1, budget)

  chunks = 1
  if jax.default_backend() == "cpu":
    # One example at a time on CPU: its Cholesky rows (K x N) stay in cache across the steps
    # (N = 1024: 127 -> 68 ms per call at batch 4; N = 4096: 5.2 -> 4.0 s).
    shards = batch_shards(tokens.mask)
    chunks = b // shards if b % shards == 0 else 1
  idx = map_batch(jax.vmap(one), (xn, rel, valid), chunks)
  # Raster order, padding picked (budget > valid tokens) after the real tokens.
  real = jnp.take_along_axis(tokens.mask, idx, axis=1)
  return P.gather(tokens, jnp.sort(jnp.where(real, idx, idx + n), axis=-1) % n)
