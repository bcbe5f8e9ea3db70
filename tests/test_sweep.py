"""The sweep (experiments.sweep, tcjax.eval.sweep / runner / report): the tiny config end to end
on the bundled model (latency and memory on), checked against an unshared generate and
hand-worked numbers; metrics, plans, the table and the Pareto frontier on hand-worked inputs.
Latency is checked for presence and consistency, never against a wall-clock threshold."""

import json
import math
import os

import jax
import numpy as np
import pytest

import tcjax
from configs.sweep import get_config
from experiments import sweep as sweep_cli
from tcjax import bundled
from tcjax.data import testbed
from tcjax.eval import report, runner
from tcjax.eval import sweep as sweep_lib
from tcjax.eval.sweep import FULL, Setting


def test_tiny_sweep_end_to_end(tmp_path):
  cfg = get_config("tiny")
  cfg.out = str(tmp_path / "out")
  cfg.options = '{"pool": {"window": 3}}'  # 3 x 3 windows give 36 tokens: pool must raise
  cfg.latency, cfg.latency_reps = True, 1  # off in :tiny; one timed call per program here
  res = sweep_cli.sweep(cfg)

  names = ["sweep.json", "sweep.md", "accuracy_vs_tokens.png", "accuracy_vs_flops.png",
           "loyalty_vs_tokens.png", "retained_64.png", "retained_16.png"]
  for n in names:
    assert os.path.getsize(tmp_path / "out" / n) > 0, n
  # Strict JSON (no NaN), one row per method x budget after the uncompressed model.
  info = json.loads((tmp_path / "out" / "sweep.json").read_text(),
                    parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
  rows = {r["setting"]: r for r in info["rows"]}
  assert list(rows) == ["full", "pool@post_vit/64", "pool@post_vit/16", "random@post_vit/64",
                        "random@post_vit/16"]
  # The method that raises is a row with its error, for both families, not a missing row.
  for b in (64, 16):
    r = rows[f"pool@post_vit/{b}"]
    assert sorted(r["errors"]) == ["count", "locate"]
    assert f"window 3 gives 36 tokens, not budget {b}" in r["errors"]["count"]
    assert r["accuracy"] is None and r["answers"] == {}
  md = (tmp_path / "out" / "sweep.md").read_text()
  assert res["table"] in md
  assert md.count("| pool@post_vit/") == 2 and "| e1 | e1 |" in md and "- e1: ValueError" in md
  assert "| random@post_vit/64 |" in md and "| random@post_vit/16 |" in md

  # Answers of the shared path (one ViT run, then the method, then the decoder from the
  # projected tokens) equal tcjax.generate of the composed plan on the images.
  model, params, tok = bundled.load()
  exs = [testbed.example(f, "test", 0, i) for f in ("count", "locate") for i in range(4)]
  prompt = tok.batch([e["prefix"] for e in exs], max_len=cfg.max_len)
  plan = (("post_vit", {"method": "random", "budget": 64}),)
  out = tcjax.generate(model, params, np.stack([e["image"] for e in exs]), prompt["text"],
                       plan=plan, max_new_tokens=cfg.max_new_tokens,
                       prefix_mask=prompt["mask_input"].astype(bool), eos_id=tok.eos_id,
                       pad_id=tok.pad_id)
  r64 = rows["random@post_vit/64"]
  assert [r64["answers"][str(i)] for i in range(8)] == [tok.decode(o) for o in np.asarray(out)]

  full = rows["full"]
  for name in ("full", "random@post_vit/64", "random@post_vit/16"):
    r = rows[name]
    ans = [r["answers"][str(i)] for i in range(8)]
    base = [full["answers"][str(i)] for i in range(8)]
    count_acc = np.mean([a.strip() == e["suffix"] for a, e in zip(ans[:4], exs[:4])])
    assert r["per_family"]["count"] == count_acc
    assert r["loyalty"] == np.mean([a.strip() == b.strip() for a, b in zip(ans, base)])
    if full["accuracy"] > 0:
      assert math.isclose(r["relative_accuracy"], r["accuracy"] / full["accuracy"])
  assert full["loyalty"] == 1.0
  # KV cache: 3 decoder layers x (image + 16 prompt tokens) x (K + V) x 1 head x 48 x 4 bytes.
  assert full["kv_bytes"] == 3 * (256 + 16) * 2 * 48 * 4
  assert r64["kv_bytes"] == 3 * (64 + 16) * 2 * 48 * 4
  assert (full["image_tokens"], r64["image_tokens"], rows["random@post_vit/16"]
          ["mean_llm_image_tokens"]) == (256, 64, 16)
  assert r64["flops"] < full["flops"]
  # Tokens per decoder layer: image + 16 prompt tokens in each of the 3 layers.
  assert full["cost_per_family"]["count"]["llm_tokens_per_layer"] == [272] * 3
  assert r64["cost_per_family"]["locate"]["llm_tokens_per_layer"] == [80] * 3

  # Latency and memory: measured for every setting that ran, in the rows, JSON and table.
  llm_bytes = 4 * sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params["llm"]))
  r16 = rows["random@post_vit/16"]
  for r in (full, r64, r16):
    assert r["prefill_seconds"] > 0 and r["decode_seconds"] > 0
    for fam in ("count", "locate"):  # one image shape: one measurement for both families
      c = r["cost_per_family"][fam]
      assert c["latency_batch"] == 8 and "latency_error" not in c
      progs = c["programs"]
      assert progs["vit"]["seconds"] > 0 and progs["decode_step"]["seconds"] > 0
      assert math.isclose(c["prefill_seconds"], progs["vit"]["seconds"]
                          + progs["compress"]["seconds"] + progs["decoder"]["seconds"])
      assert c["peak_bytes"] == max(p["bytes"] for p in progs.values() if p)
      # The decoder reads every decoder parameter (replicated: all of them on each device).
      assert progs["decoder"]["bytes"] >= llm_bytes
  # The decoder program holds less for 16 image tokens than for 256 (activations, KV cache).
  dec = lambda r: r["cost_per_family"]["count"]["programs"]["decoder"]["bytes"]
  assert dec(r16) < dec(r64) < dec(full)
  # The plain ViT is one program for the three settings (none reads ViT signals): measured once.
  vit = [r["cost_per_family"]["count"]["programs"]["vit"] for r in (full, r64, r16)]
  assert vit[0] == vit[1] == vit[2]
  for b in (64, 16):
    assert "prefill_seconds" not in rows[f"pool@post_vit/{b}"]
  head = next(line for line in md.splitlines() if line.startswith("| setting"))
  assert "| KV KiB | prefill ms | decode ms | peak MiB |" in head
  line = next(line for line in md.splitlines() if line.startswith("| full |"))
  c = full["cost_per_family"]["count"]
  assert f"| {c['prefill_seconds'] * 1e3:.1f} | {c['decode_seconds'] * 1e3:.2f} | " \
      f"{c['peak_bytes'] / 2 ** 20:.1f} |" in line


