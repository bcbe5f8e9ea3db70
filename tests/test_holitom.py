"""HoliTom against a NumPy transcription of the official code (cokeshao/HoliTom,
`holitom/llava_arch.py` outer stage, `holitom/modeling_qwen2.py` inner merge) on random clips with
static and dynamic regions; the inner merge in the model against the NumPy reference decoder."""

import functools
import importlib
import math
from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tcjax
from tcjax import compress

from helpers import check_contract, scene_clip

ht = importlib.import_module("tcjax.compress.holitom")  # the module (the package's `holitom` is the function)

# ---------------------------------------------------------------------------------------------
# The official algorithm, transcribed in NumPy (float64). Deliberate differences, the same in
# tcjax: DPC-kNN density ties go to the lower index instead of random noise, and r' and the
# counts are exact fractions (the official float64 can round them differently).
# ---------------------------------------------------------------------------------------------


def official_windows(sim, tau, max_window=1024):
  """`select_static_windows`: ([(start, end)], tokens saved) from consecutive-frame
  similarities `sim: [T - 1, P]`."""
  t = sim.shape[0] + 1
  table = np.ones((t, t, sim.shape[1]))
  for start in range(t - 1):
    run = np.cumprod(sim[start:] > tau, axis=0)
    table[start, start + 1:start + 1 + len(run)] = run
  lengths = np.clip(np.arange(t)[None, :] - np.arange(t)[:, None], 0, None)
  saved = table.sum(-1) * lengths
  dp, prev = np.zeros(t), np.zeros(t, int)
  for i in range(t):
    best, best_j = (dp[i - 1] if i > 0 else 0), i
    for size in range(2, min(i + 1, max_window) + 1):
      j = i - size
      value = (dp[j] if j >= 0 else 0) + saved[j + 1, i]
      if value > best:
        best, best_j = value, j + 1
    dp[i], prev[i] = best, best_j
  windows, i = [], t - 1
  while i >= 0:
    windows.append((prev[i], i))
    i = prev[i] - 1
  return windows[::-1], dp[-1]


def official_centres(x, cluster_num, k):
  """HoliTom's `cluster_dpc_knn`: the centres, sorted by index (as the callers sort them)."""
  n, c = x.shape
  dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)) / np.sqrt(c)
  density = np.exp(-(np.sort(dist, axis=1)[:, :k] ** 2).mean(1))
  dmax = dist.max()
  delta = np.array([min([dist[i, j] if (density[j] > density[i] or
                                        (density[j] == density[i] and j < i)) else dmax
                         for j in range(n)]) for i in range(n)])
  score = delta * density
  return np.sort(sorted(range(n), key=lambda i: (-score[i], i))[:cluster_num]), dist


def official_clustering(feat, cluster_num, k, beta):
  """`merge_tokens_by_clustering`: [(centre index, member indices, value)]."""
  centres, dist = official_centres(feat, cluster_num, min(k, cluster_num))
  others = [i for i in range(len(feat)) if i not in set(centres)]
  nearest = np.argmin(dist[others][:, centres], axis=1) if others else []
  out = []
  for c, i in enumerate(centres):
    mine = [others[j] for j in range(len(others)) if nearest[j] == c]
    value = beta * feat[i] + (1 - beta) * feat[mine].mean(0) if mine else feat[i]
    out.append((i, [i] + mine, value))
  return out


