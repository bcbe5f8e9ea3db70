"""DivPrune against a brute-force max-min selection (the official O(K^2 N) recomputation)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import tcjax
from tcjax import compress
from tcjax.compress.divprune import nearest_distance

from helpers import check_contract, make_tokens


@functools.lru_cache(maxsize=None)
def _jitted(budget):
  return jax.jit(lambda t: compress.divprune(t, budget))


def brute_force(x, budget):
  """Official algorithm on one example: full distance matrix, min over selected rows each step."""
  xn = x / np.linalg.norm(x, axis=-1, keepdims=True)
  dist = 1.0 - xn @ xn.T
  n = len(x)
  off = dist + np.diag(np.full(n, np.inf))  # min over i != j
  selected = [int(np.argmax(off.min(0)))]
  for _ in range(budget - 1):
    score = dist[selected].min(0)
    score[selected] = -np.inf
    selected.append(int(np.argmax(score)))  # first index on ties
  return sorted(selected)


def kept(out, b=0):
  return np.flatnonzero(np.asarray(out.src[b]) >= 0)


def test_hand_worked():
  # Unit vectors at 0, 10, 90, 180, 185 degrees. Most isolated: 90 (nearest at 80 degrees).
  # Farthest from {90}: 185 (95 degrees). Then min distances: 0 -> 1 (to 90), 10 -> 1-cos 80,
  # 180 -> 1-cos 5: pick 0.
  ang = np.deg2rad([0.0, 10.0, 90.0, 180.0, 185.0])
  x = jnp.asarray(np.stack([np.cos(ang), np.sin(ang)], -1)[None], jnp.float32)
  out = compress.divprune(tcjax.Tokens.from_grid(x, (1, 5)), 3)
  np.testing.assert_array_equal(out.src[0], [0, -1, 1, -1, 2])


@settings(max_examples=15, deadline=None)
@given(case=st.sampled_from([(8, 8, 16), (8, 8, 5), (5, 7, 12), (1, 9, 9)]),
       seed=st.integers(0, 10_000))
def test_matches_brute_force(case, seed):
  h, w, budget = case
  t = make_tokens(2, 1, (h, w), dim=8, seed=seed)
  out = _jitted(budget)(t)
  check_contract(out, budget, 2)
  for b in range(2):
    np.testing.assert_array_equal(kept(out, b), brute_force(np.asarray(t.x[b]), budget))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.sampled_from([3, 7, 12]))
def test_ties_match_brute_force(seed, budget):
  # Sign vectors in {-1, 1}^4: cosines are exact multiples of 1/4, duplicates are common, so
  # many exact ties, which both sides must break by the first index.
  rng = np.random.default_rng(seed)
  x = rng.choice([-1.0, 1.0], size=(1, 16, 4)).astype(np.float32)
  out = _jitted(budget)(tcjax.Tokens.from_grid(jnp.asarray(x), (4, 4)))
  np.testing.assert_array_equal(kept(out), brute_force(x[0], budget))


def test_duplicates_are_kept_last():
  # 3 distinct directions, each duplicated: a budget of 3 keeps one copy of each.
  x = np.array([[1, 0], [1, 0], [0, 1], [-1, 0], [0, 1], [-1, 0]], np.float32)[None]
  out = compress.divprune(tcjax.Tokens.from_grid(jnp.asarray(x), (2, 3)), 3)
  np.testing.assert_array_equal(kept(out), [0, 2, 3])


def test_padding_and_nan_are_picked_last():
  t = make_tokens(1, 1, (2, 4), seed=2)
  x = t.x.at[0, 1].set(jnp.nan)
  t = t.replace(x=x, mask=t.mask.at[0, 5].set(False))
  out = compress.divprune(t, 6)
  np.testing.assert_array_equal(kept(out), [0, 2, 3, 4, 6, 7])
  out = compress.divprune(t, 8)  # beyond the valid tokens: the rest are taken too
  assert out.src.shape == (1, 8)


def test_nearest_distance_chunked():
  x = jax.random.normal(jax.random.key(0), (37, 5))
  xn = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  valid = jnp.arange(37) != 4
  dist = 1 - np.asarray(xn) @ np.asarray(xn).T
  dist[np.eye(37, dtype=bool)] = np.inf
  dist[4, :] = np.inf  # not a neighbour
  np.testing.assert_allclose(nearest_distance(xn, valid, chunk=8), dist.min(0), atol=1e-5)


@pytest.mark.parametrize("cache_gram", [True, False])
def test_cached_and_streamed_gram_give_the_same_selection(cache_gram):
  # The default keeps the N x N matrix for these sizes; False streams one row per step.
  rng = np.random.default_rng(5)
  ties = rng.choice([-1.0, 1.0], size=(2, 16, 4)).astype(np.float32)
  for x, grid, budget in ((ties, (4, 4), 7), (rng.normal(size=(2, 35, 8)), (5, 7), 12)):
    t = tcjax.Tokens.from_grid(jnp.asarray(x, jnp.float32), grid)
    out = jax.jit(lambda t: compress.divprune(t, budget, cache_gram=cache_gram))(t)
    for b in range(2):
      np.testing.assert_array_equal(kept(out, b), brute_force(np.float32(x[b]), budget))
