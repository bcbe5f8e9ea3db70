"""configs/distill.py:smoke trains: the bundled model teaching a compressed copy of itself, a
learned compressor and a lighter vision tower lowers the distillation loss in a few steps
(frozen parameters untouched), and the training loop runs a distillation from the config end to
end."""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import distill as distill_config
from tcjax.nn import learned
from tcjax.train import TrainState, distill, loop

import helpers

STEPS = 4


@pytest.fixture(scope="module")
def batch():
  return helpers.train_batch(distill_config.get_config("smoke"))


@pytest.fixture(scope="module")
def teacher():
  return loop.load_teacher(loop.distill_options(distill_config.get_config("smoke")))


@pytest.mark.parametrize("arg", ["pool,smoke", "perceiver,smoke", "light,smoke"])
def test_a_few_steps_lower_the_distillation_loss(arg, batch, teacher):
  cfg = distill_config.get_config(arg)
  cfg.total_steps = STEPS
  opts = loop.distill_options(cfg)
  tmodel, tp = teacher
  student, sp = loop.student_from_teacher(cfg, opts, tmodel, tp)
  sp = learned.init_missing(student, sp, seed=0)
  trainable = loop.trainable_mask(sp, cfg.trainable)
  state = TrainState.create(apply_fn=student.apply, params=sp, tx=loop.make_optimizer(cfg, sp))
  step = jax.jit(distill.make_distill_step(student, tmodel, opts, trainable=trainable,
                                           loss_norm=cfg.loss_norm), donate_argnums=0)
  before = jax.tree.map(np.array, sp)
  losses = []
  for _ in range(STEPS + 1):  # the first step only warms up; the last only reads the loss
    state, m = step(state, batch, tp)
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all(), losses
  # A fixed batch: 4 updates take 20% (light) to 75% (pool) off the loss.
  assert losses[-1] < 0.9 * losses[0], losses
  assert "kd" in m and ("image" in m) == (arg.startswith("light"))
  flat = lambda p: traverse_util.flatten_dict(p, sep="/")
  mask, after = flat(trainable), flat(jax.tree.map(np.asarray, state.params))
  for k, v in flat(before).items():
    if not mask[k]:
      np.testing.assert_array_equal(after[k], v, err_msg=k)


def test_the_loop_distils_from_the_config(tmp_path):
  """`loop.train` on configs/distill.py:light,smoke: the student (one ViT layer, patch 8) is
  what the run saves; every step logs the KD, the cross-entropy and the image term."""
  cfg = distill_config.get_config("light,smoke")
  cfg.total_steps = 2
  out = loop.train(cfg, str(tmp_path), progress=False)
  assert out["step"] == 2
  rows = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2]
  for r in rows:
    assert {"loss", "kd", "ce", "image"} <= set(r) and np.isfinite(r["loss"])
  with np.load(os.path.join(tmp_path, "checkpoint.npz")) as f:
    assert f["img/embedding/kernel"].shape[:2] == (8, 8)
    assert f["img/Transformer/encoderblock/LayerNorm_0/scale"].shape[0] == 1
