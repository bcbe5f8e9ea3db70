"""grain pipelines over the testbed: fixed-shape, tokenized batches, sharded per process.

A testbed stream is an infinite `grain.MapDataset` of batches. `families` is a cycle of P slots
in which a family may appear more than once to weight it: global example g of a modality is the
family f = `families[g % P]` with index (g // P) * c + k, where c is how often f appears in the
cycle and k how often before slot g % P (without repeats: index g // P), so no two slots ever
draw the same example (families of one modality share the image shape, so they mix within a
batch). Global batch b
holds examples [b * B, (b + 1) * B); process p of P reads only its contiguous share of it,
[b * B + p * B / P, b * B + (p + 1) * B / P), so the global batch is the processes' local batches
in process order - what `tcjax.parallel.global_batch_from_local` assembles on a `data`-sharded
batch axis. Streams of several modalities are mixed batch by batch (`grain.MapDataset.mix`) with
fixed weights, so a step sees one shape and the sequence of batches is a function of the config.

Batch (numpy, per process): image float32[b, (F,) 64, 64, 3], text / mask_ar / mask_loss int32[b, T],
input_mask bool[b, T], family int32[b] (index into `testbed.ALL_FAMILIES`).
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import grain
import jax
import numpy as np

from tcjax.data import testbed

_MAX_INDEX = 2 ** 40  # a stream is unbounded in practice; grain needs a length


def _process(process_index, process_count):
  p = jax.process_index() if process_index is None else int(process_index)
  n = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= p < n:
    raise ValueError(f"process_index {p} is not in [0, {n})")
  return p, n


def tokenize(tokenizer, prefix: str, suffix: Optional[str], max_len: int, *,
             truncate: bool = False) -> Dict[str, np.ndarray]:
  """One prompt -> text / mask_ar / mask_loss int32[T], input_mask bool[T] (right-padded).

  A prompt longer than max_len raises (the testbed's prompts must fit: a cut answer would be
  trained on or asked), unless truncate=True, which cuts it at the end as `Tokenizer.batch`
  does (user JSONL data, as documented there)."""
  b = tokenizer.batch([prefix], [suffix])
  n = b["text"].shape[1]
  if n > max_len and not truncate:
    raise ValueError(f"max_len={max_len} is shorter than the {n} tokens of prompt {prefix!r} -> "
                     f"{suffix!r}; raise data.max_len")
  b = tokenizer.batch([prefix], [suffix], max_len=max_len)  # padded as the tokenizer pads
  return {"text": b["text"][0], "mask_ar": b["mask_ar"][0], "mask_loss": b["mask_loss"][0],
          "input_mask": b["mask_input"][0].astype(bool)}


def _collate(examples: Sequence[Dict]) -> Dict[str, np.ndarray]:
  return {k: np.stack([e[k] for e in examples]) for k in examples[0]}


def testbed_stream(families: Sequence[str], tokenizer, *, split: str, seed: int,
                   batch_size: int, max_len: int, process_index: Optional[int] = None,
                   process_count: Optional[int] = None) -> grain.MapDataset:
  """Infinite MapDataset of this process's batches of one modality (see the module docstring).

  families: the cycle of families; repeat one to draw it more often, e.g. ("count", "digit",
    "digit") gives digit two examples in three.
  batch_size: the global batch; it must divide by the process count.
  """
  families = tuple(families)
  if not families:
    raise ValueError("families is empty")
  # slot -> (family, how often it appeared before this slot, how often in the cycle)
  slots = [(f, families[:s].count(f), families.count(f)) for s, f in enumerate(families)]
  shapes = {testbed.image_shape(f) for f in families}  # validates every family
  if len(shapes) > 1:
    raise ValueError(f"families {families} mix image shapes {sorted(shapes)}: one stream per "
                     f"modality (image, video, audio)")
  p, n = _process(process_index, process_count)
  if batch_size % n:
    raise ValueError(f"batch_size {batch_size} is not divisible by {n} processes")
  local = batch_size // n
  if split not in testbed.SPLITS:
    raise ValueError(f"unknown split {split!r}; splits: {testbed.SPLITS}")

  def make(local_index: int) -> Dict[str, np.ndarray]:
    b, j = divmod(int(local_index), local)
    g = b * batch_size + p * local + j
    fam, before, per_cycle = slots[g % len(slots)]
    ex = testbed.example(fam, split, seed, (g // len(slots)) * per_cycle + before)
    out = tokenize(tokenizer, ex["prefix"], ex["suffix"], max_len)
    out["image"] = ex["image"]
    out["family"] = np.int32(testbed.ALL_FAMILIES.index(fam))
    return out

  return (grain.MapDataset.range(_MAX_INDEX).map(make)
          .batch(local, drop_remainder=True, batch_fn=_collate))


def mixed_stream(streams: Sequence[grain.MapDataset], weights: Sequence[float]
                 ) -> grain.MapDataset:
  """Batches of several streams interleaved deterministically in proportion to `weights`."""
  if len(streams) != len(weights) or not streams:
    raise ValueError(f"{len(streams)} streams but {len(weights)} weights")
  if any(w <= 0 for w in weights):
    raise ValueError(f"weights must be > 0, got {list(weights)}")
  if len(streams) == 1:
    return streams[0]
  return grain.MapDataset.mix(list(streams), weights=[float(w) for w in weights])


def by_modality(families: Sequence[str]) -> Dict[str, tuple]:
  """families -> {modality: families of it}, in testbed order."""
  out: Dict[str, list] = {}
  for f in families:
    out.setdefault(testbed.modality(f), []).append(f)
  return {m: tuple(v) for m, v in out.items()}


def eval_batches(families: Sequence[str], tokenizer, *, split: str, seed: int, per_family: int,
                 batch_size: int, max_len: int):
  """Held-out examples as a list of (family, batch) with prompts only (suffix None) plus the
  reference answers and scenes: batch has image, text, mask_ar, input_mask, and the lists
  "answer", "scene"."""
  out = []
  for fam in families:
    exs = [testbed.example(fam, split, seed, i) for i in range(per_family)]
    for s in range(0, per_family, batch_size):
      chunk = exs[s:s + batch_size]
      toks = _collate([tokenize(tokenizer, e["prefix"], None, max_len) for e in chunk])
      out.append((fam, {"image": np.stack([e["image"] for e in chunk]), "text": toks["text"],
                        "mask_ar": toks["mask_ar"], "input_mask": toks["input_mask"],
                        "answer": [e["suffix"] for e in chunk],
                        "scene": [e["scene"] for e in chunk]}))
  return out
