"""Parameter sharding by ordered regex rules over '/'-joined parameter paths (first match wins).

A rule is `(regex, tactic)` with tactic one of:
  "fsdp"       shard the largest axis divisible by the fsdp mesh axis size over it
               (replicated if none divides);
  "replicate"  fully replicated;
  a PartitionSpec (or tuple of axis names / None) for tensor parallelism, given explicitly.
A parameter no rule matches is an error: add a catch-all `(".*", "replicate")` to opt out.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


def _path_str(path) -> str:
  parts = []
  for p in path:
    for attr in ("key", "name", "idx"):
      if hasattr(p, attr):
        parts.append(str(getattr(p, attr)))
        break
    else:
      parts.append(str(p))
  return "/".join(parts)


def _fsdp_spec(shape, mesh, fsdp_axis) -> P:
  axes = fsdp_axis if isinstance(fsdp_axis, tuple) else (fsdp_axis,)
  size = int(np.prod([mesh.shape[a] for a in axes]))
  spec = [None] * len(shape)
  for i in sorted(range(len(shape)), key=lambda i: (-shape[i], i)):
    if shape[i] % size == 0 and shape[i] >= size:
      spec[i] = fsdp_axis
      break
  return P(*spec)


def param_specs(params, mesh, rules: Sequence, fsdp_axis="data"):
  """PartitionSpec tree for `params` (arrays or ShapeDtypeStructs) following `rules`."""
  compiled = [(re.compile(r), t) for r, t in rules]

  def one(path, leaf):
    name = _path_str(path)
    for rx, tactic in compiled:
      if rx.fullmatch(name) or rx.search(name):
        if tactic == "replicate":
          return P()
        if tactic == "fsdp":
          return _fsdp_spec(np.shape(leaf), mesh, fsdp_axis)
        spec = tactic if isinstance(tactic, P) else P(*tactic)
        if len(spec) > np.ndim(leaf):
          raise ValueError(f"rule {rx.pattern!r}: spec {spec} has more axes than {name} "
                           f"{np.shape(leaf)}")
        return spec
    raise ValueError(f"no sharding rule matches parameter {name!r}; add a rule or a catch-all"
                     " ('.*', 'replicate')")

  return jax.tree_util.tree_map_with_path(one, params)


def param_shardings(params, mesh, rules, fsdp_axis="data"):
  """NamedSharding tree (for `jax.jit` in_shardings / out_shardings)."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s),
                      param_specs(params, mesh, rules, fsdp_axis),
                      is_leaf=lambda x: isinstance(x, P))


def shard_params(params, mesh, rules, fsdp_axis="data"):
  """Place `params` on `mesh` following `rules`."""
  return jax.device_put(params, param_shardings(params, mesh, rules, fsdp_axis))


def shard_activations(x: jax.Array, mesh, batch_axis="data", seq_axis="seq"):
  """Annotate `x: [B, N, ...]` with B on `batch_axis` and N on `seq_axis` (None to skip).

  Explicit axes: `reshard`; Auto axes: `with_sharding_constraint`. Axes missing from the mesh
  are dropped.
  """
  b = batch_axis if batch_axis in mesh.axis_names else None
  n = seq_axis if seq_axis in mesh.axis_names else None
  spec = P(b, n, *([None] * (x.ndim - 2)))
  sharding = NamedSharding(mesh, spec)
  explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
  if explicit and not isinstance(x, jax.core.Tracer):
    return jax.device_put(x, sharding)
  if explicit:
    return jax.sharding.reshard(x, sharding)
  return jax.lax.with_sharding_constraint(x, sharding)
