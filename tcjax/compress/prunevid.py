"""PruneVid: static / dynamic split with temporal merging and spatial clustering before the LLM,
then a question-guided selection inside it.

Huang, Zhou, Han, "PruneVid: Visual Token Pruning for Efficient Video Large Language Models",
arXiv 2412.16117, ACL Findings 2025 (official code: Visual-AI/PruneVid, PLLaVA only; stage 1 in
`models/pllava/modeling_pllava.py`: `merge_frames_dynamic`, `cluster_dpc_knn`, `refine_clusters`,
`spatial_merge_tokens`, `compute_cluster_vectors`; stage 2 in `models/pllava/llama.py`:
`LlamaModelVTP.forward`, `LlamaAttention.forward`, and `models/pllava/elastic_cache.py`:
`VTPWindowCache`; defaults from `scripts/eval.sh`).

Axis legend: B batch, T frames, P tokens per frame, N = T * P tokens, D features, H heads,
Q query rows, M original patches.

Stage 1, `prunevid` (post_proj: the official acts on projected, pooled tokens, 16 frames of
12 x 12), per example:
  1. Temporal segments: DPC-kNN (k = 7) over the T frame means into int(T * 0.25) clusters; the
     official `refine_clusters` (`refine_clusters` here) keeps each cluster's longest runs of
     consecutive frames (a cluster whose runs all have length 1 dissolves), gives every other
     run to the neighbour with the longer run (the left one on ties); segments are the runs of
     equal labels.
  2. Static positions: for a segment of W frames and a spatial position, the mean cosine
     similarity over the W (W - 1) ordered pairs of its frames (the official sum of all pairs
     minus 1 per frame); > `tau` = 0.8 is static. A one-frame segment (the official divides by
     zero) is all dynamic.
  3. A segment's static tokens are averaged over its frames; when there are more than 14 of them
     they are clustered by DPC-kNN (k = 7) into int(0.5 n) clusters, each the plain mean of its
     members (`compute_cluster_vectors`; a member joins its nearest centre, the higher-scoring
     centre on ties).
  4. Each frame's dynamic tokens are clustered the same way (when more than 14).
The output is every static and dynamic cluster; a cluster takes the position of its centre (a
static one at the segment's first frame) and carries the patches of its members (a static
member: its position in every frame of the segment).

Stage 2, `prunevid_llm` (llm, at the input of decoder layer K with the attention of layer K - 1:
the official prunes after layer 10 of PLLaVA-7B's 32, i.e. K = 11; rescale for Gemma's depth):
  1. Score: softmax(q k^T / sqrt(d)) of layer K - 1 from queries and keys *before* RoPE and
     *without* the causal mask (`attn_weights_wo_pos`); the registration asks the decoder for
     exactly that (`llm_attn="raw"`: every valid token is a key). Rows: the tokens after the
     video (here the valid prompt rows, `text_mask`); reduced by the max over heads, then the max
     over rows.
  2. Per segment keep the top int(alpha * n) of its static tokens and, per frame, the top
     int(alpha * n) of its dynamic tokens (alpha = 0.4); kept tokens keep their positions.
  3. The official also drops the pruned tokens from the KV caches of layers 0..K-1
     (`VTPWindowCache.prompt_prefill`); the registration asks the decoder for it
     (`llm_kv="all"`), so decoding sees the kept tokens only in every layer.
Stage 2 reads the groups off `src`, so it needs no side channel from stage 1: a token carrying
patches of several frames is a static token of the segment starting at its first frame, any
other token is dynamic in its frame (on raw tokens every token is dynamic: top alpha per frame).

Static shapes. The official counts are data-dependent (how many positions are static, how many
tokens each group keeps). Both stages return `budget` slots, valid first, then padding
(`out.count()` is the official count). When the official count exceeds `budget` the
lowest-priority tokens are dropped with the patches they carry: in stage 1 those carrying the
fewest patches, in stage 2 those with the lowest score. `max_count` bounds stage 1's count.

Deviations from the official code (besides the capacity): batches are independent (the official
applies example 0's segments to the whole batch and asserts batch 1); the official DPC-kNN breaks
density ties with random noise, here the lower index counts as denser (deterministic); the
neighbour count is clipped to the group size (the official fails on fewer than k tokens); the
output is in raster order of the cluster positions (the contract), where the official orders
each segment as [static clusters, each frame's dynamic clusters], clusters by centre score, with
contiguous positions; the int(n * ratio) counts use Python floats on host-side tables, as the
official does.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tcjax.compress import primitives as P
from tcjax.compress.dpc_knn import pairwise_distance
from tcjax.compress.registry import register

PAPER = "PruneVid, Huang et al., arXiv 2412.16117 (ACL Findings 2025)"


def _floor_table(n: int, ratio: float) -> np.ndarray:
  """int32[n + 1] with int(i * ratio): the official Python-float counts, for a traced i
  (`primitives.lookup`)."""
  return np.array([int(i * ratio) for i in range(n + 1)], np.int32)


def _check_ratio(value, name: str, method: str) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
    raise ValueError(f"{method}: {name} must be a number in (0, 1], got {value!r}")
  return float(value)


def refine_clusters(labels: jax.Array) -> jax.Array:
  """PruneVid's `refine_clusters` of one example: int32[T] frame cluster labels (in [0, T)) ->
  refined labels, whose runs of equal labels are the temporal segments.

  Each label keeps its longest runs (all of them, if several are longest) unless its longest run
  has length 1; every other run is relabelled left to right: the neighbour label with the longer
  run at that moment wins, the left one on ties, 0 when there is no neighbour.
  """
  t = labels.shape[0]
  idx = jnp.arange(t)
  new_run = jnp.concatenate([jnp.ones((1,), bool), labels[1:] != labels[:-1]])
  run = jnp.cumsum(new_run) - 1
  length = jax.ops.segment_sum(jnp.ones((t,), jnp.int32), run, num_segments=t)[run]
  longest = jax.ops.segment_max(length, labels, num_segments=t)[labels]
  ref = jnp.where((longest >= 2) & (length == longest), labels, -1)

  def relabel(i, ref):
    later = (idx >= i) & (ref != -1)
    end = jnp.where(later.any(), jnp.argmax(later), t) - 1  # this run of -1 is [i, end]
    left = ref[jnp.maximum(i - 1, 0)]
    left_len = jnp.where(i > 0, i - 1 - jnp.max(jnp.where((idx < i) & (ref != left), idx, -1)),
                         0)
    right = ref[jnp.minimum(end + 1, t - 1)]
    right_len = jnp.where(
        end < t - 1, jnp.min(jnp.where((idx > end) & (ref != right), idx, t)) - end - 1, 0)
    tie = jnp.where(i > 0, left, jnp.where(end < t - 1, right, 0))
    label = jnp.where(left_len > right_len, left, jnp.where(right_len > left_len, right, tie))
    fill = (ref[i] == -1) & (idx >= i) & (idx <= end)  # ref[i] != -1: nothing to do here
    return jnp.where(fill, label, ref)

  return jax.lax.fori_loop(0, t, relabel, ref)


def _clusters(x, valid, label, count, k, count_max):
  """DPC-kNN of two groups held in one matrix `x: float32[P, D]`: the tokens with
  `valid: bool[P]` and `label: int32[P]` 0, and those with label 1, each into its `count`
  (int32[2], traced, at most the static `count_max`) clusters: int32[P] the centre index of each
  token (-1 outside both groups). Official tie: the centre with the higher score (the official
  centre order) wins.

  Each group is clustered on its own (`dpc_sq_dists` with `group`: tokens of different labels are
  never neighbours, denser tokens or members). The passes of `dpc_knn` (`primitives.dpc_sq_dists`,
  `dpc_scores`, `dpc_assign`) give the values of `density_peaks` and `nearest_centre` on each
  group's distance matrix, ~3.5x faster on CPU (no full row sort, no compare-and-select over
  P x P); two groups share one Gram matrix and one set of passes."""
  p, d = x.shape
  d2, dmax2 = P.dpc_sq_dists(x, valid, label)
  in_group = [valid & (label == g) for g in (0, 1)]
  size = jnp.stack([m.sum() for m in in_group])
  k_used = jnp.maximum(jnp.minimum(k, size), 1)[label]  # each token's group's k
  score = P.dpc_scores(d2, dmax2, valid, k_used, d, k_max=min(k, p))
  # `rank_in_group`'s order (highest first, ties to the lower index, NaN last) is lax.top_k's.
  score = jnp.where(jnp.isnan(score), -jnp.inf, score)
  centre = jnp.full((p,), -1, jnp.int32)
  for g in (0, 1):
    _, centres = jax.lax.top_k(jnp.where(in_group[g], score, -jnp.inf), count_max)
    ok = (jnp.arange(count_max) < count[g]) & in_group[g][centres]
    slot = P.dpc_assign(d2, centres, ok, d)
    centre = jnp.where(in_group[g], centres[slot], centre)
  return centre.astype(jnp.int32)


def max_count(grid, tokens_per_frame: int, *, cluster_ratio: float = 0.5,
              cluster_above: int = 14) -> int:
  """An upper bound of stage 1's token count for a clip of `grid[0]` frames and
  `tokens_per_frame` tokens each (every segment at least 2 frames long, the refined segments'
  property): a budget this large never truncates."""
  frames, p = grid[0], tokens_per_frame
  c = [i if i <= cluster_above else int(i * cluster_ratio) for i in range(p + 1)]
  per_segment = lambda w: max(c[s] + w * c[p - s] for s in range(p + 1))
  best = [0] + [None] * frames  # best[i]: most tokens from the first i frames
  for i in range(1, frames + 1):
    best[i] = max(((best[i - w] or 0) + per_segment(w) for w in range(2, i + 1)
                   if best[i - w] is not None), default=None)
  return min(best[frames] if best[frames] is not None else frames * c[p], frames * p)


@register("prunevid", family="merging", stages=("post_proj",), paper=PAPER)
def prunevid(tokens, budget, *, tau=0.8, temporal_segment_ratio=0.25, cluster_ratio=0.5, k=7,
             cluster_above=14):
  """PruneVid stage 1: temporal segments, static tokens merged over time, spatial clusters.

  Args:
    tokens: a clip's tokens, frame-major with the same P positions in every frame (the raw grid
      `Tokens.from_video`, or a per-frame pooled one, `pool` first, as PLLaVA pools to 12 x 12);
      at least int(1 / temporal_segment_ratio) frames.
    budget: output capacity (module docstring); `max_count` never truncates.
    tau: cosine similarity above which a position is static in a segment (official 0.8).
    temporal_segment_ratio: DPC-kNN clusters of the frames = int(T * ratio) (official 0.25).
    cluster_ratio: a group of n > `cluster_above` tokens becomes int(n * ratio) clusters
      (official 0.5).
    k: neighbours in the DPC-kNN densities, self included (official 7).
    cluster_above: groups larger than this are clustered (official 14).

  Returns:
    `budget` tokens in raster order of their positions (valid first, then padding); features are
    the plain means of the tokens they merge, `size` the patches they carry.
  """
  name = "prunevid"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  frames = tokens.grid[0]
  n = tokens.num_tokens
  tau = float(tau)
  ratio = _check_ratio(temporal_segment_ratio, "temporal_segment_ratio", name)
  cluster_ratio = _check_ratio(cluster_ratio, "cluster_ratio", name)
  for opt, val, low in (("k", k, 1), ("cluster_above", cluster_above, 0)):
    if isinstance(val, bool) or not isinstance(val, int) or val < low:
      raise ValueError(f"{name}: {opt} must be an int >= {low}, got {val!r}")
  segments = int(frames * ratio)
  if segments < 1 or n % frames:
    raise ValueError(f"{name}: needs video tokens of at least {int(np.ceil(1 / ratio))} frames "
                     f"with the same number of tokens each (temporal_segment_ratio={ratio}), "
                     f"got grid {tokens.grid} and N={n}")
  p = n // frames
  table = _floor_table(p, cluster_ratio)
  count_of = lambda m: jnp.where(m > cluster_above, P.lookup(table, m), m)
  count_max = int(max(c if i > cluster_above else i for i, c in enumerate(table)))
  idx_t = jnp.arange(frames)
  # Refined segments are at least 2 frames long (a label keeps only runs of >= 2 frames, and
  # every other run joins a neighbouring run), so there are at most T // 2 of them: the static
  # positions and time averages are computed for that many segments, not one slot per frame.
  slots = max(frames // 2, 1)

  def plan(x, mask, size):
    """rep_of int32[N] and priority float32[N] (patches carried by each representative) of one
    example."""
    xf = x.astype(jnp.float32).reshape(frames, p, -1)
    valid = mask.reshape(frames, p)
    # 1. Temporal segments from the frame means.
    means = (jnp.where(valid[..., None], xf, 0.0).sum(1)
             / jnp.maximum(valid.sum(1), 1)[:, None])
    fdist = pairwise_distance(means)
    fscore = P.density_peaks(fdist, jnp.ones((frames,), bool), min(k, frames))
    _, centres = jax.lax.top_k(fscore, segments)  # official order: by score
    labels = jnp.argmin(fdist[:, centres], axis=1).astype(jnp.int32)
    labels = labels.at[centres].set(jnp.arange(segments, dtype=jnp.int32))
    ref = refine_clusters(labels)
    is_start = jnp.concatenate([jnp.ones((1,), bool), ref[1:] != ref[:-1]])
    start = jax.lax.cummax(jnp.where(is_start, idx_t, 0))  # each frame's segment start
    seg = jnp.cumsum(is_start) - 1  # each frame's segment, < slots
    member = (seg[None, :] == jnp.arange(slots)[:, None]).astype(jnp.float32)  # [segment, frame]
    width = member.sum(1)
    # 2. Static positions: mean cosine over ordered pairs = (|sum of unit vectors|^2 - W) / W(W-1).
    unit = jnp.einsum("st,tpd->spd", member, P.l2_normalize(xf))
    pairs = jnp.maximum(width * (width - 1), 1.0)[:, None]
    sim = ((unit * unit).sum(-1) - width[:, None]) / pairs
    whole = jnp.einsum("st,tp->sp", member, (~valid).astype(jnp.float32)) == 0
    static = (width[:, None] >= 2) & whole & (sim > tau)  # [segment, P]
    static_t = static[seg]  # [T, P]
    # 3. Static clusters per segment, over the time-averaged tokens, and 4. dynamic clusters per
    # frame. A segment's static tokens (time-averaged) and its first frame's dynamic tokens sit
    # at disjoint positions: one P x P matrix per frame holds both groups (label 0 static, 1
    # dynamic), T Gram matrices per example instead of T + T // 2.
    smean = jnp.einsum("st,tpd->spd", member, xf) / jnp.maximum(width, 1.0)[:, None, None]
    dyn = valid & ~static_t
    s_here = static_t & is_start[:, None]  # [T, P] static tokens clustered in frame t's matrix
    z = jnp.where(s_here[..., None], smean[seg], xf)
    counts = jnp.stack([count_of(s_here.sum(1)), count_of(dyn.sum(1))], 1)  # [T, 2]
    centre = jax.vmap(_clusters, (0, 0, 0, 0, None, None))(
        z, s_here | dyn, dyn.astype(jnp.int32), counts, k, count_max)
    # A static token's centre: in the segment's first frame's matrix.
    rep_static = start[:, None] * p + centre[start]
    rep = jnp.where(static_t, rep_static, jnp.where(dyn, idx_t[:, None] * p + centre, -1))
    rep = rep.reshape(-1).astype(jnp.int32)
    carried = P.slot_sum(jnp.where(rep >= 0, size, 0.0)[None], rep[None], n)[0]
    return rep, carried

  rep_of, priority = jax.vmap(plan)(tokens.x, tokens.mask, tokens.size)
  # Plain means (weight 1 per member), computed for the `budget` output slots only.
  return P.merge_into(tokens, rep_of, None, budget, priority, weight=jnp.ones_like(tokens.size))


def token_groups(tokens) -> jax.Array:
  """int32[B, N] stage 2's group of each token, read off `src`: a token carrying patches of
  several frames is static, in group f = its first frame (one group per segment); any other
  token is dynamic, in group T + its frame. Padding: group 2T."""
  t, h, w = tokens.grid
  frame = jnp.arange(tokens.num_patches, dtype=jnp.int32) // (h * w)
  n = tokens.num_tokens
  slot = jnp.where(tokens.src >= 0, tokens.src, n)
  first = jax.vmap(lambda s: jax.ops.segment_min(frame, s, num_segments=n + 1))(slot)[:, :n]
  last = jax.vmap(lambda s: jax.ops.segment_max(frame, s, num_segments=n + 1))(slot)[:, :n]
  group = jnp.where(last > first, first, t + first)
  return jnp.where(tokens.mask & (last >= 0), group, 2 * t).astype(jnp.int32)


@register("prunevid_llm", family="sampling", stages=("llm",), needs=("attn_heads", "text_mask"),
          paper=PAPER, llm_attn="raw", llm_kv="all")
def prunevid_llm(tokens, budget, *, attn_heads=None, text_mask=None, alpha=0.4):
  """PruneVid stage 2: per group keep the int(alpha * n) tokens the prompt attends most.

  Args:
    tokens: the image tokens entering decoder layer K (stage 1's output, or any tokens).
    budget: output capacity; the official count is at most int(alpha * N) (`keep=alpha` never
      truncates).
    attn_heads: float[B, H, Q, N] per-head attention of the Q prompt rows to the image tokens
      (official: before RoPE, no mask; the decoder provides that for this method).
    text_mask: bool[B, Q] the valid prompt rows.
    alpha: fraction of each group kept, int(alpha * n) (official 0.4).

  Returns:
    `budget` tokens: the kept ones in raster order, then padding; kept tokens are unchanged.
  """
  name = "prunevid_llm"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  alpha = _check_ratio(alpha, "alpha", name)
  b, n, _ = tokens.x.shape
  attn = P.check_array(attn_heads, "attn_heads", name, (b, None, None, n)).astype(jnp.float32)
  q = attn.shape[2]
  rows = P.check_array(text_mask, "text_mask", name, (b, q), floating=False).astype(bool)
  # Max over heads, then over the valid rows (a NaN propagates and ranks last).
  score = jnp.where(rows[:, None, :, None], attn, -jnp.inf).max(axis=(1, 2))
  t = tokens.grid[0]
  group = token_groups(tokens)
  sizes = jax.vmap(lambda g: jax.ops.segment_sum(jnp.ones_like(g), g, num_segments=2 * t + 1))(
      group)
  quota = jnp.take_along_axis(P.lookup(_floor_table(n, alpha), sizes), group, axis=1)
  keep = P.rank_in_group(score, group) < quota
  return P.select_where(tokens, keep, score, budget)
