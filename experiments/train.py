"""Train (or resume) a PaliGemma: `python -m experiments.train --config configs/testbed.py
--workdir DIR [--config.field=value ...]`. Re-running the same command resumes from DIR's newest
checkpoint. See `tcjax/train/loop.py` for what DIR holds."""

from absl import app, flags, logging
from ml_collections import config_flags

from tcjax.parallel import initialize_distributed
from tcjax.train.loop import train

_CONFIG = config_flags.DEFINE_config_file("config", "configs/testbed.py", "training config")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go", required=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  initialize_distributed()
  out = train(_CONFIG.value, _WORKDIR.value)
  print(f"done: step {out['step']}, " + ", ".join(f"{k}={v:.3f}" for k, v in out["eval"].items()))


if __name__ == "__main__":
  app.run(main)
