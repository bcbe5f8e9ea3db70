"""Distil the bundled model (the teacher, uncompressed, frozen) into a compressed student.

  python -m experiments.train --config configs/distill.py --workdir DIR
  python -m experiments.train --config configs/distill.py:topk,budget=32 --workdir DIR
  python -m experiments.train --config configs/distill.py:perceiver,hidden=1 --workdir DIR
  python -m experiments.train --config configs/distill.py:light --workdir DIR

arg: "<student>[,budget=K][,hidden=W][,image=W][,smoke]".
student: a `tcjax.compress` method acting after the ViT (default `pool`; the student is the
  teacher's copy with that plan, every parameter trained), a learned compressor of
  `tcjax.nn.learned.LEARNED` (its plan and sizes as configs/learned.py; only
  `compressor/...` trains), or `light`: a lighter vision tower (1 ViT layer, patch 8: 64 tokens
  instead of 256; `tcjax.train.light_encoder`), only `img/...` trains, the decoder stays the
  teacher's, and the image-token term is on (weight 1) so the tower learns to give the tokens
  the teacher's decoder reads.
budget: the plan's tokens (default 64, learned ones as configs/learned.py). hidden, image: the
  weights of the feature terms (decoder states at the answer positions; image tokens against
  the teacher's averaged over the patches each carries).
smoke: a few steps on small batches, for tests.

The student starts from the teacher's parameters (`config.init` stays ""; `config.model`'s
towers are not used, only its plan). The `distill` section (`tcjax.train.distill.Options`):
  teacher      a big_vision .npz or HF directory; "" the bundled model
  alpha        loss = alpha * KD + (1 - alpha) * CE (+ the feature terms), in [0, 1]
  temperature  of the KD's softmaxes (> 0; the KD is scaled by its square)
  features     {hidden: weight, image: weight}, 0 = off
  hidden_at    "answer" (the positions predicting answer tokens) or "text" (every text token)
  student_img  {depth, patch_size}: a lighter vision tower; 0 keeps the teacher's
Every field can be overridden: --config.distill.alpha=0.9 --config.distill.features.hidden=1.
"""

import ml_collections

from configs import learned as learned_config
from configs import testbed as testbed_config
from tcjax.compress import METHODS
from tcjax.data import testbed
from tcjax.nn import learned

BUNDLED_WIDTH = 96  # the bundled model's ViT and decoder width (learned compressors' sizes)


def parse(arg: str):
  """"student[,budget=K][,hidden=W][,image=W][,smoke]" -> dict of the parts."""
  parts = [p.strip() for p in arg.split(",") if p.strip()]
  student = parts[0] if parts and "=" not in parts[0] and parts[0] != "smoke" else "pool"
  rest = parts[1:] if parts and parts[0] == student else parts
  if student != "light" and student not in learned.LEARNED and (
      student not in METHODS or "post_vit" not in METHODS[student].stages):
    raise ValueError(f"configs/distill.py: unknown student {student!r}; use light, a learned "
                     f"compressor {sorted(learned.LEARNED)} or a method acting at post_vit")
  out = {"student": student, "budget": None, "hidden": 0.0, "image": 1.0 if student == "light"
         else 0.0, "smoke": False}
  for p in rest:
    key, eq, value = p.partition("=")
    if key == "smoke" and not eq:
      out["smoke"] = True
    elif key == "budget" and eq and value.isdigit() and int(value) > 0:
      out["budget"] = int(value)
    elif key in ("hidden", "image") and eq and _is_weight(value):
      out[key] = float(value)
    else:
      raise ValueError(f"configs/distill.py: bad argument part {p!r} in {arg!r}; use "
                       "budget=<int>, hidden=<weight>, image=<weight> or smoke")
  return out


def _is_weight(value: str) -> bool:
  try:
    return float(value) >= 0
  except ValueError:
    return False


def get_config(arg: str = "pool"):
  a = parse(arg)
  student, smoke = a["student"], a["smoke"]
  c = testbed_config.get_config("smoke" if smoke else "")
  c.init = ""  # the student is made from the teacher
  c.loss_norm = "example"
  c.distill = ml_collections.ConfigDict(dict(
      teacher="", alpha=0.5, temperature=2.0,
      features=dict(hidden=a["hidden"], image=a["image"]), hidden_at="answer",
      student_img=dict(depth=0, patch_size=0)))
  if student == "light":
    c.distill.student_img = dict(depth=1, patch_size=8)
    c.trainable = r"img/.*"
    c.model.plan = ()
  elif student in learned.LEARNED:
    stage = learned_config.DEFAULT_STAGE[student]
    budget = a["budget"] or learned_config.DEFAULT_BUDGET[student]
    c.trainable = r"compressor/.*"
    c.model.plan = ((stage, {"method": student, "budget": budget,
                             **learned_config.sizes(student, BUNDLED_WIDTH)}),)
  else:
    c.trainable = ".*"
    c.model.plan = (("post_vit", {"method": student, "budget": a["budget"] or 64}),)
  # The image families: a plan's budget is one number of tokens per example (configs/learned.py).
  c.data.families = testbed.IMAGE_FAMILIES
  c.data.max_len = 24
  c.data.batch_size = dict(image=8 if smoke else 32)  # 8: one example per test device
  c.data.weights = dict(image=1.0)
  c.total_steps = 3 if smoke else 600
  c.ckpt_every = 3 if smoke else 200
  c.log_every = 1 if smoke else 20
  c.optim.lr = 1e-3 if smoke else 3e-4
  c.optim.warmup_steps = 1 if smoke else 50
  c.optim.weight_decay = 0.0
  c.eval.families = testbed.IMAGE_FAMILIES
  c.eval.every = 0 if smoke else 600  # once, at the end
  c.eval.per_family = 8 if smoke else 48
  return c
