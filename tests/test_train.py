"""Training step: the loss against a NumPy oracle, gradients against finite differences, and a
sharded step (FSDP rules, data + seq mesh, Auto and Explicit axes) equal to one device."""

import functools

import numpy as np
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import paligemma_ref as ref
from configs.sharding import PALIGEMMA_RULES
from tcjax.parallel import make_mesh, param_shardings
from tcjax.train import TrainState, loss_fn, make_train_step
from test_model import CONFIGS, inputs, make_params

FASTV = (("llm", {"method": "fastv", "layer": 2, "keep": 0.5}),)


def batch(seed=0, B=4):
  image, text, mask_ar = inputs(seed=seed, B=B)
  mask_loss = mask_ar.copy()  # the suffix is what the model learns to produce
  return {"image": image, "text": text, "mask_ar": mask_ar, "mask_loss": mask_loss}


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64)
                      if np.issubdtype(np.asarray(a).dtype, np.floating) else a, tree)


def _numpy_nll(flat, b):
  logits = ref.paligemma_logits(flat, CONFIGS[2], b["image"], b["text"], b["mask_ar"])
  logits = logits - logits.max(-1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return -np.take_along_axis(logp[:, :-1], b["text"][:, 1:, None], -1)[..., 0]


def _uneven(b):
  """The batch with answers of different lengths: example 0 keeps one loss token, example 1
  none (it must count for nothing), the others keep theirs."""
  ml = np.array(b["mask_loss"])
  first = np.argmax(ml[0] > 0)
  ml[0] = 0
  ml[0, first] = 1
  ml[1] = 0
  return dict(b, mask_loss=ml)


def test_loss_matches_numpy_reference():
  """Default: big_vision's per-example mean (each example's mean over its own loss tokens, then
  the mean over the examples that have one); "token": one mean over all loss tokens."""
  model, params, flat = make_params(CONFIGS[2])
  b = _uneven(batch(seed=1))
  nll = _numpy_nll(flat, b)
  w = b["mask_loss"][:, 1:]
  assert len(set(w.sum(1).tolist())) > 2  # the two norms differ on this batch
  loss, metrics = jax.jit(lambda p, b: loss_fn(model, p, b))(params, b)
  rows = [(nll[i] * w[i]).sum() / w[i].sum() for i in range(len(w)) if w[i].sum() > 0]
  np.testing.assert_allclose(float(loss), np.mean(rows), rtol=1e-5)
  assert int(metrics["tokens"]) == w.sum()
  token, _ = jax.jit(lambda p, b: loss_fn(model, p, b, loss_norm="token"))(params, b)
  np.testing.assert_allclose(float(token), (nll * w).sum() / w.sum(), rtol=1e-5)
  assert abs(float(token) - float(loss)) > 1e-3


def test_unknown_loss_norm_is_refused():
  model, params, _ = make_params(CONFIGS[2])
  with pytest.raises(ValueError, match="loss_norm"):
    loss_fn(model, params, batch(), loss_norm="sequence")
  with pytest.raises(ValueError, match="loss_norm"):
    make_train_step(model, loss_norm="mean")


def test_gradient_matches_finite_differences():
  model, params, _ = make_params(CONFIGS[1])
  b = batch(seed=2)
  with jax.enable_x64(True):
    params, b = _f64(params), _f64(b)
    # One compiled function gives the gradient and the shifted losses (one compilation, not two).
    f = jax.jit(jax.value_and_grad(lambda p: loss_fn(model.with_plan(FASTV), p, b)[0]))
    grads = f(params)[1]
    rng = np.random.default_rng(3)
    d = jax.tree.map(lambda a: rng.normal(size=a.shape), params)
    eps = 1e-6
    shift = lambda s: jax.tree.map(lambda a, v: a + s * eps * v, params, d)
    fd = (float(f(shift(1))[0]) - float(f(shift(-1))[0])) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, v)) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(d)))
  np.testing.assert_allclose(analytic, fd, rtol=1e-6)


@functools.lru_cache(maxsize=None)
def _one_device_step():
  """Inputs and the one-device result of the step below, computed once for both axis types
  (the same program either way: one compilation saved)."""
  model, params, _ = make_params(CONFIGS[2], seed=4)
  opt = optax.sgd(1.0)
  step = make_train_step(model.with_plan(FASTV))
  with jax.enable_x64(True):
    params, b = _f64(params), _f64(batch(seed=5))
    want_state, want = jax.device_get(jax.jit(step)(TrainState.create(apply_fn=model.apply, params=params, tx=opt), b))
  return opt, step, params, b, want_state, want


@pytest.mark.slow  # float64 forward + backward compiled for two meshes
@pytest.mark.parametrize("axis_type", ["auto", "explicit"])
def test_sharded_train_step_equals_one_device(axis_type):
  """Loss and one SGD step (new params = params - lr * gradients, so equal params mean equal
  gradients): (data 2, seq 4) mesh, FSDP parameter rules, a FastV plan; float64 so that 1e-5
  measures the program, not float32 reduction order."""
  opt, step, params, b, want_state, want = _one_device_step()
  with jax.enable_x64(True):
    mesh = make_mesh((("data", 2), ("seq", 4)), axis_types=axis_type)
    with jax.set_mesh(mesh):
      sp = jax.device_put(params, param_shardings(params, mesh, PALIGEMMA_RULES))
      sb = jax.device_put(b, NamedSharding(mesh, P("data")))
      got_state, got = jax.jit(step)(TrainState.create(apply_fn=None, params=sp, tx=opt), sb)
  np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-5)
  assert float(want["grad_norm"]) > 0.1
  for a, c in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(want_state.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(c), atol=1e-5, rtol=1e-5)


def test_training_reduces_the_loss():
  model, params, _ = make_params(CONFIGS[1], seed=6)
  m = model.with_plan((("post_vit", {"method": "pool", "budget": 4}),))
  opt = optax.adam(3e-3)
  step = jax.jit(make_train_step(m))
  state, b = TrainState.create(apply_fn=m.apply, params=params, tx=opt), batch(seed=7)
  losses = []
  for _ in range(15):
    state, metrics = step(state, b)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < 0.5 * losses[0] and int(state.step) == 15
