"""User data as JSONL (the format of big_vision's PaliGemma fine-tuning colab).

One JSON object per line:

  {"image": "imgs/cat.png", "prefix": "caption en", "suffix": "a cat on a sofa"}

`suffix` may be absent (or null) for evaluation-only data; it is then None. A relative `image`
path is taken relative to the directory of the JSONL file. Blank lines are ignored; line
numbers in messages are 1-based physical lines of the file.

`image` is one of
  * an image file (anything PIL opens)  -> float32[S, S, 3]
  * a directory of frames (a clip): every non-hidden file in it, in sorted name order, is one
    frame                                -> float32[F, S, S, 3]
  * an `.npy` clip: uint8[F, H, W, 3] (0..255) or float[F, H, W, 3] already in [-1, 1]
                                         -> float32[F, S, S, 3]
with S = image_size; pixels are resized with PIL's bilinear filter and mapped to [-1, 1]
(x / 127.5 - 1 for 8-bit data).

Every record is checked when the file is read (`read_records`): a malformed line, a missing or
wrong-typed field, an unknown field, or an image that is missing or whose header PIL/numpy
cannot read is an error `data.jsonl:3: <what is wrong>`. `skip_bad=True` skips such records and
returns their messages instead, so nothing disappears without the caller seeing it. Images are
decoded only when an example is fetched; a file that fails then (e.g. truncated pixel data)
raises the same `file:line` error.

`dataset(...)` builds the grain pipeline

  source -> shuffle(seed) -> repeat(num_epochs) -> [process_index::process_count]
         -> tokenize + pad to max_len -> batch(batch_size)

whose elements are dicts
  image       float32[B, S, S, 3] (or [B, F, S, S, 3] for clips of F frames)
  text        int32[B, max_len]   prompt ids, padded with tokenizer.pad_id
  mask_ar     int32[B, max_len]   0 = prefix (full attention), 1 = suffix / padding
  mask_loss   int32[B, max_len]   1 on the suffix tokens and EOS
  input_mask  bool[B, max_len]    True on real tokens
  line        int32[B]            JSONL line of each example (to trace predictions back)
`B` is the batch of THIS process. Examples longer than max_len are cut at the end, as
`Tokenizer.batch` does.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import grain
import numpy as np
from PIL import Image

from tcjax.data import pipeline

KEYS_REQUIRED = ("image", "prefix")
KEYS_OPTIONAL = ("suffix",)
_KEYS = KEYS_REQUIRED + KEYS_OPTIONAL


# ----------------------------------------------------------------------------- images


def _frame_files(directory: str) -> List[str]:
  """Frames of a clip directory: its non-hidden regular files, sorted by name."""
  names = sorted(n for n in os.listdir(directory) if not n.startswith("."))
  return [os.path.join(directory, n) for n in names
          if os.path.isfile(os.path.join(directory, n))]


def _pil_to_float(img: Image.Image, size: int) -> np.ndarray:
  """PIL image -> float32[size, size, 3] in [-1, 1]."""
  img = img.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)
  return np.asarray(img, np.float32) / 127.5 - 1.0


def _read_image(path: str, size: int) -> np.ndarray:
  try:
    with Image.open(path) as img:
      return _pil_to_float(img, size)
  except Exception as e:  # PIL raises many types: UnidentifiedImageError, OSError, SyntaxError
    raise ValueError(f"cannot read image {path!r}: {e}") from e


def _check_npy_header(path: str) -> np.ndarray:
  """Opens an .npy clip without reading its data (mmap); checks dtype and shape."""
  try:
    arr = np.load(path, mmap_mode="r", allow_pickle=False)
  except Exception as e:
    raise ValueError(f"cannot read clip {path!r}: {e}") from e
  if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
    raise ValueError(f"clip {path!r} has shape {arr.shape}; expected [F, H, W, 3] with F >= 1")
  if arr.dtype != np.uint8 and not np.issubdtype(arr.dtype, np.floating):
    raise ValueError(f"clip {path!r} has dtype {arr.dtype}; expected uint8 or float")
  return arr


def _read_npy(path: str, size: int) -> np.ndarray:
  arr = np.asarray(_check_npy_header(path))
  if arr.dtype == np.uint8:
    return np.stack([_pil_to_float(Image.fromarray(np.ascontiguousarray(f)), size)
                     for f in arr])
  arr = arr.astype(np.float32)
  if not np.all(np.isfinite(arr)):
    raise ValueError(f"clip {path!r} holds NaN or inf")
  lo, hi = float(arr.min()), float(arr.max())
  if lo < -1.0 - 1e-5 or hi > 1.0 + 1e-5:
    raise ValueError(f"float clip {path!r} has values in [{lo:g}, {hi:g}]; float clips must "
                     "already be in [-1, 1] (store 0..255 pixels as uint8)")
  if arr.shape[1:3] == (size, size):
    return arr
  # Bilinear resize of each channel of each frame, in PIL's 32-bit float mode.
  out = np.empty((arr.shape[0], size, size, 3), np.float32)
  for f in range(arr.shape[0]):
    for c in range(3):
      ch = Image.fromarray(np.ascontiguousarray(arr[f, :, :, c]))
      out[f, :, :, c] = np.asarray(ch.resize((size, size), Image.Resampling.BILINEAR))
  return out


def load_image(path: str, size: int) -> np.ndarray:
  """Image file -> float32[size, size, 3]; clip (frame directory or .npy) ->
  float32[F, size, size, 3]; values in [-1, 1].

  Raises ValueError naming the file when it cannot be read.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    frames = _frame_files(path)
    if not frames:
      raise ValueError(f"clip directory {path!r} holds no frames")
    return np.stack([_read_image(f, size) for f in frames])
  if path.lower().endswith(".npy"):
    return _read_npy(path, size)
  return _read_image(path, size)


