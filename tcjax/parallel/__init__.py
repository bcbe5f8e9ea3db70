"""Pure distributed primitives: meshes, parameter rules, sharded top-k, ring attention."""

from tcjax.parallel.attention import gathered_kv_attention, pad_to_multiple, ring_attention
from tcjax.parallel.distributed import global_batch_from_local, initialize_distributed
from tcjax.parallel.mesh import (batch_reshape, constrain, context_mesh, make_mesh, mesh_axis,
                                 mesh_from_config, unshard_axis)
from tcjax.parallel.rules import param_shardings, param_specs, shard_activations, shard_params
from tcjax.parallel.topk import topk

__all__ = ["batch_reshape", "constrain", "context_mesh", "gathered_kv_attention",
           "global_batch_from_local", "initialize_distributed", "make_mesh", "mesh_axis",
           "mesh_from_config", "pad_to_multiple", "param_shardings", "param_specs",
           "ring_attention", "shard_activations", "shard_params", "topk", "unshard_axis"]
