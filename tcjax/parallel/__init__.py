"""Pure distributed primitives: meshes, parameter rules, sharded top-k, ring attention."""

from tcjax.parallel.mesh import batch_reshape, make_mesh, unshard_axis

__all__ = ["batch_reshape", "make_mesh", "unshard_axis"]
