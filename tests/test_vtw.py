"""VTW: the withdrawal against a NumPy float64 transcription of the official forward (visual hidden
states and positions deleted at the input of layer K, text positions kept; KV-cached decoding
after it), the all-padding output contract, and the official K search."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import paligemma_ref as ref
import tcjax.checkpoints as ckpt
from tcjax import compress
from tcjax.compress.vtw import first_layer_within, withdrawal_kl
from tcjax.compress.registry import METHODS
from tcjax.nn import GemmaConfig, PaliGemma, PaliGemmaConfig, SiglipConfig
from tcjax.parallel import make_mesh

from helpers import check_contract, make_tokens

# ---- The method on its own: every visual token withdrawn, static capacity. ----


def test_withdraws_every_token():
  tokens = make_tokens(3, 2, (4, 4), seed=1)
  for budget in (1, 5):
    out = compress.vtw(tokens, budget)
    check_contract(out, budget, 3)
    assert out.grid == tokens.grid
    assert not np.asarray(out.mask).any() and np.all(np.asarray(out.src) == -1)
    assert np.all(np.asarray(out.size) == 0) and np.all(np.asarray(out.x) == 0)
    np.testing.assert_array_equal(np.asarray(out.count()), [0, 0, 0])
    assert np.all(np.asarray(compress.to_grid(out, out.x, fill=7.0)) == 7.0)


def test_jit_vmap_static_shape_and_sharding():
  tokens = make_tokens(8, 1, (4, 4), dtype=jnp.bfloat16, seed=2)
  eager = compress.vtw(tokens, 2)
  assert eager.x.dtype == jnp.bfloat16
  chex.assert_trees_all_equal(jax.jit(lambda t: compress.vtw(t, 2))(tokens), eager)
  stack = jax.tree.map(lambda a: a.reshape((2, 4) + a.shape[1:]), tokens)
  got = jax.vmap(lambda t: compress.vtw(t, 2))(stack)
  chex.assert_trees_all_equal(jax.tree.map(lambda a: a.reshape((8,) + a.shape[2:]), got), eager)
  shape = jax.eval_shape(lambda t: compress.vtw(t, 3), tokens)
  assert shape.x.shape == (8, 3, 8) and shape.src.shape == (8, 16)
  # Batch on `data` and tokens on an Explicit `seq` axis: nothing to gather, same answer.
  mesh = make_mesh((("data", 2), ("seq", 4)), axis_types="explicit")
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", "seq")))
  sharded = tokens.replace(x=put(tokens.x), pos=put(tokens.pos), size=put(tokens.size),
                           mask=put(tokens.mask), src=put(tokens.src))
  with jax.set_mesh(mesh):
    out = jax.jit(lambda t: compress.vtw(t, 2))(sharded)
  chex.assert_trees_all_equal(jax.device_get(out), eager)


def test_registry_and_bad_input():
  m = METHODS["vtw"]
  assert (m.family, m.stages, m.needs, m.options) == ("sampling", ("llm",), (), {})
  assert m.token_sharded and "2405.05803" in m.paper
  tokens = make_tokens(2, 1, (4, 4))
  for bad in (0, -1, 17, 1.0, True, "1"):
    with pytest.raises(ValueError, match="budget"):
      compress.vtw(tokens, bad)
  with pytest.raises(ValueError, match="budget"):
    jax.jit(lambda b: compress.vtw(tokens, b))(1)
  with pytest.raises(ValueError, match="tokens"):
    compress.vtw(tokens.x, 1)
  with pytest.raises(ValueError, match="colour"):
    compress.apply("vtw", tokens, 1, colour=1)
  with pytest.raises(TypeError):
    compress.vtw(tokens, 1, k=15)  # pylint: disable=unexpected-keyword-arg


# ---- In the decoder: the official forward, transcribed in NumPy (tests/paligemma_ref.py). ----

IMG = SiglipConfig(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=4, image_size=16)
N = IMG.num_patches  # 16 image tokens
# Gemma 2 with a sliding window shorter than image + prompt: the padding slot must stay out of
# every mask (global, local, prefix-sees-prefix).
CONFIG = PaliGemmaConfig(img=IMG, llm=GemmaConfig(
    version=2, vocab_size=50, width=24, depth=4, mlp_dim=48, num_heads=4, num_kv_heads=2,
    head_dim=8, query_pre_attn_scalar=6, attn_logits_softcap=8.0, final_logits_softcap=5.0,
    sliding_window=12))
T_PREFIX = 6
K = 2


@pytest.fixture(scope="module")
def model_params():
  rng = np.random.default_rng(3)
  flat = {}
  for k, shape in ckpt.param_shapes(CONFIG).items():
    if k.endswith("scale") or k.endswith("bias"):
      flat[k] = (rng.normal(size=shape) * 0.3 + k.endswith("scale") * k.startswith("img/"))
    else:
      fan_in = shape[-2] if len(shape) > 1 and not k.endswith("embedding") else shape[-1]
      flat[k] = rng.normal(size=shape) / np.sqrt(fan_in)
    flat[k] = flat[k].astype(np.float32)
  params = ckpt.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
  return PaliGemma(CONFIG), params, flat


def _inputs(seed, b=2, t=T_PREFIX):
  rng = np.random.default_rng(seed)
  image = rng.uniform(-1, 1, size=(b, IMG.image_size, IMG.image_size, 3)).astype(np.float32)
  text = rng.integers(3, 50, size=(b, t)).astype(np.int32)
  text[:, 0] = 2
  return image, text


def _official(flat, zimg, ids, n_suffix, layer):
  """Logits of every text token, VTW at `layer`: the image rows leave the hidden states and the
  positions at that layer's input (`pe_type="keep"`), as `VTWLlamaModel.forward` does."""
  b = ids.shape[0]
  x = np.concatenate([zimg, ref.embed_text(flat, CONFIG, ids)], 1)
  ar = np.concatenate([np.zeros((b, ids.shape[1] - n_suffix + N)), np.ones((b, n_suffix))], 1)
  keep = np.concatenate([np.zeros((b, N), bool), np.ones((b, ids.shape[1]), bool)], 1)
  logits, _, pos = ref.decoder(flat, CONFIG, x, ar, prune={layer: keep})
  np.testing.assert_array_equal(pos[:, 0], N)  # the text keeps its original positions
  return logits