def official_outer(x, attn, frames, num, tau=0.8, beta=0.6, d=0.0, k=7):
  """The outer stage of one example (x: [T * P, D], attn: [T * P]); the retain ratio is
  num / N. Returns [(kind, representative, members, features)] (raster indices)."""
  n, dim = x.shape
  p = n // frames
  fr, at = x.reshape(frames, p, dim), attn.reshape(frames, p)
  unit = fr / np.linalg.norm(fr, axis=-1, keepdims=True)
  sim = (unit[:-1] * unit[1:]).sum(-1)
  windows, saved = official_windows(sim, tau)
  r = min(Fraction(num) / (n - int(saved)), 1)
  tokens = []

  def dynamic(t, positions):
    c = math.ceil(len(positions) * r)
    dominant = round(c * (1 - d))
    order = np.argsort(-at[t, positions], kind="stable")
    top = set(order[:dominant].tolist())
    for i in sorted(top):
      q = t * p + positions[i]
      tokens.append(("dynamic", q, [q], fr[t, positions[i]]))
    rest = [i for i in range(len(positions)) if i not in top]
    if c - dominant > 0:
      for centre, members, value in official_clustering(fr[t, [positions[i] for i in rest]],
                                                        c - dominant, k, beta):
        tokens.append(("contextual", t * p + positions[rest[centre]],
                       [t * p + positions[rest[j]] for j in members], value))

  for start, end in windows:
    if start == end:
      dynamic(start, list(range(p)))
      continue
    static = np.all(sim[start:end] > tau, axis=0)
    pos_s = np.flatnonzero(static)
    c = round(len(pos_s) * r)
    if c > 0:
      for centre, members, value in official_clustering(fr[start:end + 1][:, static].mean(0),
                                                        c, k, beta):
        tokens.append(("static", start * p + pos_s[centre],
                       [f * p + pos_s[j] for f in range(start, end + 1) for j in members], value))
    for t in range(start, end + 1):
      dynamic(t, list(np.flatnonzero(~static)))
  return tokens


def official_inner(h, score, keep_num):
  """`Qwen2Model_holitom.forward`'s merge: (kept indices sorted, their merged states, members)."""
  top = np.argsort(-score, kind="stable")[:keep_num]  # topk order: by attention
  others = [i for i in range(len(h)) if i not in set(top.tolist())]
  norm = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)
  best = np.argmax(norm(h[others]) @ norm(h[top]).T, axis=1) if others else []
  h = h.copy()
  members = {int(i): [int(i)] for i in top}
  for i, j in zip(others, best):
    h[top[j]] = (h[top[j]] + h[i]) / 2
    members[int(top[j])].append(i)
  kept = np.sort(top)
  return kept, h[kept], [members[int(i)] for i in kept]


# ---------------------------------------------------------------------------------------------
# Inputs: clips of scenes; in each scene some positions barely change (static), others do.
# ---------------------------------------------------------------------------------------------


def clip(seed, batch=2, scenes=(3, 5), grid=(6, 6), dim=8, calm=0.6):
  x, tokens, rng = scene_clip(seed, batch, scenes, grid, dim, calm)
  attn = rng.random((batch, x.shape[1])).astype(np.float32)
  return x, attn, tokens


@functools.lru_cache(maxsize=None)
def _outer(budget, **opts):
  return jax.jit(lambda t, s: compress.holitom(t, budget, scores=s, **opts))


def _compare(out, b, want, n):
  want = sorted(want, key=lambda tok: tok[1])
  count = int(out.mask[b].sum())
  assert count == len(want)
  np.testing.assert_array_equal(np.asarray(out.linear_pos())[b, :count], [t[1] for t in want])
  np.testing.assert_allclose(np.asarray(out.x[b, :count]), np.stack([t[3] for t in want]),
                             rtol=1e-4, atol=1e-4)
  src = np.full(n, -1)
  for slot, tok in enumerate(want):
    src[tok[2]] = slot
  np.testing.assert_array_equal(np.asarray(out.src[b]), src)


@pytest.mark.parametrize("seed, scenes, grid, ratio, tau", [
    (0, (3, 5), (6, 6), 0.25, 0.8),
    (1, (4, 4), (4, 5), 0.1, 0.65),
    (2, (2, 1, 5), (4, 4), 0.5, 0.8),  # a one-frame scene
])
def test_outer_matches_official(seed, scenes, grid, ratio, tau):
  x, attn, tokens = clip(seed, scenes=scenes, grid=grid)
  frames, n = sum(scenes), tokens.num_tokens
  budget = math.ceil(ratio * n + 1.5 * frames)  # capacity that never truncates
  out = _outer(budget, retain_ratio=ratio, tau=tau)(tokens, jnp.asarray(attn))
  check_contract(out, budget, 2)
  kinds = set()
  for b in range(2):
    want = official_outer(x[b].astype(np.float64), attn[b], frames, Fraction(str(ratio)) * n,
                          tau=tau)
    _compare(out, b, want, n)
    kinds |= {t[0] for t in want}
  assert {"static", "dynamic"} <= kinds


