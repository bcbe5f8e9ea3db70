"""FastVID against a NumPy transcription of the official LLaVA-OneVision block
(LunarShen/FastVID `modeling_qwen2.py`, "FastVID" in `Qwen2Model.forward`: DySeg, the anchor
distribution, ATS, per-frame density scores, single- and multi-frame DTM), written with the
official loops on random clips; the degenerate cases; bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tcjax
from tcjax import compress
from tcjax.compress.registry import METHODS

from helpers import check_contract


@functools.lru_cache(maxsize=None)
def _jitted(budget, **opts):
  return jax.jit(lambda t, s: compress.fastvid(t, budget, scores=s, **opts))


def fastvid_numpy(x, scores, frames, budget, c=8, tau=0.9, d=0.4, p=4, beta=0.6):
  """The official FastVID block on one clip `x: [F * n, D]` (float64, batch 1, no noise).

  Returns {token index: feature} of the kept tokens and src int[F * n] (the kept token each
  non-salient token is counted with: its anchor in the nearest anchor frame at or after its
  frame, the documented bookkeeping; -1 if none).
  """
  x = x.astype(np.float64)
  n = x.shape[0] // frames
  dim = x.shape[1]
  video = x.reshape(frames, n, dim)
  attn = scores.reshape(frames, n)
  # DySeg: frame vectors (the mean of the frame's tokens, as the Qwen2.5-VL port).
  g = video.mean(1)
  g = g / np.linalg.norm(g, axis=1, keepdims=True)
  sim = (g[:-1] * g[1:]).sum(1)
  cut_topk = np.argsort(sim, kind="stable")[:min(c - 1, frames - 1)]  # c - 1 <= F - 1 here
  cut_cos = np.nonzero(sim < tau)[0]
  cuts = np.sort(np.unique(np.concatenate([cut_topk, cut_cos])))
  padded = np.concatenate([[-1], cuts, [frames - 1]])
  segment_sizes = np.diff(padded)
  # STPrune budgets.
  retain = budget // frames  # int(frame_token_len * retention_ratio)
  salient_num = retain - int(retain * d)
  context_num = retain - salient_num
  context_list = np.zeros(frames, int)
  offset = 0
  for length in segment_sizes:
    seg_context = context_num * length
    temp = (length + p - 1) // p
    cur = seg_context // temp
    back = np.arange(length - 1, -1, -1)
    context_list[offset:offset + length][back % p == 0] = cur
    offset += length
  # ATS.
  salient = np.argsort(-attn, axis=1, kind="stable")[:, :salient_num]
  kept = {}
  for f in range(frames):
    for i in salient[f]:
      kept[f * n + i] = video[f, i]
  src = np.full(frames * n, -1)
  if context_num == 0:
    return kept, src
  # Density per frame over the non-salient tokens.
  filtered = np.stack([np.setdiff1d(np.arange(n), salient[f]) for f in range(frames)])
  tok = np.stack([video[f, filtered[f]] for f in range(frames)])  # [F, m, D]
  glob = np.arange(frames)[:, None] * n + filtered
  m = tok.shape[1]
  dist = np.sqrt(((tok[:, :, None] - tok[:, None]) ** 2).sum(-1)) / np.sqrt(dim)
  nearest = np.sort(dist, axis=-1)[:, :, :4]
  density = np.exp(-(nearest ** 2).mean(-1))
  score = np.zeros((frames, m))
  for f in range(frames):
    for i in range(m):
      denser = density[f] > density[f, i]
      score[f, i] = density[f, i] * (dist[f, i, denser].min() if denser.any() else dist[f].max())
  unit = tok / np.linalg.norm(tok, axis=-1, keepdims=True)

  def dtm(f, k, member_frames):
    """Frame f's top-k density anchors merged with the non-salient tokens of member_frames."""
    anchors = np.argsort(-score[f], kind="stable")[:k]
    members = np.concatenate([np.arange(m) + g_ * m for g_ in member_frames])
    flat_unit, flat_tok = unit.reshape(-1, dim), tok.reshape(-1, dim)
    choice = np.argmax(flat_unit[members] @ unit[f, anchors].T, axis=1)
    for a, i in enumerate(anchors):
      own = members[choice == a]
      w = max(1 / (len(own) + 1), beta)
      mean = flat_tok[own].sum(0) / max(len(own), 1)
      kept[int(glob[f, i])] = w * tok[f, i] + (1 - w) * mean
    return anchors, members, choice

  # The frame each token is counted with: the anchor frame closing its group of p frames.
  group = np.zeros(frames, int)
  offset = 0
  for length in segment_sizes:
    for j in range(length):
      group[offset + j] = offset + j + (length - 1 - j) % p
    offset += length
  assigned = {}
  for f in range(frames):  # single-frame segments (and any frame whose count is C)
    if context_list[f] == context_num:
      anchors, members, choice = dtm(f, context_num, [f])
      assigned[f] = dict(zip(members, glob[f, anchors][choice]))
  start = 0
  for length in segment_sizes:  # multi-frame segments: each target frame gathers the segment
    if length > 1:
      for f in range(start, start + length):
        if context_list[f] > context_num:
          anchors, members, choice = dtm(f, context_list[f], range(start, start + length))
          assigned[f] = dict(zip(members, glob[f, anchors][choice]))
    start += length
  for f in range(frames):
    for i in range(m):
      j = f * m + i
      target = assigned.get(group[f], {}).get(j)
      if target is not None:
        src[glob[f, i]] = target
  salient_glob = (np.arange(frames)[:, None] * n + salient).reshape(-1)
  src[salient_glob] = salient_glob
  return kept, src


