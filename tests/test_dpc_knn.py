"""DPC-KNN against a brute-force NumPy implementation; mass conservation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

import tcjax
from tcjax import compress

from helpers import check_contract


@functools.lru_cache(maxsize=None)
def _jitted(budget, **opts):
  return jax.jit(lambda t: compress.dpc_knn(t, budget, **opts))


def numpy_dpc(x, n_centres, k):
  """Brute-force DPC-KNN of one example `x: [N, D]`: (centres, assignment, plain means)."""
  x = x.astype(np.float64)
  n, d = x.shape
  dist = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1)) / np.sqrt(d)
  rho = np.exp(-(np.sort(dist, axis=1)[:, :k] ** 2).mean(1))
  delta = np.empty(n)
  for i in range(n):
    denser = [j for j in range(n) if rho[j] > rho[i] or (rho[j] == rho[i] and j < i)]
    delta[i] = min(dist[i, j] for j in denser) if denser else dist.max()
  score = rho * delta
  centres = sorted(range(n), key=lambda i: (-score[i], i))[:n_centres]
  assign = np.array([int(np.argmin(dist[centres, j])) for j in range(n)])
  for c, i in enumerate(centres):
    assign[i] = c
  means = np.stack([x[assign == c].mean(0) for c in range(n_centres)])
  return np.array(centres), assign, means


def test_matches_numpy_brute_force():
  for n, d, budget, k, seed in ((64, 8, 16, 5, 0), (64, 8, 16, 3, 1), (36, 5, 7, 5, 2)):
    h = 8 if n == 64 else 6
    x = np.asarray(jax.random.normal(jax.random.key(seed), (2, n, d)))
    out = _jitted(budget, k=k)(tcjax.Tokens.from_grid(jnp.asarray(x), (h, n // h)))
    check_contract(out, budget, 2)
    for b in range(2):
      centres, assign, means = numpy_dpc(x[b], budget, k)
      order = np.argsort(centres)  # output is in raster order of the centres
      slot = np.empty(budget, int)
      slot[order] = np.arange(budget)
      np.testing.assert_array_equal(out.src[b], slot[assign])
      lin = np.asarray(out.pos[b, :, 1] * (n // h) + out.pos[b, :, 2])
      np.testing.assert_array_equal(lin, centres[order])
      np.testing.assert_allclose(out.x[b], means[order], rtol=1e-5, atol=1e-5)
      np.testing.assert_array_equal(out.size[b], np.bincount(assign, minlength=budget)[order])


def test_ties_are_deterministic_and_rng_runs():
  x = jnp.tile(jnp.eye(4)[None], (1, 4, 1))  # 16 tokens, 4 distinct features, exact ties
  t = tcjax.Tokens.from_grid(x, (4, 4))
  a, b = _jitted(4)(t), _jitted(4)(t)
  np.testing.assert_array_equal(a.src, b.src)
  check_contract(a, 4, 1)
  # One cluster per distinct feature, centred on its first occurrence.
  np.testing.assert_array_equal(a.src[0], np.tile(np.arange(4), 4))
  out = compress.dpc_knn(t, 4, rng=jax.random.key(0))
  check_contract(out, 4, 1)
  np.testing.assert_array_equal(np.sort(out.size[0]), [4, 4, 4, 4])


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.sampled_from([4, 16]))
def test_size_weighting_conserves_mass(seed, budget):
  k1, k2 = jax.random.split(jax.random.key(seed))
  t = tcjax.Tokens.from_grid(jax.random.normal(k1, (2, 64, 8)), (8, 8))
  t = t.replace(size=jax.random.randint(k2, (2, 64), 1, 5).astype(jnp.float32))
  out = _jitted(budget, weighting="size")(t)
  np.testing.assert_allclose(out.size.sum(-1), t.size.sum(-1), rtol=1e-6)
  np.testing.assert_allclose(jnp.einsum("bn,bnd->bd", out.size, out.x),
                             jnp.einsum("bn,bnd->bd", t.size, t.x), rtol=1e-4, atol=1e-4)
  # The official plain mean ignores sizes: it differs from the size-weighted one here.
  plain = _jitted(budget)(t)
  np.testing.assert_array_equal(plain.src, out.src)
  assert not np.allclose(plain.x, out.x)


def test_chat_univi_cascade_matches_numpy():
  """Chat-UniVi's image path: 256 -> 64 (k 5) -> 32 (k 3) -> 16 (k 3), each level clustering the
  previous level's plain means (CTM token weight 1), all 112 tokens concatenated."""
  import importlib
  dk = importlib.import_module("tcjax.compress.dpc_knn")  # the module, not the function
  x = np.asarray(jax.random.normal(jax.random.key(5), (2, 256, 8)))
  t = tcjax.Tokens.from_grid(jnp.asarray(x), (16, 16))
  levels = jax.jit(dk.cascade)(t)
  assert [lv.num_tokens for lv in levels] == [64, 32, 16]
  assert [dk.ctm_k(k, c) for k, c in zip(dk.CHAT_UNIVI_K, dk.CHAT_UNIVI_LEVELS)] == [5, 3, 3]
  assert dk.ctm_k(5, 4) == 2 and dk.ctm_k(3, 1) == 1  # k above the clusters: CTM's fallback
  feats, mask = dk.concatenate(levels)
  assert feats.shape == (2, 112, 8) and bool(mask.all())
  for b in range(2):
    feat, pos, member = x[b], np.arange(256), np.arange(256)  # member: patch -> current token
    got_all = []
    for lv, (c, k) in zip(levels, zip(dk.CHAT_UNIVI_LEVELS, dk.CHAT_UNIVI_K)):
      check_contract(lv, c, 2)
      centres, assign, means = numpy_dpc(feat, c, dk.ctm_k(k, c))
      feat, pos, member = means, pos[centres], assign[member]
      order = np.argsort(pos)  # tcjax: raster order of the centres
      lin = np.asarray(lv.pos[b, :, 1] * 16 + lv.pos[b, :, 2])
      np.testing.assert_array_equal(lin, pos[order])
      np.testing.assert_allclose(np.asarray(lv.x[b]), feat[order], rtol=1e-4, atol=1e-5)
      slot = np.empty(c, int)
      slot[order] = np.arange(c)
      np.testing.assert_array_equal(np.asarray(lv.src[b]), slot[member])
      got_all.append(feat[order])
    np.testing.assert_allclose(np.asarray(feats[b]), np.concatenate(got_all), rtol=1e-4,
                               atol=1e-5)


