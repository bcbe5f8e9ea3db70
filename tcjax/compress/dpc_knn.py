"""DPC-KNN: density-peak clustering with k-NN density; tokens merged into their cluster centres.

Jin et al., "Chat-UniVi: Unified Visual Representation Empowers Large Language Models with Image
and Video Understanding", arXiv 2311.08046, CVPR 2024 (official code: PKU-YuanGroup/Chat-UniVi,
`ChatUniVi/model/cluster.py`: `cluster_dpc_knn`, `merge_tokens`).

Axis legend: B batch, N tokens, D features, K centres (= budget).

Official behaviour (followed here), in float32:
  1. d_ij = ||x_i - x_j|| / sqrt(D).
  2. rho_i = exp(-mean of d_ij^2 over the k nearest j, i itself included).
  3. delta_i = min d_ij over denser j; the densest token gets the sample's max distance.
  4. Centres: the `budget` largest rho * delta.
  5. Every token joins its nearest centre (first centre on ties); centres own themselves.
  6. Merge: the plain mean of the members (official weights 1); `weighting="size"` averages by
     `size` instead (the two agree on raw tokens, whose sizes are all 1).
The official code adds U(0, 1) * 1e-6 to rho to break ties, which makes it non-deterministic;
by default ties are broken by index here (the lower index counts as denser), and `rng` restores
the official noise. The official output is in centre-score order; here it is in raster order
of the centres (each merged token takes its centre's position). The algorithm needs the N x N
distance matrix; nothing larger is built. Padding tokens (mask False) are never neighbours,
centres (unless the budget exceeds the valid tokens: those slots are padding) or members.

Chat-UniVi's image path (`ChatUniVi/model/arch.py::project`, `cluster.py::CTM`) runs three
levels in a cascade, 576 -> 64 (k = 5) -> 32 (k = 3) -> 16 (k = 3), each clustering the previous
level's merged tokens with weight 1 apiece, and hands the projector all three levels
concatenated, 64 + 32 + 16 = 112 tokens: `cascade` and `concatenate`. The levels are each a
`Tokens` of the same patch grid (level l's `src` maps every patch to its level-l token), but
their concatenation carries every patch three times, which the Tokens contract (one carrier per
patch) cannot express: it is a plain feature array, for `prefill(image_tokens=)`-style use, not
a plan entry.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import jax
import jax.numpy as jnp

from tcjax.compress import primitives as P
from tcjax.compress.registry import register
from tcjax.parallel.mesh import batch_shards, map_batch
from tcjax.tokens import Tokens


def pairwise_distance(x: jax.Array) -> jax.Array:
  """float32[N, N] Euclidean distances of `x: float[N, D]` divided by sqrt(D), zero diagonal."""
  n, d = x.shape
  x = x.astype(jnp.float32)
  sq = jnp.sum(x * x, -1)
  g = jnp.einsum("nd,md->nm", x, x, preferred_element_type=jnp.float32)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0)
  d2 = jnp.where(jnp.eye(n, dtype=bool), 0.0, d2)
  return jnp.sqrt(d2) / jnp.sqrt(jnp.float32(d))


def dpc_scores(dist: jax.Array, valid: jax.Array, k: int, noise=None) -> jax.Array:
  """float32[N] density-peak score rho * delta of one example (-inf for invalid tokens).

  Args:
    dist: float32[N, N] pairwise distances (`pairwise_distance`).
    valid: bool[N] tokens that take part (never neighbours or denser tokens otherwise).
    k: neighbours in the density, self included (k <= N).
    noise: optional float[N] added to the density (the official tie-breaking noise); None
      breaks density ties by index (the lower index counts as denser).
  """
  n = dist.shape[0]
  big = jnp.float32(3e38)
  both = valid[:, None] & valid[None, :]
  dk = jnp.where(both, dist, big)
  near = -jax.lax.top_k(-dk, k)[0]  # [N, k] smallest distances, self (0) included
  rho = jnp.exp(-jnp.mean(near * near, -1))
  if noise is not None:
    rho = rho + noise
  idx = jnp.arange(n)
  denser = (rho[None, :] > rho[:, None]) | ((rho[None, :] == rho[:, None])
                                           & (idx[None, :] < idx[:, None]))
  dmax = jnp.max(jnp.where(both, dist, 0.0))
  delta = jnp.min(jnp.where(denser & both, dist, dmax), -1)
  return jnp.where(valid, rho * delta, -jnp.inf)


def dpc_centres(dist: jax.Array, valid: jax.Array, budget: int, k: int, noise=None):
  """Centres (int32[K], score order) of one example from `dist: float32[N, N]`."""
  _, centres = jax.lax.top_k(dpc_scores(dist, valid, k, noise), budget)
  return centres.astype(jnp.int32)


@register("dpc_knn", family="merging", stages=("post_vit", "post_proj"),
          paper="DPC-KNN in Chat-UniVi, Jin et al., arXiv 2311.08046 (CVPR 2024)")
def dpc_knn(tokens, budget, *, rng=None, k=5, weighting="plain"):
  """Cluster the tokens into `budget` density peaks and merge each cluster into its centre.

  Args:
    tokens: N tokens (Chat-UniVi: the CLIP patch features before the projector).
    budget: number of clusters (centres).
    rng: optional PRNG key: adds the official U(0, 1) * 1e-6 density noise (one draw for the
      batch); None (default) breaks density ties by index, deterministically.
    k: neighbours in the density, self included (official 5 for the first level), clipped to N.
    weighting: "plain" (official: mean with weight 1 per member) or "size" (size-weighted mean,
      conserves sum(size * x)).

  Returns:
    `budget` tokens in raster order of their centres; `size` = patches carried.
  """
  name = "dpc_knn"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  if not isinstance(k, int) or k < 1:
    raise ValueError(f"{name}: k must be a positive int, got {k!r}")
  if weighting not in ("plain", "size"):
    raise ValueError(f"{name}: weighting must be 'plain' or 'size', got {weighting!r}")
  b, n, _ = tokens.x.shape
  kk = min(k, n)
  noise = None if rng is None else jax.random.uniform(rng, (b, n)) * 1e-6

  def plan(x, valid, nz):
    return _plan(x, valid, budget, kk, nz)

  args = (tokens.x, tokens.mask) + (() if noise is None else (noise,))
  step = plan if noise is not None else (lambda x, v: plan(x, v, None))
  chunks = 1
  if jax.default_backend() == "cpu":  # one example's N x N temporaries at a time (reused)
    shards = batch_shards(tokens.mask)
    chunks = b // shards if b % shards == 0 else 1
  assign, centres = map_batch(jax.vmap(step), args, chunks)
  return _merge_sorted(tokens, assign, centres, weighting)


def _plan(x: jax.Array, valid: jax.Array, budget: int, k: int, noise=None):
  """(assign int32[N], centres int32[K]) of one example: `dpc_centres(pairwise_distance(x), ...)`
  and the nearest centre of every token (the first centre, in score order, on ties), through
  `primitives.dpc_plan` (the compare-free passes of `dpc_sq_dists`, `dpc_scores` and
  `dpc_assign` on the Gram matrix, no N x N distance matrix), which gives the same values."""
  assign, centres = P.dpc_plan(x, valid, budget, k, noise)
  return jnp.where(valid, assign, -1), centres


def _merge_sorted(tokens, assign, centres, weighting):
  """`primitives.merge` of the clusters, then `sort_by_position`, with the features moved once:
  the slots are put in raster order of their centres before the scatter.

  x: the plain mean of the members ("plain", weight 1 each) or the size-weighted one; size: the
  patches carried; pos: the centre's; empty slots (padding centres) are padding, last."""
  k = centres.shape[1]
  keep = (assign >= 0) & tokens.mask
  slot = jnp.where(keep, assign, -1)
  size = P.slot_sum(jnp.where(keep, tokens.size, 0.0), slot, k)
  w = jnp.where(keep, 1.0 if weighting == "plain" else tokens.size, 0.0)
  total = size if weighting == "size" else P.slot_sum(w, slot, k)
  mask = size > 0
  pos = jnp.where(mask[..., None], jax.vmap(lambda p, c: p[c])(tokens.pos, centres), 0)
  _, h, wd = tokens.grid
  lin = (pos[..., 0] * h + pos[..., 1]) * wd + pos[..., 2]
  big = jnp.iinfo(jnp.int32).max
  order = jnp.argsort(jnp.where(mask, lin, big), axis=-1, stable=True).astype(jnp.int32)
  inv = jax.vmap(lambda o: jnp.zeros_like(o).at[o].set(jnp.arange(k, dtype=jnp.int32)))(order)
  slot = jnp.where(keep, jnp.take_along_axis(inv, jnp.maximum(assign, 0), axis=1), -1)
  take = lambda a: jnp.take_along_axis(a, order, axis=1)
  size, total, mask = take(size), take(total), take(mask)
  x = P.slot_sum(tokens.x.astype(jnp.float32) * w[..., None], slot, k)
  x = (x / jnp.maximum(total, 1e-30)[..., None]).astype(tokens.x.dtype)
  return Tokens(x=x, pos=jax.vmap(lambda p, o: p[o])(pos, order).astype(jnp.int32), size=size,
                mask=mask, src=P.remap_src(tokens.src, slot), grid=tokens.grid)


