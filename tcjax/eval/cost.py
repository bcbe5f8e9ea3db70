"""Measured cost of compiled programs: XLA's FLOP count per stage, latency and memory.

  stages = stage_flops(model, params, image, text, input_mask)   # analytic vs XLA, per example
  compiled = compile_program(fn, *args)                         # jax.stages.Compiled
  seconds = median_seconds(compiled, *args, reps=5)             # median after one warm-up call
  nbytes = program_bytes(compiled)                              # from memory_analysis()

`tcjax.eval.flops` counts the matrix products of a forward pass from its token counts; here the
same stages are compiled and XLA's `compiled.cost_analysis()` counts what the program really
does. XLA counts more: every elementwise op (norms, residual adds, GELU, RoPE, the softmax's
max / subtract / sum / divide, masks) is a FLOP per element, the compression methods' own work
and their signals (attention rows, received attention) are in, and exp / tanh / rsqrt are
counted apart as "transcendentals". Those are O(n d) per layer against the O(n d^2 + n^2 d) of
the products, so the two agree within a few percent at real widths (the ratio is measured in
tests/test_cost.py and experiments/bench_model.py). XLA counts a loop body once, whatever its trip
count: the towers' layer scans are therefore traced unrolled (`tcjax.nn.layers.unrolled_layers`),
and `stage_flops` reports the while loops left in each program ("loops"; 0 = every op counted).

Latency and memory are of one call of a compiled program on its inputs: `median_seconds` blocks
until the outputs are ready, `program_bytes` is the program's arguments + outputs + temporaries
- aliased bytes (XLA's buffer assignment, per device), an upper bound of what it holds at once.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable, Dict

import jax
import jax.numpy as jnp
import numpy as np

from tcjax.eval import flops
from tcjax.eval import runner
from tcjax.nn import layers as nl

STAGES = ("vit", "projector", "llm")


def compile_program(fn: Callable, *args) -> "jax.stages.Compiled":
  """`fn` (a jitted function, or a plain one to jit) compiled for `args` (arrays or
  ShapeDtypeStructs). A jitted function already called on such arguments is not compiled again:
  its executable comes from the cache."""
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  return jitted.lower(*args).compile()


def median_seconds(compiled: Callable, *args, reps: int = 5, warmup: int = 1) -> float:
  """Median wall time of `reps` calls of `compiled(*args)` after `warmup` calls, each call
  waited for (`block_until_ready`). Raises ValueError for reps < 1."""
  if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
    raise ValueError(f"reps must be a positive int, got {reps!r}")
  for _ in range(warmup):
    jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def program_bytes(compiled) -> int:
  """Bytes a compiled program holds at once, per device: arguments + outputs + temporaries -
  outputs aliasing arguments (`compiled.memory_analysis()`). Raises RuntimeError when the
  backend gives no memory analysis."""
  m = compiled.memory_analysis()
  if m is None:
    raise RuntimeError("this backend gives no memory_analysis() for the compiled program")
  return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
             - m.alias_size_in_bytes)


def xla_cost(fn: Callable, *args) -> Dict[str, float]:
  """XLA's count for `fn(*args)`, the towers' layer loops unrolled: {"flops",
  "transcendentals", "loops" (while loops left in the optimized program; their bodies are
  counted once)}. `fn` is traced afresh (a new jit), so a version traced before with its loops
  rolled is not reused. Raises RuntimeError when the backend gives no cost analysis."""
  with nl.unrolled_layers():
    compiled = jax.jit(lambda *a: fn(*a)).lower(*args).compile()  # a new function: traced here
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    raise RuntimeError("this backend gives no FLOP count in cost_analysis()")
  loops = sum(" while(" in line for line in compiled.as_text().splitlines())
  return {"flops": float(cost["flops"]), "transcendentals": float(cost.get("transcendentals", 0)),
          "loops": int(loops)}


def stage_flops(model, params, image, text, input_mask=None) -> Dict[str, Dict[str, float]]:
  """Prefill FLOPs per example of `model` (its plan acting) on one batch, per stage, analytic
  (`flops.prefill_flops` from the token counts the plan reports) and counted by XLA on the
  compiled stage:

    vit        `encode_image`: patch embedding, ViT layers, vit-stage entries, the plan's ViT
               signals; a clip's frames all count (analytic: once per frame);
    projector  `embed_image` from the encoded tokens: post_vit entries, the projector, post_proj
               entries (analytic: the projector's product only);
    llm        `prefill` from the projected tokens: decoder layers with the llm entries and their
               signals, logits of the last prompt token.

  Nothing runs: the stages are compiled on abstract inputs (`jax.eval_shape`).
  image: float[B, H, W, 3] or a clip float[B, F, H, W, 3]; text, input_mask: [B, T] (input_mask
  None: all valid). Returns {stage: {"analytic", "xla", "ratio" (xla / analytic),
  "transcendentals", "loops"}} for the three stages and "total".
  """
  text = jnp.asarray(text)
  if text.ndim != 2:
    raise ValueError(f"text must be int[B, T], got shape {text.shape}")
  batch, text_len = text.shape
  input_mask = (jnp.ones(text.shape, bool) if input_mask is None
                else jnp.asarray(input_mask).astype(bool))
  if np.shape(image)[0] != batch or input_mask.shape != text.shape:
    raise ValueError(f"image {np.shape(image)}, text {text.shape} and input_mask "
                     f"{input_mask.shape} must share the batch (and text its length)")
  mask_ar = jnp.zeros(text.shape, jnp.int32)
  v = {"params": params}

  def vit(v, image):
    return model.apply(v, image, method=model.encode_image)

  def projector(v, encoded, text, input_mask):
    return model.apply(v, None, text, mask_ar, input_mask, encoded=encoded,
                       method=model.embed_image)[1]

  def llm(v, tokens, text, input_mask):
    logits, cache, _ = model.apply(v, None, text, mask_ar, input_mask, image_tokens=tokens,
                                   method=model.prefill)
    return logits, cache

  # Abstract inputs of each stage: nothing runs.
  image = jax.ShapeDtypeStruct(np.shape(image), image.dtype)
  encoded = jax.eval_shape(vit, v, image)
  tokens = jax.eval_shape(projector, v, encoded, text, input_mask)
  xla = {"vit": xla_cost(vit, v, image),
         "projector": xla_cost(projector, v, encoded, text, input_mask),
         "llm": xla_cost(llm, v, tokens, text, input_mask)}

  counts = runner.token_counts(model, params, image, text, input_mask)
  cfg = model.config
  vit_tokens = counts["vit_tokens"]
  ana = flops.prefill_flops(cfg, text_len=text_len,
                            vit_tokens_per_layer=vit_tokens
                            if vit_tokens and len(vit_tokens) == cfg.img.depth else None,
                            image_tokens_to_llm=counts["image_tokens"],
                            llm_tokens_per_layer=counts["llm_tokens"],
                            vit_merged_per_layer=counts["vit_merged"])
  ana = dict(ana, vit=ana["vit"] * counts["frames"])
  out = {}
  for stage in STAGES:
    c = xla[stage]
    out[stage] = {"analytic": ana[stage], "xla": c["flops"] / batch,
                  "transcendentals": c["transcendentals"] / batch, "loops": c["loops"]}
  out["total"] = {k: sum(out[s][k] for s in STAGES)
                  for k in ("analytic", "xla", "transcendentals", "loops")}
  for c in out.values():
    c["ratio"] = c["xla"] / c["analytic"] if c["analytic"] else float("nan")
  return out