def _dense_plan(x, valid, budget, k, noise=None):
  """The passes over the whole N x N distance matrix, with a plain argmin: `dpc_plan`'s
  reference."""
  from tcjax.compress import primitives as P  # pylint: disable=g-import-not-at-top
  d2, dmax2 = P.dpc_sq_dists(x, valid)
  score = P.dpc_scores(d2, dmax2, valid, k, x.shape[1], noise=noise)
  centres = jax.lax.top_k(score, budget)[1].astype(jnp.int32)
  dc = jnp.where(valid[centres][:, None], P.dpc_dist(d2[centres], x.shape[1]), jnp.inf)
  assign = jnp.argmin(dc, 0).astype(jnp.int32)
  own = jnp.full(assign.shape, -1, jnp.int32).at[jnp.where(valid[centres], centres, len(assign))
                                                 ].set(jnp.arange(budget, dtype=jnp.int32),
                                                       mode="drop")
  return jnp.where(own >= 0, own, assign), centres


def test_dpc_plan_matches_dense_passes():
  """`primitives.dpc_plan` (Gram rows, bins, k-nearest deltas, peak rows in rounds) gives the
  dense passes' centres and assignment exactly, also when most rows are density peaks (rounds
  of 8 rows: many rounds), with duplicates, ties, padding and NaN padding, N not a multiple of
  the bins, and the official noise."""
  from tcjax.compress import primitives as P  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  cases = []
  for n in (352, 400):
    x = rng.normal(size=(n, 24)).astype(np.float32)
    cases.append(("random", x, np.ones(n, bool)))
    # Few distinct points, many exact duplicates: every density ties within a cluster.
    cases.append(("duplicates", x[rng.integers(0, 12, n)], np.ones(n, bool)))
    # Points on a line at equal spacing: distances tie, and most rows are local peaks.
    line = np.zeros((n, 24), np.float32)
    line[:, 0] = np.arange(n) % 37
    cases.append(("ties", line, np.ones(n, bool)))
    # Quantised features: many equal distances across rows.
    cases.append(("quantised", np.round(x), np.ones(n, bool)))
    valid = rng.random(n) > 0.3
    cases.append(("padding", x, valid))
    cases.append(("nan padding", np.where(valid[:, None], x, np.nan).astype(np.float32), valid))
  # One jitted function per side, so that cases of one shape share their compilations.
  dense = jax.jit(_dense_plan, static_argnames=("budget", "k"))
  plan = jax.jit(functools.partial(P.dpc_plan, peak_rows=8), static_argnames=("budget", "k"))
  peaks_seen = 0
  for name, x, valid in cases:
    x, valid = jnp.asarray(x), jnp.asarray(valid)
    n = x.shape[0]
    official = jnp.asarray(rng.random(n).astype(np.float32) * 1e-6)
    # Noise far above the densities orders the tokens at random: about 1 / k of the rows are
    # then denser than all their k - 1 nearest (peaks, the full-row path).
    shuffled = jnp.asarray(rng.random(n).astype(np.float32))
    for k, budget, nz in ((5, 64, None), (3, 100, None), (5, 64, official), (3, 64, shuffled)):
      want = dense(x, valid, noise=nz, budget=budget, k=k)
      got = plan(x, valid, noise=nz, budget=budget, k=k)
      for w, g in zip(want, got):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f"{name}, k={k}")
    # How many rows take the full-row path (no denser token among their k nearest).
    d2, _ = P.dpc_sq_dists(x, valid)
    vals, cols = P.top_k_by_bins(-d2, 3, 32)
    rho = P._dpc_density(-vals, 3, x.shape[1], shuffled)[0]
    rank = np.argsort(np.argsort(-np.asarray(rho), kind="stable"))
    peaks = np.asarray(valid) & ~(rank[np.asarray(cols)] < rank[:, None]).any(1)
    peaks_seen = max(peaks_seen, int(peaks.sum()))
  assert peaks_seen > 64  # the rounds of 8 rows ran many times
