"""The training loop's optimizer (tcjax.train.loop.make_optimizer) under make_train_step: regex
freezing leaves other parameters bit-identical (and without optimizer state), gradient
accumulation over k micro-batches equals one step on their concatenation, the warm-up + cosine
learning rate follows a hand-written formula step by step (read off the updates), and a bfloat16
forward keeps the loss close and the parameters float32."""

import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import testbed as testbed_config
from tcjax.train import TrainState, make_train_step
from tcjax.train.loop import make_optimizer, trainable_mask
from tcjax.nn import GemmaConfig, PaliGemmaConfig, SiglipConfig
from test_model import inputs, make_params

# test_model's inputs() geometry (16 px images, ids < 50), with one layer per tower: the time
# here is compilation.
TINY = PaliGemmaConfig(
    img=SiglipConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=16),
    llm=GemmaConfig(version=1, vocab_size=50, width=24, depth=1, mlp_dim=48, num_heads=2,
                    num_kv_heads=1, head_dim=8))
ATTN = r"llm/layers/attn/.*"  # what configs/finetune.py trains
K, B = 2, 2  # gradient accumulation: K micro-batches of B examples


def config(**optim):
  """configs/testbed.py with a short schedule: update 0 has lr 0 (warm-up), update 1 the peak.
  clip_norm is tiny so that clipping acts (it must act on the accumulated gradient)."""
  c = testbed_config.get_config("smoke")
  c.total_steps = 10
  c.grad_accum = 1
  c.trainable = ATTN
  c.optim.update(dict(dict(lr=1e-3, warmup_steps=1, clip_norm=1e-3, weight_decay=1e-4), **optim))
  return c


def batch(seed):
  """K * B examples with the same number of loss tokens each (the 3 suffix tokens), so the
  mean of the micro-batch losses is the loss of the whole batch."""
  image, text, mask_ar = inputs(seed=seed, B=K * B)
  return {"image": image, "text": text, "mask_ar": mask_ar, "mask_loss": mask_ar.copy()}


def micro(b, i):
  return {k: v[i * B:(i + 1) * B] for k, v in b.items()}


def flat(tree):
  return traverse_util.flatten_dict(tree, sep="/")


def adam_state(opt_state):
  """The ScaleByAdamState inside the (possibly MultiSteps-wrapped) optimizer state."""
  found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(
      x, optax.ScaleByAdamState)) if isinstance(s, optax.ScaleByAdamState)]
  assert len(found) == 1
  return found[0]


@functools.lru_cache(maxsize=None)
def plain_run():
  """Two updates, each on a whole batch of K * B: (model, [state0, state1, state2], [metrics])."""
  model, params, _ = make_params(TINY, seed=21)
  tx = make_optimizer(config(), params)
  step = jax.jit(make_train_step(model))
  states, metrics = [TrainState.create(apply_fn=model.apply, params=params, tx=tx)], []
  for seed in (22, 23):
    s, m = step(states[-1], batch(seed))
    states.append(s)
    metrics.append(jax.device_get(m))
  return model, states, metrics


def test_only_the_trainable_regex_changes():
  _, states, metrics = plain_run()
  before, after = flat(jax.device_get(states[0].params)), flat(jax.device_get(states[2].params))
  trained = [k for k in before if re.fullmatch(ATTN, k)]
  assert sorted(trained) == ["llm/layers/attn/attn_vec_einsum/w", "llm/layers/attn/kv_einsum/w",
                             "llm/layers/attn/q_einsum/w"]
  for k in before:
    if k in trained:
      assert not np.array_equal(after[k], before[k]), k
    else:  # no update at all: not even weight decay (1e-4 here) touches them
      assert after[k].tobytes() == before[k].tobytes(), k
  assert all(np.isfinite(m["loss"]) and m["grad_norm"] > 0 for m in metrics)
  # Adam moments exist for the trained leaves only (frozen ones cost no optimizer memory).
  mu = adam_state(states[2].opt_state).mu
  assert sorted((k, v.shape) for k, v in flat(jax.device_get(mu)).items()
                if hasattr(v, "shape")) == sorted((k, before[k].shape) for k in trained)