def test_summary_hand_worked():
  fams = ["count", "count", "count", "locate"]
  refs = ["3", "2", "5", "<loc0000><loc0000><loc0512><loc0512>"]
  base = ["3", "1", "5", "<loc0000><loc0000><loc0512><loc0512>"]  # 3 of 4 right
  pred = ["3", "2", "4", "<loc0000><loc0000><loc0512><loc0256>"]  # count 2 of 3; box IoU 1/2
  b = runner.summarize(runner.score_answers(fams, base, refs), base)
  s = runner.summarize(runner.score_answers(fams, pred, refs), pred, b)
  assert b["accuracy"] == 0.75 and b["loyalty"] == 1.0 and b["relative_accuracy"] == 1.0
  assert s["per_family"] == {"count": 2 / 3, "locate": 1.0}  # IoU 0.5 counts (>= 0.5)
  # Both boxes span rows 0..512 and columns 0..256 of 0..512: IoU 1/2; only locate has one.
  assert s["iou_per_family"] == {"locate": 0.5} and b["iou_per_family"] == {"locate": 1.0}
  assert s["accuracy"] == 0.75
  assert s["loyalty"] == 0.25  # only "3" agrees with the baseline
  assert s["loyalty_per_family"] == {"count": 1 / 3, "locate": 0.0}
  assert s["relative_accuracy"] == 1.0
  assert s["relative_per_family"] == {"count": 1.0, "locate": 1.0}
  zero = runner.summarize(runner.score_answers(["count"], ["0"], ["1"]), ["0"])
  assert math.isnan(runner.summarize(runner.score_answers(["count"], ["1"], ["1"]), ["1"],
                                     zero)["relative_accuracy"])
  with pytest.raises(ValueError, match="predictions"):
    runner.summarize(runner.score_answers(["count"], ["1"], ["1"]), ["1"], b)


