"""HoliTom: holistic temporal merging before the LLM (global temporal segmentation, static tokens
merged across each segment's frames, dynamic tokens by attention) and merging inside it.

Shao et al., "HoliTom: Holistic Token Merging for Fast Video Large Language Models", arXiv
2505.21334, NeurIPS 2025 (official code: cokeshao/HoliTom; `holitom/llava_arch.py`:
`select_static_windows`, `get_static_dynamic_features`, `holitom`, `cluster_dpc_knn`,
`merge_tokens_by_attention_density`, `merge_tokens_by_density`, `merge_tokens_by_clustering`;
`holitom/modeling_qwen2.py`: `Qwen2Model_holitom.forward`; defaults from the code's environment
fallbacks and `scripts/eval_ov-7b_holitom.sh`).

Axis legend: B batch, T frames, P tokens per frame, N = T * P tokens, D features, M patches.

Outer stage, `holitom` (post_proj: the official acts on LLaVA-OneVision's projected, 2 x 2-pooled
frames), per example:
  1. s[t, p] = cosine similarity of position p in frames t and t + 1.
  2. Global temporal segmentation (`select_static_windows`): a window [a, b] saves
     (b - a) * #{p: s[t, p] > tau for every t in [a, b)} tokens; a dynamic programme over the
     frames picks the partition into windows (singletons allowed, at most `max_window` frames)
     that saves the most (on ties: no window, then the shortest window ending at the frame).
  3. r' = min(r N / (N - saved), 1), so that about r N tokens remain.
  4. Per window of >= 2 frames, its static positions (similar across the whole window) are
     averaged over its frames; DPC-kNN (k = min(7, c)) picks c = round(n_static r') centres and
     every other static token joins its nearest centre (the lower index on ties); a cluster is
     beta * centre + (1 - beta) * mean(other members), beta = 0.6 (the official default: its
     `NO_BETA` check reads "0" when the variable is unset).
  5. Per frame, its dynamic positions keep ceil(n_dynamic r') tokens: round(that (1 - D)) with
     the highest ViT attention (dominant) and the rest as DPC-kNN clusters of the others
     (contextual, beta-merged). The official D is 0 (`contextual=0.0`): the dynamic tokens are the
     attention top-k and the others are dropped.
  Scores: the ViT attention each patch receives, mean over heads and query rows, of the layer
  whose output the projector reads (LLaVA-OneVision runs SigLIP without its last layer; in
  PaliGemma that is the last layer: `signal_layer=-1` in the plan entry), pooled like the
  features (a per-patch score is averaged over each token's patches).

Inner stage, `holitom_llm` (llm at decoder layer K with the attention of layer K - 1; official
K = 18 of Qwen2-7B's 28 layers, r = 0.5, i.e. `keep=0.5`; rescale K for Gemma):
  1. Keep the `budget` image tokens most attended by the last prompt token (`scores`: its row,
     mean over heads; the official takes the last row of the prompt, whose span there includes
     a trailing newline token).
  2. Each other token joins the kept token whose hidden state is most cosine-similar (before
     any merging; equal similarities go to the more attended kept token), and is merged by the
     official sequential rule: in index order, kept <- (kept + token) / 2, so later tokens weigh
     more (`merge="mean"`: the size-weighted mean instead).
  Kept tokens keep their positions; the decoder takes the merged hidden states (a merging
  method at the llm stage).

Static shapes. The outer stage's count is data-dependent (sum over windows of
round(n_static r') + W ceil(n_dynamic r')); it returns `budget` slots, valid first, then padding
(`out.count()`). By default r = budget / N (the official RETAIN_RATIO: `keep=0.1` in a plan is
the official 0.1); rounding up per frame can give the official a few tokens more than that, and
when the count exceeds the budget the dynamic tokens of lowest attention are dropped (static
clusters first, then by attention). `retain_ratio=r` fixes r and leaves the budget as capacity
only: a budget of at least r N + 1.5 T never truncates.

Deviations from the official code (besides the capacity): the official computes r' and the
counts in float64 (ceil(30 * 0.1) is 4 there); here they are exact rationals when r N is an
integer (the default), float32 otherwise; DPC-kNN density ties are broken by index instead of
random noise (with one centre, k = 1 makes every density equal, so the official choice is random
there); batches are independent (the official is batch 1); the output is in raster order of the
token positions (a static cluster at its window's first frame: LLaVA-Video's "grid" order
without the newline tokens), where LLaVA-OneVision's order is [static, each frame's dynamic] per
window with contiguous positions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tcjax.compress import primitives as P
from tcjax.compress.dpc_knn import pairwise_distance
from tcjax.compress.registry import register

PAPER = "HoliTom, Shao et al., arXiv 2505.21334 (NeurIPS 2025)"


def static_windows(similar: jax.Array, max_window: int = 1024):
  """HoliTom's global temporal segmentation of one example.

  Args:
    similar: bool[T - 1, P], position p is similar in frames t and t + 1 (s > tau).
    max_window: the longest window.

  Returns:
    (start int32[T]: the first frame of each frame's window, saved int32[]: the tokens the
     windows save, sum of (W - 1) * static positions).
  """
  t = similar.shape[0] + 1
  # breaks[i, p]: dissimilar transitions before frame i; [a, b] is static at p iff none between.
  breaks = jnp.concatenate([jnp.zeros((1, similar.shape[1]), jnp.int32),
                            jnp.cumsum(~similar, axis=0, dtype=jnp.int32)])
  same = (breaks[:, None, :] == breaks[None, :, :]).sum(-1)  # [a, b]
  idx = jnp.arange(t)
  gain = same * jnp.maximum(idx[None, :] - idx[:, None], 0)

  def step(i, carry):
    dp, prev = carry
    base = jnp.where(i > 0, dp[jnp.maximum(i - 1, 0)], 0)
    before = jnp.where(idx > 0, dp[jnp.maximum(idx - 1, 0)], 0)
    fits = (idx <= i - 1) & (idx >= i + 1 - max_window)
    value = jnp.where(fits, before + gain[:, i], -1)
    best = value.max()
    first = t - 1 - jnp.argmax((value == best)[::-1])  # the shortest such window
    better = best > base
    return dp.at[i].set(jnp.where(better, best, base)), prev.at[i].set(jnp.where(better, first, i))

  # Carries start from the data (not constants), so that under vmap on an Explicit-sharded
  # batch they are batched from the first step.
  zeros = gain[0] * 0
  dp, prev = jax.lax.fori_loop(0, t, step, (zeros, zeros))

  def back(j, carry):
    cursor, is_start = carry
    i = t - 1 - j
    here = i == cursor
    return jnp.where(here, prev[i] - 1, cursor), is_start | (here & (idx == prev[i]))

  _, is_start = jax.lax.fori_loop(0, t, back, (prev[t - 1] * 0 + t - 1, prev < 0))
  return jax.lax.cummax(jnp.where(is_start, idx, 0)).astype(jnp.int32), dp[t - 1]


def _scaled(m, num, den, mode: str):
  """int32: ceil ("ceil") or round-half-even ("round") of m * min(num / den, 1) for int32 m and
  den; exact when `num` (a static Python number) is an integer."""
  if float(num).is_integer():
    q = m * int(num)
    low = q // den
    rest = q - low * den
    if mode == "ceil":
      out = low + (rest > 0)
    else:
      out = low + ((2 * rest > den) | ((2 * rest == den) & (low % 2 == 1)))
  else:
    v = m.astype(jnp.float32) * (jnp.float32(num) / den.astype(jnp.float32))
    out = jnp.ceil(v) if mode == "ceil" else jnp.round(v)
  return jnp.where(num >= den, m, out).astype(jnp.int32)


def _beta_clusters(x, valid, count, k, beta):
  """DPC-kNN of one group `x: float32[P, D]` (`valid: bool[P]`) into `count` (traced) centres,
  HoliTom's way. Returns (centre int32[P]: each token's centre, -1 outside or when count is 0;
  value float32[P, D]: at a centre, beta * centre + (1 - beta) * mean of its other members)."""
  p = x.shape[0]
  idx = jnp.arange(p)
  dist = pairwise_distance(x)
  score = P.density_peaks(dist, valid, jnp.maximum(jnp.minimum(k, count), 1))
  is_centre = valid & (P.rank_in_group(score) < count)
  centre = P.nearest_centre(dist, is_centre, idx.astype(jnp.float32))  # ties: lower index
  centre = jnp.where(valid & (count > 0), centre, -1)
  other = (centre >= 0) & ~is_centre
  slot = jnp.where(other, centre, p)
  total = jax.ops.segment_sum(jnp.where(other[:, None], x, 0.0), slot, num_segments=p + 1)[:p]
  many = jax.ops.segment_sum(other.astype(jnp.float32), slot, num_segments=p + 1)[:p]
  value = jnp.where(many[:, None] > 0,
                    beta * x + (1 - beta) * total / jnp.maximum(many, 1.0)[:, None], x)
  return centre, value


@register("holitom", family="merging", stages=("post_proj",), needs=("scores",), paper=PAPER)
def holitom(tokens, budget, *, scores=None, retain_ratio=None, tau=0.8, beta=0.6,
            contextual=0.0, k=7, max_window=1024):
  """HoliTom's outer stage: global temporal segmentation, static tokens merged per window,
  dynamic tokens by attention.

  Args:
    tokens: a clip's tokens, frame-major with the same P positions in every frame (the raw grid
      `Tokens.from_video`, or a per-frame pooled one, `pool` first, as LLaVA-OneVision pools
      2 x 2); one frame works too (then attention top-k).
    budget: output capacity; also the retained fraction r = budget / N unless `retain_ratio`.
    scores: float[B, N] ViT attention received per token, or float[B, M] per patch (averaged
      over each token's patches).
    retain_ratio: the official RETAIN_RATIO r in (0, 1]; None (default): budget / N.
    tau: similarity above which a position is static across consecutive frames (official 0.8
      in the code; the 7B scripts use 0.65 with r = 0.10 and 0.80 with r >= 0.15).
    beta: weight of a cluster's centre in its merged value (official 0.6).
    contextual: the official D, fraction of each frame's dynamic tokens that are DPC-kNN
      clusters instead of attention top-k (official 0).
    k: neighbours in the DPC-kNN densities, at most the number of centres (official 7).
    max_window: the longest window in frames (official 1024).

  Returns:
    `budget` tokens in raster order of their positions (valid first, then padding).
  """
  name = "holitom"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  frames = tokens.grid[0]
  n = tokens.num_tokens
  if n % frames:
    raise ValueError(f"{name}: needs the same number of tokens in each of the {frames} frames, "
                     f"got N={n}")
  score = P.scores_per_token(tokens, scores, name)
  if retain_ratio is not None and (isinstance(retain_ratio, bool) or not isinstance(
      retain_ratio, (int, float)) or not 0 < retain_ratio <= 1):
    raise ValueError(f"{name}: retain_ratio must be None or a number in (0, 1], "
                     f"got {retain_ratio!r}")
  for opt, val in (("beta", beta), ("contextual", contextual)):
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 <= val <= 1:
      raise ValueError(f"{name}: {opt} must be a number in [0, 1], got {val!r}")
  for opt, val in (("k", k), ("max_window", max_window)):
    if isinstance(val, bool) or not isinstance(val, int) or val < 1:
      raise ValueError(f"{name}: {opt} must be a positive int, got {val!r}")
  p = n // frames
  num = budget if retain_ratio is None else retain_ratio * n  # r N, the numerator of r'
  if abs(num - round(num)) < 1e-9:  # e.g. 0.1 * 160: exact arithmetic below
    num = int(round(num))
  # round(c * (1 - D)) of the official, with Python floats, for every per-frame count c.
  dominant_of = np.array([round(c * (1 - contextual)) for c in range(p + 1)], np.int32)
  idx_t = jnp.arange(frames)
  idx_p = jnp.arange(p)
  clusters = jax.vmap(_beta_clusters, (0, 0, 0, None, None))

  def plan(x, mask, a):
    """rep_of int32[N], features float32[N, D], priority float32[N] of one example."""
    xf = x.astype(jnp.float32).reshape(frames, p, -1)
    valid = mask.reshape(frames, p)
    att = a.reshape(frames, p)
    unit = P.l2_normalize(xf)
    sim = (unit[:-1] * unit[1:]).sum(-1)  # [T - 1, P]
    similar = (sim > tau) & valid[:-1] & valid[1:]
    start, saved = static_windows(similar, max_window)
    den = jnp.int32(n) - saved
    member = (start[None, :] == idx_t[:, None]).astype(jnp.float32)  # [slot = start, frame]
    width = member.sum(1)
    end = jnp.clip(idx_t + width.astype(jnp.int32) - 1, 0, frames - 1)
    breaks = jnp.concatenate([jnp.zeros((1, p), jnp.int32),
                              jnp.cumsum(~similar, axis=0, dtype=jnp.int32)])
    static = (width[:, None] >= 2) & (breaks[end] == breaks)  # [slot, P]
    static_t = static[start]
    # Static clusters of each window (slot = its first frame).
    smean = jnp.einsum("st,tpd->spd", member, xf) / jnp.maximum(width, 1.0)[:, None, None]
    n_static = static.sum(1).astype(jnp.int32)
    s_centre, s_value = clusters(smean, static, _scaled(n_static, num, den, "round"), k, beta)
    # Dynamic tokens of each frame: dominant by attention, contextual by clustering.
    dyn = valid & ~static_t
    keep = _scaled(dyn.sum(1).astype(jnp.int32), num, den, "ceil")
    n_dom = P.lookup(dominant_of, keep)
    dominant = dyn & (P.rank_in_group(att, jnp.where(dyn, 0, 1)) < n_dom[:, None])
    centre_t = s_centre[start]  # -1 where the window keeps no static cluster
    rep = jnp.where(static_t & (centre_t >= 0), start[:, None] * p + centre_t, -1)
    rep = jnp.where(dominant, idx_t[:, None] * p + idx_p, rep)
    value = jnp.where((s_centre == idx_p)[..., None], s_value, xf)  # static centres at slot
    if contextual > 0:
      rest = dyn & ~dominant
      c_centre, c_value = clusters(xf, rest, keep - n_dom, k, beta)
      rep = jnp.where(rest & (c_centre >= 0), idx_t[:, None] * p + c_centre, rep)
      value = jnp.where((rest & (c_centre == idx_p))[..., None], c_value, value)
    static_rep = (s_centre == idx_p)  # a static cluster's representative (frame = its slot)
    priority = jnp.where(static_rep, jnp.inf, att)
    return rep.reshape(-1).astype(jnp.int32), value.reshape(n, -1), priority.reshape(-1)

  rep_of, x_rep, priority = jax.vmap(plan)(tokens.x, tokens.mask, score)
  return P.merge_into(tokens, rep_of, x_rep, budget, priority)


@register("holitom_llm", family="merging", stages=("llm",), needs=("scores",), paper=PAPER)
def holitom_llm(tokens, budget, *, scores=None, merge="official"):
  """HoliTom's inner stage: keep the most attended tokens, merge every other one into the kept
  token most similar to it.

  Args:
    tokens: the image tokens entering decoder layer K (their hidden states).
    budget: tokens kept (official round(N (1 - r)) with r = 0.5: `keep=0.5`).
    scores: float[B, N] the last prompt token's attention to each image token in layer K - 1
      (mean over heads).
    merge: "official" (sequential pairwise averages, later tokens weigh more) or "mean" (the
      size-weighted mean of everything merged).

  Returns:
    `budget` tokens in raster order: the kept ones, with merged hidden states.
  """
  name = "holitom_llm"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  if merge not in ("official", "mean"):
    raise ValueError(f"{name}: merge must be 'official' or 'mean', got {merge!r}")
  b, n, _ = tokens.x.shape
  key = P.rank_key(P.check_scores(tokens, scores, name), tokens.mask)
  kept = P.top_indices(key, budget)  # [B, K] ascending
  idx = jnp.arange(n, dtype=jnp.int32)

  def plan(x, valid, key, kept):
    xf = x.astype(jnp.float32)
    is_kept = jnp.zeros((n,), bool).at[kept].set(True) & valid
    unit = P.l2_normalize(xf)
    by_attention = kept[jnp.argsort(-key[kept], stable=True)]  # official tie order
    sim = unit @ unit[by_attention].T  # [N, K]
    target = by_attention[jnp.argmax(sim, axis=-1)]
    rep = jnp.where(is_kept, idx, jnp.where(valid, target, -1))
    if merge == "mean":
      return rep, xf  # merge_into takes the size-weighted mean
    # Sequential (h + s) / 2 in index order: a target with m sources keeps 2^-m of its own
    # value, and its j-th source (from 0, in index order) 2^-(m - j).
    src = valid & ~is_kept
    order = jnp.argsort(jnp.where(src, rep, n) * n + idx)  # sources grouped by target, in order
    grouped = jnp.where(src, rep, n)[order]
    first = jnp.concatenate([jnp.ones((1,), bool), grouped[1:] != grouped[:-1]])
    pos = jnp.arange(n)
    j = jnp.zeros((n,), jnp.int32).at[order].set(pos - jax.lax.cummax(jnp.where(first, pos, 0)))
    m = jax.ops.segment_sum(src.astype(jnp.int32), jnp.where(src, rep, n), num_segments=n + 1)
    w = jnp.where(src, jnp.exp2(-(m[jnp.minimum(rep, n)] - j).astype(jnp.float32)), 0.0)
    added = jax.ops.segment_sum(w[:, None] * xf, jnp.where(src, rep, n), num_segments=n + 1)[:n]
    return rep, jnp.exp2(-m[:n].astype(jnp.float32))[:, None] * xf + added

  rep_of, x_rep = jax.vmap(plan)(tokens.x, tokens.mask, key, kept)
  return P.merge_into(tokens, rep_of, x_rep if merge == "official" else None, budget, key)
