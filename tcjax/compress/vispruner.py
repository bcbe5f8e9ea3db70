"""VisPruner: important tokens by attention, then diverse tokens by iterative de-duplication.

Zhang et al., "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning
in VLMs", arXiv 2412.01818v2, ICCV 2025 (official code: Theia-4869/VisPruner).

Axis legend: B batch, N tokens, Q attention queries, D features, R remaining candidates,
C candidate capacity of a loop phase.

Official behaviour (followed here):
  1. `n_imp = int(budget * important_ratio)` tokens with the highest attention (mean over Q: the
     [CLS] row for a tower with [CLS], the mean attention received for a tower without) are kept.
  2. The other tokens, in descending attention order, are the candidates. While more than
     `n_div = budget - n_imp` remain, the list is split alternately (even / odd positions, ToMe
     style), each even-position token gets the max cosine similarity to the odd-position tokens,
     the `r = min(dedup_step, R - n_div)` most duplicated even-position tokens are removed, and
     the list becomes [surviving even tokens in descending-similarity order] + [odd tokens].
  3. The important and surviving diverse tokens are kept in raster order.

The trip count is static (R shrinks by a known r each step), so the loop is a `lax.fori_loop`
on a fixed-size index buffer. Exactly the official selection, computed faster:
  - the cosine Gram matrix of the candidates is computed once (`primitives.gram`: blocks on
    and above the diagonal only, mirrored);
  - the list buffer shrinks to the live list in phases as R shrinks (each phase to 3/4 of the
    capacity; shorter lists sort faster);
  - while the list has more than 1024 candidates, the rows stay those of the whole Gram matrix,
    and every candidate's 17 most similar candidates (itself included; it is never in the odd
    half) are cached once, as a set (`primitives.top_k_by_bins`): an even-position token's max
    over the odd half is the max over its cached neighbours in the odd half, exact whenever
    there is one (an uncached candidate is no more similar); rows with none there are computed
    in full (a `lax.while_loop` over the few misses), so each step costs O(R * 17) instead of
    O(R^2). Shorter lists mask whole rows, of the Gram matrix compacted to the live list when
    it has more than 512 rows;
  - the per-step stable sort is `primitives.argsort` (integer sorts, several times faster on
    CPU than a float sort with an index payload);
  - on CPU, examples with large Gram matrices run one after another (`_chunks`).
An odd R (the official code assumes even R) puts the extra token in the even half, and r is
capped at the even half's size. Ties in similarity keep the earlier list position first
(stable sort; the official torch sort is unspecified on ties).
"""

from __future__ import annotations

import functools
from typing import List, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tcjax.compress import primitives as P
from tcjax.compress.registry import register
from tcjax.parallel.mesh import batch_shards, map_batch

# A phase's index buffer shrinks to the live list once the list is this fraction of it (with the
# cache, shrinking costs a slice only; 0.5 and 0.85 measured slower at N=4096).
_SHRINK = 0.75
# Below this capacity a phase runs to the end (small lists are cheap; fewer phases compile).
_MIN_CAP = 128
# Nearest neighbours cached per candidate, and rows computed in full per fallback round.
_NEIGHBOURS = 16
_FALLBACK_ROWS = 16
# The neighbour cache is used for phases with a larger capacity than this and than a quarter of
# the first list, when that list has more than twice as many candidates (building the cache reads
# the whole Gram matrix once; cached rows stay those of the whole matrix): 256 measured 0.8x at
# N=1024 against 1024; at N=576 (504 candidates) the cache did not pay, nor down to 256 at N=4096.
_CACHE_MIN_CAP = 256
# On CPU, examples whose Gram matrices exceed this together run in turn (see `_chunks`).
_CPU_GRAM_BYTES = 1 << 25