def test_outer_contextual_tokens_match_official():
  x, attn, tokens = clip(3, scenes=(4, 4), grid=(5, 5))
  n = tokens.num_tokens
  out = _outer(n, retain_ratio=0.5, contextual=0.5, k=3, beta=0.3)(tokens, jnp.asarray(attn))
  for b in range(2):
    want = official_outer(x[b].astype(np.float64), attn[b], 8, Fraction(1, 2) * n, beta=0.3,
                          d=0.5, k=3)
    assert any(t[0] == "contextual" for t in want)
    _compare(out, b, want, n)


def test_outer_budget_is_the_ratio_and_truncates_static_first_then_by_attention():
  x, attn, tokens = clip(4)
  n, budget = tokens.num_tokens, 40
  out = _outer(budget)(tokens, jnp.asarray(attn))
  check_contract(out, budget, 2)
  for b in range(2):
    want = official_outer(x[b].astype(np.float64), attn[b], 8, budget)
    assert len(want) > budget  # rounding up per frame: the official keeps a few more
    prio = [(0, 0, t[1]) if t[0] == "static" else (1, -attn[b, t[1]], t[1]) for t in want]
    keep = sorted(range(len(want)), key=lambda i: prio[i])[:budget]
    _compare(out, b, [want[i] for i in keep], n)


def test_outer_scores_per_patch_follow_pooling():
  """With `pool` first, per-patch scores are averaged over each pooled token's patches."""
  x, attn, tokens = clip(5, scenes=(2, 2), grid=(4, 4))
  pooled = compress.pool(tokens, 16)  # 2 x 2 windows: 4 tokens per frame
  run = jax.jit(lambda t, s: compress.holitom(t, 8, scores=s))
  got = run(pooled, jnp.asarray(attn))
  per_token = attn.reshape(2, 4, 2, 2, 2, 2).mean(axis=(3, 5)).reshape(2, 16)
  want = run(pooled, jnp.asarray(per_token))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6)


def test_static_windows_match_official():
  rng = np.random.default_rng(0)
  cases = [rng.random((15, 6)) for _ in range(40)]
  cases += [np.repeat(rng.random((15, 1)), 6, axis=1) for _ in range(20)]  # whole-frame cuts
  run = jax.jit(jax.vmap(lambda s: ht.static_windows(s > 0.5, 4)))
  starts, saved = run(jnp.asarray(np.stack(cases)))
  run_all = jax.jit(jax.vmap(lambda s: ht.static_windows(s > 0.5)))
  starts_all, saved_all = run_all(jnp.asarray(np.stack(cases)))
  for sim, st, sv, st_all, sv_all in zip(cases, np.asarray(starts), np.asarray(saved),
                                         np.asarray(starts_all), np.asarray(saved_all)):
    for got_start, got_saved, limit in ((st, sv, 4), (st_all, sv_all, 1024)):
      windows, want_saved = official_windows(sim, 0.5, limit)
      want = np.concatenate([[s] * (e - s + 1) for s, e in windows])
      np.testing.assert_array_equal(got_start, want)
      assert got_saved == want_saved


def test_one_frame_is_attention_top_k():
  x = jax.random.normal(jax.random.key(0), (2, 64, 8))
  attn = jax.random.uniform(jax.random.key(1), (2, 64))
  out = jax.jit(lambda x, a: compress.holitom(tcjax.Tokens.from_grid(x, (8, 8)), 16,
                                              scores=a))(x, attn)
  want = np.sort(np.argsort(-np.asarray(attn), axis=-1, kind="stable")[:, :16], axis=-1)
  np.testing.assert_array_equal(np.asarray(out.linear_pos()), want)


def test_inner_merge_matches_official():
  x = jax.random.normal(jax.random.key(2), (2, 40, 8))
  scores = jax.random.uniform(jax.random.key(3), (2, 40))
  t = tcjax.Tokens.from_grid(x, (5, 8))
  out = jax.jit(lambda t, s: compress.holitom_llm(t, 20, scores=s))(t, scores)
  check_contract(out, 20, 2)
  for b in range(2):
    kept, h, members = official_inner(np.asarray(x[b], np.float64), np.asarray(scores[b]), 20)
    np.testing.assert_array_equal(np.asarray(out.linear_pos())[b], kept)
    np.testing.assert_allclose(np.asarray(out.x[b]), h, rtol=1e-5, atol=1e-5)
    src = np.full(40, -1)
    for slot, mem in enumerate(members):
      src[mem] = slot
    np.testing.assert_array_equal(np.asarray(out.src[b]), src)
  mean = compress.holitom_llm(t, 20, scores=scores, merge="mean")
  np.testing.assert_array_equal(np.asarray(mean.src), np.asarray(out.src))
  for b in range(2):
    want = [np.asarray(x[b])[np.asarray(out.src[b]) == s].mean(0) for s in range(20)]
    np.testing.assert_allclose(np.asarray(mean.x[b]), np.stack(want), rtol=1e-5, atol=1e-5)


