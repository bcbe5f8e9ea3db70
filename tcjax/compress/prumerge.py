"""LLaVA-PruMerge and PruMerge+: IQR-outlier selection by attention, k-NN key-similarity merge.

Shang, Cai, Xu, Lee, Yan, "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large
Multimodal Models", arXiv 2403.15388, ICCV 2025 (official code: 42Shawn/LLaVA-PruMerge,
`token_prune_merge_advanced` / `token_prune_merge_advanced_plus`).

Axis legend: B batch, N tokens, Q attention queries, D features, H heads, h head features,
K kept capacity, L neighbours per kept token.

Official behaviour (followed here), with a = the attention mean over Q (Q = 1: the [CLS] row):
  1. Outliers: a_i > Q3 + 1.5 * (Q3 - Q1), quartiles by linear interpolation (numpy
     `percentile`). The official code pools the quartiles over the whole batch; here they are
     per example, so the result does not depend on batch composition (spec 6.4).
  2. PruMerge+ adds the uniform samples `arange(0, N - 1, max(step // 3, 1))` with
     `step = N // n_outliers` (official `int(1 / ratio)`; no outliers: index 0 only).
  3. Each kept token i: x_i + sum_{j in kNN(i)} a_j * x_j over the L = min(k, N - 1) tokens j != i
     (kept or pruned) whose keys are most cosine-similar to k_i; weights not normalised (the
     official division is commented out; `normalize=True` restores it). The keys are the last
     layer's key projection with the heads concatenated (the official hook on `k_proj` of
     `layers[23]`), so a plan reads PruMerge's signals from the last ViT layer by default
     (`register(signal_layer=-1)`), not the penultimate one of VisionZip and FasterVLM;
     `heads="mean"` compares the head-mean keys instead.
  4. One extra token: sum_{pruned j} a_j * x_j (`extra_token=False` omits it).
Fixed capacity: the output has `budget` slots; kept tokens fill `budget - extra_token` of them
(outliers first by attention, then PruMerge+ grid samples by attention; more candidates than
slots: the most attended win), unused slots are padding (mask False). `out.count()` is the
effective count; `effective_count` below is the same. Unlike the official code (descending
attention order, extra token last) the output is in raster order.

`size` / `src` (bookkeeping for visualisation and un-merging; the features are the official
unnormalised sums, not means over the carried patches): a kept token carries itself; a pruned
token is carried by the kept token most key-similar to it among those whose k-NN contains it
(the tokens it is added into); pruned tokens in no k-NN are carried by the extra token (or
dropped, src -1, without it). When every pruned token is in some k-NN, the extra token carries
the most attended pruned token, so that it has an origin. `size` = patches carried.
NaN attention: never an outlier, weight 0 in the sums.

Not followed: the official attention is a single-head softmax over the full concatenated q and k
of the [CLS] row; a tower without [CLS] (SigLIP) hands over the head-mean attention each patch
receives instead (`attn`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tcjax.compress import primitives as P
from tcjax.compress.registry import register


def effective_count(out) -> jax.Array:
  """int32[B] number of valid output tokens (the data-dependent PruMerge count)."""
  return out.count()


def iqr_outliers(a: jax.Array, valid: jax.Array, factor: float = 1.5) -> jax.Array:
  """bool[N]: a_i > Q3 + factor * IQR over the valid, non-NaN entries of `a: float32[N]`."""
  ok = valid & ~jnp.isnan(a)
  q1, q3 = jnp.nanpercentile(jnp.where(ok, a, jnp.nan), jnp.array([25.0, 75.0]),
                             method="linear")
  return ok & (a > q3 + factor * (q3 - q1))


def _prumerge(tokens, budget, attn, keys_heads, *, name, plus, heads, k, factor, extra_token,
              normalize):
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  b, n, _ = tokens.x.shape
  attn = P.check_array(attn, "attn", name, (b, None, n)).astype(jnp.float32)
  keys = P.check_array(keys_heads, "keys_heads", name, (b, n, None, None))
  if heads == "concat":
    keys = keys.reshape(b, n, -1)  # [B, N, H * h]: the key projection as the official hook
  elif heads == "mean":
    keys = keys.mean(2)  # [B, N, h]
  else:
    raise ValueError(f"{name}: heads must be 'concat' or 'mean', got {heads!r}")
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"{name}: k must be a positive int, got {k!r}")
  cap = budget - int(bool(extra_token))  # kept-token capacity
  nb = min(k, n - 1)
  idx_n = jnp.arange(n, dtype=jnp.int32)

  def plan(a, valid, kf, x):
    outl = iqr_outliers(a, valid, factor)
    tier = outl.astype(jnp.int32)
    if plus:
      count = outl.sum()
      step = jnp.where(count > 0, n // jnp.maximum(count, 1), 3 * (n - 1))
      stride = jnp.maximum(step // 3, 1)
      grid = valid & (idx_n % stride == 0) & (idx_n < n - 1)
      tier = jnp.where(outl, 2, jnp.where(grid, 1, 0))
    rk = P.rank_key(a, valid)
    # Descending (tier, attention), ascending index on ties.
    order = jnp.lexsort((-idx_n, rk, tier))[::-1][:cap]
    kept_ok = tier[order] > 0  # bool[K]
    w = jnp.where(valid & jnp.isfinite(a), a, 0.0)
    is_kept = jnp.zeros((n,), bool).at[order].set(kept_ok)
    slot_of = jnp.full((n,), -1, jnp.int32).at[order].set(
        jnp.where(kept_ok, jnp.arange(cap, dtype=jnp.int32), -1))
    # k-NN of each kept token among all other valid tokens, by key cosine.
    kn = P.l2_normalize(kf)
    sim = jnp.einsum("kd,nd->kn", kn[order], kn, preferred_element_type=jnp.float32)
    sim = jnp.where(valid[None, :] & (order[:, None] != idx_n[None, :]), sim, -jnp.inf)
    nsim, nidx = jax.lax.top_k(sim, nb)  # [K, L]
    live = kept_ok[:, None] & (nsim > -jnp.inf)
    wn = jnp.where(live, w[nidx], 0.0)
    xf = x.astype(jnp.float32)
    # Sparse [K, N] weights applied as one matmul (XLA's CPU row gather of K*L rows is slow).
    rows = jnp.broadcast_to(jnp.arange(cap)[:, None], nidx.shape)
    wmat = jnp.zeros((cap, n), jnp.float32).at[rows, nidx].add(wn)
    add = jnp.einsum("kn,nd->kd", wmat, xf, preferred_element_type=jnp.float32)
    if normalize:
      add = add / jnp.maximum(wn.sum(-1, keepdims=True), 1e-30)
    xk = jnp.where(kept_ok[:, None], xf[order] + add, 0.0)
    # Carrier of each pruned token: the most similar kept token whose k-NN contains it.
    pruned = valid & ~is_kept
    tgt = jnp.where(live, nidx, n)
    best = jnp.full((n + 1,), -jnp.inf).at[tgt].max(jnp.where(live, nsim, -jnp.inf))
    slots = jnp.broadcast_to(jnp.arange(cap, dtype=jnp.int32)[:, None], nidx.shape)
    hit = live & (nsim >= best[tgt])
    owner = jnp.full((n + 1,), cap, jnp.int32).at[tgt].min(jnp.where(hit, slots, cap))[:n]
    owner = jnp.where(pruned & (owner < cap), owner, -1)
    assign = jnp.where(is_kept, slot_of, owner)
    rep = jnp.where(kept_ok, order, 0)
    if extra_token:
      orphan = pruned & (owner < 0)
      # No orphan: the extra token takes the most attended pruned token as its origin.
      pick = jnp.where(orphan.any(), orphan, pruned)
      first = jnp.argmax(jnp.where(pick, jnp.maximum(rk, -3e38), -jnp.inf))
      assign = jnp.where(orphan | (pick & (idx_n == first) & pruned), cap, assign)
      xe = jnp.einsum("n,nd->d", jnp.where(pruned, w, 0.0), xf)
      xk = jnp.concatenate([xk, xe[None]], 0)
      rep = jnp.concatenate([rep, first[None].astype(jnp.int32)])
    return assign, rep, xk

  assign, rep, xk = jax.vmap(plan)(attn.mean(1), tokens.mask, keys, tokens.x)
  out = P.merge(tokens, assign, rep)
  out = out.replace(x=jnp.where(out.mask[..., None], xk, 0.0).astype(tokens.x.dtype))
  return P.sort_by_position(out)


@register("prumerge", family="merging", stages=("post_vit",), needs=("attn", "keys_heads"),
          paper="LLaVA-PruMerge, Shang et al., arXiv 2403.15388 (ICCV 2025)", signal_layer=-1)
def prumerge(tokens, budget, *, attn=None, keys_heads=None, heads="concat", k=32, factor=1.5,
             extra_token=True, normalize=False):
  """PruMerge: keep the IQR attention outliers (at most `budget`), merge by key k-NN.

  Args:
    tokens: N tokens (the tower's penultimate output in the official code).
    budget: output capacity; valid tokens = min(outliers, budget - extra_token) + extra_token,
      the rest padding. `out.count()` (or `effective_count(out)`) reports it.
    attn: float[B, Q, N] attention probabilities; averaged over Q ([CLS] row when Q = 1).
    keys_heads: float[B, N, H, h] keys per head for the k-NN cosine similarity (official: the
      last block's key projection).
    heads: "concat" (official: the heads concatenated) or "mean" (the head-mean key).
    k: neighbours added into each kept token (official 32), clipped to N - 1.
    factor: IQR multiplier (official 1.5).
    extra_token: append the official extra token sum_{pruned} a_j x_j (takes one slot).
    normalize: divide each kept token's neighbour sum by its weight sum (the official code has
      this division commented out).

  Returns:
    `budget` tokens in raster order, valid first, then padding.
  """
  return _prumerge(tokens, budget, attn, keys_heads, name="prumerge", plus=False, heads=heads,
                   k=k, factor=factor, extra_token=extra_token, normalize=normalize)


@register("prumerge_plus", family="merging", stages=("post_vit",), needs=("attn", "keys_heads"),
          paper="LLaVA-PruMerge+, Shang et al., arXiv 2403.15388 (ICCV 2025)", signal_layer=-1)
def prumerge_plus(tokens, budget, *, attn=None, keys_heads=None, heads="concat", k=32,
                  factor=1.5, extra_token=True, normalize=False):
  """PruMerge+: PruMerge's outliers plus uniform spatial samples (stride `(N // n_out) // 3`).

  Args and returns as `prumerge`; outliers win the capacity over the grid samples.
  """
  return _prumerge(tokens, budget, attn, keys_heads, name="prumerge_plus", plus=True, heads=heads,
                   k=k, factor=factor, extra_token=extra_token, normalize=normalize)
