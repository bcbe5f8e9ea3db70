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


def loss_fn(model: PaliGemma, params, batch: Dict[str, jax.Array], *,
            compute_dtype=None, loss_norm: str = "example") -> Tuple[jax.Array, Dict]:
  """Next-token cross-entropy over the tokens `mask_loss` marks: (loss, metrics).

  Logits at position t predict text[t + 1] (big_vision: logits[:, :-1] vs text[:, 1:] weighted by
  mask_loss[:, 1:]). Examples with no loss token contribute nothing.
  loss_norm: "example" (default, big_vision's PaliGemma trainer): each example's mean over its
    own loss tokens, then the mean over the batch, so a one-token answer weighs as much as a
    thirty-token one. "token": one mean over every loss token of the batch, so long answers
    dominate the gradient (the bundled model's stages 1-5 were trained so; RESULTS.md).
  compute_dtype: e.g. "bfloat16": the forward runs on parameters and image cast to it (the
  parameters themselves, and so the gradients and the update, stay float32); the loss is
  float32 either way.
  """
  _check_loss_norm(loss_norm)
  text = batch["text"]
  image = batch["image"]
  if compute_dtype is not None:
    dt = jnp.dtype(compute_dtype)
    params = jax.tree.map(lambda p: p.astype(dt) if jnp.issubdtype(p.dtype, jnp.floating)
                          else p, params)
    image = image.astype(dt) if jnp.issubdtype(image.dtype, jnp.floating) else image
  logits, aux = model.apply({"params": params}, image, text, batch["mask_ar"],
                            batch.get("input_mask"))
  logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.promote_types(logits.dtype, jnp.float32)),
                            axis=-1)
  nll = -jnp.take_along_axis(logp, text[:, 1:, None], axis=-1)[..., 0]
  weight = batch["mask_loss"][:, 1:].astype(nll.dtype)
  count = weight.sum()
  if loss_norm == "token":
    loss = (nll * weight).sum() / jnp.maximum(count, 1.0)
  else:
    per_example = weight.sum(axis=1)
    has_loss = (per_example > 0).astype(nll.dtype)
    example_loss = (nll * weight).sum(axis=1) / jnp.maximum(per_example, 1.0)
    loss = example_loss.sum() / jnp.maximum(has_loss.sum(), 1.0)
  return loss, {"loss": loss, "tokens": count, "image_tokens_kept": aux.get("image_tokens_kept")}


def make_train_step(model: PaliGemma, *, compute_dtype=None, trainable=None,
                    loss_norm: str = "example"
                    ) -> Callable[[TrainState, Dict[str, jax.Array]], Tuple[TrainState, Dict]]:
  """`step(state, batch) -> (state, metrics)` for a `TrainState` (flax) holding the optimizer,
  pure: wrap it in `jax.jit` with shardings from `tcjax.parallel.param_shardings` (and
  `donate_argnums=0`) for data / FSDP parallel training.

  metrics: loss, tokens (loss tokens), grad_norm (over the trainable parameters).
  compute_dtype, loss_norm: see `loss_fn`.
  trainable: optional pytree of bools shaped like the parameters (`loop.trainable_mask`):
    gradients flow only into True leaves. The frozen ones get a zero gradient through
    `stop_gradient`, so their backward pass (e.g. a whole frozen ViT) is never computed; the
    optimizer must leave them unchanged too (`loop.make_optimizer` does)."""

  _check_loss_norm(loss_norm)

  def frozen_cut(params):
    if trainable is None:
      return params
    return jax.tree.map(lambda t, p: p if t else jax.lax.stop_gradient(p), trainable, params)

  def step(state: TrainState, batch):
    (_, metrics), grads = jax.value_and_grad(
        lambda p: loss_fn(model, frozen_cut(p), batch, compute_dtype=compute_dtype,
                          loss_norm=loss_norm),
        has_aux=True)(state.params)
    metrics = dict(metrics, grad_norm=optax.global_norm(grads))
    return state.apply_gradients(grads=grads), metrics

  return step
