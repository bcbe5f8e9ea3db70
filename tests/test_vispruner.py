"""VisPruner: hand-worked examples and a NumPy re-implementation of the official algorithm."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import tcjax
from tcjax import compress
from tcjax.compress.vispruner import dedup_schedule

from helpers import check_contract, make_tokens


@functools.lru_cache(maxsize=None)
def _jitted(budget, ratio, step):
  return jax.jit(lambda t, a: compress.vispruner(t, budget, attn=a, important_ratio=ratio,
                                                 dedup_step=step))


def reference(x, importance, budget, ratio, step, with_gap=False):
  """The official loop on Python lists (one example), odd lengths handled as in vispruner, in
  float64. `with_gap`: also the smallest gap between two even-half similarities of any step
  (below float32 rounding, the order of such a pair is the rounding's, not the algorithm's)."""
  n_imp = int(budget * ratio)
  n_div = budget - n_imp
  order = list(np.argsort(-importance, kind="stable"))
  imp, res = order[:n_imp], order[n_imp:]
  x = np.asarray(x, np.float64)
  xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
  gap = np.inf
  while n_div > 0:
    r = min(step, len(res) - n_div, (len(res) + 1) // 2)
    if r <= 0:
      break
    a, b = res[0::2], res[1::2]
    m = (xn[a] @ xn[b].T).max(-1)
    gap = min(gap, np.diff(np.sort(m)).min(initial=np.inf))
    by_m = np.argsort(-m, kind="stable")
    res = [a[i] for i in by_m[r:]] + b
  kept = sorted(imp + res[:n_div])
  return (kept, gap) if with_gap else kept


def test_hand_worked():
  # Attention order 0..7; 1 important (token 0), 2 diverse. Candidates [1..7], R=7:
  # step 1 removes r=min(8, 7-2, 4)=4 -> all of the even half [1,3,5,7]; list [2,4,6];
  # step 2, r=1: even half [2,6] vs odd [4]; token 6 duplicates 4, token 2 is orthogonal -> 6 goes.
  x = np.zeros((1, 8, 3), np.float32)
  x[0, :, 0] = 1.0
  x[0, 2] = [0, 1, 0]
  x[0, 4] = [0, 0, 1]
  x[0, 6] = [0, 0, 2]
  attn = jnp.asarray(np.linspace(1.0, 0.2, 8, dtype=np.float32))[None, None]
  t = tcjax.Tokens.from_grid(jnp.asarray(x), (2, 4))
  out = compress.vispruner(t, 3, attn=attn, important_ratio=1 / 3)
  np.testing.assert_array_equal(out.src[0], [0, -1, 1, -1, 2, -1, -1, -1])
  np.testing.assert_array_equal(out.pos[0, :, 1:], [[0, 0], [0, 2], [1, 0]])


def test_schedule_matches_official_step_count():
  # 576 tokens, budget 64 at ratio 0.75: 48 + 16, (528 - 16) / 8 = 64 steps of 8.
  steps = dedup_schedule(576 - 48, 16, 8)
  assert len(steps) == 64 and all(r == 8 for _, r in steps)
  assert steps[-1][0] - steps[-1][1] == 16


def test_ratio_one_is_attention_topk():
  t = make_tokens(2, 1, (8, 8), seed=3)
  attn = jax.nn.softmax(jax.random.normal(jax.random.key(1), (2, 4, 64)), -1)
  out = compress.vispruner(t, 12, attn=attn, important_ratio=1.0)
  ref = compress.topk(t, 12, scores=attn.mean(1))
  np.testing.assert_array_equal(out.src, ref.src)


def test_nan_attention_ranks_last():
  t = make_tokens(1, 1, (2, 4), seed=0)
  attn = jnp.array([[[jnp.nan, 0.1, 0.5, 0.2, 0.9, jnp.nan, 0.3, 0.0]]])
  out = compress.vispruner(t, 2, attn=attn, important_ratio=1.0)
  np.testing.assert_array_equal(np.flatnonzero(out.src[0] >= 0), [2, 4])


@settings(max_examples=15, deadline=None)
@given(config=st.sampled_from([(8, 8, 16, 0.5, 8), (8, 8, 5, 0.0, 1), (6, 9, 9, 0.25, 3),
                                (1, 13, 4, 0.75, 8), (8, 8, 16, 0.25, 1)]),
       seed=st.integers(0, 10_000))
def test_matches_reference(config, seed):
  # Odd and even list lengths, several phases of the shrinking buffer, r capped by the half.
  h, w, budget, ratio, step = config
  t = make_tokens(2, 1, (h, w), dim=6, seed=seed)
  attn = jax.nn.softmax(2 * jax.random.normal(jax.random.key(seed + 1), (2, 3, h * w)), -1)
  out = _jitted(budget, ratio, step)(t, attn)
  check_contract(out, budget, 2)
  x, imp = np.asarray(t.x), np.asarray(attn.mean(1))
  for b in range(2):
    want, gap = reference(x[b], imp[b], budget, ratio, step, with_gap=True)
    # Similarities closer than float32 can resolve (e.g. 1e-7 apart, seed 136) have no defined
    # order: such draws are not evidence either way.
    assume(gap > 1e-6)
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(out.src[b]) >= 0), want)


def test_matches_reference_over_several_phases():
  # 256 tokens: the candidate buffer shrinks in phases (plus the cached-neighbour lists).
  t = make_tokens(1, 1, (16, 16), dim=6, seed=4)
  attn = jax.nn.softmax(jax.random.normal(jax.random.key(5), (1, 2, 256)), -1)
  out = _jitted(21, 0.5, 8)(t, attn)
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(out.src[0]) >= 0),
                                reference(np.asarray(t.x[0]), np.asarray(attn.mean(1)[0]),
                                          21, 0.5, 8))


def test_non_finite_features_count_as_padding():
  # Tokens 5 (NaN) and 9 (one inf feature), least attended either way: the same selection as
  # with them masked out (both are invalid candidates, removed first).
  t = make_tokens(2, 1, (6, 6), dim=6, seed=8)
  attn = jax.nn.softmax(jax.random.normal(jax.random.key(9), (2, 2, 36)), -1)
  attn = attn.at[:, :, jnp.array([5, 9])].set(-1.0)
  bad = t.replace(x=t.x.at[:, 5].set(jnp.nan).at[:, 9, 2].set(jnp.inf))
  masked = t.replace(mask=t.mask.at[:, jnp.array([5, 9])].set(False))
  run = jax.jit(lambda t, a: compress.vispruner(t, 12, attn=a, important_ratio=0.25,
                                                 dedup_step=1))
  got, want = run(bad, attn), run(masked, attn)
  np.testing.assert_array_equal(got.src, want.src)
  assert (np.asarray(got.src)[:, [5, 9]] == -1).all()  # src: each token's output slot or -1


def test_keys_replace_features_for_similarity():
  # Same hand-worked geometry, but the similarity comes from `keys`: now 2 duplicates 4.
  x = jnp.ones((1, 8, 3))
  keys = np.zeros((1, 8, 2), np.float32)
  keys[0, :, 0] = 1.0
  keys[0, 2] = [0, 1]
  keys[0, 4] = [0, 1]
  keys[0, 6] = [1, 0]
  attn = jnp.asarray(np.linspace(1.0, 0.2, 8, dtype=np.float32))[None, None]
  out = compress.vispruner(tcjax.Tokens.from_grid(x, (2, 4)), 3, attn=attn, keys=keys,
                           important_ratio=1 / 3)
  np.testing.assert_array_equal(np.flatnonzero(out.src[0] >= 0), [0, 4, 6])


def test_bad_options():
  t = make_tokens(1, 1, (4, 4))
  attn = jnp.ones((1, 1, 16)) / 16
  with pytest.raises(ValueError, match="important_ratio"):
    compress.vispruner(t, 4, attn=attn, important_ratio=1.5)
  with pytest.raises(ValueError, match="dedup_step"):
    compress.vispruner(t, 4, attn=attn, dedup_step=0)


@pytest.mark.parametrize("neighbours", [1, 2])
def test_exact_when_the_neighbour_cache_misses(monkeypatch, neighbours):
  # With 1-2 cached neighbours most rows miss the odd half and take the full-row fallback.
  import importlib
  module = importlib.import_module("tcjax.compress.vispruner")
  monkeypatch.setattr(module, "_NEIGHBOURS", neighbours)
  monkeypatch.setattr(module, "_FALLBACK_ROWS", 3)
  monkeypatch.setattr(module, "_CACHE_MIN_CAP", 0)
  t = make_tokens(2, 1, (8, 8), dim=6, seed=11)
  attn = jax.nn.softmax(jax.random.normal(jax.random.key(12), (2, 3, 64)), -1)
  out = jax.jit(lambda t, a: module.vispruner(t, 10, attn=a, important_ratio=0.3,
                                              dedup_step=3))(t, attn)
  x, imp = np.asarray(t.x), np.asarray(attn.mean(1))
  for b in range(2):
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(out.src[b]) >= 0),
                                  reference(x[b], imp[b], 10, 0.3, 3))


def test_non_finite_features_through_the_neighbour_cache(monkeypatch):
  # NaN features in many bins of the cached rows (r0 >= 544, so `top_k_by_bins` cuts bins): the
  # same selection as with those tokens masked out (a NaN similarity once hid its bin's
  # neighbours from the cache).
  import importlib
  module = importlib.import_module("tcjax.compress.vispruner")
  monkeypatch.setattr(module, "_CACHE_MIN_CAP", 0)
  t = make_tokens(2, 1, (24, 24), dim=6, seed=21)
  bad_idx = jnp.arange(3, 576, 7)
  attn = jax.nn.softmax(jax.random.normal(jax.random.key(22), (2, 2, 576)), -1)
  attn = attn.at[:, :, bad_idx].set(-1.0)
  bad = t.replace(x=t.x.at[:, bad_idx].set(jnp.nan))
  masked = t.replace(mask=t.mask.at[:, bad_idx].set(False))
  run = jax.jit(lambda t, a: module.vispruner(t, 40, attn=a, important_ratio=0.5, dedup_step=8))
  np.testing.assert_array_equal(run(bad, attn).src, run(masked, attn).src)


def test_symmetric_gram():
  from tcjax.compress.primitives import gram
  x = np.random.default_rng(0).normal(size=(37, 5)).astype(np.float32)
  for chunk in (8, 10, 64):
    g = np.asarray(gram(jnp.asarray(x), chunk=chunk))
    np.testing.assert_allclose(g, x @ x.T, atol=1e-5)
    np.testing.assert_array_equal(g, g.T)


def test_fast_argsort_matches_stable_argsort():
  # vispruner's per-step sort: a radix argsort that must equal jnp.argsort(stable=True),
  # including ties, signed zeros, infinities, subnormals (XLA's CPU comparator flushes them
  # to zero, NumPy does not: so the reference is jnp.argsort) and NaN (last).
  from tcjax.compress.primitives import argsort
  rng = np.random.default_rng(0)
  special = np.array([-np.inf, -1.0, -0.0, 0.0, 0.5, 2.0, np.inf, np.nan, -3e-39, 3e-39, 1e-45],
                     np.float32)
  fn = jax.jit(argsort)
  for h in (1, 2, 7, 300):
    for trial in range(6):
      if trial % 2:
        k = rng.choice(special, size=(3, h))
      else:
        k = (rng.standard_normal((3, h)) * 10.0 ** rng.integers(-30, 30)).astype(np.float32)
      want = jax.jit(lambda k: jnp.argsort(k, axis=-1, stable=True))(k)
      np.testing.assert_array_equal(fn(jnp.asarray(k)), want)
      if not np.any(np.abs(k) < 1.2e-38):  # no subnormals: NumPy agrees too
        np.testing.assert_array_equal(want, np.argsort(k, axis=-1, kind="stable"))


def test_top_k_by_bins_equals_lax_top_k():
  # The neighbour cache's top-k: same values and indices as lax.top_k, ties (lower index first),
  # NaN (largest), signed zeros, infinities, and a last axis that does not divide into bins.
  from tcjax.compress.primitives import top_k_by_bins
  rng = np.random.default_rng(1)
  special = np.array([-np.inf, -0.0, 0.0, 1.0, np.nan, np.inf], np.float32)
  fn = jax.jit(top_k_by_bins, static_argnums=(1, 2))
  for trial in range(40):
    n, k, size = int(rng.integers(40, 700)), int(rng.integers(1, 10)), int(rng.integers(1, 9))
    kind = trial % 4
    if kind == 0:
      x = rng.standard_normal((3, n))
    elif kind == 1:  # many ties
      x = rng.integers(0, 4, (3, n))
    elif kind == 2:
      x = rng.choice(special, (3, n))
    else:
      x = rng.choice(special[1:3], (3, n))
    x = jnp.asarray(x, jnp.float32)
    got, want = fn(x, k, size), jax.lax.top_k(x, k)
    np.testing.assert_array_equal(got[1], want[1])
    np.testing.assert_array_equal(got[0], want[0])


@pytest.mark.parametrize("axis_type", [None, "explicit", "auto"])
def test_examples_in_turn_match_all_at_once(monkeypatch, axis_type):
  # On CPU, examples with large Gram matrices run in turn (`map_batch`); a tiny byte budget
  # forces that path here: same selection as the whole batch at once, on one device and with
  # the batch sharded over 2 devices (4 steps of 2 examples, one on each).
  import importlib
  from jax.sharding import NamedSharding, PartitionSpec
  from tcjax.parallel import make_mesh
  module = importlib.import_module("tcjax.compress.vispruner")
  t = make_tokens(8, 1, (8, 8), dim=6, seed=21)
  attn = jax.nn.softmax(jax.random.normal(jax.random.key(22), (8, 2, 64)), -1)
  run = lambda t, a: module.vispruner(t, 12, attn=a, dedup_step=3)
  want = jax.jit(run)(t, attn)
  monkeypatch.setattr(module, "_CPU_GRAM_BYTES", 1)
  assert module._chunks(8, 58, 1) == 8 and module._chunks(8, 58, 4) == 2
  if axis_type is None:
    got = jax.jit(run)(t, attn)
  else:
    mesh = make_mesh((("data", 2),), axis_types=axis_type)
    shard = lambda a: jax.device_put(a, NamedSharding(mesh, PartitionSpec("data")))
    with jax.set_mesh(mesh):
      got = jax.jit(run)(jax.tree.map(shard, t), shard(attn))
    assert got.x.sharding.spec[0] == "data"
  np.testing.assert_array_equal(got.src, want.src)
  np.testing.assert_array_equal(got.x, want.x)
