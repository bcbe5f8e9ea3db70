"""Matryoshka (M3) training: nested pooling levels, one drawn per step by the loop
(`config.model.plan_choices`, configs/learned.py:m3)."""

import jax
import numpy as np
import pytest

import tcjax
from configs import learned as learned_config
from tcjax.train import loop


def test_levels_are_nested():
  """Each M3 level is the 2 x 2 size-weighted pooling of the level before it: features are the
  mean of the four children, every patch's token is the parent of its token one level up."""
  x = jax.random.normal(jax.random.key(0), (2, 256, 8))
  tokens = tcjax.Tokens.from_grid(x, (16, 16))
  levels = [tcjax.compress.pool(tokens, b) for b in learned_config.M3_LEVELS]
  for fine, coarse in zip(levels, levels[1:]):
    side = int(round(np.sqrt(fine.num_tokens)))
    xf = np.asarray(fine.x).reshape(2, side // 2, 2, side // 2, 2, 8)
    np.testing.assert_allclose(np.asarray(coarse.x),
                               xf.mean((2, 4)).reshape(2, -1, 8), atol=1e-5)
    np.testing.assert_allclose(np.asarray(coarse.size), 4 * np.asarray(fine.size).reshape(
        2, side // 2, 2, side // 2, 2).sum((2, 4)).reshape(2, -1) / 4)
    r, c = np.divmod(np.asarray(fine.src), side)
    np.testing.assert_array_equal(np.asarray(coarse.src), (r // 2) * (side // 2) + c // 2)


def test_the_loop_draws_every_level_reproducibly():
  cfg = learned_config.get_config("m3")
  choices = loop.plan_choices(cfg)
  assert [dict(p[0][1])["budget"] for p in choices] == list(learned_config.M3_LEVELS)
  draws = [loop.choice_for_step(cfg.seed, s, len(choices)) for s in range(1, 201)]
  assert draws == [loop.choice_for_step(cfg.seed, s, len(choices)) for s in range(1, 201)]
  counts = np.bincount(draws, minlength=len(choices))
  assert (counts > 20).all(), counts  # ~40 each
  assert draws != [loop.choice_for_step(cfg.seed + 1, s, len(choices)) for s in range(1, 201)]


def test_bad_plan_choices_are_refused():
  cfg = learned_config.get_config("m3")
  cfg.model.plan_choices = ((("post_vit", {"method": "pool", "budget": 64, "k": 2}),),)
  with pytest.raises(ValueError, match="unknown option"):
    loop.plan_choices(cfg)


def test_caft_draws_each_training_free_method_and_budget():
  """configs/learned.py:caft: one of pooling, VisionZip, ToMe, DivPrune at 64 / 32 / 16 tokens
  after the ViT per step (each plan valid), the whole model trainable, at a lower rate than a
  fresh compressor."""
  cfg = learned_config.get_config("caft")
  choices = loop.plan_choices(cfg)
  got = sorted((p[0][0], dict(p[0][1])["method"], dict(p[0][1])["budget"]) for p in choices)
  # Every method at every budget but pooling at 32, which no k x k window gives on 16 x 16.
  assert got == sorted(("post_vit", m, b) for m in ("pool", "visionzip", "tome", "divprune")
                       for b in (64, 32, 16) if (m, b) != ("pool", 32))
  # Each choice traces through the bundled model's architecture (abstractly: shapes only), so
  # none can fail at the step that draws it.
  model = tcjax.nn.PaliGemma(loop.model_config(cfg))
  params = jax.eval_shape(loop.init_fn(model, 0))
  image, text = jax.ShapeDtypeStruct((2, 64, 64, 3), np.float32), np.ones((2, 4), np.int32)
  for choice in choices:
    out = jax.eval_shape(lambda p, im, m=model.with_plan(choice): m.apply(
        {"params": p}, im, text, np.zeros_like(text)), params, image)
    assert jax.tree.leaves(out)[0].shape[0] == 2, choice
  with pytest.raises(ValueError, match="budget 32 is not reachable"):
    jax.eval_shape(lambda p, im: model.with_plan(
        (("post_vit", {"method": "pool", "budget": 32}),)).apply(
            {"params": p}, im, text, np.zeros_like(text)), params, image)
  assert cfg.trainable == ".*" and cfg.init == learned_config.BUNDLED
  assert cfg.optim.lr < learned_config.get_config("tokenlearner").optim.lr
  draws = [loop.choice_for_step(cfg.seed, s, len(choices)) for s in range(1, 601)]
  assert (np.bincount(draws, minlength=len(choices)) > 20).all()  # ~50 each in 600 steps
