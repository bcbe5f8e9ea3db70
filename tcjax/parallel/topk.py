"""Exact two-stage top-k over a mesh-sharded last axis (local top-k, gather candidates, final top-k).

Tie order equals `lax.top_k` on the gathered array (lower global index first): each shard's local
top-k lists equal values lowest-index first, and candidates are gathered in shard order, so equal
candidates sit in the candidate array in global index order and the final `lax.top_k` keeps it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P


def topk(x: jax.Array, k: int, *, mesh, axis: str = "seq", batch_axis=None):
  """(values, int32 indices) of the k largest entries along the last axis of `x: float[..., N]`.

  The last axis is sharded over mesh axis `axis`; leading axes over `batch_axis` (a mesh axis
  name, a tuple, or None) for the first dim only. N must divide by the size of `axis`
  (pad with -inf and a validity mask upstream otherwise).
  """
  n_shards = mesh.shape[axis]
  n = x.shape[-1]
  if n % n_shards:
    raise ValueError(f"topk: last axis {n} must divide by mesh axis {axis!r} ({n_shards});"
                     " pad with -inf first")
  if not 0 < k <= n:
    raise ValueError(f"topk: k must be in [1, {n}], got {k}")
  n_local = n // n_shards
  k_local = min(k, n_local)
  lead = [None] * (x.ndim - 1)
  if lead and batch_axis is not None:
    lead[0] = batch_axis
  spec_in = P(*lead, axis)
  spec_out = P(*lead, None)

  def local(xs):
    vals, idx = jax.lax.top_k(xs, k_local)
    idx = idx.astype(jnp.int32) + jax.lax.axis_index(axis).astype(jnp.int32) * n_local
    vals = jax.lax.all_gather(vals, axis, axis=xs.ndim - 1, tiled=True)
    idx = jax.lax.all_gather(idx, axis, axis=xs.ndim - 1, tiled=True)
    v, j = jax.lax.top_k(vals, k)
    return v, jnp.take_along_axis(idx, j, axis=-1)

  f = jax.shard_map(local, mesh=mesh, in_specs=spec_in, out_specs=(spec_out, spec_out),
                    check_vma=False)
  if any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types):
    x = jax.sharding.reshard(x, NamedSharding(mesh, spec_in))
  return f(x)
