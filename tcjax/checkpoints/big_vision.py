"""big_vision PaliGemma `.npz` checkpoints: load into tcjax, save from tcjax.

Format (what big_vision's `utils.save_checkpoint` / the Kaggle PaliGemma files hold): one `np.savez`
archive, keys are `/`-joined Linen paths (`img/...`, `llm/...`, sometimes under a leading
`params/`), scanned layers stacked on a leading axis. Arrays are float32, float16, or bfloat16.
numpy has no bfloat16, so bf16 arrays are written as 2-byte void (`|V2`) records and come back as
`numpy.void`; we reinterpret their bytes with `ml_dtypes.bfloat16` (same bits, no conversion).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Dict, Optional, Tuple

import ml_dtypes
import numpy as np

from tcjax.checkpoints import tree as _tree
from tcjax.nn.config import GemmaConfig, PaliGemmaConfig, SiglipConfig

_DTYPES = {
    "float32": np.dtype(np.float32), "f32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16), "bf16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16), "f16": np.dtype(np.float16),
}

# Gemma 2 hyper-parameters that the weights do not reveal, keyed by (width, depth). The query
# scale of the 27B model is width / num_heads = 144, not its head_dim of 128.
_GEMMA2_QUERY_SCALAR = {(2304, 26): 256, (3584, 42): 256, (4608, 46): 144}


def as_numpy_dtype(dtype) -> Optional[np.dtype]:
  """"bf16" / "float32" / jnp.bfloat16 / np.float16 ... -> np.dtype (None stays None)."""
  if dtype is None:
    return None
  if isinstance(dtype, str):
    if dtype not in _DTYPES:
      raise ValueError(f"dtype={dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]
  return np.dtype(dtype)


def _from_npz(a: np.ndarray) -> np.ndarray:
  if a.dtype.kind == "V":
    if a.dtype.itemsize != 2:
      raise ValueError(f"cannot interpret a void array of item size {a.dtype.itemsize} "
                       "(only 2-byte bfloat16 is stored as void)")
    return a.view(ml_dtypes.bfloat16)
  return a


def file_name(path) -> str:
  """A path, or an open file's name, for error messages."""
  if isinstance(path, (str, os.PathLike)):
    return os.fspath(path)
  return str(getattr(path, "name", "<npz stream>"))


def _member_header(z, members, key: str, name: str):
  """(shape, dtype) of archive member `key` from its .npy header alone (no data read)."""
  member = key + ".npy" if key + ".npy" in members else key  # as NpzFile maps its keys
  try:
    with z.zip.open(member) as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, _, dtype = read_header(f)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(f"{name}: cannot read array {key!r} ({type(e).__name__}: {e})") from e
  if dtype.kind == "V" and dtype.itemsize != 2:
    raise ValueError(f"{name}: cannot read array {key!r} (cannot interpret a void array of item "
                     f"size {dtype.itemsize}; only 2-byte bfloat16 is stored as void)")
  return shape, dtype


def _read_member(z, key: str, name: str) -> np.ndarray:
  try:
    return _from_npz(z[key])
  except Exception as e:  # pylint: disable=broad-except
    # Damage inside a member surfaces as many types (BadZipFile on a CRC mismatch,
    # ValueError on a bad .npy header, tokenize.TokenError, zlib.error when compressed).
    raise ValueError(f"{name}: cannot read array {key!r} ({type(e).__name__}: {e})") from e


def open_npz(path):
  """Opens a big_vision `.npz` without reading its arrays -> (NpzFile, {name: tree.Deferred}).

  Shapes come from the members' .npy headers; each Deferred reads its one member when asked
  (bf16 viewed via ml_dtypes). Close the NpzFile (a context manager) once done reading.
  Raises ValueError naming the file (and the array) when the archive is damaged.
  """
  name = file_name(path)
  try:
    z = np.load(path, allow_pickle=False)
  except (FileNotFoundError, IsADirectoryError, PermissionError):
    raise  # not damage: OSError already names the path
  except Exception as e:  # pylint: disable=broad-except
    # A truncated zip is BadZipFile, an empty file EOFError, other bytes a pickle ValueError.
    raise ValueError(f"{name}: not a readable .npz archive ({type(e).__name__}: {e})") from e
  if not isinstance(z, np.lib.npyio.NpzFile):
    raise ValueError(f"{name}: holds a single .npy array, not a big_vision .npz archive")
  try:
    flat = {}
    members = set(z.zip.namelist())
    for k in z.files:
      shape, _ = _member_header(z, members, k, name)
      flat[k] = _tree.Deferred(shape, lambda k=k: _read_member(z, k, name))
  except BaseException:
    z.close()
    raise
  # Some exports keep the Linen collection name as a prefix.
  if flat and all(k.startswith("params/") for k in flat):
    flat = {k[len("params/"):]: v for k, v in flat.items()}
  return z, flat