# Chat-UniVi's image cascade: clusters per level and the CTM modules' k (model_config.py, arch.py).
CHAT_UNIVI_LEVELS = (64, 32, 16)
CHAT_UNIVI_K = (5, 3, 3)


def ctm_k(k: int, clusters: int) -> int:
  """The density neighbours Chat-UniVi's CTM uses: k, or min(3, max(clusters // 2, 1)) when k
  exceeds the cluster count."""
  return min(3, max(clusters // 2, 1)) if k > clusters else k


def cascade(tokens, levels: Sequence[int] = CHAT_UNIVI_LEVELS,
            ks: Sequence[int] = CHAT_UNIVI_K, *, rng: Optional[jax.Array] = None
            ) -> Tuple[Tokens, ...]:
  """Chat-UniVi's cascade: level i clusters level i - 1 (the tokens given, for i = 0) into
  `levels[i]` tokens with `ctm_k(ks[i], levels[i])` density neighbours, plain means.

  Returns one `Tokens` per level, each in raster order of its centres (the official order is the
  centres' score order) and over the input's patch grid. rng: optional PRNG key, the official
  density noise (one fold per level).
  """
  if len(levels) != len(ks) or not levels:
    raise ValueError(f"dpc_knn.cascade: levels {tuple(levels)} and ks {tuple(ks)} must be "
                     "non-empty and of one length")
  out = []
  for i, (clusters, k) in enumerate(zip(levels, ks)):
    key = None if rng is None else jax.random.fold_in(rng, i)
    tokens = dpc_knn(tokens, clusters, k=ctm_k(k, clusters), rng=key)
    out.append(tokens)
  return tuple(out)


def concatenate(levels) -> Tuple[jax.Array, jax.Array]:
  """(x float[B, sum K, D], mask bool[B, sum K]): the levels' tokens one after the other, as
  Chat-UniVi feeds its projector (64 + 32 + 16 = 112 tokens for the default levels)."""
  return (jnp.concatenate([t.x for t in levels], 1),
          jnp.concatenate([t.mask for t in levels], 1))
