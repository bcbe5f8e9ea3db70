"""MustDrop against a NumPy transcription of the official code (liuting20/MustDrop): the window
merge (`local_merge.py::conditional_pooling` + `merge_wavg`), the dual-attention filter with the
key set (`modelling_sparse_llama.py::dual_attention_filter` and the key-set bookkeeping of
`LlamaDynamicvitModel.forward`) over two chained layers, and through the tiny model: the filter
on the decoder's own attention rows, prefill + decoding against the NumPy decoder with the
decode-time cache policy hiding every entry the prefill dropped later, and a plan that drops
nothing leaves the model unchanged."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paligemma_ref as ref
import tcjax
from tcjax import compress
from tcjax.compress.mustdrop import official_layers, official_plan, window_tokens
from tcjax.nn import plan as plan_lib

from helpers import check_contract, greedy_decode
from test_model import CONFIGS, IMG, N, T_PREFIX, inputs, make_params

# ---- The official algorithm, in NumPy (float64). ----


def merge_numpy(feat, grid, ws, threshold):
  """`conditional_pooling` + `merge_wavg` on one image's patch tokens feat [h * w, D] (the
  official also carries a [CLS] token in front, untouched): [(origin index, feature, size)] in
  the official output order: the merged windows (by descending score) at their last token, then
  the unmerged tokens (ascending)."""
  h, w = grid
  idx = np.arange(h * w).reshape(h // ws, ws, w // ws, ws).transpose(0, 2, 1, 3).reshape(-1,
                                                                                         ws * ws)
  win = feat[idx]  # [W, k, D]
  norm = np.linalg.norm(win, axis=-1)
  sims = np.einsum("wid,wjd->wij", win, win) / np.maximum(norm[:, :, None] * norm[:, None], 1e-8)
  k = ws * ws
  score = (sims * (1 - np.eye(k))).sum((1, 2)) / (k * (k - 1))
  r = int((score >= threshold).sum())
  top = np.argsort(-score, kind="stable")[:r]
  merged = set(idx[top].reshape(-1).tolist())
  out = [(idx[wi, -1], win[wi].mean(0), k) for wi in top]  # x * size summed / size summed
  out += [(i, feat[i], 1) for i in range(h * w) if i not in merged]
  return out


def key_set_numpy(cls_attn, n):
  """The top ceil(0.08 * n) tokens by [CLS] attention (`custom_forward`, layer 23)."""
  return np.argsort(-cls_attn, kind="stable")[:math.ceil(0.08 * n)]


def filter_numpy(attn, key, global_thr, individual_thr):
  """`dual_attention_filter` on the head-mean attention attn [text rows, visual] and the key
  set union: (kept visual indices ascending, the key set re-indexed into them)."""
  attn_sum = attn.sum(0)
  candidate = (attn_sum < attn_sum.sum() * global_thr) & (attn.max(0) < individual_thr)
  vis = np.arange(attn.shape[1])[~candidate]
  vis = np.unique(np.concatenate([vis, key]))
  return vis, np.flatnonzero(np.isin(vis, key))


# ---- The window merge. ----


def similar_windows(grid, ws, batch, seed, calm=0.5, dim=8):
  """Patches whose windows are near-constant with probability `calm` (high window score), else
  random."""
  rng = np.random.default_rng(seed)
  idx = window_tokens((1,) + grid, ws)
  x = rng.normal(size=(batch, grid[0] * grid[1], dim))
  for b in range(batch):
    for win in idx:
      if rng.random() < calm:
        x[b, win] = rng.normal(size=dim) + 0.2 * rng.normal(size=(len(win), dim))
  return x.astype(np.float32)


MERGE = jax.jit(compress.mustdrop_merge, static_argnums=1,
                static_argnames=("window", "threshold"))


@pytest.mark.parametrize("grid, ws", [((6, 6), 3), ((8, 8), 2)])
def test_merge_matches_official(grid, ws):
  x = similar_windows(grid, ws, batch=3, seed=ws)
  t = tcjax.Tokens.from_grid(jnp.asarray(x), grid)
  n = grid[0] * grid[1]
  out = MERGE(t, n, window=ws)
  check_contract(out, n, 3)
  lin = np.asarray(out.linear_pos())
  for b in range(3):
    want = merge_numpy(x[b].astype(np.float64), grid, ws, 0.8)
    assert int(out.count()[b]) == len(want) < n  # something merged, the official count
    for origin, feat, size in want:
      (slot,) = np.flatnonzero((lin[b] == origin) & np.asarray(out.mask[b]))
      np.testing.assert_allclose(np.asarray(out.x[b, slot]), feat, atol=1e-5)
      assert float(out.size[b, slot]) == size
  # Each example merged its own windows (the official takes the batch's minimum count).
  assert len(set(np.asarray(out.count()).tolist())) > 1


def test_merge_budget_and_errors():
  x = similar_windows((6, 6), 3, batch=2, seed=0, calm=0.0)  # nothing similar: no merge
  t = tcjax.Tokens.from_grid(jnp.asarray(x), (6, 6))
  np.testing.assert_array_equal(MERGE(t, 36).count(), [36, 36])
  out = MERGE(t, 20)  # two windows must go: the two most similar
  check_contract(out, 20, 2)
  np.testing.assert_array_equal(out.count(), [20, 20])
  xw = x[:, window_tokens((1, 6, 6), 3)]
  xn = xw / np.linalg.norm(xw, axis=-1, keepdims=True)
  score = (np.einsum("bwid,bwjd->bwij", xn, xn).sum((2, 3)) - 9) / 72
  for b in range(2):
    top = np.sort(np.argsort(-score[b], kind="stable")[:2])
    dst = window_tokens((1, 6, 6), 3)[top, -1]
    assert set(dst) <= set(np.asarray(out.linear_pos()[b]).tolist())
    np.testing.assert_array_equal(np.sort(np.asarray(out.size[b]))[-2:], [9, 9])
  with pytest.raises(ValueError, match="window 3 does not divide the 4x4 grid"):
    compress.mustdrop_merge(tcjax.Tokens.from_grid(jnp.ones((1, 16, 4)), (4, 4)), 16)
  with pytest.raises(ValueError, match="at least 4"):
    compress.mustdrop_merge(t, 3)
  with pytest.raises(ValueError, match="window"):
    compress.mustdrop_merge(t, 36, window=1)
  with pytest.raises(ValueError, match="colour"):
    compress.apply("mustdrop_merge", t, 36, colour=1)
  with pytest.raises(ValueError, match="full grid"):
    compress.mustdrop_merge(compress.uniform(t, 9), 9)


# ---- The dual-attention filter and the key set. ----


def _filter_inputs(b, n, t_rows, seed):
  rng = np.random.default_rng(seed)
  attn = jax.nn.softmax(3 * rng.normal(size=(b, t_rows, n)), -1)
  rows = np.ones((b, t_rows), bool)
  rows[1, -2:] = False  # example 1: two rows that do not count (padding / suffix)
  return np.asarray(attn, np.float64), rows, rng.random((b, n))


def test_filter_matches_official_over_two_layers():
  b, n, t_rows = 3, 36, 5
  g_thr, i_thr = 0.02, 0.06
  attn, rows, cls = _filter_inputs(b, n, t_rows, seed=0)
  tokens = tcjax.Tokens.from_grid(jnp.asarray(np.random.default_rng(1).normal(
      size=(b, n, 8)), jnp.float32), (6, 6))
  count = jnp.full((b,), n, jnp.int32)
  run = jax.jit(lambda t, a, r, s: compress.mustdrop(
      t, n, attn=a, text_mask=r, vit_scores=s, image_count=count, global_thr=g_thr,
      individual_thr=i_thr))
  out = run(tokens, jnp.asarray(attn, jnp.float32), jnp.asarray(rows), jnp.asarray(cls))
  check_contract(out, n, b)
  # The second layer: new attention over the survivors (padding columns: anything), the ViT
  # scores follow the tokens (the decoder gathers them).
  attn2, _, _ = _filter_inputs(b, n, t_rows, seed=2)
  kept1 = [np.flatnonzero(s >= 0) for s in np.asarray(out.src)]
  cls2 = np.zeros((b, n))
  for i in range(b):
    cls2[i, :len(kept1[i])] = cls[i, kept1[i]]
  out2 = run(out, jnp.asarray(attn2, jnp.float32), jnp.asarray(rows), jnp.asarray(cls2))
  dropped = saved = 0
  for i in range(b):
    r = rows[i]
    key = key_set_numpy(cls[i], n)
    vis1, key1 = filter_numpy(attn[i][r], key, g_thr, i_thr)
    np.testing.assert_array_equal(kept1[i], vis1)
    m = len(vis1)
    vis2, _ = filter_numpy(attn2[i][r][:, :m], key1, g_thr, i_thr)
    got2 = np.flatnonzero(np.asarray(out2.src[i]) >= 0)
    np.testing.assert_array_equal(got2, vis1[vis2])
    np.testing.assert_allclose(np.asarray(out2.x[i, :len(vis2)]),
                               np.asarray(tokens.x[i])[vis1[vis2]])
    plain, _ = filter_numpy(attn[i][r], np.zeros(0, int), g_thr, i_thr)
    dropped += n - len(vis1)
    saved += len(vis1) - len(plain)  # key tokens the filter alone would have dropped
  assert dropped > 0 and saved > 0


def test_filter_capacity_key_tokens_first():
  b, n = 2, 36
  attn, rows, cls = _filter_inputs(b, n, 4, seed=3)
  tokens = tcjax.Tokens.from_grid(jnp.zeros((b, n, 4)), (6, 6))
  count = jnp.full((b,), n, jnp.int32)
  out = jax.jit(lambda *a: compress.mustdrop(
      tokens, 5, attn=a[0], text_mask=a[1], vit_scores=a[2], image_count=count,
      global_thr=0.0, individual_thr=0.0))(jnp.asarray(attn, jnp.float32), jnp.asarray(rows),
                                           jnp.asarray(cls))
  for i in range(b):  # nothing is dropped by the filter; 3 key tokens (ceil(0.08 * 36)) first
    key = np.sort(key_set_numpy(cls[i], n))
    assert set(key) <= set(np.flatnonzero(np.asarray(out.src[i]) >= 0))
  np.testing.assert_array_equal(out.count(), [5, 5])


def test_filter_errors():
  b, n = 2, 36
  attn, rows, cls = _filter_inputs(b, n, 4, seed=4)
  tokens = tcjax.Tokens.from_grid(jnp.zeros((b, n, 4)), (6, 6))
  kw = dict(attn=jnp.asarray(attn, jnp.float32), text_mask=jnp.asarray(rows),
            vit_scores=jnp.asarray(cls), image_count=jnp.full((b,), n, jnp.int32))
  with pytest.raises(ValueError, match="image_count"):
    compress.mustdrop(tokens, n, **{**kw, "image_count": jnp.full((b,), 3.0)})
  with pytest.raises(ValueError, match="vit_scores"):
    compress.mustdrop(tokens, n, **{**kw, "vit_scores": None})
  with pytest.raises(ValueError, match="global_thr"):
    compress.mustdrop(tokens, n, **kw, global_thr=-1)
  with pytest.raises(ValueError, match="key_ratio"):
    compress.mustdrop(tokens, n, **kw, key_ratio=2.0)
  with pytest.raises(ValueError, match="colour"):
    compress.apply("mustdrop", tokens, n, colour=1, **kw)


def test_key_count_is_the_official():
  # CLIP-L/336: 576 patches, ceil(0.08 * 576) = 47 key tokens when nothing merged.
  from tcjax.compress.mustdrop import key_set  # pylint: disable=g-import-not-at-top
  cls = np.random.default_rng(5).random((2, 576))
  mask = jnp.ones((2, 576), bool)
  got = key_set(jnp.asarray(cls), mask, jnp.array([576, 400]), 0.08, 576)
  np.testing.assert_array_equal(np.asarray(got.sum(-1)), [47, 32])
  np.testing.assert_array_equal(np.flatnonzero(np.asarray(got[0])),
                                np.sort(key_set_numpy(cls[0], 576)))


# ---- The plan. ----


def test_official_layers_and_plan():
  assert official_layers(32) == ((3, 7, 11, 15), 2)
  assert official_layers(18) == ((2, 4, 7, 9), 1)
  assert official_layers(4) == ((1, 2, 3), 0)
  plan = plan_lib.normalize(official_plan(18, window=2, budget=64))
  assert [s for s, _ in plan] == ["vit"] + ["llm"] * 4 + ["decode"]
  assert dict(plan[1][1])["global_thr"] == 0.011 and dict(plan[-1][1])["layer"] == 1
  hooks = plan_lib.llm_hooks(plan, 18)
  assert [h.layer for h in hooks] == [2, 4, 7, 9]
  assert all(h.vit_layer == -1 and h.attn_from == "prev" for h in hooks)
  assert all(h.positions == "reindex" for h in hooks)  # official: survivors renumbered
  assert set(hooks[0].signals) == {"attn", "text_mask", "vit_scores", "image_count"}
  assert plan_lib.signal_layers(plan, 27) == (26,)  # the ViT's last layer feeds the key set
  (h,) = plan_lib.decode_hooks(plan, 18)
  assert (h.layer, h.signals, h.signal_layer) == (1, ("kept",), 0)
  with pytest.raises(ValueError, match="budget"):
    official_plan(18, budget=100)
  with pytest.raises(ValueError, match="colour"):
    plan_lib.normalize((("decode", {"method": "mustdrop", "layer": 1, "colour": 1}),))
  # No other entry reads ViT signals: no signal layer.
  assert plan_lib.signal_layers(plan_lib.normalize(
      (("llm", {"method": "fastv", "layer": 1, "keep": 0.5}),)), 27) == ()


def test_kv_policy_keeps_the_final_set():
  valid = jnp.array([[True, True, True, False]])
  state = compress.init_decode("mustdrop", valid)
  _, keep = compress.apply_decode("mustdrop", state, valid=valid,
                                  kept=jnp.array([[True, False, True, True]]))
  np.testing.assert_array_equal(np.asarray(keep), [[True, False, True, False]])
  with pytest.raises(ValueError, match="kept"):
    compress.apply_decode("mustdrop", state, valid=valid)
  with pytest.raises(ValueError, match="kept"):
    compress.apply_decode("mustdrop", state, valid=valid, kept=jnp.ones((1, 3), bool))


# ---- Through the model. ----


HOOKS = (1, 2)  # filters at the input of layers 1 and 2 (official layers l + 1)


def test_prefill_and_decoding_equal_reference():
  """The filters keep what the official rule keeps on the decoder's attention rows and the ViT's
  last-layer scores; prefill and every decoding step equal the NumPy decoder with those tokens
  pruned and, from the decode policy's layer on, the generated tokens blind to every image
  token the prefill dropped at a later layer."""
  config = CONFIGS[1]
  model, params, flat = make_params(config, seed=1)
  image, text, _ = inputs(seed=21, t_suffix=0)
  b, steps, first = text.shape[0], 3, 0
  g_thr, i_thr = 0.06, 0.08
  # Original positions, so that the NumPy decoder's pruning (which keeps them) is the reference
  # (the official renumbering, the entries' default, is tested in test_positions.py).
  plan = tuple(("llm", {"method": "mustdrop", "layer": l, "keep": 1.0, "global_thr": g_thr,
                        "individual_thr": i_thr, "positions": "original"}) for l in HOOKS)
  plan += (("decode", {"method": "mustdrop", "layer": first}),)
  logits, aux, _, tokens = greedy_decode(model, params, plan, image, text, steps)
  # The key set from the ViT's last layer (mean received attention: SigLIP has no [CLS]).
  enc = jax.jit(lambda v, i: model.apply(v, i, signal_layers=-1, method=model.encode_image))(
      {"params": params}, image)
  cls = np.asarray(enc.signals[IMG.depth - 1]["scores"], np.float64)
  kept_pos, masks = [], {}
  for i in range(b):
    key, vis = key_set_numpy(cls[i], N), np.arange(N)
    for h, layer in enumerate(HOOKS):
      rows = np.asarray(aux["llm_attn"][h][i], np.float64)[:T_PREFIX]  # the prompt rows
      keep, key = filter_numpy(rows[:, :len(vis)], key, g_thr, i_thr)
      vis = vis[keep]
      got = np.asarray(aux["llm_kept_pos"][h][i])
      np.testing.assert_array_equal(got[got >= 0], vis, err_msg=f"example {i}, layer {layer}")
    kept_pos.append(vis)
  assert all(len(v) < N for v in kept_pos)  # the filters dropped something
  zimg = ref.image_embed(flat, config, image)
  for i in range(b):  # one example at a time: the kept counts differ
    hidden = np.setdiff1d(np.arange(N), kept_pos[i])[None]
    for s in range(steps + 1):
      ids = np.concatenate([text[i:i + 1], tokens[i:i + 1, :s]], 1)
      x = np.concatenate([zimg[i:i + 1], ref.embed_text(flat, config, ids)], 1)
      ar = np.concatenate([np.zeros((1, N + T_PREFIX)), np.ones((1, s))], 1)
      masks, prev = {}, np.arange(N)
      for h, layer in enumerate(HOOKS):
        got = np.asarray(aux["llm_kept_pos"][h][i])
        masks[layer] = np.concatenate([np.isin(prev, got), np.ones(T_PREFIX + s, bool)])[None]
        prev = got[got >= 0]
      rules = [(hidden, N + T_PREFIX, first)]  # every generated row, layers >= first
      want, _, _ = ref.decoder(flat, config, x, ar, prune=masks, hide=rules)
      np.testing.assert_allclose(logits[s][i], want[0, -1], atol=2e-4, rtol=2e-4,
                                 err_msg=f"example {i}, step {s}")


def test_dropping_nothing_leaves_the_model_unchanged():
  model, params, _ = make_params(CONFIGS[2], seed=2)
  image, text, _ = inputs(seed=22, t_suffix=0)
  plain, _, _, tokens = greedy_decode(model, params, (), image, text, 3)
  plan = (("vit", {"method": "mustdrop_merge", "layer": 0, "keep": 1.0, "window": 2,
                   "threshold": 2.0}),
          ("llm", {"method": "mustdrop", "layer": 1, "keep": 1.0, "global_thr": 0.0,
                   "individual_thr": 0.0}),
          ("llm", {"method": "mustdrop", "layer": 3, "keep": 1.0, "global_thr": 0.0,
                   "individual_thr": 0.0}),
          ("decode", {"method": "mustdrop", "layer": 0}))
  got, aux, _, got_tokens = greedy_decode(model, params, plan, image, text, 3)
  assert aux["image_tokens_valid"].tolist() == [N, N]
  np.testing.assert_array_equal(got_tokens, tokens)
  for a, b in zip(got, plain):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_whole_plan_with_the_vit_merge():
  """The official plan on the tiny model (2 x 2 windows; threshold 0: windows of positively
  aligned tokens merge): fewer image tokens reach the decoder, each patch still carried once,
  the llm filters keep the key set, and generation runs."""
  model, params, _ = make_params(CONFIGS[1], seed=1)
  image, text, _ = inputs(seed=23, t_suffix=0)
  plan = official_plan(4, window=2, threshold=0.0, budget=192)
  m = model.with_plan(plan)
  _, toks, aux = jax.jit(lambda v, i, t: m.apply(v, i, t, method=m.embed_image))(
      {"params": params}, image, text)
  valid = np.asarray(aux["image_tokens_valid"])
  assert (valid < N).all() and aux["image_tokens"] == N
  np.testing.assert_allclose(np.asarray(toks.size).sum(1), N)
  assert set(aux["vit_scores"]) == {IMG.depth - 1}  # the key set's signal, and no other
  out = tcjax.generate(model, params, image, text, max_new_tokens=3, plan=plan)
  assert out.shape == (2, 3)


def test_vit_scores_need_the_image():
  model, params, _ = make_params(CONFIGS[1], seed=1)
  image, text, _ = inputs(seed=24, t_suffix=0)
  plain = model.with_plan(())
  _, toks, _ = jax.eval_shape(lambda: plain.apply({"params": params}, image, text,
                                                  method=plain.embed_image))
  m = model.with_plan((("llm", {"method": "mustdrop", "layer": 1, "keep": 1.0}),))
  with pytest.raises(ValueError, match="vit_scores"):
    jax.eval_shape(lambda t: m.apply({"params": params}, None, text, image_tokens=t,
                                    method=m.prefill), toks)


def test_the_sweep_lists_and_plans_them():
  from tcjax.eval import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  settings = sweep_lib.settings(["dycoke", "mustdrop", "mustdrop_merge"], "all", (8,))
  assert [(s.method, s.stage, s.family) for s in settings[1:]] == [
      ("dycoke", "post_vit", "merging"), ("dycoke", "post_proj", "merging"),
      ("mustdrop", "llm", "cross_modal"), ("mustdrop_merge", "vit", "merging"),
      ("mustdrop_merge", "post_vit", "merging")]
  kw = dict(n_tokens=256, frames=1, vit_depth=3, vit_layer=0, llm_layer=1)
  plan = plan_lib.normalize(sweep_lib.plan_for(settings[3], **kw))
  # The llm entry reads the ViT's last layer: the sweep decodes it from the image.
  assert plan_lib.vit_score_layers(plan, 3) == (2,)
  assert plan_lib.normalize(sweep_lib.plan_for(settings[4], options={"window": 2}, **kw))


def test_sweep_runs_mustdrop_in_the_decoder(tmp_path):
  """The sweep's llm stage decodes a MustDrop setting from the image (its key set needs the
  ViT's attention), latency included, without errors."""
  from configs.sweep import get_config  # pylint: disable=g-import-not-at-top
  from experiments import sweep as sweep_cli  # pylint: disable=g-import-not-at-top
  cfg = get_config("tiny")
  cfg.out = str(tmp_path / "out")
  cfg.methods, cfg.stages, cfg.budgets = "mustdrop", "llm", (64,)
  cfg.families, cfg.per_family = ("count",), 2
  cfg.latency, cfg.latency_reps = True, 1
  sweep_cli.sweep(cfg)
  import json  # pylint: disable=g-import-not-at-top
  rows = {r["setting"]: r for r in json.loads((tmp_path / "out" / "sweep.json").read_text())
          ["rows"]}
  r = rows["mustdrop@llm/64"]
  assert r["errors"] == {} and len(r["answers"]) == 2
  assert "latency_error" not in r["cost_per_family"]["count"]
  assert r["decode_seconds"] > 0
