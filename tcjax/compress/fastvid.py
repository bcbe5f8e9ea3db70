"""FastVID: dynamic temporal segmentation, then density-based spatio-temporal pruning of a clip.

Shen et al., "FastVID: Dynamic Density Pruning for Fast Video Large Language Models",
arXiv 2503.11187, NeurIPS 2025 (official code: LunarShen/FastVID; the parallel LLaVA-OneVision
version, `fastvid_llavaonevision/.../language_model/modeling_qwen2.py`, the "FastVID" block of
`Qwen2Model.forward`, run on the projected video tokens before decoder layer 0).

Axis legend: B batch, F frames, n = h * w tokens per frame, N = F * n, D features,
S salient and C context tokens per frame, m = n - S non-salient tokens per frame,
A = F * C anchor slots, J = F * m non-salient tokens of a clip.

Official behaviour (followed here), per clip:
  0. Budget: every frame keeps R = budget // F tokens (official R = int(n * retention_ratio)),
     S = R - int(R * context_ratio) salient ones and C = R - S context ones.
  1. DySeg. g_f is frame f's vector, s_t = cos(g_t, g_t+1). A cut follows frame t when s_t is
     one of the `min_segments - 1` lowest or below `cut_similarity`; segments run between cuts.
  2. Context tokens per frame. A segment of L frames owns C * L of them, shared by its anchor
     frames (every `anchor_stride`-th frame counted back from its last frame):
     (C * L) // ceil(L / anchor_stride) each, none for the other frames (a 1-frame segment: C).
  3. ATS: each frame keeps its S tokens with the highest `scores`.
  4. Density, per frame over its non-salient tokens: DPC-kNN with k = 4 (self included),
     distances / sqrt(D), score rho * delta (`dpc_knn.dpc_scores`).
  5. DTM. A frame's anchors are its `count` non-salient tokens of highest density score. A frame
     whose count is C (1-frame segments) gathers its own non-salient tokens; a frame with more
     (an anchor frame of a longer segment) gathers those of every frame of its segment. Each
     token joins the most cosine-similar anchor of that frame (density order on ties), and
     anchor <- w * anchor + (1 - w) * mean(members), w = max(1 / (members + 1), anchor_weight).
     A token of a segment with several anchor frames is gathered once by each of them.
  6. Salient tokens and anchors go on in their original order.

Where this port differs, and why:
  - Signals. PaliGemma's SigLIP has no MAP head, whose probe attention (ATS) and pooled output
    (frame vector) the LLaVA-OneVision version reads: `scores` is the attention each patch
    receives in the ViT signal layer (what the model provides at post_proj), and g_f is the mean
    of the frame's tokens, as the official Qwen2.5-VL port computes it.
  - Positions. The official sets the decoder's position ids to the kept token indices (gaps
    left); tcjax's decoder numbers the tokens that reach it contiguously, as for every method
    acting before it. `pos` keeps each token's origin.
  - Ties. The official adds U(0, 1) * 1e-6 to the density (non-deterministic); here density ties
    go to the lower index unless `rng` is given, which restores the noise.
  - Official failures made total: with fewer than `min_segments` frames (the official
    `topk(c - 1)` fails) every transition is a cut; a frame's context count is capped at its
    non-salient tokens (the official `topk` fails beyond); an anchor always joins itself (the
    official argmax could send an exact duplicate to an earlier anchor, leaving an anchor that
    carries no patch).
  - Bookkeeping for the contract: a token gathered by several anchor frames is counted (`src`,
    `size`) with its anchor in the nearest anchor frame at or after its own frame, the frame
    whose group of `anchor_stride` frames it falls in; the anchors' features still average every
    member, as the official does.
  - Output: `budget` slots; F * (S + C) <= budget are used at most, fewer when a segment's share
    does not divide evenly, and the rest is padding (`out.count()`). Batches of any size.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tcjax.compress import primitives as P
from tcjax.compress.dpc_knn import dpc_scores, pairwise_distance
from tcjax.compress.registry import register

DENSITY_K = 4  # official: torch.topk(dist, k=4, largest=False), the token itself included


def frame_plan(g: jax.Array, context: int, non_salient: int, min_segments: int,
               cut_similarity: float, anchor_stride: int):
  """DySeg and the context counts of one clip.

  Args:
    g: float[F, D] frame vectors.
    context: C, context tokens per frame.
    non_salient: m, the cap on a frame's count.
    min_segments, cut_similarity, anchor_stride: the options of `fastvid`.

  Returns:
    (seg int32[F] segment of each frame, count int32[F] context tokens of each frame,
    group int32[F] the anchor frame each frame's tokens are counted with).
  """
  f = g.shape[0]
  gn = P.l2_normalize(g)
  sim = jnp.sum(gn[:-1] * gn[1:], -1)  # [F-1] transition t -> t+1
  cut = sim < cut_similarity
  lowest = min(min_segments - 1, f - 1)
  if lowest > 0:
    _, low = jax.lax.top_k(-sim, lowest)  # ties: the earlier transition
    cut = cut.at[low].set(True)
  frames = jnp.arange(f, dtype=jnp.int32)
  seg = jnp.concatenate([jnp.zeros((1,), jnp.int32), jnp.cumsum(cut, dtype=jnp.int32)])
  length = jax.ops.segment_sum(jnp.ones((f,), jnp.int32), seg, num_segments=f)[seg]
  last = jax.ops.segment_max(frames, seg, num_segments=f)[seg]
  back = last - frames  # frames to the segment's end
  anchors_in_seg = -(-length // anchor_stride)
  count = jnp.where(back % anchor_stride == 0, (context * length) // anchors_in_seg, 0)
  return seg, jnp.minimum(count, non_salient), frames + back % anchor_stride


def density_anchors(x_ns, v_ns, count, context: int, noise=None):
  """Every frame's `count` non-salient tokens of highest density score, as the clip's anchor
  slots in (frame, density rank) order: A = F * C slots suffice (a segment of L frames has at
  most C * L anchors).

  Args:
    x_ns: float32[F, m, D] non-salient tokens; v_ns: bool[F, m] their validity.
    count: int32[F] anchors of each frame; context: C; noise: optional float[F, m].

  Returns:
    (anchor int32[A] index into the J = F * m non-salient tokens, ok bool[A] slot used).
  """
  f, m, _ = x_ns.shape
  dist = jax.vmap(pairwise_distance)(x_ns)  # [F, m, m]
  k = min(DENSITY_K, m)
  if noise is None:
    density = jax.vmap(lambda dd, v: dpc_scores(dd, v, k))(dist, v_ns)
  else:
    density = jax.vmap(lambda dd, v, z: dpc_scores(dd, v, k, z))(dist, v_ns, noise)
  _, order = jax.lax.top_k(density, m)  # [F, m] density order (ties: lower index)
  frame_of = jnp.arange(f)[:, None]
  rank = jnp.zeros((f, m), jnp.int32).at[frame_of, order].set(jnp.arange(m, dtype=jnp.int32))
  key = jnp.where((rank < count[:, None]) & v_ns, frame_of * m + rank, f * m).reshape(-1)
  neg_key, anchor = jax.lax.top_k(-key, f * context)  # the smallest keys
  return anchor.astype(jnp.int32), -neg_key < f * m


def merge_into_anchors(x_ns, v_ns, anchor, ok, seg, count, group, context: int,
                       anchor_weight: float):
  """DTM: every anchor gathers the tokens its frame covers and is merged with their mean.

  A frame whose count is C gathers its own frame, one with more its whole segment; each token
  joins the most similar anchor of each frame that gathers it (the first in density order on
  ties; an anchor always joins itself).

  Args:
    x_ns: float32[F, m, D]; v_ns: bool[F, m]; anchor, ok: `density_anchors`' slots [A];
    seg, count, group: `frame_plan`'s int32[F]; context: C; anchor_weight: beta.

  Returns:
    (merged float32[A, D] anchor features, target int32[J] the slot of the anchor each token is
    counted with, the one of its group's anchor frame, or -1).
  """
  f, m, d = x_ns.shape
  a_slots = anchor.shape[0]
  tokens = x_ns.reshape(-1, d)
  a_frame = anchor // m
  j_frame = jnp.arange(f * m) // m
  j_idx = jnp.arange(f * m)
  single = (count[a_frame] == context)[:, None] & (j_frame[None, :] == a_frame[:, None])
  multi = (count[a_frame] > context)[:, None] & (seg[j_frame][None, :] == seg[a_frame][:, None])
  gathers = ok[:, None] & v_ns.reshape(-1)[None, :] & (single | multi)  # [A, J]
  xn = P.l2_normalize(tokens)
  sim = jnp.where(gathers, jnp.einsum("ad,jd->aj", xn[anchor], xn), -jnp.inf)
  # best[g, j]: the slot of token j's most similar anchor of frame g (>= A: none).
  best_sim = jax.ops.segment_max(sim, a_frame, num_segments=f)  # [F, J]
  slots = jnp.arange(a_slots, dtype=jnp.int32)[:, None]
  is_best = gathers & (sim == best_sim[a_frame])
  best = jax.ops.segment_min(jnp.where(is_best, slots, a_slots), a_frame, num_segments=f)
  own = jnp.full((f * m,), -1, jnp.int32).at[jnp.where(ok, anchor, f * m)].set(
      slots[:, 0], mode="drop")  # [J] the slot a token is the anchor of
  best = best.at[j_frame, j_idx].set(jnp.where(own >= 0, own, best[j_frame, j_idx]))
  member = (best[a_frame] == slots).astype(jnp.float32)  # [A, J]
  n_members = member.sum(1)
  mean = (member @ tokens) / jnp.maximum(n_members, 1.0)[:, None]
  w = jnp.maximum(1.0 / (n_members + 1.0), anchor_weight)[:, None]
  merged = w * tokens[anchor] + (1.0 - w) * mean
  target = best[group[j_frame], j_idx]
  return merged, jnp.where(target < a_slots, target, -1)


def _clip_plan(x, s, valid, noise, *, grid, budget, salient, context, min_segments,
               cut_similarity, anchor_stride, anchor_weight):
  """One clip: (slot int32[N] of each token or -1, rep int32[budget] the token of each slot,
  x float32[budget, D] the slots' features, the anchors' merged).

  Args:
    x: float[N, D]; s: float32[N] scores; valid: bool[N]; noise: None or float[F, m].
    grid: (F, h, w); salient, context: S and C per frame; the rest as `fastvid`.
  """
  f, h, w = grid
  n, d = h * w, x.shape[-1]
  m = n - salient
  x, s, valid = x.reshape(f, n, d).astype(jnp.float32), s.reshape(f, n), valid.reshape(f, n)
  g = jnp.sum(jnp.where(valid[..., None], x, 0.0), 1) / jnp.maximum(valid.sum(1), 1)[:, None]
  seg, count, group = frame_plan(g, context, m, min_segments, cut_similarity, anchor_stride)
  # ATS: the S highest scores of each frame (padding only when a frame has too few tokens).
  frame_of = jnp.arange(f)[:, None]
  in_salient = jnp.zeros((f, n), bool)
  if salient > 0:
    _, top = jax.lax.top_k(P.rank_key(s, valid), salient)  # [F, S]
    in_salient = in_salient.at[frame_of, top].set(True)
  kept = (in_salient & valid).reshape(-1)
  assign = jnp.full((f * n,), -1, jnp.int32)
  a_full, merged = jnp.full((0,), f * n, jnp.int32), jnp.zeros((0, d), jnp.float32)
  if context > 0:
    # The non-salient tokens of each frame, in index order.
    ns = jnp.argsort(in_salient, axis=1, stable=True)[:, :m].astype(jnp.int32)  # [F, m]
    x_ns = jnp.take_along_axis(x, ns[..., None], 1)
    v_ns = jnp.take_along_axis(valid, ns, 1)
    full = (frame_of * n + ns).reshape(-1)  # [J] index of each non-salient token in the clip
    anchor, ok = density_anchors(x_ns, v_ns, count, context, noise)
    merged, target = merge_into_anchors(x_ns, v_ns, anchor, ok, seg, count, group, context,
                                        anchor_weight)
    a_full = jnp.where(ok, full[anchor], f * n)
    kept = kept.at[a_full].set(True, mode="drop")
    assign = assign.at[full].set(jnp.where(target >= 0, a_full[jnp.maximum(target, 0)], -1))
  slot = jnp.cumsum(kept, dtype=jnp.int32) - 1
  owner = jnp.where(kept, jnp.arange(f * n, dtype=jnp.int32), assign)  # the kept token
  assign = jnp.where((owner >= 0) & valid.reshape(-1), slot[jnp.maximum(owner, 0)], -1)
  rep = jnp.zeros((budget,), jnp.int32).at[jnp.where(kept, slot, budget)].set(
      jnp.arange(f * n, dtype=jnp.int32), mode="drop")
  # Gather the budget slots and write the anchors into theirs: writing them into a copy of all
  # N rows first cost a full copy of the features.
  a_slot = jnp.where(a_full < f * n, slot[jnp.minimum(a_full, f * n - 1)], budget)
  x_out = x.reshape(-1, d)[rep].at[a_slot].set(merged, mode="drop")
  return assign, rep, x_out


@functools.partial(jax.jit, static_argnames=("grid", "budget", "salient", "context",
                                             "min_segments", "cut_similarity", "anchor_stride",
                                             "anchor_weight"))
def _plan_batch(x, scores, mask, noise, *, grid, budget, salient, context, min_segments,
                cut_similarity, anchor_stride, anchor_weight):
  """`_clip_plan` of every clip of a batch ([B, ...] arrays), one jitted program: op by op the
  method would compile a few hundred small programs (~14 CPU-s on its first call)."""
  static = dict(grid=grid, budget=budget, salient=salient, context=context,
                min_segments=min_segments, cut_similarity=cut_similarity,
                anchor_stride=anchor_stride, anchor_weight=anchor_weight)
  if noise is None:
    return jax.vmap(lambda a, b, c: _clip_plan(a, b, c, None, **static))(x, scores, mask)
  return jax.vmap(lambda a, b, c, z: _clip_plan(a, b, c, z, **static))(x, scores, mask, noise)


@register("fastvid", family="merging", stages=("post_proj",), needs=("scores",),
          paper="FastVID, Shen et al., arXiv 2503.11187 (NeurIPS 2025)")
def fastvid(tokens, budget, *, scores=None, rng=None, min_segments=8, cut_similarity=0.9,
            context_ratio=0.4, anchor_stride=4, anchor_weight=0.6):
  """Segment the clip by frame similarity, keep each frame's salient tokens and merge the rest
  into density-peak anchors within each segment (module docstring).

  Args:
    tokens: a clip's tokens on their full grid (F >= 2 frames, N == F * h * w), the projected
      tokens entering the decoder in the official code.
    budget: output capacity; each frame keeps R = budget // F >= 1 tokens.
    scores: float[B, N] token saliency (official: the SigLIP MAP-head attention; here the ViT
      attention each patch receives); NaN ranks last.
    rng: optional PRNG key: the official U(0, 1) * 1e-6 density noise; None breaks density ties
      by index.
    min_segments: DySeg c (official 8): the c - 1 least similar transitions are cuts.
    cut_similarity: DySeg tau (official 0.9): transitions below it are cuts too.
    context_ratio: STPrune d (official 0.4): the share of R given to context tokens.
    anchor_stride: DTM p (official 4): one anchor frame every p frames of a segment.
    anchor_weight: DTM beta (official 0.6): the least weight an anchor keeps when merged.

  Returns:
    `budget` tokens in raster order (salient tokens as given, anchors merged), then padding.
  """
  name = "fastvid"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  f, h, w = P.check_grid_tokens(tokens, name)
  if f < 2:
    raise ValueError(f"{name}: needs video tokens with at least 2 frames (Tokens.from_video), "
                     f"got grid {tokens.grid}")
  scores = P.check_scores(tokens, scores, name)
  _check_int(name, "min_segments", min_segments, 1)
  _check_int(name, "anchor_stride", anchor_stride, 1)
  for opt, val in (("context_ratio", context_ratio), ("anchor_weight", anchor_weight)):
    if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 <= val <= 1:
      raise ValueError(f"{name}: {opt} must be a number in [0, 1], got {val!r}")
  if isinstance(cut_similarity, bool) or not isinstance(cut_similarity, (int, float)):
    raise ValueError(f"{name}: cut_similarity must be a number, got {cut_similarity!r}")
  per_frame = budget // f
  if per_frame < 1:
    raise ValueError(f"{name}: budget must give every one of the {f} frames a token "
                     f"(budget >= {f}), got {budget}")
  b = tokens.x.shape[0]
  salient = per_frame - int(per_frame * context_ratio)
  context = per_frame - salient
  noise = None
  if rng is not None and context > 0:
    noise = jax.random.uniform(rng, (b, f, h * w - salient)) * 1e-6

  assign, rep, x_slots = _plan_batch(
      tokens.x, scores, tokens.mask, noise, grid=tokens.grid, budget=budget, salient=salient,
      context=context, min_segments=min_segments, cut_similarity=cut_similarity,
      anchor_stride=anchor_stride, anchor_weight=anchor_weight)
  out = P.merge(tokens.replace(x=tokens.x[..., :0]), assign, rep)  # features: x_slots
  return out.replace(x=jnp.where(out.mask[..., None], x_slots, 0.0).astype(tokens.x.dtype))


def _check_int(name, opt, val, low):
  if isinstance(val, bool) or not isinstance(val, int) or val < low:
    raise ValueError(f"{name}: {opt} must be an int >= {low}, got {val!r}")
