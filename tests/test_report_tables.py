"""experiments.report (the tables of experiments/REPORT.md) on hand-made sweep rows: every
number below is worked out by hand from the rows."""

import pytest

from experiments import report


def row(setting, method, stage, budget, family, per_family, iou=None):
  return {"setting": setting, "method": method, "stage": stage, "budget": budget,
          "family": family, "per_family": per_family, "accuracy": 0.5,
          "iou_per_family": {} if iou is None else {"locate": iou}}


FULL = row("full", "full", "-", None, "-",
           {"count": 1.0, "locate": 0.5, "video": 0.8, "audio": 0.5}, iou=0.6)
ROWS = [
    FULL,
    row("random@post_vit/16", "random", "post_vit", 16, "sampling",
        {"count": 0.4, "locate": 0.2, "video": 0.4, "audio": 0.5}, iou=0.3),
    row("tome@post_vit/16", "tome", "post_vit", 16, "merging",
        {"count": 0.8, "locate": 0.0, "video": 0.8, "audio": 0.25}, iou=0.1),
    row("fastv@llm/16", "fastv", "llm", 16, "sampling",
        {"count": 0.6, "locate": 0.4, "video": 0.2, "audio": 0.0}, iou=0.5),
    row("cdpruner@post_proj/16", "cdpruner", "post_proj", 16, "cross_modal",
        {"count": 0.2, "locate": 0.2}),
    row("adaptive_mass@llm/64[mass=0.2]", "adaptive_mass", "llm", 64, "sampling",
        {"count": 1.0}),
]


def test_baselines_rank_and_median():
  # image accuracy = mean of count and locate: random .3, tome .4, fastv .5, cdpruner .2
  t = report.baselines_table(ROWS)
  assert "| 16 | 0.30 (#3) | - | - | 0.50 (fastv@llm/16) | 0.35 | 4 |" in t
  assert "64" not in t.split("\n", 2)[2]  # the adaptive row is not a fixed budget


def test_before_or_inside_the_decoder():
  t = report.where_table(ROWS)
  assert "| 16 | 0.35 (n=2) | 0.20 (n=1) | 0.50 (n=1) |" in t


def test_counting_by_family():
  t = report.counting_table(ROWS)
  assert "| 16 | 0.80 / 0.80 (tome@post_vit/16) | 0.50 / 0.60 (fastv@llm/16) | - |" in t


def test_locate_iou_and_share():
  t = report.locate_table(ROWS)
  assert "| uncompressed | 0.60 (0.50) |" in t
  assert "| fastv (llm) | 0.50 (0.40) |" in t and "| tome (post_vit) | 0.10 (0.00) |" in t
  assert "cdpruner" not in t  # no IoU recorded


def test_modalities_side_by_side():
  t = report.modality_table(ROWS)
  assert "| method (stage) | image @16 | video @16 | audio @16 |" in t
  # image: (0.8 + 0.0) / 2 over (1.0 + 0.5) / 2; video 0.8 / 0.8; audio 0.25 / 0.5
  assert "| tome (post_vit) | 0.53 | 1.00 | 0.50 |" in t
  assert "| uncompressed accuracy | 0.75 | 0.80 | 0.50 |" in t
  assert "| cdpruner (post_proj) | 0.27 | - | - |" in t


def test_diversity_against_attention():
  t = report.diversity_table(ROWS)
  assert "| cdpruner (post_proj) | 0.20 |" in t and "| fastv (llm) | 0.50 |" in t
  assert "tome" not in t and "random" not in t


def test_cli_prints_every_table(tmp_path, capsys):
  import json
  main, mods = tmp_path / "main.json", tmp_path / "mods.json"
  main.write_text(json.dumps({"rows": ROWS[:3]}))
  mods.write_text(json.dumps({"rows": ROWS}))
  report.main([str(main), "--modalities", str(mods)])
  out = capsys.readouterr().out
  assert out.count("### ") == 6 and "| fastv (llm) |" in out  # fastv: only in the modality rows
  assert "| random (post_vit) | 0.40 | 0.50 | 1.00 |" in out  # 0.3/0.75, 0.4/0.8, 0.5/0.5


