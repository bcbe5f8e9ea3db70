"""SparseVLM: text-guided visual-token sparsification inside the decoder, v1.5 and v2.0.

Zhang et al., "SparseVLM: Visual Token Sparsification for Efficient Vision-Language Model
Inference", arXiv 2410.04417 (ICML 2025), and v2.0, "SparseVLM+" (same arXiv id). Official code:
Gumpest/SparseVLMs, `llava/model/language_model/modelling_sparse_llama.py` and `score.py` (branch
v1.5; on main, v1.5 unless `USE_VERSION=2_0`).

Axis legend: B batch, N visual tokens, T text rows, H attention heads, D features, K tokens kept
by score, R recycled tokens, C clusters of recycled tokens.

The official algorithm, followed here (the decoder serves what the registration declares:
`llm_rows=text_raters`, and the schedule `SCHEDULE` at the end of this file):
  Raters, once, from the decoder's input embeddings (`text_raters`): raw dot products of the
  visual and text embeddings, softmax over the text, mean over the visual tokens; the text
  tokens above the mean rate (`primitives.above_mean_raters`).
  At each sparse layer l (official `pruning_loc` [2, 6, 15] of a 32-layer LLaMA) the layer runs
  on every token (its KV cache keeps them all); then, from its attention probabilities P:
    v1.5: s = P averaged over the heads, then over the rater rows, at the visual columns.
    v2.0: P is divided elementwise by the RoPE-only logits G (all-ones queries and keys rotated
      to the same positions, / sqrt(head_dim): "attention gravity correction"), the `heads`
      (official 14) heads with the largest rater-to-visual mass of P / G are kept ("priority
      heads"), and s is their mean, then the mean over the rater rows.
    The K = min(list value, N - 1) visual tokens with the highest s stay (the official lists
    per retained budget: `OFFICIAL_SCORED`; `kept_by_score`).
    v1.5 only, token recycling: of the N - K deleted tokens, the R = int(0.3 (N - K)) + 1 with
    the highest s are clustered by DPC-KNN (the C nearest neighbours set the density,
    `dpc_knn.dpc_centres`) into C = int(R / 10) + 1 tokens, the plain means of their hidden
    states after layer l, which join the visual tokens (`recycled`, `output_size`).
  Positions: official v1.5 renumbers the survivors 0..n-1 (`position_ids` cut to the kept length)
    and decodes every layer at its own cache length (`get_usable_length`); v2.0 keeps the
    original ones (`batch_index_select(position_ids, ...)`). The plan's schedule follows the
    version by default (`positions`: "reindex" for v1.5, "original" for v2.0; either can be
    asked for; `official_positions`).

In tcjax a step is a hook at the input of decoder layer l + 1 whose signals come from layer l
(attn_from="prev"): the official `pruning_loc` l is the plan's layer l + 1, so [2, 6, 15] is
`layers=(3, 7, 16)` (`OFFICIAL_LAYERS`). The plan's `sparsevlm` schedule (`tcjax.nn.plan`) takes
`budgets` as the official lists do (tokens kept by score, recycled clusters on top) and hands
each step `scored`; called directly, `budget` is the number of tokens out.

Not followed (static shapes, batches, the Tokens contract):
  - recycled tokens sit at their centre's raster position, not after the kept tokens in centre
    order; each takes its centre's RoPE position (renumbered with the others under v1.5's
    "reindex", so its number is its rank in raster order, not after the kept tokens);
  - priority heads are chosen per example (the official code chooses them from the first
    example of the batch, written for batch 1);
  - density ties go to the lower index (the official code adds U(0, 1) * 1e-6 noise; the `rng`
    signal restores it).
Padding visual tokens (mask False) are never kept while valid ones remain and never recycled;
padding rater rows (`text_mask` False) never count. NaN scores rank last.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from tcjax.compress import primitives as P
from tcjax.compress.dpc_knn import dpc_centres, pairwise_distance
from tcjax.compress.registry import register, register_schedule

VERSIONS = ("v1.5", "v2.0")
# Official tokens kept by score at pruning_loc [2, 6, 15], per retained budget (`score.py`;
# the budget is the average visual-token count over LLaVA-1.5-7B's 32 layers).
OFFICIAL_SCORED = {
    "v1.5": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "v2.0": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
OFFICIAL_LAYERS = (3, 7, 16)  # pruning_loc [2, 6, 15] + 1: the plan's layers


def kept_by_score(n: int, value: int) -> int:
  """Tokens kept by score out of `n` for a list value: min(value, n - 1), as the official code
  (a step always deletes at least one token)."""
  return max(0, min(value, n - 1))


def recycled(n: int, scored: int) -> Tuple[int, int]:
  """(R recycled, C clusters) of v1.5's rule when `scored` of `n` tokens stay by score."""
  deleted = n - scored
  if deleted <= 0:
    return 0, 0
  r = int(deleted * 0.3) + 1  # the official top 30 % (+ 1) of the deleted
  return r, r // 10 + 1


