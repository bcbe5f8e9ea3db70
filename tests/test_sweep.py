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
           "loyalty_vs_tokens.png"]
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
