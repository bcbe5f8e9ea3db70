"""Adaptive budgets (tcjax.compress.adaptive): per-example counts on a hand-worked example and
against a NumPy transcription of the two rules, static shapes under jit / vmap, bad options, and
in the model: the padding slots are invisible (the same logits as the kept tokens alone)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tcjax
import tcjax.checkpoints as ckpt
from tcjax import compress
from tcjax.compress.registry import METHODS
from tcjax.nn import GemmaConfig, PaliGemma, PaliGemmaConfig, SiglipConfig

from helpers import check_contract

POLICIES = ("adaptive_mass", "adaptive_entropy")


# ---- NumPy transcription of the definitions (float64, written from the docstring). ----


def counts_numpy(scores, mask, budget, rule, value, min_tokens=1):
  """int[B] tokens kept per example."""
  out = []
  for s, m in zip(np.asarray(scores, np.float64), np.asarray(mask, bool)):
    w = np.where(m & np.isfinite(s) & (s > 0), s, 0.0)
    total = w.sum()
    if rule == "mass":
      desc = np.sort(w)[::-1]
      k = 1
      while desc[:k].sum() < value * total:  # the fewest largest masses holding `value`
        k += 1
    else:
      p = w[w > 0] / total if total > 0 else np.zeros(0)
      k = int(np.floor(value * np.exp(-(p * np.log(p)).sum()) + 0.5)) if total > 0 else 0
    out.append(min(max(k, min_tokens), budget, int(m.sum())))
  return np.array(out)


def kept_numpy(scores, mask, counts):
  """[int array] per example: the indices of its count highest scores (NaN and padding last,
  ties to the lower index), ascending."""
  key = np.where(np.asarray(mask) & ~np.isnan(scores), scores, -np.inf)
  return [np.sort(np.argsort(-k, kind="stable")[:c]) for k, c in zip(key, counts)]


def kept(out):
  """Per example, the input index of each valid output token (raw-grid input: read off src)."""
  src, mask = np.asarray(out.src), np.asarray(out.mask)
  return [np.array([int(np.flatnonzero(s == j)[0]) for j in range(int(m.sum()))])
          for s, m in zip(src, mask)]


def run(name, tokens, budget, scores, value=None, **kw):
  opt = {"adaptive_mass": "mass", "adaptive_entropy": "scale"}[name]
  if value is not None:
    kw[opt] = value
  return compress.apply(name, tokens, budget, scores=scores, **kw)


def tokens_of(x, mask=None, grid=None):
  x = jnp.asarray(x, jnp.float32)
  t = tcjax.Tokens.from_grid(x, grid or (1, x.shape[1]))
  if mask is None:
    return t
  mask = jnp.asarray(mask)
  return t.replace(mask=mask, size=jnp.where(mask, 1.0, 0.0), src=jnp.where(mask, t.src, -1))


# ---- Hand-worked. ----

# Three examples of 6 tokens. Example 1's last two tokens are padding (their large scores must
# not count); example 2 has a NaN and a negative score (mass 0).
HAND_SCORES = np.array([[0.5, 0.1, 0.2, 0.1, 0.05, 0.05],
                        [2.0, 2.0, 2.0, 2.0, 9.0, 9.0],
                        [np.nan, -1.0, 3.0, 1.0, 0.0, 0.0]], np.float32)
HAND_MASK = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)


@pytest.mark.parametrize("name, value, budget, min_tokens, want", [
    # mass 0.75. Ex 0: 0.5, 0.7, 0.8 (k=3; of the two 0.1s the lower index, 1). Ex 1: 2, 4, 6
    # of 8 (6 >= 6: k=3, ties to the lower indices). Ex 2: masses 3, 1 of 4: 3 >= 3, k=1.
    ("adaptive_mass", 0.75, 5, 1, [[0, 1, 2], [0, 1, 2], [2]]),
    # mass 1.0: ex 0 needs all 6 (capacity 5 keeps 5); ex 1 its 4 valid; ex 2 the 2 positive.
    ("adaptive_mass", 1.0, 5, 1, [[0, 1, 2, 3, 4], [0, 1, 2, 3], [2, 3]]),
    # mass 0.1 with min_tokens 2: one token would do, two are kept.
    ("adaptive_mass", 0.1, 5, 2, [[0, 2], [0, 1], [2, 3]]),
    # Perplexities. Ex 0: H = -(.5 ln .5 + .2 ln .2 + 2 (.1 ln .1) + 2 (.05 ln .05)) = 1.42855,
    # exp = 4.17 -> 4. Ex 1: flat over 4 -> 4. Ex 2: p = (.75, .25), H = 0.5623, exp = 1.75 -> 2.
    ("adaptive_entropy", 1.0, 5, 1, [[0, 1, 2, 3], [0, 1, 2, 3], [2, 3]]),
    # scale 0.5: 2.09 -> 2, 2 -> 2, 0.88 -> 1.
    ("adaptive_entropy", 0.5, 5, 1, [[0, 2], [0, 1], [2]]),
    # scale 2: 8.3, 8, 3.5 -> capacity 3 for all (ex 2 keeps a zero-mass token, index 3 first).
    ("adaptive_entropy", 2.0, 3, 1, [[0, 1, 2], [0, 1, 2], [2, 3, 4]]),
])
def test_hand_worked(name, value, budget, min_tokens, want):
  x = np.arange(3 * 6 * 2, dtype=np.float32).reshape(3, 6, 2)
  t = tokens_of(x, HAND_MASK)
  out = run(name, t, budget, jnp.asarray(HAND_SCORES), value, min_tokens=min_tokens)
  check_contract(out, budget, 3)
  got = kept(out)
  assert [g.tolist() for g in got] == want
  np.testing.assert_array_equal(np.asarray(out.count()), [len(w) for w in want])
  for b, w in enumerate(want):
    np.testing.assert_array_equal(np.asarray(out.x[b, :len(w)]), x[b, w])
    assert not np.asarray(out.mask[b, len(w):]).any()
    assert np.all(np.asarray(out.x[b, len(w):]) == 0) and np.all(np.asarray(out.size[b, len(w):]) == 0)


def test_no_mass_keeps_min_tokens():
  t = tokens_of(np.ones((2, 6, 2)))
  scores = jnp.array([[0.0] * 6, [-1.0] * 6])
  for name in POLICIES:
    np.testing.assert_array_equal(np.asarray(run(name, t, 4, scores).count()), [1, 1])
    np.testing.assert_array_equal(np.asarray(run(name, t, 4, scores, min_tokens=3).count()),
                                  [3, 3])


# ---- Against NumPy on random inputs. ----


def random_case(seed, b=5, n=48, d=4):
  """Attention-like scores (softmax at a different temperature per example: concentrated to
  spread), padding at the end of examples 1 and 3, a NaN in example 4."""
  rng = np.random.default_rng(seed)
  temp = np.array([0.2, 1.0, 3.0, 0.5, 2.0])[:b, None]
  logits = rng.normal(size=(b, n)) * temp * 3
  scores = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  scores[4 % b, 7] = np.nan
  mask = np.ones((b, n), bool)
  mask[1, 40:] = False
  mask[3 % b, 30:] = False
  x = rng.normal(size=(b, n, d)).astype(np.float32)
  return tokens_of(x, mask, grid=(6, 8)), scores.astype(np.float32), mask, x


@pytest.mark.parametrize("name, rule, values", [("adaptive_mass", "mass", (0.3, 0.6, 0.9)),
                                                ("adaptive_entropy", "entropy", (0.5, 1.0, 2.0))])
def test_matches_numpy(name, rule, values):
  t, scores, mask, x = random_case(0)
  seen = set()
  for budget in (8, 20, 48):
    for value in values:
      for min_tokens in (1, 3):
        out = run(name, t, budget, jnp.asarray(scores), value, min_tokens=min_tokens)
        want_counts = counts_numpy(scores, mask, budget, rule, value, min_tokens)
        np.testing.assert_array_equal(np.asarray(out.count()), want_counts)
        for b, (g, w) in enumerate(zip(kept(out), kept_numpy(scores, mask, want_counts))):
          np.testing.assert_array_equal(g, w)
          np.testing.assert_array_equal(np.asarray(out.x[b, :len(w)]), x[b, w])
        check_contract(out, budget, 5)
        seen.add(tuple(want_counts))
  # The cases exercise per-example counts: examples differ, some below the capacity.
  assert any(len(set(c)) > 2 for c in seen)


# ---- Static shapes, jit, vmap, errors. ----


@pytest.mark.parametrize("name", POLICIES)
def test_static_shapes_jit_vmap(name):
  t, scores, _, _ = random_case(1)
  eager = run(name, t, 12, jnp.asarray(scores))
  jitted = jax.jit(lambda t, s: run(name, t, 12, s))(t, jnp.asarray(scores))
  chex.assert_trees_all_equal(jitted, eager)
  chex.assert_shape([eager.x, eager.pos], [(5, 12, 4), (5, 12, 3)])
  chex.assert_shape([eager.size, eager.mask, eager.src], [(5, 12), (5, 12), (5, 48)])
  assert len(set(np.asarray(eager.count()).tolist())) > 1  # one shape, counts differ
  shape = jax.eval_shape(lambda t, s: run(name, t, 12, s), t, jnp.asarray(scores))
  assert shape.x.shape == (5, 12, 4)
  t2, s2, _, _ = random_case(2)
  both = jax.tree.map(lambda a, b: jnp.stack([a, b]), t, t2)
  out = jax.vmap(lambda t, s: run(name, t, 12, s))(both, jnp.stack([scores, s2]))
  chex.assert_trees_all_equal(jax.tree.map(lambda a: a[0], out), eager)
  chex.assert_trees_all_equal(jax.tree.map(lambda a: a[1], out), run(name, t2, 12, s2))
  with pytest.raises(ValueError, match="budget"):
    jax.jit(lambda b: run(name, t, b, scores))(12)


def test_bad_options():
  t, scores, _, _ = random_case(0)
  for bad in (0, 0.0, 1.5, -0.2, True, "0.5", None):
    with pytest.raises(ValueError, match="adaptive_mass: mass"):
      compress.adaptive_mass(t, 8, scores=scores, mass=bad)
  for bad in (0, -1.0, True, "1", None):
    with pytest.raises(ValueError, match="adaptive_entropy: scale"):
      compress.adaptive_entropy(t, 8, scores=scores, scale=bad)
  for name in POLICIES:
    for bad in (0, 9, 2.0, True):
      with pytest.raises(ValueError, match="min_tokens"):
        run(name, t, 8, scores, min_tokens=bad)
    with pytest.raises(ValueError, match="scores"):
      run(name, t, 8, None)
    with pytest.raises(ValueError, match="scores"):
      run(name, t, 8, scores[:, 1:])
    with pytest.raises(ValueError, match="budget"):
      run(name, t, 49, scores)
    with pytest.raises(ValueError, match="takes no argument"):
      run(name, t, 8, scores, threshold=0.5)


def test_registry():
  for name in POLICIES:
    m = METHODS[name]
    assert (m.family, m.stages, m.needs) == ("sampling", ("vit", "post_vit", "post_proj", "llm"),
                                             ("scores",))
  assert METHODS["adaptive_mass"].options == {"mass": 0.5, "min_tokens": 1}
  assert METHODS["adaptive_entropy"].options == {"scale": 1.0, "min_tokens": 1}


# ---- In the model: padding slots are invisible. ----

IMG = SiglipConfig(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=4, image_size=16)
CONFIG = PaliGemmaConfig(img=IMG, llm=GemmaConfig(
    vocab_size=40, width=16, depth=3, mlp_dim=32, num_heads=2, num_kv_heads=1, head_dim=8))
CAPACITY = 10  # of 16 image tokens


@pytest.fixture(scope="module")
def model_params():
  rng = np.random.default_rng(0)
  flat = {}
  for k, shape in ckpt.param_shapes(CONFIG).items():
    noise = rng.normal(size=shape) / np.sqrt(shape[-2] if len(shape) > 1 else 16)
    flat[k] = (noise + (k.endswith("scale") and k.startswith("img/"))).astype(np.float32)
  params = ckpt.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
  rng = np.random.default_rng(1)
  image = rng.uniform(-1, 1, size=(2, 16, 16, 3)).astype(np.float32)
  text = rng.integers(3, 40, size=(2, 6)).astype(np.int32)
  text[:, 0] = 2
  mask = np.ones((2, 6), bool)
  mask[1, 4:] = False  # a right-padded prompt
  return PaliGemma(CONFIG), params, image, text, mask


@functools.partial(jax.jit, static_argnums=0)
def _prefill(config, params, image, text, mask, image_tokens=None):
  """(last-token logits, cache with one free slot, aux) of a model with `config` (its plan)."""
  model = PaliGemma(config)
  return model.apply({"params": params}, image, text, None, mask, cache_size=1,
                     image_tokens=image_tokens, method=model.prefill)


@jax.jit
def _vit_scores(params, image):
  """float32[B, N] the post-ViT stages' `scores`: attention received in ViT layer -2."""
  model = PaliGemma(CONFIG)
  enc = model.apply({"params": params}, image, signal_layers=-2, method=model.encode_image)
  return enc.signals[CONFIG.img.depth - 2]["scores"]


