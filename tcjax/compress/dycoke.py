"""DyCoke: temporal token merging before the LLM, then dynamic KV-cache pruning while decoding.

Tao, Qin, Zheng, Wang, Wang, "DyCoke: Dynamic Compression of Tokens for Fast Video Large
Language Models", arXiv 2411.15024 (CVPR 2025). Official code: KD-TAO/DyCoke (TTM:
`llava/model/llava_arch.py::dycole_ttm`; KV stage: `llava/model/language_model/
modeling_qwen2.py`, `PrunableDynamicCache.dycoke_pruning` / `update_cache` and the hook in
`Qwen2Model.forward`; defaults: lmms-eval's `llava_onevision.py`: dycoke_k 0.7, dycoke_l 3,
dycoke_p 0.8).

Axis legend: B batch, T frames, P tokens per frame, N = T * P tokens, D features, n image
entries of the KV cache, H query heads.

Stage 1, `dycoke` (registered at post_vit / post_proj; the official acts on the projected,
pooled frames of LLaVA-OneVision, 196 tokens each: put `pool` first for that):
  Frames go in windows of 4: frame 0 whole; frame 1 against frame 0; frame 2 against frame 0;
  frame 3 against frame 2 (the official's two passes: pairs (2i, 2i + 1), then frame i + 2
  against frame i for i = 0, 4, 8, ... < T - 4, comparing the original frames). A compared frame
  keeps the m = int((1 - prune) * P) tokens least cosine-similar to the token at the same index
  of its reference frame (official prune K = 0.7: 30 % kept, 58 of 196); the rest are dropped,
  not averaged. No threshold. So a window keeps [P, m, m, m] tokens, except where the official
  loop stops early (below).
  Official details kept: the second pass skips every window that starts at i >= T - 4, so the
  third frame of the last window stays whole (`official_tail=True`; for 32 frames: frame 30,
  3098 of 6272 tokens); an odd T drops its last frame, which no pair holds (the official's
  `range(0, T - 1, 2)`); counts use Python floats (`int(0.3 * 196)` = 58).
  Not followed: the official returns each compared frame's kept tokens in ascending-similarity
  order (an unsorted `topk`) with contiguous positions; here survivors keep their original
  positions and raster order (the Tokens contract), so the decoder sees them in frame order at
  their own RoPE positions. T <= 4 works here (the official raises on `torch.stack([])`); ties
  go to the lower index; the budget is a static capacity (below).

Stage 2, the decode policy `dycoke` (a ("decode", {"method": "dycoke", "layer": L}) plan entry;
`tcjax.compress.registry.DECODE_POLICIES`), at every decoding step, never at prefill:
  1. a = the new token's attention at layer L - 1 (mean over heads) over the n image entries.
  2. sim = cos(a, a of the previous step); 0 on the first step.
  3. If sim < `threshold` (0.9): the layers >= L attend only the k = int((1 - prune) * n_valid)
     image entries with the highest a (official p = 0.8: 20 % kept), plus everything that is not
     an image entry (the prompt, the generated tokens). The cache itself stays whole.
  4. If sim >= threshold, the official code leaves its gather list at None, so the layers >= L
     attend the **full** cache: pruning happens only on steps where the attention *changed*,
     the inverse of the paper's wording ("reuse the previous selection while the attention is
     stable"). `gate="official"` (default) follows the code; `gate="paper"` follows the paper:
     a stable step reuses the previous step's subset, a changed step selects anew.
  Defaults: lmms-eval's dycoke_l = 3 and dycoke_p = 0.8 (the README's example uses p = 0.7;
  `builder.py`'s own default K is 0.3, which lmms-eval overrides with 0.7); the 0.9 gate is
  hard-coded there and an option here.
  Not followed: the official uses example 0's attention row for the whole batch and keeps the
  previous vector on a config object shared across samples (the first step of a new sample
  compares with the last sample's vector); here every example has its own row and its own state,
  which starts empty at each prefill. The official's visual span leaves out the last TTM token
  (`image_token_length` = TTM length - 1, next to the newline token PaliGemma does not have);
  here every image entry can be pruned. Ties go to the lower index (the official `topk` is
  unsorted). Pruned entries are masked, not gathered out: the result is the official's, without
  its speed-up.

`temporal_merge` (tcjax's generic temporal merging) is not this method: it shares one budget
over every frame after frame 0 (no windows), compares each frame with the one before it,
skips near-repeats by a similarity threshold and merges (size-weighted) the tokens it does not
keep into their temporal neighbour; `dycoke` is the official TTM: fixed windows, fixed per-frame
counts, no threshold, dropping.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tcjax.compress import primitives as P
from tcjax.compress.registry import register, register_decode

PAPER = "DyCoke, Tao et al., arXiv 2411.15024 (CVPR 2025)"
GATES = ("official", "paper")


def ttm_layout(frames: int, official_tail: bool = True) -> np.ndarray:
  """int32[T]: the reference frame of each frame in the TTM (-1: kept whole, -2: dropped).

  Pass 1: pairs (2i, 2i + 1), the odd frame against the even one; an odd T leaves its last
  frame out (dropped, as the official). Pass 2: frame i + 2 against frame i for each window start
  i = 0, 4, 8, ... with i < T - 4 (`official_tail`, the official loop) or i + 2 < T (every
  window alike)."""
  ref = np.full((frames,), -2, np.int32)
  for i in range(0, frames - 1, 2):
    ref[i], ref[i + 1] = -1, i
  stop = frames - 4 if official_tail else frames - 2
  for i in range(0, max(stop, 0), 4):
    if ref[i + 2] == -1:
      ref[i + 2] = i
  return ref


def kept_per_frame(prune: float, per_frame: int) -> int:
  """m = int((1 - prune) * P): tokens a compared frame keeps (Python floats, as the official)."""
  return int((1 - prune) * per_frame)


def ttm_count(frames: int, per_frame: int, kept: int, official_tail: bool = True) -> int:
  """Tokens the TTM keeps of a clip of `frames` x `per_frame` tokens, `kept` per compared frame."""
  ref = ttm_layout(frames, official_tail)
  return int((ref == -1).sum()) * per_frame + int((ref >= 0).sum()) * kept


def _cosine(a, b, eps=1e-8):
  """cos over the last axis, as torch's `cosine_similarity` (norms product clamped at eps)."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  dot = (a * b).sum(-1)
  return dot / jnp.maximum(jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1), eps)


