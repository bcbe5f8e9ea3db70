"""Learned compressors in the model's plan: validation, the `compressor` parameter subtree (the
towers' paths unchanged), budgets under jit, checkpoints, and frozen towers under the loop's
regex freezing (configs/learned.py)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import learned as learned_config
from tcjax import checkpoints
from tcjax.nn import GemmaConfig, PaliGemma, PaliGemmaConfig, SiglipConfig, learned
from tcjax.nn.params import param_shapes
from tcjax.train import TrainState, make_train_step
from tcjax.train import loop

IMG = SiglipConfig(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=4, image_size=32)
LLM = GemmaConfig(version=1, vocab_size=64, width=24, depth=1, mlp_dim=48, num_heads=2,
                  num_kv_heads=1, head_dim=12)
# Two plans covering the four compressors at both stages (post_vit width 32, post_proj 24).
PLANS = {
    "ldpv2+qformer": (("post_vit", {"method": "ldpv2", "budget": 16}),
                      ("post_proj", {"method": "qformer", "budget": 8, "width": 24, "depth": 2,
                                     "heads": 2, "mlp_dim": 32})),
    "perceiver+tokenlearner": (("post_vit", {"method": "perceiver", "budget": 16, "depth": 1,
                                             "heads": 2, "head_dim": 8}),
                               ("post_proj", {"method": "tokenlearner", "budget": 4,
                                              "bottleneck_dim": 8})),
}


def config(plan):
  return PaliGemmaConfig(img=IMG, llm=LLM, plan=plan)


def inputs(b=2):
  image = jax.random.uniform(jax.random.key(0), (b, 32, 32, 3), minval=-1, maxval=1)
  text = jnp.array([[2, 5, 6, 7, 1, 9], [2, 5, 8, 1, 9, 9]] * (b // 2), jnp.int32)
  mask_ar = jnp.array([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]] * (b // 2), jnp.int32)
  return image, text, mask_ar


def flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


@pytest.mark.parametrize("name", sorted(PLANS))
def test_plan_runs_with_its_budgets_and_subtrees(name):
  model = PaliGemma(config(PLANS[name]))
  image, text, mask_ar = inputs()
  params = jax.jit(lambda: model.init(jax.random.key(0), image, text, mask_ar)["params"])()
  names = flat(params)
  towers = {k for k in names if not k.startswith("compressor/")}
  assert towers == set(param_shapes(model.config))  # the pretrained paths never change
  keys = {k.split("/")[1] for k in names if k.startswith("compressor/")}
  stage_keys = {f"{s}_{o['method']}_{o['budget']}" for s, o in PLANS[name]}
  assert keys == stage_keys
  assert learned.param_shapes(model.config) == {
      k: v.shape for k, v in names.items() if k.startswith("compressor/")}
  embed = jax.jit(lambda p, im, t, m: model.apply({"params": p}, im, t, m,
                                                  method=model.embed_image))
  zimg, toks, aux = embed(params, image, text, mask_ar)
  last = PLANS[name][-1][1]["budget"]
  assert zimg.shape == (2, last, LLM.width) and aux["image_tokens"] == last
  assert bool(toks.mask.all()) and toks.src.shape == (2, 64)
  np.testing.assert_allclose(np.asarray(toks.size.sum(-1)), 64.0, rtol=1e-5)
  # The decoder takes the compressed tokens: full forward and the same text logits twice.
  logits, _ = jax.jit(lambda p: model.apply({"params": p}, image, text, mask_ar))(params)
  assert logits.shape == (2, 6, LLM.vocab_size) and bool(jnp.isfinite(logits).all())


def test_qformer_reads_the_prompt_but_not_the_answer():
  """At post_proj the queries see the prompt (text_mask: prefix only): changing a prompt token
  changes the image tokens, changing an answer (suffix) token does not."""
  plan = (("post_proj", {"method": "qformer", "budget": 4, "width": 24, "depth": 1,
                         "heads": 2, "mlp_dim": 32}),)
  model = PaliGemma(config(plan))
  image, text, mask_ar = inputs()
  params = model.init(jax.random.key(0), image, text, mask_ar)["params"]
  embed = jax.jit(lambda t: model.apply({"params": params}, image, t, mask_ar,
                                        method=model.embed_image)[0])
  base = embed(text)
  np.testing.assert_allclose(embed(text.at[:, 5].set(3)), base, atol=1e-6)
  assert float(jnp.abs(embed(text.at[:, 1].set(3)) - base).max()) > 1e-4
  with pytest.raises(ValueError, match="called with text"):
    model.apply({"params": params}, image, method=model.embed_image)


@pytest.mark.parametrize("entry,match", [
    (("post_vit", {"method": "perceiver", "budget": 8, "latents": 8}), "unknown option"),
    (("post_vit", {"method": "perceiver", "keep": 0.5}), "needs 'budget'"),
    (("post_vit", {"method": "perceiver", "budget": 0}), "needs 'budget'"),
    (("llm", {"method": "perceiver", "budget": 8, "layer": 1}), "acts at stages"),
    (("vit", {"method": "tokenlearner", "budget": 8, "layer": 0}), "acts at stages"),
    (("post_vit", {"method": "qformer", "budget": 8, "use_text": True}), "cannot provide"),
    (("post_vit", {"method": "tokenlearner", "budget": 8, "per_frame": 1}), "True or False"),
    (("post_proj", {"method": "qformer", "budget": 8, "use_text": 1}), "True or False"),
    (("post_vit", {"method": "perceiver", "budget": 8, "depth": 0}), "positive int"),
    (("post_vit", {"method": "ldpv2", "budget": 16, "name": "a/b"}), "name must be"),
])
def test_bad_entries_are_refused_when_the_plan_is_built(entry, match):
  with pytest.raises(ValueError, match=match):
    config((entry,))


def test_two_entries_may_not_share_a_subtree():
  twice = (("post_vit", {"method": "tokenlearner", "budget": 32}),
           ("post_vit", {"method": "tokenlearner", "budget": 16, "name": "post_vit_"
                                                                         "tokenlearner_32"}))
  with pytest.raises(ValueError, match="also plan"):
    config(twice)
  config((twice[0], ("post_vit", {"method": "tokenlearner", "budget": 16})))


def test_checkpoints_carry_the_compressor(tmp_path):
  plan = PLANS["perceiver+tokenlearner"]
  model = PaliGemma(config(plan))
  params = model.init(jax.random.key(0), *inputs())["params"]
  path = str(tmp_path / "ckpt.npz")
  checkpoints.save_big_vision(path, params)
  model2, loaded = checkpoints.load_big_vision(path, plan=plan)
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, params))
  assert model2.config.plan == model.config.plan
  with pytest.raises(ValueError, match="unexpected"):  # a plan without those compressors
    checkpoints.load_big_vision(path)
  # Towers alone (a pretrained checkpoint): the compressors are missing as a whole, so the
  # loader takes the towers and `init_missing` adds fresh compressors.
  towers = {k: v for k, v in params.items() if k != "compressor"}
  checkpoints.save_big_vision(path, towers)
  model3, loaded = checkpoints.load_big_vision(path, plan=plan)
  assert "compressor" not in loaded
  full = learned.init_missing(model3, loaded, seed=0)
  assert jax.tree.map(jnp.shape, full) == jax.tree.map(jnp.shape, params)
  # A compressor only partly in the file is an error, naming what is missing.
  part = dict(flat(params))
  part.pop(next(k for k in part if k.startswith("compressor/post_vit_perceiver_16/")))
  checkpoints.save_big_vision(path, traverse_util.unflatten_dict(part, sep="/"))
  with pytest.raises(ValueError, match="missing"):
    checkpoints.load_big_vision(path, plan=plan)


def test_tokenlearner_for_clips_initialises_and_trains_on_clips():
  """A plan entry `frames=F` shapes TokenLearner's per-frame maps for F-frame clips: the loop's
  init (`loop.init_fn`, `learned.dummy_inputs`) runs the model on such a clip, so a train step
  on clips works; without it the init sees an image and a clip is refused by name."""
  entry = {"method": "tokenlearner", "budget": 8, "bottleneck_dim": 8}
  clip = jax.random.uniform(jax.random.key(3), (2, 4, 32, 32, 3), minval=-1, maxval=1)
  _, text, mask_ar = inputs()
  batch = {"image": clip, "text": text, "mask_ar": mask_ar, "mask_loss": mask_ar}
  model = PaliGemma(config((("post_vit", dict(entry, frames=4)),)))
  assert learned.dummy_inputs(model.config)[0].shape == (1, 4, 32, 32, 3)
  kernel = "compressor/post_vit_tokenlearner_8/map_out/kernel"
  assert learned.param_shapes(model.config)[kernel] == (8, 2)  # 8 tokens = 2 maps x 4 frames
  params = jax.jit(loop.init_fn(model, 0))()
  state = TrainState.create(apply_fn=model.apply, params=params,
                            tx=loop.make_optimizer(learned_config.get_config(
                                "tokenlearner,budget=8,smoke"), params))
  step = jax.jit(make_train_step(model))
  state, _ = step(state, batch)  # the warm-up's first step has learning rate 0
  state, metrics = step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  assert not np.array_equal(flat(state.params)[kernel], flat(params)[kernel])
  plain = PaliGemma(config((("post_vit", entry),)))
  assert learned.param_shapes(plain.config)[kernel] == (8, 8)  # initialised on an image
  with pytest.raises(ValueError, match="frames=4"):
    plain.apply({"params": jax.jit(loop.init_fn(plain, 0))()}, clip, text, mask_ar)
  two = config((("post_vit", dict(entry, frames=4)),
                ("post_proj", {"method": "tokenlearner", "budget": 4, "frames": 2})))
  with pytest.raises(ValueError, match="different frame counts"):
    learned.dummy_inputs(two)


def test_config_trains_only_the_compressor():
  """configs/learned.py freezes the towers by the loop's regex: steps of the real train step +
  optimizer move every compressor parameter and no tower parameter; the towers carry
  no optimizer state and get no gradient."""
  cfg = learned_config.get_config("tokenlearner,budget=8,smoke")
  cfg.model.img = dataclasses.asdict(IMG)
  cfg.model.llm = dataclasses.asdict(LLM)
  model = PaliGemma(loop.model_config(cfg))
  image, text, mask_ar = inputs()
  params = model.init(jax.random.key(0), image, text, mask_ar)["params"]
  trainable = loop.trainable_mask(params, cfg.trainable)
  assert {k for k, t in flat(trainable).items() if t} == {
      k for k in flat(params) if k.startswith("compressor/")}
  state = TrainState.create(apply_fn=model.apply, params=params,
                            tx=loop.make_optimizer(cfg, params))
  batch = {"image": image, "text": text, "mask_ar": mask_ar, "mask_loss": mask_ar}
  step = make_train_step(model, trainable=trainable)
  # The gradient the step takes: exactly zero on the towers, nonzero on the compressor.
  frozen = lambda p: jax.tree.map(lambda t, x: x if t else jax.lax.stop_gradient(x),
                                  trainable, p)
  from tcjax.train import loss_fn  # pylint: disable=g-import-not-at-top
  grads = flat(jax.jit(jax.grad(lambda p: loss_fn(model, frozen(p), batch)[0]))(params))
  moved = {k for k, g in grads.items() if float(jnp.abs(g).max()) > 0}
  compressor = {k for k in grads if k.startswith("compressor/")}
  # (The map logits' bias shifts a softmax: its gradient is zero up to rounding, either way.)
  assert compressor - {"compressor/post_vit_tokenlearner_8/map_out/bias"} <= moved <= compressor
  jstep = jax.jit(step)
  state2, _ = jstep(state, batch)  # the warm-up's first step has learning rate 0
  state2, metrics = jstep(state2, batch)
  before, after = flat(params), flat(state2.params)
  changed = {k for k in before if not bool((before[k] == after[k]).all())}
  assert changed == moved
  assert float(metrics["grad_norm"]) > 0
