"""Shared wiring for experiments: signals for every method and a budget each method accepts.

Kept inside experiments/ (scripts never import tests/). Shapes are the realistic ones of a SigLIP /
PaliGemma setting: attn with Q = 1 (a CLS-like row), keys with Dk = 72 (one So400m head),
keys_heads with 16 heads of 72, text with T = 16 prompt tokens.
"""

from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

import tcjax
from tcjax.compress import METHODS


# Options every experiment passes to a method, with the reason: MustDrop's own 3 x 3 merge
# windows do not divide the 16 x 16, 32 x 32 or 64 x 64 grids (the sweep's default is 2 too).
OPTIONS = {"mustdrop_merge": {"window": 2}}


def make_signals(name, tokens, *, seed=0, num_queries=1, key_dim=72, text_len=16,
                 attn_logits=None, text=None):
  """Every signal `METHODS[name].needs`, shaped after `tokens: float[B, N, D]`.

  attn has `num_queries` rows (a CLS-like row), or `text_len` prompt rows for a method that also
  takes a `text_mask` over them (MustDrop's filter reads the decoder's prompt rows)."""
  b, n, d = tokens.x.shape
  ks = jax.random.split(jax.random.key(seed), 7)
  needs = METHODS[name].needs
  out = {}
  for s in needs:
    if s == "scores":
      out[s] = (attn_logits if attn_logits is not None
                else jax.random.normal(ks[0], (b, n)))
    elif s == "attn":
      q = text_len if "text_mask" in needs and "text" not in needs else num_queries
      logits = (jnp.broadcast_to(attn_logits[:, None], (b, q, n))
                if attn_logits is not None else 3 * jax.random.normal(ks[1], (b, q, n)))
      out[s] = jax.nn.softmax(logits, -1)
    elif s == "attn_heads":  # per-head rows (two heads), the decoder's prompt-row attention
      logits = (jnp.broadcast_to(attn_logits[:, None, None], (b, 2, num_queries, n))
                if attn_logits is not None
                else 3 * jax.random.normal(ks[1], (b, 2, num_queries, n)))
      out[s] = jax.nn.softmax(logits, -1)
    elif s == "keys":
      out[s] = jax.random.normal(ks[2], (b, n, key_dim))
    elif s == "keys_heads":  # 16 heads of key_dim, as So400m
      out[s] = jax.random.normal(ks[2], (b, n, 16, key_dim))
    elif s == "text":
      out[s] = text if text is not None else jax.random.normal(ks[3], (b, text_len, d))
    elif s == "text_mask":
      t = (out["text"].shape[1] if "text" in out else out["attn"].shape[1] if "attn" in out
           else num_queries if "attn_heads" in out else text_len)
      out[s] = jnp.ones((b, t), bool)
    elif s == "vit_scores":  # the ViT's attention score per token
      out[s] = (attn_logits if attn_logits is not None
                else jax.random.normal(ks[6], (b, n)))
    elif s == "image_count":  # every token valid
      out[s] = jnp.full((b,), n, jnp.int32)
    elif s == "rng":
      out[s] = ks[5]
  return out


def method_call(name, budget):
  """`(tokens, signals) -> METHODS[name].fn(tokens, budget, **signals)` with the method's
  `OPTIONS` (static: closed over, never traced)."""
  opts = OPTIONS.get(name, {})
  return lambda t, s: METHODS[name].fn(t, budget, **s, **opts)


def _accepts(name, tokens, budget, signals):
  try:
    jax.eval_shape(method_call(name, budget), tokens, signals)
    return None
  except ValueError as e:
    return str(e)


def pick_budget(name, tokens, signals, fraction=0.25):
  """A budget near `fraction * N` that method `name` accepts on `tokens` (or None).

  Tries round(fraction * N); if the method lists its valid budgets in the error, takes the
  closest; otherwise scans outward from the target.
  """
  n = tokens.num_tokens
  target = max(1, round(fraction * n))
  err = _accepts(name, tokens, target, signals)
  if err is None:
    return target
  m = re.search(r"valid budgets:?\s*\[([0-9,\s]+)\]", err)
  if m:
    options = [int(v) for v in m.group(1).split(",") if v.strip()]
    for b in sorted(options, key=lambda v: (abs(math.log(v / target)), v)):
      if _accepts(name, tokens, b, signals) is None:
        return b
  m = re.search(r"budget must be at least (\d+)", err)  # e.g. DyCoke's frames kept whole
  if m and int(m.group(1)) <= n and _accepts(name, tokens, int(m.group(1)), signals) is None:
    return int(m.group(1))
  for delta in range(1, n):
    for b in (target + delta, target - delta):
      if 1 <= b <= n and _accepts(name, tokens, b, signals) is None:
        return b
    if delta > 256:
      break
  return None


def make_tokens_for(name, x, grid):
  """(tokens, budget) for method `name`: one image of `grid`, or the same N as a 4-frame clip
  when that lets the method reach a budget closer to N/4 (video methods); (None, None) if
  neither works."""
  b, n, d = x.shape
  img = tcjax.Tokens.from_grid(x, grid)
  h, w = grid
  candidates = [img]
  if h % 2 == 0 and w % 2 == 0:
    candidates.append(tcjax.Tokens.from_video(x, frames=4, grid=(h // 2, w // 2)))
  best = (None, None)
  target = max(1, round(0.25 * n))
  err = lambda b: abs(math.log(b / target))
  for tokens in candidates:  # the geometry whose accepted budget is closest to N/4 (image on ties)
    budget = pick_budget(name, tokens, make_signals(name, tokens))
    if budget is not None and (best[1] is None or err(budget) < err(best[1])):
      best = (tokens, budget)
  return best