def read_npz(path) -> Dict[str, np.ndarray]:
  """Reads a big_vision `.npz` into a flat {name: np.ndarray} (bf16 viewed via ml_dtypes).

  Raises ValueError naming the file (and the array) when the archive is damaged.
  """
  z, flat = open_npz(path)
  with z:
    return {k: v.read() for k, v in flat.items()}


def infer_config(flat: Dict[str, Any], *, plan=()) -> PaliGemmaConfig:
  """Reads a PaliGemmaConfig off the parameter shapes of a flat big_vision tree.

  Shapes fix every size; what they cannot show takes big_vision's PaliGemma values: Gemma's norm
  eps and RoPE base, and for Gemma 2 the attention soft-cap (50) and query scale. big_vision's
  PaliGemma 2 runs without Gemma 2's final-logit soft-cap and without a sliding window, so both
  stay off here (`load_hf` takes both from config.json instead).
  """
  def shape(name, rank):
    if name not in flat:
      raise ValueError(f"cannot infer the config: parameter {name!r} is missing; pass config=")
    s = tuple(np.shape(flat[name]))
    if len(s) != rank:
      raise ValueError(f"cannot infer the config: parameter {name!r} has shape {s}, "
                       f"expected {rank} dimensions")
    return s

  blk = "img/Transformer/encoderblock/"
  p, _, _, D = shape("img/embedding/kernel", 4)
  _, N, _ = shape("img/pos_embedding", 3)
  side = math.isqrt(N)
  if side * side != N:
    raise ValueError(f"img/pos_embedding has {N} positions, not a square grid; pass config=")
  L = shape(blk + "LayerNorm_0/scale", 2)[0]
  M = shape(blk + "MlpBlock_0/Dense_0/kernel", 3)[-1]
  H = shape(blk + "MultiHeadDotProductAttention_0/query/kernel", 4)[2]
  img = SiglipConfig(width=D, depth=L, mlp_dim=M, num_heads=H, patch_size=p,
                     image_size=side * p)

  V, E = shape("llm/embedder/input_embedding", 2)
  Lg = shape("llm/layers/pre_attention_norm/scale", 2)[0]
  F = shape("llm/layers/mlp/gating_einsum", 4)[-1]
  if "llm/layers/attn/qkv_einsum/w" in flat:
    _, _, Hg, _, hd = shape("llm/layers/attn/qkv_einsum/w", 5)
    K = Hg
  else:
    _, Hg, _, hd = shape("llm/layers/attn/q_einsum/w", 4)
    K = shape("llm/layers/attn/kv_einsum/w", 5)[2]
  version = 2 if "llm/layers/post_attention_norm/scale" in flat else 1
  extra = {}
  if version == 2:
    extra = dict(query_pre_attn_scalar=_GEMMA2_QUERY_SCALAR.get((E, Lg), hd),
                 attn_logits_softcap=50.0, final_logits_softcap=None, sliding_window=None)
  llm = GemmaConfig(version=version, vocab_size=V, width=E, depth=Lg, mlp_dim=F, num_heads=Hg,
                    num_kv_heads=K, head_dim=hd, **extra)
  # tcjax's frame table (PaliGemmaConfig.frame_embedding): absent from big_vision's files -> 0
  frames = shape("llm/frame_embedding", 2)[0] if "llm/frame_embedding" in flat else 0
  return PaliGemmaConfig(img=img, llm=llm, plan=tuple(plan), frame_embedding=frames)


def expected_shapes(config: PaliGemmaConfig, flat=None) -> Dict[str, Tuple[int, ...]]:
  """{flat name: shape} a checkpoint for `config` holds: the towers, and the subtree of every
  learned compressor of the plan (`compressor/<key>/...`) that `flat` has any array of (a
  compressor absent as a whole is left to `tcjax.nn.learned.init_missing`)."""
  from tcjax.nn import learned  # pylint: disable=g-import-not-at-top
  shapes = dict(_tree.param_shapes(config))
  extra = learned.param_shapes(config)
  if extra:
    keys = {k.split("/")[1] for k in (flat or {}) if k.startswith(learned.SUBTREE + "/")}
    shapes.update({k: s for k, s in extra.items() if k.split("/")[1] in keys})
  return shapes


