"""Shared building blocks of every compression method.

Axis legend: B batch, N tokens in, K tokens out, M original patches, D features.

Methods are compositions of: input checks, a ranking key, `select_top` / `gather` (keep tokens in
order, with `src` bookkeeping), `merge` (size-weighted scatter-merge into K slots), `pool_grid`
(k x k pooling on the grid) and `sort_by_position`. Data-dependent counts in a fixed capacity:
`rank_in_group` (a runtime number per group), `select_where`, `merge_into` (features the method
computes); density-peak clustering of a group: from features, `dpc_sq_dists`, `dpc_scores`,
`dpc_assign` (compare-free passes over squared distances, the fast path; `dpc_plan` runs the
three on the Gram matrix for one group, with no distance matrix), or from a distance matrix,
`density_peaks`, `nearest_centre`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tcjax.parallel.mesh import batch_reshape, sharded_axis, unshard_axis
from tcjax.parallel.topk import topk as sharded_topk
from tcjax.tokens import Tokens

# ---------------------------------------------------------------------------------------------
# Input checks (all raise at trace time, naming the argument).
# ---------------------------------------------------------------------------------------------


def check_tokens(tokens, method: str) -> Tokens:
  if not isinstance(tokens, Tokens):
    raise ValueError(f"{method}: tokens must be a tcjax.Tokens, got {type(tokens).__name__}")
  if tokens.x.ndim != 3:
    raise ValueError(f"{method}: tokens.x must be float[B, N, D], got shape {tokens.x.shape}")
  if not jnp.issubdtype(tokens.x.dtype, jnp.floating):
    raise ValueError(f"{method}: tokens.x must be floating point, got dtype {tokens.x.dtype}")
  b, n, _ = tokens.x.shape
  for field, shape in (("pos", (b, n, 3)), ("size", (b, n)), ("mask", (b, n)),
                       ("src", (b, tokens.num_patches))):
    if getattr(tokens, field).shape != shape:
      raise ValueError(f"{method}: tokens.{field} must have shape {shape}, "
                       f"got {getattr(tokens, field).shape}")
  _check_token_axis(tokens, method)
  return tokens


def _check_token_axis(tokens: Tokens, method: str) -> None:
  """A token axis sharded over an Explicit mesh axis is refused by methods that need each
  example's whole token axis (everything but the exact sharded top-k selections): a clear
  error rather than a silent all-gather. (Auto axes carry no sharding in the type: XLA's
  partitioner moves the data there.)"""
  from tcjax.compress.registry import METHODS  # pylint: disable=g-import-not-at-top
  axis = sharded_axis(tokens.x, 1)
  if axis is None or method not in METHODS or METHODS[method].token_sharded:
    return
  fine = sorted(m for m, d in METHODS.items() if d.token_sharded)
  raise ValueError(
      f"{method}: tokens.x has its token axis sharded over mesh axis {axis!r}, and {method} "
      f"needs each example's whole token axis; reshard the tokens to "
      f"P({sharded_axis(tokens.x, 0)!r}, None) first, or use a method that runs sharded "
      f"exactly: {fine}")


def check_budget(tokens: Tokens, budget, method: str) -> int:
  """`budget` must be a static Python int in [1, N]."""
  n = tokens.num_tokens
  if isinstance(budget, bool) or not isinstance(budget, int):
    raise ValueError(f"{method}: budget must be a static Python int, got {budget!r}"
                     " (mark it static under jax.jit)")
  if budget <= 0 or budget > n:
    raise ValueError(f"{method}: budget must be in [1, N={n}], got {budget}")
  return budget


def check_array(value, name: str, method: str, shape: Sequence[Optional[int]],
                floating: bool = True) -> jax.Array:
  """Checks a signal's presence, rank, shape (None = any) and dtype kind."""
  if value is None:
    raise ValueError(f"{method}: needs signal `{name}`")
  value = jnp.asarray(value)
  if value.ndim != len(shape) or any(s is not None and s != v for s, v in zip(shape, value.shape)):
    want = ", ".join("?" if s is None else str(s) for s in shape)
    raise ValueError(f"{method}: `{name}` must have shape [{want}], got {value.shape}")
  if floating and not jnp.issubdtype(value.dtype, jnp.floating):
    raise ValueError(f"{method}: `{name}` must be floating point, got dtype {value.dtype}")
  return value


def check_scores(tokens: Tokens, scores, method: str, name: str = "scores") -> jax.Array:
  b, n, _ = tokens.x.shape
  return check_array(scores, name, method, (b, n)).astype(jnp.float32)


def check_rng(rng, method: str) -> jax.Array:
  if rng is None:
    raise ValueError(f"{method}: needs signal `rng` (a jax.random key)")
  return rng


def check_grid_tokens(tokens: Tokens, method: str) -> Tuple[int, int, int]:
  """Grid methods need the raw patch grid: N == frames * h * w."""
  if not tokens.is_raw_grid:
    raise ValueError(f"{method}: needs tokens on their full grid {tokens.grid} "
                     f"({tokens.num_patches} tokens), got N={tokens.num_tokens}")
  return tokens.grid


# ---------------------------------------------------------------------------------------------
# Ranking.
# ---------------------------------------------------------------------------------------------


