"""FrameFusion against a NumPy transcription of the official first merging call
(thu-nics/FrameFusion `framefusion/main.py`: patch-ordered similarities with the -2 sentinel,
the threshold / top-k branch, runs merged into the token before them) followed by the pruning
step; a hand-worked clip; the official cost model; the merge-then-decoder-prune plan."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tcjax
import tcjax.checkpoints as ckpt
from tcjax import compress
from tcjax.compress.framefusion import pruning_ratio
from tcjax.compress.registry import METHODS
from tcjax.nn import GemmaConfig, PaliGemma, PaliGemmaConfig, SiglipConfig

from helpers import check_contract

T, H, W, D = 5, 3, 4, 8
N = T * H * W


@functools.lru_cache(maxsize=None)
def _jitted(budget, **opts):
  return jax.jit(lambda t, s: compress.framefusion(t, budget, scores=s, **opts))


# ---- The official algorithm, transcribed (one example, its valid tokens in sequence order). ----


def official_merge(x, patch_type, num_patches, threshold, bound, below_bound):
  """One merging call of the official `FrameFusion.forward` (batch 1, visual tokens only).

  Args:
    x: float64[n, D] hidden states in sequence order; patch_type: int[n] location of each.
    bound: the top-k branch's count int(u * n); below_bound(count): the official test
      `count / n < u` that selects the threshold branch.

  Returns:
    (x after merging, keep bool[n], owner int[n] the token each one ends up in, whether the
    threshold branch ran, i.e. pruning still follows).
  """
  n = len(x)
  # compute_similarity_and_token_index_by_patch: tokens grouped by patch type, in time order.
  type_by, tok_by = np.nonzero(patch_type[None, :] == np.arange(num_patches)[:, None])
  a, b = x[tok_by[:-1]], x[tok_by[1:]]
  sim = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))
  sim[type_by[:-1] != type_by[1:]] = -2
  sim = np.concatenate([[-2.0], sim])
  candidates = np.nonzero(sim >= threshold)[0]
  if below_bound(len(candidates)):
    merge, prune = candidates, True
  else:  # torch.topk; random similarities have no ties
    merge, prune = np.sort(np.argsort(-sim, kind="stable")[:bound]), False
  # merge_tokens_and_get_mask: each run of merged tokens (in patch order) joins the token
  # before it, sum / (run + 1).
  marked = np.zeros(n, bool)
  marked[merge] = True
  keep = np.ones(n, bool)
  keep[tok_by[merge]] = False
  x = x.copy()
  owner = np.arange(n)
  p = 0
  while p < n:
    if not marked[p]:
      p += 1
      continue
    q = p
    while q < n and marked[q]:
      q += 1
    target = tok_by[p - 1]
    assert type_by[p - 1] == type_by[p]  # never the -2 sentinel here
    x[target] = (x[target] + x[tok_by[p:q]].sum(0)) / (q - p + 1)
    owner[tok_by[p:q]] = target
    p = q
  return x, keep, owner, prune


def framefusion_numpy(x, pos, mask, scores, budget, grid, threshold=0.6, cost=None):
  """Expected (kept token indices, their features, src) of one example on a `grid` (T, h, w):
  the official first merge, then the `budget` highest-scoring survivors (stable, NaN last)."""
  _, h, w = grid
  idx = np.flatnonzero(mask)
  patch_type = pos[idx, 1] * w + pos[idx, 2]
  n = len(idx)
  if cost is None:  # the bound for cost = budget / n
    bound, below = n - budget, (lambda c: c < n - budget)
  else:
    u = 1 - (28 * cost) / (28 * 1.0)  # official _compute_pruning_ratio([], cost)
    bound, below = int(u * n), (lambda c: c / n < u)
  xm, keep, owner, prune = official_merge(x[idx].astype(np.float64), patch_type, h * w,
                                          threshold, bound, below)
  survivors = np.flatnonzero(keep)
  if len(survivors) > budget:
    assert prune  # the top-k branch always lands on the budget here
    s = np.where(np.isnan(scores[idx]), -np.inf, scores[idx].astype(np.float64))
    order = sorted(survivors, key=lambda i: (-s[i], i))
    survivors = np.sort(order[:budget])
  slot = {int(i): k for k, i in enumerate(survivors)}
  src = np.full(mask.shape, -1)
  for j in range(n):
    src[idx[j]] = slot.get(int(owner[j]), -1)
  return idx[survivors], xm[survivors], src, prune


def clips(seed=0):
  """3 clips of T frames, each frame the first one plus per-location noise: example 0 moves little
  (many merges), 1 a lot (few), 2 little, with its last 7 tokens padding."""
  rng = np.random.default_rng(seed)
  x = np.zeros((3, T, H * W, D), np.float32)
  x[:, 0] = rng.normal(size=(3, H * W, D))
  level = np.array([0.4, 1.2, 0.4])[:, None, None] * rng.uniform(0.2, 2.0, (3, H * W, 1))
  for t in range(1, T):
    x[:, t] = x[:, 0] + level * rng.normal(size=(3, H * W, D))
  tokens = tcjax.Tokens.from_video(jnp.asarray(x.reshape(3, N, D)), frames=T, grid=(H, W))
  mask = np.ones((3, N), bool)
  mask[2, N - 7:] = False
  tokens = tokens.replace(mask=jnp.asarray(mask), size=jnp.where(mask, 1.0, 0.0),
                          src=jnp.where(mask, tokens.src, -1))
  scores = rng.normal(size=(3, N)).astype(np.float32)
  scores[1, 5] = np.nan
  return tokens, scores


def check_against_numpy(out, tokens, scores, budget, **opts):
  branches = []
  x, pos, mask = (np.asarray(a) for a in (tokens.x, tokens.pos, tokens.mask))
  for b in range(x.shape[0]):
    kept, feats, src, prune = framefusion_numpy(x[b], pos[b], mask[b], scores[b], budget,
                                                tokens.grid, **opts)
    branches.append(prune)
    count = len(kept)
    assert int(out.count()[b]) == count
    lin = np.asarray(out.linear_pos())[b, :count]
    np.testing.assert_array_equal(lin, kept)
    np.testing.assert_allclose(np.asarray(out.x[b, :count]), feats, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out.src[b]), src)
    np.testing.assert_array_equal(np.asarray(out.size[b, :count]),
                                  np.bincount(src[src >= 0], minlength=count))
  return branches


@pytest.mark.parametrize("budget", [22, 36])
def test_matches_official_transcription(budget):
  tokens, scores = clips()
  out = _jitted(budget)(tokens, jnp.asarray(scores))
  check_contract(out, budget, 3)
  branches = check_against_numpy(out, tokens, scores, budget)
  assert branches == [False, True, False]  # the top-k branch, then the threshold branch


def test_cost_bound_merges_only():
  """`cost` gives the official first-call bound; with the budget at N nothing is pruned here
  (the plan then prunes in the decoder)."""
  tokens, scores = clips(1)
  out = _jitted(N, cost=0.3, similarity_lower_bound=0.5)(tokens, jnp.asarray(scores))
  check_contract(out, N, 3)
  check_against_numpy(out, tokens, scores, N, cost=0.3, threshold=0.5)
  assert np.all(np.asarray(out.count()) < np.asarray(tokens.count()))  # something merged


def test_hand_worked():
  # 3 frames of a 1x2 grid. Location 0 never changes; location 1 repeats at frame 1 (cos 1)
  # and turns at frame 2 (cos 0 with frame 1).
  x = jnp.array([[[1.0, 0.0], [0.0, 1.0],
                  [1.0, 0.0], [0.0, 3.0],
                  [1.0, 0.0], [1.0, 0.0]]])
  t = tcjax.Tokens.from_video(x, 3, (1, 2))
  scores = jnp.array([[0.1, 0.9, 0.0, 0.0, 0.0, 0.5]])
  out = _jitted(3)(t, scores)  # 3 repeats merge, 3 survivors: no pruning
  np.testing.assert_array_equal(out.src[0], [0, 1, 0, 1, 0, 2])
  np.testing.assert_allclose(out.x[0], [[1, 0], [0, 2], [1, 0]])
  np.testing.assert_array_equal(out.size[0], [3, 2, 1])
  np.testing.assert_array_equal(out.pos[0], [[0, 0, 0], [0, 0, 1], [2, 0, 1]])
  # Budget 2: the same merges, then the survivor with the lowest score (location 0's token,
  # carrying its 3 frames) is pruned.
  out = _jitted(2)(t, scores)
  np.testing.assert_array_equal(out.src[0], [-1, 0, -1, 0, -1, 1])
  np.testing.assert_allclose(out.x[0], [[0, 2], [1, 0]])
  # Budget 5: one merge allowed, the most similar (all three are cos 1: the first one).
  out = _jitted(5)(t, scores)
  np.testing.assert_array_equal(out.src[0], [0, 1, 0, 2, 3, 4])
  # A threshold above 1 merges nothing; the 2 highest scores survive.
  out = _jitted(2, similarity_lower_bound=1.5)(t, scores)
  np.testing.assert_array_equal(out.src[0], [-1, 0, -1, -1, -1, 1])


def test_pruning_ratio_is_the_official_cost_model():
  def official(sparsity_list, cost, num_layers=28):  # main.py, _compute_pruning_ratio
    s, total = 1, 0
    for v in sparsity_list:
      s *= (1 - v)
      total += s
    remain = num_layers * cost - total
    if remain < 0:
      raise ValueError("The cost is too small")
    if remain / ((num_layers - len(sparsity_list)) * s) > 1:
      return 0
    return 1 - (remain / ((num_layers - len(sparsity_list)) * s))

  for args in [((), 0.3), ((0.4,), 0.3), ((0.5, 0.2), 0.3), ((0.05,), 0.9), ((0.3, 0.1), 0.5, 18),
               ((), 1.0)]:
    assert pruning_ratio(*args) == official(*args)
  with pytest.raises(ValueError, match="too small"):
    pruning_ratio((0.01,) * 10, 0.2)


def test_registry_and_bad_input():
  m = METHODS["framefusion"]
  assert (m.family, m.stages, m.needs) == ("merging", ("post_proj",), ("scores",))
  assert m.options == {"similarity_lower_bound": 0.6, "cost": None} and not m.token_sharded
  tokens, scores = clips()
  with pytest.raises(ValueError, match="2 frames"):
    compress.framefusion(tcjax.Tokens.from_grid(tokens.x[:, :12], (3, 4)), 4,
                         scores=scores[:, :12])
  with pytest.raises(ValueError, match="scores"):
    compress.framefusion(tokens, 8)
  with pytest.raises(ValueError, match="scores"):
    compress.framefusion(tokens, 8, scores=scores[:, 1:])
  for bad in (0.0, 1.5, "0.3", True):
    with pytest.raises(ValueError, match="cost"):
      compress.framefusion(tokens, 8, scores=scores, cost=bad)
  with pytest.raises(ValueError, match="similarity_lower_bound"):
    compress.framefusion(tokens, 8, scores=scores, similarity_lower_bound="high")


# ---- The official importance signal: merge at post_proj, prune in the decoder with FastV. ----


def test_merge_then_decoder_prune_plan():
  """(post_proj framefusion, cost 0.3, keep 1.0) + (llm fastv at layer 1): the merged tokens are
  the transcription's on the projected clip, and the decoder keeps the `budget` merged tokens
  most attended by the last prompt row of layer 0 (the official pruning signal)."""
  img = SiglipConfig(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=4, image_size=16)
  config = PaliGemmaConfig(img=img, llm=GemmaConfig(width=16, depth=2, mlp_dim=32, num_heads=2,
                                                    num_kv_heads=1, head_dim=8, vocab_size=32))
  rng = np.random.default_rng(0)
  params = ckpt.unflatten({k: 0.3 * rng.normal(size=s).astype(np.float32)
                           for k, s in ckpt.param_shapes(config).items()})
  f0, f2 = rng.uniform(-1, 1, (2, 2, 16, 16, 3)).astype(np.float32)
  clip = np.stack([f0, f0 + 0.05 * rng.normal(size=f0.shape).astype(np.float32), f2], 1)
  text = np.array([[2, 5, 6, 7, 9, 1], [2, 5, 8, 9, 1, 0]], np.int32)
  mask_ar = np.array([[0, 0, 0, 0, 1, 1], [0, 0, 0, 1, 1, 1]], np.int32)
  input_mask = text != 0
  plan = (("post_proj", {"method": "framefusion", "keep": 1.0, "cost": 0.3}),
          ("llm", {"method": "fastv", "layer": 1, "budget": 10}))
  model = PaliGemma(config).with_plan(plan)
  plain = PaliGemma(config)

  def run(p, c, t, ma, im):
    zimg, _, _ = plain.apply({"params": p}, c, method=plain.embed_image)
    _, toks, _ = model.apply({"params": p}, c, method=model.embed_image)
    _, aux = model.apply({"params": p}, c, t, ma, im)
    return zimg, toks, aux["llm_attn"][0], aux["llm_kept_pos"][0]

  zimg, toks, attn, kept_pos = jax.jit(run)(params, clip, text, mask_ar, input_mask)
  n = 3 * 16
  full = tcjax.Tokens.from_video(zimg, frames=3, grid=(4, 4))
  scores = np.zeros((2, n), np.float32)  # unused: the budget is N, nothing is pruned here
  check_against_numpy(toks, full, scores, n, cost=0.3)
  count = np.asarray(toks.count())
  assert np.all(count < n) and np.all(count > 10)  # frame 1 repeats frame 0: merged
  prompt = input_mask & (mask_ar == 0)
  last = np.array([np.flatnonzero(p)[-1] for p in prompt])
  row = np.asarray(attn)[np.arange(2), last]  # [B, N] last prompt row, layer 0
  for b in range(2):
    score = np.where(np.arange(n) < count[b], row[b], -np.inf)  # valid merged tokens first
    want = np.sort(np.argsort(-score, kind="stable")[:10])
    np.testing.assert_array_equal(np.asarray(kept_pos[b]), want)  # RoPE position = index


def test_in_the_sweep():
  """The sweep finds it in the registry and runs it once, after the projector."""
  from tcjax.eval import sweep  # pylint: disable=g-import-not-at-top
  from tcjax.nn import plan as plan_lib  # pylint: disable=g-import-not-at-top
  got = sweep.settings(methods=["framefusion"], stages="primary", budgets=(32,))
  assert [s.name for s in got[1:]] == ["framefusion@post_proj/32"]
  plan = sweep.plan_for(got[1], n_tokens=8 * 256, frames=8, vit_depth=2, vit_layer=1,
                        llm_layer=1)
  assert plan_lib.normalize(plan) == (("post_proj", (("budget", 32), ("method", "framefusion"))),)