def target_shardings(config: PaliGemmaConfig, mesh, rules, fsdp_axis="data", flat=None):
  """{flat name: NamedSharding} for `config`'s parameters under `rules`, from shapes alone
  (`flat`: the checkpoint's arrays, for its learned compressors; `expected_shapes`).

  None when neither `mesh` nor `rules` is given; ValueError when only one of them is.
  """
  if mesh is None and rules is None:
    return None
  if mesh is None or rules is None:
    raise ValueError("pass both mesh= and rules= to load into a sharding (or neither)")
  import jax  # pylint: disable=g-import-not-at-top
  from tcjax.parallel.rules import param_shardings  # pylint: disable=g-import-not-at-top

  # Rules match '/'-joined paths; a flat dict's one-key paths are exactly those names.
  shapes = {k: jax.ShapeDtypeStruct(s, np.float32)
            for k, s in expected_shapes(config, flat).items()}
  return param_shardings(shapes, mesh, rules, fsdp_axis)


def place(a: np.ndarray, sharding=None):
  """One host array on device: the default device, or split over `sharding` (each device gets
  only its own slice; on several hosts each fills only its addressable devices)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  if sharding is None:
    return jnp.asarray(a)
  return jax.make_array_from_callback(a.shape, sharding, lambda idx: a[idx])


def finish(flat: Dict[str, Any], config: PaliGemmaConfig, *, dtype=None,
           source: str = "checkpoint", mesh=None, rules=None, fsdp_axis="data"):
  """Validates a flat tree against `config`, then reads, casts and places it leaf by leaf.

  flat: {name: np.ndarray or tree.Deferred}. Only shapes are looked at before placing, and each
  leaf's host copy is dropped once placed, so with Deferred leaves at most one parameter is on
  the host at a time. mesh / rules / fsdp_axis: see `target_shardings`.
  Returns (model, params).
  """
  _tree.check_flat(flat, expected_shapes(config, flat), source=source)
  shardings = target_shardings(config, mesh, rules, fsdp_axis, flat)
  dt = as_numpy_dtype(dtype)
  placed = {}
  for k, leaf in flat.items():
    a = _tree.read(leaf)
    if dt is not None:
      a = a.astype(dt, copy=False)
    placed[k] = place(a, None if shardings is None else shardings[k])
    del a  # before the next read
  return make_model(config), _tree.unflatten(placed)


def make_model(config: PaliGemmaConfig):
  """The tcjax PaliGemma module for `config`."""
  from tcjax.nn import PaliGemma  # pylint: disable=g-import-not-at-top
  return PaliGemma(config)


def load_big_vision(path, config: Optional[PaliGemmaConfig] = None, *, dtype=None, plan=(),
                    mesh=None, rules=None, fsdp_axis="data") -> Tuple[Any, Dict[str, Any]]:
  """Loads a big_vision PaliGemma `.npz` -> `(model, params)`, one array at a time.

  Args:
    path: the `.npz` file (or an open binary file).
    config: the PaliGemmaConfig; None infers it from the parameter shapes (`infer_config`).
    dtype: cast every parameter to this ("float32", "bfloat16", np.float16, ...); None keeps
      the stored dtype (bf16 files give bf16 params).
    plan: compression plan for the inferred config (ignored when `config` is given).
    mesh, rules: place every parameter straight into its sharding under `rules` (as
      `tcjax.parallel.param_shardings`, e.g. configs/sharding.py's PALIGEMMA_RULES) on `mesh`,
      as it is read; the whole tree is never on one device. Both or neither.
    fsdp_axis: the mesh axis of the rules' "fsdp" tactic.

  Raises:
    ValueError naming every missing, unexpected and wrongly shaped key (nothing is loaded then),
    or naming the file (and the array) when the archive is damaged.
  """
  name = file_name(path)
  z, flat = open_npz(path)
  with z:  # the archive stays open while its members are read one by one
    if config is None:
      try:
        config = infer_config(flat)
      except ValueError as e:
        raise ValueError(f"big_vision checkpoint {name!r} ({len(flat)} arrays): {e}") from e
      if plan:  # outside the try: a bad plan is not the file's fault
        config = dataclasses.replace(config, plan=tuple(plan))
    return finish(flat, config, dtype=dtype, source=f"big_vision checkpoint {name!r}",
                  mesh=mesh, rules=rules, fsdp_axis=fsdp_axis)


def save_big_vision(path, params, *, dtype=None) -> None:
  """Writes tcjax `params` as a big_vision `.npz` (flat `/` keys, bf16 as 2-byte void).

  dtype: cast every parameter first ("float32", "bfloat16", ...); None keeps each leaf's dtype.
  """
  import jax  # pylint: disable=g-import-not-at-top

  if isinstance(params, dict) and set(params) == {"params"}:
    params = params["params"]
  dt = as_numpy_dtype(dtype)
  flat = {}
  for k, v in _tree.flatten(params).items():
    a = np.asarray(jax.device_get(v))
    if dt is not None:
      a = a.astype(dt)
    if a.dtype == np.dtype(ml_dtypes.bfloat16):
      a = a.view(np.dtype("V2"))  # what big_vision's bf16 files hold
    flat[k] = a
  if isinstance(path, (str, os.PathLike)):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **flat)
