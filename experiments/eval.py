"""Evaluate a checkpoint with and without a compression plan: answers and cost side by side.

`python -m experiments.eval --config configs/eval.py [--config.field=value ...]` (see
`configs/eval.py`). Prints one row per setting (the uncompressed model, then the plan): exact
match (box IoU >= 0.5 for testbed `locate`), loyalty and relative accuracy against the
uncompressed model, image tokens reaching the decoder, tokens per decoder layer, the analytic
prefill FLOPs per example and the KV-cache bytes per example.
"""

from __future__ import annotations

import ast
import json
import os
from typing import Any, Dict, List

import numpy as np
from absl import app, logging
from ml_collections import config_flags

# Defined only when run as a script: eval and sweep are imported side by side by the tests,
# and absl refuses a second module-level --config flag.
_CONFIG = None


def load(cfg):
  """(model, params, tokenizer) from cfg.checkpoint / cfg.tokenizer (bundled by default)."""
  from tcjax import bundled  # pylint: disable=g-import-not-at-top
  from tcjax.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from tcjax.train.loop import load_init  # pylint: disable=g-import-not-at-top
  if not cfg.checkpoint:
    return bundled.load()
  if not cfg.tokenizer:
    raise ValueError("config.tokenizer: give the SentencePiece model of the checkpoint")
  model, params = load_init(cfg.checkpoint)
  return model, params, Tokenizer(cfg.tokenizer)


def examples(cfg, image_size: int) -> List[Dict[str, Any]]:
  """[{"image", "prefix", "suffix", "family", "scene"}] from the JSONL file or the testbed."""
  if cfg.data:
    from tcjax.data import jsonl  # pylint: disable=g-import-not-at-top
    src = jsonl.JsonlSource(cfg.data, image_size=image_size, skip_bad=cfg.skip_bad)
    if src.bad:
      logging.warning("skipped %d bad records: %s", len(src.bad), src.bad)
    out = []
    for i in range(len(src)):
      r = src[i]
      if r["suffix"] is None:
        raise ValueError(f"{cfg.data}:{r['line']}: evaluation needs a suffix (the answer)")
      out.append({"image": r["image"], "prefix": r["prefix"], "suffix": r["suffix"],
                  "family": "jsonl", "scene": None})
    return out
  from tcjax.data import testbed  # pylint: disable=g-import-not-at-top
  return [testbed.example(f, cfg.split, 0, i) for f in cfg.families
          for i in range(cfg.per_family)]


def run(model, params, tok, exs, cfg, plan) -> Dict[str, Any]:
  """Greedy answers of `model.with_plan(plan)` on `exs` (batched by image shape) -> {"answers":
  [...], "cost": per-example cost averaged over the examples}."""
  import jax  # pylint: disable=g-import-not-at-top
  from tcjax.eval import runner  # pylint: disable=g-import-not-at-top
  m = model.with_plan(plan)
  answers: List[str] = [""] * len(exs)
  costs: List[Dict[str, float]] = []
  groups: Dict[tuple, List[int]] = {}
  for i, e in enumerate(exs):
    groups.setdefault(e["image"].shape, []).append(i)
  param_bytes = jax.tree.leaves(params)[0].dtype.itemsize
  for idx in groups.values():
    for s in range(0, len(idx), cfg.batch_size):
      chunk = idx[s:s + cfg.batch_size]
      prompt = tok.batch([exs[i]["prefix"] for i in chunk], max_len=cfg.max_len)
      image = np.stack([exs[i]["image"] for i in chunk])
      mask = prompt["mask_input"].astype(bool)
      out = runner.answer_batch(m, params, tok, image, prompt["text"], mask,
                                max_new_tokens=cfg.max_new_tokens)
      for i, a in zip(chunk, out):
        answers[i] = a
      if s == 0:
        c = runner.cost(m.config, runner.token_counts(m, params, image, prompt["text"], mask),
                        prompt["text"].shape[1], param_bytes)
      costs += [c] * len(chunk)
  return {"answers": answers,
          "cost": {k: float(np.mean([c[k] for c in costs])) for k in costs[0]}}


def evaluate(cfg) -> List[Dict[str, Any]]:
  from tcjax.eval import runner  # pylint: disable=g-import-not-at-top
  model, params, tok = load(cfg)
  plan = ast.literal_eval(cfg.plan) if isinstance(cfg.plan, str) else cfg.plan
  exs = examples(cfg, model.config.img.image_size)
  rows = []
  base = None
  for name, p in (("uncompressed", ()), ("plan", plan)):
    res = run(model, params, tok, exs, cfg, p)
    scores = runner.score_answers([e["family"] for e in exs], res["answers"],
                                  [e["suffix"] for e in exs], [e["scene"] for e in exs])
    summary = runner.summarize(scores, res["answers"], base)
    base = base or summary
    rows.append({"setting": name, "plan": repr(p), "accuracy": summary["accuracy"],
                 "per_family": summary["per_family"], **res["cost"],
                 "loyalty": summary["loyalty"],
                 "relative_accuracy": summary["relative_accuracy"],
                 "answers": res["answers"]})
    if not plan:  # nothing to compare
      break
  return rows


def table(rows) -> str:
  lines = ["| setting | accuracy | loyalty | relative accuracy | image tokens | mean tokens per "
           "decoder layer | prefill GFLOPs | KV cache KiB |", "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['setting']} | {r['accuracy']:.3f} | {r['loyalty']:.3f} | "
                 f"{r['relative_accuracy']:.3f} | {r['image_tokens']:.0f} | "
                 f"{r['mean_llm_tokens']:.0f} | {r['flops'] / 1e9:.3f} | "
                 f"{r['kv_bytes'] / 1024:.1f} |")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  rows = evaluate(_CONFIG.value)
  print(table(rows))
  if _CONFIG.value.out:
    os.makedirs(_CONFIG.value.out, exist_ok=True)
    with open(os.path.join(_CONFIG.value.out, "eval.json"), "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/eval.py", "evaluation config")
  app.run(main)
