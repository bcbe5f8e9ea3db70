"""PruneVid against a NumPy transcription of the official code (Visual-AI/PruneVid,
`modeling_pllava.py` stage 1, `elastic_cache.py` stage 2) on random clips with static and
dynamic regions; the in-LLM stage's pre-RoPE, unmasked score and its retro-pruned KV caches in
the model against the NumPy reference decoder."""

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tcjax
from tcjax import compress

from helpers import check_contract, scene_clip

pv = importlib.import_module("tcjax.compress.prunevid")  # the module (the package's `prunevid` is the function)

# ---------------------------------------------------------------------------------------------
# The official algorithm, transcribed in NumPy (float64). One deliberate difference, the same in
# tcjax: DPC-kNN density ties go to the lower index instead of U(0, 1) * 1e-6 noise.
# ---------------------------------------------------------------------------------------------


def official_dpc(x, cluster_num, k):
  """`cluster_dpc_knn` of one example: (idx_cluster [n]: centre rank of each token,
  index_down [c]: the centres in score order)."""
  n, c = x.shape
  dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)) / np.sqrt(c)
  density = np.exp(-(np.sort(dist, axis=1)[:, :min(k, n)] ** 2).mean(1))
  dist_max = dist.max()
  delta = np.array([min([dist[i, j] if (density[j] > density[i] or
                                        (density[j] == density[i] and j < i)) else dist_max
                         for j in range(n)]) for i in range(n)])
  score = delta * density
  index_down = sorted(range(n), key=lambda i: (-score[i], i))[:cluster_num]
  idx_cluster = np.argmin(dist[index_down], axis=0)  # ties: the first centre in score order
  idx_cluster[index_down] = np.arange(cluster_num)
  return idx_cluster, np.array(index_down)


def official_refine(labels):
  """`refine_clusters` of one example, as the official loops do it."""
  labels = list(int(v) for v in labels)
  n = len(labels)
  out = list(labels)
  for lab in sorted(set(labels)):
    idx = [i for i in range(n) if labels[i] == lab]
    runs, start, prev = [], idx[0], idx[0]
    for i in idx[1:]:
      if i == prev + 1:
        prev = i
      else:
        runs.append((start, prev))
        start = prev = i
    runs.append((start, prev))
    longest = max(e - s + 1 for s, e in runs)
    for s, e in runs:
      if longest == 1 or e - s + 1 != longest:
        out[s:e + 1] = [-1] * (e - s + 1)
  i = 0
  while i < n:
    if out[i] != -1:
      i += 1
      continue
    start = i
    while i < n and out[i] == -1:
      i += 1
    end = i - 1
    left = right = None
    left_len = right_len = 0
    if start > 0:
      left = out[start - 1]
      j = start - 1
      while j >= 0 and out[j] == left:
        j -= 1
      left_len = start - j - 1
    if end < n - 1:
      right = out[end + 1]
      j = end + 1
      while j < n and out[j] == right:
        j += 1
      right_len = j - end - 1
    if left_len > right_len:
      new = left
    elif right_len > left_len:
      new = right
    else:
      new = left if left is not None else right
    out[start:end + 1] = [0 if new is None else new] * (end - start + 1)
  return np.array(out)


def official_stage1(x, frames, tau=0.8, ratio=0.25, cluster_ratio=0.5, k=7, above=14):
  """`merge_frames_dynamic` of one example `x: [T * P, D]`.

  Returns the output tokens in the official order, each (kind, representative's raster index,
  member raster indices, features), and the official static / dynamic / window sizes.
  """
  n, d = x.shape
  p = n // frames
  fr = x.reshape(frames, p, d)
  labels, _ = official_dpc(fr.mean(1), int(frames * ratio), k)
  ref = official_refine(labels)
  change = np.flatnonzero(ref[1:] != ref[:-1]) + 1
  windows = np.diff(np.concatenate([[0], change, [frames]]))
  tokens, static_sizes, dynamic_sizes = [], [], []

  def clusters(feat, positions):
    """[(centre position, member positions, features)] of one group, official order."""
    if len(positions) <= above:
      return [(q, [q], feat[i]) for i, q in enumerate(positions)]
    idx, centres = official_dpc(feat, int(len(positions) * cluster_ratio), k)
    return [(positions[centres[c]], [positions[i] for i in np.flatnonzero(idx == c)],
             feat[idx == c].mean(0)) for c in range(len(centres))]

  start = 0
  for w in windows:
    cur = fr[start:start + w]
    unit = cur / np.maximum(np.linalg.norm(cur, axis=-1, keepdims=True), 1e-12)
    sim = np.einsum("wlc,tlc->wtl", unit, unit)
    with np.errstate(invalid="ignore", divide="ignore"):
      sim = (sim.sum(1) - 1).sum(0) / (w * (w - 1))
    static = sim > tau
    pos_s, pos_d = np.flatnonzero(static), np.flatnonzero(~static)
    sc = clusters(cur[:, static].mean(0), list(pos_s))
    for centre, members, f in sc:
      tokens.append(("static", start * p + centre,
                     [(start + t) * p + q for t in range(w) for q in members], f))
    static_sizes.append(len(sc))
    n_dyn = 0
    for t in range(w):
      dc = clusters(cur[t][~static], list(pos_d))
      for centre, members, f in dc:
        tokens.append(("dynamic", (start + t) * p + centre, [(start + t) * p + q for q in members],
                       f))
      n_dyn += len(dc)
    dynamic_sizes.append(n_dyn)
    start += w
  return tokens, static_sizes, dynamic_sizes, list(windows)


