"""SparseVLM v1.5 / v2.0 against a NumPy transcription of the official code (Gumpest/SparseVLMs
`modelling_sparse_llama.py`, `score.py`, `utils.py::cluster_and_merge`): the counts, one step on
random inputs (same kept set, same recycled clusters and features), and through the model, where
the raters, the layer's attention per head, the RoPE-only logits and the hidden states come from
the independent NumPy decoder (tests/paligemma_ref.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paligemma_ref as ref
import tcjax
import tcjax.checkpoints as ckpt
from tcjax import compress
from tcjax.compress.sparsevlm import kept_by_score, output_size, recycled, scored_for, text_raters
from tcjax.nn import GemmaConfig, PaliGemma, PaliGemmaConfig, SiglipConfig
from tcjax.nn import plan as plan_lib

from helpers import check_contract

# ---- The official algorithm, in NumPy (float64). ----


def softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def raters_numpy(x_img, x_text):
  """bool[T]: the text tokens whose mean (over the visual tokens) softmax-over-text relevance of
  the raw dot products beats the mean (`t_token_idx`)."""
  r = softmax(x_img @ x_text.T, 1).mean(0)
  return r > r.mean()


def scores_numpy(p, raters, version, rope=None, heads=14):
  """float[N] from attention probabilities p [H, T, N] (text rows x visual columns):
  `attn_postprocess_topk`, after v2.0's gravity correction and priority heads."""
  if version == "v2.0":
    p = p / rope[None]
    mass = p[:, raters].sum((1, 2))  # `select_attn_head_by_sum`
    p = p[np.argsort(-mass, kind="stable")[:heads]]
  return p.mean(0)[raters].mean(0)


def cluster_and_merge_numpy(x, c):
  """DPC-KNN with k = c neighbours, c clusters, plain means: (centres, cluster of each, means).

  With k = 2 (self and the nearest) two mutual nearest neighbours have exactly equal density;
  the official code breaks such ties with U(0, 1) * 1e-6 noise, here (as tcjax without `rng`)
  the lower index counts as denser."""
  dist = np.linalg.norm(x[:, None] - x[None], axis=-1) / np.sqrt(x.shape[1])
  density = np.exp(-(np.sort(dist, 1)[:, :c] ** 2).mean(1))
  idx = np.arange(len(x))
  denser = (density[None, :] > density[:, None]) | (
      (density[None, :] == density[:, None]) & (idx[None, :] < idx[:, None]))
  delta = np.where(denser, dist, dist.max()).min(1)
  centres = np.argsort(-(delta * density), kind="stable")[:c]
  cluster = dist[centres].argmin(0)
  cluster[centres] = np.arange(c)
  return centres, cluster, np.stack([x[cluster == j].mean(0) for j in range(c)])


def step_numpy(x, s, scored, version):
  """One sparse step on x [N, D] with scores s [N]: (kept indices ascending, {centre index:
  (merged feature, member indices)} of the recycled clusters, v1.5 only)."""
  kept = np.sort(np.argsort(-s, kind="stable")[:scored])
  if version == "v2.0":
    return kept, {}
  deleted = np.setdiff1d(np.arange(len(s)), kept)
  r = int(len(deleted) * 0.3) + 1  # top 30 % of the deleted, by score
  rec = deleted[np.argsort(-s[deleted], kind="stable")[:r]]
  centres, cluster, merged = cluster_and_merge_numpy(x[rec], int(r / 10) + 1)
  return kept, {rec[ci]: (merged[j], rec[cluster == j]) for j, ci in enumerate(centres)}


