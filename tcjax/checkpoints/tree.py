"""Flat-name views of PaliGemma parameter trees, and whole-tree validation.

Checkpoint formats name parameters by `/`-joined paths (`llm/layers/attn/q_einsum/w`); tcjax holds
them as nested dicts (the Linen `params` collection). Every loader converts a checkpoint to a flat
`{name: np.ndarray}` dict, validates the WHOLE dict against the shapes the model expects
(`param_shapes(config)`) and only then builds the nested tree, so a bad file never yields a
half-loaded model.

The expected tree is big_vision's (`big_vision/models/proj/paligemma`), layers stacked on a leading
axis L (scan):

  img/embedding/{kernel [p, p, 3, D], bias [D]}           conv stem, HWIO
  img/pos_embedding                     [1, N, D]         learned, N = (image_size / p)^2
  img/Transformer/encoderblock/         (all [L, ...])
      LayerNorm_0/{scale, bias} [D]     LayerNorm_1/{scale, bias} [D]
      MultiHeadDotProductAttention_0/{query, key, value}/{kernel [D, H, hd], bias [H, hd]}
      MultiHeadDotProductAttention_0/out/{kernel [H, hd, D], bias [D]}
      MlpBlock_0/Dense_0/{kernel [D, M], bias [M]}   MlpBlock_0/Dense_1/{kernel [M, D], bias [D]}
  img/Transformer/encoder_norm/{scale, bias} [D]
  img/head/{kernel [D, E], bias [E]}                      the projector into the LLM width E
  llm/embedder/input_embedding          [V, E]            tied output embedding
  llm/layers/                           (all [L, ...])
      pre_attention_norm/scale [E]      pre_ffw_norm/scale [E]
      attn/q_einsum/w [H, E, hd] and attn/kv_einsum/w [2, K, E, hd]   (K < H: MQA / GQA)
        or attn/qkv_einsum/w [3, H, E, hd]                            (K == H)
      attn/attn_vec_einsum/w [H, hd, E]
      mlp/gating_einsum [2, E, F]       mlp/linear [F, E]
      post_attention_norm/scale [E]     post_ffw_norm/scale [E]          (Gemma 2 only)
  llm/final_norm/scale [E]
  llm/frame_embedding                   [K, E]            tcjax only, with frame_embedding=K > 0

RMSNorm scales are stored WITHOUT the +1 (the model computes x * (1 + scale)), as in big_vision.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Mapping, Tuple

import numpy as np
from flax import traverse_util

from tcjax.nn.params import nest, param_shapes  # re-exported: the expected tree

Flat = Dict[str, Any]


def flatten(tree: Mapping[str, Any], prefix: str = "") -> Flat:
  """Nested dict -> {"a/b/c": leaf} (empty sub-dicts vanish); `prefix` is prepended as "prefix/"."""
  flat = traverse_util.flatten_dict(dict(tree), sep="/")
  return {f"{prefix}/{k}": v for k, v in flat.items()} if prefix else flat


unflatten = nest  # {"a/b/c": leaf} -> nested dict


class Deferred:
  """A parameter not read yet: its `shape` (all validation needs) and `read()` -> np.ndarray.

  Loaders hand these to `check_flat` and read them one at a time while placing them, so a
  checkpoint is never held on the host whole.
  """

  __slots__ = ("shape", "_read")

  def __init__(self, shape, read: Callable[[], np.ndarray]):
    self.shape = tuple(int(d) for d in shape)
    self._read = read

  def read(self) -> np.ndarray:
    return self._read()

  def __repr__(self):
    return f"Deferred(shape={self.shape})"


def read(leaf) -> np.ndarray:
  """The data of a flat-tree leaf: a `Deferred` is read now, anything else made an ndarray."""
  return leaf.read() if isinstance(leaf, Deferred) else np.asarray(leaf)


def _fmt(names, limit=50):
  names = sorted(names)
  more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
  return "\n    " + "\n    ".join(names[:limit]) + more


def check_flat(flat: Mapping[str, Any], expected: Mapping[str, Tuple[int, ...]], *,
               source: str = "checkpoint") -> None:
  """Raises ONE ValueError naming every missing, unexpected and wrongly shaped parameter.

  flat: {name: array-like with .shape}; expected: {name: shape}.
  """
  missing = [k for k in expected if k not in flat]
  unexpected = [k for k in flat if k not in expected]
  wrong = [f"{k}: got {tuple(np.shape(flat[k]))}, expected {tuple(expected[k])}"
           for k in expected if k in flat and tuple(np.shape(flat[k])) != tuple(expected[k])]
  if missing or unexpected or wrong:
    parts = [f"{source} does not match the model's parameter tree "
             f"({len(missing)} missing, {len(unexpected)} unexpected, {len(wrong)} wrong shape);"
             " nothing was loaded."]
    if missing:
      parts.append("missing:" + _fmt(missing))
    if unexpected:
      parts.append("unexpected:" + _fmt(unexpected))
    if wrong:
      parts.append("wrong shape:" + _fmt(wrong))
    raise ValueError("\n".join(parts))
