"""DivPrune: visual token pruning as a Max-Min Diversity problem, solved greedily.

Alvar, Singh, Akbari, Zhang, "DivPrune: Diversity-based Visual Token Pruning for Large
Multimodal Models", arXiv 2503.02175, CVPR 2025 (official code: vbdi/divprune).

Axis legend: B batch, N tokens, D features, C rows per chunk.

Official behaviour (followed here), with distance d(i, j) = 1 - cos(x_i, x_j) in float32:
  1. The first token is the most isolated one: the argmax over j of min_{i != j} d(i, j).
  2. Then, `budget - 1` times, add the token whose minimum distance to the selected set is the
     largest (first index on ties).
  3. The kept tokens are returned in raster order.
The official code recomputes the column-wise min over the selected rows of the full N x N
distance matrix every step; a running minimum updated with one similarity row per step gives
the same selection. The first pick needs every pairwise similarity anyway (N^2 D / 2 with the
symmetric `primitives.gram`), so up to `GRAM_MAX_TOKENS` tokens the N x N matrix is kept and a
greedy step reads one of its rows (O(N)); a step that recomputes the row from the features
instead reads all N x D features, which makes the `budget` sequential steps memory-bound and
several times slower. Above that size (long videos) nothing N x N is held: the nearest
neighbours come from row chunks and each step is one matrix-vector product.
Selected tokens are masked explicitly (their self-distance is not relied on to be 0).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tcjax.compress import primitives as P
from tcjax.compress.registry import register
from tcjax.parallel.mesh import batch_shards, map_batch

# Largest N for which the N x N cosine matrix is kept by default (4 N^2 bytes per example).
GRAM_MAX_TOKENS = 4096
# Rank of a token that must not be picked while real tokens remain (distances are >= ~0).
_INVALID = -10.0


def nearest_distance(xn: jax.Array, valid: jax.Array, chunk: int = 512) -> jax.Array:
  """float32[N] cosine distance of each token to its nearest other valid token (inf if none).

  The similarity matrix is symmetric: only the blocks on and above the diagonal are computed
  (about half the FLOPs), one `chunk x chunk` block at a time, each updating the minima of its
  rows and of its columns.

  Args:
    xn: float32[N, D] unit-normalised features of one example.
    valid: bool[N] tokens that count as neighbours.
    chunk: block side.
  """
  n, d = xn.shape
  num = -(-n // min(chunk, n))
  chunk = -(-n // num)  # near-equal blocks: little padding
  pad = num * chunk - n
  blocks = jnp.pad(xn, ((0, pad), (0, 0))).reshape(num, chunk, d)
  ok = jnp.pad(valid, (0, pad)).reshape(num, chunk)
  pairs = np.array([(i, j) for i in range(num) for j in range(i, num)], np.int32)
  pi, pj = jnp.asarray(pairs[:, 0]), jnp.asarray(pairs[:, 1])
  eye = jnp.eye(chunk, dtype=bool)

  def body(p, mins):
    i, j = pi[p], pj[p]
    dist = 1.0 - jnp.einsum("cd,ed->ce", blocks[i], blocks[j], preferred_element_type=jnp.float32)
    dist = jnp.where((i == j) & eye, jnp.inf, dist)  # a token is not its own neighbour
    row = jnp.where(ok[j][None, :], dist, jnp.inf).min(1)
    col = jnp.where(ok[i][:, None], dist, jnp.inf).min(0)
    mins = mins.at[i].min(row)
    return mins.at[j].min(col)

  mins = jnp.full((num, chunk), jnp.inf) + 0 * valid[:1, None].astype(jnp.float32)  # batched
  mins = jax.lax.fori_loop(0, len(pairs), body, mins)
  return mins.reshape(-1)[:n]


def maxmin_select(xn: jax.Array, valid: jax.Array, budget: int,
                  cache_gram: bool = True) -> jax.Array:
  """int32[budget] greedy max-min diversity selection (in pick order) on one example.

  Invalid tokens (padding, non-finite features) are picked only after every valid one.
  With `cache_gram` the N x N similarity matrix is kept and each step reads one of its rows
  instead of a matrix-vector product over the features.
  """
  n = xn.shape[0]
  if cache_gram:
    # Invalid tokens' features are zeroed (finite) and the diagonal set to -inf, so that the
    # nearest other valid token is a max of `gram + column bias`, with no compare-and-select
    # over the N x N matrix (XLA's CPU loops run those several times slower than a max). The
    # rows read by the steps differ from the plain Gram only where that cannot change a pick:
    # a token's own entry (it is taken when its row is read) and invalid tokens' entries (their
    # key stays `_INVALID`, and an invalid token is picked only after every valid one).
    idx = jnp.arange(n)
    gram = P.gram(jnp.where(valid[:, None], xn, 0.0)).at[idx, idx].set(-jnp.inf)
    bias = jnp.where(valid, 0.0, -jnp.inf)
    nn = 1.0 - jnp.max(gram + bias[None, :], -1)
    row = lambda j: gram[j]
  else:
    nn = nearest_distance(xn, valid)
    row = lambda j: jnp.einsum("nd,d->n", xn, xn[j], preferred_element_type=jnp.float32)
  first = jnp.argmax(jnp.where(valid & ~jnp.isnan(nn), nn, _INVALID))

  # key: the running minimum distance to the picks for valid tokens, `_INVALID` for invalid ones,
  # -inf once taken; `fmin` with a row of distances (>= ~0 > _INVALID) keeps the last two.
  def add(state, j, i):
    key, picks = state
    # fmin: a non-finite pick (only after all valid ones) does not poison the running minimum.
    key = jnp.fmin(key, 1.0 - row(j))
    return key.at[j].set(-jnp.inf), picks.at[i].set(j)

  state = (jnp.where(valid, jnp.inf, _INVALID).astype(jnp.float32),
           jnp.zeros((budget,), jnp.int32))
  state = add(state, first.astype(jnp.int32), 0)

  def body(i, state):
    return add(state, jnp.argmax(state[0]).astype(jnp.int32), i)

  return jax.lax.fori_loop(1, budget, body, state)[1]


# `keys` on request (an entry's "signals"): the ViT's head-mean keys before the LLM; in the
# decoder the keys of layer K-1 with the KV heads concatenated (as since the variant was added).
@register("divprune", family="sampling", stages=("post_vit", "post_proj", "llm"),
          paper="DivPrune, Alvar et al., arXiv 2503.02175 (CVPR 2025)",
          llm_signals={"keys": "keys_concat"})
def divprune(tokens, budget, *, keys=None, cache_gram=None):
  """Keep the `budget` tokens chosen by greedy max-min cosine diversity, in raster order.

  Args:
    tokens: N tokens; the official method acts on the projected (LLM input) embeddings.
    budget: tokens kept (official: round(0.098 * N), 56 of 576).
    keys: optional float[B, N, Dk] features to measure diversity on instead of `tokens.x`.
    cache_gram: keep the N x N cosine matrix (4 N^2 bytes per example) so that each greedy step
      reads a row instead of a matrix-vector product over all features (same selection, up to
      float rounding of near-ties). None (default): when N <= GRAM_MAX_TOKENS (4096: 64 MiB
      per example); False streams (no N x N matrix held).

  Padding tokens and tokens with non-finite features are kept only when the budget exceeds the
  valid tokens.
  """
  name = "divprune"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  b, n, _ = tokens.x.shape
  feats = tokens.x if keys is None else P.check_array(keys, "keys", name, (b, n, None))
  xn = P.l2_normalize(feats)
  valid = tokens.mask & jnp.all(jnp.isfinite(xn), -1)
  if cache_gram is None:
    cache_gram = n <= GRAM_MAX_TOKENS
  select = jax.vmap(lambda x, v: maxmin_select(x, v, budget, bool(cache_gram)))
  chunks = 1
  if jax.default_backend() == "cpu" and cache_gram:
    # One example's N x N Gram at a time on CPU: its buffer is reused from the allocator instead
    # of B of them faulted in afresh on every call.
    shards = batch_shards(valid)
    chunks = b // shards if b % shards == 0 else 1
  idx = map_batch(select, (xn, valid), chunks)
  return P.gather(tokens, jnp.sort(idx, axis=-1))
