"""MustDrop: multi-stage visual-token dropping (vision merge, prefill filter, decode-time cache).

Liu, Shi, Hong, Hu, Yin, Zhang, "Multi-Stage Vision Token Dropping: Towards Efficient Multimodal
Large Language Model", arXiv 2411.10803. Official code: liuting20/MustDrop (LLaVA-1.5, built on
SparseVLM): vision stage `llava/model/multimodal_encoder/clip_encoder.py`
(`CLIPVisionModelAcc.custom_forward`) and `local_merge.py` (`conditional_pooling`,
`merge_wavg`); LLM stages `llava/model/language_model/modelling_sparse_llama.py`
(`LlamaDynamicvitModel.forward`, `dual_attention_filter`); thresholds in
`scripts/v1_5/eval/*.sh`.

Axis legend: B batch, N tokens, D features, T text rows, W windows, k = window * window tokens
per window, M original patches, n image entries of the KV cache.

The official algorithm and where each part lives here:
  1. `mustdrop_merge` (vit stage, after ViT layer 0: `("vit", {"method": "mustdrop_merge",
     "layer": 0, "keep": 1.0})`): the patch grid is cut into non-overlapping window x window
     windows (official 3 x 3 on CLIP's 24 x 24); a window's score is the mean cosine similarity
     of its distinct token pairs; every window scoring >= `threshold` (0.8) collapses into its
     last (bottom-right) token, the mean of its k tokens. Sizes are then discarded by the
     official (no proportional attention); here `size` counts the patches (the contract) and
     the ViT applies no proportional attention after a vit-stage selection either.
  2. Key set: the top ceil(0.08 * N) tokens (N after the merge) by the attention the last ViT
     layer's [CLS] gives them (mean over heads), never dropped later. SigLIP has no [CLS]: the
     decoder hands the llm stage the `vit_scores` signal, the mean attention each ViT output
     token *receives* at the entry's `signal_layer` (default -1, the last layer; the official
     reads layer 23 of 24 while taking features from 22; PaliGemma's features are the last
     layer's), and `image_count`, the valid image tokens entering the decoder.
  3. `mustdrop` (llm stage), at the official decoder layers {2, 6, 10, 14} of 32, each on that
     layer's own attention: plan entries at layers l + 1 (the hidden states entering layer
     l + 1 are filtered, with the attention of layer l: attn_from="prev"), `official_layers`
     rescales them to another depth. Rows: the prompt rows (under the prefix-LM, what follows
     the image at prefill), columns: the current image tokens, mean over heads. g_j = sum over
     rows, m_j = max over rows; token j is dropped iff g_j < global_thr * sum_j g_j and
     m_j < individual_thr, unless it is a key token. Official (global_thr, individual_thr) per
     target average budget: `OFFICIAL_THRESHOLDS` (TextVQA scripts).
  4. The decode policy `mustdrop` (`("decode", {"method": "mustdrop", "layer": 2})`; official
     "output-aware cache policy"): after the prefill the official index-selects the KV caches of
     layers 2 .. 14 (the first to the last filtering layer) down to the final kept set; layers
     0 - 1 stay full and the later layers already hold only the final set. Here the cache stays
     whole and the layers >= `layer` attend only the image entries that reach the last layer
     (the `kept` decode signal), which is the same attention.

Not followed (static shapes, batches, the Tokens contract):
  - counts: the official counts are data-dependent; here every stage returns `budget` slots,
    valid first, then padding (`out.count()`). `keep: 1.0` gives the official result. A budget
    below the official count: `mustdrop_merge` merges the next most similar windows too (never
    below one token per window), `mustdrop` drops the lowest-g non-key tokens.
  - batches: the official merges the same number of windows in every example of a batch (the
    minimum over the batch) and filters with example 0's attention; here each example is its own.
  - order: the official puts the merged tokens first (in window-score order), then the
    unmerged ones (raster); here tokens keep their raster order (the Tokens contract), so the
    decoder sees them in raster order.
  - positions: followed. After each filter the official renumbers the survivors 0..n-1
    (`position_ids.narrow`) and each layer decodes at its own cache length; the llm entries'
    default `positions` is "reindex" (`register(llm_positions=)`), which does both. One
    difference remains in decoding: the official cuts the caches of layers 2 .. 14 to the final
    set, so a generated token's position there is that shorter cache's length; here those
    caches keep their entries (masked by the decode policy) and count them.
  - grids: the official asserts the grid divides by the window (24 / 3). PaliGemma's 16 x 16
    does not divide by 3: use `window=2` or `4` (and re-tune `threshold`); a window that does
    not divide the grid is a ValueError.
  - ties go to the lower index (the official `topk` leaves them to the backend).
"""

