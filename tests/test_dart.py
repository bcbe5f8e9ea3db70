"""DART: hand-worked pivots, a NumPy transcription of the reference selection (the default) and
a NumPy re-implementation of the `quota="even"` variant."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec

import tcjax
from tcjax import compress
from tcjax.compress.dart import default_pivots
from tcjax.parallel import make_mesh

from helpers import check_contract, make_tokens, np_tree


@functools.lru_cache(maxsize=None)
def _jitted(budget, num_pivots, with_text, quota="even"):
  if with_text:
    return jax.jit(lambda t, k, tx, tm: compress.dart(t, budget, keys=k, text=tx, text_mask=tm,
                                                       num_pivots=num_pivots, quota=quota))
  return jax.jit(lambda t, k: compress.dart(t, budget, keys=k, num_pivots=num_pivots,
                                            quota=quota))


@functools.lru_cache(maxsize=None)
def _official_jitted(budget, text_keys):
  if text_keys:
    return jax.jit(lambda t, k, tx, tm, tk: compress.dart(t, budget, keys=k, text=tx,
                                                           text_mask=tm, text_keys=tk))
  return jax.jit(lambda t, k, tx, tm: compress.dart(t, budget, keys=k, text=tx, text_mask=tm))


def official(x, keys, budget, text=None, text_mask=None, text_keys=None, exact=True):
  """NumPy transcription of the reference `get_retained_image_token` on one example.

  x: [N, D] image features, keys: [N, Dk]; text: [T, D] text features, text_keys: [T, Dk].
  Reference: 4 image pivots and 4 text pivots by the largest L1 key norm; TOKEN_TOPK =
  budget // pivots; the pool is every image token but the image pivots; each pivot in turn
  moves its TOKEN_TOPK lowest-cosine pool tokens to the kept set; text pivots are dropped.
  Ours, as dart.py documents: pivots in a fixed order (image, then text, each by descending
  norm; the reference uses Python set order), padded text never a pivot, and with `exact` the
  quotas cut (or raised by one each from the first pivot) to keep exactly `budget` tokens.
  """
  cos = lambda a, b: (b @ a) / (np.linalg.norm(a) * np.linalg.norm(b, axis=-1))
  img_piv = [int(i) for i in np.argsort(-np.abs(keys).sum(-1), kind="stable")[:4]]
  pivots = [x[i] for i in img_piv]
  if text is not None:
    t_norm = np.abs(text if text_keys is None else text_keys).sum(-1)
    t_norm = np.where(text_mask, t_norm, -np.inf)
    pivots += [text[i] for i in np.argsort(-t_norm, kind="stable")[:4] if text_mask[i]]
  token_topk = budget // len(pivots)
  quotas = [token_topk] * len(pivots)
  if exact:
    rest = budget - len(img_piv)
    short = max(0, rest - token_topk * len(pivots))
    quotas = [q + (g < short) for g, q in enumerate(quotas)]
    quotas = [max(0, min(q, rest - sum(quotas[:g]))) for g, q in enumerate(quotas)]
  pool = [j for j in range(len(x)) if j not in img_piv]
  kept = list(img_piv)
  for p, q in zip(pivots, quotas):
    neg_cos = -cos(p, x[pool])
    picked = [pool[i] for i in np.argsort(-neg_cos, kind="stable")[:q]]  # topk of -cos
    kept += picked
    pool = [j for j in pool if j not in picked]
  return sorted(kept)


def reference(x, keys, budget, n_piv, text=None, text_mask=None, n_txt=4):
  """quota="even", one example: pivots by L1 key norm, then every guide takes its
  least-similar tokens, the places split evenly over the guides."""
  unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)
  xn = unit(x)
  norm = np.abs(keys).sum(-1)
  pivots = list(np.argsort(-norm, kind="stable")[:n_piv])
  guides = [xn[p] for p in pivots]
  if text is not None:
    t_norm = np.where(text_mask, np.abs(text).sum(-1), -np.inf)
    for i in np.argsort(-t_norm, kind="stable")[:n_txt]:
      if text_mask[i]:
        guides.append(unit(text[i]))
  rest = budget - n_piv
  quotas = [rest // len(guides) + (g < rest % len(guides)) for g in range(len(guides))]
  kept = set(int(p) for p in pivots)
  for g, q in zip(guides, quotas):
    sim = xn @ g
    for j in np.argsort(sim, kind="stable"):
      if q == 0:
        break
      if int(j) not in kept:
        kept.add(int(j))
        q -= 1
  return sorted(kept)


def kept(out, b=0):
  return np.flatnonzero(np.asarray(out.src[b]) >= 0)


def test_hand_worked():
  # 2-D features at 0, 20, 45, 100, 135, 180 degrees; keys make token 2 (45 deg) the pivot.
  # Budget 3 = pivot + the 2 tokens least similar to 45 deg: 180 (cos 135) and 135 (cos 90).
  ang = np.deg2rad([0.0, 20.0, 45.0, 100.0, 135.0, 180.0])
  x = jnp.asarray(np.stack([np.cos(ang), np.sin(ang)], -1)[None], jnp.float32)
  keys = jnp.array([[[1.0, 0.5], [0.5, 0.5], [3.0, -2.0], [0.0, 1.0], [1.0, 0.0], [2.0, 0.0]]])
  t = tcjax.Tokens.from_grid(x, (2, 3))
  out = compress.dart(t, 3, keys=keys, num_pivots=1)
  np.testing.assert_array_equal(out.src[0], [-1, -1, 0, -1, 1, 2])
  # Two pivots (2 by L1 norm 5, then 5 by norm 2), 2 places split evenly: pivot 2 would take
  # 180 deg, but that is pivot 5 itself, so it takes 135; pivot 5 takes the token least similar
  # to 180: 0 deg.
  out = compress.dart(t, 4, keys=keys, num_pivots=2, quota="even")
  np.testing.assert_array_equal(kept(out), [0, 2, 4, 5])
  # Reference quota floor(4 / 2) = 2 per pivot, cut to the 2 places: pivot 2 takes both, 135
  # deg (cos 90) and 100 deg (cos 55).
  out = compress.dart(t, 4, keys=keys, num_pivots=2)
  np.testing.assert_array_equal(kept(out), [2, 3, 4, 5])
  # Budget 5: quota floor(5 / 2) = 2, 3 places: pivot 2 takes 2, pivot 5 the last one, 0 deg.
  out = compress.dart(t, 5, keys=keys, num_pivots=2)
  np.testing.assert_array_equal(kept(out), [0, 2, 3, 4, 5])


def test_reference_defaults():
  # 4 image + 4 text pivots at 16 tokens each: the reference's 132 tokens for its B = 128.
  t = make_tokens(1, 1, (24, 24), dim=8, seed=5)
  keys = jax.random.normal(jax.random.key(6), (1, 576, 5))
  text = jax.random.normal(jax.random.key(7), (1, 9, 8))
  text_keys = jax.random.normal(jax.random.key(8), (1, 9, 5))
  mask = jnp.ones((1, 9), bool)
  args = (np.asarray(t.x[0]), np.asarray(keys[0]))
  txt = dict(text=np.asarray(text[0]), text_mask=np.ones(9, bool),
             text_keys=np.asarray(text_keys[0]))
  assert len(official(*args, 128, exact=False, **txt)) == 132
  for budget in (132, 128):
    out = _official_jitted(budget, True)(t, keys, text, mask, text_keys)
    np.testing.assert_array_equal(kept(out), official(*args, budget, **txt))
  # Budget 128 keeps the reference's 132 but the last pivot's final 4 picks.
  ref = set(official(*args, 128, exact=False, **txt))
  assert set(kept(out)) < ref


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.sampled_from([4, 9, 12, 16, 20, 23, 29, 36]))
def test_matches_official(seed, budget):
  # Example 0 has 4 text pivots (the reference's 8 pivots), example 1 only 3 valid text tokens.
  t = make_tokens(2, 1, (8, 8), dim=8, seed=seed)
  keys = jax.random.normal(jax.random.key(seed + 1), (2, 64, 5))
  text = jax.random.normal(jax.random.key(seed + 2), (2, 6, 8))
  text_keys = jax.random.normal(jax.random.key(seed + 3), (2, 6, 5))
  text_mask = jnp.array([[True] * 6, [True, True, False, True, False, False]])
  out = _official_jitted(budget, True)(t, keys, text, text_mask, text_keys)
  check_contract(out, budget, 2)
  for b in range(2):
    args = (np.asarray(t.x[b]), np.asarray(keys[b]), budget)
    txt = dict(text=np.asarray(text[b]), text_mask=np.asarray(text_mask[b]),
               text_keys=np.asarray(text_keys[b]))
    np.testing.assert_array_equal(kept(out, b), official(*args, **txt))
    if b == 0 and budget % 8 == 4:  # 4 + 8 * floor(budget / 8) == budget: the reference as is
      np.testing.assert_array_equal(kept(out, b), official(*args, exact=False, **txt))


@settings(max_examples=6, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.sampled_from([8, 13, 20]))
def test_matches_official_without_text_keys_or_text(seed, budget):
  # Text pivots ranked by the text features' L1 norm; with no text only the 4 image pivots.
  t = make_tokens(2, 1, (8, 8), dim=8, seed=seed)
  keys = jax.random.normal(jax.random.key(seed + 1), (2, 64, 5))
  text = jax.random.normal(jax.random.key(seed + 2), (2, 6, 8))
  text_mask = jnp.ones((2, 6), bool)
  with_text = _official_jitted(budget, False)(t, keys, text, text_mask)
  no_text = _jitted(budget, None, False, "official")(t, keys)
  for b in range(2):
    args = (np.asarray(t.x[b]), np.asarray(keys[b]), budget)
    np.testing.assert_array_equal(
        kept(with_text, b), official(*args, text=np.asarray(text[b]), text_mask=np.ones(6, bool)))
    np.testing.assert_array_equal(kept(no_text, b), official(*args))


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
def test_sharded_batch_with_text_matches_one_device(axis_type):
  # Text pivots make the quotas differ per example (one is batched inside the vmap).
  t = make_tokens(8, 1, (8, 8), seed=1)
  keys = jax.random.normal(jax.random.key(2), (8, 64, 5))
  text = jax.random.normal(jax.random.key(3), (8, 6, 8))
  text_keys = jax.random.normal(jax.random.key(4), (8, 6, 5))
  text_mask = jnp.arange(6)[None] < (jnp.arange(8) % 5 + 2)[:, None]
  args = (t, keys, text, text_mask, text_keys)
  mesh = make_mesh((("data", 8),), axis_types=axis_type)
  shard = lambda a: jax.device_put(a, NamedSharding(mesh, PartitionSpec("data")))
  with jax.set_mesh(mesh):
    out = _official_jitted(20, True)(*jax.tree.map(shard, args))
  chex.assert_trees_all_close(np_tree(out), np_tree(_official_jitted(20, True)(*args)))


def test_default_pivots_scale_with_budget():
  assert [default_pivots(b) for b in (1, 16, 64, 128, 576)] == [1, 1, 4, 8, 8]


@settings(max_examples=15, deadline=None)
@given(case=st.sampled_from([(8, 8, 16), (8, 8, 30), (5, 7, 11), (1, 9, 9)]),
       num_pivots=st.sampled_from([None, 1, 3]), seed=st.integers(0, 10_000))
def test_matches_reference(case, num_pivots, seed):
  h, w, budget = case
  t = make_tokens(2, 1, (h, w), dim=8, seed=seed)
  keys = jax.random.normal(jax.random.key(seed + 7), (2, h * w, 5))
  out = _jitted(budget, num_pivots, False)(t, keys)
  check_contract(out, budget, 2)
  n_piv = default_pivots(budget) if num_pivots is None else num_pivots  # quota="even"
  for b in range(2):
    np.testing.assert_array_equal(
        kept(out, b), reference(np.asarray(t.x[b]), np.asarray(keys[b]), budget, n_piv))


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), budget=st.sampled_from([16, 23]))
def test_text_pivots_match_reference(seed, budget):
  t = make_tokens(2, 1, (8, 8), dim=8, seed=seed)
  keys = jax.random.normal(jax.random.key(seed + 7), (2, 64, 5))
  text = jax.random.normal(jax.random.key(seed + 8), (2, 6, 8))
  text_mask = jnp.array([[True] * 6, [True, True, False, True, False, False]])
  out = _jitted(budget, 2, True)(t, keys, text, text_mask)
  check_contract(out, budget, 2)
  for b in range(2):
    ref = reference(np.asarray(t.x[b]), np.asarray(keys[b]), budget, 2, np.asarray(text[b]),
                    np.asarray(text_mask[b]))
    np.testing.assert_array_equal(kept(out, b), ref)


def test_text_changes_selection_but_is_not_kept():
  t = make_tokens(1, 1, (8, 8), dim=8, seed=1)
  keys = jax.random.normal(jax.random.key(2), (1, 64, 5))
  plain = compress.dart(t, 20, keys=keys)
  text = jax.random.normal(jax.random.key(3), (1, 4, 8))
  guided = compress.dart(t, 20, keys=keys, text=text)
  assert guided.count()[0] == 20 and guided.src.shape == (1, 64)
  assert not np.array_equal(kept(plain), kept(guided))


def test_bad_options():
  t = make_tokens(1, 1, (4, 4))
  keys = jnp.ones((1, 16, 3))
  for bad in (0, 5, 1.5):
    with pytest.raises(ValueError, match="num_pivots"):
      compress.dart(t, 4, keys=keys, num_pivots=bad)
  with pytest.raises(ValueError, match="text"):
    compress.dart(t, 4, keys=keys, text=jnp.ones((1, 3, 7)))
  with pytest.raises(ValueError, match="text_mask"):
    compress.dart(t, 4, keys=keys, text=jnp.ones((1, 3, 8)), text_mask=jnp.ones((1, 2), bool))
  with pytest.raises(ValueError, match="quota"):
    compress.dart(t, 4, keys=keys, quota="fair")
  with pytest.raises(ValueError, match="text_keys given without text"):
    compress.dart(t, 4, keys=keys, text_keys=jnp.ones((1, 3, 3)))
  with pytest.raises(ValueError, match="text_keys"):
    compress.dart(t, 4, keys=keys, text=jnp.ones((1, 3, 8)), text_keys=jnp.ones((1, 2, 3)))


def test_budget_of_pivots_only():
  t = make_tokens(1, 1, (4, 4), seed=3)
  keys = jnp.zeros((1, 16, 3)).at[0, 9].set(5.0).at[0, 2].set(-4.0)
  out = compress.dart(t, 2, keys=keys, num_pivots=2)
  np.testing.assert_array_equal(kept(out), [2, 9])
