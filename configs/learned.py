"""Train a learned compressor on the bundled model, its towers frozen.

  python -m experiments.train --config configs/learned.py:tokenlearner --workdir DIR
  python -m experiments.train --config configs/learned.py:perceiver,budget=32 --workdir DIR
  python -m experiments.train --config configs/learned.py:qformer,stage=post_proj --workdir DIR
  python -m experiments.train --config configs/learned.py:ldpv2 --workdir DIR

  python -m experiments.train --config configs/learned.py:m3 --workdir DIR
  python -m experiments.train --config configs/learned.py:caft --workdir DIR

arg: "<method>[,budget=K][,stage=post_vit|post_proj][,video][,smoke]" with method one of
`tcjax.nn.learned.LEARNED` (tokenlearner, perceiver, qformer, ldpv2). The plan holds one entry,
the compressor at `stage` with `budget` output tokens (default 16; LDPv2 pools 2 x 2, so 64 of
the 256 patches); its parameters are `compressor/<stage>_<method>_<budget>/...`, initialised
fresh, and `trainable` = "compressor/.*": the towers (`img/...`, `llm/...`) get no update and no
optimizer state. Defaults: TokenLearner, Perceiver and LDPv2 after the ViT (before the frozen
projector: their outputs stay in the features the projector was trained on); the Q-Former after
the projector, where its queries read the prompt (InstructBLIP's instruction-aware form).
Module sizes are scaled to the bundled model's width 96 (the papers' defaults are for 768+ wide
towers and would be larger than the model itself); override with --config.model.plan.

At the end the run writes `DIR/compressors.npz` (the compressor's parameters and plan entry, not
the towers: `tcjax.nn.learned.save_trained`); the sweep runs it beside the training-free methods:

  python -m experiments.sweep --config.learned=DIR/compressors.npz

The image families train by default: a compressor's budget is one number of tokens per example,
and a 2048-token clip is a different compression problem. ",video" trains one on the testbed's
8-frame clips instead (`video` family, batches of 4 (8 with smoke), evaluated on clips):

  python -m experiments.train --config configs/learned.py:tokenlearner,budget=32,video --workdir DIR

There a TokenLearner gets the entry option `frames=8` (its per-frame maps are shaped for 8-frame
clips, and the loop initialises it on one) and LDPv2's default budget is its 2 x 2 pooling of
every frame (512).
"smoke": the tiny random model of configs/testbed.py:smoke and a few steps, for tests.

"m3": Matryoshka multimodal training (M3, Cai et al., arXiv 2405.17430): one model serving
several budgets through nested pooling levels. The official recipe runs every level in each step
and averages the losses; here each step draws one level (the loop's `model.plan_choices`), a
cheaper variant M3's authors also describe - a deviation. Levels 256 / 64 / 16 / 4 / 1 tokens
(k = 1, 2, 4, 8, 16 pooling of the 16 x 16 grid after the ViT: with a linear projector the same
as after it). M3 has no compressor parameters; it fine-tunes the decoder's attention
(`llm/layers/attn/.*`, as configs/finetune.py; the paper tunes the LLM), the ViT frozen.
Evaluate each level with the sweep (`pool` at post_vit, budgets 64 / 16 / 4 / 1).

"caft": compression-aware fine-tuning. The whole bundled model is fine-tuned while each step
draws one training-free plan after the ViT: pooling, VisionZip, ToMe or DivPrune (`CAFT_METHODS`)
at 64, 32 or 16 tokens (`CAFT_BUDGETS`; pooling at 64 and 16 only: no square window pools 16 x 16
patches to 32). It has no compressor parameters; compare the same
methods and budgets with and without it in the sweep:

  python -m experiments.sweep --config.methods=pool,visionzip,tome,divprune \
      --config.stages=post_vit --config.checkpoint=DIR/checkpoint.npz
"""

import ml_collections

from configs import testbed as testbed_config
from tcjax.compress.pool import pool_window_for_budget
from tcjax.data import testbed

BUNDLED = "tcjax/assets/bundled.npz"
DEFAULT_STAGE = {"tokenlearner": "post_vit", "perceiver": "post_vit", "qformer": "post_proj",
                 "ldpv2": "post_vit"}
DEFAULT_BUDGET = {"tokenlearner": 16, "perceiver": 16, "qformer": 16, "ldpv2": 64}
M3_LEVELS = (256, 64, 16, 4, 1)  # nested: each level pools 2 x 2 windows of the one before
CAFT_METHODS = ("pool", "visionzip", "tome", "divprune")  # one per family the issue names
CAFT_BUDGETS = (64, 32, 16)