@jax.jit
def _decode(params, logits, cache):
  """Logits after one greedy decoding step (the cache holds what the plan did)."""
  model = PaliGemma(CONFIG)
  tok = jnp.argmax(logits, -1).astype(jnp.int32)
  return model.apply({"params": params}, tok, cache, method=model.decode_step)[0]


@pytest.mark.parametrize("stage", ["post_vit", "post_proj"])
def test_padding_is_invisible_after_the_vit(model_params, stage):
  """The decoder fed the policy's tokens (capacity slots, padding included) gives, per example,
  the logits of the decoder fed only the tokens the policy kept; the counts are the NumPy rule
  on the ViT's scores."""
  model, params, image, text, mask = model_params
  m = model.with_plan(((stage, {"method": "adaptive_mass", "budget": CAPACITY, "mass": 0.5}),))
  _, toks, aux = jax.jit(lambda p, i, t, k: m.apply({"params": p}, i, t, None, k,
                                                    method=m.embed_image))(params, image, text,
                                                                           mask)
  counts = counts_numpy(np.asarray(_vit_scores(params, image)), np.ones((2, 16), bool),
                        CAPACITY, "mass", 0.5)
  np.testing.assert_array_equal(np.asarray(toks.count()), counts)
  np.testing.assert_array_equal(np.asarray(aux["image_tokens_valid"]), counts)
  assert len(set(counts.tolist())) > 1 and counts.max() < CAPACITY, counts
  logits, _, _ = _prefill(CONFIG, params, None, text, mask, toks)
  for b, c in enumerate(counts):
    alone = jax.tree.map(lambda a: a[b:b + 1, :c] if a.ndim > 1 and a.shape[1] == CAPACITY
                         else a[b:b + 1], toks)
    assert np.asarray(alone.mask).all()
    ref_logits, _, _ = _prefill(CONFIG, params, None, text[b:b + 1], mask[b:b + 1], alone)
    np.testing.assert_allclose(np.asarray(logits[b]), np.asarray(ref_logits[0]), atol=2e-5)


