"""VisionZip: dominant tokens by attention, the rest merged into a few contextual tokens.

Yang, Chen, Tian, Wang, Li, Yu, Jia, "VisionZip: Longer is Better but Not Necessary in Vision
Language Models", arXiv 2412.04467, CVPR 2025 (official code: dvlab-research/VisionZip,
`visionzip/clip_encoder.py`).

Axis legend: B batch, N tokens, Q attention queries, D features, Dk key features,
Kd dominant tokens, C contextual tokens.

Official behaviour (followed here):
  1. Dominant: the `dominant` tokens with the highest attention (mean over the Q given rows:
     the [CLS] row for CLIP, SigLIP's mean received attention for towers without [CLS]).
  2. Remaining list R: every other token, in its original order. Targets: the entries at
     positions 0, step, 2 step, ... of R (first `contextual` of them), step = max(1, |R| // C):
     evenly spaced in the list, not on the 2-D grid.
  3. Every other entry of R joins the target whose key is most cosine-similar (first target on
     ties).
  4. Contextual token of target t: `h_t + mean(h_i for members i)` (the official rule: the
     target is added to the plain mean of its members, so a non-empty cluster has about twice
     the norm; no members: h_t). `merge="mean"` uses the size-weighted average of the target and
     its members instead (conserves sum(size * x)).
The official code keeps the [CLS] token as one of the dominant tokens (54 = [CLS] + 53 patches);
tcjax tokens are patches only, so every dominant slot is a patch (as for SigLIP). The official
output is [dominant tokens (original order), contextual tokens (target order)]; here the
`budget` tokens are returned in raster order of origin (a contextual token sits at its
target's position) to keep the repository's contract.

Default split: the published 54 : 10 ratio of the budget, contextual = floor(budget * 10 / 64)
(at least 1 when budget >= 2), dominant = the rest: 64 -> 54 + 10, 128 -> 108 + 20,
192 -> 162 + 30, 256 -> 216 + 40.

Bookkeeping: a dominant token carries itself; a contextual token carries its target and its
members (`size` = their patches). Padding (mask False) is never dominant while valid tokens
remain, never a target or member; with fewer valid remaining tokens than `contextual`, the
missing contextual slots are padding. NaN: NaN attention ranks last (`primitives.rank_key`); a
token whose keys are non-finite matches no target and joins the first one; non-finite features
propagate into the one output token that carries them.
"""

from __future__ import annotations

from typing import Tuple

import jax
import jax.numpy as jnp

from tcjax.compress import primitives as P
from tcjax.compress.registry import register

# Published split at 64 tokens: 54 dominant + 10 contextual.
_CONTEXT, _OF = 10, 64


def default_split(budget: int) -> Tuple[int, int]:
  """(dominant, contextual) for `budget` at the published 54 : 10 ratio."""
  c = budget * _CONTEXT // _OF
  if budget >= 2:
    c = max(c, 1)
  return budget - c, c


def _split(budget, dominant, contextual, name):
  for arg, v in (("dominant", dominant), ("contextual", contextual)):
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
      raise ValueError(f"{name}: {arg} must be a non-negative int, got {v!r}")
  if dominant is None and contextual is None:
    return default_split(budget)
  if dominant is None:
    dominant = budget - contextual
  if contextual is None:
    contextual = budget - dominant
  if dominant < 0 or contextual < 0 or dominant + contextual != budget:
    raise ValueError(f"{name}: dominant + contextual must equal budget={budget}, "
                     f"got {dominant} + {contextual}")
  return dominant, contextual