def _check_image(path: str) -> None:
  """Cheap readability check (headers only) used when the JSONL is read."""
  if os.path.isdir(path):
    frames = _frame_files(path)
    if not frames:
      raise ValueError(f"clip directory {path!r} holds no frames")
  elif path.lower().endswith(".npy"):
    _check_npy_header(path)
    return
  else:
    frames = [path]
  for f in frames:
    try:
      with Image.open(f):
        pass
    except Exception as e:
      raise ValueError(f"cannot read image {f!r}: {e}") from e


# ----------------------------------------------------------------------------- records


def _no_duplicate_keys(pairs):
  keys = [k for k, _ in pairs]
  dup = sorted({k for k in keys if keys.count(k) > 1})
  if dup:
    raise ValueError(f"duplicate key(s) {dup}")
  return dict(pairs)


def _parse(text: str, base: str) -> Dict[str, Any]:
  """One JSONL line -> {"image": resolved path, "prefix", "suffix"}; ValueError if bad."""
  try:
    obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
  except json.JSONDecodeError as e:
    raise ValueError(f"invalid JSON: {e}") from None
  if not isinstance(obj, dict):
    raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
  missing = [k for k in KEYS_REQUIRED if k not in obj]
  if missing:
    raise ValueError(f"missing key(s) {missing}")
  unknown = sorted(set(obj) - set(_KEYS))
  if unknown:
    raise ValueError(f"unknown key(s) {unknown}; allowed: {list(_KEYS)}")
  for k in _KEYS:
    v = obj.get(k)
    if k == "suffix" and v is None:
      continue
    if not isinstance(v, str):
      raise ValueError(f"{k!r} must be a string, got {type(v).__name__} {v!r}")
  if not obj["image"]:
    raise ValueError("'image' is empty")
  raw = obj["image"]
  path = os.path.normpath(os.path.join(base, raw))  # join keeps an absolute `raw` as is
  if not os.path.exists(path):
    where = "" if path == raw else f" (looked for {path})"
    raise ValueError(f"image {raw!r} not found{where}")
  _check_image(path)
  return {"image": path, "prefix": obj["prefix"], "suffix": obj.get("suffix")}


def read_records(path: str, *, skip_bad: bool = False) -> Tuple[List[Dict[str, Any]], List[str]]:
  """Reads and checks a JSONL file -> (records, bad).

  records: [{"image": path resolved against the file's directory, "prefix": str,
  "suffix": str | None, "line": int (1-based)}], in file order.
  bad: "file:line: reason" for every skipped record (only with skip_bad=True; otherwise the
  first bad record raises ValueError with that message).
  """
  path = os.fspath(path)
  base = os.path.dirname(os.path.abspath(path))
  records, bad = [], []
  with open(path, "rb") as f:
    for n, raw in enumerate(f, 1):
      if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte order mark
        raw = raw[3:]
      if not raw.strip():
        continue
      try:
        try:
          text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise ValueError(f"not valid UTF-8: {e}") from None
        rec = _parse(text, base)
      except ValueError as e:
        msg = f"{path}:{n}: {e}"
        if not skip_bad:
          raise ValueError(msg) from None
        bad.append(msg)
        continue
      rec["line"] = n
      records.append(rec)
  return records, bad


