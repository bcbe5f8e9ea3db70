"""Answer quality and cost of a checkpoint under a compression plan, on JSONL data or the testbed.

  python -m experiments.eval --config configs/eval.py \\
      --config.checkpoint=paligemma2-3b-pt-224.b16.npz --config.tokenizer=paligemma_tokenizer.model \\
      --config.data=val.jsonl --config.plan='(("post_vit", {"method": "pool", "budget": 64}),)'

checkpoint: a big_vision `.npz` or an HF `save_pretrained` directory ("" = the bundled model,
with its tokenizer). data: a JSONL file of {"image", "prefix", "suffix"} records ("" = the
testbed's test split, `per_family` examples of each family). plan: a Python literal of the plan
(stage, options) pairs; the uncompressed model always runs too, for loyalty and relative accuracy.
"""

import ml_collections


def get_config(arg: str = ""):
  if arg:
    raise ValueError(f"configs/eval.py takes no argument, got {arg!r}")
  c = ml_collections.ConfigDict()
  c.checkpoint = ""
  c.tokenizer = ""
  c.data = ""
  c.skip_bad = False
  c.plan = "()"
  c.families = ("count", "binding", "digit", "number", "locate", "video", "audio")
  c.split = "test"    # the testbed split: "test", "val" or "train" (is a model overfitting?)
  c.per_family = 32
  c.batch_size = 16
  c.max_len = 64
  c.max_new_tokens = 16
  c.out = ""          # a directory for eval.json ("" = do not write)
  return c
