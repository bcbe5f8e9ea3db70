"""A few training steps of each learned compressor on the bundled model (towers frozen, as
configs/learned.py trains them) lower the loss on a testbed batch."""

import jax
import numpy as np
import pytest

from configs import learned as learned_config
from tcjax.nn import learned
from tcjax.train import TrainState, make_train_step
from tcjax.train import loop

import helpers

STEPS = 6


@pytest.fixture(scope="module")
def batch():
  return helpers.train_batch(learned_config.get_config("tokenlearner"))


@pytest.mark.parametrize("method", sorted(learned_config.DEFAULT_STAGE))
def test_a_few_steps_lower_the_loss(method, batch):
  cfg = learned_config.get_config(method)
  cfg.optim.lr = 3e-3
  cfg.optim.warmup_steps = 1
  cfg.total_steps = STEPS
  model, params = loop.load_init(cfg.init, plan=loop.model_config(cfg).plan)
  params = learned.init_missing(model, params, seed=0)
  trainable = loop.trainable_mask(params, cfg.trainable)
  state = TrainState.create(apply_fn=model.apply, params=params,
                            tx=loop.make_optimizer(cfg, params))
  step = jax.jit(make_train_step(model, trainable=trainable))
  losses = []
  for _ in range(STEPS + 1):  # the last call only reads the loss of the trained parameters
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  assert np.isfinite(losses).all(), losses
  # The first step only warms up (lr 0 at step 0). TokenLearner starts lowest (its slots are
  # convex mixes of ViT features, in the projector's distribution): ~5% in 5 updates, the
  # others 10% or more.
  assert losses[-1] < 0.97 * losses[0], losses
  towers = lambda p: {k: v for k, v in p.items() if k != "compressor"}
  jax.tree.map(np.testing.assert_array_equal, towers(state.params), towers(params))