from __future__ import annotations

import math
from typing import Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tcjax.compress import primitives as P
from tcjax.compress.registry import register, register_decode

PAPER = "MustDrop, Liu et al., arXiv 2411.10803"
# (global_thr, individual_thr) of the official TextVQA scripts, per target average budget.
OFFICIAL_THRESHOLDS = {192: (0.001, 0.001), 128: (0.0012, 0.001), 64: (0.011, 0.01)}
OFFICIAL_PRUNING_LAYERS = (2, 6, 10, 14)  # of LLaVA-1.5-7B's 32 decoder layers
OFFICIAL_DEPTH = 32


def official_layers(depth: int) -> Tuple[Tuple[int, ...], int]:
  """(the plan layers of the `mustdrop` llm entries, the decode entry's layer) for a decoder of
  `depth` layers: the official pruning layers {2, 6, 10, 14} of 32 scaled by depth / 32 (Python's
  round, half to even), duplicates removed; each filters the input of the next layer (plan layer
  l + 1, attn_from "prev"); the decode policy acts from the first of them (official: the caches
  of layers 2 .. 14 are cut to the final set). E.g. depth 32 -> ((3, 7, 11, 15), 2); 18 (Gemma
  2B) -> ((2, 4, 7, 9), 1); 4 -> ((1, 2, 3), 0)."""
  if isinstance(depth, bool) or not isinstance(depth, int) or depth < 2:
    raise ValueError(f"mustdrop: depth must be an int >= 2, got {depth!r}")
  scaled = sorted({min(round(l * depth / OFFICIAL_DEPTH), depth - 2)
                   for l in OFFICIAL_PRUNING_LAYERS})
  return tuple(l + 1 for l in scaled), scaled[0]


def official_plan(depth: int, *, window: int = 3, threshold: float = 0.8, budget: int = 192,
                  signal_layer: int = -1) -> tuple:
  """The whole MustDrop plan for a decoder of `depth` layers: the ViT merge after layer 0, the
  four llm filters (`official_layers`) with the official thresholds of `budget` (192, 128 or 64:
  `OFFICIAL_THRESHOLDS`), and the decode-time cache policy. Every stage keeps its full capacity
  (`keep: 1.0`), so the counts are the official, data-dependent ones."""
  if budget not in OFFICIAL_THRESHOLDS:
    raise ValueError(f"mustdrop: budget must be one of {sorted(OFFICIAL_THRESHOLDS)}, "
                     f"got {budget!r}")
  layers, first = official_layers(depth)
  g, i = OFFICIAL_THRESHOLDS[budget]
  plan = [("vit", {"method": "mustdrop_merge", "layer": 0, "keep": 1.0, "window": window,
                   "threshold": threshold})]
  plan += [("llm", {"method": "mustdrop", "layer": l, "keep": 1.0, "global_thr": g,
                    "individual_thr": i, "signal_layer": signal_layer}) for l in layers]
  plan.append(("decode", {"method": "mustdrop", "layer": first}))
  return tuple(plan)


