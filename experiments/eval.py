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

_CONFIG = config_flags.DEFINE_config_file("config", "configs/eval.py", "evaluation config")


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
  return [testbed.example(f, "test", 0, i) for f in cfg.families for i in range(cfg.per_family)]


def token_counts(model, params, image, text, mask) -> Dict[str, Any]:
  """Static token counts of one prefill, read while tracing (nothing runs): vit_tokens per ViT
  layer, image_tokens to the decoder, llm_tokens per decoder layer."""
  import jax  # pylint: disable=g-import-not-at-top
  seen: Dict[str, Any] = {}

  def prefill(p):
    _, _, aux = model.apply({"params": p}, image, text, np.zeros_like(text), mask,
                            method=model.prefill)
    seen.update({k: aux[k] for k in ("vit_tokens", "image_tokens", "llm_tokens")})
    return 0

  jax.eval_shape(prefill, params)
  return seen


def cost(config, counts: Dict[str, Any], text_len: int, param_bytes: int) -> Dict[str, float]:
  """Analytic prefill FLOPs of one example and its KV-cache bytes (keys + values per layer)."""
  from tcjax.eval import flops  # pylint: disable=g-import-not-at-top
  vit = counts["vit_tokens"]
  f = flops.prefill_flops(config, text_len=text_len,
                          vit_tokens_per_layer=vit if len(vit) == config.img.depth else None,
                          image_tokens_to_llm=counts["image_tokens"],
                          llm_tokens_per_layer=counts["llm_tokens"])
  g = config.llm
  kv = sum(counts["llm_tokens"]) * 2 * g.num_kv_heads * g.head_dim * param_bytes
  return {"flops": f["total"], "kv_bytes": float(kv), "image_tokens": counts["image_tokens"],
          "mean_llm_tokens": float(np.mean(counts["llm_tokens"]))}


def run(model, params, tok, exs, cfg, plan) -> Dict[str, Any]:
  """Greedy answers of `model.with_plan(plan)` on `exs` (batched by image shape) -> {"answers":
  [...], "cost": per-example cost averaged over the examples}."""
  import jax  # pylint: disable=g-import-not-at-top
  import tcjax  # pylint: disable=g-import-not-at-top
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
      out = tcjax.generate(m, params, image, prompt["text"], max_new_tokens=cfg.max_new_tokens,
                           prefix_mask=mask, eos_id=tok.eos_id, pad_id=tok.pad_id)
      for i, row in zip(chunk, np.asarray(out)):
        answers[i] = tok.decode(row)
      if s == 0:
        c = cost(m.config, token_counts(m, params, image, prompt["text"], mask),
                 prompt["text"].shape[1], param_bytes)
      costs += [c] * len(chunk)
  return {"answers": answers,
          "cost": {k: float(np.mean([c[k] for c in costs])) for k in costs[0]}}


def evaluate(cfg) -> List[Dict[str, Any]]:
  from tcjax.eval import answers as qa  # pylint: disable=g-import-not-at-top
  model, params, tok = load(cfg)
  plan = ast.literal_eval(cfg.plan) if isinstance(cfg.plan, str) else cfg.plan
  exs = examples(cfg, model.config.img.image_size)
  rows = []
  base = None
  for name, p in (("uncompressed", ()), ("plan", plan)):
    res = run(model, params, tok, exs, cfg, p)
    scores = [dict(qa.score(e["family"], a, e["suffix"], e["scene"]), family=e["family"])
              for e, a in zip(exs, res["answers"])]
    acc = qa.mean_by(scores, "correct")
    row = {"setting": name, "plan": repr(p), "accuracy": acc[None],
           "per_family": {k: v for k, v in acc.items() if k is not None}, **res["cost"]}
    if base is None:
      base = row | {"answers": res["answers"]}
    row["loyalty"] = qa.loyalty(res["answers"], base["answers"])
    row["relative_accuracy"] = qa.relative_accuracy(acc[None], base["accuracy"])
    row["answers"] = res["answers"]
    rows.append(row)
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
  app.run(main)
