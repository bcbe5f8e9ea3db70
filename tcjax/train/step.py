"""Compression-aware training step: the model's own forward (with its plan) under a next-token
loss on the suffix, as big_vision's PaliGemma trainer computes it.

Batch (a dict of arrays, batch axis first): image float[B, H, W, 3] (or a clip), text int32[B, T],
mask_ar int32[B, T], mask_loss int32[B, T] (1 on the suffix tokens to predict, EOS included),
optional input_mask bool[B, T].
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Tuple

import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from tcjax.nn.paligemma import PaliGemma


# flax's TrainState (step, apply_fn, params, tx, opt_state; `apply_gradients`): the optimizer
# travels with the state as a static field, so a step needs no optimizer argument.
TrainState = train_state.TrainState


LOSS_NORMS = ("example", "token")


def _check_loss_norm(loss_norm: str) -> None:
  if loss_norm not in LOSS_NORMS:
    raise ValueError(f"unknown loss_norm {loss_norm!r}; use one of {LOSS_NORMS}")


def cast_for_compute(params, image, compute_dtype):
  """(params, image) with their floating leaves cast to `compute_dtype` (None: unchanged)."""
  if compute_dtype is None:
    return params, image
  dt = jnp.dtype(compute_dtype)
  params = jax.tree.map(lambda p: p.astype(dt) if jnp.issubdtype(p.dtype, jnp.floating)
                        else p, params)
  image = image.astype(dt) if jnp.issubdtype(image.dtype, jnp.floating) else image
  return params, image


def answer_weight(batch: Dict[str, jax.Array]) -> jax.Array:
  """float32[B, T - 1]: 1 where the logits at position t predict an answer token (text[t + 1]
  marked by mask_loss), the positions every loss term of training reads."""
  return batch["mask_loss"][:, 1:].astype(jnp.float32)


def masked_mean(values: jax.Array, weight: jax.Array, loss_norm: str = "example") -> jax.Array:
  """The batch loss of per-position values float[B, K] under weights float[B, K] (0 / 1).

  "example": each example's weighted mean, then the mean over the examples with any weight;
  "token": one weighted mean over the whole batch. An all-zero weight gives 0.
  """
  _check_loss_norm(loss_norm)
  values = values.astype(jnp.promote_types(values.dtype, jnp.float32))
  weight = weight.astype(values.dtype)
  if loss_norm == "token":
    return (values * weight).sum() / jnp.maximum(weight.sum(), 1.0)
  per_example = weight.sum(axis=1)
  has_loss = (per_example > 0).astype(values.dtype)
  example_loss = (values * weight).sum(axis=1) / jnp.maximum(per_example, 1.0)
  return example_loss.sum() / jnp.maximum(has_loss.sum(), 1.0)


def next_token_nll(logits: jax.Array, text: jax.Array) -> jax.Array:
  """float32[B, T - 1]: -log p(text[t + 1]) under logits float[B, T, V] at position t."""
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.promote_types(logits.dtype, jnp.float32)),
                            axis=-1)
  return -jnp.take_along_axis(logp, text[:, 1:, None], axis=-1)[..., 0]


def loss_fn(model: PaliGemma, params, batch: Dict[str, jax.Array], *,
            compute_dtype=None, loss_norm: str = "example") -> Tuple[jax.Array, Dict]:
  """Next-token cross-entropy over the tokens `mask_loss` marks: (loss, metrics).

  Logits at position t predict text[t + 1] (big_vision: logits[:, :-1] vs text[:, 1:] weighted by
  mask_loss[:, 1:]). Examples with no loss token contribute nothing.
  loss_norm: "example" (default, big_vision's PaliGemma trainer): each example's mean over its
    own loss tokens, then the mean over the batch, so a one-token answer weighs as much as a
    thirty-token one. "token": one mean over every loss token of the batch, so long answers
    dominate the gradient (the bundled model's stages 1-5 were trained so; RESULTS.md).
    (`masked_mean`.)
  compute_dtype: e.g. "bfloat16": the forward runs on parameters and image cast to it (the
  parameters themselves, and so the gradients and the update, stay float32); the loss is
  float32 either way.
  """
  _check_loss_norm(loss_norm)
  params, image = cast_for_compute(params, batch["image"], compute_dtype)
  logits, aux = model.apply({"params": params}, image, batch["text"], batch["mask_ar"],
                            batch.get("input_mask"))
  weight = answer_weight(batch)
  loss = masked_mean(next_token_nll(logits, batch["text"]), weight, loss_norm)
  return loss, {"loss": loss, "tokens": weight.sum(),
                "image_tokens_kept": aux.get("image_tokens_kept")}


def make_train_step(model: PaliGemma, *, compute_dtype=None, trainable=None,
                    loss_norm: str = "example", loss=None
                    ) -> Callable[..., Tuple[TrainState, Dict]]:
  """`step(state, batch, *extra) -> (state, metrics)` for a `TrainState` (flax) holding the
  optimizer, pure: wrap it in `jax.jit` with shardings from `tcjax.parallel.param_shardings`
  (and `donate_argnums=0`) for data / FSDP parallel training.

  metrics: loss, tokens (loss tokens), grad_norm (over the trainable parameters), and what
  `loss` adds.
  compute_dtype, loss_norm: see `loss_fn`.
  trainable: optional pytree of bools shaped like the parameters (`loop.trainable_mask`):
    gradients flow only into True leaves. The frozen ones get a zero gradient through
    `stop_gradient`, so their backward pass (e.g. a whole frozen ViT) is never computed; the
    optimizer must leave them unchanged too (`loop.make_optimizer` does).
  loss: `loss(model, params, batch, *extra, compute_dtype=, loss_norm=) -> (loss, metrics)`,
    default `loss_fn`. `extra` (the step's arguments after the batch) is passed through
    as constants: nothing in it gets a gradient (e.g. a frozen teacher's outputs,
    `tcjax.train.distill`)."""

  _check_loss_norm(loss_norm)
  loss = loss_fn if loss is None else loss

  def frozen_cut(params):
    if trainable is None:
      return params
    return jax.tree.map(lambda t, p: p if t else jax.lax.stop_gradient(p), trainable, params)

  def step(state: TrainState, batch, *extra):
    (_, metrics), grads = jax.value_and_grad(
        lambda p: loss(model, frozen_cut(p), batch, *extra, compute_dtype=compute_dtype,
                       loss_norm=loss_norm),
        has_aux=True)(state.params)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    return state.apply_gradients(grads=grads), metrics

  return step
