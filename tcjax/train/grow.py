"""Growing a trained decoder without changing what it computes (to add capacity mid-training).

A Gemma block adds its attention and MLP outputs to the residual stream, so a block whose two
output projections (`attn_vec_einsum`, `mlp/linear`) are zero is the identity, and a query head
whose rows of `attn_vec_einsum` are zero adds nothing. `grow_decoder` appends such blocks and
heads: the grown model's logits equal the trained model's at the first step (tests check it
against the un-grown model), the other new weights are random at the trained weights' scale, and
the zero projections start receiving gradients at once (their gradient is the product of the
random branch's output and the residual gradient), so training resumes from what was learned
with more room. A frame table (`frame_embedding`, see PaliGemmaConfig) added to the decoder input
of a clip's tokens is likewise the identity while zero: `frame_embedding=K` gives a model without
one a zero table of K rows, whose gradient is the residual gradient at each frame's tokens.
Used by `experiments.train` through `config.grow` (configs/testbed.py).
"""

import dataclasses
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tcjax.nn.config import PaliGemmaConfig

GROW_FIELDS = ("llm_depth", "llm_num_heads", "frame_embedding")
# Leaves that write into the residual stream: zero in every new block / head.
_OUTPUTS = ("attn_vec_einsum", "linear")


def _random_like(key, ref, shape):
  """float32 normal of `shape` with the standard deviation of the trained leaf `ref`."""
  std = float(np.std(np.asarray(ref, np.float32)))
  return jax.random.normal(key, shape, jnp.float32) * std


def grow_decoder(params: Dict[str, Any], config: PaliGemmaConfig, *, llm_depth: int = 0,
                 llm_num_heads: int = 0, frame_embedding: int = 0, seed: int = 0
                 ) -> Tuple[PaliGemmaConfig, Dict[str, Any]]:
  """(grown config, grown params): the decoder with `llm_depth` layers and `llm_num_heads` query
  heads (0 keeps the current number), and with `frame_embedding` > 0 a zero frame table
  `llm/frame_embedding` float[frame_embedding, E] in the input embeddings' dtype (only for a
  config without one: ValueError otherwise), computing exactly what `params` computes.

  New layers go on top of the trained ones (before the final norm); new query heads after the
  trained ones. Heads grow only where the mapping of query heads to KV heads stays put: one KV
  head (multi-query, Gemma 1 2B / the bundled model) or one KV head per query head (the
  `qkv_einsum` layout, where the new heads get their own random keys and values). Raises
  ValueError for a shrink, for grouped-query attention with 1 < K < H, or for params that do not
  hold a scanned decoder.
  """
  llm_cfg = config.llm
  depth = llm_depth or llm_cfg.depth
  heads = llm_num_heads or llm_cfg.num_heads
  if depth < llm_cfg.depth or heads < llm_cfg.num_heads:
    raise ValueError(f"grow_decoder only grows: depth {llm_cfg.depth} -> {depth}, heads "
                     f"{llm_cfg.num_heads} -> {heads}")
  if "llm" not in params or "layers" not in params["llm"]:
    raise ValueError("grow_decoder needs params with a scanned decoder at params['llm']['layers']")
  if frame_embedding and config.frame_embedding:
    raise ValueError(f"grow_decoder adds a frame table only to a model without one; this one has "
                     f"{config.frame_embedding} rows (asked for {frame_embedding})")
  if frame_embedding:
    config = dataclasses.replace(config, frame_embedding=frame_embedding)  # checks the value
  layers = jax.tree.map(jnp.asarray, params["llm"]["layers"])
  attn = dict(layers["attn"])
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  new_h = heads - llm_cfg.num_heads
  if new_h:
    if "qkv_einsum" in attn:  # [L, 3, H, D, h]: every head its own q, k, v
      w = attn["qkv_einsum"]["w"]
      extra = _random_like(next(keys), w, w.shape[:2] + (new_h,) + w.shape[3:])
      attn["qkv_einsum"] = {"w": jnp.concatenate([w, extra.astype(w.dtype)], 2)}
    elif llm_cfg.num_kv_heads == 1:  # [L, H, D, h] queries; the one KV head serves all
      w = attn["q_einsum"]["w"]
      extra = _random_like(next(keys), w, w.shape[:1] + (new_h,) + w.shape[2:])
      attn["q_einsum"] = {"w": jnp.concatenate([w, extra.astype(w.dtype)], 1)}
    else:
      raise ValueError(f"cannot add query heads with {llm_cfg.num_kv_heads} KV heads for "
                       f"{llm_cfg.num_heads} query heads: the heads' groups would move")
    o = attn["attn_vec_einsum"]["w"]  # [L, H, h, D]
    attn["attn_vec_einsum"] = {"w": jnp.concatenate(
        [o, jnp.zeros(o.shape[:1] + (new_h,) + o.shape[2:], o.dtype)], 1)}
  layers = {**layers, "attn": attn}
  new_l = depth - llm_cfg.depth

  def add_layers(path, leaf):
    name = jax.tree_util.keystr(path)
    shape = (new_l,) + leaf.shape[1:]
    if any(f"'{o}'" in name for o in _OUTPUTS) or "norm" in name:
      # zero outputs make the block the identity; zero norm scales are Gemma's unit scale
      extra = jnp.zeros(shape, leaf.dtype)
    else:
      extra = _random_like(next(keys), leaf, shape).astype(leaf.dtype)
    return jnp.concatenate([leaf, extra], 0)

  if new_l:
    layers = jax.tree_util.tree_map_with_path(add_layers, layers)
  grown = {**params, "llm": {**params["llm"], "layers": layers}}
  if frame_embedding:  # zero rows: the decoder inputs stay as they were
    emb = params["llm"]["embedder"]["input_embedding"]
    grown["llm"]["frame_embedding"] = jnp.zeros((frame_embedding, emb.shape[1]), emb.dtype)
  kv_heads = heads if "qkv_einsum" in attn else llm_cfg.num_kv_heads
  new_llm = dataclasses.replace(llm_cfg, depth=depth, num_heads=heads, num_kv_heads=kv_heads)
  return dataclasses.replace(config, llm=new_llm), grown