def window_tokens(grid, window: int) -> np.ndarray:
  """int32[W, k]: the token index (raster, frame-major) of each window's tokens, windows in
  (frame, window row, window column) order, tokens in raster order within the window (the last
  one is the bottom-right token, a merged window's destination)."""
  t, h, w = grid
  idx = np.arange(t * h * w).reshape(t, h // window, window, w // window, window)
  return idx.transpose(0, 1, 3, 2, 4).reshape(-1, window * window).astype(np.int32)


@register("mustdrop_merge", family="merging", stages=("vit", "post_vit"), paper=PAPER)
def mustdrop_merge(tokens, budget, *, window=3, threshold=0.8):
  """MustDrop's spatial merge: every window x window window whose tokens are alike collapses into
  its bottom-right token (module docstring, step 1).

  Args:
    tokens: the raw patch grid float[B, N, D] (N = T * h * w; a clip's frames are windowed one by
      one), h and w divisible by `window`.
    budget: output capacity in [N / k, N]; `N` (or `keep: 1.0`) gives the official count. When
      fewer than N - budget tokens would go, the next most similar windows merge too.
    window: window side (official 3).
    threshold: windows whose mean pairwise cosine similarity is >= this merge (official 0.8);
      a NaN score never merges.

  Returns:
    `budget` tokens in raster order of their representatives, then padding; a merged window is
    one token at its bottom-right patch's position, the plain mean of its k tokens on raw input
    (size-weighted in general), size k.
  """
  name = "mustdrop_merge"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  t, h, w = P.check_grid_tokens(tokens, name)
  if isinstance(window, bool) or not isinstance(window, int) or window < 2:
    raise ValueError(f"{name}: window must be an int >= 2, got {window!r}")
  if h % window or w % window:
    divisors = [d for d in range(2, min(h, w) + 1) if h % d == 0 and w % d == 0]
    raise ValueError(f"{name}: window {window} does not divide the {h}x{w} grid; windows that "
                     f"do: {divisors}")
  if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
    raise ValueError(f"{name}: threshold must be a number, got {threshold!r}")
  k = window * window
  win = window_tokens(tokens.grid, window)  # [W, k]
  n_win = win.shape[0]
  if budget < n_win:
    raise ValueError(f"{name}: budget must be at least {n_win} (one token per {window}x{window} "
                     f"window), got {budget}")
  b, n, _ = tokens.x.shape
  xw = tokens.x[:, win].astype(jnp.float32)  # [B, W, k, D]
  norm = jnp.linalg.norm(xw, axis=-1)
  cos = jnp.einsum("bwid,bwjd->bwij", xw, xw) / jnp.maximum(
      norm[..., :, None] * norm[..., None, :], 1e-8)
  off = 1.0 - jnp.eye(k, dtype=jnp.float32)
  score = (cos * off).sum((-1, -2)) / (k * (k - 1))  # [B, W]
  whole = tokens.mask[:, win].all(-1)  # a window with padding never merges
  r_thr = (whole & (score >= threshold)).sum(-1)
  r_need = -(-(tokens.count() - budget) // (k - 1))  # windows that must merge to fit
  r = jnp.maximum(r_thr, jnp.maximum(r_need, 0))
  merged = whole & (P.rank_in_group(P.rank_key(score, whole)) < r[:, None])  # [B, W]
  dst = jnp.asarray(win[:, -1])
  rep_w = jnp.where(merged[..., None], dst[None, :, None], jnp.asarray(win)[None])  # [B, W, k]
  # The windows cover every token once: back to token order by the inverse permutation.
  rep_of = rep_w.reshape(b, n)[:, np.argsort(win.reshape(-1))]
  rep_of = jnp.where(tokens.mask, rep_of, -1).astype(jnp.int32)
  carried = P.slot_sum(jnp.where(tokens.mask, tokens.size, 0.0), rep_of, n)
  return P.merge_into(tokens, rep_of, None, budget, carried)


def _ceil_table(m: int, ratio: float) -> np.ndarray:
  """int32[m + 1]: ceil(ratio * i) in Python floats (the official `math.ceil(0.08 * (N - 1))`)."""
  return np.array([math.ceil(ratio * i) for i in range(m + 1)], np.int32)


def key_set(vit_scores, mask, image_count, key_ratio: float, num_patches: int):
  """bool[B, N]: MustDrop's key tokens, the top ceil(key_ratio * image_count) valid tokens by
  `vit_scores` (ties to the lower index). At a later filter the key tokens are still there and
  still the best, so the same rule finds the same set."""
  k = P.lookup(_ceil_table(num_patches, key_ratio), jnp.minimum(image_count, num_patches))
  return mask & (P.rank_in_group(P.rank_key(vit_scores, mask)) < k[:, None])


@register("mustdrop", family="cross_modal", stages=("llm",),
          needs=("attn", "text_mask", "vit_scores", "image_count"), paper=PAPER,
          llm_positions="reindex",  # official `position_ids.narrow` (module docstring)
          signal_layer=-1)  # its `vit_scores`: the last ViT layer's attention (step 2)
def mustdrop(tokens, budget, *, attn=None, text_mask=None, vit_scores=None, image_count=None,
             global_thr=0.001, individual_thr=0.001, key_ratio=0.08):
  """MustDrop's dual-attention filter at one decoder layer, with the key set kept (module
  docstring, steps 2 - 3).

  Args:
    tokens: N image tokens entering the decoder layer.
    budget: output capacity; `keep: 1.0` (N) gives the official count.
    attn: float[B, T, N] the head-mean attention of T text rows to the image tokens (the
      previous layer's, attn_from "prev").
    text_mask: bool[B, T] the rows that count (the valid prompt rows).
    vit_scores: float[B, N] the ViT attention score of each token (key set).
    image_count: int[B] valid image tokens entering the decoder (the key set's size is
      ceil(key_ratio * image_count)).
    global_thr, individual_thr: a token goes when its summed attention is below global_thr of
      the total and its largest attention below individual_thr (official 0.001, 0.001 for an
      average of 192 tokens on LLaVA-1.5; `OFFICIAL_THRESHOLDS`).
    key_ratio: share of the tokens in the key set (official 0.08).

  Returns:
    `budget` slots: the kept tokens in raster order, then padding; over capacity, key tokens
    first, then by summed attention.
  """
  name = "mustdrop"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  for opt, val in (("global_thr", global_thr), ("individual_thr", individual_thr),
                   ("key_ratio", key_ratio)):
    if isinstance(val, bool) or not isinstance(val, (int, float)) or val < 0:
      raise ValueError(f"{name}: {opt} must be a number >= 0, got {val!r}")
  if key_ratio > 1:
    raise ValueError(f"{name}: key_ratio must be in [0, 1], got {key_ratio!r}")
  b, n, _ = tokens.x.shape
  attn = P.check_array(attn, "attn", name, (b, None, n)).astype(jnp.float32)
  rows = P.check_array(text_mask, "text_mask", name, attn.shape[:2], floating=False).astype(bool)
  scores = P.check_array(vit_scores, "vit_scores", name, (b, n)).astype(jnp.float32)
  count = P.check_array(image_count, "image_count", name, (b,), floating=False)
  if not jnp.issubdtype(count.dtype, jnp.integer):
    raise ValueError(f"{name}: `image_count` must be an integer array, got dtype {count.dtype}")
  valid = tokens.mask
  a = jnp.where(rows[..., None] & valid[:, None, :], attn, 0.0)
  g = a.sum(1)  # [B, N] global attention
  top = jnp.where(rows[..., None], attn, -jnp.inf).max(1)  # [B, N] individual attention
  total = jnp.where(valid, g, 0.0).sum(-1, keepdims=True)
  drop = (g < global_thr * total) & (top < individual_thr)
  key = key_set(scores, valid, count.astype(jnp.int32), float(key_ratio), tokens.num_patches)
  keep = valid & (~drop | key)
  return P.select_where(tokens, keep, jnp.where(key, jnp.inf, g), budget)


def mustdrop_kv_init(valid) -> Dict[str, jax.Array]:
  """No state: the final kept set is read from the cache at every step."""
  del valid
  return {}


@register_decode("mustdrop", family="cross_modal", init=mustdrop_kv_init, needs=("kept",),
                 paper=PAPER)
def mustdrop_kv(state, *, valid, kept=None):
  """MustDrop's decode-time cache (module docstring, step 4): layers >= the entry's layer attend
  only the image entries that reach the last layer's cache.

  Args:
    state: {} (`mustdrop_kv_init`).
    valid: bool[B, n] the image entries present in the cache of layer L - 1 (layer 0 at L = 0).
    kept: bool[B, n] those that survive every llm-stage filter of the prefill.

  Returns:
    (state, keep bool[B, n]).
  """
  valid = jnp.asarray(valid, bool)
  kept = P.check_array(kept, "kept", "mustdrop (decode)", valid.shape, floating=False)
  return state, valid & kept.astype(bool)