def scenes(lengths, n=12, dim=8, batch=2, seed=0, noise=0.3):
  """A batch of clips whose frames come in scenes of the given lengths (each frame its scene's
  base plus noise), and random scores."""
  rng = np.random.default_rng(seed)
  clips = []
  for _ in range(batch):
    bases = rng.normal(size=(len(lengths), n, dim))
    clips.append(np.concatenate([bases[s][None] + noise * rng.normal(size=(ln, n, dim))
                                 for s, ln in enumerate(lengths)]))
  x = np.stack(clips).reshape(batch, -1, dim).astype(np.float32)
  return x, rng.normal(size=x.shape[:2]).astype(np.float32)


def check(out, x, scores, frames, budget, **opts):
  o = jax.tree.map(np.asarray, out)
  lin_all = np.asarray(out.linear_pos())
  for b in range(x.shape[0]):
    kept, src = fastvid_numpy(x[b], scores[b], frames, budget, **opts)
    keys = np.array(sorted(kept))
    count = len(keys)
    assert int(o.mask[b].sum()) == count and o.mask[b, :count].all()
    np.testing.assert_array_equal(lin_all[b, :count], keys)
    np.testing.assert_allclose(o.x[b, :count], np.stack([kept[k] for k in keys]),
                               rtol=2e-5, atol=2e-5)
    slot = {int(k): i for i, k in enumerate(keys)}
    np.testing.assert_array_equal(o.src[b], [slot[int(s)] if s >= 0 else -1 for s in src])


def test_segments_with_several_anchor_frames():
  """Scenes of 5, 1 and 4 frames (cuts at the scene changes: the c - 1 = 2 least similar
  transitions), anchor stride 2: anchor frames 0, 2, 4 (3 context tokens each), 5 (C = 2),
  7 and 9 (4 each); the other frames' tokens go to their segment's anchors."""
  x, scores = scenes((5, 1, 4))
  opts = dict(min_segments=3, cut_similarity=0.5, anchor_stride=2)
  out = _jitted(50, **opts)(tcjax.Tokens.from_video(jnp.asarray(x), 10, (3, 4)),
                            jnp.asarray(scores))
  check_contract(out, 50, 2)
  check(out, x, scores, 10, 50, c=3, tau=0.5, p=2)
  # R = 5: S = 3 salient, C = 2; per segment 5 * 2 // 3 = 3 three times, 2, 8 // 2 = 4 twice.
  np.testing.assert_array_equal(np.asarray(out.count()), [10 * 3 + 9 + 2 + 8] * 2)


def test_official_defaults_on_few_frames():
  """Defaults (c = 8, tau = 0.9, d = 0.4, p = 4, beta = 0.6) on 6 frames: fewer than c, so every
  transition is a cut and each frame merges into its own anchors; budget 60 -> R = 10, S = 6,
  C = 4."""
  x, scores = scenes((2, 3, 1), seed=1)
  out = _jitted(60)(tcjax.Tokens.from_video(jnp.asarray(x), 6, (3, 4)), jnp.asarray(scores))
  check_contract(out, 60, 2)
  check(out, x, scores, 6, 60, c=6)  # c - 1 = F - 1 cuts: the official on enough frames
  np.testing.assert_array_equal(np.asarray(out.count()), [60, 60])