def test_retained_picture_hand_worked():
  """2 x 2 patches of 2 px: patch 0 kept alone, patch 1 dropped, patches 2 and 3 one token."""
  img01 = np.zeros((4, 4, 3), np.float32)
  img01[:2, :2] = 0.8                     # patch 0
  img01[:2, 2:] = 0.4                     # patch 1
  img01[2:, :2] = [1.0, 0.0, 0.0]         # patch 2
  img01[2:, 2:] = [0.0, 0.0, 1.0]         # patch 3
  out = report.retained_picture(img01 * 2 - 1, [0, -1, 1, 1], patch=2)
  np.testing.assert_allclose(out[:2, :2], 0.8, atol=1e-6)
  np.testing.assert_allclose(out[:2, 2:], 0.25 * 0.4 + 0.1, atol=1e-6)
  np.testing.assert_allclose(out[2:], np.broadcast_to([0.5, 0.0, 0.5], (2, 4, 3)), atol=1e-6)
  with pytest.raises(ValueError, match="one entry per patch"):
    report.retained_picture(img01, [0, 1, 2], patch=2)


def test_sweep_records_which_token_carries_each_patch():
  """pool at 64 tokens on a 16 x 16 patch grid: 2 x 2 windows in raster order, so patch (i, j)
  is carried by token (i // 2) * 8 + j // 2; one picture per family (the first example)."""
  model, params, tok = bundled.load()
  exs = [testbed.example(f, "test", 0, i) for f in ("count", "digit") for i in range(2)]
  opts = sweep_lib.SweepOptions(batch_size=4, pictures=1)
  rows = sweep_lib.run(model, params, tok, exs, [FULL, Setting("pool", "post_vit", 64)], opts)
  assert "retained" not in rows[0]  # nothing is cut in the uncompressed model
  i, j = np.divmod(np.arange(256), 16)
  expect = ((i // 2) * 8 + j // 2).tolist()
  assert rows[1]["retained"] == {"0": expect, "2": expect}


def test_pareto_hand_worked():
  pts = [(1.0, 0.2), (2.0, 0.5), (2.0, 0.4), (3.0, 0.5), (0.5, 0.1), (4.0, 0.7), (5.0, 0.6)]
  assert report.pareto(pts) == [4, 0, 1, 5]
  assert report.pareto([(1.0, 0.3), (1.0, 0.3)]) == [0]


def test_settings_and_plans():
  assert sweep_lib.settings("fastv,pool".split(","), "all", (8,)) == [
      FULL, Setting("fastv", "llm", 8), Setting("pool", "post_vit", 8),
      Setting("pool", "post_proj", 8)]
  assert sweep_lib.settings(["tome"], ["vit"], (64, 32))[1:] == [
      Setting("tome", "vit", 64), Setting("tome", "vit", 32)]
  # VTW keeps no token at any budget: once, at the smallest budget.
  assert sweep_lib.settings(["fastv", "vtw"], "all", (64, 16)) == [
      FULL, Setting("fastv", "llm", 64), Setting("fastv", "llm", 16), Setting("vtw", "llm", 16)]
  # "primary": each method once, after the ViT where it can act there.
  assert sweep_lib.settings(["dart", "keynorm", "text_relevance"], "primary", (8,)) == [
      FULL, Setting("dart", "post_vit", 8), Setting("keynorm", "llm", 8),
      Setting("text_relevance", "post_proj", 8)]
  with pytest.raises(ValueError, match="unknown method"):
    sweep_lib.settings(["fastvv"], "all", (8,))
  with pytest.raises(ValueError, match="unknown stage"):
    sweep_lib.settings(["fastv"], ["decoder"], (8,))
  with pytest.raises(ValueError, match="no method"):
    sweep_lib.settings(["fastv"], ["vit"], (8,))
  with pytest.raises(ValueError, match="budgets"):
    sweep_lib.settings("all", "all", (0,))
  # ToMe: 256 -> 64 evenly in 3 layers; 256 -> 32 front-loaded (each round <= half).
  assert sweep_lib.tome_r(256, 64, 3, [0, 1, 2]) == [64, 64, 64]
  assert sweep_lib.tome_r(256, 32, 3, [0, 1, 2]) == [128, 64, 32]
  assert sweep_lib.tome_r(256, 64, 3, [1, 2]) == [0, 128, 64]  # only halving gets there
  assert sweep_lib.tome_r(256, 100, 3, [1, 2]) == [0, 78, 78]
  with pytest.raises(ValueError, match="out of reach"):
    sweep_lib.tome_r(256, 16, 3, [0, 1, 2])
  kw = dict(vit_depth=3, vit_layer=1, llm_layer=1)
  # A clip's vit-stage budget is split over its frames; the others count the whole clip.
  assert sweep_lib.plan_for(Setting("topk", "vit", 64), n_tokens=2048, frames=8, **kw) == (
      ("vit", {"method": "topk", "layer": 1, "budget": 8}),)
  with pytest.raises(ValueError, match="split"):
    sweep_lib.plan_for(Setting("topk", "vit", 60), n_tokens=2048, frames=8, **kw)
  assert sweep_lib.plan_for(Setting("fastv", "llm", 64), n_tokens=2048, frames=8,
                            options={"query": "mean"}, **kw) == (
      ("llm", {"method": "fastv", "layer": 1, "budget": 64, "query": "mean"}),)
  assert sweep_lib.plan_for(Setting("pyramiddrop", "llm", 64), n_tokens=256, frames=1,
                            **kw)[0][1]["ratios"] == (64.5 / 256,)
  assert sweep_lib.plan_for(FULL, n_tokens=256, frames=1, **kw) == ()
  # SparseVLM's budgets count the tokens kept by score: v1.5 keeps 57 and recycles 7 clusters
  # (int(0.3 * 199) + 1 = 60 of the 199 deleted, int(6.0) + 1 = 7 clusters), 64 in all.
  (_, svlm), = sweep_lib.plan_for(Setting("sparsevlm", "llm", 64), n_tokens=256, frames=1, **kw)
  assert svlm["budgets"] == (57,)
  (_, svlm), = sweep_lib.plan_for(Setting("sparsevlm", "llm", 64), n_tokens=256, frames=1,
                                  options={"version": "v2.0"}, **kw)
  assert svlm["budgets"] == (64,)
  # Each method reads its own ViT signal layer unless the sweep sets one for all.
  (_, pm), = sweep_lib.plan_for(Setting("prumerge", "post_vit", 64), n_tokens=256, frames=1, **kw)
  assert "signal_layer" not in pm
  (_, pm), = sweep_lib.plan_for(Setting("prumerge", "post_vit", 64), n_tokens=256, frames=1,
                                signal_layer=-2, **kw)
  (_, pool), = sweep_lib.plan_for(Setting("pool", "post_vit", 64), n_tokens=256, frames=1,
                                  signal_layer=-2, **kw)
  assert pm["signal_layer"] == -2 and "signal_layer" not in pool  # pool reads no ViT signal


def test_cli_refuses_bad_config(tmp_path):
  cfg = get_config("tiny")
  cfg.out = str(tmp_path)
  for field, value, match in (("methods", "pool,bogus", "unknown method"),
                              ("stages", "post_vit,decoder", "unknown stage"),
                              ("options", '{"bogus": {}}', "unknown method"),
                              ("families", ("count", "smell"), "unknown testbed family")):
    bad = get_config("tiny")
    setattr(bad, field, value)
    with pytest.raises(ValueError, match=match):
      sweep_cli.sweep(bad)
  with pytest.raises(ValueError, match="takes"):
    get_config("huge")
  bad = get_config("tiny")
  bad.latency, bad.latency_reps = True, 0
  with pytest.raises(ValueError, match="latency_reps"):
    sweep_cli.sweep(bad)
  assert get_config("")["latency"] and not get_config("tiny")["latency"]
  # The default: the testbed's image families at >= 200 examples each, >= 3 budgets; :full and
  # :modalities add the clips.
  assert tuple(get_config("").families) == testbed.IMAGE_FAMILIES
  assert get_config("").per_family >= 200 and len(get_config("").budgets) >= 3
  for arg in ("full", "modalities"):
    assert tuple(get_config(arg).families) == testbed.FAMILIES


def test_table_marks_partial_rows():
  row = {"setting": "x@post_vit/8", "family": "pooling", "errors": {"video": "ValueError: no"},
         "accuracy": 0.5, "loyalty": 1.0, "relative_accuracy": 1.0,
         "per_family": {"count": 0.5}, "flops": 2e9, "kv_bytes": 2048.0, "seconds": 1.0,
         "cost_per_family": {"count": {"image_tokens": 8, "mean_llm_image_tokens": 8.0}}}
  text = report.table([row], ["count", "video"])
  # No latency measured: "-" in the three latency cells.
  assert "| x@post_vit/8 | pooling | 8 | 8 | 2.000* | 2.0* | - | - | - | 0.500* | 1.000* | " \
      "1.000* | 0.500 | e1 |" in text
  assert text.endswith("- e1: ValueError: no")


def test_table_latency_cells_hand_worked():
  cost = lambda n, pre, dec, peak: {"image_tokens": n, "mean_llm_image_tokens": float(n),
                                    "prefill_seconds": pre, "decode_seconds": dec,
                                    "peak_bytes": peak}
  row = {"setting": "x@post_vit/8", "family": "pooling", "errors": {}, "accuracy": 0.5,
         "loyalty": 1.0, "relative_accuracy": 1.0, "per_family": {"count": 0.5, "video": 0.5},
         "flops": 2e9, "kv_bytes": 2048.0, "seconds": 1.0,
         "cost_per_family": {"count": cost(8, 0.01234, 0.00056, 3 * 2 ** 20),
                             "video": cost(64, 0.5, 0.002, 2.5 * 2 ** 20)}}
  text = report.table([row], ["count", "video"])  # one value per input shape: image / clip
  assert "| 8/64 | 8/64 | 2.000 | 2.0 | 12.3/500.0 | 0.56/2.00 | 3.0/2.5 | 0.500 |" in text
  row["cost_per_family"]["video"] = {"image_tokens": 64, "mean_llm_image_tokens": 64.0,
                                     "latency_error": "RuntimeError: no memory_analysis"}
  text = report.table([row], ["count", "video"])
  assert "| 2.000 | 2.0 | 12.3/e1 | 0.56/e1 | 3.0/e1 | 0.500 |" in text
  assert text.endswith("- e1: RuntimeError: no memory_analysis")


def test_sweep_needs_full_first():
  model, params, tok = bundled.load()
  with pytest.raises(ValueError, match="FULL"):
    sweep_lib.run(model, params, tok, [], [Setting("pool", "post_vit", 64)],
                  sweep_lib.SweepOptions())
  with pytest.raises(ValueError, match="latency_reps"):
    sweep_lib.run(model, params, tok, [], [FULL],
                  sweep_lib.SweepOptions(latency=True, latency_reps=0))


def test_adaptive_settings_and_plans():
  spec = {"adaptive_mass": {"mass": (0.2, 0.4)}, "adaptive_entropy": {"scale": [0.5]}}
  got = sweep_lib.adaptive_settings(spec, ("llm", "post_vit"), 32)
  assert [s.name for s in got] == [
      "adaptive_mass@post_vit/32[mass=0.2]", "adaptive_mass@post_vit/32[mass=0.4]",
      "adaptive_mass@llm/32[mass=0.2]", "adaptive_mass@llm/32[mass=0.4]",
      "adaptive_entropy@post_vit/32[scale=0.5]", "adaptive_entropy@llm/32[scale=0.5]"]
  assert got[0].family == "sampling" and got[0] != Setting("adaptive_mass", "post_vit", 32)
  kw = dict(n_tokens=256, frames=1, vit_depth=3, vit_layer=1, llm_layer=1)
  # The setting's own option wins over the sweep's options of the method.
  assert sweep_lib.plan_for(got[2], options={"mass": 0.9, "min_tokens": 2}, **kw) == (
      ("llm", {"method": "adaptive_mass", "layer": 1, "budget": 32, "mass": 0.2,
               "min_tokens": 2}),)
  for bad, match in (({"topk": {"mass": (0.2,)}}, "unknown adaptive policy"),
                     ({"adaptive_mass": {"scale": (1.0,)}}, "no option 'scale'"),
                     ({"adaptive_mass": {"mass": 0.2}}, "sequence"),
                     ({"adaptive_mass": {"mass": ()}}, "sequence")):
    with pytest.raises(ValueError, match=match):
      sweep_lib.adaptive_settings(bad, ("post_vit",), 32)
  with pytest.raises(ValueError, match="unknown stage"):
    sweep_lib.adaptive_settings(spec, ("decoder",), 32)
  with pytest.raises(ValueError, match="capacity"):
    sweep_lib.adaptive_settings(spec, ("llm",), 0)


def _row(setting, method, stage, budget, per_family, kept=None):
  row = {"setting": setting, "method": method, "stage": stage, "budget": budget,
         "per_family": per_family, "accuracy": 0.5}
  if kept is not None:
    row.update(kept_per_family=kept, kept_tokens=sum(kept.values()) / len(kept))
  return row


def test_adaptive_against_fixed_hand_worked():
  # topk at post_vit: count 0.2 @ 8, 0.6 @ 32; binding 0.5 @ 8, 0.5 @ 32. At 16 tokens (half
  # way in log2 between 8 and 32) the fixed curve is 0.4 on count.
  assert report.at_tokens([(32.0, 0.6), (8.0, 0.2)], 16.0) == pytest.approx(0.4)
  assert report.at_tokens([(32.0, 0.6), (8.0, 0.2)], 32.0) == 0.6
  assert report.at_tokens([(32.0, 0.6), (8.0, 0.2)], 4.0) is None
  assert report.at_tokens([], 4.0) is None
  rows = [_row("full", "full", "-", None, {"count": 0.7, "binding": 0.6}),
          _row("topk@post_vit/32", "topk", "post_vit", 32, {"count": 0.6, "binding": 0.5}),
          _row("topk@post_vit/8", "topk", "post_vit", 8, {"count": 0.2, "binding": 0.5}),
          _row("topk@llm/8", "topk", "llm", 8, {"count": 0.9, "binding": 0.9}),
          _row("adaptive_mass@post_vit/32[mass=0.3]", "adaptive_mass", "post_vit", 32,
               {"count": 0.5, "binding": 0.25}, {"count": 16.0, "binding": 40.0}),
          _row("adaptive_mass@llm/32[mass=0.3]", "adaptive_mass", "llm", 32,
               {"count": 0.9, "binding": 0.1}, {"count": 8.0, "binding": 8.0})]
  text = report.adaptive_table(rows, ["count", "binding"])
  lines = text.splitlines()
  assert lines[0] == "| setting | capacity | kept tokens | count | binding |"
  assert lines[2] == ("| adaptive_mass@post_vit/32[mass=0.3] | 32 | 28.0 | 0.50 vs 0.40 @ 16.0 | "
                      "0.25 vs - @ 40.0 |")  # 40 tokens: past the largest fixed budget
  assert lines[3] == "| adaptive_mass@llm/32[mass=0.3] | 32 | 8.0 | 0.90 vs 0.90 @ 8.0 | " \
                     "0.10 vs 0.90 @ 8.0 |"
  assert lines[-1].endswith("above the fixed budget at equal mean tokens in 1 (setting, family) "
                            "cells, equal in 1, below in 1.")
  assert report.adaptive_table(rows[:4], ["count"]) == ""


@pytest.mark.slow
def test_tiny_sweep_with_adaptive_policies(tmp_path):
  """Adaptive rows report the tokens each example kept: after the ViT, the NumPy mass rule on
  the ViT's scores; in the decoder, on the attention row the model's hook scored with. (About 40 CPU-s, measured: the bundled
  model's decoders compiled for each image-token count and llm-stage plan.)"""
  cfg = get_config("tiny")
  cfg.out = str(tmp_path / "out")
  cfg.methods, cfg.stages, cfg.budgets = "topk", "post_vit,llm", (32, 4)
  cfg.families, cfg.per_family = ("count",), 4
  cfg.adaptive, cfg.adaptive_capacity = '{"adaptive_mass": {"mass": (0.3,)}}', 32
  res = sweep_cli.sweep(cfg)
  rows = {r["setting"]: r for r in res["rows"]}
  assert list(rows)[-2:] == ["adaptive_mass@post_vit/32[mass=0.3]",
                             "adaptive_mass@llm/32[mass=0.3]"]
  assert os.path.getsize(tmp_path / "out" / "adaptive_vs_fixed.png") > 0
  assert res["adaptive_table"] in (tmp_path / "out" / "sweep.md").read_text()

  model, params, tok = bundled.load()
  exs = [testbed.example("count", "test", 0, i) for i in range(4)]
  image = np.stack([e["image"] for e in exs])
  prompt = tok.batch([e["prefix"] for e in exs], max_len=cfg.max_len)
  enc = jax.jit(lambda p, i: model.apply({"params": p}, i, signal_layers=-2,
                                         method=model.encode_image))(params, image)
  llm = model.with_plan((("llm", {"method": "adaptive_mass", "layer": 1, "budget": 32,
                                  "mass": 0.3}),))
  _, _, aux = jax.jit(lambda p, i, t, m: llm.apply({"params": p}, i, t, None, m,
                                                   method=llm.prefill))(
      params, image, prompt["text"], prompt["mask_input"].astype(bool))
  rows_attn = np.asarray(aux["llm_attn"][0])
  last = prompt["mask_input"].sum(-1) - 1
  (vit_signals,) = enc.signals.values()  # the one layer asked for, -2
  for stage, scores in (("post_vit", np.asarray(vit_signals["scores"])),
                        ("llm", rows_attn[np.arange(4), last])):
    counts = []
    for s in scores.astype(np.float64):
      desc = np.sort(np.maximum(s, 0))[::-1]
      counts.append(min(int(np.searchsorted(np.cumsum(desc), 0.3 * desc.sum())) + 1, 32))
    r = rows[f"adaptive_mass@{stage}/32[mass=0.3]"]
    assert r["kept_per_family"] == {"count": pytest.approx(np.mean(counts))}, stage
    assert r["kept_tokens"] == pytest.approx(np.mean(counts))
    assert "kept_tokens" not in rows[f"topk@{stage}/32"]
    fixed = report.at_tokens([(32.0, rows[f"topk@{stage}/32"]["per_family"]["count"]),
                              (4.0, rows[f"topk@{stage}/4"]["per_family"]["count"])],
                             np.mean(counts))
    line = next(l for l in res["adaptive_table"].splitlines() if f"@{stage}/" in l)
    # Outside the fixed budgets' range (here 4..32 tokens) the table shows "-".
    fixed = "-" if fixed is None else f"{fixed:.2f}"
    assert f"{r['per_family']['count']:.2f} vs {fixed} @ {np.mean(counts):.1f}" in line
