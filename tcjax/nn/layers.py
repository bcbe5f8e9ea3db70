"""Pure building blocks shared by the SigLIP and Gemma towers.

Axis legend: B batch, T query tokens, S key/value tokens, H query heads, K key/value heads
(H divisible by K: MHA / GQA / MQA), G = H // K query heads per key/value head, h head dim,
D model width, R selected query rows.

Everything here is a function of arrays and static Python values: no Flax, so the same code runs
under `jit`, `vmap`, `lax.scan` over stacked layers and `shard_map`.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Optional

import jax
import jax.numpy as jnp

from tcjax.parallel.mesh import batch_reshape, gather_params, sharded_axis

NEG_INF = -1e30  # finite "minus infinity": a fully masked row stays NaN-free


def compute_dtype(*xs):
  """At least float32 (bf16 / f16 inputs are normalised in float32; float64 stays float64)."""
  return jnp.promote_types(jnp.result_type(*xs), jnp.float32)


def layer_norm(x, scale, bias, eps):
  """LayerNorm over the last axis, computed in at least float32."""
  x32 = x.astype(compute_dtype(x))
  mu = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mu).mean(-1, keepdims=True)
  y = (x32 - mu) * jax.lax.rsqrt(var + eps)
  return (y * scale + bias).astype(x.dtype)


def rms_norm(x, scale, eps):
  """Gemma RMSNorm: x / rms(x) * (1 + scale) (scale stored without the +1, as in big_vision)."""
  x32 = x.astype(compute_dtype(x))
  y = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
  return (y * (1.0 + scale.astype(x32.dtype))).astype(x.dtype)


def gelu(x):
  """tanh-approximate GELU (SigLIP's and Gemma's activation)."""
  return jax.nn.gelu(x, approximate=True)


def rope(x, positions, base):
  """Rotary embedding on the two halves of the head dim (big_vision / Gemma convention).

  x: float[B, T, N, h]; positions: int[B, T] (any values: pruned tokens keep theirs).
  """
  half = x.shape[-1] // 2
  dt = compute_dtype(x)
  freq = base ** (-jnp.arange(half, dtype=dt) / half)
  angle = positions.astype(dt)[..., None, None] * freq  # [B, T, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  a, b = x[..., :half].astype(dt), x[..., half:].astype(dt)
  return jnp.concatenate([a * cos - b * sin, b * cos + a * sin], -1).astype(x.dtype)


def softcap(logits, cap: Optional[float]):
  return logits if not cap else jnp.tanh(logits / cap) * cap


def attention_logits(q, k, scale, cap):
  """float32[B, K, G, T, S] logits of q float[B, T, H, h] against k float[B, S, K, h]
  (float64 for float64 inputs)."""
  b, t, h, d = q.shape
  kh = k.shape[2]
  qg = batch_reshape(q, (b, t, kh, h // kh, d))
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=compute_dtype(q, k)) * scale
  return softcap(s, cap)


def attention(q, k, v, *, mask=None, bias=None, scale: float, cap: Optional[float] = None):
  """Multi-head attention, float[B, T, H, h].

  q: float[B, T, H, h]; k, v: float[B, S, K, h]; mask: bool[B, T, S] (True = may attend);
  bias: float[B, S] added to every query's logits for that key (ToMe's log(size)).
  Without soft-capping this is `jax.nn.dot_product_attention`, so the backend's fused kernel is
  used where it has one; Gemma 2's logit soft-cap is not expressible there and takes the
  explicit path, as does float64 (the fused path keeps its logits in float32).
  """
  if cap is None and q.dtype != jnp.float64:
    m = None if mask is None else mask[:, None]
    bb = None if bias is None else bias[:, None, None, :].astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bb, mask=m, scale=scale)
  b, t, h, d = q.shape
  s = attention_logits(q, k, scale, cap)
  if bias is not None:
    s = s + bias[:, None, None, None, :]
  if mask is not None:
    s = jnp.where(mask[:, None, None], s, NEG_INF)
  p = jax.nn.softmax(s, axis=-1)
  if sharded_axis(v, 1) is not None:
    # Keys sharded over an Explicit axis (a decode step over a sequence-sharded cache): the
    # contraction sums partial products across shards; the output is per example.
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v,
                     out_sharding=jax.sharding.PartitionSpec(sharded_axis(v, 0)))
  else:
    out = jnp.einsum("bkgts,bskd->btkgd", p.astype(v.dtype), v)
  return batch_reshape(out, (b, t, h, d))


def attention_rows(q_rows, k, *, mask=None, bias=None, scale: float, cap: Optional[float] = None,
                   per_head: bool = False):
  """Exact attention probabilities of a few query rows, averaged over heads: float32[B, R, S]
  (per_head: float32[B, H, R, S], the query heads in order).

  q_rows: float[B, R, H, h] (only the rows a method needs, e.g. the prompt tokens);
  k: float[B, S, K, h]; mask: bool[B, R, S]; bias: float[B, S]. The softmax is the layer's own
  (same scale, soft-cap, mask and bias), computed for R rows: O(R S), never the S x S matrix.
  """
  s = attention_logits(q_rows, k, scale, cap)
  if bias is not None:
    s = s + bias[:, None, None, None, :]
  if mask is not None:
    s = jnp.where(mask[:, None, None], s, NEG_INF)
  p = jax.nn.softmax(s, axis=-1)  # [B, K, G, R, S]
  if per_head:  # query head K * G + g is the g-th head of KV head K
    return batch_reshape(p, (p.shape[0], p.shape[1] * p.shape[2]) + p.shape[3:])
  return p.mean(axis=(1, 2))


def received_attention(q, k, *, key_mask=None, bias=None, scale: float, query_mask=None,
                       chunk: int = 256):
  """Mean attention each key receives from the valid queries, averaged over heads: float32[B, S].

  For towers without a [CLS] token (SigLIP) this is the "mean received attention" score. Query
  rows are processed `chunk` at a time (`lax.map`), so memory is O(chunk S), not O(T S).
  q: float[B, T, H, h]; k: float[B, S, K, h]; key_mask, query_mask: bool[B, S] / bool[B, T].
  """
  b, t, _, _ = q.shape
  if query_mask is None:
    query_mask = jnp.ones((b, t), bool)
  n_chunks = -(-t // chunk)
  pad = n_chunks * chunk - t
  qp = jnp.pad(q, ((0, 0), (0, pad), (0, 0), (0, 0)))
  qm = jnp.pad(query_mask, ((0, 0), (0, pad)))
  qp = batch_reshape(qp, (b, n_chunks, chunk) + q.shape[2:]).swapaxes(0, 1)
  qm = batch_reshape(qm, (b, n_chunks, chunk)).swapaxes(0, 1)
  mask = None if key_mask is None else key_mask[:, None, :]

  def one(args):
    qc, mc = args
    rows = attention_rows(qc, k, mask=mask, bias=bias, scale=scale)  # [B, chunk, S]
    return jnp.einsum("br,brs->bs", mc.astype(rows.dtype), rows)

  total = jax.lax.map(one, (qp, qm)).sum(0)
  return total / jnp.maximum(query_mask.sum(-1, keepdims=True), 1).astype(total.dtype)


def layer_params(stacked, layer):
  """Parameters of one layer (`layer` may be traced) out of a stack [L, ...], ready for compute
  (FSDP shards gathered on Explicit meshes)."""
  return gather_params(jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, 0, False),
                                    stacked))


_UNROLLED = contextvars.ContextVar("tcjax_unrolled_layers", default=False)


@contextlib.contextmanager
def unrolled_layers():
  """Inside this context, `scan_layers` traces its loops fully unrolled (straight-line code).

  For counting, not for running: XLA's `compiled.cost_analysis()` counts a loop body once,
  whatever its trip count, so a scanned tower of L layers reports the FLOPs of one layer
  (`tcjax.eval.cost.stage_flops` traces under this context). Only tracing reads the flag: a
  function jitted and traced before keeps its loops; trace a fresh function inside.
  """
  token = _UNROLLED.set(True)
  try:
    yield
  finally:
    _UNROLLED.reset(token)


def scan_layers(body, carry, stacked, lo: int, hi: int, xs=None, *, remat: bool = False):
  """`lax.scan` of `body(carry, (layer params, layer index, xs_l))` over layers [lo, hi).

  remat: recompute each layer's activations in the backward pass instead of keeping them
  (`jax.checkpoint`): training memory per layer drops to its inputs, for ~1/3 more compute.
  Under `unrolled_layers()` the loop is traced unrolled (same result, for cost counting).

  The loop indexes the full stacked parameters (one dynamic slice per layer, as a scan over
  them would do) instead of scanning a static slice `a[lo:hi]`, which XLA would copy first: a
  copy of every weight per call that made segmented decoding 3x slower.
  """
  def step(c, args):
    l, x_l = args
    return body(c, (layer_params(stacked, l), l, x_l))

  if remat:
    step = jax.checkpoint(step)
  return jax.lax.scan(step, carry, (jnp.arange(lo, hi), xs), unroll=True if _UNROLLED.get() else 1)
