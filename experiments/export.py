"""Write the parameters of a training run's newest (or a given) checkpoint as a big_vision `.npz`.

  python -m experiments.export --workdir DIR --out tcjax/assets/bundled.npz [--step N]

The loop writes `DIR/checkpoint.npz` itself when a run finishes; this exports a run still in
progress (or stopped at a session's end), without its optimizer state.
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import orbax.checkpoint as ocp

from tcjax.checkpoints import save_big_vision


def export(workdir: str, out: str, step=None) -> int:
  """Saves the params of checkpoint `step` (None = newest) of `workdir` to `out`; returns the
  step."""
  path = os.path.abspath(os.path.join(workdir, "ckpt"))
  with ocp.CheckpointManager(path, item_names=("state", "data")) as mngr:
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"{path} holds no checkpoint")
    # No target tree: orbax restores the saved arrays as NumPy, on the host.
    state = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  params = state["state"]["params"]
  save_big_vision(out, {"params": _numpy(params)})
  return step


def _numpy(tree):
  return {k: _numpy(v) if isinstance(v, dict) else np.asarray(v) for k, v in tree.items()}


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--workdir", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--step", type=int, default=None)
  args = ap.parse_args()
  step = export(args.workdir, args.out, args.step)
  print(f"wrote {args.out} from step {step}")


if __name__ == "__main__":
  main()