def test_bad_input():
  _, attn, tokens = clip(0, scenes=(2, 2), grid=(4, 4))
  s = jnp.asarray(attn)
  for opt, val in (("retain_ratio", 0.0), ("beta", 1.5), ("contextual", -0.1), ("k", 0),
                   ("max_window", 0)):
    with pytest.raises(ValueError, match=opt):
      compress.holitom(tokens, 8, scores=s, **{opt: val})
  with pytest.raises(ValueError, match="scores"):
    compress.holitom(tokens, 8, scores=s[:, 1:])
  with pytest.raises(ValueError, match="merge"):
    compress.holitom_llm(tokens, 8, scores=s, merge="sum")


# ---------------------------------------------------------------------------------------------
# In the model: the decoder takes the merged hidden states.
# ---------------------------------------------------------------------------------------------


def test_inner_merge_in_the_decoder_matches_the_reference():
  """holitom_llm at layer K: the last prompt row of layer K-1 picks the kept image tokens, the
  others are merged into them (official sequential rule); prefill and KV-cached decoding equal
  the NumPy reference decoder doing the same merge at layer K."""
  import paligemma_ref as ref  # pylint: disable=g-import-not-at-top
  from test_model import CONFIGS, N, T_PREFIX, inputs, make_params  # pylint: disable=g-import-not-at-top
  config = CONFIGS[1]
  model, params, flat = make_params(config, seed=1)
  K = 2
  m = model.with_plan((("llm", {"method": "holitom_llm", "layer": K, "keep": 0.5}),))
  image, text, _ = inputs(seed=8, t_suffix=0)
  B, steps = text.shape[0], 3
  variables = {"params": params}
  logits, cache, aux = jax.jit(lambda v, i, t: m.apply(v, i, t, method=m.prefill,
                                                       cache_size=steps))(variables, image, text)
  zimg = ref.image_embed(flat, config, image)
  chosen = []

  def merge(x, pos, ar, attns):
    score = attns[K - 1].mean(1)[:, N + T_PREFIX - 1, :N]  # last prompt row, heads' mean
    out_x, out_pos, out_ar = [], [], []
    for b in range(B):
      kept, h, _ = official_inner(x[b, :N], score[b], N // 2)
      chosen.append(kept)
      out_x.append(np.concatenate([h, x[b, N:]]))
      out_pos.append(np.concatenate([pos[b, kept], pos[b, N:]]))
      out_ar.append(np.concatenate([ar[b, kept], ar[b, N:]]))
    return np.stack(out_x), np.stack(out_pos), np.stack(out_ar)

  step = jax.jit(lambda v, tok, c: m.apply(v, tok, c, method=m.decode_step))
  tokens = np.zeros((B, 0), np.int32)
  for s in range(steps + 1):
    ids = np.concatenate([text, tokens], 1)
    xs = np.concatenate([zimg, ref.embed_text(flat, config, ids)], 1)
    ar = np.concatenate([np.zeros((B, N + T_PREFIX)), np.ones((B, s))], 1)
    want, _, _ = ref.decoder(flat, config, xs, ar, attn_layers=(K - 1,), at_layer={K: merge})
    np.testing.assert_allclose(np.asarray(logits), want[:, -1], atol=1e-4, rtol=1e-4,
                               err_msg=f"step {s}")
    if s == 0:
      np.testing.assert_array_equal(np.asarray(aux["llm_kept_pos"][0]), np.stack(chosen[:B]))
    if s == steps:
      break
    tok = np.asarray(jnp.argmax(logits, -1)).astype(np.int32)
    tokens = np.concatenate([tokens, tok[:, None]], 1)
    logits, cache = step(variables, jnp.asarray(tok), cache)