def test_a_regex_that_matches_nothing_raises():
  _, params, _ = make_params(TINY, seed=21)
  for pattern in ("vision/.*", "llm/layers/attn"):  # the second only prefixes: fullmatch fails
    c = config()
    c.trainable = pattern
    with pytest.raises(ValueError, match="matches no parameter"):
      make_optimizer(c, params)
  mask = flat(trainable_mask(params, r"img/.*"))
  assert all(v == k.startswith("img/") for k, v in mask.items())


def test_gradient_accumulation_equals_one_big_batch():
  model, states, metrics = plain_run()
  c = config()
  c.grad_accum = K
  c.total_steps = 10 * K  # the same schedule, counted in updates
  tx = make_optimizer(c, states[0].params)
  step = jax.jit(make_train_step(model))
  s = TrainState.create(apply_fn=model.apply, params=states[0].params, tx=tx)
  for update, seed in enumerate((22, 23)):
    losses = []
    for i in range(K):
      prev = jax.device_get(s.params)
      s, m = step(s, micro(batch(seed), i))
      losses.append(float(m["loss"]))
      if i < K - 1:  # accumulating: the parameters do not move
        for a, b in zip(jax.tree.leaves(prev), jax.tree.leaves(jax.device_get(s.params))):
          assert a.tobytes() == b.tobytes()
    want = states[update + 1]
    np.testing.assert_allclose(np.mean(losses), metrics[update]["loss"], rtol=1e-6)
    # Adam's moments hold the (clipped) gradients: the mean of the micro-batch gradients,
    # clipped once, equals the big batch's gradient clipped.
    got_adam, want_adam = adam_state(s.opt_state), adam_state(want.opt_state)
    for a, b in zip(jax.tree.leaves((got_adam.mu, got_adam.nu)),
                    jax.tree.leaves((want_adam.mu, want_adam.nu))):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                 atol=1e-6 * float(np.abs(b).max()))
    assert int(got_adam.count) == update + 1
    for a, b in zip(jax.tree.leaves(s.params), jax.tree.leaves(want.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
  # The clipping acted: after the first update mu = (1 - b1) * g with |g| = clip_norm.
  mu1 = adam_state(states[1].opt_state).mu
  norm = float(optax.tree.norm(mu1)) / (1 - c.optim.b1)
  np.testing.assert_allclose(norm, c.optim.clip_norm, rtol=1e-5)
  assert metrics[0]["grad_norm"] > 10 * c.optim.clip_norm


def hand_lr(t, *, peak, warmup, total, end):
  """Linear warm-up from 0 to `peak` over `warmup` updates, then a half cosine down to `end` at
  update `total`, then `end`."""
  if t < warmup:
    return peak * t / warmup
  if t >= total:
    return end
  return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


@pytest.mark.parametrize("accum", [1, 3])
def test_learning_rate_schedule(accum):
  # b1 = b2 = 0 and no weight decay: Adam's update is -lr * g / (|g| + eps), i.e. -lr for g > 0,
  # so the updates read the learning rate off the real optimizer, update by update.
  peak, warmup, updates = 0.1, 3, 11
  c = config(lr=peak, warmup_steps=warmup, b1=0.0, b2=0.0, weight_decay=0.0, clip_norm=1e9,
             end_lr_fraction=0.02)
  c.total_steps, c.grad_accum, c.trainable = updates * accum, accum, ".*"
  params = {"llm": {"w": jnp.zeros(2)}}
  tx = make_optimizer(c, params)
  state = tx.init(params)
  update = jax.jit(tx.update)  # op by op, MultiSteps' conditionals take seconds per call
  g = {"llm": {"w": jnp.full(2, 0.5)}}
  got = []
  for micro_step in range((updates + 3) * accum):
    u, state = update(g, state, params)
    u = np.asarray(u["llm"]["w"])
    if (micro_step + 1) % accum:
      assert not u.any()  # still accumulating
    else:
      got.append(-float(u[0]) * (0.5 + 1e-8) / 0.5)
  want = [hand_lr(t, peak=peak, warmup=warmup, total=updates, end=0.02 * peak)
          for t in range(updates + 3)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-9)
  # Hand-worked points: 0 at the start, the peak after warm-up, the cosine's midpoint
  # (update 7: (7 - 3) / (11 - 3) = 1/2) halfway between peak and end, and the end value.
  assert got[0] == 0.0
  np.testing.assert_allclose([got[3], got[7], got[11], got[13]],
                             [0.1, (0.1 + 0.002) / 2, 0.002, 0.002], rtol=1e-5)


def test_bfloat16_compute():
  model, states, metrics = plain_run()
  c = config()
  tx = make_optimizer(c, states[0].params)
  step = jax.jit(make_train_step(model, compute_dtype="bfloat16"))
  s, m = step(TrainState.create(apply_fn=model.apply, params=states[0].params, tx=tx), batch(22))
  assert m["loss"].dtype == jnp.float32
  np.testing.assert_allclose(float(m["loss"]), metrics[0]["loss"], rtol=2e-2)
  assert float(m["loss"]) != metrics[0]["loss"]  # the forward really ran in bfloat16
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(s.params))
  mu, want = adam_state(s.opt_state).mu, adam_state(states[1].opt_state).mu
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(mu))
  # The bf16 gradient points where the float32 one does.
  a = np.concatenate([np.ravel(v) for v in jax.tree.leaves(mu)])
  b = np.concatenate([np.ravel(v) for v in jax.tree.leaves(want)])
  assert a @ b / (np.linalg.norm(a) * np.linalg.norm(b)) > 0.99
  # A second bf16 step (update 1, lr > 0) moves the trained weights and they stay float32.
  s2, _ = step(s, batch(23))
  q0 = states[0].params["llm"]["layers"]["attn"]["q_einsum"]["w"]
  q2 = s2.params["llm"]["layers"]["attn"]["q_einsum"]["w"]
  assert q2.dtype == jnp.float32 and not np.array_equal(np.asarray(q2), np.asarray(q0))