def rope_logits_numpy(pos_q, pos_k, head_dim, base):
  """[Tq, Tk]: the logits of all-ones queries and keys rotated to these positions, / sqrt(h):
  2 sum_i cos((p - p') theta_i) with theta_i = base^(-i / (h / 2))."""
  theta = base ** (-np.arange(head_dim // 2) / (head_dim // 2))
  d = (pos_q[:, None] - pos_k[None, :])[..., None] * theta
  return 2 * np.cos(d).sum(-1) / np.sqrt(head_dim)


# ---- Counts. ----


def test_counts_hand_worked():
  # 576 tokens, 300 kept (the 192 list's first value): 276 deleted, int(82.8) + 1 = 83 recycled
  # into int(8.3) + 1 = 9 clusters.
  assert recycled(576, 300) == (83, 9)
  assert output_size(576, 300, "v1.5") == 309 and output_size(576, 300, "v2.0") == 300
  assert recycled(576, 575) == (1, 1) and recycled(576, 576) == (0, 0)
  assert kept_by_score(256, 300) == 255  # at least one token goes, as the official min
  for n in (16, 64, 576):
    for k in range(n):
      out = output_size(n, k, "v1.5")
      assert output_size(n, scored_for(n, out, "v1.5"), "v1.5") == out
  with pytest.raises(ValueError, match="not reachable"):
    scored_for(64, 1, "v1.5")  # keeping none still recycles 2 clusters


# ---- One step on random inputs. ----


def step_inputs(n=64, grid=(8, 8), b=3, heads=4, rows=6, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(b, n, 8)).astype(np.float32)
  p = softmax(3 * rng.normal(size=(b, heads, rows, n))).astype(np.float32)
  raters = rng.random((b, rows)) < 0.6
  raters[:, 0] = True
  rope = (1 + rng.random((b, rows, n))).astype(np.float32)
  return tcjax.Tokens.from_grid(jnp.asarray(x), grid), x, p, raters, rope


@pytest.mark.parametrize("version, n, scored", [("v1.5", 64, 20), ("v1.5", 64, 50),
                                                ("v1.5", 100, 10), ("v2.0", 64, 20)])
def test_step_matches_numpy(version, n, scored):
  grid = (8, 8) if n == 64 else (10, 10)
  t, x, p, raters, rope = step_inputs(n, grid)
  budget = output_size(n, scored, version)
  out = jax.jit(lambda t, a, ha, m, g: compress.sparsevlm(
      t, budget, attn=a, attn_heads=ha, text_mask=m, rope_logits=g, version=version, heads=3,
      scored=scored))(t, p.mean(1), p, raters, rope)
  check_contract(out, budget, 3)
  for b in range(3):
    s = scores_numpy(p[b].astype(np.float64), raters[b], version, rope[b], heads=3)
    kept, clusters = step_numpy(x[b].astype(np.float64), s, scored, version)
    lin = np.asarray(out.pos[b, :, 1] * grid[1] + out.pos[b, :, 2])
    np.testing.assert_array_equal(lin, np.sort(np.concatenate([kept, list(clusters)])))
    src = np.asarray(out.src[b])
    for i, pos in enumerate(lin):
      if pos in clusters:
        feat, members = clusters[pos]
        np.testing.assert_allclose(np.asarray(out.x[b, i]), feat, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.sort(np.flatnonzero(src == i)), np.sort(members))
      else:
        np.testing.assert_array_equal(np.asarray(out.x[b, i]), x[b, pos])
        assert np.flatnonzero(src == i).tolist() == [pos]
  if version == "v1.5":
    assert len(clusters) >= 1  # the case recycles


def test_budget_alone_and_padding():
  t, x, p, raters, _ = step_inputs()
  a = jnp.asarray(p.mean(1))
  run = jax.jit(lambda t, scored=None: compress.sparsevlm(t, 22, attn=a, text_mask=raters,
                                                          scored=scored), static_argnums=1)
  # Without `scored`, the budget decides it: 22 = 20 kept + 2 clusters.
  np.testing.assert_array_equal(np.asarray(run(t).src), np.asarray(run(t, 20).src))
  # Padding is never kept nor recycled while valid tokens remain.
  mask = np.ones((3, 64), bool)
  mask[1, 40:] = False
  tp = t.replace(mask=jnp.asarray(mask), size=jnp.asarray(mask, jnp.float32),
                 src=jnp.where(jnp.asarray(mask), t.src, -1))
  out = run(tp)
  check_contract(out, 22, 3)
  assert np.all(np.asarray(out.src[1, 40:]) == -1)
  assert int(out.count()[1]) == 22


def test_bad_input():
  t, _, p, raters, rope = step_inputs()
  a = jnp.asarray(p.mean(1))
  with pytest.raises(ValueError, match="version"):
    compress.sparsevlm(t, 16, attn=a, version="v1")
  with pytest.raises(ValueError, match="heads"):
    compress.sparsevlm(t, 16, attn=a, heads=0)
  with pytest.raises(ValueError, match="scored"):
    compress.sparsevlm(t, 16, attn=a, scored=16)  # 16 kept + 2 clusters is 18, not 16
  with pytest.raises(ValueError, match="attn_heads"):
    compress.sparsevlm(t, 16, attn=a, version="v2.0")
  with pytest.raises(ValueError, match="rope_logits"):
    compress.sparsevlm(t, 16, attn=a, attn_heads=p, version="v2.0")
  with pytest.raises(ValueError, match="text_mask"):
    compress.sparsevlm(t, 16, attn=a, text_mask=raters[:, :3])
  with pytest.raises(ValueError, match="not reachable"):
    compress.sparsevlm(t, 2, attn=a)


def test_plan_schedule():
  norm = lambda opts: plan_lib.normalize((("llm", {"method": "sparsevlm", **opts}),))
  hooks = plan_lib.llm_hooks(norm({"layers": (3, 7), "budgets": (300, 200)}), 8)
  assert [h.layer for h in hooks] == [3, 7]
  assert all(h.rows is text_raters and h.schedule == "sparsevlm" for h in hooks)
  assert hooks[0].signals == ("attn", "text_mask") and hooks[0].size == ("budgets", 300)
  # 256 tokens in: 255 kept by score (min(300, N - 1)), 1 recycled cluster: 256 out.
  assert plan_lib.hook_size(hooks[0], 256, 256, "") == (256, {"scored": 255})
  (h,) = plan_lib.llm_hooks(norm({"layers": (2,), "keeps": (0.5,), "version": "v2.0",
                                  "heads": 2}), 8)
  assert h.signals == ("attn", "text_mask", "attn_heads", "rope_logits")
  assert dict(h.options) == {"version": "v2.0", "heads": 2}
  assert plan_lib.hook_size(h, 64, 64, "") == (32, {"scored": 32})
  for bad, word in (({"version": "v9.9"}, "'v9.9'"), ({"heads": "14"}, "heads"),
                    ({"scored": 3}, "'scored'")):
    with pytest.raises(ValueError, match=word):
      norm({"layers": (2,), "budgets": (8,), **bad})


# ---- Through the model: Gemma 2, 4 query heads over 2 KV heads. ----

IMG = SiglipConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=16)
N = IMG.num_patches  # 16
CONFIG = PaliGemmaConfig(img=IMG, llm=GemmaConfig(
    version=2, vocab_size=40, width=24, depth=3, mlp_dim=48, num_heads=4, num_kv_heads=2,
    head_dim=8, query_pre_attn_scalar=8, attn_logits_softcap=20.0, final_logits_softcap=10.0,
    sliding_window=64))


@pytest.mark.parametrize("version", ["v1.5", "v2.0"])
def test_in_the_decoder_matches_numpy(version):
  """A step at layer 2 (official pruning_loc 1): raters from the input embeddings, scores from
  layer 1's attention (v2.0: per head, corrected by the RoPE-only logits, 2 priority heads of
  4), kept tokens and v1.5's recycled cluster from the hidden states entering layer 2; the
  prefill logits equal the NumPy decoder run on that pruned and merged sequence, renumbered
  0..n-1 from layer 2 on for v1.5 and at the original positions for v2.0 (the official
  positions of each version, the plan's default)."""
  rng = np.random.default_rng(1)
  flat = {k: (rng.normal(size=s) / np.sqrt(s[-2] if len(s) > 1 else s[-1])).astype(np.float32)
          for k, s in ckpt.param_shapes(CONFIG).items()}
  params = ckpt.unflatten({k: jnp.asarray(v) for k, v in flat.items()})
  image = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  text = rng.integers(3, 40, (2, 6)).astype(np.int32)
  text[:, 0] = 2
  plan = (("llm", {"method": "sparsevlm", "layers": (2,), "budgets": (6,), "version": version,
                   "heads": 2}),)
  model = PaliGemma(CONFIG).with_plan(plan)
  logits, _, aux = jax.jit(lambda p: model.apply({"params": p}, image, text,
                                                 method=model.prefill))(params)
  # The NumPy decoder on the full sequence: layer 1's attention, the states entering layer 2.
  x0 = np.concatenate([ref.image_embed(flat, CONFIG, image), ref.embed_text(flat, CONFIG, text)],
                      1)
  ar = np.zeros((2, N + 6))
  hidden = {}
  _, attns, _ = ref.decoder(flat, CONFIG, x0, ar, attn_layers=(1,), hidden=hidden)
  pos = np.arange(N + 6, dtype=np.float64)
  rope = rope_logits_numpy(pos[N:], pos[:N], 8, CONFIG.llm.rope_base)
  keep, merged = np.zeros((2, N + 6), bool), hidden[2].copy()
  scored = 6  # min(6, 16 - 1)
  for b in range(2):
    raters = raters_numpy(x0[b, :N], x0[b, N:])
    s = scores_numpy(attns[1][b][:, N:, :N], raters, version, rope, heads=2)
    kept, clusters = step_numpy(hidden[2][b, :N], s, scored, version)
    stay = np.sort(np.concatenate([kept, list(clusters)])).astype(int)
    np.testing.assert_array_equal(np.asarray(aux["llm_kept_pos"][0][b]), stay)
    keep[b, stay], keep[b, N:] = True, True
    for c, (feat, _) in clusters.items():
      merged[b, c] = feat
  assert aux["llm_tokens"][-1] == N + 6 - (N - scored) + (version == "v1.5")
  x2 = np.stack([merged[b, keep[b]] for b in range(2)])
  renumber = {2: lambda x, pos, ar, _: (x, np.broadcast_to(np.arange(x.shape[1], dtype=float),
                                                           x.shape[:2]), ar)}
  want, _, _ = ref.decoder(flat, CONFIG, x0, ar, prune={2: keep}, override={2: x2},
                           at_layer=renumber if version == "v1.5" else None)
  np.testing.assert_allclose(np.asarray(logits), want[:, -1], atol=2e-4, rtol=2e-4)
