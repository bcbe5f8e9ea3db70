"""The PaliGemma parameter tree (big_vision names, layers stacked on a leading axis) and its init.

`param_shapes(config)` is the single source of truth for names and shapes: the Linen module
declares exactly these parameters (`ParamTree`), and every checkpoint loader validates against
them. The towers' compute is written as pure functions over the nested dict, so a layer stack
can run as one `lax.scan` where token counts stay fixed and as separate calls where a
compression stage changes them, with the same stacked parameters either way.
"""

from __future__ import annotations

import re
from typing import Any, Dict, Mapping, Tuple

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from tcjax.nn.config import PaliGemmaConfig

__all__ = ["ParamTree", "init_param", "nest", "param_shapes", "sincos_2d"]


def param_shapes(config: PaliGemmaConfig) -> Dict[str, Tuple[int, ...]]:
  """The flat big_vision parameter names and shapes of a PaliGemma `config`."""
  v, g = config.img, config.llm
  D, L, M, H = v.width, v.depth, v.mlp_dim, v.num_heads
  if D % H:
    raise ValueError(f"img width {D} is not divisible by num_heads {H}")
  hd = D // H
  p = v.patch_size
  E = g.width
  s = {
      "img/embedding/kernel": (p, p, 3, D),
      "img/embedding/bias": (D,),
      "img/pos_embedding": (1, v.num_patches, D),
      "img/Transformer/encoder_norm/scale": (D,),
      "img/Transformer/encoder_norm/bias": (D,),
      "img/head/kernel": (D, E),
      "img/head/bias": (E,),
  }
  blk = "img/Transformer/encoderblock/"
  for ln in ("LayerNorm_0", "LayerNorm_1"):
    s[blk + ln + "/scale"] = (L, D)
    s[blk + ln + "/bias"] = (L, D)
  for name in ("query", "key", "value"):
    s[blk + f"MultiHeadDotProductAttention_0/{name}/kernel"] = (L, D, H, hd)
    s[blk + f"MultiHeadDotProductAttention_0/{name}/bias"] = (L, H, hd)
  s[blk + "MultiHeadDotProductAttention_0/out/kernel"] = (L, H, hd, D)
  s[blk + "MultiHeadDotProductAttention_0/out/bias"] = (L, D)
  s[blk + "MlpBlock_0/Dense_0/kernel"] = (L, D, M)
  s[blk + "MlpBlock_0/Dense_0/bias"] = (L, M)
  s[blk + "MlpBlock_0/Dense_1/kernel"] = (L, M, D)
  s[blk + "MlpBlock_0/Dense_1/bias"] = (L, D)

  Lg, Hg, K, hg, F = g.depth, g.num_heads, g.num_kv_heads, g.head_dim, g.mlp_dim
  s["llm/embedder/input_embedding"] = (g.vocab_size, E)
  s["llm/final_norm/scale"] = (E,)
  lay = "llm/layers/"
  norms = ["pre_attention_norm", "pre_ffw_norm"]
  if g.version == 2:
    norms += ["post_attention_norm", "post_ffw_norm"]
  for n in norms:
    s[lay + n + "/scale"] = (Lg, E)
  if K == Hg:
    s[lay + "attn/qkv_einsum/w"] = (Lg, 3, Hg, E, hg)
  else:
    s[lay + "attn/q_einsum/w"] = (Lg, Hg, E, hg)
    s[lay + "attn/kv_einsum/w"] = (Lg, 2, K, E, hg)
  s[lay + "attn/attn_vec_einsum/w"] = (Lg, Hg, hg, E)
  s[lay + "mlp/gating_einsum"] = (Lg, 2, E, F)
  s[lay + "mlp/linear"] = (Lg, F, E)
  if config.frame_embedding:  # rows added to visual tokens by frame (PaliGemmaConfig)
    s["llm/frame_embedding"] = (config.frame_embedding, E)
  return s


