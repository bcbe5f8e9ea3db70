"""Orbax save / restore of tcjax parameter trees (`ocp.StandardCheckpointer`, params only)."""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np

from tcjax.checkpoints import tree as _tree


def save_orbax(path, params: Any, *, force: bool = False) -> None:
  """Saves `params` (a nested dict of arrays) to the directory `path` (absolute or relative).

  force: overwrite an existing checkpoint directory.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(os.fspath(path))
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(path, params, force=force)
    ckptr.wait_until_finished()


def restore_orbax(path, like: Optional[Any] = None) -> Any:
  """Restores a tree written by `save_orbax`.

  like: optional tree of arrays / `jax.ShapeDtypeStruct`s (e.g. `jax.eval_shape` of the model's
    init): the restored tree is validated against it (one ValueError naming every missing,
    unexpected or mis-shaped leaf; nothing returned then), cast to its dtypes and placed with
    its shardings where it has them. None returns the tree as saved.
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top

  path = os.path.abspath(os.fspath(path))
  if not os.path.isdir(path):
    raise ValueError(f"no orbax checkpoint at {path!r}")
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(path)
    saved = _saved_shapes(meta)
    if like is not None:
      want = {k: tuple(np.shape(v)) for k, v in _tree.flatten(like).items()}
      _tree.check_flat({k: _Shape(s) for k, s in saved.items()}, want,
                       source=f"orbax checkpoint {path!r}")
      target = jax.tree.map(_as_struct, like)
      return ckptr.restore(path, target)
    return ckptr.restore(path)


class _Shape:
  """Stands in for an array in shape checks, without reading data."""

  def __init__(self, shape):
    self.shape = tuple(shape)


def _saved_shapes(meta) -> dict:
  """{flat name: shape} from the checkpoint metadata (no array data read)."""
  tree = meta.item_metadata if hasattr(meta, "item_metadata") else meta
  tree = getattr(tree, "tree", tree)
  return {k: tuple(v.shape) for k, v in _tree.flatten(_to_dict(tree)).items()}


def _to_dict(x):
  if hasattr(x, "items"):
    return {k: _to_dict(v) for k, v in x.items()}
  return x


def _as_struct(x):
  if isinstance(x, jax.ShapeDtypeStruct):
    return x
  sharding = getattr(x, "sharding", None)
  return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
