"""Mesh construction that always states axis types, and resharding helpers.

jax >= 0.9 gives `jax.make_mesh` Explicit axes and `jax.sharding.Mesh` Auto axes by default;
tcjax never relies on either default.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

import jax
import numpy as np
from jax.sharding import AxisType, PartitionSpec as P

AxisTypeLike = Union[str, AxisType]


def _axis_type(t: AxisTypeLike) -> AxisType:
  if isinstance(t, AxisType):
    return t
  try:
    return {"explicit": AxisType.Explicit, "auto": AxisType.Auto,
            "manual": AxisType.Manual}[t.lower()]
  except (KeyError, AttributeError):
    raise ValueError(f"axis_types entries must be 'explicit', 'auto' or an AxisType, got {t!r}")


def make_mesh(axes: Sequence[Tuple[str, int]], axis_types, devices=None) -> jax.sharding.Mesh:
  """A mesh over named axes, e.g. `make_mesh((("data", 2), ("seq", -1)), axis_types="explicit")`.

  Built by `jax.make_mesh`, which orders the devices by the physical topology (on TPU, so that
  neighbours along a mesh axis are neighbours on the interconnect); on GPU by device id, on CPU
  in the order of `devices`. A mesh smaller than the device count takes the first ones.

  Args:
    axes: (name, size) pairs; at most one size may be -1, meaning "the remaining devices".
    axis_types: one type for all axes ("explicit" / "auto" / AxisType) or one per axis. Required:
      the two JAX defaults differ, so tcjax always says which it means.
    devices: defaults to `jax.devices()`.
  """
  devices = list(jax.devices() if devices is None else devices)
  names = [name for name, _ in axes]
  sizes = [int(size) for _, size in axes]
  if len(set(names)) != len(names):
    raise ValueError(f"axes names must be unique, got {names}")
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one axis size may be -1, got {sizes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if known <= 0 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"axis sizes must be positive or -1, got {sizes}")
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide by the fixed axes {sizes}")
    sizes[sizes.index(-1)] = len(devices) // known
  total = int(np.prod(sizes))
  if total > len(devices):
    raise ValueError(f"mesh {dict(zip(names, sizes))} needs {total} devices, have {len(devices)}")
  if isinstance(axis_types, (str, AxisType)):
    axis_types = (axis_types,) * len(names)
  if len(axis_types) != len(names):
    raise ValueError(f"axis_types needs one entry per axis ({len(names)}), got {axis_types}")
  types = tuple(_axis_type(t) for t in axis_types)
  return jax.make_mesh(tuple(sizes), tuple(names), axis_types=types, devices=devices)


def sharded_axis(x: jax.Array, axis: int):
  """The mesh axis (a name or tuple of names) that `axis` of `x` is sharded over in its type,
  or None. Only Explicit mesh axes appear in the type; on Auto axes this is always None."""
  spec = getattr(jax.typeof(x).sharding, "spec", None)
  axis = axis % x.ndim
  return None if spec is None or len(spec) <= axis else spec[axis]


def unshard_axis(x: jax.Array, axis: int, mesh=None) -> jax.Array:
  """Make `axis` of `x` replicated before a sort / top-k along it.

  On Explicit mesh axes `lax.top_k` refuses a sharded operand; this reshards that one axis and
  keeps the others. On Auto axes (or outside a mesh) it is a no-op: XLA's partitioner decides.
  `mesh`: for callers without a context mesh (`jax.set_mesh`), e.g. `ring_attention(mesh=...)`.
  """
  if sharded_axis(x, axis) is None:
    return x
  return _reshard_axis(x, axis, None, mesh)


def match_batch(x: jax.Array, ref: jax.Array, axis: int = 0) -> jax.Array:
  """`x` with its batch axis (`axis`, 0 by default) sharded like `ref`'s axis 0 in its type, its
  other axes kept.

  On Explicit mesh axes a `vmap` over several arrays needs one sharding of the mapped axis
  (else "Mapped away dimension ... data vs None"); arrays that reach a function by different
  paths (a clip's tokens and the ViT signals, bookkeeping built replicated) may differ there.
  A no-op on Auto axes, outside a mesh, when the two already agree, and for anything but two
  jax arrays with batch axes of one size (left to the caller's checks).
  """
  if not (isinstance(x, jax.Array) and isinstance(ref, jax.Array) and x.ndim > axis
          and ref.ndim and x.shape[axis] == ref.shape[0]):
    return x
  want = sharded_axis(ref, 0)
  if sharded_axis(x, axis) == want:
    return x
  typed = ref if want is not None else x  # its (abstract) mesh: no context mesh needed
  return _reshard_axis(x, axis, want, jax.typeof(typed).sharding.mesh)


def _reshard_axis(x: jax.Array, axis: int, entry, mesh=None) -> jax.Array:
  """`x` resharded with spec entry `entry` (mesh axes or None) at `axis`, the others kept."""
  spec = getattr(jax.typeof(x).sharding, "spec", None) or ()
  new_spec = list(spec) + [None] * (x.ndim - len(spec))
  new_spec[axis % x.ndim] = entry
  target = P(*new_spec) if mesh is None else jax.sharding.NamedSharding(mesh, P(*new_spec))
  return jax.sharding.reshard(x, target)


def _dividing_axes(axes, dim: int, sizes):
  """The major part of mesh axes `axes` (a name or a tuple of names) whose device count divides
  `dim`, as a spec entry: a name, a tuple, or None when not even the first one divides."""
  keep, total = [], 1
  for n in ((axes,) if isinstance(axes, str) else tuple(axes)):
    if dim % (total * sizes[n]):
      break
    keep.append(n)
    total *= sizes[n]
  return None if not keep else keep[0] if len(keep) == 1 else tuple(keep)


def batch_reshape(x: jax.Array, shape: Sequence[int]) -> jax.Array:
  """Reshape `x` per example, keeping the sharding of the batch axis (axis 0).

  On Explicit mesh axes JAX cannot infer the sharding of a reshape that splits or merges axes;
  model and compression code only reshape within an example, or fold a clip's frames into the
  batch (`[B, T, ...] -> [B*T, ...]` and back), so axis 0 keeps its sharding (the batch stays the
  major part of a folded axis) and every other axis is replicated.
  """
  sharding = jax.typeof(x).sharding
  spec = getattr(sharding, "spec", None)
  if spec is None or all(s is None for s in spec):
    return x.reshape(shape)
  lead = spec[0]
  if lead is not None and shape[0] != x.shape[0]:
    # Unfolding [B*T] -> [B, T]: keep the major mesh axes of the batch spec that divide B.
    lead = _dividing_axes(lead, shape[0], dict(sharding.mesh.shape))
  return jax.lax.reshape(x, tuple(shape), out_sharding=P(lead, *([None] * (len(shape) - 1))))


def batch_shards(x: jax.Array) -> int:
  """How many devices axis 0 of `x` is split over in its type (1 on Auto axes or unsharded)."""
  axis = sharded_axis(x, 0)
  if axis is None:
    return 1
  sizes = dict(jax.typeof(x).sharding.mesh.shape)
  return int(np.prod([sizes[a] for a in ((axis,) if isinstance(axis, str) else axis)]))


def map_batch(fn, args, chunks: int, name: str = "chunks"):
  """`fn(*args)` for a batched `fn`, computed in `chunks` sequential steps (`lax.map`) over the
  batch (axis 0 of every leaf of `args`), so that one step holds 1/chunks of the working set.

  Step i takes examples i, i + chunks, i + 2 * chunks, ...: strided, so that with the batch
  sharded over the mesh every device works at every step. Returns what `fn` does, for the whole
  batch, in the original order. `name`: the caller's option for `chunks`, in the ValueError.
  """
  first = jax.tree.leaves(args)[0]
  b = first.shape[0]
  if chunks < 1 or b % chunks:
    raise ValueError(f"{name}={chunks} must be a positive divisor of the batch of {b}")
  if chunks == 1:
    return fn(*args)
  per = b // chunks
  if per == 1 and batch_shards(first) == 1:
    # One example per step: map over the batch axis itself. (With a size-1 axis added, XLA lays
    # the input out with that axis major and copies all of it into the loop: 72 MB per call
    # for vispruner at N=4096, batch 4.)
    step = lambda a: jax.tree.map(lambda o: o[0], fn(*jax.tree.map(lambda x: x[None], a)))
    return jax.lax.map(step, args)
  stride = lambda a: batch_reshape(a, (per, chunks) + a.shape[1:]).swapaxes(0, 1)
  out = jax.lax.map(lambda a: fn(*a), jax.tree.map(stride, args))
  return jax.tree.map(lambda a: a.swapaxes(0, 1).reshape((b,) + a.shape[2:]), out)


def mesh_from_config(cfg, devices=None) -> jax.sharding.Mesh:
  """Mesh from a config with `mesh` ((name, size), ...) and `axis_types` (str or per-axis)."""
  return make_mesh(tuple((str(n), int(s)) for n, s in cfg.mesh), cfg.axis_types, devices)


def context_mesh():
  """The mesh set with `jax.set_mesh(mesh)` (inside `jit`: its AbstractMesh), or None."""
  mesh = jax.sharding.get_abstract_mesh()
  return None if mesh.empty else mesh


def mesh_axis(mesh, name):
  """`name` if the mesh has that axis with more than one device, else None."""
  if mesh is None or name not in mesh.axis_names or dict(mesh.shape)[name] == 1:
    return None
  return name


def constrain(x: jax.Array, *axes) -> jax.Array:
  """Shard x's leading axes over the context mesh's axes `axes` (names, tuples of names, None).

  Names the mesh lacks (or has with one device) are dropped, so model code can always say
  `constrain(x, "data", "seq")`. A no-op without a context mesh. Auto axes get a
  `with_sharding_constraint` (uneven sizes are padded by XLA); Explicit axes a `reshard` over the
  major axes of each entry that divide evenly (6 frames over ("data", "seq") of a 2 x 4 mesh:
  "data" alone; none when the first does not divide).
  """
  mesh = context_mesh()
  if mesh is None:
    return x
  sizes = dict(mesh.shape)
  explicit = any(t == AxisType.Explicit for t in mesh.axis_types)
  spec = []
  for dim, a in zip(x.shape, axes):
    names = tuple(n for n in ((a,) if isinstance(a, str) else (a or ())) if mesh_axis(mesh, n))
    if not names:
      spec.append(None)
    elif explicit:
      spec.append(_dividing_axes(names, dim, sizes))
    else:
      spec.append(names[0] if len(names) == 1 else names)
  spec += [None] * (x.ndim - len(spec))
  if explicit:
    return jax.sharding.reshard(x, P(*spec))
  return jax.lax.with_sharding_constraint(x, P(*spec))


def like_batch(x: jax.Array, ref: jax.Array) -> jax.Array:
  """`x` resharded so its batch axis (axis 0) is sharded like `ref`'s and the rest replicated.

  On Explicit axes, ops over several arrays (concatenate, where, take) need one sharding; arrays
  built inside a function (masks, positions) start replicated. A no-op on Auto axes / no mesh.
  """
  mesh = context_mesh()
  if mesh is None or not any(t == AxisType.Explicit for t in mesh.axis_types):
    return x
  spec = getattr(jax.typeof(ref).sharding, "spec", None)
  want = P(spec[0] if spec else None, *([None] * (x.ndim - 1)))
  if getattr(jax.typeof(x).sharding, "spec", None) == want:
    return x
  return jax.sharding.reshard(x, want)


def gather_params(tree, skip=()):
  """Parameters replicated for compute: on Explicit axes FSDP-stored weights are all-gathered
  (`reshard` to P()) where they are used; Auto axes leave it to XLA. Subtrees under a key in
  `skip` (stacked layers, gathered one layer at a time inside the layer scan) stay as they are.
  """
  mesh = context_mesh()
  if mesh is None or not any(t == AxisType.Explicit for t in mesh.axis_types):
    return tree

  def one(node):
    if isinstance(node, dict):
      return {k: (v if k in skip else one(v)) for k, v in node.items()}
    spec = getattr(jax.typeof(node).sharding, "spec", None)
    if spec is None or all(s is None for s in spec):
      return node
    return jax.sharding.reshard(node, P())

  return one(tree)
