"""FrameFusion: merge tokens that repeat the same location of the previous frame, then prune by
importance.

Fu et al., "FrameFusion: Combining Similarity and Importance for Video Token Reduction on Large
Vision Language Models", arXiv 2501.01986, ICCV 2025 (official code: thu-nics/FrameFusion,
`framefusion/main.py`: `FrameFusion.forward`, `compute_similarity_and_token_index_by_patch`,
`merge_tokens_and_get_mask`, `_compute_pruning_ratio`; the decoder hooks in
`framefusion/models/qwen2/modeling_qwen2.py`).

Axis legend: B batch, N tokens, D features, T frames, L = h * w locations per frame.

The official method acts inside the decoder. Its first call, before the attention of layer 0,
merges the tokens entering the decoder; each later call, after the attention of layers 0, 1, ...,
merges again while the merged share stays >= `ratio_lower_bound` (0.1); the call after merging
stops prunes once, by the attention of the last query row (mean over heads) of the layer that
just ran. A cost model sets the bounds: `pruning_ratio`.

What this method does, at post_proj (the tokens entering the decoder, where the official first
call acts):
  1. Similarity (official). A token's similarity is its cosine with the previous token of the
     same location (the latest earlier frame that has a token at its (row, col)); the first
     token of a location has none and is never merged.
  2. Merge (official first call). Tokens with similarity >= `similarity_lower_bound` are merged,
     at most the bound's number of them (the most similar ones, as the official top-k branch).
     The bound is `N - budget` by default: the official bound for cost = budget / N, which
     spends the same average number of tokens per decoder layer as the budget does here; with
     `cost` given it is the official one, int((1 - cost) * N). A run of merged tokens at one
     location joins the unmerged token before it (size-weighted mean: on raw tokens the
     official plain mean sum / (run + 1)), which keeps its position.
  3. Prune (official signal replaced). When more than `budget` tokens remain, the `budget` with
     the highest `scores` are kept (a merged token has its representative's score), in order.

How it differs from the official code, and why:
  - One merge step. The later merge calls act on hidden states after attention inside the
    decoder, and tcjax's decoder hooks only select (a merge at the llm stage is refused:
    `gemma.kept_indices`). They would need a model change; none is made here.
  - Pruning signal. The official importance is decoder attention, which does not exist before
    the decoder; `scores` here is what the model provides at post_proj, the attention each patch
    receives in the ViT signal layer. For the official signal, merge here without pruning and
    prune in the decoder with FastV's last-row attention (the same signal: the last prompt
    row, mean over heads, of the layer before the pruning step, on the merged sequence):
        (("post_proj", {"method": "framefusion", "keep": 1.0, "cost": 0.3}),
         ("llm", {"method": "fastv", "layer": 1, "budget": b}))
    equals the official run whose merging stops after its first call (merged share below 0.1),
    up to the pruned count: the official's comes from the cost model (data-dependent, see
    `pruning_ratio`), the plan's is the static `b` (and the official skips pruning when its
    merge hit the bound).
  - Positions. The official keeps each token's original RoPE position; tcjax's decoder numbers
    the tokens that reach it contiguously, as for every method acting before it. `pos` keeps
    the origin.
  - Budget. The official is driven by `cost` (a FLOPs share, `num_layers=28` hard-coded); here
    the budget is the token count (the contract), `cost` only bounds the merge.
  - Official quirks not kept: its top-k branch can pick the -2 similarity of a location's first
    token and merge it into another location; here only real candidates merge. Merging is
    size-weighted (the official counts an already merged token as one); both agree on raw tokens.
    Batches of any size (the official asserts batch 1). LLaVA-Video's newline tokens have no
    counterpart in PaliGemma.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from tcjax.compress import primitives as P
from tcjax.compress.registry import register


def pruning_ratio(sparsities: Sequence[float], cost: float, num_layers: int = 28) -> float:
  """The official cost model: the sparsity of the layers left after the merge steps.

  Args:
    sparsities: the share of tokens each merge step removed, in order (each step counts as one
      layer; the official's layer 0 merges twice, before and after its attention).
    cost: the average share of tokens per decoder layer to spend (official 0.3).
    num_layers: decoder layers (the official hard-codes 28, Qwen2-7B's).

  Returns:
    s such that keeping 1 - s of the tokens in the remaining layers spends `cost` on average;
    0 when no pruning is needed.

  Raises:
    ValueError when the merge steps alone already spend more than `cost` (the official's
    "The cost is too small").
  """
  kept, spent = 1.0, 0.0
  for s in sparsities:
    kept *= 1 - s
    spent += kept
  remain = num_layers * cost - spent
  if remain < 0:
    raise ValueError(f"framefusion: cost {cost} is too small for the merge steps {sparsities}")
  share = remain / ((num_layers - len(sparsities)) * kept)
  return 0.0 if share > 1 else 1 - share


def previous_at_location(pos: jax.Array, mask: jax.Array, grid):
  """For one example (`pos: int[N, 3]`, `mask: bool[N]`): (table int32[T, L] location ->
  token, -1 where no valid token sits; frame, loc int32[N] of each token; pred int32[N] the
  token at the same location in the latest earlier frame that has one, -1 if none)."""
  t, h, w = grid
  n = pos.shape[0]
  frame, loc = pos[:, 0], pos[:, 1] * w + pos[:, 2]
  table = jnp.full((t * h * w,), -1, jnp.int32).at[
      jnp.where(mask, frame * h * w + loc, t * h * w)].set(
          jnp.arange(n, dtype=jnp.int32), mode="drop").reshape(t, h * w)
  prev = latest_frame(table >= 0, inclusive=False)
  pf = prev[frame, loc]
  pred = jnp.where(mask & (pf >= 0), table[jnp.maximum(pf, 0), loc], -1)
  return table, frame, loc, pred


def latest_frame(flags: jax.Array, inclusive: bool) -> jax.Array:
  """int32[T, L]: for each (frame, location), the latest frame at or before it (`inclusive`) or
  before it whose flag is set at that location, -1 if none. flags: bool[T, L]."""
  t = flags.shape[0]
  frames = jnp.arange(t, dtype=jnp.int32)[:, None]
  latest = jax.lax.cummax(jnp.where(flags, frames, -1), axis=0)
  if inclusive:
    return latest
  return jnp.concatenate([jnp.full_like(latest[:1], -1), latest[:-1]], 0)


def _ranks(key: jax.Array) -> jax.Array:
  """int32[N] position of each entry in the stable ascending order of `key` (NaN last)."""
  order = P.argsort(key)
  return jnp.zeros(key.shape, jnp.int32).at[order].set(jnp.arange(key.shape[0], dtype=jnp.int32))


@register("framefusion", family="merging", stages=("post_proj",), needs=("scores",),
          paper="FrameFusion, Fu et al., arXiv 2501.01986 (ICCV 2025)")
def framefusion(tokens, budget, *, scores=None, similarity_lower_bound=0.6, cost=None):
  """Merge the tokens that repeat their location's previous token, then keep the `budget` most
  important (module docstring: the official first merge step and a pre-decoder pruning signal).

  Args:
    tokens: video tokens (grid (T, h, w), T >= 2) in raster order: the raw grid or any subset
      of it (a token's location is the (row, col) of its `pos`).
    budget: output capacity; at most `budget` tokens are kept.
    scores: float[B, N] importance for the pruning step (post_proj: the ViT attention each
      patch receives; official: decoder attention, see the module docstring); NaN ranks last.
    similarity_lower_bound: S_th, the cosine at or above which a token merges into its
      location's previous token (official README 0.6; the paper tunes it per model).
    cost: None (default): merge at most N - budget tokens (the official bound for cost =
      budget / N); a share in (0, 1]: the official first-call bound int((1 - cost) * N), N the
      valid tokens, e.g. 0.3 with `keep=1.0` to merge only and prune in the decoder.

  Returns:
    `budget` tokens in raster order, valid first; fewer valid ones (then padding) when merging
    leaves fewer than `budget`.
  """
  name = "framefusion"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  if tokens.grid[0] < 2:
    raise ValueError(f"{name}: needs video tokens with at least 2 frames "
                     f"(Tokens.from_video), got grid {tokens.grid}")
  scores = P.check_scores(tokens, scores, name)
  if isinstance(similarity_lower_bound, bool) or not isinstance(similarity_lower_bound,
                                                                (int, float)):
    raise ValueError(f"{name}: similarity_lower_bound must be a number, "
                     f"got {similarity_lower_bound!r}")
  if cost is not None and (isinstance(cost, bool) or not isinstance(cost, (int, float))
                           or not 0 < cost <= 1):
    raise ValueError(f"{name}: cost must be None or a share in (0, 1], got {cost!r}")
  n = tokens.num_tokens
  if cost is not None:  # the official int(u * N) for every valid count N, in double precision
    share = pruning_ratio((), cost)
    bounds = jnp.asarray([int(share * k) for k in range(n + 1)], jnp.int32)

  def one(x, pos, valid, s):
    """(slot of every token or -1, rep int32[budget]) of one example."""
    table, frame, loc, pred = previous_at_location(pos, valid, tokens.grid)
    xn = P.l2_normalize(x)
    sim = jnp.sum(xn * xn[jnp.maximum(pred, 0)], -1)
    candidate = (pred >= 0) & (sim >= similarity_lower_bound)  # NaN never merges
    n_valid = valid.sum()
    bound = n_valid - budget if cost is None else bounds[n_valid]
    # The `bound` most similar candidates merge (ties: the lower index).
    merged = candidate & (_ranks(jnp.where(candidate, -sim, jnp.nan)) < bound)
    # Each merged token joins the latest unmerged token at its location, at or before it.
    merged_at = jnp.zeros(table.shape, bool).at[jnp.where(valid, frame, table.shape[0]),
                                                loc].set(merged, mode="drop")
    target_frame = latest_frame((table >= 0) & ~merged_at, inclusive=True)[frame, loc]
    owner = jnp.where(merged, table[jnp.maximum(target_frame, 0), loc],
                      jnp.arange(n, dtype=jnp.int32))
    # Prune: the `budget` survivors with the highest scores (NaN and -inf last, ties: lower
    # index); merged tokens and padding after every survivor.
    survivor = valid & ~merged
    key = jnp.where(survivor, -jnp.where(jnp.isnan(s), -jnp.inf, s), jnp.nan)
    kept = survivor & (_ranks(key) < budget)
    slot = jnp.cumsum(kept, dtype=jnp.int32) - 1
    assign = jnp.where(valid & kept[owner], slot[owner], -1)
    rep = jnp.zeros((budget,), jnp.int32).at[jnp.where(kept, slot, budget)].set(
        jnp.arange(n, dtype=jnp.int32), mode="drop")
    return assign, rep

  assign, rep = jax.vmap(one)(tokens.x, tokens.pos, tokens.mask, scores)
  return P.merge(tokens, assign, rep)