def test_prefill_and_decode_equal_the_official_withdrawal(model_params):
  """Prefill, then KV-cached greedy decoding, = the official forward run from scratch at every
  step (no cache): layers < K see the image, layers >= K the text only, original positions."""
  model, params, flat = model_params
  m = model.with_plan((("llm", {"method": "vtw", "layer": K, "budget": 1}),))
  image, text = _inputs(seed=4)
  steps, b = 3, text.shape[0]
  variables = {"params": params}
  logits, cache, aux = jax.jit(lambda v, i, t: m.apply(v, i, t, method=m.prefill,
                                                       cache_size=steps))(variables, image, text)
  step = jax.jit(lambda v, tok, c: m.apply(v, tok, c, method=m.decode_step))
  zimg = ref.image_embed(flat, CONFIG, image)
  ids = text
  for s in range(steps + 1):
    want = _official(flat, zimg, ids, s, K)
    np.testing.assert_allclose(np.asarray(logits), want[:, -1], atol=1e-4, rtol=1e-4,
                               err_msg=f"step {s}")
    if s == steps:
      break
    tok = np.asarray(jnp.argmax(logits, -1)).astype(np.int32)
    ids = np.concatenate([ids, tok[:, None]], 1)
    logits, cache = step(variables, jnp.asarray(tok), cache)
  # Layers >= K cache no visual entry: one padding slot (never valid) + prompt + decoded tokens.
  first, last = cache.segments[0], cache.segments[-1]
  assert last.first_layer == K and last.k.shape[2] == 1 + T_PREFIX + steps
  assert not np.asarray(last.valid[:, 0]).any()
  assert first.k.shape[2] == N + T_PREFIX + steps  # layers < K keep the image
  np.testing.assert_array_equal(np.asarray(aux["image_tokens_kept"]), [0] * b)
  np.testing.assert_array_equal(np.asarray(aux["llm_valid_tokens"]),
                                [[N + T_PREFIX] * K + [T_PREFIX] * (4 - K)] * b)
  assert aux["llm_kept_pos"][0].shape == (b, 1) and np.all(np.asarray(aux["llm_kept_pos"][0]) < 0)


def test_training_forward_and_capacity(model_params):
  """The scoring forward (prefix + suffix) equals the official one, whatever the capacity."""
  model, params, flat = model_params
  image, text = _inputs(seed=5, t=T_PREFIX + 3)
  mask_ar = np.concatenate([np.zeros((2, T_PREFIX)), np.ones((2, 3))], 1).astype(np.int32)
  want = _official(flat, ref.image_embed(flat, CONFIG, image), text, 3, K)
  for budget in (1, 3):
    m = model.with_plan((("llm", {"method": "vtw", "layer": K, "budget": budget}),))
    got, aux = jax.jit(m.apply)({"params": params}, image, text, mask_ar)
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
    assert aux["llm_tokens"] == (N + 9,) * K + (budget + 9,) * (4 - K)


# ---- Finding K (official --findk). ----


def test_withdrawal_kl_is_the_official_kldivloss():
  rng = np.random.default_rng(6)
  full, cand = rng.normal(size=(3, 11)) * 2, rng.normal(size=(3, 11)) * 2
  log_sm = lambda z: z - z.max(-1, keepdims=True) - np.log(
      np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True))
  # nn.KLDivLoss(reduction="batchmean")(input=log p_full, target=p_cand)
  target = np.exp(log_sm(cand))
  want = (target * (np.log(target) - log_sm(full))).sum() / full.shape[0]
  np.testing.assert_allclose(float(withdrawal_kl(full, cand)), want, rtol=1e-5)
  assert abs(float(withdrawal_kl(full, full))) < 1e-6
  with pytest.raises(ValueError, match="withdrawn_logits"):
    withdrawal_kl(full, cand[:, :5])


def test_first_layer_within():
  kl = np.array([[0.5, 0.01, 0.004, 0.001, 0.0],
                 [0.3, 0.02, 0.001, 0.004, 0.0]])  # means .4, .015, .0025, .0025, 0
  layers = range(5, 10)
  assert first_layer_within(kl, 0.003, layers) == 7  # the first one, as the official
  assert first_layer_within(kl.mean(0), 0.02, layers) == 6
  with pytest.raises(ValueError, match="eta"):
    first_layer_within(kl + 1, 0.003, layers)
  with pytest.raises(ValueError, match="len"):
    first_layer_within(kl, 0.003, range(5, 9))
