"""Temporal token merging across video frames (DyCoke-style TTM, generic temporal merging).

DyCoke: Tao et al., "DyCoke: Dynamic Compression of Tokens for Fast Video Large Language
Models", arXiv 2411.15024, CVPR 2025 (official code: KD-TAO/DyCoke); and the generic
temporal-token-merging baseline (FrameFusion arXiv 2501.01986 / PruneVid arXiv 2412.16117
average static tokens over time).

Axis legend: B batch, T frames, L = h * w locations per frame, N = T * L tokens, D features.

Algorithm (static shapes, exact output count):
  1. Novelty of token (t, l) for t >= 1: s = cos(x[t, l], x[t-1, l]), the same grid location in
     the previous frame (DyCoke's pairwise comparison of adjacent frames). Frame 0 is the anchor
     and is always kept (as in DyCoke, where the first frame of a window stays whole).
  2. Kept: frame 0 plus the `budget - L` least similar later tokens (DyCoke keeps a fixed number
     of least-similar tokens per frame; here the budget is shared by all frames), but never a
     token with s >= `threshold`: a near-repeat is always merged. When fewer tokens qualify, the
     output is padded (fixed capacity `budget`, mask False) and `out.count()` reports the
     effective count.
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


def temporal_similarity(x: jax.Array, grid) -> jax.Array:
  """float32[T, L]: cosine similarity of every token of one example (`x: float[N, D]`) to the
  same location one frame earlier; frame 0 (no predecessor) gets -inf."""
  t, h, w = grid
  xn = P.l2_normalize(x).reshape(t, h * w, x.shape[-1])
  s = jnp.einsum("tld,tld->tl", xn[1:], xn[:-1])
  return jnp.concatenate([jnp.full((1, h * w), -jnp.inf, jnp.float32), s], axis=0)


@register("temporal_merge", family="merging", stages=("post_vit", "post_proj"),
          paper="DyCoke TTM, Tao et al., arXiv 2411.15024 (CVPR 2025); generic temporal merging")
def temporal_merge(tokens, budget, *, threshold=0.9, merge=True):
  """Keep frame 0 and the `budget - h*w` most novel later tokens; merge the rest back in time.

  Args:
    tokens: raw video tokens (`Tokens.from_video`, grid (T, h, w) with T >= 2, N == T*h*w).
    budget: output capacity, at least h * w (frame 0 is always kept).
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
  t, h, w = P.check_grid_tokens(tokens, name)
  if t < 2:
    raise ValueError(f"{name}: needs video tokens with at least 2 frames "
                     f"(Tokens.from_video), got grid {tokens.grid}")
  loc = h * w
  if budget < loc:
    raise ValueError(f"{name}: budget must be at least one frame (h*w = {loc}) since frame 0 is "
                     f"always kept, got {budget}")
  n = tokens.num_tokens

  def plan(x, mask):
    """Slot of every token (-1 dropped) and representative of every slot, one example."""
    sim = temporal_similarity(x, tokens.grid)  # [T, L]
    novelty = -sim
    if threshold is not None:
      novelty = jnp.where(sim >= threshold, jnp.nan, novelty)  # repeats rank as NaN: -inf
    key = P.rank_key(novelty.reshape(n), mask)
    _, idx = jax.lax.top_k(key, budget)
    kept = jnp.zeros((n,), bool).at[idx].set(key[idx] > -jnp.inf)
    # Slot of a kept token = its rank in raster order (the tokens are the raw grid, so token
    # order is raster order); the representative of slot k is the k-th kept token.
    slot = jnp.cumsum(kept, dtype=jnp.int32) - 1
    rep = jnp.zeros((budget,), jnp.int32).at[jnp.where(kept, slot, budget)].set(
        jnp.arange(n, dtype=jnp.int32), mode="drop")
    if not merge:
      return jnp.where(kept, slot, -1), rep
    # Temporal neighbour: the latest kept frame at the same location, at or before this one.
    frame = jnp.arange(t, dtype=jnp.int32)[:, None]
    anchor_t = jax.lax.cummax(jnp.where(kept.reshape(t, loc), frame, -1), axis=0)
    anchor = (anchor_t * loc + jnp.arange(loc, dtype=jnp.int32)[None, :]).reshape(n)
    return jnp.where(anchor >= 0, slot[jnp.maximum(anchor, 0)], -1), rep

  assign, rep = jax.vmap(plan)(tokens.x, tokens.mask)
  return P.merge(tokens, assign, rep)
