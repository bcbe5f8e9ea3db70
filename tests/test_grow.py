"""Growing a trained decoder (`tcjax.train.grow`): the grown model computes exactly what the
un-grown one does, its new output projections learn from the first step, and bad requests are
refused."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import tcjax.checkpoints as ckpt
from tcjax.nn import PaliGemma
from tcjax.train import loop
from tcjax.train.grow import grow_decoder

import test_model

# Multi-query Gemma 1 (q_einsum + one KV head) and Gemma 2 with one KV head per query head
# (qkv_einsum): the two layouts whose heads can grow. test_model's Gemma 2 (4 query heads on 2 KV
# heads) is the grouped case that must be refused.
GQA = test_model.CONFIGS[2]
CONFIGS = {
    "multi_query": test_model.CONFIGS[1],
    "qkv_gemma2": dataclasses.replace(GQA, llm=dataclasses.replace(GQA.llm, num_heads=2)),
}


def random_params(config):
  return test_model.make_params(config)[1]


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_grown_model_computes_what_the_trained_one_does(name):
  config = CONFIGS[name]
  params = random_params(config)
  image, text, mask_ar = test_model.inputs(seed=1)
  want, _ = PaliGemma(config).apply({"params": params}, image, text, mask_ar)
  new_config, grown = grow_decoder(params, config, llm_depth=6, llm_num_heads=4, seed=3)
  assert (new_config.llm.depth, new_config.llm.num_heads) == (6, 4)
  # The grown tree has exactly the shapes a fresh model of the grown config has.
  got_shapes = {k: tuple(np.shape(v)) for k, v in ckpt.flatten(grown).items()}
  assert got_shapes == ckpt.param_shapes(new_config)
  # ... and the checkpoint reader infers the grown config from those shapes.
  assert ckpt.big_vision.infer_config(ckpt.flatten(grown)).llm.depth == 6
  got, _ = PaliGemma(new_config).apply({"params": grown}, image, text, mask_ar)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # The trained weights are untouched.
  grown_flat = ckpt.flatten(grown)
  for k, v in ckpt.flatten(params).items():
    g = np.asarray(grown_flat[k])
    np.testing.assert_array_equal(g[tuple(slice(0, n) for n in np.shape(v))], np.asarray(v))


def test_new_output_projections_get_gradients_at_once():
  config = CONFIGS["multi_query"]
  params = random_params(config)
  new_config, grown = grow_decoder(params, config, llm_depth=5, llm_num_heads=3)
  image, text, mask_ar = test_model.inputs(seed=1)
  model = PaliGemma(new_config)

  def loss(p):
    logits, _ = model.apply({"params": p}, image, text, mask_ar)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  g = jax.grad(loss)(grown)["llm"]["layers"]
  o = np.asarray(g["attn"]["attn_vec_einsum"]["w"])  # [L, H, h, D]
  assert np.abs(o[4]).max() > 0  # the new layer's attention output
  assert np.abs(o[:4, 2]).max() > 0  # the new head's rows in the trained layers
  assert np.abs(np.asarray(g["mlp"]["linear"])[4]).max() > 0


def test_bad_requests_are_refused():
  config = CONFIGS["multi_query"]
  params = random_params(config)
  with pytest.raises(ValueError, match="only grows"):
    grow_decoder(params, config, llm_depth=1)
  with pytest.raises(ValueError, match="groups would move"):
    grow_decoder(random_params(GQA), GQA, llm_num_heads=6)
  with pytest.raises(ValueError, match="scanned decoder"):
    grow_decoder({"img": params["img"]}, config, llm_depth=5)


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
