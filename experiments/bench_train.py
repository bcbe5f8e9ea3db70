"""Training throughput of the bundled config, and of its input pipeline alone.

  python -m experiments.bench_train [--steps 4] [--write]

Per modality (image / video / audio batches of `configs/testbed.py`): examples per second of
the jitted training step (after two warm-up steps), and of the grain stream making batches
(one thread, as the loop runs it). Target: the pipeline >= 5x faster than training, so that it
never limits it. The last row weighs the modalities as the training mix does. Ratios come from
one run on one machine; `--write` replaces the `## bench_train` section of RESULTS.md.
"""

from __future__ import annotations

import argparse
import platform
import time

import grain
import jax
import numpy as np

from configs.testbed import get_config
from experiments._results import write_section
from tcjax.data import pipeline
from tcjax.nn import PaliGemma
from tcjax.tokenizer import Tokenizer
from tcjax.train.loop import _MODEL_INPUTS, init_fn, make_optimizer, model_config
from tcjax.train.step import TrainState, make_train_step


def examples_per_sec(fn, n: int, per_call: int) -> float:
  t = time.perf_counter()
  for _ in range(n):
    fn()
  return n * per_call / (time.perf_counter() - t)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--steps", type=int, default=4, help="timed training steps per modality")
  ap.add_argument("--write", action="store_true")
  args = ap.parse_args()
  cfg = get_config()
  tok = Tokenizer(cfg.tokenizer)
  model = PaliGemma(model_config(cfg))
  params = jax.jit(init_fn(model, 0))()
  tx = make_optimizer(cfg, params)
  step = jax.jit(make_train_step(model), donate_argnums=0)
  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx)
  rows = []
  for mod, fams in pipeline.by_modality(cfg.data.families).items():
    bs = cfg.data.batch_size[mod]
    it = iter(pipeline.testbed_stream(fams, tok, split="train", seed=0, batch_size=bs,
                                      max_len=cfg.data.max_len).to_iter_dataset(
                                          grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)))
    data_rate = examples_per_sec(lambda: next(it), 8, bs)
    batch = {k: v for k, v in next(it).items() if k in _MODEL_INPUTS}
    for _ in range(2):  # compile + warm up
      state, m = step(state, batch)
    jax.block_until_ready(m)

    def one():
      nonlocal state
      state, m = step(state, batch)
      jax.block_until_ready(m)

    train_rate = examples_per_sec(one, args.steps, bs)
    rows.append((mod, bs, cfg.data.weights[mod], train_rate, data_rate))
  # The mix: weights count batches; time per batch = batch size / rate.
  w = np.array([r[2] for r in rows])
  ex = w @ np.array([r[1] for r in rows])
  train_mix = ex / (w @ np.array([r[1] / r[3] for r in rows]))
  data_mix = ex / (w @ np.array([r[1] / r[4] for r in rows]))
  lines = ["| batches | batch | share of batches | train ex/s | pipeline ex/s | pipeline / train "
           "(target >= 5) |", "|---|---|---|---|---|---|"]
  for mod, bs, wt, tr, dr in rows + [("mix", "-", 1.0, train_mix, data_mix)]:
    lines.append(f"| {mod} | {bs} | {wt:.2f} | {tr:.1f} | {dr:.1f} | {dr / tr:.1f}x "
                 f"{'pass' if dr / tr >= 5 else 'MISS'} |")
  table = "\n".join(lines)
  print(table)
  if args.write:
    write_section(
        f"## bench_train\n\n`python -m experiments.bench_train --write` ({platform.machine()}, "
        f"{jax.device_count()} CPU device, {args.steps} timed steps per modality): training "
        f"examples per second for the bundled config against its grain input pipeline alone.\n\n"
        f"{table}\n", "## bench_train")


if __name__ == "__main__":
  main()