@register("dycoke", family="merging", stages=("post_vit", "post_proj"), paper=PAPER)
def dycoke(tokens, budget, *, prune=None, official_tail=True):
  """DyCoke's temporal token merging (TTM): windows of 4 frames, per-frame least-similar tokens.

  Args:
    tokens: a clip's tokens float[B, N, D], N = T * P frame-major, the same P positions in every
      frame in the same order (the raw grid `Tokens.from_video`, or a per-frame pooled one:
      `pool` first, as LLaVA-OneVision's 196 tokens per frame); T >= 2.
    budget: output capacity, at least the TTM's count (`ttm_count`); with `prune=None` the
      budget sets m = (budget - whole frames' tokens) // compared frames (at most P) and any
      remainder is padding.
    prune: fraction of each compared frame's tokens dropped (official K = 0.7: m = int(0.3 P));
      None: m from the budget.
    official_tail: True (official): the third frame of the last window stays whole (the
      official second pass stops at T - 4); False: every window alike.

  Returns:
    `budget` tokens: the kept ones in raster order at their original positions, then padding
    (`out.count()` = `ttm_count`). Nothing is merged: `size` stays 1, dropped patches map to -1.
  """
  name = "dycoke"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  if not isinstance(official_tail, bool):
    raise ValueError(f"{name}: official_tail must be True or False, got {official_tail!r}")
  t = tokens.grid[0]
  n = tokens.num_tokens
  if t < 2 or n % t:
    raise ValueError(f"{name}: needs a clip's tokens, at least 2 frames with the same number of "
                     f"tokens each (Tokens.from_video, or pool first), got grid {tokens.grid} "
                     f"and N={n}")
  per_frame = n // t
  ref = ttm_layout(t, official_tail)
  whole, compared = int((ref == -1).sum()) * per_frame, int((ref >= 0).sum())
  if prune is not None:
    if isinstance(prune, bool) or not isinstance(prune, (int, float)) or not 0 <= prune <= 1:
      raise ValueError(f"{name}: prune must be a number in [0, 1] or None, got {prune!r}")
    m = kept_per_frame(prune, per_frame)
  else:
    if budget < whole:
      raise ValueError(f"{name}: budget must be at least {whole} (the {whole // per_frame} "
                       f"frames kept whole of a {t}-frame clip), got {budget}")
    m = min(per_frame, (budget - whole) // compared) if compared else 0
  count = whole + compared * m
  if count > budget:
    raise ValueError(f"{name}: budget {budget} is below the TTM's {count} tokens ({t} frames "
                     f"of {per_frame}, {m} kept per compared frame, prune={prune!r})")
  b = tokens.x.shape[0]
  x = tokens.x.reshape(b, t, per_frame, -1)
  mask = tokens.mask.reshape(b, t, per_frame)
  other = jnp.asarray(np.maximum(ref, 0))
  sim = _cosine(x, x[:, other])  # float32[B, T, P], each token against its reference frame's
  key = P.rank_key(-sim, mask & mask[:, other])  # least similar first; NaN / padding last
  least = P.rank_in_group(key) < m  # rank within each frame (the last axis)
  is_ref = jnp.asarray(ref >= 0)[None, :, None]
  keep = jnp.where(is_ref, least & (key > -jnp.inf), jnp.asarray(ref == -1)[None, :, None])
  keep = (keep & mask).reshape(b, n)
  return P.select_where(tokens, keep, jnp.zeros((b, n), jnp.float32), budget)


# ---- Stage 2: decode-time dynamic KV pruning. ----


def _kept_table(n: int, prune: float) -> np.ndarray:
  """int32[n + 1]: int(i * (1 - prune)), the official count for i image entries (Python floats
  on the host; `primitives.lookup` reads it with a traced i)."""
  return np.array([int(i * (1 - prune)) for i in range(n + 1)], np.int32)


def _check_kv_options(prune, threshold, gate):
  name = "dycoke (decode)"
  if isinstance(prune, bool) or not isinstance(prune, (int, float)) or not 0 <= prune <= 1:
    raise ValueError(f"{name}: prune must be a number in [0, 1], got {prune!r}")
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
    raise ValueError(f"{name}: threshold must be a number, got {threshold!r}")
  if gate not in GATES:
    raise ValueError(f"{name}: gate must be one of {GATES}, got {gate!r}")


def dycoke_kv_init(valid, *, prune=0.8, threshold=0.9, gate="official"):
  """The state before the first decoding step: {"prev": float32[B, n] the previous step's
  attention row (none yet), "seen": bool[B] whether there was one, "keep": bool[B, n] the entries
  the last step let layers >= L attend}."""
  _check_kv_options(prune, threshold, gate)
  valid = jnp.asarray(valid, bool)
  return {"prev": jnp.zeros(valid.shape, jnp.float32),
          "seen": jnp.zeros(valid.shape[:1], bool), "keep": valid}


@register_decode("dycoke", family="sampling", init=dycoke_kv_init, needs=("attn",), paper=PAPER,
                 choices={"gate": GATES})
def dycoke_kv(state, *, valid, attn=None, prune=0.8, threshold=0.9, gate="official"
              ) -> Tuple[dict, jax.Array]:
  """One decoding step of DyCoke's dynamic KV-cache pruning (module docstring, stage 2).

  Args:
    state: `dycoke_kv_init`'s or the previous step's.
    valid: bool[B, n] the image entries present in the cache of layer L - 1.
    attn: float[B, n] the new token's attention at layer L - 1 over those entries (mean over
      heads).
    prune: fraction of the image entries dropped on a pruning step (official p = 0.8).
    threshold: cosine between this step's and the previous step's attention rows below which
      the step selects anew (official 0.9).
    gate: "official" (a stable step attends the full cache, as the code does) or "paper" (a
      stable step reuses the previous subset).

  Returns:
    (new state, keep bool[B, n]: the image entries layers >= L attend at this step).
  """
  name = "dycoke (decode)"
  _check_kv_options(prune, threshold, gate)
  valid = jnp.asarray(valid, bool)
  b, n = valid.shape
  attn = P.check_array(attn, "attn", name, (b, n)).astype(jnp.float32)
  for key, shape in (("prev", (b, n)), ("seen", (b,)), ("keep", (b, n))):
    if key not in state or state[key].shape != shape:
      raise ValueError(f"{name}: state[{key!r}] must have shape {shape} (dycoke_kv_init)")
  a = jnp.where(valid, attn, 0.0)
  sim = jnp.where(state["seen"], _cosine(a, state["prev"]), 0.0)
  changed = sim < threshold  # NaN: stable
  k = P.lookup(_kept_table(n, prune), valid.sum(-1).astype(jnp.int32))
  fresh = valid & (P.rank_in_group(P.rank_key(a, valid)) < k[:, None])
  stable = valid if gate == "official" else state["keep"]
  keep = jnp.where(changed[:, None], fresh, stable) & valid
  return {"prev": a, "seen": jnp.ones_like(state["seen"]), "keep": keep}, keep