def official_stage2(score, static_sizes, dynamic_sizes, window_sizes, alpha=0.4):
  """`VTPWindowCache.process_attention`: the kept indices (official order) from the score of
  each token in the official order (already max over heads and rows)."""
  kept, start = [], 0
  for s, dyn, w in zip(static_sizes, dynamic_sizes, window_sizes):
    win = score[start:start + s + dyn]
    top = lambda a, k: list(np.argsort(-a, kind="stable")[:k])
    kept += [start + i for i in top(win[:s], int(s * alpha))]
    per = dyn // w
    for f in range(w):
      part = win[s + f * per:s + (f + 1) * per]
      kept += [start + s + f * per + i for i in top(part, int(per * alpha))]
    start += s + dyn
  return sorted(kept)


# ---------------------------------------------------------------------------------------------
# Inputs: clips of scenes; in each scene some positions barely change (static), others do.
# ---------------------------------------------------------------------------------------------


def clip(seed, batch=2, scenes=(3, 5), grid=(6, 6), dim=8, calm=0.6):
  x, tokens, _ = scene_clip(seed, batch, scenes, grid, dim, calm)
  return x, tokens


@functools.lru_cache(maxsize=None)
def _stage1(budget, **opts):
  return jax.jit(lambda t: compress.prunevid(t, budget, **opts))


@functools.lru_cache(maxsize=None)
def _stage2(budget):
  return jax.jit(lambda t, a, m: compress.prunevid_llm(t, budget, attn_heads=a, text_mask=m))


def _compare(out, b, want, x):
  """Our valid tokens (raster order) = the official tokens sorted by representative."""
  want = sorted(want, key=lambda tok: tok[1])
  count = int(out.mask[b].sum())
  assert count == len(want)
  lin = np.asarray(tcjax.Tokens.linear_pos(out))[b, :count]
  np.testing.assert_array_equal(lin, [tok[1] for tok in want])
  np.testing.assert_allclose(np.asarray(out.x[b, :count]), np.stack([tok[3] for tok in want]),
                             rtol=1e-4, atol=1e-4)
  src = np.full(x.shape[1], -1)
  for slot, tok in enumerate(want):
    src[tok[2]] = slot
  np.testing.assert_array_equal(np.asarray(out.src[b]), src)
  np.testing.assert_array_equal(np.asarray(out.size[b, :count]), [len(t[2]) for t in want])


