"""Autoregressive generation with the KV cache: greedy or temperature sampling."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from tcjax.nn.paligemma import PaliGemma
from tcjax.parallel.mesh import like_batch


def generate(model: PaliGemma, params, image, prefix, *, max_new_tokens: int, plan=None,
             temperature: float = 0.0, rng=None, prefix_mask=None, eos_id: int = 1,
             pad_id: int = 0, image_tokens=None):
  """Generates `max_new_tokens` tokens after image + prompt: int32[B, max_new_tokens].

  Args:
    model, params: a `PaliGemma` and its parameters (`{"params": ...}` or the bare tree).
    image: float[B, H, W, 3] in [-1, 1] (or a clip float[B, F, H, W, 3]).
    prefix: int32[B, T] prompt (BOS, prefix, separator), attended bidirectionally.
    plan: a compression plan replacing the model's own (None keeps it).
    temperature: 0 = greedy (argmax); > 0 samples from softmax(logits / temperature) with `rng`.
    prefix_mask: bool[B, T], False on right padding (prompts of different lengths).
    eos_id, pad_id: an example that emitted `eos_id` continues with `pad_id`.
    image_tokens: projected image Tokens (`model.embed_image`'s) to start from instead of
      `image` (pass image=None): the plan's llm stage still acts, its earlier stages are done.
  """
  config, params, rng = _arguments(model, params, max_new_tokens=max_new_tokens, plan=plan,
                                   temperature=temperature, rng=rng)
  return _generate(config, params, image, prefix, prefix_mask, rng, max_new_tokens,
                   float(temperature), eos_id, pad_id, image_tokens)


def generate_programs(model: PaliGemma, params, image, prefix, *, max_new_tokens: int,
                      prefix_mask=None, eos_id: int = 1, pad_id: int = 0, image_tokens=None):
  """The two programs greedy `generate` runs on these inputs: {"prefill": (fn, args), "decode":
  (fn, args)}, each `fn(*args)` the jitted call `generate` makes (so timing them, or reading
  their `fn.lower(*args).compile()`, reuses the executables `generate` compiled instead of
  compiling others). The decode's args hold the prefill's outputs (the prefill runs once here).
  The decode program returns (tokens, steps): it stops once every example has emitted EOS, so
  its time / steps is the per-token decoding time.
  """
  config, params, rng = _arguments(model, params, max_new_tokens=max_new_tokens, plan=None,
                                   temperature=0.0, rng=None)
  pre_args = (config, params, image, prefix, prefix_mask, max_new_tokens, image_tokens)
  logits, cache = _prefill(*pre_args)
  dec_args = (_decoder_only(config), params, logits, cache, rng, max_new_tokens, 0.0, eos_id,
              pad_id)
  return {"prefill": (_prefill, pre_args), "decode": (_decode, dec_args)}


def _arguments(model, params, *, max_new_tokens, plan, temperature, rng):
  """(config, bare parameters, rng) of a `generate` call, its arguments checked."""
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) \
      or max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
  if not isinstance(temperature, (int, float)) or temperature < 0:
    raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
  if temperature > 0 and rng is None:
    raise ValueError("temperature > 0 samples: pass rng (a jax.random key)")
  if plan is not None:
    model = model.with_plan(plan)
  if isinstance(params, dict) and set(params) == {"params"}:
    params = params["params"]
  if rng is None:
    rng = jax.random.key(0)
  return model.config, params, rng


def _decoder_only(config):
  """The config the decoding loop is keyed on: the decoder's, without the plan."""
  return dataclasses.replace(config, plan=(), frame_chunks=1)


def _generate(config, params, image, prefix, prefix_mask, rng, max_new_tokens, temperature,
              eos_id, pad_id, image_tokens=None):
  """Prefill (image, plan, prompt) then the decoding loop, as two programs: the loop depends on
  the decoder and the cache's shapes only, so plans that leave the same cache (e.g. every
  decoder-side method at one budget, or every vision-side one) share one compiled loop; one
  program per plan compiled the loop again for each (~half of a sweep's compile time)."""
  logits, cache = _prefill(config, params, image, prefix, prefix_mask, max_new_tokens,
                           image_tokens)
  return _decode(_decoder_only(config), params, logits, cache, rng, max_new_tokens, temperature,
                 eos_id, pad_id)[0]


@functools.partial(jax.jit, static_argnums=(0, 5))
def _prefill(config, params, image, prefix, prefix_mask, max_new_tokens, image_tokens=None):
  """-> (logits float[B, V] of the last prompt token, the KV cache with room for
  max_new_tokens)."""
  model = PaliGemma(config)
  prefix = jnp.asarray(prefix)
  mask_ar = jnp.zeros(prefix.shape, jnp.int32)
  logits, cache, _ = model.apply({"params": params}, image, prefix, mask_ar, prefix_mask,
                                 cache_size=max_new_tokens, image_tokens=image_tokens,
                                 method=model.prefill)
  return logits, cache


@functools.partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
def _decode(config, params, logits, cache, rng, max_new_tokens, temperature, eos_id, pad_id):
  """Up to max_new_tokens greedy / sampled steps from the prefill's logits and cache ->
  (int32[B, max_new_tokens] tokens, pad_id after each example's EOS; int32[] steps run).

  The loop stops once every example has emitted EOS (a `while_loop` whose condition is
  computed on the device: no host round trip). Short answers are most of what a sweep decodes
  (1-5 tokens against max_new_tokens = 10), and a fixed-length `scan` ran every step anyway.
  The tokens are the same either way: after EOS an example only receives pad_id.
  """
  model = PaliGemma(config)
  variables = {"params": params}
  keys = jax.random.split(rng, max_new_tokens)
  batch = logits.shape[0]

  def running(carry):
    i, _, _, done, _ = carry
    return (i < max_new_tokens) & ~jnp.all(done)

  def step(carry):
    i, logits, cache, done, tokens = carry
    if temperature > 0:
      token = jax.random.categorical(keys[i], logits.astype(jnp.float32) / temperature, axis=-1)
    else:
      token = jnp.argmax(logits, axis=-1)
    token = jnp.where(done, pad_id, token).astype(jnp.int32)
    done = done | (token == eos_id)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], i, axis=1)
    logits, cache = model.apply(variables, token, cache, method=model.decode_step)
    return i + 1, logits, cache, done, tokens

  done = like_batch(jnp.zeros((batch,), bool), logits)
  tokens = like_batch(jnp.full((batch, max_new_tokens), pad_id, jnp.int32), logits)
  steps, _, _, _, tokens = jax.lax.while_loop(
      running, step, (jnp.int32(0), logits, cache, done, tokens))
  return tokens, steps


def clear_cache() -> None:
  """Drops `generate`'s compiled executables (one prefill per model config, plan and shape, one
  decoding loop per decoder and cache shape): a sweep over many plans releases each plan's once
  it is done, keeping the process's memory bounded."""
  _prefill.clear_cache()
  _decode.clear_cache()