def dedup_schedule(num_candidates: int, n_div: int, dedup_step: int) -> List[Tuple[int, int]]:
  """Static (R, r) of every de-duplication step: R candidates before it, r removed by it."""
  steps, rem = [], num_candidates
  while n_div > 0:
    r = min(dedup_step, rem - n_div, (rem + 1) // 2)
    if r <= 0:
      break
    steps.append((rem, r))
    rem -= r
  return steps


def _phases(steps):
  """Groups steps into phases of a fixed (even) buffer capacity that shrinks with R."""
  phases, start = [], 0
  while start < len(steps):
    cap = steps[start][0] + steps[start][0] % 2
    end = start
    while end < len(steps) and (steps[end][0] > _SHRINK * cap or cap <= _MIN_CAP):
      end += 1
    phases.append((cap, start, max(end, start + 1)))
    start = max(end, start + 1)
  return phases


def _dedup_one(gram, valid, n_div, steps):
  """Runs the official de-duplication on one example.

  Args:
    gram: float32[R0, R0] cosine similarity of the candidates, in descending-attention order.
    valid: bool[R0] candidates that are real tokens with finite features.
    n_div: number of survivors.
    steps: static (R, r) schedule.

  Returns:
    int32[n_div] local indices of the surviving candidates.
  """
  r0 = gram.shape[0]
  pad = r0 % 2
  gram = jnp.pad(gram, ((0, pad), (0, pad)))
  valid = jnp.pad(valid, (0, pad))
  n = r0 + pad
  # The list `res` holds rows of the current `gram`, live prefix R; `ids` maps rows to
  # candidates. Built from `valid` so that they carry the batch sharding under vmap (a gather
  # from an unbatched buffer fails on Explicit mesh axes).
  zero = 0 * valid[:1].astype(jnp.int32)
  ids = jnp.arange(n, dtype=jnp.int32) + zero
  res = ids
  sched = jnp.asarray(np.asarray(steps, np.int32).reshape(-1, 2))
  nb = nb_sim = None
  for cap, start, end in _phases(steps):
    k = jnp.arange(cap // 2, dtype=jnp.int32)
    if cap > max(_CACHE_MIN_CAP, r0 // 4) and _uses_cache(r0):
      # Large lists: rows stay those of the whole `gram` (only the list shrinks), through one
      # cache of every candidate's most similar candidates.
      res = res[:cap]
      if nb is None:
        nb_sim, nb = P.top_k_by_bins(gram, min(_NEIGHBOURS + 1, gram.shape[0]))
      body = functools.partial(_cached_step, gram=gram, valid=valid, nb=nb, nb_sim=nb_sim,
                               sched=sched, k=k, cap=cap)
    else:
      if cap < gram.shape[0] and _uses_cache(gram.shape[0]):
        # Compact to the live list: later steps touch C x C only. A 2-D gather costs more than
        # it saves on a small matrix: the steps on rows of the whole matrix measured 0.93 / 0.95
        # of the time at N = 256 / 576 (224 / 504 candidates), but 1.06 at N=4096 (rows of 3584
        # after the cached phases), so only matrices above 512 rows are compacted.
        live = res[:cap]
        gram, valid, ids = gram[live[:, None], live[None, :]], valid[live], ids[live]
        res = jnp.arange(cap, dtype=jnp.int32) + zero
      res = res[:cap]
      body = functools.partial(_dense_step, gram=gram, valid=valid, sched=sched, k=k, cap=cap)
    res = jax.lax.fori_loop(start, end, body, res)
  return ids[res[:n_div]]


def _uses_cache(num_candidates):
  """Whether `_dedup_one`'s first phase (and so some phase) uses the neighbour cache."""
  return num_candidates > 2 * _CACHE_MIN_CAP


def _odd_half(b, k, rem, size):
  """bool[size]: the live tokens of the odd half `b` (list positions 2k + 1 < rem)."""
  live = (2 * k + 1 < rem).astype(jnp.int32)
  return jnp.zeros((size,), jnp.int32).at[b].add(live) > 0


def _cached_step(i, res, *, gram, valid, nb, nb_sim, sched, k, cap):
  """One step on the whole `gram` through the neighbour cache, O(R * L).

  An even-position token's max over the odd half is the max over its cached candidates in the
  odd half, exact whenever there is one (the uncached live candidates are no more similar);
  rows with none there (a few per step) are computed in full by a `lax.while_loop` over them.
  """
  rem, r = sched[i, 0], sched[i, 1]
  a, b = res[0::2], res[1::2]  # [C/2] each: even / odd list positions
  in_b = _odd_half(b, k, rem, gram.shape[0]) & valid
  hit = in_b[nb[a]]  # [C/2, L]
  m = jnp.where(hit, nb_sim[a], -jnp.inf).max(-1)
  need = (2 * k < rem) & valid[a] & ~hit.any(-1)

  def exact(state):
    m, need = state
    # The first few rows still needed (repeats of row 0 pad the selection).
    sel = jnp.flatnonzero(need, size=min(_FALLBACK_ROWS, cap // 2), fill_value=0)
    full = jnp.where(in_b[None, :], gram[a[sel]], -jnp.inf).max(-1)
    return m.at[sel].max(jnp.where(need[sel], full, -jnp.inf)), need.at[sel].set(False)

  m, _ = jax.lax.while_loop(lambda s: s[1].any(), exact, (m, need))
  return _next_list(a, b, m, valid[a], k, rem, r, cap)


def _dense_step(i, res, *, gram, valid, sched, k, cap):
  """One step on a small list: rows of the even half masked to the odd half's columns (of the
  whole, or compacted, `gram`)."""
  rem, r = sched[i, 0], sched[i, 1]
  a, b = res[0::2], res[1::2]
  in_b = _odd_half(b, k, rem, gram.shape[0]) & valid
  m = jnp.where(in_b[None, :], gram[a], -jnp.inf).max(-1)
  return _next_list(a, b, m, valid[a], k, rem, r, cap)


def _next_list(a, b, m, a_valid, k, rem, r, cap):
  """The official list update: drops the r even-half tokens with the highest max similarity
  `m`, then lists the surviving even tokens by descending `m`, then the odd half.
  Returns int32[cap]."""
  # Padding / non-finite tokens count as perfect duplicates: removed first.
  m = jnp.where(a_valid, m, jnp.inf)
  order = P.argsort(jnp.where(2 * k < rem, -m, jnp.inf))
  n_a = (rem + 1) // 2
  dest_a = jnp.where((k >= r) & (k < n_a), k - r, cap)
  dest_b = jnp.where(k < rem // 2, n_a - r + k, cap)
  new = jnp.zeros((cap,), jnp.int32).at[dest_a].set(a[order], mode="drop")
  return new.at[dest_b].set(b, mode="drop")


@register("vispruner", family="sampling", stages=("post_vit",), needs=("attn",),
          paper="VisPruner, Zhang et al., arXiv 2412.01818v2 (ICCV 2025)")
def vispruner(tokens, budget, *, attn=None, keys=None, important_ratio=0.5, dedup_step=8):
  """Keep `budget` tokens: the most attended, plus diverse ones from iterative de-duplication.

  Args:
    tokens: N tokens (usually the tower output).
    budget: tokens kept.
    attn: float[B, Q, N] attention probabilities; a token's importance is its mean over Q.
      NaN importance ranks last (see `primitives.rank_key`).
    keys: optional float[B, N, Dk] features for the similarity; default: the token features
      `tokens.x` (the official choice).
    important_ratio: fraction of the budget taken by attention (`int(budget * ratio)`); the
      README examples use 0.5 at budget 128 and 0.75 at budget 64; 1.0 is FasterVLM.
    dedup_step: candidates removed per de-duplication step (official: 8). Larger steps are
      faster and less faithful.

  Returns:
    `budget` tokens in raster order.
  """
  name = "vispruner"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  b, n, _ = tokens.x.shape
  attn = P.check_array(attn, "attn", name, (b, None, n)).astype(jnp.float32)
  feats = tokens.x if keys is None else P.check_array(keys, "keys", name, (b, n, None))
  if not 0.0 <= important_ratio <= 1.0:
    raise ValueError(f"{name}: important_ratio must be in [0, 1], got {important_ratio}")
  if not isinstance(dedup_step, int) or dedup_step < 1:
    raise ValueError(f"{name}: dedup_step must be a positive int, got {dedup_step!r}")
  n_imp = int(budget * important_ratio)
  n_div = budget - n_imp
  steps = dedup_schedule(n - n_imp, n_div, dedup_step)

  def one(importance, mask, f):
    key = P.rank_key(importance, mask)
    order = jnp.argsort(-key, stable=True).astype(jnp.int32)  # descending, ties: lower index
    imp, cand = order[:n_imp], order[n_imp:]
    if not steps:
      return jnp.concatenate([imp, cand[:n_div]])
    # Gather, then normalise: XLA fuses a normalisation feeding a gather into it and recomputes
    # each row's norm per element (~4x slower here).
    fn = P.l2_normalize(f[cand])  # [R0, D]
    if _uses_cache(n - n_imp):
      # Non-finite rows are zeroed: a NaN similarity makes its bin's max NaN in
      # `top_k_by_bins`, which ranks it below every number and hid the bin's real neighbours
      # from the cache (N=4096 with NaN padding selected differently from the dense steps).
      valid = mask[cand] & jnp.isfinite(fn).all(-1)
      gram = P.gram(jnp.where(valid[:, None], fn, 0.0))
    else:
      gram = P.gram(fn)
      # Normalised features are finite or NaN (inf / inf), and a NaN feature makes the row's
      # self-similarity NaN: the diagonal says which rows are finite without reading `fn` again
      # (the pass above measured ~1.05x at N = 256 / 576).
      valid = mask[cand] & jnp.isfinite(jnp.diagonal(gram))
    return jnp.concatenate([imp, cand[_dedup_one(gram, valid, n_div, steps)]])

  args = (attn.mean(1), tokens.mask, feats)
  idx = map_batch(jax.vmap(one), args, _chunks(b, n - n_imp, batch_shards(tokens.mask)))
  return P.gather(tokens, jnp.sort(idx, axis=-1))


def _chunks(batch, num_candidates, shards):
  """Sequential steps over the batch (`map_batch`). On CPU, examples whose Gram matrices
  together exceed `_CPU_GRAM_BYTES` run in turn: each call faults in its temporaries afresh, and
  at N=4096, batch 4 the Gram matrices with their cache took ~15% less time one example at a
  time (the whole call ~3%). Accelerators take the whole batch at once. Each step keeps a
  multiple of the batch's shards."""
  if jax.default_backend() != "cpu":
    return 1
  per = max(1, _CPU_GRAM_BYTES // (4 * num_candidates ** 2))
  steps = [c for c in range(1, batch + 1)
           if batch % c == 0 and (batch // c) % shards == 0 and batch // c <= max(per, shards)]
  return min(steps) if steps else 1
