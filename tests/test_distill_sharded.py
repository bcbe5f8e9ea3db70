"""A distillation step sharded over a (data 2, seq 4) mesh with FSDP parameter rules equals the
same step on one device: the teacher's forward, the KD + feature losses and the student's update
all partition without changing a number (float64, so 1e-5 measures the program, not float32
reduction order)."""

import functools

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from configs.sharding import PALIGEMMA_RULES
from tcjax.parallel import make_mesh, param_shardings
from tcjax.train import TrainState, distill
from test_model import CONFIGS, make_params
from test_train import _f64, batch

# The student: the teacher's weights behind a pooling plan (16 of 64 patches), all three losses.
PLAN = (("post_vit", {"method": "pool", "budget": 16}),)
OPTS = distill.Options(alpha=0.5, temperature=2.0, hidden=0.5, image=0.0)


@functools.lru_cache(maxsize=None)
def _one_device():
  """Inputs and the one-device result, computed once for both axis types."""
  teacher, tparams, _ = make_params(CONFIGS[2], seed=11)
  student = teacher.with_plan(PLAN)
  opt = optax.sgd(1.0)
  step = distill.make_distill_step(student, teacher, OPTS)
  with jax.enable_x64(True):
    tparams = _f64(tparams)
    # The student starts away from the teacher, so every term has a gradient.
    sparams = jax.tree.map(lambda a: a * 1.1, tparams)
    b = _f64(batch(seed=12))
    state = TrainState.create(apply_fn=student.apply, params=sparams, tx=opt)
    want_state, want = jax.device_get(jax.jit(step)(state, b, tparams))
  return opt, step, sparams, tparams, b, want_state, want


@pytest.mark.slow  # float64 teacher + student forward and backward compiled for two meshes
@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_sharded_distill_step_equals_one_device(axis_type):
  opt, step, sparams, tparams, b, want_state, want = _one_device()
  assert float(want["kd"]) > 0 and float(want["hidden"]) > 0 and float(want["grad_norm"]) > 0.1
  with jax.enable_x64(True):
    mesh = make_mesh((("data", 2), ("seq", 4)), axis_types=axis_type)
    with jax.set_mesh(mesh):
      sp = jax.device_put(sparams, param_shardings(sparams, mesh, PALIGEMMA_RULES))
      tp = jax.device_put(tparams, param_shardings(tparams, mesh, PALIGEMMA_RULES))
      sb = jax.device_put(b, NamedSharding(mesh, P("data")))
      got_state, got = jax.jit(step)(TrainState.create(apply_fn=None, params=sp, tx=opt), sb, tp)
  for k in ("loss", "kd", "hidden"):
    np.testing.assert_allclose(float(got[k]), float(want[k]), rtol=1e-5, err_msg=k)
  for a, c in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5, rtol=1e-5)
