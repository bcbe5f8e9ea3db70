"""Attention over a sequence-sharded token axis: ring attention and gathered-K/V attention.

Mask (big_vision prefix-LM rule): query i attends key j iff key j is valid and
cumsum(mask_ar)[j] <= cumsum(mask_ar)[i]. `mask_ar` is 0 on the bidirectional prefix and 1 on
causal (autoregressive) tokens. The per-token attributes (cumsum, valid) travel with the K/V
blocks around the ring, so no global mask is ever built.
Shapes: q float[B, T, H, Dh], k/v float[B, S, KVH, Dh] (H divisible by KVH: MHA / GQA / MQA).
Self-attention: T == S and q/k/v share the token axis sharded over `axis`.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from tcjax.parallel.mesh import unshard_axis


def _to(x, spec, mesh):
  """On Explicit meshes reshard x to `spec` (shard_map requires matching input specs)."""
  if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    return jax.sharding.reshard(x, NamedSharding(mesh, spec))
  return x


_NEG = -1e30


def pad_to_multiple(x: jax.Array, multiple: int, axis: int = 1, value=0):
  """Pad `axis` of x up to a multiple of `multiple` with `value`; returns (padded, old length)."""
  n = x.shape[axis]
  extra = (-n) % multiple
  if not extra:
    return x, n
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value), n


def _prep(q, k, v, mask_ar, kv_valid, positions, n_shards, mesh):
  b, t, h, dh = q.shape
  if k.shape[:2] != (b, t) or v.shape != k.shape or h % k.shape[2]:
    raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} mismatch")
  if mask_ar is None:
    mask_ar = jnp.zeros((b, t), jnp.int32)
  if kv_valid is None:
    kv_valid = jnp.ones((b, t), bool)
  if positions is None:
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  # Small [B, T] int attributes: the cumsum runs on a replicated token axis.
  cum = jnp.cumsum(unshard_axis(mask_ar.astype(jnp.int32), 1, mesh), axis=1)
  kv_valid = unshard_axis(kv_valid, 1, mesh)
  positions = unshard_axis(positions.astype(jnp.int32), 1, mesh)
  if t % n_shards:  # uneven: pad (on a replicated token axis) and mask the padding
    q, k, v = (unshard_axis(a, 1, mesh) for a in (q, k, v))
  q, k, v, cum, positions = (pad_to_multiple(a, n_shards)[0] for a in (q, k, v, cum, positions))
  kv_valid, _ = pad_to_multiple(kv_valid, n_shards, value=False)  # padding never attended
  return q, k, v, (cum, kv_valid, positions), t


def _scores(q, k, q_attr, k_attr, scale, softcap, window, local):
  """q [B,Tq,H,Dh], k [B,Tk,KVH,Dh] -> masked logits [B,KVH,G,Tq,Tk] (float32) and the mask.

  Attributes are (cumsum(mask_ar), valid, position) per token. With a `window` and `local`
  true (a traced bool: the layer is a sliding-window layer), a query also needs
  q_pos - k_pos < window unless both tokens are in the prefix (Gemma 2 as PaliGemma 2 runs it).
  """
  b, tq, h, dh = q.shape
  kvh = k.shape[2]
  qcum, _, qpos = q_attr
  kcum, kvalid, kpos = k_attr
  qg = q.reshape(b, tq, kvh, h // kvh, dh)
  acc = jnp.promote_types(jnp.result_type(q, k), jnp.float32)  # f32, or f64 for f64 inputs
  s = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=acc) * scale
  if softcap is not None:
    s = jnp.tanh(s / softcap) * softcap
  allowed = (kcum[:, None, :] <= qcum[:, :, None]) & kvalid[:, None, :]
  if window is not None:
    near = (qpos[:, :, None] - kpos[:, None, :] < window)
    near |= (qcum[:, :, None] == 0) & (kcum[:, None, :] == 0)
    allowed &= near | ~jnp.asarray(local)
  return jnp.where(allowed[:, None, None], s, _NEG), allowed


def _specs(batch_axis, axis):
  return P(batch_axis, axis, None, None), P(batch_axis, axis)


def ring_attention(q, k, v, *, mesh, axis: str = "seq", batch_axis=None,
                   mask_ar: Optional[jax.Array] = None, kv_valid: Optional[jax.Array] = None,
                   scale: Optional[float] = None, softcap: Optional[float] = None,
                   positions: Optional[jax.Array] = None, window: Optional[int] = None,
                   local=True):
  """Ring attention: each shard keeps its queries; K/V blocks (with their mask attributes) move
  one step around `axis` per iteration (`lax.ppermute`) and an online softmax accumulates.

  positions: int[B, T] RoPE positions (default 0..T-1), used by the sliding `window` (Gemma 2
  local layers; `local` may be a traced bool so one scan body serves both layer kinds).
  Returns float[B, T, H, Dh]; rows with no allowed key are 0. Uneven T is padded and masked."""
  n_shards = mesh.shape[axis]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  q, k, v, attrs, t = _prep(q, k, v, mask_ar, kv_valid, positions, n_shards, mesh)
  s4, s2 = _specs(batch_axis, axis)
  perm = [(i, (i + 1) % n_shards) for i in range(n_shards)]

  def local_fn(q, k, v, q_attr, k_attr, local):
    b, tq, h, dh = q.shape
    kvh = k.shape[2]
    dt = jnp.promote_types(q.dtype, jnp.float32)
    m = jnp.full((b, kvh, h // kvh, tq), _NEG, dt)
    l = jnp.zeros_like(m)
    acc = jnp.zeros((b, kvh, h // kvh, tq, dh), dt)

    def step(_, carry):
      m, l, acc, k, v, k_attr = carry
      s, allowed = _scores(q, k, q_attr, k_attr, scale, softcap, window, local)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.where(allowed[:, None, None], jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      l = l * corr + p.sum(-1)
      acc = acc * corr[..., None] + jnp.einsum("bkgts,bskd->bkgtd", p, v.astype(dt))
      k, v, k_attr = jax.tree.map(lambda a: jax.lax.ppermute(a, axis, perm), (k, v, k_attr))
      return m_new, l, acc, k, v, k_attr

    m, l, acc, *_ = jax.lax.fori_loop(0, n_shards, step, (m, l, acc, k, v, k_attr))
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, h, dh).astype(q.dtype)

  return _call(local_fn, mesh, q, k, v, attrs, local, s4, s2, t, axis)


def _call(fn, mesh, q, k, v, attrs, local, s4, s2, t, axis):
  """shard_map `fn(q, k, v, q_attr, k_attr, local)` with the token axis on `axis`."""
  attr_specs = (s2, s2, s2)
  f = jax.shard_map(fn, mesh=mesh, in_specs=(s4, s4, s4, attr_specs, attr_specs, P()),
                    out_specs=s4, check_vma=False)
  q, k, v = (_to(a, s4, mesh) for a in (q, k, v))
  attrs = tuple(_to(a, s2, mesh) for a in attrs)
  out = f(q, k, v, attrs, attrs, jnp.asarray(local))
  return out if out.shape[1] == t else unshard_axis(out, 1, mesh)[:, :t]


def gathered_kv_attention(q, k, v, *, mesh, axis: str = "seq", batch_axis=None,
                          mask_ar=None, kv_valid=None, scale=None, softcap=None,
                          positions=None, window=None, local=True):
  """Sharded queries attend all-gathered K/V (simple variant; K/V must fit one device)."""
  n_shards = mesh.shape[axis]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  q, k, v, attrs, t = _prep(q, k, v, mask_ar, kv_valid, positions, n_shards, mesh)
  s4, s2 = _specs(batch_axis, axis)

  def local_fn(q, k, v, q_attr, k_attr, local):
    b, tq, h, dh = q.shape
    k, v, k_attr = jax.tree.map(lambda a: jax.lax.all_gather(a, axis, axis=1, tiled=True),
                                (k, v, k_attr))
    s, allowed = _scores(q, k, q_attr, k_attr, scale, softcap, window, local)
    p = jax.nn.softmax(s, axis=-1) * allowed[:, None, None]
    out = jnp.einsum("bkgts,bskd->bkgtd", p, v.astype(p.dtype))
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tq, h, dh).astype(q.dtype)

  return _call(local_fn, mesh, q, k, v, attrs, local, s4, s2, t, axis)
