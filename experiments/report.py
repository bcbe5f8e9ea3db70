"""The tables of experiments/REPORT.md, from sweep outputs.

  python -m experiments.report experiments/out/sweep/sweep.json \
      [--adaptive experiments/out/sweep_adaptive/sweep.json] \
      [--modalities experiments/out/sweep_modalities/sweep.json] \
      [--learned experiments/out/sweep_learned/sweep.json] \
      [--finetuned CAFT=experiments/out/caft_before/sweep.json,experiments/out/caft/sweep.json]

Prints markdown: the published findings checked on the testbed (random and pooling baselines at
moderate budgets; text-agnostic selection before the decoder against pruning inside it; diversity
against attention at very low budgets; merging against pruning on counting) and the survey's open
questions (localization IoU per method; adaptive against fixed budgets, from an adaptive sweep;
image, video and audio side by side). Every number is a mean over the sweep's rows named in the
table, nothing else; a method or modality the sweep did not run is left out.
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

IMAGE_FAMILIES = ("count", "binding", "digit", "number", "locate")
MODALITIES = {"image": IMAGE_FAMILIES, "video": ("video",), "audio": ("audio",)}
# Selection by diversity of the kept set, and by an attention / importance score.
DIVERSITY = ("divprune", "cdpruner")
ATTENTION = ("fastervlm", "visionzip", "vispruner", "topk", "fastv")
BASELINES = ("random", "pool", "uniform")


def _fmt(v: Optional[float]) -> str:
  return "-" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.2f}"


def _mean(vals: Sequence[Optional[float]]) -> Optional[float]:
  vals = [v for v in vals if v is not None]
  return float(np.mean(vals)) if vals else None


def image_accuracy(row: Dict[str, Any]) -> Optional[float]:
  """Mean accuracy over the image families the row answered (each family weighs the same)."""
  return _mean([row["per_family"].get(f) for f in IMAGE_FAMILIES])


def compressed(rows) -> List[Dict[str, Any]]:
  """Rows of compressed settings that ran (fixed budgets; adaptive policies excluded)."""
  return [r for r in rows if r["budget"] is not None and r["accuracy"] is not None
          and not str(r["method"]).startswith("adaptive_")]


def budgets(rows) -> List[int]:
  return sorted({r["budget"] for r in compressed(rows)}, reverse=True)


def _where(r) -> str:
  """Before the decoder, text-agnostic / text-guided, or inside the decoder."""
  if r["stage"] == "llm":
    return "inside the decoder"
  return "before, text-guided" if r["family"] == "cross_modal" else "before, text-agnostic"


def baselines_table(rows) -> str:
  """Per budget: each baseline's image accuracy, its rank among all settings, the best and the
  median setting."""
  lines = ["| budget | " + " | ".join(BASELINES) + " | best (setting) | median | settings |",
           "|---|" + "---|" * (len(BASELINES) + 3)]
  for b in budgets(rows):
    at = [(image_accuracy(r), r) for r in compressed(rows) if r["budget"] == b]
    at = [(a, r) for a, r in at if a is not None]
    if not at:
      continue
    accs = sorted((a for a, _ in at), reverse=True)
    cells = []
    for m in BASELINES:
      got = [a for a, r in at if r["method"] == m]
      cells.append("-" if not got else
                   f"{got[0]:.2f} (#{1 + sum(x > got[0] for x in accs)})")
    best_a, best_r = max(at, key=lambda t: t[0])
    lines.append(f"| {b} | " + " | ".join(cells) + f" | {best_a:.2f} ({best_r['setting']}) | "
                 f"{float(np.median(accs)):.2f} | {len(at)} |")
  return "\n".join(lines)


def where_table(rows) -> str:
  """Per budget, the mean image accuracy of the settings acting before the decoder without the
  prompt, before it with the prompt, and inside it (with their count)."""
  kinds = ("before, text-agnostic", "before, text-guided", "inside the decoder")
  lines = ["| budget | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
  for b in budgets(rows):
    cells = []
    for k in kinds:
      accs = [image_accuracy(r) for r in compressed(rows) if r["budget"] == b and _where(r) == k]
      accs = [a for a in accs if a is not None]
      cells.append(f"{np.mean(accs):.2f} (n={len(accs)})" if accs else "-")
    lines.append(f"| {b} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def _method_table(rows, methods: Sequence[str], value) -> str:
  bs = budgets(rows)
  lines = ["| method (stage) | " + " | ".join(str(b) for b in bs) + " |",
           "|---|" + "---|" * len(bs)]
  seen = sorted({(r["method"], r["stage"]) for r in compressed(rows) if r["method"] in methods})
  for m, st in seen:
    by_b = {r["budget"]: r for r in compressed(rows) if (r["method"], r["stage"]) == (m, st)}
    lines.append(f"| {m} ({st}) | " + " | ".join(
        _fmt(value(by_b[b])) if b in by_b else "-" for b in bs) + " |")
  return "\n".join(lines)


def diversity_table(rows) -> str:
  """Image accuracy of diversity- and attention-based selection at every budget."""
  return _method_table(rows, DIVERSITY + ATTENTION, image_accuracy)


def counting_table(rows) -> str:
  """Per budget, `count` accuracy: mean over merging settings, over pruning (sampling) ones,
  over pooling ones, and the best of each."""
  fams = ("merging", "sampling", "pooling")
  lines = ["| budget | " + " | ".join(f"{f} mean / best" for f in fams) + " |",
           "|---|" + "---|" * len(fams)]
  for b in budgets(rows):
    cells = []
    for f in fams:
      accs = [(r["per_family"]["count"], r["setting"]) for r in compressed(rows)
              if r["budget"] == b and r["family"] == f and "count" in r["per_family"]]
      if not accs:
        cells.append("-")
        continue
      best = max(accs)
      cells.append(f"{np.mean([a for a, _ in accs]):.2f} / {best[0]:.2f} ({best[1]})")
    lines.append(f"| {b} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def locate_table(rows) -> str:
  """Mean IoU on `locate` (boxes with IoU >= 0.5 in brackets) per method, stage and budget."""
  def value(r):
    iou = r.get("iou_per_family", {}).get("locate")
    return None if iou is None else (iou, r["per_family"]["locate"])
  bs = budgets(rows)
  lines = ["| method (stage) | " + " | ".join(str(b) for b in bs) + " |",
           "|---|" + "---|" * len(bs)]
  full = rows[0]
  if "locate" in full.get("iou_per_family", {}):
    lines.append("| uncompressed | " + " | ".join(
        f"{full['iou_per_family']['locate']:.2f} ({full['per_family']['locate']:.2f})"
        for _ in bs) + " |")
  for m, st in sorted({(r["method"], r["stage"]) for r in compressed(rows)}):
    by_b = {r["budget"]: value(r) for r in compressed(rows) if (r["method"], r["stage"]) == (m, st)}
    if not any(v is not None for v in by_b.values()):
      continue
    lines.append(f"| {m} ({st}) | " + " | ".join(
        "-" if by_b.get(b) is None else f"{by_b[b][0]:.2f} ({by_b[b][1]:.2f})" for b in bs)
        + " |")
  return "\n".join(lines)


def modality_table(rows) -> str:
  """Relative accuracy (compressed / uncompressed) per modality, per method and budget: the
  same method call on images, clips and spectrograms."""
  full = rows[0]

  def rel(r, fams):
    accs = [r["per_family"].get(f) for f in fams if f in full["per_family"]]
    base = [full["per_family"][f] for f in fams if f in full["per_family"]]
    if not base or any(a is None for a in accs) or np.mean(base) == 0:
      return None
    return float(np.mean(accs) / np.mean(base))

  mods = [m for m, fams in MODALITIES.items() if any(f in full["per_family"] for f in fams)]
  bs = budgets(rows)
  head = " | ".join(f"{m} @{b}" for b in bs for m in mods)
  lines = [f"| method (stage) | {head} |", "|---|" + "---|" * (len(bs) * len(mods))]
  for m, st in sorted({(r["method"], r["stage"]) for r in compressed(rows)}):
    by_b = {r["budget"]: r for r in compressed(rows) if (r["method"], r["stage"]) == (m, st)}
    lines.append(f"| {m} ({st}) | " + " | ".join(
        _fmt(rel(by_b[b], MODALITIES[mod])) if b in by_b else "-" for b in bs for mod in mods)
        + " |")
  base = " | ".join(_fmt(_mean([full["per_family"].get(f) for f in MODALITIES[mod]]))
                    for _ in bs for mod in mods)
  lines.insert(2, f"| uncompressed accuracy | {base} |")
  return "\n".join(lines)


def _family_cells(r) -> str:
  return " | ".join(_fmt(r["per_family"].get(f)) for f in IMAGE_FAMILIES) + \
      f" | {_fmt(image_accuracy(r))} |"


def learned_table(rows, learned_methods: Sequence[str]) -> str:
  """Per budget: each learned compressor's accuracy per image family and their mean, beside the
  training-free setting with the best mean image accuracy at that budget and, when that one
  acts inside the decoder, the best acting before it as the learned ones do (rows of
  `learned_methods` are the learned ones; every other compressed row is training-free)."""
  lines = ["| budget | setting | " + " | ".join(IMAGE_FAMILIES) + " | mean |",
           "|---|---|" + "---|" * (len(IMAGE_FAMILIES) + 1)]
  for b in budgets(rows):
    at = [r for r in compressed(rows) if r["budget"] == b and image_accuracy(r) is not None]
    learned = sorted((r for r in at if r["method"] in learned_methods), key=lambda r: r["setting"])
    free = [r for r in at if r["method"] not in learned_methods]
    if not learned:
      continue
    for r in learned:
      lines.append(f"| {b} | {r['setting']} | " + _family_cells(r))
    if free:
      best = max(free, key=image_accuracy)
      lines.append(f"| {b} | best training-free: {best['setting']} | " + _family_cells(best))
    before = [r for r in free if r["stage"] != "llm"]
    if before and best["stage"] == "llm":  # the learned ones act before the decoder
      best = max(before, key=image_accuracy)
      lines.append(f"| {b} | best training-free before the decoder: {best['setting']} | "
                   + _family_cells(best))
  return "\n".join(lines)


def finetuned_table(base_rows, tuned_rows) -> str:
  """The same settings (method, stage, budget) before and after fine-tuning the model: mean image
  accuracy of each, and the change per family."""
  key = lambda r: (r["method"], r["stage"], r["budget"])
  base = {key(r): r for r in compressed(base_rows)}
  lines = ["| setting | before | after | " + " | ".join(f"{f} change" for f in IMAGE_FAMILIES)
           + " |", "|---|---|---|" + "---|" * len(IMAGE_FAMILIES)]
  full = [r for r in tuned_rows if r["budget"] is None][:1] + \
      sorted(compressed(tuned_rows), key=lambda r: (-r["budget"], r["setting"]))
  base_full = [r for r in base_rows if r["budget"] is None][:1]
  for r in full:
    b = base_full[0] if r["budget"] is None and base_full else base.get(key(r))
    if b is None:
      continue
    changes = []
    for f in IMAGE_FAMILIES:
      x, y = b["per_family"].get(f), r["per_family"].get(f)
      changes.append("-" if x is None or y is None else f"{y - x:+.2f}")
    lines.append(f"| {r['setting']} | {_fmt(image_accuracy(b))} | {_fmt(image_accuracy(r))} | "
                 + " | ".join(changes) + " |")
  return "\n".join(lines)


def report(rows, adaptive_rows=None, modality_rows=None) -> str:
  """Every table; the modality table from `modality_rows` when given (a sweep with clips),
  otherwise from `rows`."""
  from tcjax.eval import report as report_lib  # pylint: disable=g-import-not-at-top
  parts = [
      ("Random and pooling baselines (image accuracy, rank among all settings)",
       baselines_table(rows)),
      ("Before the decoder or inside it (mean image accuracy)", where_table(rows)),
      ("Diversity against attention (image accuracy)", diversity_table(rows)),
      ("Merging against pruning on counting (count accuracy)", counting_table(rows)),
      ("Localization: mean IoU on locate (share with IoU >= 0.5)", locate_table(rows)),
      ("Image, video and audio (relative accuracy)",
       modality_table(rows if modality_rows is None else modality_rows)),
  ]
  if adaptive_rows is not None:
    fams = sorted({f for r in adaptive_rows for f in r["per_family"]})
    parts.append(("Adaptive against fixed budgets at equal mean tokens",
                  report_lib.adaptive_table(adaptive_rows, fams)))
  return "\n\n".join(f"### {t}\n\n{body}" for t, body in parts)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("sweep", help="sweep.json of experiments.sweep")
  ap.add_argument("--adaptive", default=None, help="sweep.json of configs/sweep.py:adaptive")
  ap.add_argument("--modalities", default=None,
                  help="sweep.json of configs/sweep.py:modalities (image, video, audio)")
  ap.add_argument("--learned", default=None,
                  help="sweep.json of a sweep with --config.learned (trained compressors), set "
                       "beside the best training-free setting of the main sweep per budget")
  ap.add_argument("--finetuned", action="append", default=[], metavar="LABEL=BEFORE,AFTER",
                  help="two sweep.json of the same settings, on the bundled model and on a "
                       "fine-tuned copy (--config.checkpoint): e.g. CAFT, M3; repeatable")
  a = ap.parse_args(argv)

  def rows_of(path):
    if path is None:
      return None
    with open(path) as f:
      return json.load(f)["rows"]

  rows = rows_of(a.sweep)
  out = [report(rows, rows_of(a.adaptive), rows_of(a.modalities))]
  if a.learned:
    from tcjax.nn.learned import LEARNED  # pylint: disable=g-import-not-at-top
    out.append("### Learned compressors against the best training-free setting (image "
               "accuracy)\n\n" + learned_table(rows + rows_of(a.learned), tuple(LEARNED)))
  for spec in a.finetuned:
    label, eq, paths = spec.partition("=")
    before, comma, after = paths.partition(",")
    if not (label and eq and comma and before and after):
      ap.error(f"--finetuned {spec!r}: use LABEL=BEFORE.json,AFTER.json")
    out.append(f"### {label}: the same settings before and after fine-tuning (image accuracy)"
               "\n\n" + finetuned_table(rows_of(before), rows_of(after)))
  print("\n\n".join(out))


if __name__ == "__main__":
  main()