def rank_key(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """float32[B, N] key for top-k: higher = keep.

  NaN scores count as -inf: the least important, never kept over a token with a real score (a
  NaN is kept only when the budget exceeds the tokens with real scores). Padding (mask False)
  also counts as -inf; ties go to the lower index (`lax.top_k` is stable) and padding always
  sits after the valid tokens, so valid tokens win every tie with padding.
  """
  s = scores.astype(jnp.float32)
  return jnp.where(mask & ~jnp.isnan(s), s, -jnp.inf)


def top_indices(key: jax.Array, k: int) -> jax.Array:
  """int32[B, k] indices of the k largest entries of `key: float[B, N]`, in ascending order.

  A token axis sharded over one Explicit mesh axis (dividing N) uses the exact two-stage
  `tcjax.parallel.topk` (local top-k, gather candidates, final top-k; same result and ties as
  `lax.top_k`); otherwise the axis is resharded first (`unshard_axis`, a no-op on Auto axes).
  """
  sharding = jax.typeof(key).sharding
  spec = getattr(sharding, "spec", None)
  mesh = getattr(sharding, "mesh", None)
  if (key.ndim == 2 and spec is not None and len(spec) == 2 and isinstance(spec[1], str)
      and mesh.axis_types[mesh.axis_names.index(spec[1])] == jax.sharding.AxisType.Explicit
      and key.shape[1] % mesh.shape[spec[1]] == 0):
    _, idx = sharded_topk(key, k, mesh=mesh, axis=spec[1], batch_axis=spec[0])
    return jnp.sort(idx, axis=-1).astype(jnp.int32)
  _, idx = jax.lax.top_k(unshard_axis(key, -1), k)
  return jnp.sort(idx, axis=-1).astype(jnp.int32)


def rank_in_group(key: jax.Array, group: Optional[jax.Array] = None) -> jax.Array:
  """int32[..., N]: the rank of each entry of `key: float[..., N]` among the entries of its group
  (`group: int[..., N]`; None: one group), highest key first, ties to the lower index, NaN last:
  `lax.top_k`'s order within each group. `rank < k_g` keeps a runtime number k_g of a group."""
  k = key.astype(jnp.float32)
  k = jnp.where(jnp.isnan(k), -jnp.inf, k)
  by_key = jnp.argsort(-k, axis=-1, stable=True)
  if group is None:
    return jnp.argsort(by_key, axis=-1).astype(jnp.int32)
  order = jnp.take_along_axis(
      by_key, jnp.argsort(jnp.take_along_axis(group, by_key, -1), axis=-1, stable=True), -1)
  g = jnp.take_along_axis(group, order, -1)  # sorted by (group, -key, index)
  pos = jnp.broadcast_to(jnp.arange(g.shape[-1], dtype=jnp.int32), g.shape)
  first = jnp.concatenate([jnp.ones_like(g[..., :1], bool), g[..., 1:] != g[..., :-1]], -1)
  rank = pos - jax.lax.cummax(jnp.where(first, pos, 0), axis=g.ndim - 1)
  return jnp.take_along_axis(rank, jnp.argsort(order, axis=-1), -1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# Gather, merge, reorder.
# ---------------------------------------------------------------------------------------------


def _take(a: jax.Array, idx: jax.Array) -> jax.Array:
  """a: [B, N, ...], idx: int[B, K] -> [B, K, ...]."""
  idx = idx.reshape(idx.shape + (1,) * (a.ndim - 2))
  return jnp.take_along_axis(unshard_axis(a, 1), unshard_axis(idx, 1), axis=1)


def remap_src(src: jax.Array, old_to_new: jax.Array) -> jax.Array:
  """Compose `src: int[B, M]` (patch -> old token) with `old_to_new: int[B, N]` (-1 = dropped)."""
  src = unshard_axis(src, 1)
  carried = jnp.take_along_axis(unshard_axis(old_to_new, 1), jnp.maximum(src, 0), axis=1)
  return jnp.where(src >= 0, carried, -1).astype(jnp.int32)


def gather(tokens: Tokens, idx: jax.Array) -> Tokens:
  """Keep tokens `idx: int[B, K]` (distinct) in the order given; every other token is dropped."""
  b, n = tokens.mask.shape
  k = idx.shape[1]
  old_to_new = jax.vmap(
      lambda i: jnp.full((n,), -1, jnp.int32).at[i].set(jnp.arange(k, dtype=jnp.int32)))(idx)
  return Tokens(x=_take(tokens.x, idx), pos=_take(tokens.pos, idx), size=_take(tokens.size, idx),
                mask=_take(tokens.mask, idx), src=remap_src(tokens.src, old_to_new),
                grid=tokens.grid)


def gather_static(tokens: Tokens, idx) -> Tokens:
  """Keep the same tokens `idx` (a static, distinct, int sequence of length K) in every example.

  Plain static indexing keeps the batch axis's sharding untouched (no per-example index arrays).
  """
  idx = np.asarray(idx, np.int32)
  n = tokens.num_tokens
  old_to_new = np.full((n,), -1, np.int32)
  old_to_new[idx] = np.arange(idx.size, dtype=np.int32)
  return Tokens(x=tokens.x[:, idx], pos=tokens.pos[:, idx], size=tokens.size[:, idx],
                mask=tokens.mask[:, idx], src=remap_src_static(tokens.src, old_to_new),
                grid=tokens.grid)


def remap_src_static(src: jax.Array, old_to_new) -> jax.Array:
  """`remap_src` with a static table `old_to_new: int[N]` shared by every example."""
  # Broadcast against src's batch axis so the table takes src's batch sharding.
  table = jnp.zeros_like(src[:, :1]) + jnp.asarray(old_to_new, jnp.int32)[None]
  return remap_src(src, table)


def select_top(tokens: Tokens, scores: jax.Array, budget: int) -> Tokens:
  """Keep the `budget` highest-scoring tokens, in their original order (see `rank_key`)."""
  return gather(tokens, top_indices(rank_key(scores, tokens.mask), budget))


def select_top_count(tokens: Tokens, scores: jax.Array, budget: int, count: jax.Array) -> Tokens:
  """Keep the `count[b]` highest-scoring tokens of each example in `budget` slots (a fixed
  capacity with a data-dependent number of valid tokens).

  Args:
    tokens: N tokens in.
    scores: float[B, N] ranking (see `rank_key`: NaN and padding last, ties to the lower index).
    budget: static capacity K.
    count: int[B] tokens to keep per example, in [0, K]; the caller keeps it at most the
      example's valid tokens, so that input padding is never kept.

  Returns:
    K tokens: the kept ones first, in their original order (the same set as
    `select_top(tokens, scores, count[b])` on example b alone), then padding slots (mask
    False, size 0, zero x and pos, no patch in `src` points at them).
  """
  key = rank_key(scores, tokens.mask)
  idx = top_indices(key, budget)  # int32[B, K] the K best, ascending position
  # Rank of each of the K among themselves (0 = best; ties: lower position first, as top_k).
  order = jnp.argsort(-jnp.take_along_axis(unshard_axis(key, 1), idx, 1), axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)
  keep = rank < count[:, None]
  # Kept slots first, each part still in ascending position.
  idx = jnp.take_along_axis(idx, jnp.argsort(~keep, axis=-1, stable=True), 1)
  out = gather(tokens, idx)
  valid = jnp.arange(budget)[None] < count[:, None]  # bool[B, K]
  return out.replace(x=jnp.where(valid[..., None], out.x, 0).astype(out.x.dtype),
                     pos=jnp.where(valid[..., None], out.pos, 0),
                     size=jnp.where(valid, out.size, 0.0), mask=valid & out.mask,
                     src=jnp.where(out.src >= count[:, None], -1, out.src))


def merge(tokens: Tokens, assign: jax.Array, rep: jax.Array,
          weight: Optional[jax.Array] = None) -> Tokens:
  """Size-weighted scatter-merge of tokens into K slots.

  Args:
    tokens: N tokens in.
    assign: int32[B, N] slot of each token in [0, K), or -1 to drop it. Padding should be -1.
    rep: int32[B, K] the token whose `pos` each slot takes (its representative).
    weight: optional float[B, N] > 0, the members' weights in the features' mean (None: `size`).

  Returns:
    K tokens: x = sum(size * x) / sum(size) over the slot's members (`weight` for size when
    given), size = sum(size), pos of the representative, mask = size > 0; empty slots are zero
    padding.
  """
  k = rep.shape[1]
  keep = (assign >= 0) & tokens.mask
  w = jnp.where(keep, tokens.size, 0.0)
  slot = jnp.where(keep, assign, -1)
  size = slot_sum(w, slot, k)
  total = size
  if weight is not None:
    w = jnp.where(keep, weight.astype(jnp.float32), 0.0)
    total = slot_sum(w, slot, k)
  wx = slot_sum(tokens.x.astype(jnp.float32) * w[..., None], slot, k)
  x = (wx / jnp.maximum(total, 1e-30)[..., None]).astype(tokens.x.dtype)
  mask = size > 0
  pos = jnp.where(mask[..., None], _take(tokens.pos, rep), 0)
  old_to_new = jnp.where(keep, assign, -1).astype(jnp.int32)
  return Tokens(x=x, pos=pos.astype(jnp.int32), size=size, mask=mask,
                src=remap_src(tokens.src, old_to_new), grid=tokens.grid)


def slot_sum(values: jax.Array, slot: jax.Array, k: int) -> jax.Array:
  """Per-example scatter-add: `out[b, s] = sum of values[b, i] over i with slot[b, i] == s`.

  Args:
    values: [B, N, ...] values to add up.
    slot: int[B, N] destination in [0, k); -1 (or any value outside) drops the value.
    k: number of slots.

  Returns:
    [B, k, ...] sums (zero for empty slots).
  """
  slot = jnp.where((slot >= 0) & (slot < k), slot, k)  # an overflow slot collects the dropped
  add = jax.vmap(lambda v, s: jax.ops.segment_sum(v, s, num_segments=k + 1))
  return add(values, slot)[:, :k]


def argsort(key: jax.Array) -> jax.Array:
  """int32[..., H] stable ascending argsort of `key: float[..., H]` along the last axis.

  Same result as `jnp.argsort(key, stable=True)` (ties: lower index first; -0.0 == 0.0; NaN
  last; subnormals as the backend compares them), computed as a two-pass radix sort (low then
  high 16 bits of an order-preserving integer image of the key), each pass one single-operand
  int32 sort of (16-bit digit, position) packed into one integer: XLA runs those several times
  faster on CPU than a sort with a float comparator and an index payload. Needs H <= 2**15
  (otherwise it falls back to `jnp.argsort`).
  """
  h = key.shape[-1]
  if h > 2**15:
    return jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
  k = key.astype(jnp.float32)
  # Whatever compares equal to 0 (-0.0; subnormals where the backend flushes them, as XLA's
  # CPU comparator does) becomes +0.0, and every NaN one NaN bit pattern (after +inf).
  k = jnp.where(k == 0, 0.0, jnp.where(jnp.isnan(k), jnp.nan, k))
  bits = jax.lax.bitcast_convert_type(k, jnp.uint32)
  # Unsigned image with the float order: negative floats reversed, positive above them.
  u = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))
  pos = jnp.arange(h, dtype=jnp.int32)
  lo = (u & 0xFFFF).astype(jnp.int32)
  first = jnp.sort((lo << 15) | pos, axis=-1) & 0x7FFF  # stable by the low digit
  hi = (jnp.take_along_axis(u, first, axis=-1) >> 16).astype(jnp.int32)
  second = jnp.sort((hi << 15) | pos, axis=-1) & 0x7FFF  # stable by the high digit
  return jnp.take_along_axis(first, second, axis=-1)