@pytest.mark.slow
def test_padding_is_invisible_in_the_decoder(model_params):
  """At decoder layer 1 the policy keeps, per example, what `topk` keeps at that example's count
  (same positions, same logits before and after one decoding step), the count being the NumPy
  rule on the attention row the hook scored with. (~15 CPU-s: a decoder compiled per count.)"""
  model, params, image, text, mask = model_params
  entry = {"method": "adaptive_entropy", "layer": 1, "budget": CAPACITY, "scale": 0.5}
  m = model.with_plan((("llm", entry),))
  logits, cache, aux = _prefill(m.config, params, image, text, mask)
  step = _decode(params, logits, cache)
  rows = np.asarray(aux["llm_attn"][0])  # float32[B, T, N]
  scores = rows[np.arange(2), mask.sum(-1) - 1]  # the last valid prompt row
  counts = counts_numpy(scores, np.ones((2, 16), bool), CAPACITY, "entropy", 0.5)
  np.testing.assert_array_equal(np.asarray(aux["image_tokens_kept"]), counts)
  assert len(set(counts.tolist())) > 1 and counts.min() < CAPACITY, counts
  kept_pos = np.asarray(aux["llm_kept_pos"][0])
  for b, c in enumerate(counts):
    fixed = model.with_plan((("llm", {"method": "topk", "layer": 1, "budget": int(c)}),))
    ref_logits, ref_cache, ref_aux = _prefill(fixed.config, params, image[b:b + 1],
                                              text[b:b + 1], mask[b:b + 1])
    np.testing.assert_array_equal(kept_pos[b, :c], np.asarray(ref_aux["llm_kept_pos"][0][0]))
    assert np.all(kept_pos[b, c:] == -1)
    np.testing.assert_allclose(np.asarray(logits[b]), np.asarray(ref_logits[0]), atol=2e-5)
    np.testing.assert_allclose(np.asarray(step[b]),
                               np.asarray(_decode(params, ref_logits, ref_cache)[0]), atol=2e-5)
