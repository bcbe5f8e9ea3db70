"""ToMe against a NumPy re-implementation of the official algorithm, plus mass and bias checks."""

import functools
import math
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings, strategies as st

import tcjax
from tcjax import compress

from helpers import check_contract

# `compress.tome` is the registered function; the module holds the round-level API.
tome_mod = sys.modules["tcjax.compress.tome"]
bipartite_merge, attention_bias = tome_mod.bipartite_merge, tome_mod.attention_bias
r_schedule, merge_rounds = tome_mod.r_schedule, tome_mod.merge_rounds

TIE = 1e-5  # similarity gaps below this are rounding-dependent: such draws are skipped


# ---------------------------------------------------------------------------------------------
# Reference: the official algorithm on one example, in float64, tracking groups of patches.
# ---------------------------------------------------------------------------------------------


def ref_round(state, r, class_token=False):
  """One official round. state: dict of lists/arrays in the current token order:
  x [T, D], size [T], keys [T, Dk], groups (list of patch lists, first = destination origin).
  Returns (new state, near_tie flag)."""
  x, size, keys, groups = state["x"], state["size"], state["keys"], state["groups"]
  t = len(x)
  r = min(r, (t - int(class_token)) // 2)
  m = keys / np.linalg.norm(keys, axis=-1, keepdims=True)
  s = m[0::2] @ m[1::2].T
  if class_token:
    s[0, :] = -np.inf
  best, dst = s.max(1), s.argmax(1)
  fin = np.sort(best[np.isfinite(best)])
  top2 = np.sort(s, 1)[:, -2:] if s.shape[1] > 1 else None
  with np.errstate(invalid="ignore"):  # -inf - -inf rows (no finite match) are not ties
    tie = (len(fin) > 1 and np.diff(fin).min() < TIE) or (
        top2 is not None and np.any((top2[:, 1] - top2[:, 0] < TIE)[np.isfinite(best)]))
  order = np.argsort(-best, kind="stable")
  src, unm = order[:r], order[r:]
  if class_token:
    unm = np.sort(unm)
  ia, ib = np.arange(0, t, 2), np.arange(1, t, 2)
  wx, w, wk = x * size[:, None], size.copy(), keys * size[:, None]
  bx, bw, bk = wx[ib].copy(), w[ib].copy(), wk[ib].copy()
  bgroups = [list(groups[j]) for j in ib]
  for i in src:
    j = dst[i]
    bx[j] += wx[ia[i]]
    bw[j] += w[ia[i]]
    bk[j] += wk[ia[i]]
    bgroups[j] += groups[ia[i]]
  new = dict(
      x=np.concatenate([x[ia[unm]], bx / bw[:, None]]),
      size=np.concatenate([size[ia[unm]], bw]),
      keys=np.concatenate([keys[ia[unm]], bk / bw[:, None]]),
      groups=[groups[ia[i]] for i in unm] + bgroups)
  return new, tie


def ref_tome(x, keys, budget, class_token=False):
  """Rounds of at most half until `budget` tokens remain. Returns (state, any near tie)."""
  n = len(x)
  state = dict(x=x.astype(np.float64), size=np.ones(n), keys=keys.astype(np.float64),
               groups=[[i] for i in range(n)])
  tie = False
  while len(state["x"]) > budget:
    t = len(state["x"])
    state, tie_i = ref_round(state, min(t - budget, (t - int(class_token)) // 2), class_token)
    tie |= tie_i
  return state, tie


def groups_of(out, b):
  """Per output token (in output order): the sorted patches it carries, for valid tokens."""
  src = np.asarray(out.src[b])
  return [sorted(np.flatnonzero(src == i).tolist()) for i in range(out.num_tokens)
          if out.mask[b, i]]


def assert_matches(out, b, state, sort, grid_w):
  """Output example b against a reference state (official order, or sorted by origin)."""
  origin = [g[0] for g in state["groups"]]  # the destination's own patch
  idx = np.argsort(origin, kind="stable") if sort else np.arange(len(origin))
  want_groups = [sorted(state["groups"][i]) for i in idx]
  assert groups_of(out, b) == want_groups
  np.testing.assert_allclose(out.x[b], state["x"][idx], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.size[b], state["size"][idx], rtol=1e-6)
  lin = np.asarray(out.pos[b, :, 1] * grid_w + out.pos[b, :, 2])
  np.testing.assert_array_equal(lin, np.asarray(origin)[idx])


# Jitted once per configuration; inputs and outputs are NumPy (no eager op compiles per test).
def _np(tree):
  return jax.tree.map(np.asarray, tree)


@functools.lru_cache(maxsize=None)
def _tome(budget, class_token=False):
  fn = jax.jit(lambda t, k: compress.tome(t, budget, keys=k, class_token=class_token))
  return lambda t, k: _np(fn(t, k))


@functools.lru_cache(maxsize=None)
def _round(r, sort, class_token=False):
  fn = jax.jit(lambda t, k: bipartite_merge(t, r, keys=k, sort=sort, class_token=class_token))
  return lambda t, k: _np(fn(t, k))


def _inputs(h, w, seed, batch=2, dim=6, key_dim=5):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, h * w, dim)).astype(np.float32)
  keys = rng.standard_normal((batch, h * w, key_dim)).astype(np.float32)
  return _np(tcjax.Tokens.from_grid(jnp.asarray(x), (h, w))), keys


# ---------------------------------------------------------------------------------------------
# Against the reference.
# ---------------------------------------------------------------------------------------------


@settings(max_examples=12, deadline=None)
@given(case=st.sampled_from([((5, 7), 20), ((8, 8), 32), ((16, 16), 140)]),
       seed=st.integers(0, 10_000))
def test_single_round_matches_official(case, seed):
  (h, w), budget = case
  n = h * w
  assert n - budget <= n // 2  # one round
  t, keys = _inputs(h, w, seed)
  refs = [ref_tome(np.asarray(t.x[b]), np.asarray(keys[b]), budget) for b in range(2)]
  assume(not any(tie for _, tie in refs))
  out = _tome(budget)(t, keys)
  check_contract(out, budget, 2)
  for b, (state, _) in enumerate(refs):
    assert_matches(out, b, state, sort=True, grid_w=w)


@settings(max_examples=10, deadline=None)
@given(case=st.sampled_from([((5, 7), 3, True), ((8, 8), 7, False), ((16, 16), 64, False)]),
       seed=st.integers(0, 10_000))
def test_rounds_match_reference(case, seed):
  # Several rounds, official scrambled order in between, keys merged size-weighted.
  (h, w), budget, class_token = case
  t, keys = _inputs(h, w, seed)
  refs = [ref_tome(np.asarray(t.x[b]), np.asarray(keys[b]), budget, class_token)
          for b in range(2)]
  assume(not any(tie for _, tie in refs))
  out = _tome(budget, class_token)(t, keys)
  check_contract(out, budget, 2)
  for b, (state, _) in enumerate(refs):
    assert_matches(out, b, state, sort=True, grid_w=w)
    if class_token:
      assert state["groups"][0] == [0]  # the class token is never merged
      assert np.asarray(out.src[b])[0] == 0 and out.size[b, 0] == 1


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), rc=st.sampled_from([(1, False), (5, True), (40, False)]))
def test_bipartite_merge_keeps_official_order(seed, rc):
  r, class_token = rc
  h, w = 5, 7  # odd N: A has one more token than B
  t, keys = _inputs(h, w, seed)
  out = _round(r, False, class_token)(t, keys)
  n_out = h * w - min(r, (h * w - int(class_token)) // 2)
  assert out.num_tokens == n_out
  for b in range(2):
    state = dict(x=np.asarray(t.x[b], np.float64), size=np.ones(h * w),
                 keys=np.asarray(keys[b], np.float64), groups=[[i] for i in range(h * w)])
    state, tie = ref_round(state, r, class_token)
    assume(not tie)
    assert_matches(out, b, state, sort=False, grid_w=w)


def test_hand_worked_round():
  # 4 tokens on a 1x4 grid. A = tokens 0, 2; B = tokens 1, 3. Keys: 0 ~ 3 (identical),
  # 2 ~ 1 (cos 0.8). Best of A: token 0 -> 3 (1.0), token 2 -> 1 (0.8). r = 1 merges 0 into 3.
  keys = jnp.asarray([[[1, 0], [0.6, 0.8], [0, 1], [1, 0]]], jnp.float32)
  x = jnp.asarray([[[2.0], [5.0], [7.0], [4.0]]])
  t = tcjax.Tokens.from_grid(x, (1, 4))
  out = _round(1, False)(t, keys)
  # Official order: [unmerged A: token 2], then B: [token 1, token 3 + token 0].
  np.testing.assert_allclose(out.x[0, :, 0], [7.0, 5.0, 3.0])
  np.testing.assert_array_equal(out.size[0], [1, 1, 2])
  np.testing.assert_array_equal(out.src[0], [2, 1, 0, 2])
  np.testing.assert_array_equal(out.pos[0, :, 2], [2, 1, 3])
  # Second round on the merged tokens, with sizes: A = [tok 2 (x 7), merged (x 3, size 2)],
  # B = [tok 1]. Both A go to token 1; r = 1: the better match merges (keys below).
  keys2 = np.asarray([[[1, 0], [1, 0], [0, 1]]], np.float32)
  out2 = _round(1, True)(out, keys2)
  # Token 2 (key [1,0]) matches token 1 (key [1,0]); the merged token's key [0,1] has cos 0.
  np.testing.assert_allclose(out2.x[0, :, 0], [6.0, 3.0])  # (5 + 7) / 2, then (2 + 4) / 2
  np.testing.assert_array_equal(out2.size[0], [2, 2])
  np.testing.assert_array_equal(out2.src[0], [1, 0, 0, 1])


def test_single_round_is_one_official_round():
  assert merge_rounds(64, 32) == (32,)
  assert merge_rounds(64, 40) == (24,)
  assert merge_rounds(64, 16) == (32, 16)
  assert merge_rounds(35, 10) == (17, 8)  # 35 -> 18 -> 10
  assert merge_rounds(64, 64) == ()
  assert merge_rounds(5, 2, class_token=True) == (2, 1)  # (5 - 1) // 2 = 2, then (3 - 1) // 2
  with pytest.raises(ValueError, match="budget"):
    merge_rounds(4, 1, class_token=True)


# ---------------------------------------------------------------------------------------------
# Mass conservation, padding, NaN.
# ---------------------------------------------------------------------------------------------


def _with_padding(t, pad):
  """Marks tokens `pad` (bool[B, N]) of a raw grid as padding (their patches dropped)."""
  pad = np.asarray(pad)
  return t.replace(mask=~pad, size=np.where(pad, 0.0, t.size).astype(np.float32),
                   src=np.where(pad, -1, t.src).astype(np.int32))


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), case=st.sampled_from([(30, False), (4, True)]),
       pad_frac=st.sampled_from([0.0, 0.3]))