def top_k_by_bins(x: jax.Array, k: int, bin_size: int = 16) -> Tuple[jax.Array, jax.Array]:
  """Same result as `jax.lax.top_k(x, k)` (values and indices, ties to the lower index), for
  `x: float[..., N]` with small k and large N, several times faster on CPU.

  XLA's CPU top-k costs ~20x a max-reduction per element, so it runs on few elements here: the
  last axis is cut into bins of `bin_size`, the k bins with the largest maxima are kept (ties:
  lower bin), and the top k of their k * bin_size entries, in column order, is returned. Exact:
  an entry of the true top k has fewer than k entries ahead of it, and every bin ahead of its bin
  holds a distinct one of those, so its bin is kept.

  Returns:
    (float[..., k] values in descending order, int32[..., k] indices into the last axis).
  """
  n = x.shape[-1]
  if k * bin_size * 2 > n:  # too few bins to gain anything
    return jax.lax.top_k(x, k)
  bins = -(-n // bin_size)
  # Padding comes after every real entry in the order (same value, higher index): never ahead.
  pad = [(0, 0)] * (x.ndim - 1) + [(0, bins * bin_size - n)]
  xb = jnp.pad(x, pad, constant_values=-jnp.inf).reshape(x.shape[:-1] + (bins, bin_size))
  _, top_bins = jax.lax.top_k(xb.max(-1), k)
  top_bins = jnp.sort(top_bins, axis=-1)  # column order, so that ties keep the lower index
  cand = jnp.take_along_axis(xb, top_bins[..., None], axis=-2)  # [..., k, bin_size]
  values, pos = jax.lax.top_k(cand.reshape(x.shape[:-1] + (k * bin_size,)), k)
  cols = jnp.take_along_axis(top_bins, pos // bin_size, axis=-1) * bin_size + pos % bin_size
  return values, cols.astype(jnp.int32)


def sort_by_position(tokens: Tokens) -> Tokens:
  """Reorder tokens by their origin's raster index (frame-major), padding last."""
  big = jnp.iinfo(jnp.int32).max
  key = jnp.where(tokens.mask, tokens.linear_pos(), big)
  order = jnp.argsort(key, axis=-1, stable=True).astype(jnp.int32)
  return gather(tokens, order)


def gather_valid(tokens: Tokens, idx: jax.Array, valid: jax.Array) -> Tokens:
  """`gather(tokens, idx)` where `valid: bool[B, K]`; the other slots become padding (mask False,
  size 0, zero features and position, carrying no patch). Valid slots must come first."""
  out = gather(tokens, idx)
  ok = valid & out.mask
  carried = jnp.take_along_axis(ok, jnp.maximum(out.src, 0), axis=1)
  return out.replace(x=jnp.where(ok[..., None], out.x, 0).astype(out.x.dtype),
                     pos=jnp.where(ok[..., None], out.pos, 0), size=jnp.where(ok, out.size, 0.0),
                     mask=ok, src=jnp.where((out.src >= 0) & carried, out.src, -1))


def select_where(tokens: Tokens, keep: jax.Array, key: jax.Array, budget: int) -> Tokens:
  """The tokens where `keep: bool[B, N]` (a data-dependent count), at most `budget` of them (the
  highest `key: float[B, N]` first when there are more), in raster order, then padding."""
  keep = keep & tokens.mask
  rank = rank_in_group(key, jnp.where(keep, 0, 1))
  keep = keep & (rank < budget)
  lin = tokens.linear_pos()
  order = jnp.argsort(jnp.where(keep, lin, tokens.num_patches), axis=-1, stable=True)
  idx = order[:, :budget].astype(jnp.int32)
  return gather_valid(tokens, idx, jnp.take_along_axis(keep, idx, axis=1))


def merge_into(tokens: Tokens, rep_of: jax.Array, x_rep: Optional[jax.Array], budget: int,
               priority: jax.Array, weight: Optional[jax.Array] = None) -> Tokens:
  """Every token joins a representative token; each representative becomes one output token.

  For merges whose features are not the size-weighted mean (`merge`): the caller computes them.

  Args:
    tokens: N tokens.
    rep_of: int32[B, N] the input index of each token's representative (a representative is its
      own), -1 to drop the token.
    x_rep: float[B, N, D] the output features, read at the representatives; None: the
      size-weighted mean of the members (`merge`), or the `weight`-weighted one.
    budget: output capacity.
    priority: float32[B, N] which representatives stay when there are more than `budget`
      (highest first, ties to the lower index); the others are dropped with their members.
    weight: optional float[B, N] > 0, the members' weights in the mean when `x_rep` is None
      (ones: the plain mean); None: `size`. Computed for the `budget` slots only.

  Returns:
    `budget` tokens in raster order of their representatives, padding last; each takes its
    representative's `pos`, `size` = patches carried, `src` follows.
  """
  b, n, _ = tokens.x.shape
  idx = jnp.arange(n, dtype=jnp.int32)
  valid = tokens.mask & (rep_of >= 0)
  is_rep = valid & (rep_of == idx)
  keep = is_rep & (rank_in_group(priority, jnp.where(is_rep, 0, 1)) < budget)
  order = jnp.argsort(jnp.where(keep, tokens.linear_pos(), tokens.num_patches), axis=-1,
                      stable=True)
  slots = order[:, :budget].astype(jnp.int32)  # representative of each output slot
  slot_ok = jnp.take_along_axis(keep, slots, axis=1)
  slot_of = jax.vmap(lambda s, ok: jnp.full((n,), -1, jnp.int32).at[s].set(
      jnp.where(ok, jnp.arange(budget, dtype=jnp.int32), -1)))(slots, slot_ok)
  assign = jnp.where(valid, jnp.take_along_axis(slot_of, jnp.maximum(rep_of, 0), axis=1), -1)
  out = merge(tokens, assign, slots, weight)
  if x_rep is None:
    return out
  x = jnp.where(out.mask[..., None], _take(x_rep, slots), 0)
  return out.replace(x=x.astype(tokens.x.dtype))


# ---------------------------------------------------------------------------------------------
# Grid pooling.
# ---------------------------------------------------------------------------------------------


def pooled_grid(h: int, w: int, k: int) -> Tuple[int, int]:
  """Output grid of k x k pooling in ceil mode (partial edge windows average what they cover)."""
  return -(-h // k), -(-w // k)


def pool_grid(tokens: Tokens, k: int, frames: Optional[Sequence[int]] = None) -> Tokens:
  """Size-weighted k x k average pooling of each frame of a raw grid, in ceil mode.

  Args:
    tokens: tokens on their full grid, N == T * h * w.
    k: window and stride.
    frames: unused; pooling is per frame.

  Returns:
    T * ceil(h/k) * ceil(w/k) tokens in raster order; each takes the `pos` of its window's
    top-left patch and `size` = patches covered.
  """
  del frames
  t, h, w = tokens.grid
  b, n, d = tokens.x.shape
  ho, wo = pooled_grid(h, w, k)
  ph, pw = ho * k - h, wo * k - w

  def windows(a, fill):
    a = batch_reshape(a, (b, t, h, w) + a.shape[2:])
    pad = [(0, 0), (0, 0), (0, ph), (0, pw)] + [(0, 0)] * (a.ndim - 4)
    a = jnp.pad(a, pad, constant_values=fill)
    a = batch_reshape(a, (b, t, ho, k, wo, k) + a.shape[4:])
    return batch_reshape(jnp.moveaxis(a, 3, 4), (b, t * ho * wo, k * k) + a.shape[6:])

  size_w = windows(jnp.where(tokens.mask, tokens.size, 0.0), 0.0)  # [B, K, k*k]
  x_w = windows(tokens.x.astype(jnp.float32), 0.0)  # [B, K, k*k, D]
  size = size_w.sum(-1)
  x = jnp.einsum("bkw,bkwd->bkd", size_w, x_w) / jnp.maximum(size, 1e-30)[..., None]
  pos = windows(tokens.pos, 0)[:, :, 0]
  # Window index of every original patch (tokens are the raw grid, so patch m is token m).
  ti, ri, ci = tokens.pos[..., 0], tokens.pos[..., 1], tokens.pos[..., 2]
  old_to_new = ((ti * ho + ri // k) * wo + ci // k).astype(jnp.int32)
  old_to_new = jnp.where(tokens.mask, old_to_new, -1)
  return Tokens(x=x.astype(tokens.x.dtype), pos=pos, size=size, mask=size > 0,
                src=remap_src(tokens.src, old_to_new), grid=tokens.grid)


def grid_for_budget(h: int, w: int, budget: int, frames: int = 1) -> Tuple[int, int]:
  """The (h', w') with frames * h' * w' == budget whose aspect ratio is closest to h : w."""
  if budget % frames:
    raise ValueError(f"budget {budget} must be a multiple of the {frames} frames")
  per = budget // frames
  best = None
  for hh in range(1, per + 1):
    if per % hh == 0:
      ww = per // hh
      if hh <= h and ww <= w:
        err = abs(math.log(hh / ww) - math.log(h / w))
        if best is None or err < best[0]:
          best = (err, hh, ww)
  if best is None:
    raise ValueError(f"budget {budget} does not fit a sub-grid of {frames}x{h}x{w}")
  return best[1], best[2]


# ---------------------------------------------------------------------------------------------
# Feature helpers.
# ---------------------------------------------------------------------------------------------


def l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def above_mean_raters(s: jax.Array, valid_text: jax.Array, valid_vis: jax.Array) -> jax.Array:
  """bool[B, T]: the text tokens whose relevance beats the mean, SparseVLM's rater rule.

  From `s: float[B, N, T]` visual-text relevance: M = softmax over the valid text of s; r_j =
  mean of M[:, j] over the valid visual tokens; raters = the valid text tokens with r_j >
  mean(r). If none beats the mean (all equal), every valid text token rates.
  """
  m = jax.nn.softmax(jnp.where(valid_text[:, None], s, -jnp.inf), axis=-1)
  m = jnp.where(valid_text[:, None] & valid_vis[..., None], m, 0.0)  # padding rows/cols out
  r = m.sum(1) / jnp.maximum(valid_vis.sum(1), 1)[:, None]  # [B, T]
  mean_r = (r.sum(1) / jnp.maximum(valid_text.sum(1), 1))[:, None]
  raters = valid_text & (r > mean_r)
  return jnp.where(raters.any(1, keepdims=True), raters, valid_text)


def gram(x: jax.Array, chunk: int = 256, *, scale: Optional[float] = None) -> jax.Array:
  """float32[N, N] = x @ x.T of `x: float[N, D]`, computing only the blocks on and above the
  diagonal (~(1 + 1/blocks) / 2 of the FLOPs of one matmul, with no loop) and mirroring them, so
  the result is exactly symmetric.

  The rows are padded to near-equal blocks of about `chunk` and reshaped, so that every block
  product is a dot of two whole, contiguous blocks: on CPU, dots of slices of an array computed in
  the same jit ran ~1.6x slower than these (and slower than the full matmul). The blocks are
  written into one buffer in place: concatenating rows of blocks held a second N x N copy (~10 ms
  more per vispruner call at N=4096, batch 4, on CPU).

  `scale` (a power of two) multiplies the left operand of every product: `scale * (x @ x.T)`,
  exactly (scaling by a power of two commutes with rounding, outside the subnormal range), with
  no pass over the N x N result.
  """
  n, d = x.shape
  x = x.astype(jnp.float32)
  lhs = (lambda a: a) if scale is None else (lambda a: a * jnp.float32(scale))
  if n <= chunk:
    return jnp.einsum("nd,md->nm", lhs(x), x, preferred_element_type=jnp.float32)
  num = -(-n // chunk)
  size = -(-n // num)
  blocks = jnp.pad(x, ((0, num * size - n), (0, 0))).reshape(num, size, d)
  upper = {(i, j): jnp.einsum("cd,ed->ce", lhs(blocks[i]), blocks[j],
                              preferred_element_type=jnp.float32)
           for i in range(num) for j in range(i, num)}
  full = jnp.zeros((num * size, num * size), jnp.float32)
  for (i, j), tile in upper.items():
    full = jax.lax.dynamic_update_slice(full, tile, (i * size, j * size))
    if i != j:
      full = jax.lax.dynamic_update_slice(full, tile.T, (j * size, i * size))
  return full[:n, :n]


def lookup(table, idx: jax.Array) -> jax.Array:
  """`table[idx]` for a static table (a NumPy array, [L]) and traced ints `idx` in [0, L), as a
  comparison with every entry: unlike an indexed gather, it needs no output sharding when `idx`
  is batch-sharded over an Explicit mesh axis. For small L (a count's table)."""
  table = np.asarray(table)
  hit = idx[..., None] == jnp.arange(table.shape[0], dtype=idx.dtype)
  return jnp.sum(jnp.where(hit, jnp.asarray(table), 0), axis=-1).astype(table.dtype)


def scores_per_token(tokens: Tokens, scores, method: str, name: str = "scores") -> jax.Array:
  """float32[B, N] token scores from `scores` given per token (float[B, N]) or per original patch
  (float[B, M], e.g. ViT attention before a pooling): then each token gets the mean over the
  patches it carries, as an attention map pooled like the features."""
  b, n, _ = tokens.x.shape
  s = check_array(scores, name, method, (b, None)).astype(jnp.float32)
  if s.shape[1] == n:
    return s
  if s.shape[1] != tokens.num_patches:
    raise ValueError(f"{method}: `{name}` must have shape [{b}, N={n}] or one score per patch "
                     f"[{b}, M={tokens.num_patches}], got {s.shape}")
  total = slot_sum(jnp.where(tokens.src >= 0, s, 0.0), tokens.src, n)
  return total / jnp.maximum(slot_sum(jnp.ones_like(s), tokens.src, n), 1.0)


# ---------------------------------------------------------------------------------------------
# Density-peak clustering (DPC-kNN) of one group of tokens.
# ---------------------------------------------------------------------------------------------


# Added to a squared distance to exclude it from a min (finite: 0 * _EXCLUDE is 0).
_EXCLUDE = 3e38


def dpc_sq_dists(x: jax.Array, valid: jax.Array, group: Optional[jax.Array] = None
                 ) -> Tuple[jax.Array, jax.Array]:
  """(d2 float32[N, N], dmax2) of one group `x: float[N, D]` (`valid: bool[N]`): the squared
  Euclidean distances max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 0) from the symmetric Gram matrix
  (`gram`), +inf in the columns of tokens outside the group (never near, never denser), and
  dmax2, the group's largest squared distance (0 for fewer than two tokens).

  `group: int[N]` (optional, small non-negative labels) holds several disjoint groups in one
  matrix (one Gram for all of them): tokens of different labels are >= 3e38 apart in d2 (never
  near, never denser), and dmax2 is float32[N], the largest squared distance within each token's
  own group; None: one group, dmax2 a float32 scalar.

  The distances of DPC-kNN are f(d2) = sqrt(d2) / sqrt(D) (`dpc_dist`), non-decreasing in d2:
  the k smallest, a min and a max are taken on d2 and mapped once, which gives the values the
  distance matrix would. d2 is exactly symmetric in the group and exactly 0 on its diagonal (the
  Gram's diagonal is set to |x_i|^2, and 2|x_i|^2 - 2|x_i|^2 is 0). Tokens outside the group are
  zeroed before the Gram, so their features (NaN padding included) never reach a valid entry.
  """
  n = x.shape[0]
  x = jnp.where(valid[:, None], x.astype(jnp.float32), 0.0)
  sq = jnp.sum(x * x, -1)
  idx = jnp.arange(n)
  g = gram(x).at[idx, idx].set(sq)
  sq_col = jnp.where(valid, sq, jnp.inf)  # columns outside the group: d2 = +inf
  sq_max = jnp.where(valid, sq, -jnp.inf)  # rows and columns outside: max(-inf, 0) = 0
  if group is None:
    dmax2 = jnp.max(jnp.maximum(sq_max[:, None] + sq_max[None, :] - 2.0 * g, 0.0))
    return jnp.maximum(sq[:, None] + sq_col[None, :] - 2.0 * g, 0.0), dmax2
  # (l_i - l_j)^2 is 0 within a group and >= 1 across: a multiple of _EXCLUDE added to (or taken
  # from) the cross-group entries, with no comparison (0 * _EXCLUDE is exactly 0).
  lab = group.astype(jnp.float32)
  cross = jnp.square(lab[:, None] - lab[None, :]) * jnp.float32(_EXCLUDE)
  row_max = jnp.max(jnp.maximum(sq_max[:, None] + sq_max[None, :] - 2.0 * g - cross, 0.0), -1)
  gid = jnp.clip(group, 0, n - 1)
  dmax2 = jax.ops.segment_max(row_max, gid, num_segments=n)[gid]
  return jnp.maximum(sq[:, None] + sq_col[None, :] - 2.0 * g, 0.0) + cross, dmax2


def dpc_dist(d2: jax.Array, dim: int) -> jax.Array:
  """The DPC-kNN distance sqrt(d2) / sqrt(D) of squared distances (`dpc_sq_dists`)."""
  return jnp.sqrt(d2) / jnp.sqrt(jnp.float32(dim))


def k_smallest(m: jax.Array, k: int, bin_size: int = 32) -> jax.Array:
  """float32[..., k] the k smallest values of each row of `m: float[..., M]`, ascending: the
  values of `-lax.top_k(-m, k)[0]`, through `top_k_by_bins` (exact)."""
  return -top_k_by_bins(-m, k, bin_size)[0]


def dpc_scores(d2: jax.Array, dmax2: jax.Array, valid: jax.Array, k, dim: int, *,
               k_max: Optional[int] = None, noise: Optional[jax.Array] = None) -> jax.Array:
  """float32[N] DPC-kNN centre scores rho * delta of one group from `dpc_sq_dists`' output
  (-inf outside the group): the values `density_peaks` computes from the distance matrix.

  Args:
    d2, dmax2: `dpc_sq_dists(x, valid)` (or `dpc_sq_dists(x, valid, group)`: several groups).
    valid: bool[N] the group's tokens.
    k: neighbours in the density, self included: a static int, or a traced one in [1, k_max]
      (a scalar, or int[N], one per token: each token's group's).
    dim: D, the features' width (distances are divided by sqrt(D)).
    k_max: static bound of a traced k (None: k is static).
    noise: optional float[N] added to the density (the official tie-breaking noise); None
      breaks density ties by index (the lower index counts as denser).

  Every N x N pass is written without comparisons (XLA's CPU loops run a compare-and-select
  several times slower than a min, max or add): "j is denser than i" is rank_j < rank_i in the
  stable descending order of rho, i.e. max(1 - rank_i + rank_j, 0) == 0, and d2's +inf columns
  drop the tokens outside the group. The mean over the k nearest is the sum of the first k of
  the ascending k_max smallest, divided by k (the same values as a mean when k == k_max).
  """
  near2 = k_smallest(d2, k if k_max is None else k_max)  # [N, k_max], self first
  rho, rank = _dpc_density(near2, k, dim, noise)
  delta2 = jnp.minimum(jnp.min(_dpc_farther(d2, rank, rank), -1), dmax2)
  return jnp.where(valid, rho * dpc_dist(delta2, dim), -jnp.inf)


def _dpc_density(near2, k, dim, noise):
  """(rho float32[N], rank float32[N]) from the ascending k_max smallest squared distances of
  each row: the density exp(-mean of the k nearest distances^2), plus `noise`, and each token's
  place in the stable descending order of rho (equal densities: lower index first)."""
  n = near2.shape[0]
  near = dpc_dist(near2, dim)
  k = jnp.broadcast_to(jnp.asarray(k, jnp.int32), (n,))
  total = jnp.take_along_axis(jnp.cumsum(near * near, -1), k[:, None] - 1, axis=-1)[:, 0]
  rho = jnp.exp(-total / k.astype(jnp.float32))
  if noise is not None:
    rho = rho + noise
  order = jnp.argsort(-rho, stable=True)  # densest first; equal densities: lower index first
  rank = jnp.zeros((n,), jnp.float32).at[order].set(jnp.arange(n, dtype=jnp.float32))
  return rho, rank


def _dpc_farther(d2, rank_rows, rank_cols):
  """d2 where column j is denser than row i (rank_j < rank_i), >= 3e38 elsewhere, with no
  comparison: max(1 - rank_i + rank_j, 0) is 0 iff j is denser, and a positive integer
  otherwise. d2: float32[R, M]; rank_rows: [R]; rank_cols: [M] or [R, M]."""
  if rank_cols.ndim == 1:
    rank_cols = rank_cols[None, :]
  not_denser = jnp.maximum(1.0 - rank_rows[:, None] + rank_cols, 0.0)
  return d2 + not_denser * jnp.float32(_EXCLUDE)


# Rows per round of `dpc_plan`'s full-row minima (rows with no denser token among their k
# nearest): N / 32, at least 64. On the benchmark inputs (26 such rows per example at N=4096),
# rounds of 64 / 128 / 256 / 512 rows took 1.00 / 1.02 / 1.02 / 1.03 of the time at N=4096 and
# 64 / 128 / 256 rows 1.00 / 1.01 / 1.03 at N=1024 (interleaved, under load): near noise; a
# small round wastes little when there are few, and data with many (up to ~1/k of the rows
# when densities are unrelated to the geometry) take a few more rounds.
_PEAK_ROWS_FRACTION = 32


def dpc_plan(x: jax.Array, valid: jax.Array, budget: int, k: int, noise=None, *,
             bin_size: int = 32, peak_rows: Optional[int] = None
             ) -> Tuple[jax.Array, jax.Array]:
  """(assign int32[N], centres int32[K]) of one group `x: float[N, D]`: the centres
  `top_k(dpc_scores(*dpc_sq_dists(x, valid), valid, k, D, noise=noise), budget)` and
  `dpc_assign` of every token, the same values, without the N x N matrix of squared distances.

  Only the Gram matrix is N x N; the squared distances are recomputed from it, entry by entry
  with the same expression, where they are needed:
    - one reduction over it gives every row's bin minima (32 columns a bin), another the
      group's largest squared distance; the k nearest come from the k bins with the smallest
      minima, as in `top_k_by_bins` (exact);
    - the distance to the nearest denser token is exact from a row's k nearest whenever one of
      them is denser (every other token is at least as far); only the rows with none (the local
      density peaks, a fraction of the tokens) take a full row's minimum, `peak_rows` rows per
      round of a `lax.while_loop`;
    - the nearest centre reads the K centres' rows.
  `k` is a static int <= N; tokens outside `valid` are as in `dpc_sq_dists`.
  """
  n, dim = x.shape
  if k * bin_size * 2 > n:  # too few bins: the passes over the whole matrix
    d2, dmax2 = dpc_sq_dists(x, valid)
    score = dpc_scores(d2, dmax2, valid, k, dim, noise=noise)
    centres = jax.lax.top_k(score, budget)[1].astype(jnp.int32)
    return dpc_assign(d2, centres, valid[centres], dim), centres
  x = jnp.where(valid[:, None], x.astype(jnp.float32), 0.0)
  sq = jnp.sum(x * x, -1)
  idx = jnp.arange(n)
  # 2 x_i.x_j straight from the products (`gram(scale=2)`, exact): 2.0 * g was a pass of its
  # own over the matrix, written out for the passes below.
  g2 = gram(x, scale=2.0).at[idx, idx].set(2.0 * sq)
  sq_col = jnp.where(valid, sq, jnp.inf)
  sq_max = jnp.where(valid, sq, -jnp.inf)
  bins = -(-n // bin_size)
  pad = bins * bin_size - n
  gb = jnp.pad(g2, ((0, 0), (0, pad))) if pad else g2
  sq_col = jnp.pad(sq_col, (0, pad), constant_values=jnp.inf)  # padding: never near
  sq_max_c = jnp.pad(sq_max, (0, pad), constant_values=-jnp.inf)
  # Bin minima and the largest squared distance, each clamped at 0 after its reduction (max(., 0)
  # is monotone, so this is the reduction of the clamped entries; clamping each entry made XLA
  # write out an N x N matrix of zeros for it).
  binned = lambda a: a.reshape(n, bins, bin_size)
  bin_min = jnp.maximum(binned(sq[:, None] + sq_col[None, :] - gb).min(-1), 0.0)  # [N, bins]
  dmax2 = jnp.maximum((sq_max[:, None] + sq_max_c[None, :] - gb).max(), 0.0)
  # The k nearest: as `k_smallest` (`top_k_by_bins` of -d2), on the entries of the k bins
  # with the smallest minima (ties: lower bin), in column order.
  top_bins = jnp.sort(jax.lax.top_k(-bin_min, k)[1], axis=-1)  # [N, k]
  cols = (top_bins[:, :, None] * bin_size + jnp.arange(bin_size)).reshape(n, k * bin_size)
  near_neg, pos = jax.lax.top_k(-_dpc_d2(jnp.take_along_axis(gb, cols, axis=1), sq,
                                          sq_col[cols]), k)
  near2, near_cols = -near_neg, jnp.take_along_axis(cols, pos, axis=1)
  rho, rank = _dpc_density(near2, k, dim, noise)
  # Nearest denser token: exact from the k nearest when one of them is denser.
  delta2 = jnp.min(_dpc_farther(near2, rank, rank[jnp.minimum(near_cols, n - 1)]), -1)
  need = valid & (delta2 >= jnp.float32(_EXCLUDE))
  size = min(n, peak_rows or max(64, n // _PEAK_ROWS_FRACTION))
  sq_c = sq_col[:n]

  def peaks(state):
    delta2, need = state
    sel = jnp.flatnonzero(need, size=size, fill_value=0)  # fill: row 0, masked below
    full = jnp.min(_dpc_farther(_dpc_d2(g2[sel], sq[sel], sq_c), rank[sel], rank), -1)
    delta2 = delta2.at[sel].min(jnp.where(need[sel], full, jnp.inf))
    return delta2, need.at[sel].set(False)

  delta2, _ = jax.lax.while_loop(lambda s: s[1].any(), peaks, (delta2, need))
  delta2 = jnp.minimum(delta2, dmax2)
  score = jnp.where(valid, rho * dpc_dist(delta2, dim), -jnp.inf)
  centres = jax.lax.top_k(score, budget)[1].astype(jnp.int32)
  return _nearest_slot(_dpc_d2(g2[centres], sq[centres], sq_c), centres, valid[centres],
                       dim), centres


def _dpc_d2(g2, sq_rows, sq_cols):
  """Squared distances max(|x_i|^2 + |x_j|^2 - 2 x_i.x_j, 0) from `g2` = 2 x_i.x_j: [R, M]
  (sq_cols: [M], or [R, M] one per entry)."""
  if sq_cols.ndim == 1:
    sq_cols = sq_cols[None, :]
  return jnp.maximum(sq_rows[:, None] + sq_cols - g2, 0.0)


def dpc_assign(d2: jax.Array, centres: jax.Array, ok: jax.Array, dim: int) -> jax.Array:
  """int32[N] the slot in `centres: int[K]` of each token's nearest centre among the slots with
  `ok: bool[K]` (the first such slot on ties: centres in score order give the official
  higher-score tie); a centre (in an ok slot) is in its own slot. d2: `dpc_sq_dists`' (symmetric
  in the group: row c is column c).

  The argmin is over the distances f(d2) themselves, not d2: two squared distances may round to
  one distance, and the tie then goes to the first centre, as on the distance matrix.
  """
  return _nearest_slot(d2[centres], centres, ok, dim)


def _nearest_slot(d2c: jax.Array, centres: jax.Array, ok: jax.Array, dim: int) -> jax.Array:
  """`dpc_assign` from the centres' rows `d2c: float32[K, N]` of the squared distances."""
  k, n = d2c.shape
  dc = jnp.where(ok[:, None], dpc_dist(d2c, dim), jnp.inf)  # [K, N]
  assign = _first_argmin(dc)
  own = jnp.full((n,), -1, jnp.int32).at[jnp.where(ok, centres, n)].set(
      jnp.arange(k, dtype=jnp.int32), mode="drop")
  return jnp.where(own >= 0, own, assign)


def _first_argmin(dc: jax.Array) -> jax.Array:
  """int32[N] `jnp.argmin(dc, 0)` (the first row on ties) of distances `dc: float[K, N]` that
  are >= 0 or +inf, never NaN, for K < 2**24.

  XLA's CPU argmin is a (value, index) reduction that does not vectorise (~30 ms on 1024 x 4096
  against ~5.5 ms for this, measured under load): the column minimum m, then the smallest of
  c + K * sign(dc_c - m), which is c where dc_c == m and >= K elsewhere (dc_c - m is exactly 0
  only when equal: DPC distances sqrt(d2) / sqrt(D) are 0 or above ~1e-21, so the difference of
  unequal ones is far from the subnormals a flush to zero would lose); an all-inf column
  (inf - inf is NaN) is row 0, as for argmin.
  """
  k = dc.shape[0]
  m = jnp.min(dc, 0)
  rows = jnp.arange(k, dtype=jnp.float32)[:, None]
  first = jnp.min(rows + jnp.sign(dc - m) * jnp.float32(k), 0)
  return jnp.where(m == jnp.inf, 0, first).astype(jnp.int32)


def density_peaks(dist: jax.Array, valid: jax.Array, k) -> jax.Array:
  """float32[N] DPC-kNN centre scores rho * delta of one group (`cluster_dpc_knn` of Chat-UniVi,
  as PruneVid and HoliTom call it); -inf for tokens outside the group.

  rho_i = exp(-mean of the k smallest squared distances, self included); delta_i = the distance
  to the nearest denser token, or the group's largest distance. The official code breaks density
  ties with U(0, 1) * 1e-6 noise; here the lower index counts as denser.

  Args:
    dist: float32[N, N] distances (`dpc_knn.pairwise_distance`).
    valid: bool[N] the group's tokens.
    k: neighbours in the density, a static or traced int in [1, group size].
  """
  n = dist.shape[0]
  both = valid[:, None] & valid[None, :]
  near = jnp.sort(jnp.where(both, dist, jnp.inf), axis=-1)
  total = jnp.take(jnp.cumsum(near * near, axis=-1), jnp.asarray(k, jnp.int32) - 1, axis=-1)
  rho = jnp.where(valid, jnp.exp(-total / jnp.asarray(k, jnp.float32)), 0.0)
  idx = jnp.arange(n)
  denser = (rho[None, :] > rho[:, None]) | ((rho[None, :] == rho[:, None])
                                           & (idx[None, :] < idx[:, None]))
  dmax = jnp.max(jnp.where(both, dist, 0.0))
  delta = jnp.min(jnp.where(denser & both, dist, dmax), axis=-1)
  return jnp.where(valid, rho * delta, -jnp.inf)


def nearest_centre(dist: jax.Array, is_centre: jax.Array, tie: jax.Array) -> jax.Array:
  """int32[N]: the index of each token's nearest centre (a centre is its own); between
  equidistant centres the lowest `tie: float[N]` wins. dist: float32[N, N]; is_centre: bool[N]."""
  d = jnp.where(is_centre[None, :], dist, jnp.inf)
  near = d == d.min(-1, keepdims=True)
  pick = jnp.argmin(jnp.where(near & is_centre[None, :], tie[None, :], jnp.inf), axis=-1)
  return jnp.where(is_centre, jnp.arange(dist.shape[0]), pick).astype(jnp.int32)


def to_grid(tokens: Tokens, values: jax.Array, fill=0) -> jax.Array:
  """Scatter per-token values back onto the original patch grid through `src`.

  Args:
    tokens: the compressed tokens.
    values: [B, N, ...] one value per token (e.g. `tokens.x`, or token ids for a picture).
    fill: value for dropped patches.

  Returns:
    [B, T, h, w, ...]: each original patch gets the value of the token that carries it.
  """
  values = jnp.asarray(values)
  b, n = tokens.mask.shape
  if values.shape[:2] != (b, n):
    raise ValueError(f"to_grid: values must be [B={b}, N={n}, ...], got {values.shape}")
  out = _take(values, jnp.maximum(tokens.src, 0))
  keep = (tokens.src >= 0).reshape(tokens.src.shape + (1,) * (values.ndim - 2))
  out = jnp.where(keep, out, jnp.asarray(fill, values.dtype))
  return batch_reshape(out, (b,) + tuple(tokens.grid) + values.shape[2:])


unmerge = to_grid