def output_size(n: int, scored: int, version: str) -> int:
  """Visual tokens after one step: the `scored` kept by score, plus v1.5's recycled clusters."""
  return scored + (recycled(n, scored)[1] if version == "v1.5" else 0)


def scored_for(n: int, budget: int, version: str) -> int:
  """The count kept by score that gives `budget` tokens out of `n` (v1.5: the largest, when two
  counts give the same total). ValueError when none does."""
  if version != "v1.5":
    return budget
  for k in range(min(budget, n), -1, -1):
    if output_size(n, k, version) == budget:
      return k
  lowest = output_size(n, 0, version)
  raise ValueError(f"sparsevlm: budget {budget} is not reachable with v1.5's recycling from "
                   f"{n} tokens (at least {lowest} come out)")


def text_raters(x_img, x_text, text_mask, img_mask) -> jax.Array:
  """bool[B, T]: SparseVLM's raters from the decoder's input embeddings x_img float[B, N, E] and
  x_text float[B, T, E] (raw dot products, as the official code); text_mask / img_mask: the
  valid text rows (prompt, not padding) and visual tokens."""
  x_text = jnp.where(text_mask[..., None], x_text, 0.0)
  s = jnp.einsum("bnd,btd->bnt", x_img.astype(jnp.float32), x_text.astype(jnp.float32))
  return P.above_mean_raters(s, text_mask, img_mask)


def _rows_mean(a, rows):
  """float32[B, N]: mean of `a: float[B, T, N]` over the rows marked by `rows: bool[B, T]`."""
  w = rows.astype(jnp.float32)
  total = jnp.einsum("bt,btn->bn", w, jnp.where(rows[..., None], a, 0.0))
  return total / jnp.maximum(w.sum(1), 1.0)[:, None]


def _scores(tokens, name, version, text_mask, attn, attn_heads, rope_logits, heads):
  """float32[B, N] SparseVLM's score of each visual token. Every signal given is checked, also
  those the version does not read."""
  b, n, _ = tokens.x.shape
  if version == "v1.5":
    attn = P.check_array(attn, "attn", name, (b, None, n)).astype(jnp.float32)
    t = attn.shape[1]
  else:
    t = P.check_array(attn_heads, "attn_heads", name, (b, None, None, n)).shape[2]
  if attn is not None:
    attn = P.check_array(attn, "attn", name, (b, t, n)).astype(jnp.float32)
  if attn_heads is not None:
    ha = P.check_array(attn_heads, "attn_heads", name, (b, None, t, n)).astype(jnp.float32)
  if version == "v2.0" or rope_logits is not None:
    g = P.check_array(rope_logits, "rope_logits", name, (b, t, n)).astype(jnp.float32)
  rows = jnp.ones((b, t), bool) if text_mask is None else P.check_array(
      text_mask, "text_mask", name, (b, t), floating=False).astype(bool)
  if version == "v1.5":
    return _rows_mean(attn, rows)
  corrected = ha / g[:, None]  # [B, H, T, N] attention gravity correction
  live = rows[:, None, :, None] & tokens.mask[:, None, None, :]
  mass = jnp.where(live, corrected, 0.0).sum((2, 3))  # [B, H] rater-to-visual mass per head
  _, idx = jax.lax.top_k(mass, min(heads, ha.shape[1]))
  chosen = jnp.take_along_axis(corrected, idx[:, :, None, None], axis=1).mean(1)  # [B, T, N]
  return _rows_mean(chosen, rows)


# In the decoder, `text_mask` holds the prompt rows that are raters: the model calls `text_raters`
# once on its input embeddings (`llm_rows`) and restricts the prompt rows to them at every step.
@register("sparsevlm", family="cross_modal", stages=("llm",), needs=("attn",),
          paper="SparseVLM v1.5 / v2.0 (SparseVLM+), Zhang et al., arXiv 2410.04417 (ICML 2025)",
          llm_rows=text_raters)
