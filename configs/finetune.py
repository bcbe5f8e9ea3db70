"""Fine-tune a real PaliGemma checkpoint on your own JSONL data (big_vision's colab format).

  python -m experiments.train --config configs/finetune.py --workdir DIR \\
      --config.init=paligemma2-3b-pt-224.b16.npz \\
      --config.tokenizer=paligemma_tokenizer.model \\
      --config.data.jsonl=train.jsonl

`init` is a big_vision `.npz` or an HF `save_pretrained` directory; the model's sizes come from
it. Records are `{"image": path, "prefix": str, "suffix": str}`; images are resized to the
checkpoint's resolution. Parameters are sharded over the `data` axis (FSDP rules of
`configs/sharding.py`); by default only the decoder's attention layers train, as in big_vision's
fine-tuning colab (`--config.trainable='.*'` trains everything). A compression plan in
`model.plan` fine-tunes through it. Re-running the command resumes.
"""

from configs import testbed
from configs.sharding import PALIGEMMA_RULES


def get_config(arg: str = ""):
  if arg:
    raise ValueError(f"configs/finetune.py takes no argument, got {arg!r}")
  c = testbed.get_config()
  c.tokenizer = ""
  c.total_steps = 64
  c.log_every = 1
  c.ckpt_every = 32
  c.trainable = r"llm/layers/attn/.*"
  c.compute_dtype = "float32"  # or "bfloat16" (f32 parameters and update either way)
  c.loss_norm = "example"      # big_vision's per-example mean; "token" (tcjax.train.loss_fn)
  c.mesh = (("data", -1),)
  c.param_rules = PALIGEMMA_RULES
  c.model.plan = ()
  c.data.max_len = 64
  c.data.batch_size = dict(image=8)
  c.optim.lr = 3e-5
  c.optim.warmup_steps = 4
  c.optim.weight_decay = 0.0
  c.eval.every = 0
  return c