def test_frozen_parameters_get_no_gradient_and_no_backward_pass():
  """make_train_step(trainable=mask) with plain SGD (no optimizer-side freezing): frozen leaves
  stay bit-identical, trained leaves move by exactly -lr * their full-model gradient (from
  jax.grad of the loss, outside the step), grad_norm covers the trained leaves only, and the
  compiled step does less work than differentiating everything."""
  from tcjax.train import loss_fn
  model, params, _ = make_params(TINY, seed=21)
  mask = trainable_mask(params, r"llm/.*")
  b = batch(22)
  lr = 0.5
  full = jax.tree.map(np.asarray, jax.grad(lambda p: loss_fn(model, p, b)[0])(params))
  step = jax.jit(make_train_step(model, trainable=mask))
  state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(lr))
  new, m = step(state, b)
  want_norm = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2))
                          for g, t in zip(jax.tree.leaves(full), jax.tree.leaves(mask)) if t))
  np.testing.assert_allclose(float(m["grad_norm"]), want_norm, rtol=1e-5)
  after, grad = flat(jax.device_get(new.params)), flat(full)
  for k, p0 in flat(params).items():
    p1, g = after[k], grad[k]
    if k.startswith("llm/"):
      np.testing.assert_allclose(p1, np.asarray(p0) - lr * g, rtol=1e-5, atol=1e-7)
    else:
      assert np.asarray(p1).tobytes() == np.asarray(p0).tobytes(), k
  flops = lambda f: f.lower(state, b).compile().cost_analysis()["flops"]
  assert flops(step) < flops(jax.jit(make_train_step(model)))
