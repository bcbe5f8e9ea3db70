"""CDPruner against a NumPy float64 transcription of the official `encode_images` (conditional DPP
kernel + fast greedy MAP), plus batch / jit / vmap / sharding / options / robustness."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import tcjax
from tcjax import compress
from tcjax.compress.registry import CHOICES, METHODS
from tcjax.parallel import make_mesh

from helpers import check_contract, make_tokens


def official_relevance(feats, text, text_mask, sign=-1.0, per_example=True, theta=None):
  """float64[B, N] relevance, transcribed from `llava_arch.py::encode_images`: the mean negated
  cosine to the M valid text embeddings `text[b][text_mask[b]]`, min-max normalised."""
  feats = np.asarray(feats, np.float64)
  text = np.asarray(text, np.float64)
  fn = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
  rel = np.zeros(feats.shape[:2])
  for i in range(len(feats)):
    t = text[i][np.asarray(text_mask[i])]
    t = t / np.linalg.norm(t, axis=-1, keepdims=True)
    rel[i] = (sign * (fn[i] @ t.T)).mean(-1)
  if per_example:  # the official min / max over its (one-image) batch
    lo, hi = rel.min(1, keepdims=True), rel.max(1, keepdims=True)
  else:
    lo, hi = rel.min(), rel.max()
  rel = (rel - lo + 1e-6) / (hi - lo)
  if theta is not None:
    rel = np.exp(theta / (2 * (1 - theta)) * rel)
  return rel


def official(feats, text, text_mask, budget, **relevance_opts):
  """The official selection in float64 (sorted kept indices [B, budget]), transcribed from
  `llava_arch.py::encode_images`: kernel, then the fast greedy MAP loop."""
  feats = np.asarray(feats, np.float64)
  b, n, _ = feats.shape
  fn = feats / np.linalg.norm(feats, axis=-1, keepdims=True)
  similarity = fn @ fn.transpose(0, 2, 1)
  rel = official_relevance(feats, text, text_mask, **relevance_opts)
  kernel = rel[:, :, None] * similarity * rel[:, None, :]
  cis = np.zeros((budget, b, n))
  di2s = np.diagonal(kernel, axis1=1, axis2=2).copy()
  select = np.empty((budget, b), np.int64)
  ar = np.arange(b)
  for i in range(budget):
    j = np.argmax(di2s, axis=-1)
    select[i] = j
    eis = (kernel[ar, j] - np.einsum("tb,tbn->bn", cis[:i, ar, j], cis[:i])) \
        / np.sqrt(di2s[ar, j])[:, None]
    cis[i] = eis
    di2s -= eis ** 2
    di2s[ar, j] = -np.inf
  return np.sort(select.T, axis=-1)


def kept(out):
  src = np.asarray(out.src)
  return [np.flatnonzero(s >= 0) for s in src]


def inputs(b=2, grid=(6, 8), d=32, t=7, seed=0):
  tokens = make_tokens(b, 1, grid, dim=d, seed=seed)
  k1, k2 = jax.random.split(jax.random.key(seed + 99))
  text = jax.random.normal(k1, (b, t, d)) + 0.3 * tokens.x.mean(1, keepdims=True)
  lengths = np.arange(b) % (t - 2) + 3
  text_mask = jnp.asarray(np.arange(t)[None] < lengths[:, None])
  return tokens, text, text_mask


@functools.lru_cache(maxsize=None)
def _jitted(budget, **opts):
  return jax.jit(lambda t, x, m: compress.cdpruner(t, budget, text=x, text_mask=m, **opts))


# Few (budget, options) pairs and one input shape: each pair compiles once for the whole file.
@pytest.mark.parametrize("seed, budget, opts", [
    (0, 12, {}), (1, 12, {"sign": "positive"}),
    (2, 30, {"normalize": "batch", "theta": 0.5, "cache_gram": False}),
])
def test_matches_official_transcription(seed, budget, opts):
  tokens, text, text_mask = inputs(b=3, seed=seed)
  out = _jitted(budget, **opts)(tokens, text, text_mask)
  check_contract(out, budget, 3)
  want = official(tokens.x, text, text_mask, budget,
                  sign=1.0 if opts.get("sign") == "positive" else -1.0,
                  per_example=opts.get("normalize") != "batch", theta=opts.get("theta"))
  for b, got in enumerate(kept(out)):
    np.testing.assert_array_equal(got, want[b], err_msg=f"example {b}")


def test_relevance_conditions_the_selection():
  """Same tokens, different instructions: different kept sets (and the sign matters)."""
  tokens, text, text_mask = inputs(b=3, seed=7)
  a = kept(_jitted(12)(tokens, text, text_mask))
  b = kept(_jitted(12)(tokens, -text, text_mask))
  c = kept(_jitted(12, sign="positive")(tokens, -text, text_mask))
  assert not any(np.array_equal(x, y) for x, y in zip(a, b))
  for x, z in zip(a, c):  # negating the text = flipping the sign
    np.testing.assert_array_equal(x, z)


def test_text_padding_never_counts():
  tokens, text, text_mask = inputs(b=3, seed=8)
  noisy = jnp.where(text_mask[..., None], text, jnp.nan)
  a = _jitted(12)(tokens, text, text_mask)
  b = _jitted(12)(tokens, noisy, text_mask)
  np.testing.assert_array_equal(np.asarray(a.src), np.asarray(b.src))


def test_padding_nan_features_and_an_exhausted_kernel():
  """Padding and NaN-feature tokens come after every valid token and never change the others'
  selection. More picks (47) than the kernel's rank (D = 32): where the official loop picks by
  rounding noise (and takes sqrt(d2 <= 0), picking duplicates), the exhausted picks here follow
  the relevance."""
  tokens, text, text_mask = inputs(b=3, seed=9)
  t = tokens.replace(x=tokens.x.at[0, 5].set(jnp.nan), mask=tokens.mask.at[0, 3].set(False),
                     src=tokens.src.at[0, 3].set(-1))  # token 3: padding, carrying no patch
  got = kept(_jitted(12)(t, text, text_mask))[0]
  ok = np.array([i for i in range(48) if i not in (3, 5)])
  alone = official(np.asarray(tokens.x)[:1, ok], text[:1], text_mask[:1], 12)[0]
  np.testing.assert_array_equal(got, ok[alone])
  out = _jitted(47)(t, text, text_mask)
  check_contract(out, 47, 3)
  # Example 0: the 46 tokens with finite features, then the padding token (lower index than 5).
  lin = np.asarray(out.linear_pos())
  np.testing.assert_array_equal(lin[0], list(ok) + [3])
  np.testing.assert_array_equal(np.asarray(out.mask[0]), [True] * 46 + [False])
  # Examples 1, 2: the official picks while the kernel has rank (32), then by relevance.
  k = kept(out)
  first = official(tokens.x, text, text_mask, 32)
  rel = official_relevance(tokens.x, text, text_mask)
  for b in (1, 2):
    rest = np.setdiff1d(np.arange(48), first[b])
    more = rest[np.argsort(-rel[b, rest], kind="stable")[:15]]
    np.testing.assert_array_equal(k[b], np.sort(np.concatenate([first[b], more])))


def test_no_valid_text_is_the_plain_dpp():
  """No valid text (or a constant relevance): every relevance is 1 (where the official divides
  by max - min = 0), i.e. the DPP on the similarity alone, as theta = 0 (exp(0 r) = 1) gives."""
  tokens, text, text_mask = inputs(b=3, seed=11)
  none = _jitted(12)(tokens, text, jnp.zeros_like(text_mask))
  plain = _jitted(12, theta=0.0)(tokens, text, text_mask)
  np.testing.assert_array_equal(np.asarray(none.src), np.asarray(plain.src))
  assert not np.array_equal(np.asarray(none.src), np.asarray(_jitted(12)(tokens, text,
                                                                          text_mask).src))


def test_batch_vmap_and_sharding_agree():
  tokens, text, text_mask = inputs(b=8, seed=12)
  run = _jitted(12)
  full = run(tokens, text, text_mask)
  # The first three examples alone (another batch size): the same rows (per-example relevance).
  three = jax.tree.map(lambda a: a[:3], (tokens, text, text_mask))
  chex.assert_trees_all_close(jax.tree.map(lambda a: a[:3], full), run(*three))
  # vmap over an extra leading axis.
  stack = jax.tree.map(lambda a: a.reshape((2, 4) + a.shape[1:]), (tokens, text, text_mask))
  got = jax.vmap(run)(*stack)
  chex.assert_trees_all_close(jax.tree.map(lambda a: a.reshape((8,) + a.shape[2:]), got), full)
  # Batch sharded over an Explicit mesh axis.
  mesh = make_mesh((("data", 8),), axis_types="explicit")
  shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    out = jax.jit(lambda *a: compress.cdpruner(a[0], 12, text=a[1], text_mask=a[2]))(
        *jax.tree.map(shard, (tokens, text, text_mask)))
  chex.assert_trees_all_close(jax.device_get(out), full)


def test_static_output_shape():
  tokens, text, text_mask = inputs(b=2, seed=13)
  shape = jax.eval_shape(lambda t, x, m: compress.cdpruner(t, 7, text=x, text_mask=m),
                         tokens, text, text_mask)
  assert shape.x.shape == (2, 7, 32) and shape.src.shape == (2, 48)


def test_registry_and_bad_input():
  m = METHODS["cdpruner"]
  assert m.family == "cross_modal" and m.stages == ("post_proj", "llm")
  assert m.needs == ("text", "text_mask") and "2506.10967" in m.paper
  assert CHOICES["cdpruner"] == {"sign": ("negative", "positive"),
                                 "normalize": ("example", "batch")}
  tokens, text, text_mask = inputs(b=2, seed=14)
  call = lambda budget=4, **kw: compress.cdpruner(
      tokens, budget, **{"text": text, "text_mask": text_mask, **kw})
  for kw, word in [({"sign": "neg"}, "sign"), ({"normalize": "global"}, "normalize"),
                   ({"theta": 1.0}, "theta"), ({"theta": -0.1}, "theta"),
                   ({"theta": True}, "theta"), ({"cache_gram": 1}, "cache_gram"),
                   ({"text": None}, "text"), ({"text_mask": None}, "text_mask"),
                   ({"text": text[..., :5]}, "text"), ({"text_mask": text_mask[:, 1:]}, "text_mask"),
                   ({"budget": 0}, "budget"), ({"budget": 49}, "budget")]:
    with pytest.raises(ValueError, match=word):
      call(**kw)
  with pytest.raises(ValueError, match="colour"):
    compress.apply("cdpruner", tokens, 4, text=text, text_mask=text_mask, colour=1)
  with pytest.raises(ValueError, match="tokens"):
    compress.cdpruner(tokens.x, 4, text=text, text_mask=text_mask)


def test_plan_entries_hand_it_the_prompt():
  """A plan entry at post_proj (official) or llm passes the stage's text and text_mask."""
  from tcjax.nn import plan as plan_lib  # pylint: disable=g-import-not-at-top
  tokens, text, text_mask = inputs(b=3, seed=15)
  want = _jitted(12, sign="positive")(tokens, text, text_mask)
  for stage, extra in (("post_proj", {}), ("llm", {"layer": 2})):
    (_, opts), = plan_lib.normalize(
        ((stage, {"method": "cdpruner", "budget": 12, "sign": "positive", **extra}),))
    got = jax.jit(lambda t, x, m, o=dict(opts), s=stage: plan_lib.run_entry(
        o, t, {"text": x, "text_mask": m}, s, "test"))(tokens, text, text_mask)
    np.testing.assert_array_equal(np.asarray(got.src), np.asarray(want.src))
  with pytest.raises(ValueError, match="text"):  # a model called without text
    plan_lib.run_entry({"method": "cdpruner", "budget": 12}, tokens, {}, "post_proj", "test")