def image_row(setting, method, budget, accs):
  """A row over the five image families, accuracies in IMAGE_FAMILIES order."""
  return row(setting, method, "post_vit", budget, "pooling",
             dict(zip(report.IMAGE_FAMILIES, accs)))


FREE = [image_row("full", "full", None, [1.0, 1.0, 0.5, 0.0, 0.5]),
        image_row("pool@post_vit/16", "pool", 16, [0.8, 0.6, 0.2, 0.0, 0.4]),    # mean 0.40
        image_row("random@post_vit/16", "random", 16, [0.5, 0.5, 0.5, 0.0, 0.5]),  # mean 0.40
        image_row("tome@post_vit/16", "tome", 16, [0.9, 0.9, 0.3, 0.0, 0.4]),    # mean 0.50
        image_row("pool@post_vit/64", "pool", 64, [1.0, 1.0, 0.5, 0.0, 0.5]),    # mean 0.60
        row("fastv@llm/16", "fastv", "llm", 16, "sampling",                          # mean 0.56
            dict(zip(report.IMAGE_FAMILIES, [1.0, 1.0, 0.5, 0.3, 0.0])))]
LEARNED_ROWS = [image_row("perceiver@post_vit/16", "perceiver", 16, [1.0, 1.0, 0.4, 0.1, 0.0])]


def test_learned_beside_the_best_training_free():
  t = report.learned_table(FREE + LEARNED_ROWS, ("perceiver", "tokenlearner"))
  lines = t.splitlines()
  # perceiver: mean of 1, 1, .4, .1, 0 = 0.50; the best training-free at 16 is fastv inside
  # the decoder (0.56), the best before it tome (0.50 > 0.40); budget 64 has no learned row
  assert lines[2:] == [
      "| 16 | perceiver@post_vit/16 | 1.00 | 1.00 | 0.40 | 0.10 | 0.00 | 0.50 |",
      "| 16 | best training-free: fastv@llm/16 | 1.00 | 1.00 | 0.50 | 0.30 | 0.00 | 0.56 |",
      "| 16 | best training-free before the decoder: tome@post_vit/16 | 0.90 | 0.90 | 0.30 | "
      "0.00 | 0.40 | 0.50 |"]


def test_finetuned_before_and_after():
  after = [image_row("full", "full", None, [1.0, 0.8, 0.5, 0.0, 0.5]),
           image_row("pool@post_vit/16", "pool", 16, [0.9, 0.8, 0.2, 0.0, 0.6]),
           image_row("tome@post_vit/32", "tome", 32, [1.0, 1.0, 1.0, 1.0, 1.0])]  # no "before"
  t = report.finetuned_table(FREE, after).splitlines()
  assert t[2:] == ["| full | 0.60 | 0.56 | +0.00 | -0.20 | +0.00 | +0.00 | +0.00 |",
                   "| pool@post_vit/16 | 0.40 | 0.50 | +0.10 | +0.20 | +0.00 | +0.00 | +0.20 |"]


def test_cli_learned_and_finetuned(tmp_path, capsys):
  import json
  paths = {}
  for name, rows in (("main", FREE), ("learned", LEARNED_ROWS), ("after", FREE[:2])):
    paths[name] = tmp_path / f"{name}.json"
    paths[name].write_text(json.dumps({"rows": rows}))
  report.main([str(paths["main"]), "--learned", str(paths["learned"]),
               "--finetuned", f"CAFT={paths['main']},{paths['after']}"])
  out = capsys.readouterr().out
  assert "### Learned compressors" in out and "### CAFT: the same settings" in out
  assert "| 16 | best training-free before the decoder: tome@post_vit/16 |" in out
  assert "| pool@post_vit/16 | 0.40 | 0.40 | +0.00 |" in out
  with pytest.raises(SystemExit):
    report.main([str(paths["main"]), "--finetuned", "CAFT=only_one.json"])