# name pattern -> (kind, fan-in axes counted from the end): the fan-in sets the init scale of a
# weight; norms, biases and position embeddings have fixed inits.
_FAN_IN = (
    (r"img/embedding/kernel$", (-4, -3, -2)),                       # [p, p, 3, D]
    (r"MultiHeadDotProductAttention_0/(query|key|value)/kernel$", (-3,)),  # [L, D, H, hd]
    (r"MultiHeadDotProductAttention_0/out/kernel$", (-3, -2)),      # [L, H, hd, D]
    (r"attn/attn_vec_einsum/w$", (-3, -2)),                         # [L, H, hd, E]
    (r"(kernel|_einsum/w|gating_einsum|mlp/linear)$", (-2,)),        # [.., in, out]
)


def init_param(name: str, key, shape, dtype=jnp.float32):
  """Random init of parameter `name` (flat big_vision path): LeCun-normal weights, zero biases,
  unit LayerNorm scales, zero RMSNorm scales (Gemma computes x * (1 + scale)), a zero frame
  table (a new table changes nothing until trained)."""
  if name.endswith("bias") or name.endswith("frame_embedding"):
    return jnp.zeros(shape, dtype)
  if name.endswith("scale"):
    return jnp.ones(shape, dtype) if name.startswith("img/") else jnp.zeros(shape, dtype)
  if name.endswith("pos_embedding"):
    return jax.random.normal(key, shape, dtype) / np.sqrt(shape[-1])
  if name.endswith("input_embedding"):
    return jax.random.normal(key, shape, dtype) / np.sqrt(shape[-1])
  for pattern, axes in _FAN_IN:
    if re.search(pattern, name):
      fan_in = int(np.prod([shape[a] for a in axes]))
      return jax.random.normal(key, shape, dtype) / np.sqrt(fan_in)
  raise ValueError(f"no init rule for parameter {name!r}")


def sincos_2d(grid: Tuple[int, int], width: int, temperature: float = 10_000.0) -> np.ndarray:
  """float32[h * w, width]: the fixed 2-D sine-cosine position table (big_vision's ViT option
  `posemb="sincos2d"`, as in MAE), patches in raster order.

  A quarter of the width each for sin(col w), cos(col w), sin(row w), cos(row w), with
  frequencies w = temperature ** -(k / (width / 4 - 1)), k = 0 .. width / 4 - 1. A shift by
  whole patches is a fixed rotation of this code, so attention can learn "the patch to my
  right" once for every position; a random learned table has to learn it per position pair.
  """
  h, w = grid
  if width % 4 or width < 8:
    raise ValueError(f"sincos_2d: width must be a multiple of 4 and >= 8, got {width}")
  quarter = width // 4
  omega = temperature ** -(np.arange(quarter) / (quarter - 1))
  rows, cols = np.mgrid[:h, :w]
  ay = rows.reshape(-1, 1) * omega[None]
  ax = cols.reshape(-1, 1) * omega[None]
  return np.concatenate([np.sin(ax), np.cos(ax), np.sin(ay), np.cos(ay)], 1).astype(np.float32)


def nest(flat: Mapping[str, Any]) -> Dict[str, Any]:
  """{"a/b/c": leaf} -> nested dict."""
  return traverse_util.unflatten_dict(dict(flat), sep="/")


def _spec(tree) -> Tuple:
  """Nested dict of shapes -> hashable nested tuples ((name, shape | subtree), ...)."""
  return tuple((k, _spec(v) if isinstance(v, dict) else tuple(v)) for k, v in sorted(tree.items()))


class ParamTree(nn.Module):
  """Declares a nested tree of parameters and returns it as a dict.

  spec: from `ParamTree.for_config`; prefix: flat path of this node (for the init rules).
  """

  spec: Tuple
  prefix: str

  @classmethod
  def for_config(cls, config: PaliGemmaConfig, tower: str, **kwargs) -> "ParamTree":
    shapes = {k[len(tower) + 1:]: s for k, s in param_shapes(config).items()
              if k.startswith(tower + "/")}
    return cls(spec=_spec(nest(shapes)), prefix=tower, name=tower, **kwargs)

  @nn.compact
  def __call__(self) -> Dict[str, Any]:
    out = {}
    for name, sub in self.spec:
      path = f"{self.prefix}/{name}"
      if sub and isinstance(sub[0], tuple):
        out[name] = ParamTree(spec=sub, prefix=path, name=name)()
      else:
        out[name] = self.param(name, lambda key, s=sub, p=path: init_param(p, key, s))
    return out