def test_long_segment_and_no_context():
  """One scene (only tau could cut, and c = 1 asks for no cut): one segment of 8 frames, anchor
  frames 3 and 7; then a budget of one token per frame (C = 0): the top score of each frame."""
  x, scores = scenes((8,), seed=2, noise=0.1)
  tokens = tcjax.Tokens.from_video(jnp.asarray(x), 8, (3, 4))
  out = _jitted(40, min_segments=1, cut_similarity=-1.0)(tokens, jnp.asarray(scores))
  check_contract(out, 40, 2)
  check(out, x, scores, 8, 40, c=1, tau=-1.0)
  out = _jitted(15)(tokens, jnp.asarray(scores))
  check_contract(out, 15, 2)
  top = np.argmax(scores.reshape(2, 8, 12), -1) + np.arange(8) * 12
  np.testing.assert_array_equal(np.asarray(out.linear_pos())[:, :8], top)
  assert not np.asarray(out.mask)[:, 8:].any()


def test_rng_noise_runs_and_nan_scores_rank_last():
  x, scores = scenes((3, 3), seed=3)
  tokens = tcjax.Tokens.from_video(jnp.asarray(x), 6, (3, 4))
  with_noise = jax.jit(lambda t, s, k: compress.fastvid(t, 30, scores=s, rng=k))
  out = with_noise(tokens, jnp.asarray(scores), jax.random.key(0))
  check_contract(out, 30, 2)
  assert np.all(np.asarray(out.count()) == 30)
  scores = scores.copy()
  scores[:, :12] = np.nan
  scores[:, 0] = 0.0  # frame 0: one real score, kept first; NaN ones fill the other slots
  out = _jitted(12)(tokens, jnp.asarray(scores))  # R = 2, S = 2, C = 0
  check_contract(out, 12, 2)
  np.testing.assert_array_equal(np.asarray(out.pos)[:, :2, 2], [[0, 1], [0, 1]])


def test_registry_and_bad_input():
  m = METHODS["fastvid"]
  assert (m.family, m.stages, m.needs) == ("merging", ("post_proj",), ("scores",))
  assert m.options == {"min_segments": 8, "cut_similarity": 0.9, "context_ratio": 0.4,
                       "anchor_stride": 4, "anchor_weight": 0.6}
  x, scores = scenes((2, 2))
  tokens = tcjax.Tokens.from_video(jnp.asarray(x), 4, (3, 4))
  s = jnp.asarray(scores)
  with pytest.raises(ValueError, match="2 frames"):
    compress.fastvid(tcjax.Tokens.from_grid(tokens.x[:, :12], (3, 4)), 4, scores=s[:, :12])
  with pytest.raises(ValueError, match="budget"):
    compress.fastvid(tokens, 3, scores=s)  # fewer than one token per frame
  with pytest.raises(ValueError, match="full grid"):
    compress.fastvid(compress.pool(tokens, 16), 8, scores=s[:, :16])
  with pytest.raises(ValueError, match="scores"):
    compress.fastvid(tokens, 8)
  for opt, bad in (("min_segments", 0), ("anchor_stride", 1.5), ("context_ratio", 1.2),
                   ("anchor_weight", -0.1), ("cut_similarity", "0.9"), ("min_segments", True)):
    with pytest.raises(ValueError, match=opt):
      compress.fastvid(tokens, 8, scores=s, **{opt: bad})


def test_in_the_sweep():
  """The sweep finds it in the registry and runs it once, after the projector (video and audio
  shapes; image shapes record its "2 frames" error)."""
  from tcjax.eval import sweep  # pylint: disable=g-import-not-at-top
  from tcjax.nn import plan as plan_lib  # pylint: disable=g-import-not-at-top
  got = sweep.settings(methods=["fastvid"], stages="primary", budgets=(64, 16))
  assert [s.name for s in got[1:]] == ["fastvid@post_proj/64", "fastvid@post_proj/16"]
  assert "fastvid" in {s.method for s in sweep.settings()}
  plan = sweep.plan_for(got[1], n_tokens=8 * 256, frames=8, vit_depth=2, vit_layer=1,
                        llm_layer=1)
  assert plan_lib.normalize(plan) == (("post_proj", (("budget", 64), ("method", "fastvid"))),)
