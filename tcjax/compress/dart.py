"""DART: keep the tokens least duplicated with a few pivot tokens.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More", arXiv 2502.11494, EMNLP 2025 (official code: ZichenWen1/DART).

Axis legend: B batch, N tokens, D features, Dk key features, T text tokens, G guides (pivots).

Official behaviour (the default, `quota="official"`), in the LLM at the input of layer K = 2:
  1. Pivots: the 4 visual tokens with the largest L1 norm of their attention keys (layer K-1),
     and the 4 text tokens with the largest L1 norm of theirs (`text_keys`).
  2. Each of the G = 8 pivots in turn takes floor(budget / G) tokens from the pool of visual
     tokens that are neither image pivots nor taken yet: those with the LOWEST cosine similarity
     of features (the hidden states after the model's final norm - the caller passes those as
     `tokens.x` and `text`) to it.
  3. Kept: the image pivots plus everything taken; text pivots only guide the selection. Raster
     order and original positions are kept.
Adapted to an exact budget: the reference keeps 4 + 8 * floor(B / 8) tokens (132 for B = 128).
Here the pivots stop taking once `budget` tokens are kept (the last one takes fewer), and where
that count falls short of the budget (B mod 8 > 4) the first pivots take one more each. A budget
of 4 + 8t therefore keeps exactly the reference selection (budget 132 = reference B = 128), and
budget 128 keeps it without the last pivot's 4 final picks. The reference iterates the pivots in
Python set order; here image pivots, then text pivots, each by descending key norm
(deterministic). Fewer pivots (no text, text padding) mean G < 8 and larger quotas. Without
`text_keys` (before the LLM there are none) text pivots rank by the L1 norm of the text features.

`quota="even"`, this module's earlier behaviour, is kept as an option: `num_pivots` grows with the
budget (`default_pivots`, 8 at 128) and the `budget - num_pivots` places are split evenly over all
pivots, image and text (the first ones take one more). Every pivot then gets the same share and
none is cut short, but the shares are not the reference's: at budget 128 with 4 text pivots each
pivot takes 10 tokens where the reference takes 16, and 8 image pivots are kept instead of 4.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tcjax.compress import primitives as P
from tcjax.compress.registry import register

OFFICIAL_PIVOTS = 4  # image pivots (and text pivots) of the reference code


def default_pivots(budget: int) -> int:
  """Image pivots of `quota="even"`: one per 16 kept tokens, 1 to 8 (8 at a budget of 128)."""
  return max(1, min(8, budget // 16))


def _quotas(active, budget: int, n_piv: int, quota: str):
  """int32[G] tokens each guide takes (0 for inactive ones); they sum to `budget - n_piv`."""
  rest = budget - n_piv
  g = active.sum()
  rank = jnp.cumsum(active) - 1
  if quota == "even":
    return jnp.where(active, rest // g + (rank < rest % g), 0)
  # Reference quota floor(budget / G); the shortfall (< G, as budget < G * (per + 1)) goes one
  # each to the first guides, an overshoot is cut from the last ones.
  per = budget // g
  want = jnp.where(active, per + (rank < jnp.maximum(rest - g * per, 0)), 0)
  return jnp.clip(rest - (jnp.cumsum(want) - want), 0, want)


def _select_one(xn, valid, key_norm, tn, t_ok, budget, n_piv, quota):
  """int32[budget] kept indices of one example (unordered).

  Args:
    xn: float32[N, D] unit features; valid: bool[N]; key_norm: float32[N] ranking key for pivots.
    tn: float32[T', D] unit features of the text pivots, best first (T' may be 0); t_ok: bool[T']
      which of them are real (not padding).
  """
  n = xn.shape[0]
  order = jnp.argsort(-key_norm, stable=True).astype(jnp.int32)
  pivots = order[:n_piv]
  rest = budget - n_piv
  if not rest:
    return pivots
  guides = jnp.concatenate([xn[pivots], tn], 0)
  active = jnp.concatenate([jnp.ones((n_piv,), bool), t_ok])
  take = _quotas(active, budget, n_piv, quota)
  # Static bound on any quota (at least n_piv guides are active).
  width = -(-rest // n_piv) if quota == "even" else min(rest, budget // n_piv + 1)
  sims = jnp.einsum("gd,nd->gn", guides, xn, preferred_element_type=jnp.float32)
  taken = jnp.zeros((n,), bool).at[pivots].set(True)
  picks = jnp.zeros((rest,), jnp.int32)

  start = jnp.cumsum(take) - take  # first slot of each guide's picks

  def body(g, state):
    taken, picks = state
    # Lowest similarity first; NaN similarity after real ones, padding after that.
    s = jnp.where(jnp.isnan(sims[g]), 2.0, sims[g])
    s = jnp.where(valid, s, 3.0)
    _, cand = jax.lax.top_k(-jnp.where(taken, jnp.inf, s), width)
    use = jnp.arange(width) < take[g]
    slots = jnp.where(use, start[g] + jnp.arange(width), rest)
    picks = picks.at[slots].set(cand.astype(jnp.int32), mode="drop")
    taken = taken.at[jnp.where(use, cand, n)].set(True, mode="drop")
    return taken, picks

  _, picks = jax.lax.fori_loop(0, guides.shape[0], body, (taken, picks))
  return jnp.concatenate([pivots, picks])


def _is_count(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


# In the decoder (official): the features are the hidden states after the model's final norm, and
# the keys those of layer K-1 with the KV heads concatenated (the key projection's output, whose
# L1 norm ranks the pivots). Before the LLM `keys` are the ViT's head-mean keys and `text` the
# embedded text. Without an entry's "signals", the text pivots are on (official).
@register("dart", family="sampling", stages=("post_vit", "post_proj", "llm"), needs=("keys",),
          paper="DART, Wen et al., arXiv 2502.11494 (EMNLP 2025)",
          default_signals=("text", "text_mask", "text_keys"), llm_features="final_norm",
          llm_signals={"keys": "keys_concat", "text": "text_normed",
                       "text_keys": "text_keys_concat"})
def dart(tokens, budget, *, keys=None, text=None, text_mask=None, text_keys=None,
         num_pivots=None, num_text_pivots=OFFICIAL_PIVOTS, quota="official"):
  """Keep `budget` tokens: key-norm pivots plus the tokens least similar to the pivots.

  Args:
    tokens: N tokens; the reference acts on the LLM hidden states entering layer 2, normalised
      by the model's final norm (the caller passes those as `tokens.x`).
    budget: tokens kept (exact; see the module docstring for the reference's count).
    keys: float[B, N, Dk] attention keys; pivots have the largest L1 norm. NaN norms rank last.
    text: optional float[B, T, D] text features (same space as `tokens.x`); its
      `num_text_pivots` pivots guide the selection without being kept.
    text_mask: optional bool[B, T], False marks text padding (never a pivot).
    text_keys: optional float[B, T, Dk] attention keys of the text: text pivots have the
      largest L1 norm of these (reference); without them, of the text features.
    num_pivots: image pivots; default 4 (reference; at most `budget`), or
      `default_pivots(budget)` with `quota="even"`.
    num_text_pivots: text pivots when `text` is given (reference: 4).
    quota: "official" (floor(budget / pivots) per pivot, cut to the exact budget) or "even"
      (the places split evenly over the pivots; module docstring).

  Returns:
    `budget` tokens in raster order.
  """
  name = "dart"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  b, n, d = tokens.x.shape
  keys = P.check_array(keys, "keys", name, (b, n, None))
  if quota not in ("official", "even"):
    raise ValueError(f"{name}: quota must be 'official' or 'even', got {quota!r}")
  if num_pivots is None:
    n_piv = default_pivots(budget) if quota == "even" else min(OFFICIAL_PIVOTS, budget)
  else:
    n_piv = num_pivots
  if not _is_count(n_piv) or not 1 <= n_piv <= budget:
    raise ValueError(f"{name}: num_pivots must be an int in [1, budget={budget}], got {n_piv!r}")
  if not _is_count(num_text_pivots) or num_text_pivots < 0:
    raise ValueError(f"{name}: num_text_pivots must be a non-negative int, "
                     f"got {num_text_pivots!r}")
  xn = P.l2_normalize(tokens.x)
  valid = tokens.mask & jnp.all(jnp.isfinite(xn), -1)
  key_norm = P.rank_key(jnp.abs(keys.astype(jnp.float32)).sum(-1), tokens.mask)
  if text is None:
    for arg, v in (("text_mask", text_mask), ("text_keys", text_keys)):
      if v is not None:
        raise ValueError(f"{name}: {arg} given without text")
    # No text guides: constants, not batched (a batch-sharded example axis must match).
    no_text = (jnp.zeros((0, d), jnp.float32), jnp.zeros((0,), bool))
    select = lambda *a: _select_one(*a, *no_text, budget, n_piv, quota)
    return P.gather(tokens, jnp.sort(jax.vmap(select)(xn, valid, key_norm), axis=-1))
  text = P.check_array(text, "text", name, (b, None, d))
  t = text.shape[1]
  if text_mask is None:
    text_mask = jnp.ones((b, t), bool)
  text_mask = P.check_array(text_mask, "text_mask", name, (b, t), floating=False).astype(bool)
  ranked = text if text_keys is None else P.check_array(text_keys, "text_keys", name,
                                                        (b, t, None))
  t_key = P.rank_key(jnp.abs(ranked.astype(jnp.float32)).sum(-1), text_mask)
  t_top, t_idx = jax.lax.top_k(t_key, min(num_text_pivots, t))
  tn = jnp.take_along_axis(P.l2_normalize(text), t_idx[..., None], axis=1)
  t_ok = t_top > -jnp.inf  # padding and NaN norms: never a pivot
  idx = jax.vmap(lambda *a: _select_one(*a, budget, n_piv, quota))(xn, valid, key_norm, tn, t_ok)
  return P.gather(tokens, jnp.sort(idx, axis=-1))
