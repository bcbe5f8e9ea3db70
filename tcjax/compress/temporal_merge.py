"""Temporal token merging across video frames (DyCoke-style TTM, generic temporal merging).

DyCoke: Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language
Models", arXiv 2411.15024, CVPR 2025 (official code: KD-TAO/DyCoke); and the generic
temporal-token-merging baseline (FrameFusion arXiv 2501.01986 / PruneVid arXiv 2412.16117
average static tokens over time).

Axis legend: B batch, T frames, L = h * w locations per frame, N = T * L tokens, D features.

Algorithm (static shapes, exact output count):
  1. Novelty of a token at grid location (r, c) of frame t >= 1: s = cos(x, x'), x' the token
     at the same location (r, c) one frame earlier (DyCoke's pairwise comparison of adjacent
     frames). Locations are read from `pos`, so the raw patch grid and a per-frame pooled grid
     (`pool` first: each token sits at its window's top-left patch) work alike. A token with no
     predecessor (frame 0, or a location absent from the previous frame) is an anchor and is
     always kept, as DyCoke keeps the first frame of a window whole.
  2. Kept: the anchors plus the `budget - anchors` least similar other tokens (DyCoke keeps a
     fixed number of least-similar tokens per frame; here the budget is shared by all frames),
     but never a token with s >= `threshold`: a near-repeat is always merged. When fewer tokens
     qualify, the output is padded (fixed capacity `budget`, mask False) and `out.count()`
     reports the effective count.
  3. Every other token is merged into the kept token at the same location in the nearest
     earlier frame (its temporal neighbour): size-weighted mean of features, sizes added, the
     kept token's position. DyCoke drops instead of averaging; `merge=False` does that.
So a clip whose frames repeat exactly keeps one copy of the static content (frame 0), each
token carrying the T patches of its location.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tcjax.compress import primitives as P
from tcjax.compress.registry import register


def temporal_neighbours(pos: jax.Array, mask: jax.Array, grid):
  """For one example (`pos: int[N, 3]`, `mask: bool[N]`): (lin int32[N] each token's location
  (frame, row, col) as an index into the T * h * w patches; table int32[T * h * w] location ->
  token, -1 where no valid token sits; pred int32[N] the token at the same (row, col) one frame
  earlier, -1 for anchors). O(T * h * w) memory, no N x N comparison."""
  t, h, w = grid
  n = pos.shape[0]
  lin = ((pos[:, 0] * h + pos[:, 1]) * w + pos[:, 2]).astype(jnp.int32)
  table = jnp.full((t * h * w,), -1, jnp.int32).at[jnp.where(mask, lin, t * h * w)].set(
      jnp.arange(n, dtype=jnp.int32), mode="drop")
  pred = jnp.where((pos[:, 0] > 0) & mask, table[jnp.maximum(lin - h * w, 0)], -1)
  return lin, table, pred


@register("temporal_merge", family="merging", stages=("post_vit", "post_proj"),
          paper="DyCoke TTM, Tao et al., arXiv 2411.15024 (CVPR 2025); generic temporal merging")
def temporal_merge(tokens, budget, *, threshold=0.9, merge=True):
  """Keep the anchors (frame 0) and the most novel later tokens; merge the rest back in time.

  Args:
    tokens: video tokens (grid (T, h, w), T >= 2) in raster order: the raw grid
      (`Tokens.from_video`) or a per-frame pooled one (`pool` first).
    budget: output capacity, at least N / T (frame 0 of a regular grid is kept whole; with an
      irregular layout, anchors beyond the budget are dropped with their location's mass).
    threshold: cosine similarity to the previous frame at or above which a token is always
      merged (a repeat), whatever the budget; None disables it (exactly `budget` valid tokens).
      A NaN similarity counts as a repeat.
    merge: True merges non-kept tokens into their temporal neighbour (size-weighted, mass
      conserved); False drops them, as DyCoke's TTM does.

  Returns:
    `budget` tokens in raster order, valid first, then padding.
  """
  name = "temporal_merge"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  t, h, w = tokens.grid
  n = tokens.num_tokens
  if t < 2:
    raise ValueError(f"{name}: needs video tokens with at least 2 frames "
                     f"(Tokens.from_video), got grid {tokens.grid}")
  if budget < n // t:
    raise ValueError(f"{name}: budget must be at least one frame's share ({n // t} tokens) "
                     f"since frame 0 is always kept, got {budget}")

  def plan(x, pos, mask):
    """Slot of every token (-1 dropped) and representative of every slot, one example."""
    lin, table, pred = temporal_neighbours(pos, mask, tokens.grid)
    xn = P.l2_normalize(x)
    sim = jnp.einsum("nd,nd->n", xn, xn[jnp.maximum(pred, 0)])
    sim = jnp.where(pred >= 0, sim, -jnp.inf)  # anchors: never similar, always kept
    novelty = -sim
    if threshold is not None:
      novelty = jnp.where(sim >= threshold, jnp.nan, novelty)  # repeats rank as NaN: -inf
    key = P.rank_key(novelty, mask)
    _, idx = jax.lax.top_k(key, budget)
    kept = jnp.zeros((n,), bool).at[idx].set(key[idx] > -jnp.inf)
    # Slot of a kept token = its rank in token (raster) order; slot k's representative is the
    # k-th kept token.
    slot = jnp.cumsum(kept, dtype=jnp.int32) - 1
    rep = jnp.zeros((budget,), jnp.int32).at[jnp.where(kept, slot, budget)].set(
        jnp.arange(n, dtype=jnp.int32), mode="drop")
    if not merge:
      return jnp.where(kept, slot, -1), rep
    # Temporal neighbour: the latest kept frame at the same location, at or before this one.
    kept_at = jnp.where(table >= 0, kept[jnp.maximum(table, 0)], False).reshape(t, h * w)
    frame = jnp.arange(t, dtype=jnp.int32)[:, None]
    anchor_t = jax.lax.cummax(jnp.where(kept_at, frame, -1), axis=0).reshape(-1)  # [M]
    a_t = anchor_t[lin]
    anchor = table[jnp.maximum(a_t, 0) * (h * w) + lin % (h * w)]
    return jnp.where((a_t >= 0) & mask, slot[jnp.maximum(anchor, 0)], -1), rep

  assign, rep = jax.vmap(plan)(tokens.x, tokens.pos, tokens.mask)
  return P.merge(tokens, assign, rep)