def test_mass_is_conserved(seed, case, pad_frac):
  budget, presize = case
  t, keys = _inputs(8, 8, seed)
  rng = np.random.default_rng(seed)
  pad = rng.random((2, 64)) < pad_frac
  t = _with_padding(t, pad)
  x0 = np.asarray(t.x, np.float64)
  if presize:  # start from merged tokens (sizes > 1, scrambled order)
    t = _round(24, False)(t, keys)
    keys = keys[:, :40]
    budget = min(budget, 40)
  out = _tome(budget)(t, keys)
  check_contract(out, budget, 2)
  for b in range(2):
    v = np.asarray(out.mask[b])
    src = np.asarray(out.src[b])
    np.testing.assert_array_equal(src >= 0, ~pad[b])  # valid patches all carried, padding not
    assert float(np.asarray(out.size[b])[v].sum()) == (~pad[b]).sum()
    # Each token is the plain mean of the raw patches it carries (raw sizes are 1), so the
    # size-weighted feature sum is preserved.
    for i in np.flatnonzero(v):
      np.testing.assert_allclose(out.x[b, i], x0[b][src == i].mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose((np.asarray(out.size[b])[v, None] * np.asarray(out.x[b])[v])
                               .sum(0), x0[b][~pad[b]].sum(0), rtol=1e-4, atol=1e-4)


def test_padding_goes_first_and_never_into_valid():
  t, keys = _inputs(4, 4, seed=1, batch=1)
  pad = np.zeros((1, 16), bool)
  pad[0, [0, 6, 9]] = True  # two padding A tokens (0, 6), one padding B token (9)
  t = _with_padding(t, pad)
  out = _round(2, False)(t, keys)
  # r = 2: exactly the two padding A tokens go, every valid token is untouched.
  np.testing.assert_array_equal(np.asarray(out.size[0]).sum(), 13)
  assert np.asarray(out.mask[0]).sum() == 13  # 14 tokens: one is the padding B token
  assert np.all(np.asarray(out.size[0])[np.asarray(out.mask[0])] == 1)


def test_valid_source_with_only_padding_in_b():
  # A = tokens 0, 2, 4 valid; B = tokens 1, 3, 5 padding. r = 2 must merge valid tokens, into
  # padding B slots, which become valid at the source's position.
  t, keys = _inputs(2, 3, seed=2, batch=1)
  t = _with_padding(t, np.array([[0, 1, 0, 1, 0, 1]], bool))
  out = _round(2, True)(t, keys)
  check_contract(out, 4, 1)
  np.testing.assert_array_equal(np.sort(np.asarray(out.size[0])), [0, 0, 1, 2])
  np.testing.assert_array_equal(np.asarray(out.src[0])[[1, 3, 5]], -1)


def test_nan_keys_merge_last():
  t, keys = _inputs(4, 4, seed=4, batch=1)
  keys[0, 2] = np.nan  # an A token
  keys[0, 5] = np.nan  # a B token: never a destination
  out = _round(7, False)(t, keys)  # all A but one: token 2 is the one kept
  src = np.asarray(out.src[0])
  assert np.sum(src == src[2]) == 1 and np.sum(src == src[5]) == 1
  assert np.all(np.isfinite(np.asarray(out.x)))


# ---------------------------------------------------------------------------------------------
# Schedule, bias, API.
# ---------------------------------------------------------------------------------------------


def test_r_schedule_hand_worked():
  assert r_schedule(8, 4) == (8, 8, 8, 8)
  assert r_schedule(0, 3) == (0, 0, 0)
  # (r, -1): from int(8 * 2) = 16 down to 0 in steps of -4.
  assert r_schedule((8, -1), 5) == (16, 12, 8, 4, 0)
  # (r, 1): from 0 up to 16.
  assert r_schedule((8, 1.0), 3) == (0, 8, 16)
  # (5, 0.3): first int(3.5) = 3, last 10 - 3 = 7, step 4/3: 3, 4.33, 5.67, 7 -> 3, 4, 5, 7.
  assert r_schedule((5, 0.3), 4) == (3, 4, 5, 7)
  # (4, 2): first int(-4) = -4 -> 0 (no merge), last 12, step 16/3: -4, 1.33, 6.67, 12.
  assert r_schedule((4, 2), 4) == (0, 1, 6, 12)
  assert r_schedule([3, 1], 4) == (3, 1, 0, 0)
  assert r_schedule((6, 0.5), 1) == (3,)
  for bad in (-1, 2.5, (3,), (3, "x"), [1, -2], [1, 2, 3, 4, 5], True):
    with pytest.raises(ValueError, match="r"):
      r_schedule(bad, 4)
  with pytest.raises(ValueError, match="depth"):
    r_schedule(2, 0)


def test_attention_bias():
  x = jnp.zeros((1, 4, 2))
  t = tcjax.Tokens.from_grid(x, (2, 2)).replace(size=jnp.asarray([[1.0, 2.0, 5.0, 0.0]]),
                                                mask=jnp.asarray([[True, True, True, False]]))
  bias = attention_bias(t)
  chex.assert_shape(bias, (1, 4))
  chex.assert_type(bias, jnp.float32)
  np.testing.assert_allclose(bias[0, :3], [0.0, math.log(2.0), math.log(5.0)], rtol=1e-6)
  assert bias[0, 3] <= -1e29 and np.isfinite(bias[0, 3])
  # A softmax over a row of logits plus the bias: merged tokens count `size` times.
  p = jax.nn.softmax(bias[0])
  np.testing.assert_allclose(p, [1 / 8, 2 / 8, 5 / 8, 0.0], rtol=1e-6)


def test_round_api_reachable_from_the_registered_function():
  # The ViT calls `compress.tome.bipartite_merge` (the name `tome` is the registered function).
  assert compress.tome.bipartite_merge is bipartite_merge
  assert compress.tome.attention_bias is attention_bias
  assert compress.tome.r_schedule is r_schedule


def test_r_zero_and_clamp():
  t, keys = _inputs(3, 3, seed=5, batch=1)
  assert bipartite_merge(t, 0, keys=keys) is t
  out = _round(100, False)(t, keys)  # clamped to 9 // 2 = 4
  assert out.num_tokens == 5
  out = _round(100, False, True)(t, keys)  # (9 - 1) // 2 = 4
  assert out.num_tokens == 5 and int(out.src[0, 0]) == 0


def test_bad_arguments():
  t, keys = _inputs(4, 4, seed=0)
  for bad in (-1, 2.5, True, "3"):
    with pytest.raises(ValueError, match="r must"):
      bipartite_merge(t, bad, keys=keys)
  with pytest.raises(ValueError, match="keys"):
    bipartite_merge(t, 2)
  with pytest.raises(ValueError, match="keys"):
    bipartite_merge(t, 2, keys=keys[:, 1:])
  with pytest.raises(ValueError, match="keys"):
    bipartite_merge(t, 2, keys=keys[0])
  with pytest.raises(ValueError, match="keys"):
    compress.tome(t, 4, keys=keys.astype(jnp.int32))
  with pytest.raises(ValueError, match="budget"):
    compress.tome(t, 17, keys=keys)
  with pytest.raises(ValueError, match="budget"):
    compress.tome(t, 1, keys=keys, class_token=True)
  with pytest.raises(ValueError, match="tokens"):
    bipartite_merge(t.x, 2, keys=keys)
  with pytest.raises(ValueError, match="tokens"):
    attention_bias(t.x)