def sparsevlm(tokens, budget, *, attn=None, text_mask=None, attn_heads=None, rope_logits=None,
              rng=None, version="v1.5", heads=14, scored=None):
  """One SparseVLM step on the visual tokens entering a decoder layer.

  Args:
    tokens: N visual tokens; x holds the hidden states after the scoring layer (the recycled
      tokens average them).
    budget: tokens out: the kept tokens plus (v1.5) the recycled clusters.
    attn: float[B, T, N] head-mean attention of T text rows to the visual tokens (v1.5).
    text_mask: optional bool[B, T], the rater rows (the plan passes the valid prompt rows that
      are raters); None: every row rates.
    attn_heads: float[B, H, T, N] the same attention per head (v2.0).
    rope_logits: float[B, T, N] the RoPE-only logits at the same rows and columns (v2.0).
    rng: optional PRNG key: the official density noise of the recycling clusters.
    version: "v1.5" (official default) or "v2.0" (SparseVLM+).
    heads: v2.0's priority heads (official 14), clipped to H.
    scored: tokens kept by score; None: derived from `budget` (`scored_for`).

  Returns:
    `budget` tokens in raster order; recycled clusters carry their members (`size`, `src`).
  """
  name = "sparsevlm"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  if version not in VERSIONS:
    raise ValueError(f"{name}: version must be one of {VERSIONS}, got {version!r}")
  if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
    raise ValueError(f"{name}: heads must be a positive int, got {heads!r}")
  b, n, _ = tokens.x.shape
  if scored is None:
    scored = scored_for(n, budget, version)
  if isinstance(scored, bool) or not isinstance(scored, int) or not 0 <= scored <= n \
      or output_size(n, scored, version) != budget:
    raise ValueError(f"{name}: scored={scored!r} of {n} tokens gives "
                     f"{output_size(n, scored, version) if isinstance(scored, int) else '?'} "
                     f"tokens ({version}), not budget={budget}")
  s = _scores(tokens, name, version, text_mask, attn, attn_heads, rope_logits, heads)
  r, c = recycled(n, scored) if version == "v1.5" else (0, 0)
  if c == 0:
    return P.select_top(tokens, s, budget)
  key = P.rank_key(s, tokens.mask)
  _, order = jax.lax.top_k(key, n)  # descending score, ties to the lower index
  order = order.astype(jnp.int32)
  kept, rec = order[:, :scored], order[:, scored:scored + r]  # [B, K], [B, R]
  rec_ok = jnp.take_along_axis(tokens.mask, rec, 1)
  x_rec = jnp.take_along_axis(tokens.x, rec[..., None], 1)
  noise = None if rng is None else jax.random.uniform(P.check_rng(rng, name), (b, r)) * 1e-6

  def plan(kept, rec, x, ok, nz):
    """One example: the slot of every token (kept: [0, K), recycled: K + its cluster, else -1)
    and the representative of every slot."""
    dist = pairwise_distance(x)  # [R, R]
    centres = dpc_centres(dist, ok, c, c, nz)  # the official density uses C neighbours
    d = jnp.where(ok[centres][:, None], dist[centres], jnp.inf)  # [C, R]
    slot = jnp.argmin(d, 0).astype(jnp.int32)
    own = jnp.full((r,), -1, jnp.int32).at[centres].set(jnp.arange(c, dtype=jnp.int32))
    slot = jnp.where(ok, jnp.where(own >= 0, own, slot), -1)
    assign = jnp.full((n,), -1, jnp.int32).at[kept].set(jnp.arange(scored, dtype=jnp.int32))
    assign = assign.at[rec].set(jnp.where(slot >= 0, scored + slot, -1))
    return assign, jnp.concatenate([kept, rec[centres]])

  if noise is None:
    assign, rep = jax.vmap(lambda *a: plan(*a, None))(kept, rec, x_rec, rec_ok)
  else:
    assign, rep = jax.vmap(plan)(kept, rec, x_rec, rec_ok, noise)
  out = P.merge(tokens, assign, rep)
  ones = tokens.replace(size=jnp.where(tokens.mask, 1.0, 0.0))  # official: plain means
  out = out.replace(x=P.merge(ones, assign, rep).x)
  return P.sort_by_position(out)


# ---- The plan's schedule: one step per listed layer (`compress.registry.register_schedule`). ----


def step_size(key: str, value, n: int, n_initial: int, options) -> Tuple[int, dict]:
  """(tokens out of the `n` present, {"scored": tokens kept by score}) for one step of the
  schedule: `value` is an official list value (key "budgets": the tokens kept by score, at most
  n - 1) or a fraction of `n` (key "keeps"); v1.5's recycled clusters come on top."""
  del n_initial  # each step sizes from the tokens present
  count = value if key == "budgets" else max(1, int(round(value * n)))
  scored = kept_by_score(n, count)
  out = output_size(n, scored, options["version"])
  if out < 1:
    raise ValueError(f"keeps no token of {n}")
  return out, {"scored": scored}


def step_signals(options) -> Tuple[str, ...]:
  """The rater rows' head-mean attention (v1.5); v2.0 also per head and the RoPE-only logits."""
  return ("attn", "text_mask") + (("attn_heads", "rope_logits") if options["version"] == "v2.0"
                                  else ())


def official_positions(options) -> str:
  """v1.5 renumbers the survivors (`position_ids` cut to the kept length) and decodes every
  layer at its cache length; v2.0 keeps their positions (`batch_index_select(position_ids,
  ...)`), both in `modelling_sparse_llama.py`."""
  return {"v1.5": "reindex", "v2.0": "original"}[options["version"]]


SCHEDULE = register_schedule(
    "sparsevlm", step="sparsevlm", sizes={"budgets": "count", "keeps": "fraction"},
    size=step_size, options=("version", "heads"), signals=step_signals, attn_from="prev",
    positions=official_positions, paper="SparseVLM, arXiv 2410.04417: steps at pruning_loc + 1")