def _targets(rest: jax.Array, c: int):
  """Evenly spaced targets in the list of remaining tokens (one example).

  Args:
    rest: bool[N] the remaining tokens, R = their indices in order.
    c: number of targets.

  Returns:
    (int32[C] token index of each target, bool[C] target exists, int32[N] target slot of every
    target token, -1 for the others).
  """
  n = rest.shape[0]
  at = jnp.cumsum(rest) - 1  # position of each remaining token in R
  step = jnp.maximum(rest.sum() // c, 1)
  slot = jnp.where(rest & (at % step == 0) & (at // step < c), at // step, -1).astype(jnp.int32)
  drop = jnp.where(slot >= 0, slot, c)
  idx = jnp.zeros((c,), jnp.int32).at[drop].set(jnp.arange(n, dtype=jnp.int32), mode="drop")
  ok = jnp.zeros((c,), bool).at[drop].set(True, mode="drop")
  return idx, ok, slot


@register("visionzip", family="merging", stages=("vit", "post_vit"), needs=("attn", "keys"),
          paper="VisionZip, Yang et al., arXiv 2412.04467 (CVPR 2025)")
def visionzip(tokens, budget, *, attn=None, keys=None, dominant=None, contextual=None,
              merge="official"):
  """Keep the most attended tokens and merge the rest into evenly spaced contextual tokens.

  Args:
    tokens: N tokens (official: the tower's penultimate-layer output).
    budget: tokens out = dominant + contextual.
    attn: float[B, Q, N] attention rows, averaged over Q (one [CLS] row, or a no-[CLS] tower's
      mean received attention as a single row).
    keys: float[B, N, Dk] keys averaged over heads (official: the same layer's keys).
    dominant: dominant tokens; default from `default_split(budget)` (54 : 10).
    contextual: contextual tokens; default budget - dominant. Both given: must sum to budget.
    merge: "official" (target + plain mean of its members) or "mean" (size-weighted average of
      the target and its members).

  Returns:
    `budget` tokens in raster order of origin (valid first, then padding).
  """
  name = "visionzip"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  b, n, d = tokens.x.shape
  attn = P.check_array(attn, "attn", name, (b, None, n)).astype(jnp.float32)
  if attn.shape[1] == 0:
    raise ValueError(f"{name}: `attn` needs at least one query row")
  keys = P.check_array(keys, "keys", name, (b, n, None))
  if merge not in ("official", "mean"):
    raise ValueError(f"{name}: merge must be 'official' or 'mean', got {merge!r}")
  kd, c = _split(budget, dominant, contextual, name)

  if kd:
    dom = P.top_indices(P.rank_key(attn.mean(1), tokens.mask), kd)  # [B, Kd], ascending
  else:
    dom = jnp.zeros((b, 0), jnp.int32)

  def plan(dom, valid, kf):
    """(slot of every token, -1 dropped; representative of every slot; member -> target)."""
    slot = jnp.full((n,), -1, jnp.int32).at[dom].set(jnp.arange(kd, dtype=jnp.int32))
    if not c:
      return slot, dom, slot
    rest = valid & (slot < 0)
    tgt, ok, t_slot = _targets(rest, c)
    kn = P.l2_normalize(kf)
    sim = jnp.einsum("nd,cd->nc", kn, kn[tgt], preferred_element_type=jnp.float32)
    sim = jnp.where(ok[None, :] & ~jnp.isnan(sim), sim, -jnp.inf)
    near = jnp.argmax(sim, -1).astype(jnp.int32)  # first target on ties
    member = rest & (t_slot < 0)
    slot = jnp.where(t_slot >= 0, kd + t_slot, jnp.where(member, kd + near, slot))
    return slot, jnp.concatenate([dom, tgt]), jnp.where(member, near, -1)

  assign, rep, joins = jax.vmap(plan)(dom, tokens.mask, keys)
  if merge == "mean":
    return P.sort_by_position(P.merge(tokens, assign, rep))
  # Official rule: bookkeeping from `merge` (features left out), features computed below.
  out = P.merge(tokens.replace(x=tokens.x[..., :0]), assign, rep)
  xf = tokens.x.astype(jnp.float32)
  kept = jnp.take_along_axis(xf, rep[..., None], axis=1)  # [B, Kd + C, D]: dominant, targets
  if c:
    total = P.slot_sum(xf, joins, c)
    count = P.slot_sum((joins >= 0).astype(jnp.float32), joins, c)
    ctx = kept[:, kd:] + total / jnp.maximum(count, 1.0)[..., None]
    kept = jnp.concatenate([kept[:, :kd], ctx], 1)
  x = jnp.where(out.mask[..., None], kept, 0.0).astype(tokens.x.dtype)
  return P.sort_by_position(out.replace(x=x))
