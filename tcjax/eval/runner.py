"""Greedy answers, their scores and the cost of a plan: the one runner behind training-time
evaluation (`tcjax.train.loop.evaluate`), `experiments.eval` and `experiments.sweep`.

  answers = answer_batch(model, params, tok, image, text, input_mask, max_new_tokens=10)
  scores = score_answers(families, answers, references, scenes)   # one dict per example
  summary = summarize(scores, answers, baseline)                  # accuracy, loyalty, ...
  counts = token_counts(model, params, image, text, input_mask)   # static, nothing runs
  c = cost(model.config, counts, text_len=T, param_bytes=4)       # FLOPs, KV bytes, tokens

Shapes: image float[B, H, W, 3] (a clip float[B, F, H, W, 3]); text, input_mask [B, T] (the
prompt, right-padded; input_mask False on padding).
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from tcjax.eval import answers as qa
from tcjax.eval import flops
from tcjax.nn import plan as plan_lib


def answer_batch(model, params, tokenizer, image, text, input_mask, *, max_new_tokens: int,
                 image_tokens=None) -> List[str]:
  """Greedy answers of one batch, decoded to strings (cut at EOS).

  Args:
    model, params: a `PaliGemma` (its plan acts) and its parameters.
    image: the batch's images or clips; None with `image_tokens`.
    text, input_mask: the prompts int32[B, T] and bool[B, T].
    image_tokens: projected image Tokens (`embed_image`'s) to start from instead of `image`.
  """
  from tcjax.nn.sampling import generate  # pylint: disable=g-import-not-at-top
  out = generate(model, params, image, text, max_new_tokens=max_new_tokens,
                 prefix_mask=np.asarray(input_mask).astype(bool), eos_id=tokenizer.eos_id,
                 pad_id=tokenizer.pad_id, image_tokens=image_tokens)
  return [tokenizer.decode(row) for row in np.asarray(out)]


def score_answers(families: Sequence[str], answers: Sequence[str], references: Sequence[str],
                  scenes: Optional[Sequence[Any]] = None) -> List[Dict[str, Any]]:
  """One `answers.score` dict per example ("correct", "exact", "iou" for locate) + "family"."""
  if not len(families) == len(answers) == len(references):
    raise ValueError(f"{len(families)} families, {len(answers)} answers and "
                     f"{len(references)} references")
  scenes = [None] * len(answers) if scenes is None else scenes
  return [dict(qa.score(f, a, r, s), family=f)
          for f, a, r, s in zip(families, answers, references, scenes)]


def summarize(scores: Sequence[Dict[str, Any]], answers: Sequence[str],
              baseline: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
  """Accuracy overall and per family; against `baseline` (another summary of the same
  examples, the uncompressed model's, holding its "answers"): loyalty and relative accuracy,
  overall and per family. Without a baseline the summary is its own (loyalty 1, relative 1).

  Returns {"accuracy", "per_family": {family: accuracy}, "iou_per_family": {family: mean IoU}
  (families scored by IoU only), "loyalty", "loyalty_per_family", "relative_accuracy",
  "relative_per_family", "answers"}.
  """
  acc = qa.mean_by(scores, "correct")
  out = {"accuracy": acc[None], "per_family": {k: v for k, v in acc.items() if k is not None},
         "answers": list(answers)}
  # Mean IoU of the box families (locate): how far below the threshold a miss lands.
  with_iou = [s for s in scores if "iou" in s]
  out["iou_per_family"] = {k: v for k, v in qa.mean_by(with_iou, "iou").items()
                           if k is not None} if with_iou else {}
  base = out if baseline is None else baseline
  fams = [s["family"] for s in scores]
  same = [{"family": f, "same": qa.exact_match(a, b)}
          for f, a, b in zip(fams, answers, base["answers"])]
  qa.loyalty(answers, base["answers"])  # checks the lengths
  loyal = qa.mean_by(same, "same")
  out["loyalty"] = loyal[None]
  out["loyalty_per_family"] = {k: v for k, v in loyal.items() if k is not None}
  out["relative_accuracy"] = qa.relative_accuracy(out["accuracy"], base["accuracy"])
  out["relative_per_family"] = {k: qa.relative_accuracy(v, base["per_family"][k])
                                for k, v in out["per_family"].items()}
  return out


def token_counts(model, params, image, text, input_mask, *, image_tokens=None
                 ) -> Dict[str, Any]:
  """Static token counts of one prefill, read while tracing (nothing runs): "vit_tokens" per
  ViT layer of one image or frame (None when starting from `image_tokens`), "vit_merged" (tokens
  ToMe merges inside each ViT layer, from the plan), "frames" (the ViT runs once per frame of a
  clip), "image_tokens" to the decoder, "llm_tokens" per decoder layer."""
  import jax  # pylint: disable=g-import-not-at-top
  seen: Dict[str, Any] = {}

  def prefill(p, image, text, input_mask, image_tokens):
    _, _, aux = model.apply({"params": p}, image, text, np.zeros(text.shape, np.int32),
                            input_mask, image_tokens=image_tokens, method=model.prefill)
    seen.update({k: aux.get(k) for k in ("vit_tokens", "image_tokens", "llm_tokens")})
    return 0

  jax.eval_shape(prefill, params, image, text, input_mask, image_tokens)
  seen["frames"] = image.shape[1] if image is not None and np.ndim(image) == 5 else 1
  seen["vit_merged"] = plan_lib.tome_schedule(model.config.plan, model.config.img.depth)[0]
  return seen


def cost(config, counts: Dict[str, Any], text_len: int, param_bytes: int) -> Dict[str, float]:
  """Analytic prefill FLOPs of one example (`flops.prefill_flops`, the ViT once per frame of a
  clip) and its KV-cache bytes (keys + values of every decoder layer's entries) from
  `token_counts`; vit_tokens None (or not one per layer) counts the ViT uncompressed, and
  vit_merged (optional) the tokens ToMe merges before each ViT layer's MLP.

  Returns {"flops", "kv_bytes", "image_tokens", "mean_llm_tokens" (image + text tokens per
  decoder layer), "mean_llm_image_tokens" (image tokens per decoder layer)}.
  """
  vit = counts.get("vit_tokens")
  f = flops.prefill_flops(config, text_len=text_len,
                          vit_tokens_per_layer=vit if vit and len(vit) == config.img.depth
                          else None,
                          image_tokens_to_llm=counts["image_tokens"],
                          llm_tokens_per_layer=counts["llm_tokens"],
                          vit_merged_per_layer=counts.get("vit_merged")
                          if vit and len(vit) == config.img.depth else None)
  total = f["total"] + (counts.get("frames", 1) - 1) * f["vit"]
  g = config.llm
  kv = sum(counts["llm_tokens"]) * 2 * g.num_kv_heads * g.head_dim * param_bytes
  return {"flops": total, "kv_bytes": float(kv), "image_tokens": counts["image_tokens"],
          "mean_llm_tokens": float(np.mean(counts["llm_tokens"])),
          "mean_llm_image_tokens": float(np.mean(counts["llm_tokens"])) - text_len}
