"""VisionZip: a hand-worked example, a NumPy re-implementation of the official code, mass checks."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import tcjax
from tcjax import compress
from tcjax.compress.visionzip import default_split

from helpers import check_contract

TIE = 1e-5  # key-similarity gaps below this are rounding-dependent: such draws are skipped


# Jitted once per configuration; inputs and outputs are NumPy (no eager op compiles per test).
def _np(tree):
  return jax.tree.map(np.asarray, tree)


@functools.lru_cache(maxsize=None)
def _vz(budget, dominant=None, contextual=None, merge="official"):
  fn = jax.jit(lambda t, a, k: compress.visionzip(
      t, budget, attn=a, keys=k, dominant=dominant, contextual=contextual, merge=merge))
  return lambda t, a, k: _np(fn(t, a, k))


def _tokens(batch, h, w, dim, seed):
  x = np.random.default_rng(seed).standard_normal((batch, h * w, dim)).astype(np.float32)
  return _np(tcjax.Tokens.from_grid(jnp.asarray(x), (h, w)))


def reference(x, a, keys, kd, c, rule):
  """The official algorithm on one example (float64). Returns [(origin, patches, feature)]
  in raster order of origin, and whether a near tie made the draw rounding-dependent."""
  n = len(x)
  dom = sorted(np.argsort(-a, kind="stable")[:kd].tolist())
  rest = [i for i in range(n) if i not in dom]
  out = [(d, [d], x[d]) for d in dom]
  tie = False
  if c:
    step = max(1, len(rest) // c)
    targets = [rest[p] for p in range(0, len(rest), step)][:c]
    others = [i for i in rest if i not in targets]
    kn = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
    sim = kn[others] @ kn[targets].T
    if len(targets) > 1 and len(others):
      top2 = np.sort(sim, 1)[:, -2:]
      tie = bool(np.any(top2[:, 1] - top2[:, 0] < TIE))
    join = sim.argmax(1) if len(others) else np.zeros(0, int)
    for j, t in enumerate(targets):
      mem = [o for o, g in zip(others, join) if g == j]
      if rule == "official":
        feat = x[t] + (x[mem].mean(0) if mem else 0.0)
      else:
        feat = x[[t] + mem].mean(0)
      out.append((t, sorted([t] + mem), feat))
  return sorted(out, key=lambda e: e[0]), tie


def assert_matches(out, b, ref, w):
  count = int(out.count()[b])
  assert count == len(ref)
  lin = np.asarray(out.pos[b, :count, 1] * w + out.pos[b, :count, 2])
  np.testing.assert_array_equal(lin, [e[0] for e in ref])
  src = np.asarray(out.src[b])
  assert [sorted(np.flatnonzero(src == i).tolist()) for i in range(count)] == [e[1] for e in ref]
  np.testing.assert_allclose(out.x[b, :count], np.stack([e[2] for e in ref]), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_array_equal(out.size[b, :count], [len(e[1]) for e in ref])


def _hand_inputs():
  # 2x4 grid, x_j = [j, 1]. Attention: top 3 are tokens 2 (8), 5 (7), 0 (5).
  x = np.stack([np.arange(8), np.ones(8)], -1)[None].astype(np.float32)
  a = np.array([5, 1, 8, 2, 3, 7, 0.5, 4], np.float32)[None, None]
  deg = lambda d: [np.cos(np.deg2rad(d)), np.sin(np.deg2rad(d))]
  keys = np.array([[1, 0], deg(0), [1, 0], deg(30), deg(90), [1, 0], deg(80), [1, 1]],
                  np.float32)[None]
  return _np(tcjax.Tokens.from_grid(jnp.asarray(x), (2, 4))), a, keys


def test_hand_worked_official():
  # Dominant {0, 2, 5}. R = [1, 3, 4, 6, 7], 2 contextual: step 5 // 2 = 2, targets R[0] = 1
  # and R[2] = 4. Token 3 (30 deg) is nearer target 1 (0 deg) than target 4 (90 deg); token 6
  # (80 deg) nearer 4; token 7 ([1, 1]) is equally near both: the first target, 1, wins.
  # Official rule: ctx_1 = x_1 + mean(x_3, x_7) = [1, 1] + [5, 1] = [6, 2];
  #                ctx_4 = x_4 + mean(x_6) = [4, 1] + [6, 1] = [10, 2].
  t, a, keys = _hand_inputs()
  out = _vz(5, 3, 2)(t, a, keys)
  check_contract(out, 5, 1)
  np.testing.assert_array_equal(out.pos[0, :, 1] * 4 + out.pos[0, :, 2], [0, 1, 2, 4, 5])
  np.testing.assert_allclose(out.x[0], [[0, 1], [6, 2], [2, 1], [10, 2], [5, 1]], rtol=1e-6)
  np.testing.assert_array_equal(out.size[0], [1, 3, 1, 2, 1])
  np.testing.assert_array_equal(out.src[0], [0, 1, 2, 1, 3, 4, 3, 1])


def test_hand_worked_mean():
  # Same clusters; "mean": ctx_1 = mean(x_1, x_3, x_7) = [11/3, 1], ctx_4 = mean(x_4, x_6).
  t, a, keys = _hand_inputs()
  out = _vz(5, 3, 2, "mean")(t, a, keys)
  np.testing.assert_allclose(out.x[0], [[0, 1], [11 / 3, 1], [2, 1], [5, 1], [5, 1]],
                             rtol=1e-6)
  np.testing.assert_array_equal(out.src[0], [0, 1, 2, 1, 3, 4, 3, 1])


def test_default_split_is_54_to_10():
  assert default_split(64) == (54, 10)
  assert default_split(128) == (108, 20)
  assert default_split(192) == (162, 30)
  assert default_split(144) == (122, 22)  # floor(144 * 10 / 64) = floor(22.5)
  assert default_split(16) == (14, 2)
  assert default_split(6) == (5, 1)  # at least one contextual token from budget 2
  assert default_split(2) == (1, 1)
  assert default_split(1) == (1, 0)


@settings(max_examples=12, deadline=None)
@given(case=st.sampled_from([((8, 8), 16, None, None, "official"), ((8, 8), 20, 12, 8, "mean"),
                             ((5, 7), 9, 0, 9, "official"), ((24, 24), 63, 53, 10, "official")]),
       seed=st.integers(0, 10_000))
def test_matches_official_reference(case, seed):
  (h, w), budget, kd, c, rule = case
  t = _tokens(2, h, w, 6, seed)
  rng = np.random.default_rng(seed + 1)
  keys = rng.standard_normal((2, h * w, 5)).astype(np.float32)
  a = rng.random((2, 2, h * w)).astype(np.float32)
  kd_, c_ = default_split(budget) if kd is None else (kd, c)
  refs = [reference(np.asarray(t.x[b], np.float64), np.asarray(a[b].mean(0), np.float64),
                    np.asarray(keys[b], np.float64), kd_, c_, rule) for b in range(2)]
  assume(not any(tie for _, tie in refs))
  out = _vz(budget, kd, c, rule)(t, a, keys)
  check_contract(out, budget, 2)
  for b, (ref, _) in enumerate(refs):
    assert_matches(out, b, ref, w)


def test_spec_example_targets():
  # CLIP 576 patches, 53 dominant patches (+ [CLS] in the official code), 10 contextual:
  # |R| = 523, step 52, targets at R-positions 0, 52, ..., 468.
  n = 576
  t = _tokens(1, 24, 24, 4, 0)
  a = np.zeros((1, 1, n), np.float32)
  dom = np.arange(0, 530, 10)  # 53 dominant patches: 0, 10, ..., 520
  a[0, 0, dom] = 1.0
  keys = np.random.default_rng(0).standard_normal((1, n, 5)).astype(np.float32)
  out = _vz(63, 53, 10)(t, a, keys)
  rest = np.setdiff1d(np.arange(n), dom)
  targets = rest[np.arange(0, 52 * 10, 52)]
  lin = np.asarray(out.pos[0, :, 1] * 24 + out.pos[0, :, 2])
  np.testing.assert_array_equal(np.sort(lin), np.sort(np.concatenate([dom, targets])))
  chex.assert_shape(out.x, (1, 63, 4))


@functools.lru_cache(maxsize=None)
def _tome40_jit():
  return jax.jit(lambda t, k: compress.tome(t, 40, keys=k))


def _tome40(t, keys):
  return _np(_tome40_jit()(t, keys))


def _with_padding(t, pad):
  """Marks tokens `pad` (bool[B, N]) of a raw grid as padding (their patches dropped)."""
  return t.replace(mask=~pad, size=np.where(pad, 0.0, t.size).astype(np.float32),
                   src=np.where(pad, -1, t.src).astype(np.int32))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000),
       case=st.sampled_from([((10, 6), False), ((3, 13), True), ((16, 0), False)]),
       pad_frac=st.sampled_from([0.0, 0.4]))
def test_mean_conserves_mass(seed, case, pad_frac):
  (kd, c), presize = case
  t = _tokens(2, 8, 8, 5, seed)
  rng = np.random.default_rng(seed)
  pad = rng.random((2, 64)) < pad_frac
  t = _with_padding(t, pad)
  x0 = np.asarray(t.x, np.float64)
  if presize:  # start from merged tokens (sizes > 1)
    t = _tome40(t, rng.standard_normal((2, 64, 4)).astype(np.float32))
  n = t.num_tokens
  keys = rng.standard_normal((2, n, 4)).astype(np.float32)
  a = rng.random((2, 1, n)).astype(np.float32)
  out = _vz(kd + c, kd, c, "mean")(t, a, keys)
  check_contract(out, kd + c, 2)
  for b in range(2):
    v = np.asarray(out.mask[b])
    src = np.asarray(out.src[b])
    valid = ~np.asarray(pad[b])
    # Every valid patch is carried (VisionZip drops nothing) unless the budget is all dominant.
    if c:
      np.testing.assert_array_equal(src >= 0, valid)
      assert float(np.asarray(out.size[b])[v].sum()) == valid.sum()
      np.testing.assert_allclose(
          (np.asarray(out.size[b])[v, None] * np.asarray(out.x[b])[v]).sum(0),
          x0[b][valid].sum(0), rtol=1e-4, atol=1e-4)
    for i in np.flatnonzero(v):  # each token is the mean of the raw patches it carries
      np.testing.assert_allclose(out.x[b, i], x0[b][src == i].mean(0), rtol=1e-4, atol=1e-5)


def test_padding_fills_missing_contextual_slots():
  # 16 tokens, 10 of them padding; 4 dominant + 4 contextual: 2 valid tokens remain, both
  # become targets (step max(1, 2 // 4) = 1); the last 2 slots are padding.
  t = _with_padding(_tokens(1, 4, 4, 3, 1), (np.arange(16) >= 6)[None])
  a = np.linspace(1, 0, 16, dtype=np.float32)[None, None]
  keys = np.random.default_rng(2).standard_normal((1, 16, 3)).astype(np.float32)
  out = _vz(8, 4, 4)(t, a, keys)
  check_contract(out, 8, 1)
  np.testing.assert_array_equal(out.mask[0], [1] * 6 + [0] * 2)
  np.testing.assert_array_equal(out.src[0, :6], np.arange(6))
  np.testing.assert_allclose(out.x[0, :6], t.x[0, :6], rtol=1e-6)  # no members: h_t
  assert not np.any(np.asarray(out.x[0, 6:]))


def test_nan_signals():
  t, a, keys = _hand_inputs()
  # NaN attention on token 2 (the most attended): never dominant; token 1 takes its place.
  a_nan = a.copy()
  a_nan[0, 0, 2] = np.nan
  out = _vz(5, 3, 2)(t, a_nan, keys)
  src = np.asarray(out.src[0])
  assert np.all(np.isfinite(np.asarray(out.x)))
  np.testing.assert_array_equal(out.size[0][src[[0, 5, 7]]], 1)  # 0, 5, 7 dominant alone
  # NaN keys on a member (token 6): it joins the first target (token 1).
  keys_nan = keys.copy()
  keys_nan[0, 6] = np.nan
  out = _vz(5, 3, 2)(t, a, keys_nan)
  src = np.asarray(out.src[0])
  assert src[6] == src[1]


def test_bad_arguments():
  t, a, keys = _hand_inputs()
  for kw, what in ((dict(dominant=3, contextual=3), "dominant \\+ contextual"),
                   (dict(dominant=6), "dominant"), (dict(contextual=-1), "contextual"),
                   (dict(dominant=2.5), "dominant"), (dict(merge="sum"), "merge")):
    with pytest.raises(ValueError, match=what):
      compress.visionzip(t, 5, attn=a, keys=keys, **kw)
  with pytest.raises(ValueError, match="attn"):
    compress.visionzip(t, 5, attn=a[:, :0], keys=keys)
  with pytest.raises(ValueError, match="keys"):
    compress.visionzip(t, 5, attn=a)
  with pytest.raises(ValueError, match="keys"):
    compress.visionzip(t, 5, attn=a, keys=keys[:, :, None])
  with pytest.raises(ValueError, match="budget"):
    compress.visionzip(t, 9, attn=a, keys=keys)
