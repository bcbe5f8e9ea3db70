"""ToMe: token merging by bipartite soft matching, with size-weighted averages.

Bolya, Fu, Dai, Zhang, Feichtenhofer, Hoffman, "Token Merging: Your ViT but Faster",
arXiv 2210.09461, ICLR 2023 (official code: facebookresearch/ToMe, `tome/merge.py`,
`tome/patch/timm.py`, `tome/utils.py`).

Axis legend: B batch, N tokens in, Dk key features, Na / Nb tokens of set A / B, R merged.

One round (`bipartite_merge`, official `bipartite_soft_matching` + `merge_wavg`):
  1. Metric: the head-averaged keys, L2-normalised (float32).
  2. A = tokens at even positions, B = odd positions of the current order.
  3. Every A token's best match: max / argmax (first on ties) of its cosine to the B tokens.
  4. Stable descending sort of the A tokens by that best score: the first r are merged into
     their match (the sources), the rest stay (r <= (N - protected) // 2, at most half).
  5. Size-weighted average (`primitives.merge`): x = sum(size * x) / sum(size), size added;
     the merged token keeps the position of its B token. Output order: [unmerged A tokens in
     descending-score order, then all of B in B order] (the official "scrambled" order; with a
     protected class token the unmerged A tokens are re-sorted ascending, so it stays first).
The model then adds `attention_bias(tokens)` = log(size) to the attention logits of every later
block (proportional attention) and takes r per block from `r_schedule`.

Padding (mask False; the official code has none) is never merged into a valid token and a
valid token never into padding: a padding A token ranks before every real match (removing it
costs nothing) and is dropped; a padding B token is never a match. Only when a round must merge
a valid A token that has no valid B token to go to (padding or non-finite keys fill B) does
that token land on a padding B slot, which then becomes a valid token at the source's position.
NaN: a token with non-finite keys matches nothing (similarity -inf), ranks after every real
match (merged last; if it must be, into the first B token). Non-finite features never affect
matching and propagate into the one merged token that carries them, as in the official average.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from tcjax.compress import primitives as P
from tcjax.compress.registry import register
from tcjax.parallel.mesh import batch_shards, map_batch
from tcjax.tokens import Tokens

# Ranks of A tokens in the source sort (cosines are in [-1, 1]): padding first, unmatched last.
_PAD_RANK, _UNMATCHED_RANK = 2.0, -2.0
# Attention bias of padding keys: finite, so a row of padding keys stays NaN-free.
NEG_BIAS = -1e30

RSpec = Union[int, Tuple[int, float], Sequence[int]]


def _is_int(v) -> bool:
  return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def r_schedule(r: RSpec, depth: int) -> Tuple[int, ...]:
  """Tokens merged in each of `depth` blocks (official `parse_r`).

  Args:
    r: an int (the same r in every block); a tuple `(r, inflect)`: a linear ramp from
      `int(r * (1 - inflect))` in the first block to `2 * r - that` in the last (values
      truncated toward zero; inflect 0 is constant, -1 the paper's decreasing schedule 2r -> 0,
      +1 increasing 0 -> 2r); or a list of per-block values, padded with 0 to `depth`.
    depth: number of blocks.

  Returns:
    `depth` non-negative ints. Ramp values below 0 (|inflect| > 1) become 0, as the official
    merge does nothing for r <= 0. Each value is an upper bound: every block still clamps r to
    half its current tokens (`bipartite_merge`), so the tokens left never go below 1.
  """
  if not _is_int(depth) or depth < 1:
    raise ValueError(f"r_schedule: depth must be a positive int, got {depth!r}")
  if isinstance(r, list):
    if not all(_is_int(v) and v >= 0 for v in r):
      raise ValueError(f"r_schedule: r as a list must hold non-negative ints, got {r!r}")
    if len(r) > depth:
      raise ValueError(f"r_schedule: r lists {len(r)} values for depth {depth}")
    return tuple(int(v) for v in r) + (0,) * (depth - len(r))
  inflect = 0.0
  if isinstance(r, tuple):
    if len(r) != 2 or not isinstance(r[1], (int, float)) or isinstance(r[1], bool):
      raise ValueError(f"r_schedule: r as a tuple must be (r, inflect), got {r!r}")
    r, inflect = r
  if not _is_int(r) or r < 0:
    raise ValueError(f"r_schedule: r must be a non-negative int, (r, inflect) or a list, "
                     f"got {r!r}")
  first = int(r * (1.0 - inflect))
  last = 2 * r - first
  step = (last - first) / (depth - 1) if depth > 1 else 0.0
  return tuple(max(0, int(first + step * i)) for i in range(depth))


def merge_rounds(n: int, budget: int, class_token: bool = False) -> Tuple[int, ...]:
  """Static r of each round `tome` runs to go from `n` to `budget` tokens (at most half each)."""
  protected = int(bool(class_token))
  rounds = []
  while n > budget:
    r = min(n - budget, (n - protected) // 2)
    if r <= 0:
      raise ValueError(f"tome: budget {budget} is out of reach with a protected class token "
                       f"(a round cannot merge {n} tokens further); use budget >= 2")
    rounds.append(r)
    n -= r
  return tuple(rounds)


def attention_bias(tokens: Tokens) -> jax.Array:
  """float32[B, N] proportional-attention bias to add to the logits of every key.

  log(size) for valid tokens (a merged token counts as `size` copies of itself; 0 for raw
  tokens) and `NEG_BIAS` (-1e30, finite) for padding, so padding gets no attention.
  """
  P.check_tokens(tokens, "attention_bias")
  size = tokens.size.astype(jnp.float32)
  return jnp.where(tokens.mask, jnp.log(size), NEG_BIAS)


# Per-example score matrices above this many bytes (Na * Nb * 4) are built one example at a time
# on CPU (`map_batch`): a [B, Na, Nb] float32 matrix is written once and read twice (max, argmax),
# and one example's at a time is reused from the allocator rather than faulted in afresh.
_CPU_SCORES_BYTES = 1 << 20


def _best_match(metric_a, metric_b, vb):
  """(best float32[B, Na], dst int32[B, Na]): each A token's best cosine to a valid B token and
  the first B index that reaches it (-inf and 0 when there is none)."""
  def match(a, b, vb):
    scores = jnp.einsum("bid,bjd->bij", a, b, preferred_element_type=jnp.float32)  # [B, Na, Nb]
    scores = jnp.where(jnp.isnan(scores) | ~vb[:, None, :], -jnp.inf, scores)
    return scores.max(-1), jnp.argmax(scores, -1).astype(jnp.int32)  # first max on ties

  b, na, _ = metric_a.shape
  chunks = 1
  if jax.default_backend() == "cpu" and 4 * na * metric_b.shape[1] > _CPU_SCORES_BYTES:
    shards = batch_shards(vb)
    chunks = b // shards if b % shards == 0 else 1
  return map_batch(match, (metric_a, metric_b, vb), chunks)


def _plan(keys: jax.Array, mask: jax.Array, r: int, class_token: bool):
  """Matching of one round, as int32 index arrays (K = N - r output slots, official order):

    assign [B, N]: the slot of every token;
    base [B, K]: the token that owns each slot (an unmerged A token, or the B token);
    rep [B, K]: the token whose `pos` the slot takes (the base, except a padding B slot that
      must take a valid source: then that source);
    src [B, r], src_slot [B, r]: the merged A tokens and the slot each goes into.
  """
  b, n, _ = keys.shape
  na, nb = (n + 1) // 2, n // 2
  metric = P.l2_normalize(keys)
  va, vb = mask[:, ::2], mask[:, 1::2]
  best, dst = _best_match(metric[:, ::2], metric[:, 1::2], vb)
  rank = jnp.where(va, jnp.where(best == -jnp.inf, _UNMATCHED_RANK, best), _PAD_RANK)
  if class_token:
    rank = rank.at[:, 0].set(-jnp.inf)  # never a source
  # Stable descending order: ascending on -rank (finite, never NaN), ties to the lower index.
  order = P.argsort(-rank)  # [B, Na]
  src, unm = order[:, :r], order[:, r:]
  if class_token:
    unm = jnp.sort(unm, axis=-1)
  keep = na - r  # output slots of the unmerged A tokens; B follows
  dst_src = jnp.take_along_axis(dst, src, axis=1)

  def one(unm, src, dst_src, va, vb):
    slot_a = ((0 * va.astype(jnp.int32)).at[unm].set(jnp.arange(keep, dtype=jnp.int32))
              .at[src].set(keep + dst_src))
    # A padding B slot that must take a valid source (no valid B left) takes its position.
    zero = 0 * vb.astype(jnp.int32)  # data-dependent, so batched under vmap (sharded batch)
    into = (zero + n).at[dst_src].min(jnp.where(va[src], 2 * src, n))
    own = 2 * jnp.arange(nb, dtype=jnp.int32) + 1 + zero
    rep_b = jnp.where(vb | (into == n), own, into)
    # Interleave back to token order: A at even positions, B (slots after A's) at odd ones.
    assign = jnp.stack([slot_a[:nb], keep + (own - 1) // 2], -1).reshape(2 * nb)
    assign = jnp.concatenate([assign, slot_a[nb:]])
    return (assign, jnp.concatenate([2 * unm, own]), jnp.concatenate([2 * unm, rep_b]),
            2 * src, keep + dst_src)

  return jax.vmap(one)(unm, src, dst_src, va, vb)


def _take_rows(a: jax.Array, idx: jax.Array) -> jax.Array:
  """a: [B, N, ...], idx: int[B, K] -> [B, K, ...] (rows of each example)."""
  return jax.vmap(lambda v, i: v[i])(a, idx)


def _apply(tokens: Tokens, plan, keys=None, sort: bool = False):
  """The round's size-weighted merge (`primitives.merge` with the plan's slots), computed as one
  gather of the K slot owners and a scatter-add of the r sources only, instead of a scatter of
  all N tokens; with `sort`, the slots are put in raster order (`primitives.sort_by_position`)
  before the features are read, so the features are moved once. Returns (tokens, merged keys
  or None)."""
  assign, base, rep, src, src_slot = plan
  k = base.shape[1]
  w = jnp.where(tokens.mask, tokens.size, 0.0)
  w_src = jnp.take_along_axis(w, src, axis=1)
  size = jnp.take_along_axis(w, base, axis=1) + P.slot_sum(w_src, src_slot, k)
  mask = size > 0
  pos = jnp.where(mask[..., None], _take_rows(tokens.pos, rep), 0).astype(jnp.int32)
  if sort:
    big = jnp.iinfo(jnp.int32).max
    frames, h, w_grid = tokens.grid
    lin = (pos[..., 0] * h + pos[..., 1]) * w_grid + pos[..., 2]
    order = jnp.argsort(jnp.where(mask, lin, big), axis=-1, stable=True).astype(jnp.int32)
    inv = jax.vmap(lambda o: jnp.zeros_like(o).at[o].set(jnp.arange(k, dtype=jnp.int32)))(order)
    base = jnp.take_along_axis(base, order, axis=1)
    size, mask = jnp.take_along_axis(size, order, axis=1), jnp.take_along_axis(mask, order, 1)
    pos = _take_rows(pos, order)
    src_slot = jnp.take_along_axis(inv, src_slot, axis=1)
    assign = jnp.take_along_axis(inv, assign, axis=1)
  w_base = jnp.take_along_axis(w, base, axis=1)
  m_base = jnp.take_along_axis(tokens.mask, base, axis=1)
  m_src = jnp.take_along_axis(tokens.mask, src, axis=1)
  # Each member's share of its slot, w / sum(w): applied before the sum, so that the scatter-add
  # writes the final average (no pass over the output to divide it); an unmerged token's share
  # is exactly 1.
  denom = jnp.maximum(size, 1e-30)
  f_base = w_base / denom
  f_src = w_src / jnp.take_along_axis(denom, src_slot, axis=1)

  def average(v):
    v = v.astype(jnp.float32)
    # Padding contributes nothing, not even its NaNs (`primitives.merge` drops it).
    own = jnp.where(m_base[..., None], _take_rows(v, base) * f_base[..., None], 0.0)
    add = jnp.where(m_src[..., None], _take_rows(v, src) * f_src[..., None], 0.0)
    return jax.vmap(lambda o, s, u: o.at[s].add(u, mode="promise_in_bounds"))(own, src_slot, add)

  old_to_new = jnp.where(tokens.mask, assign, -1).astype(jnp.int32)
  out = Tokens(x=average(tokens.x).astype(tokens.x.dtype), pos=pos, size=size, mask=mask,
               src=P.remap_src(tokens.src, old_to_new), grid=tokens.grid)
  return out, (None if keys is None else average(keys))


def _round(tokens: Tokens, keys: jax.Array, r: int, class_token: bool, carry_keys: bool,
           sort: bool = False):
  """One official ToMe round (raster-sorted if `sort`); also merges `keys` (size-weighted) when
  `carry_keys`."""
  plan = _plan(keys, tokens.mask, r, class_token)
  return _apply(tokens, plan, keys if carry_keys else None, sort)


def _check_keys(tokens: Tokens, keys, name: str) -> jax.Array:
  b, n, _ = tokens.x.shape
  return P.check_array(keys, "keys", name, (b, n, None))


def bipartite_merge(tokens: Tokens, r: int, *, keys=None, sort: bool = False,
                    class_token: bool = False) -> Tokens:
  """One official ToMe round: merge the r best-matched tokens of set A into set B.

  Call it in every ViT block between the attention and the MLP, with that block's keys.

  Args:
    tokens: N tokens in their current order (the order decides the even / odd split).
    r: static int, tokens to merge; clamped to (N - class_token) // 2. 0: no merge.
    keys: float[B, N, Dk] the block's keys averaged over heads (the matching metric).
    sort: False keeps the official order [unmerged A (descending score), B] that the next
      block's split depends on; True returns raster order of origin (`sort_by_position`).
    class_token: protect token 0 (a [CLS] token): never merged, stays first.

  Returns:
    N - r tokens: x size-weighted averages, size added, pos of the B token (the destination),
    src pointing at the carrying token; padding stays padding (see the module docstring).
    With r == 0: `tokens` unchanged (raster-sorted if `sort`).
  """
  name = "bipartite_merge"
  P.check_tokens(tokens, name)
  if not _is_int(r) or r < 0:
    raise ValueError(f"{name}: r must be a non-negative static int, got {r!r}")
  keys = _check_keys(tokens, keys, name)
  r = min(int(r), (tokens.num_tokens - int(bool(class_token))) // 2)
  if r == 0:
    return P.sort_by_position(tokens) if sort else tokens
  out, _ = _round(tokens, keys, r, bool(class_token), carry_keys=False, sort=sort)
  return out


@register("tome", family="merging", stages=("vit", "post_vit"), needs=("keys",),
          paper="ToMe, Bolya et al., arXiv 2210.09461 (ICLR 2023)")
def tome(tokens, budget, *, keys=None, class_token=False):
  """Merge down to `budget` tokens by ToMe rounds of at most 50% each, in raster order.

  Each round is `bipartite_merge` with r = min(N_now - budget, N_now // 2) (`merge_rounds`),
  so when N - budget <= N / 2 this is exactly one official round, then sorted. Between rounds
  the official scrambled order is kept (as between ViT blocks), and the keys of a merged token
  are the size-weighted average of its members' keys (the same average as its features; a ViT
  would recompute keys from the merged features instead), re-normalised by the next round.

  Args:
    tokens: N tokens.
    budget: tokens out (exact; with `class_token`, at least 2 when budget < N).
    keys: float[B, N, Dk] keys averaged over heads (or any similarity metric).
    class_token: protect token 0 from merging.

  Returns:
    `budget` tokens in raster order of their origin (the B token each merge went into);
    `size` = patches carried; use `attention_bias(out)` for proportional attention downstream.
  """
  name = "tome"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  keys = _check_keys(tokens, keys, name)
  rounds = merge_rounds(tokens.num_tokens, budget, class_token)
  if not rounds:
    return P.sort_by_position(tokens)
  for i, r in enumerate(rounds):
    last = i + 1 == len(rounds)
    tokens, keys = _round(tokens, keys, r, bool(class_token), carry_keys=not last, sort=last)
  return tokens


# `tcjax.compress.tome` is this function (the registry's contract); the round-level API hangs
# off it too, so `compress.tome.bipartite_merge(...)` works for the ViT.
tome.bipartite_merge = bipartite_merge
tome.attention_bias = attention_bias
tome.r_schedule = r_schedule
tome.merge_rounds = merge_rounds