@pytest.mark.parametrize("seed, scenes, grid, calm", [
    (0, (3, 5), (6, 6), 0.6),  # 36 positions: static groups above 14 are clustered
    (1, (4, 4), (4, 5), 0.3),  # 20 positions: small static groups kept as they are
    (2, (2, 3, 3), (4, 4), 0.5),
])
def test_stage1_matches_official(seed, scenes, grid, calm):
  x, tokens = clip(seed, scenes=scenes, grid=grid, calm=calm)
  budget = tokens.num_tokens
  out = _stage1(budget)(tokens)
  check_contract(out, budget, 2)
  for b in range(2):
    want, *_ = official_stage1(x[b].astype(np.float64), sum(scenes))
    _compare(out, b, want, x)
    assert pv.max_count(tokens.grid, tokens.num_tokens // sum(scenes)) >= len(want)


def test_stage1_static_tokens_span_their_segment():
  x, tokens = clip(0)
  out = _stage1(tokens.num_tokens)(tokens)
  want, static_sizes, _, windows = official_stage1(x[0].astype(np.float64), 8)
  assert sum(static_sizes) > 0 and len(windows) >= 2  # the clip exercises both kinds
  group = np.asarray(pv.token_groups(out))[0]
  kinds = {tok[1]: tok[0] for tok in want}
  lin = np.asarray(out.linear_pos())[0]
  for slot in range(int(out.mask[0].sum())):
    assert (group[slot] < 8) == (kinds[lin[slot]] == "static")


def test_stage1_options():
  x, tokens = clip(3, scenes=(4, 4), grid=(4, 4))
  opts = dict(tau=0.5, temporal_segment_ratio=0.5, cluster_ratio=0.25, k=3, cluster_above=6)
  out = _stage1(tokens.num_tokens, **opts)(tokens)
  for b in range(2):
    want, *_ = official_stage1(x[b].astype(np.float64), 8, tau=0.5, ratio=0.5,
                               cluster_ratio=0.25, k=3, above=6)
    _compare(out, b, want, x)


def test_refine_clusters_matches_official():
  rng = np.random.default_rng(0)
  labels = np.concatenate([rng.integers(0, c, size=(100, 16)) for c in (2, 3, 5)])
  labels = np.concatenate([labels, np.repeat(rng.integers(0, 3, (60, 4)), 4, axis=1)])
  got = np.asarray(jax.jit(jax.vmap(pv.refine_clusters))(jnp.asarray(labels, jnp.int32)))
  for row, g in zip(labels, got):
    np.testing.assert_array_equal(g, official_refine(row), err_msg=str(row))


def test_stage1_truncates_to_the_tokens_carrying_most_patches():
  x, tokens = clip(0)
  full = _stage1(tokens.num_tokens)(tokens)
  budget = 20
  out = _stage1(budget)(tokens)
  check_contract(out, budget, 2)
  for b in range(2):
    n = int(full.mask[b].sum())
    assert n > budget
    size = np.asarray(full.size[b, :n])
    keep = np.sort(np.argsort(-size, kind="stable")[:budget])  # ties: the earlier token
    np.testing.assert_array_equal(np.asarray(out.pos[b]), np.asarray(full.pos[b, keep]))
    np.testing.assert_allclose(np.asarray(out.x[b]), np.asarray(full.x[b, keep]), atol=1e-6)


def test_stage2_matches_official_on_stage1_output():
  x, tokens = clip(4)
  cap = tokens.num_tokens // 2
  mid = _stage1(cap)(tokens)
  rng = np.random.default_rng(0)
  heads, rows = 3, 5
  attn = rng.random((2, heads, rows, cap)).astype(np.float32)
  text_mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
  out = _stage2(cap)(mid, jnp.asarray(attn), jnp.asarray(text_mask))
  check_contract(out, cap, 2)
  lin_mid = np.asarray(mid.linear_pos())
  for b in range(2):
    want, ss, ds, ws = official_stage1(x[b].astype(np.float64), 8)
    slot_of = {int(l): s for s, l in enumerate(lin_mid[b, :int(mid.mask[b].sum())])}
    score_ours = attn[b][:, text_mask[b]].max(axis=(0, 1))
    score = np.array([score_ours[slot_of[tok[1]]] for tok in want])  # official order
    kept = official_stage2(score, ss, ds, ws)
    expect = sorted(want[i][1] for i in kept)
    count = int(out.mask[b].sum())
    np.testing.assert_array_equal(np.asarray(out.linear_pos())[b, :count], expect)
    keep_slots = [slot_of[l] for l in expect]
    np.testing.assert_array_equal(np.asarray(out.x[b, :count]), np.asarray(mid.x[b, keep_slots]))


def test_stage2_on_raw_tokens_keeps_alpha_per_frame_and_truncates_by_score():
  _, tokens = clip(5, scenes=(2, 2), grid=(4, 5))
  n = tokens.num_tokens
  attn = jax.random.uniform(jax.random.key(0), (2, 2, 3, n))
  rows = jnp.ones((2, 3), bool)
  score = np.asarray(attn).max(axis=(1, 2))
  per = score.reshape(2, 4, 20)
  want = np.stack([np.sort(np.concatenate(
      [f * 20 + np.argsort(-per[b, f], kind="stable")[:8] for f in range(4)])) for b in range(2)])
  out = _stage2(n)(tokens, attn, rows)
  np.testing.assert_array_equal(np.asarray(out.mask.sum(-1)), [32, 32])
  np.testing.assert_array_equal(np.asarray(out.linear_pos())[:, :32], want)
  small = _stage2(10)(tokens, attn, rows)  # 32 chosen, 10 places: the best 10 of them
  for b in range(2):
    best = want[b][np.argsort(-score[b, want[b]], kind="stable")[:10]]
    np.testing.assert_array_equal(np.asarray(small.linear_pos())[b], np.sort(best))


def test_bad_input():
  _, tokens = clip(0, scenes=(3,), grid=(4, 4))
  with pytest.raises(ValueError, match="frames"):
    compress.prunevid(tokens, 8)  # int(3 * 0.25) = 0 segments
  _, tokens = clip(0)
  for opt, val in (("temporal_segment_ratio", 0.0), ("cluster_ratio", 1.5), ("k", 0),
                   ("cluster_above", -1)):
    with pytest.raises(ValueError, match=opt):
      compress.prunevid(tokens, 8, **{opt: val})
  attn = jnp.ones((2, 1, 3, tokens.num_tokens))
  with pytest.raises(ValueError, match="alpha"):
    compress.prunevid_llm(tokens, 8, attn_heads=attn, text_mask=jnp.ones((2, 3), bool), alpha=0)
  with pytest.raises(ValueError, match="text_mask"):
    compress.prunevid_llm(tokens, 8, attn_heads=attn, text_mask=jnp.ones((2, 4), bool))


# ---------------------------------------------------------------------------------------------
# In the model: the raw (pre-RoPE, unmasked) per-head score and the retro-pruned caches.
# ---------------------------------------------------------------------------------------------


def test_in_the_decoder_scores_and_decoding_match_the_reference():
  """PruneVid at decoder layer K scores with layer K-1's softmax(q k^T) before RoPE over every
  valid token (max over heads, then prompt rows), keeps int(0.4 n); decoding then attends to the
  kept image tokens only, in every layer (the official retro-pruned caches)."""
  import paligemma_ref as ref  # pylint: disable=g-import-not-at-top
  from test_model import CONFIGS, N, T_PREFIX, inputs, make_params  # pylint: disable=g-import-not-at-top
  config = CONFIGS[2]  # Gemma 2: grouped KV heads, soft-capped logits
  model, params, flat = make_params(config, seed=2)
  K = 2
  plan = (("llm", {"method": "prunevid_llm", "layer": K, "budget": N}),)
  m = model.with_plan(plan)
  image, text, _ = inputs(seed=7, t_suffix=0)
  B, steps = text.shape[0], 3
  variables = {"params": params}
  logits, cache, aux = jax.jit(lambda v, i, t: m.apply(v, i, t, method=m.prefill,
                                                       cache_size=steps))(variables, image, text)
  zimg = ref.image_embed(flat, config, image)
  x = np.concatenate([zimg, ref.embed_text(flat, config, text)], 1)
  ar = np.zeros((B, x.shape[1]))
  _, attn, _ = ref.decoder(flat, config, x, ar, attn_layers=(K - 1,))
  q0, k0 = attn[("raw", K - 1)]
  g = config.llm
  k0 = np.repeat(k0, g.num_heads // g.num_kv_heads, axis=2)
  logit = np.einsum("bqhk,bshk->bhqs", q0, k0) * (g.query_pre_attn_scalar or g.head_dim) ** -0.5
  logit = np.tanh(logit / g.attn_logits_softcap) * g.attn_logits_softcap
  p = np.exp(logit - logit.max(-1, keepdims=True))
  p = (p / p.sum(-1, keepdims=True))[:, :, N:, :N]  # prompt rows, image columns
  np.testing.assert_allclose(np.asarray(aux["llm_attn"][0]), p.mean(1), atol=1e-5)
  score = p.max(axis=(1, 2))
  keep = np.sort(np.argsort(-score, axis=-1, kind="stable")[:, :int(N * 0.4)], axis=-1)
  kept_pos = np.asarray(aux["llm_kept_pos"][0])
  np.testing.assert_array_equal(kept_pos[:, :keep.shape[1]], keep)
  assert np.all(kept_pos[:, keep.shape[1]:] == -1)  # capacity N, int(0.4 N) kept
  hidden = np.stack([np.setdiff1d(np.arange(N), keep[b]) for b in range(B)])
  step = jax.jit(lambda v, tok, c: m.apply(v, tok, c, method=m.decode_step))
  tokens = np.zeros((B, 0), np.int32)
  for s in range(steps + 1):
    ids = np.concatenate([text, tokens], 1)
    xs = np.concatenate([zimg, ref.embed_text(flat, config, ids)], 1)
    ar = np.concatenate([np.zeros((B, N + T_PREFIX)), np.ones((B, s))], 1)
    prune = {K: np.concatenate([np.isin(np.arange(N), keep[b])[None] for b in range(B)], 0)}
    prune[K] = np.concatenate([prune[K], np.ones((B, ids.shape[1]), bool)], 1)
    want, _, _ = ref.decoder(flat, config, xs, ar, prune=prune, hide=(hidden, N + T_PREFIX))
    np.testing.assert_allclose(np.asarray(logits), want[:, -1], atol=1e-4, rtol=1e-4,
                               err_msg=f"step {s}")
    if s == steps:
      break
    tok = np.asarray(jnp.argmax(logits, -1)).astype(np.int32)
    tokens = np.concatenate([tokens, tok[:, None]], 1)
    logits, cache = step(variables, jnp.asarray(tok), cache)
  # The earlier layers' cache keeps the pruned image entries, masked out.
  first = np.asarray(cache.segments[0].valid)[:, :N]
  np.testing.assert_array_equal(first, np.stack([np.isin(np.arange(N), keep[b])
                                                 for b in range(B)]))