class JsonlSource:
  """grain random-access source over a JSONL file.

  source[i] -> {"image": float32[S, S, 3] or [F, S, S, 3], "prefix": str,
  "suffix": str | None, "line": int}; images are decoded on access.

  Attributes: path, image_size, records (see `read_records`), bad (skipped records' messages).
  """

  def __init__(self, path: str, *, image_size: int, skip_bad: bool = False):
    self.path = os.fspath(path)
    self.image_size = int(image_size)
    self.records, self.bad = read_records(self.path, skip_bad=skip_bad)

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i: int) -> Dict[str, Any]:
    rec = self.records[i]
    try:
      image = load_image(rec["image"], self.image_size)
    except ValueError as e:
      raise ValueError(f"{self.path}:{rec['line']}: {e}") from e
    return {"image": image, "prefix": rec["prefix"], "suffix": rec["suffix"],
            "line": rec["line"]}

  def __repr__(self) -> str:
    return (f"JsonlSource({self.path!r}, image_size={self.image_size}, "
            f"{len(self)} records, {len(self.bad)} skipped)")


# ----------------------------------------------------------------------------- pipeline




class _Tokenize(grain.transforms.Map):
  """Example -> image + prompt ids padded / cut to max_len (right padding, as Tokenizer.batch)."""

  def __init__(self, tokenizer, max_len: int):
    self.tokenizer = tokenizer
    self.max_len = int(max_len)

  def map(self, ex):
    return {"image": ex["image"], "line": np.int32(ex["line"]),
            **pipeline.tokenize(self.tokenizer, ex["prefix"], ex["suffix"], self.max_len,
                               truncate=True)}


def _stack(examples: Sequence[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
  """Stacks a batch; a clear error when images (e.g. clips of different length) differ."""
  shapes = {ex["image"].shape for ex in examples}
  if len(shapes) > 1:
    detail = ", ".join(f"line {int(ex['line'])}: {ex['image'].shape}" for ex in examples)
    raise ValueError(f"cannot batch images of different shapes ({detail})")
  return {k: np.stack([ex[k] for ex in examples])
          for k in ("image", "text", "mask_ar", "mask_loss", "input_mask", "line")}


def dataset(path: str, tokenizer, *, image_size: int, max_len: int, batch_size: int,
            seed: int = 0, shuffle: bool = True, num_epochs: Optional[int] = None,
            skip_bad: bool = False, process_index: Optional[int] = None,
            process_count: Optional[int] = None, drop_remainder: bool = True
            ) -> grain.MapDataset:
  """JSONL file -> grain.MapDataset of batches (see the module docstring for the keys).

  tokenizer: a `tcjax.tokenizer.Tokenizer` (anything with `prompt(prefix, suffix)` and
    `pad_id`).
  batch_size: examples per batch on this process.
  num_epochs: None repeats forever.
  process_index / process_count: default jax.process_index() / jax.process_count(); process
    p takes elements p, p + P, p + 2P, ... of the shuffled, repeated stream.
  skip_bad: skip bad records (their messages are in `source.bad`, logged here too) instead of
    raising.
  Call `.to_iter_dataset()` on the result to iterate; that iterator's get_state / set_state
  resume exactly.
  """
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
  if batch_size < 1 or max_len < 1:
    raise ValueError(f"batch_size={batch_size} and max_len={max_len} must be >= 1")
  source = JsonlSource(path, image_size=image_size, skip_bad=skip_bad)
  if source.bad:
    import logging  # pylint: disable=g-import-not-at-top
    logging.warning("%s: skipped %d bad record(s):\n  %s", source.path, len(source.bad),
                    "\n  ".join(source.bad))
  if not len(source):
    raise ValueError(f"{source.path}: no usable records ({len(source.bad)} skipped)")
  ds = grain.MapDataset.source(source)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds[process_index::process_count]
  ds = ds.map(_Tokenize(tokenizer, max_len))
  return ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=_stack)
