"""Task-adaptive budgets: how many tokens each example keeps is read off its score distribution.

Axis legend: B batch, N tokens in, K capacity (the static `budget`).

A fixed budget keeps as many tokens for "what colour is the square" as for "read the number".
The policies here let the scores decide: an example whose importance is concentrated on a few
tokens keeps few, one whose importance is spread keeps many. Both read the same signal as `topk`
(`scores`: at post_vit / post_proj the mean attention each patch receives in ViT layer
`signal_layer`, in the ViT that layer's, in the decoder the attention of the last prompt token,
FastV's row), so they keep exactly what `topk` would keep at a budget of `count[b]`:

  adaptive_mass     count = the smallest k whose k largest masses hold at least `mass` of the
                    total (a top-p / nucleus rule over tokens; ZipVL, arXiv 2410.08584, sizes its
                    set of important tokens this way from attention; no official code is
                    public, so nothing here is a port of it).
  adaptive_entropy  count = round(scale * exp(H(p))): the perplexity of the score distribution,
                    i.e. the number of tokens a uniform distribution of the same entropy covers
                    (1 for all mass on one token, N for flat scores).

Masses: w = the scores of the valid tokens, with negative and non-finite scores counted as 0;
p = w / sum(w). Counts are clipped to [min_tokens, K] and never exceed the valid tokens; an
example with no mass at all keeps `min_tokens`. Ties and NaN are ranked as in `topk`
(`primitives.rank_key`).

Static shapes (the `Tokens` contract): the output always has `budget` slots, the capacity;
example b's `count[b]` kept tokens come first in raster order, the other slots are padding
(mask False, size 0, zero features, no patch in `src`). `out.count()` is the effective number of
tokens. Every stage of the model masks padding out of attention and gives valid tokens
consecutive RoPE positions (`cumsum(valid) - 1`), so the model computes what it computes on the
kept tokens alone; compute is still that of `budget` tokens (choose the capacity as the largest
count you accept). In the decoder, kept tokens keep their positions, as every llm-stage method.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tcjax.compress import primitives as P
from tcjax.compress.registry import register

# The policies: their number of valid output tokens varies per example (the sweep reports it).
POLICIES = ("adaptive_mass", "adaptive_entropy")


def _masses(scores: jax.Array, mask: jax.Array) -> jax.Array:
  """float32[B, N] nonnegative masses: valid, finite, positive scores; 0 elsewhere."""
  s = scores.astype(jnp.float32)
  return jnp.where(mask & jnp.isfinite(s) & (s > 0), s, 0.0)


def _clip(count: jax.Array, mask: jax.Array, budget: int, min_tokens: int) -> jax.Array:
  """int32[B]: count within [min_tokens, budget] and at most the valid tokens."""
  count = jnp.clip(count, min_tokens, budget)
  return jnp.minimum(count, mask.sum(-1)).astype(jnp.int32)


def mass_count(scores: jax.Array, mask: jax.Array, mass: float) -> jax.Array:
  """int32[B] smallest k whose k largest masses reach `mass` of the total (1 if none).

  scores: float[B, N]; mask: bool[B, N] valid tokens; mass: fraction in (0, 1].
  """
  w = _masses(scores, mask)
  held = jnp.cumsum(-jnp.sort(-w, axis=-1), axis=-1)  # mass of the k largest, k = 1..N
  # The first k with held >= mass * total; `held[-1]` is the total as this cumsum adds it up.
  return (held < mass * held[:, -1:]).sum(-1).astype(jnp.int32) + 1


def entropy_count(scores: jax.Array, mask: jax.Array, scale: float) -> jax.Array:
  """int32[B] round(scale * exp(H(p))), p the normalised masses (0 if there is no mass).

  scores: float[B, N]; mask: bool[B, N] valid tokens; scale: positive factor.
  """
  w = _masses(scores, mask)
  total = w.sum(-1, keepdims=True)
  p = w / jnp.maximum(total, 1e-30)
  h = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), -1)
  perplexity = jnp.where(total[:, 0] > 0, jnp.exp(h), 0.0)
  return jnp.floor(scale * perplexity + 0.5).astype(jnp.int32)


def _check_fraction(v, name: str, method: str) -> float:
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
    raise ValueError(f"{method}: {name} must be a number in (0, 1], got {v!r}")
  return float(v)


def _check_positive(v, name: str, method: str) -> float:
  if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
    raise ValueError(f"{method}: {name} must be a positive number, got {v!r}")
  return float(v)


def _check_min_tokens(v, budget: int, method: str) -> int:
  if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= budget:
    raise ValueError(f"{method}: min_tokens must be an int in [1, budget={budget}], got {v!r}")
  return v


def _adaptive(tokens, budget, scores, min_tokens, name, count_fn):
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  scores = P.check_scores(tokens, scores, name)
  min_tokens = _check_min_tokens(min_tokens, budget, name)
  count = _clip(count_fn(scores, tokens.mask), tokens.mask, budget, min_tokens)
  return P.select_top_count(tokens, scores, budget, count)


@register("adaptive_mass", family="sampling", stages=("vit", "post_vit", "post_proj", "llm"),
          needs=("scores",),
          paper="adaptive budget: smallest set holding a share of the score mass (top-p; "
                "ZipVL's rule, arXiv 2410.08584)")
def adaptive_mass(tokens, budget, *, scores=None, mass=0.5, min_tokens=1):
  """Keep, per example, the fewest top-scoring tokens that hold `mass` of the score mass.

  Args:
    tokens: N tokens.
    budget: static capacity K: at most K tokens are kept, the output has K slots.
    scores: float[B, N] importance masses (attention; negative and NaN count as 0).
    mass: share of the total mass the kept tokens must hold, in (0, 1].
    min_tokens: fewest tokens kept, in [1, K].

  Returns:
    K tokens: the kept ones in raster order, then padding; `out.count()` per example.
  """
  name = "adaptive_mass"
  mass = _check_fraction(mass, "mass", name)
  return _adaptive(tokens, budget, scores, min_tokens, name,
                   lambda s, m: mass_count(s, m, mass))


@register("adaptive_entropy", family="sampling", stages=("vit", "post_vit", "post_proj", "llm"),
          needs=("scores",),
          paper="adaptive budget: perplexity exp(H) of the score distribution")
def adaptive_entropy(tokens, budget, *, scores=None, scale=1.0, min_tokens=1):
  """Keep, per example, round(scale * exp(entropy)) top-scoring tokens.

  Args:
    tokens: N tokens.
    budget: static capacity K: at most K tokens are kept, the output has K slots.
    scores: float[B, N] importance masses (attention; negative and NaN count as 0).
    scale: factor on the perplexity (the effective number of tokens the scores spread over).
    min_tokens: fewest tokens kept, in [1, K].

  Returns:
    K tokens: the kept ones in raster order, then padding; `out.count()` per example.
  """
  name = "adaptive_entropy"
  scale = _check_positive(scale, "scale", name)
  return _adaptive(tokens, budget, scores, min_tokens, name,
                   lambda s, m: entropy_count(s, m, scale))
