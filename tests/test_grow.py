"""Growing a trained decoder (`tcjax.train.grow`): the grown model computes exactly what the
un-grown one does, its new output projections learn from the first step, and bad requests are
refused."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import helpers
import tcjax.checkpoints as ckpt
from tcjax.nn import PaliGemma
from tcjax.nn.config import GemmaConfig, PaliGemmaConfig, SiglipConfig
from tcjax.train import loop
from tcjax.train.grow import grow_decoder

IMG = SiglipConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=16)
CONFIGS = {
    "multi_query": PaliGemmaConfig(img=IMG, llm=GemmaConfig(
        version=1, vocab_size=50, width=24, depth=2, mlp_dim=48, num_heads=2, num_kv_heads=1,
        head_dim=8)),
    "qkv_gemma2": PaliGemmaConfig(img=IMG, llm=GemmaConfig(
        version=2, vocab_size=50, width=24, depth=2, mlp_dim=48, num_heads=2, num_kv_heads=2,
        head_dim=8, query_pre_attn_scalar=8, attn_logits_softcap=50.0,
        final_logits_softcap=30.0, sliding_window=4096)),
}


def random_params(config, seed=0):
  return helpers.random_model_params(config, np.random.default_rng(seed))[1]


def inputs(config, batch=2, seed=1):
  rng = np.random.default_rng(seed)
  s = config.img.image_size
  image = jnp.asarray(rng.uniform(-1, 1, (batch, s, s, 3)), jnp.float32)
  text = jnp.asarray(rng.integers(1, config.llm.vocab_size, (batch, 6)), jnp.int32)
  mask_ar = jnp.asarray([[0, 0, 0, 1, 1, 1]] * batch, jnp.int32)  # prefix, then suffix
  return image, text, mask_ar


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_grown_model_computes_what_the_trained_one_does(name):
  config = CONFIGS[name]
  params = random_params(config)
  image, text, mask_ar = inputs(config)
  want, _ = PaliGemma(config).apply({"params": params}, image, text, mask_ar)
  new_config, grown = grow_decoder(params, config, llm_depth=4, llm_num_heads=4, seed=3)
  assert (new_config.llm.depth, new_config.llm.num_heads) == (4, 4)
  # The grown tree has exactly the shapes a fresh model of the grown config has.
  got_shapes = {k: tuple(np.shape(v)) for k, v in ckpt.flatten(grown).items()}
  assert got_shapes == ckpt.param_shapes(new_config)
  # ... and the checkpoint reader infers the grown config from those shapes.
  assert ckpt.big_vision.infer_config(ckpt.flatten(grown)).llm.depth == 4
  got, _ = PaliGemma(new_config).apply({"params": grown}, image, text, mask_ar)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # The trained weights are untouched.
  for k, v in ckpt.flatten(params).items():
    g = np.asarray(ckpt.flatten(grown)[k])
    np.testing.assert_array_equal(g[tuple(slice(0, n) for n in np.shape(v))], np.asarray(v))


def test_new_output_projections_get_gradients_at_once():
  config = CONFIGS["multi_query"]
  params = random_params(config)
  new_config, grown = grow_decoder(params, config, llm_depth=3, llm_num_heads=3)
  image, text, mask_ar = inputs(config)
  model = PaliGemma(new_config)

  def loss(p):
    logits, _ = model.apply({"params": p}, image, text, mask_ar)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  g = jax.grad(loss)(grown)["llm"]["layers"]
  o = np.asarray(g["attn"]["attn_vec_einsum"]["w"])  # [L, H, h, D]
  assert np.abs(o[2]).max() > 0  # the new layer's attention output
  assert np.abs(o[:2, 2]).max() > 0  # the new head's rows in the trained layers
  assert np.abs(np.asarray(g["mlp"]["linear"])[2]).max() > 0


def test_bad_requests_are_refused():
  config = CONFIGS["multi_query"]
  params = random_params(config)
  with pytest.raises(ValueError, match="only grows"):
    grow_decoder(params, config, llm_depth=1)
  gqa = dataclasses.replace(config, llm=dataclasses.replace(config.llm, num_heads=4,
                                                           num_kv_heads=2))
  with pytest.raises(ValueError, match="groups would move"):
    grow_decoder(random_params(gqa), gqa, llm_num_heads=6)
  with pytest.raises(ValueError, match="scanned decoder"):
    grow_decoder({"img": params["img"]}, config, llm_depth=3)


def test_loop_refuses_unknown_grow_fields_and_grow_without_init(tmp_path):
  cfg = ml_collections.ConfigDict({"grow": {"llm_width": 128}, "seed": 0})
  config = CONFIGS["multi_query"]
  with pytest.raises(ValueError, match="llm_width"):
    loop.grown(cfg, PaliGemma(config), random_params(config))
  from configs import testbed  # pylint: disable=g-import-not-at-top
  smoke = testbed.get_config("smoke")
  smoke.grow = {"llm_depth": 2}
  with pytest.raises(ValueError, match="config.init"):
    loop.train(smoke, str(tmp_path))
