"""`keynorm`: hand-worked cases, a NumPy transcription of ViTCoP's rule (the L2 norm of the key
cache averaged over the key/value heads, smallest kept) and DART's (L1 of the heads concatenated,
largest kept) on random grouped-query keys, and in the decoder of a Gemma 2 model with 2 KV heads
against the layer's own key cache."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tcjax
import tcjax.checkpoints as ckpt
from tcjax import compress
from tcjax.nn import GemmaConfig, PaliGemma, PaliGemmaConfig, SiglipConfig

from helpers import make_tokens

# Keys of 5 tokens, one head:  L2     L1
KEYS = jnp.array([[[[3.0, 4.0]],    # 5      7
                   [[1.0, 1.0]],    # 1.414  2
                   [[0.0, -6.0]],   # 6      6
                   [[2.0, 0.0]],    # 2      2
                   [[-2.5, 2.5]]]])  # 3.536  5


def kept(out):
  return np.flatnonzero(np.asarray(out.src[0]) >= 0).tolist()


@functools.lru_cache(maxsize=None)
def _jitted(budget, **opts):
  """keynorm under jit, once per budget and options (op by op it compiles every op)."""
  return jax.jit(lambda t, k: compress.keynorm(t, budget, keys_heads=k, **opts))


def tokens():
  return tcjax.Tokens.from_grid(jnp.arange(5.0).reshape(1, 5, 1), (1, 5))


def test_keynorm_hand_worked():
  keynorm = lambda b, **kw: kept(_jitted(b, **kw)(tokens(), KEYS))
  assert keynorm(2) == [1, 3]  # L2 1.414, 2
  assert keynorm(2, order="largest") == [0, 2]  # L2 5, 6
  assert keynorm(2, order="largest", norm="l1") == [0, 2]
  assert keynorm(3, order="largest", norm="l1") == [0, 2, 4]
  # L1 ties 2, 2 at tokens 1, 3 and the next is 5 at token 4
  assert keynorm(3, norm="l1") == [1, 3, 4]
  for b in (1, 2, 3):  # one head: the mean and the concatenation are the same key
    assert keynorm(b, heads="concat") == keynorm(b)


def test_two_heads_hand_worked():
  # Token 0's heads cancel in the mean (norm 0) but not concatenated (norm sqrt(2) * 4).
  keys = jnp.array([[[[4.0, 0.0], [-4.0, 0.0]],
                     [[1.0, 1.0], [1.0, 1.0]],
                     [[0.0, 3.0], [0.0, 3.0]]]])
  t = tcjax.Tokens.from_grid(jnp.ones((1, 3, 1)), (1, 3))
  assert kept(_jitted(1)(t, keys)) == [0]  # mean norms 0, 1.41, 3
  assert kept(_jitted(1, heads="concat")(t, keys)) == [1]  # 5.66, 2, 4.24


def vitcop_numpy(k, budget):
  """int[B, budget] kept indices, ascending: ViTCoP's `k_cache.mean(heads).norm(2)`, smallest
  first (`torch.topk(largest=False)`), ties to the lower index. k: [B, N, K, h]."""
  norm = np.sqrt((k.astype(np.float64).mean(2) ** 2).sum(-1))
  return np.sort(np.argsort(norm, axis=1, kind="stable")[:, :budget], axis=1)


def dart_numpy(k, budget):
  """DART's pivot rule: the largest L1 norm of the heads concatenated."""
  norm = np.abs(k.astype(np.float64)).reshape(k.shape[0], k.shape[1], -1).sum(-1)
  return np.sort(np.argsort(-norm, axis=1, kind="stable")[:, :budget], axis=1)


def src_kept(out):
  return np.stack([np.flatnonzero(s >= 0) for s in np.asarray(out.src)])


def test_matches_numpy_on_grouped_query_keys():
  t = make_tokens(3, 1, (6, 6), seed=4)
  k = np.asarray(jax.random.normal(jax.random.key(7), (3, 36, 4, 5)))  # 4 KV heads
  for budget in (1, 9, 30):
    mean = _jitted(budget)(t, k)
    np.testing.assert_array_equal(src_kept(mean), vitcop_numpy(k, budget))
    concat = _jitted(budget, heads="concat", order="largest", norm="l1")(t, k)
    np.testing.assert_array_equal(src_kept(concat), dart_numpy(k, budget))
  # The two head reductions keep different tokens here (what the option is for).
  assert not np.array_equal(src_kept(_jitted(9)(t, k)), src_kept(_jitted(9, heads="concat")(t, k)))


def test_keynorm_nan_and_inf():
  keys = KEYS.at[0, 1, 0, 0].set(jnp.nan).at[0, 3, 0, 1].set(jnp.inf)
  # NaN ranks last either way; an infinite norm is the largest
  assert kept(_jitted(2)(tokens(), keys)) == [0, 4]  # smallest: 3.536, 5
  assert kept(_jitted(1, order="largest")(tokens(), keys)) == [3]


def test_keynorm_full_budget_is_identity():
  t = make_tokens(2, 1, (3, 5))
  chex.assert_trees_all_equal(_jitted(15)(t, jnp.ones((2, 15, 2, 4))), t)


def test_keynorm_bad_input():
  for opt in ("heads", "order", "norm"):
    with pytest.raises(ValueError, match=opt):
      compress.keynorm(tokens(), 2, keys_heads=KEYS, **{opt: "middle"})
  with pytest.raises(ValueError, match="keys_heads"):  # heads concatenated: the head axis is gone
    compress.keynorm(tokens(), 2, keys_heads=KEYS[:, :, 0])


# ---- In the decoder: a Gemma 2 model with 4 query heads over 2 KV heads. ----

CONFIG = PaliGemmaConfig(
    img=SiglipConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=16),
    llm=GemmaConfig(version=2, vocab_size=40, width=16, depth=3, mlp_dim=32, num_heads=4,
                    num_kv_heads=2, head_dim=8, query_pre_attn_scalar=8,
                    attn_logits_softcap=50.0, final_logits_softcap=30.0, sliding_window=64))


@pytest.mark.parametrize("heads", ["mean", "concat"])
def test_keynorm_in_the_decoder_reads_layer_k_minus_1_key_cache(heads):
  """The kept image tokens are ViTCoP's choice on the post-RoPE key cache of layer K-1 (2 KV
  heads: the head-mean, or the concatenation with heads="concat")."""
  rng = np.random.default_rng(0)
  params = ckpt.unflatten({n: jnp.asarray(0.3 * rng.normal(size=s), jnp.float32)
                           for n, s in ckpt.param_shapes(CONFIG).items()})
  image = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  text = np.array([[2, 5, 6, 7, 9], [2, 8, 9, 3, 0]], np.int32)
  plan = (("llm", {"method": "keynorm", "layer": 2, "budget": 6, "heads": heads}),)
  model = PaliGemma(CONFIG).with_plan(plan)
  _, cache, aux = jax.jit(lambda p: model.apply({"params": p}, image, text, input_mask=text != 0,
                                                method=model.prefill))(params)
  k = np.asarray(cache.segments[0].k[1, :, :16])  # layer 1's keys of the 16 image tokens
  want = vitcop_numpy(k, 6) if heads == "mean" else np.sort(
      np.argsort(np.sqrt((k.reshape(2, 16, -1) ** 2).sum(-1)), axis=1, kind="stable")[:, :6], 1)
  # Image tokens sit at RoPE positions 0..15: the kept positions are the kept indices.
  np.testing.assert_array_equal(np.asarray(aux["llm_kept_pos"][0]), want)