def sizes(method: str, width: int):
  """Module options scaled to a tower of `width` features."""
  heads = 4 if width % 4 == 0 else 2
  return {
      "tokenlearner": dict(bottleneck_dim=64),
      "perceiver": dict(depth=2, heads=heads, head_dim=width // heads),
      "qformer": dict(width=width, depth=2, heads=heads, mlp_dim=4 * width),
      "ldpv2": dict(),
  }[method]


def reachable(method: str, budget: int, grid) -> bool:
  """False for a pooling budget that no k x k window gives on `grid` (32 of 16 x 16 patches):
  that plan would raise at its first step, so CAFT does not draw it."""
  if method != "pool":
    return True
  try:
    pool_window_for_budget(grid, budget)
  except ValueError:
    return False
  return True


def parse(arg: str):
  """"method[,budget=K][,stage=S][,video][,smoke]" -> (method, budget, stage, smoke, video)."""
  parts = [p.strip() for p in arg.split(",") if p.strip()]
  if not parts or parts[0] not in tuple(DEFAULT_STAGE) + ("m3", "caft"):
    raise ValueError(f"configs/learned.py needs a compressor first, one of "
                     f"{sorted(DEFAULT_STAGE)}, m3 or caft; got {arg!r}")
  method, rest = parts[0], parts[1:]
  opts = {"budget": None, "stage": DEFAULT_STAGE.get(method, "post_vit"), "smoke": False,
          "video": False}
  for p in rest:
    key, eq, value = p.partition("=")
    if key in ("smoke", "video") and not eq:
      opts[key] = True
    elif key == "budget" and eq and value.isdigit() and int(value) > 0:
      opts["budget"] = int(value)
    elif key == "stage" and value in ("post_vit", "post_proj"):
      opts["stage"] = value
    else:
      raise ValueError(f"configs/learned.py: bad argument part {p!r} in {arg!r}; use "
                       "budget=<int>, stage=post_vit|post_proj, video or smoke")
  if opts["video"] and method not in DEFAULT_STAGE:
    raise ValueError(f"configs/learned.py: video trains a compressor, not {method!r}")
  if opts["budget"] is None:
    frames = testbed.VIDEO_FRAMES if opts["video"] and method == "ldpv2" else 1
    opts["budget"] = DEFAULT_BUDGET.get(method, 64) * frames
  return method, opts["budget"], opts["stage"], opts["smoke"], opts["video"]


def get_config(arg: str = "tokenlearner"):
  method, budget, stage, smoke, video = parse(arg)
  c = testbed_config.get_config("smoke" if smoke else "")
  c.init = "" if smoke else BUNDLED  # the pretrained towers (config read off the file)
  if method == "caft":
    c.trainable = ".*"
    side = c.model.img["image_size"] // c.model.img["patch_size"]
    c.model.plan_choices = tuple(((stage, {"method": m, "budget": b}),)
                                 for m in CAFT_METHODS for b in CAFT_BUDGETS
                                 if reachable(m, b, (1, side, side)))
    c.model.plan = ((stage, {"method": "pool", "budget": budget}),)  # evaluated at the end
  elif method == "m3":
    c.trainable = r"llm/layers/attn/.*"
    c.model.plan_choices = tuple(((stage, {"method": "pool", "budget": b}),)
                                 for b in M3_LEVELS)
    c.model.plan = ((stage, {"method": "pool", "budget": budget}),)  # evaluated at the end
  else:
    c.trainable = r"compressor/.*"
    # configs/testbed.py's sizes are the bundled model's (width 96), or the smoke model's.
    width = c.model.img["width"] if stage == "post_vit" else c.model.llm["width"]
    entry = {"method": method, "budget": budget, **sizes(method, width)}
    if video and method == "tokenlearner":
      entry["frames"] = testbed.VIDEO_FRAMES
    c.model.plan = ((stage, entry),)
  c.data.families = ("video",) if video else testbed.IMAGE_FAMILIES
  c.data.max_len = 24
  c.data.batch_size = dict(video=8 if smoke else 4) if video else dict(image=8 if smoke else 32)
  c.data.weights = dict(video=1.0) if video else dict(image=1.0)
  c.total_steps = 4 if smoke else 600
  c.ckpt_every = 2 if smoke else 200
  c.log_every = 1 if smoke else 20
  c.optim.lr = 3e-3 if smoke else 1e-3
  if method == "caft" and not smoke:
    c.optim.lr = 3e-4  # the whole model moves, not a fresh module: a lower rate
  c.optim.warmup_steps = 1 if smoke else 50
  c.optim.weight_decay = 0.0
  c.eval.families = c.data.families
  c.eval.every = 0 if smoke else 600  # once, at the end
  c.eval.per_family = 8 if smoke else 48
  return c
