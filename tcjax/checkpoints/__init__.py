"""Real checkpoints: big_vision `.npz`, HF safetensors, orbax.

  model, params = load_big_vision("pt_224.bf16.npz")          # config inferred from shapes
  model, params = load_hf("/path/to/save_pretrained_dir")     # config from config.json
  model, params = load_big_vision(path, mesh=mesh, rules=PALIGEMMA_RULES)  # sharded as read
  save_big_vision("out.npz", params, dtype="bfloat16")
  save_orbax("/ckpt/params", params); params = restore_orbax("/ckpt/params", like=params)

Every loader validates the whole tree first: missing, unexpected and wrongly shaped parameters
are named in one ValueError and nothing is loaded. Then parameters are read, cast and placed one
at a time (with mesh= and rules=, straight into their shardings), so the host never holds the
whole checkpoint.
"""

from tcjax.checkpoints.big_vision import infer_config, load_big_vision, read_npz, save_big_vision
from tcjax.checkpoints.hf import config_from_hf, load_hf
from tcjax.checkpoints.orbax_io import restore_orbax, save_orbax
from tcjax.checkpoints.tree import check_flat, flatten, param_shapes, unflatten

__all__ = [
    "check_flat", "config_from_hf", "flatten", "infer_config", "load_big_vision", "load_hf",
    "param_shapes", "read_npz", "restore_orbax", "save_big_vision", "save_orbax", "unflatten",
]
