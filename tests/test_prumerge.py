"""PruMerge / PruMerge+: hand-worked IQR, merge and capacity examples; the k-NN merge against a
NumPy transcription of the official loop on keys with several heads (concatenated, as the
official `k_proj` hook), and through the model from the last ViT layer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tcjax
from tcjax import compress
from tcjax.compress.prumerge import effective_count, iqr_outliers

from helpers import check_contract

# Token j of a 2x4 grid: feature [j, 1]; attention a_j; key at angle ang_j (degrees).
A = np.array([30, 1, 4, 2, 40, 3, 6, 5], np.float32)
ANG = np.deg2rad([0, 10, 200, 220, 90, 100, 300, 320])


def _inputs():
  x = np.stack([np.arange(8), np.ones(8)], -1)[None].astype(np.float32)
  keys = np.stack([np.cos(ANG), np.sin(ANG)], -1)[None, :, None].astype(np.float32)  # 1 head
  return tcjax.Tokens.from_grid(jnp.asarray(x), (2, 4)), jnp.asarray(A[None, None]), keys


@functools.lru_cache(maxsize=None)
def _jitted(name, budget, **opts):
  return jax.jit(lambda t, a, k: getattr(compress, name)(t, budget, attn=a, keys_heads=k, **opts))


def test_iqr_hand_worked():
  # Sorted: 1 2 3 4 5 6 30 40. Linear percentiles (numpy): position 7 * 0.25 = 1.75 gives
  # Q1 = 2 + 0.75 * (3 - 2) = 2.75; position 7 * 0.75 = 5.25 gives Q3 = 6 + 0.25 * (30 - 6) = 12.
  # Threshold 12 + 1.5 * 9.25 = 25.875: the outliers are 30 (index 0) and 40 (index 4).
  out = iqr_outliers(jnp.asarray(A), jnp.ones(8, bool))
  np.testing.assert_array_equal(out, [1, 0, 0, 0, 1, 0, 0, 0])
  # A NaN is never an outlier and does not enter the quartiles; padding neither.
  a = jnp.asarray(np.append(A, np.nan))
  np.testing.assert_array_equal(iqr_outliers(a, jnp.ones(9, bool))[:8], out)
  np.testing.assert_array_equal(iqr_outliers(a, jnp.arange(9) != 2)[2], False)


def test_hand_worked_merge_with_extra_token():
  t, a, keys = _inputs()
  out = _jitted("prumerge", 4, k=1)(t, a, keys)
  check_contract(out, 4, 1)
  # Kept: 0 and 4. k = 1 neighbour by key: token 1 for 0, token 5 for 4.
  # x_0 = [0,1] + 1*[1,1]; x_4 = [4,1] + 3*[5,1]; extra = sum over pruned a_j [j, 1].
  extra = sum(A[j] * np.array([j, 1.0]) for j in (1, 2, 3, 5, 6, 7))
  np.testing.assert_allclose(out.x[0, :3], [[1, 2], [19, 4], extra], rtol=1e-6)
  np.testing.assert_array_equal(out.mask[0], [1, 1, 1, 0])
  np.testing.assert_array_equal(effective_count(out), [3])
  # Tokens 2, 3, 6, 7 are in no k-NN: the extra token carries them, at its most attended (6).
  np.testing.assert_array_equal(out.src[0], [0, 0, 2, 2, 1, 1, 2, 2])
  np.testing.assert_array_equal(out.size[0], [2, 2, 4, 0])
  np.testing.assert_array_equal(out.pos[0, 2], [0, 1, 2])


def test_capacity_and_mask():
  t, a, keys = _inputs()
  # Fewer outliers (2) than capacity (5): three padding slots; dropped tokens src -1.
  out = _jitted("prumerge", 5, k=1, extra_token=False)(t, a, keys)
  check_contract(out, 5, 1)
  np.testing.assert_array_equal(out.mask[0], [1, 1, 0, 0, 0])
  np.testing.assert_array_equal(out.src[0], [0, 0, -1, -1, 1, 1, -1, -1])
  np.testing.assert_allclose(out.x[0, :2], [[1, 2], [19, 4]], rtol=1e-6)
  assert not np.any(out.x[0, 2:])
  # More outliers (2) than capacity (1): the most attended (token 4) wins; token 0 is pruned.
  out = _jitted("prumerge", 1, k=1, extra_token=False)(t, a, keys)
  check_contract(out, 1, 1)
  np.testing.assert_array_equal(out.src[0], [-1, -1, -1, -1, 0, 0, -1, -1])
  np.testing.assert_allclose(out.x[0], [[19, 4]], rtol=1e-6)
  # normalize=True divides the neighbour sum by its weights: x_4 = [4,1] + [5,1].
  out = _jitted("prumerge", 1, k=1, extra_token=False, normalize=True)(t, a, keys)
  np.testing.assert_allclose(out.x[0], [[9, 2]], rtol=1e-6)


def test_plus_adds_uniform_grid():
  # 64 tokens, attention 1 except two outliers (5 and 33): Q1 = Q3 = 1, outliers are > 1.
  # step = 64 // 2 = 32, stride 32 // 3 = 10: grid 0, 10, ..., 60 (all < N - 1 = 63).
  a = np.ones((1, 1, 64), np.float32)
  a[0, 0, [5, 33]] = 5.0
  x = jax.random.normal(jax.random.key(0), (1, 64, 4))
  keys = jax.random.normal(jax.random.key(1), (1, 64, 1, 3))
  t = tcjax.Tokens.from_grid(x, (8, 8))
  out = _jitted("prumerge_plus", 12, extra_token=False)(t, jnp.asarray(a), keys)
  check_contract(out, 12, 1)
  lin = np.asarray(out.pos[0, :, 1] * 8 + out.pos[0, :, 2])
  np.testing.assert_array_equal(lin[:9], [0, 5, 10, 20, 30, 33, 40, 50, 60])
  np.testing.assert_array_equal(out.count(), [9])
  # Capacity 6: outliers first, then grid samples (equal attention: lower index first).
  out = _jitted("prumerge_plus", 6, extra_token=False)(t, jnp.asarray(a), keys)
  lin = np.asarray(out.pos[0, :, 1] * 8 + out.pos[0, :, 2])
  np.testing.assert_array_equal(lin, [0, 5, 10, 20, 30, 33])
  # Plain PruMerge keeps only the outliers.
  out = _jitted("prumerge", 6, extra_token=False)(t, jnp.asarray(a), keys)
  np.testing.assert_array_equal(out.count(), [2])


def prumerge_numpy(x, a, keys, k=32):
  """(kept indices ascending, their merged features, the extra token) of one example, from the
  official `token_prune_merge_advanced`: IQR outliers of the attention, then for each kept token
  its x plus the attention-weighted x of the k tokens whose keys (heads concatenated, as the
  `k_proj` output) are most cosine-similar, then the attention-weighted sum of the pruned."""
  s = a.mean(0)
  q1, q3 = np.percentile(s, [25, 75])
  kept = np.sort(np.flatnonzero(s > q3 + 1.5 * (q3 - q1)))
  kf = keys.reshape(keys.shape[0], -1).astype(np.float64)
  kn = kf / np.linalg.norm(kf, axis=-1, keepdims=True)
  want = []
  for i in kept:
    cos = kn @ kn[i]
    cos[i] = -np.inf
    nb = np.argsort(-cos, kind="stable")[:k]
    want.append(x[i] + (s[nb, None] * x[nb]).sum(0))
  pruned = np.setdiff1d(np.arange(len(s)), kept)
  return kept, np.stack(want), (s[pruned, None] * x[pruned]).sum(0)


@pytest.mark.parametrize("heads", [1, 4])
def test_kept_features_match_numpy_knn(heads):
  x = np.asarray(jax.random.normal(jax.random.key(2), (2, 64, 5)))
  keys = np.asarray(jax.random.normal(jax.random.key(3), (2, 64, heads, 6)))
  a = np.asarray(jax.nn.softmax(3 * jax.random.normal(jax.random.key(4), (2, 2, 64)), -1))
  t = tcjax.Tokens.from_grid(jnp.asarray(x), (8, 8))
  out = _jitted("prumerge", 16)(t, jnp.asarray(a), jnp.asarray(keys))
  check_contract(out, 16, 2)
  for b in range(2):
    kept, want, extra = prumerge_numpy(x[b], a[b], keys[b])
    assert len(kept) <= 15  # few outliers here: every one has a slot
    got = np.asarray(out.x[b, :int(out.count()[b])])
    lin = np.asarray(out.pos[b, :, 1] * 8 + out.pos[b, :, 2])[:len(got)]
    is_kept = np.isin(lin, kept)
    np.testing.assert_array_equal(lin[is_kept], kept)
    np.testing.assert_allclose(got[is_kept], want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[~is_kept][0], extra, rtol=1e-5, atol=1e-5)
  if heads > 1:  # the head-mean keys are other neighbours: other features
    mean = _jitted("prumerge", 16, heads="mean")(t, jnp.asarray(a), jnp.asarray(keys))
    assert not np.allclose(np.asarray(mean.x), np.asarray(out.x))


def test_bad_heads():
  t, a, keys = _inputs()
  with pytest.raises(ValueError, match="heads"):
    compress.prumerge(t, 4, attn=a, keys_heads=keys, heads="max")
  with pytest.raises(ValueError, match="keys_heads"):
    compress.prumerge(t, 4, attn=a, keys_heads=keys[:, :, 0])


def test_through_the_model_reads_the_last_vit_layer():
  """A plan's PruMerge = PruMerge on the ViT output with the last layer's attention and keys
  (its default signal layer, the official hooks' layer), heads concatenated."""
  from tcjax.nn import GemmaConfig, PaliGemma, PaliGemmaConfig, SiglipConfig, siglip
  import tcjax.checkpoints as ckpt
  img = SiglipConfig(width=16, depth=3, mlp_dim=32, num_heads=2, patch_size=4, image_size=16)
  config = PaliGemmaConfig(img=img, llm=GemmaConfig(width=16, depth=1, mlp_dim=32, num_heads=2,
                                                    num_kv_heads=1, head_dim=8, vocab_size=32))
  rng = np.random.default_rng(0)
  params = ckpt.unflatten({n: jnp.asarray(0.5 * rng.normal(size=s), jnp.float32)
                           for n, s in ckpt.param_shapes(config).items()})
  image = jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32)
  model = PaliGemma(config).with_plan((("post_vit", {"method": "prumerge", "budget": 8}),))
  z, out, _ = jax.jit(lambda p, i: model.apply({"params": p}, i, method=model.embed_image))(
      params, image)
  tokens, sig, _ = jax.jit(lambda p, i: siglip.encode(p, i, img, (), want_signals=(1, 2)))(
      params["img"], image)
  head = params["img"]["head"]
  for layer, same in ((2, True), (1, False)):
    want = _jitted("prumerge", 8)(tokens, sig[layer]["attn"], sig[layer]["keys_heads"])
    assert np.array_equal(np.asarray(out.src), np.asarray(want.src)) == same, layer
    if same:
      np.testing.assert_allclose(np.asarray(z), np.asarray(want.x @ head["kernel"] + head["bias"]),
                                 atol=1e-5, rtol=1e-5)
