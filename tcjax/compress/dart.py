"""DART: keep the tokens least duplicated with a few pivot tokens.

Wen et al., "Stop Looking for Important Tokens in Multimodal Language Models: Duplication Matters
More", arXiv 2502.11494, EMNLP 2025 (official code: ZichenWen1/DART).

Axis legend: B batch, N tokens, D features, Dk key features, T text tokens, P pivots.

Official behaviour (reference code), adapted to an exact budget:
  1. Pivots: the visual tokens with the largest L1 norm of their attention keys (4 image pivots
     plus 4 text pivots in the reference code at layer 2; the paper's table caption: 8 pivots by
     max K-norm).
  2. Every pivot in turn (here: in descending key-norm order, image pivots then text pivots,
     deterministic where the reference iterates a Python set) takes from the pool of remaining
     visual tokens the ones with the LOWEST cosine similarity of features to it.
  3. Kept: the image pivots plus everything taken; text pivots only guide the selection. Raster
     order and original positions are kept.
The reference keeps `4 + 8 * floor(B / 8)` tokens (slightly above budget B); here the
`budget - num_pivots` places are split as evenly as possible over the pivots (the first pivots
take one extra), so exactly `budget` tokens are kept.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tcjax.compress import primitives as P
from tcjax.compress.registry import register


def default_pivots(budget: int) -> int:
  """The reference uses 8 pivots for a budget of 128: one pivot per 16 kept tokens, 1 to 8."""
  return max(1, min(8, budget // 16))


def _select_one(xn, valid, key_norm, tn, t_norm, budget, n_piv):
  """int32[budget] kept indices of one example (unordered).

  Args:
    xn: float32[N, D] unit features; valid: bool[N]; key_norm: float32[N] ranking key for pivots.
    tn: float32[T, D] unit text features (T may be 0); t_norm: float32[T] text pivot key.
  """
  n = xn.shape[0]
  n_txt = tn.shape[0]
  order = jnp.argsort(-key_norm, stable=True).astype(jnp.int32)
  pivots = order[:n_piv]
  rest = budget - n_piv
  if not rest:
    return pivots
  guides = xn[pivots]
  if n_txt:  # text guides arrive sorted by their key, best first
    t_ok = jnp.isfinite(t_norm)  # masked-out text: -inf, never a guide
    guides = jnp.concatenate([guides, tn], 0)
    active = jnp.concatenate([jnp.ones((n_piv,), bool), t_ok])
  else:
    active = jnp.ones((n_piv,), bool)
  num_guides = guides.shape[0]
  # Exact budget: the remaining places split over the active guides, first ones take the rest.
  n_active = active.sum()
  rank = jnp.cumsum(active) - 1
  quota = jnp.where(active, rest // n_active + (rank < rest % n_active), 0)
  width = -(-rest // n_piv)  # static bound on any quota (n_active >= n_piv)
  sims = jnp.einsum("pd,nd->pn", guides, xn, preferred_element_type=jnp.float32)
  taken = jnp.zeros((n,), bool).at[pivots].set(True)
  picks = jnp.zeros((rest,), jnp.int32)

  def body(g, state):
    taken, picks, filled = state
    # Lowest similarity first; NaN similarity after real ones, padding after that.
    s = jnp.where(jnp.isnan(sims[g]), 2.0, sims[g])
    s = jnp.where(valid, s, 3.0)
    _, cand = jax.lax.top_k(-jnp.where(taken, jnp.inf, s), width)
    use = jnp.arange(width) < quota[g]
    slots = jnp.where(use, filled + jnp.arange(width), rest)
    picks = picks.at[slots].set(cand.astype(jnp.int32), mode="drop")
    taken = taken.at[jnp.where(use, cand, n)].set(True, mode="drop")
    return taken, picks, filled + quota[g]

  _, picks, _ = jax.lax.fori_loop(0, num_guides, body, (taken, picks, jnp.int32(0)))
  return jnp.concatenate([pivots, picks])


@register("dart", family="sampling", stages=("post_vit", "post_proj", "llm"), needs=("keys",),
          paper="DART, Wen et al., arXiv 2502.11494 (EMNLP 2025)")
def dart(tokens, budget, *, keys=None, text=None, text_mask=None, num_pivots=None,
         num_text_pivots=4):
  """Keep `budget` tokens: key-norm pivots plus the tokens least similar to the pivots.

  Args:
    tokens: N tokens; the official method acts on the LLM hidden states entering layer 2
      (features normalised by the model's final norm - the caller passes those as `tokens.x`).
    budget: tokens kept (exact).
    keys: float[B, N, Dk] attention keys; pivots have the largest L1 norm. NaN norms rank last.
    text: optional float[B, T, D] text features; when given, the `num_text_pivots` text tokens
      with the largest L1 feature norm (we get no text keys) also guide the selection, as in the
      reference code, without being kept.
    text_mask: optional bool[B, T], False marks text padding (never a pivot).
    num_pivots: image pivots; default `default_pivots(budget)` (8 at budget 128, 1 at 16).
    num_text_pivots: text pivots when `text` is given (reference: 4).

  Returns:
    `budget` tokens in raster order.
  """
  name = "dart"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  b, n, d = tokens.x.shape
  keys = P.check_array(keys, "keys", name, (b, n, None))
  n_piv = default_pivots(budget) if num_pivots is None else num_pivots
  if isinstance(n_piv, bool) or not isinstance(n_piv, int) or not 1 <= n_piv <= budget:
    raise ValueError(f"{name}: num_pivots must be an int in [1, budget={budget}], got {n_piv!r}")
  xn = P.l2_normalize(tokens.x)
  valid = tokens.mask & jnp.all(jnp.isfinite(xn), -1)
  key_norm = P.rank_key(jnp.abs(keys.astype(jnp.float32)).sum(-1), tokens.mask)
  if text is None:
    if text_mask is not None:
      raise ValueError(f"{name}: text_mask given without text")
    no_text = (jnp.zeros((0, d), jnp.float32), jnp.zeros((0,), jnp.float32))
    idx = jax.vmap(lambda *a: _select_one(*a, *no_text, budget, n_piv))(xn, valid, key_norm)
    return P.gather(tokens, jnp.sort(idx, axis=-1))
  else:
    text = P.check_array(text, "text", name, (b, None, d))
    t = text.shape[1]
    if text_mask is None:
      text_mask = jnp.ones((b, t), bool)
    text_mask = P.check_array(text_mask, "text_mask", name, (b, t), floating=False)
    if isinstance(num_text_pivots, bool) or not isinstance(num_text_pivots, int) \
        or num_text_pivots < 0:
      raise ValueError(f"{name}: num_text_pivots must be a non-negative int, "
                       f"got {num_text_pivots!r}")
    k = min(num_text_pivots, t)
    t_key = P.rank_key(jnp.abs(text.astype(jnp.float32)).sum(-1), text_mask.astype(bool))
    t_top, t_idx = jax.lax.top_k(t_key, k)
    tn = jnp.take_along_axis(P.l2_normalize(text), t_idx[..., None], axis=1)
    t_norm = t_top
  idx = jax.vmap(lambda *a: _select_one(*a, budget, n_piv))(xn, valid, key_norm, tn, t_norm)
  return P.gather(tokens, jnp.sort(idx, axis=-1))
