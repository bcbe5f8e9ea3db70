"""Every compression method at every stage and budget on the bundled model: accuracy against cost.

`python -m experiments.sweep [--config configs/sweep.py[:full|:tiny]] [--config.field=value ...]`

Runs `tcjax.eval.sweep` on the testbed's families (see `configs/sweep.py`), sharded over the
devices present (batch on the mesh's `data` axis), with a progress bar, then writes into
`config.out`: sweep.json (config, rows with answers, errors and cost per family: analytic FLOPs,
KV-cache bytes, tokens per decoder layer and, with `config.latency`, prefill / decode latency
and peak memory), sweep.md (the table) and the plots accuracy_vs_tokens.png,
accuracy_vs_flops.png (Pareto frontier), loyalty_vs_tokens.png and retained_<budget>.png (each
vision-side setting's kept / merged patches on the first `config.pictures` images of every
image family); with adaptive policies
(`config.adaptive`) also the table of adaptive against fixed budgets at equal mean tokens (in
sweep.md) and adaptive_vs_fixed.png. Prints the tables and where the plots are.
"""

from __future__ import annotations

import ast
import json
import os
import time
from typing import Any, Dict

from absl import app, logging
from ml_collections import config_flags

# Defined only when run as a script: eval and sweep are imported side by side by the tests,
# and absl refuses a second module-level --config flag.
_CONFIG = None


def _names(v: str, what: str, words=("all",)):
  """One of `words`, or comma-separated names as a tuple."""
  if not isinstance(v, str):
    raise ValueError(f"config.{what}: 'all' or comma-separated names, got {v!r}")
  if v.strip() in words:
    return v.strip()
  names = tuple(n.strip() for n in v.split(",") if n.strip())
  if not names:
    raise ValueError(f"config.{what}: 'all' or comma-separated names, got {v!r}")
  return names


def _options(v, what: str = "options") -> Dict[str, Dict[str, Any]]:
  opts = ast.literal_eval(v) if isinstance(v, str) else dict(v)
  if not isinstance(opts, dict) or not all(isinstance(o, dict) for o in opts.values()):
    raise ValueError(f"config.{what} must be {{method: {{option: value}}}}, got {v!r}")
  return opts


def _same_model(bundled_model, path: str):
  """The parameters of the big_vision `.npz` at `path` (a fine-tuned copy of the bundled model:
  M3, compression-aware fine-tuning) -> (model, params); ValueError when its architecture is not
  the bundled model's (the tokenizer and the testbed are the bundled model's)."""
  from tcjax import checkpoints  # pylint: disable=g-import-not-at-top
  model, params = checkpoints.load_big_vision(path)
  if model.config != bundled_model.config:
    raise ValueError(f"config.checkpoint {path}: not the bundled model's architecture "
                     f"({model.config} vs {bundled_model.config})")
  return model, params


def _with_trained(params, paths):
  """`params` with the trained compressors of each file in `paths` (`tcjax.nn.learned.
  save_trained`, e.g. a run's `compressors.npz`) -> (params, one Setting per compressor)."""
  from tcjax.eval import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  from tcjax.nn import learned  # pylint: disable=g-import-not-at-top
  subtree = dict(params.get(learned.SUBTREE, {}))
  settings = []
  towers = learned.towers_fingerprint(params) if paths else None
  for path in paths:
    plan, trained = learned.load_trained(path)
    if learned.trained_towers(path) not in (None, towers):
      raise ValueError(f"config.learned: {path} was trained on other towers than the model's "
                       "(tcjax.nn.learned.towers_fingerprint differs): its features would mean "
                       "nothing here; retrain it from this model (configs/learned.py), or pass "
                       "the model it was trained on with config.checkpoint")
    clash = sorted(set(subtree) & set(trained[learned.SUBTREE]))
    if clash:
      raise ValueError(f"config.learned: {path} holds compressor(s) {clash} already loaded; "
                       "give one a 'name' when training it")
    subtree.update(trained[learned.SUBTREE])
    for stage, opts in plan:
      rest = {k: v for k, v in opts.items() if k not in ("method", "budget")}
      settings.append(sweep_lib.Setting(opts["method"], stage, opts["budget"],
                                        tuple(sorted(rest.items()))))
  return {**params, learned.SUBTREE: subtree}, settings


def sweep(cfg) -> Dict[str, Any]:
  """Runs the sweep of `cfg` and writes its outputs -> {"rows", "table", "plots", "seconds",
  "json", "markdown"}."""
  import jax  # pylint: disable=g-import-not-at-top
  from tcjax import bundled  # pylint: disable=g-import-not-at-top
  from tcjax.compress import METHODS  # pylint: disable=g-import-not-at-top
  from tcjax.nn.learned import LEARNED  # pylint: disable=g-import-not-at-top
  from tcjax.data import testbed  # pylint: disable=g-import-not-at-top
  from tcjax.eval import report  # pylint: disable=g-import-not-at-top
  from tcjax.eval import sweep as sweep_lib  # pylint: disable=g-import-not-at-top
  from tcjax.parallel import make_mesh  # pylint: disable=g-import-not-at-top

  start, cpu_start = time.perf_counter(), time.process_time()
  settings = sweep_lib.settings(_names(cfg.methods, "methods"),
                                _names(cfg.stages, "stages", ("all", "primary")),
                                tuple(cfg.budgets))
  adaptive = _options(cfg.adaptive, "adaptive")
  if adaptive:
    more = sweep_lib.adaptive_settings(adaptive, _names(cfg.adaptive_stages, "adaptive_stages",
                                                        ()), cfg.adaptive_capacity)
    settings += [s for s in more if s not in settings]
  options = _options(cfg.options)
  unknown = sorted(set(options) - set(METHODS) - set(sweep_lib.SCHEDULES) - set(LEARNED))
  if unknown:
    raise ValueError(f"config.options: unknown method(s) {unknown}")
  families = tuple(cfg.families)
  for f in families:
    testbed.modality(f)  # ValueError for an unknown family
  if cfg.per_family < 1:
    raise ValueError(f"config.per_family must be >= 1, got {cfg.per_family}")
  if cfg.workers < 1:
    raise ValueError(f"config.workers must be >= 1, got {cfg.workers}")
  if cfg.latency and cfg.latency_reps < 1:
    raise ValueError(f"config.latency_reps must be >= 1, got {cfg.latency_reps}")
  model, params, tok = bundled.load()
  weights = "the bundled model"
  if cfg.checkpoint:
    model, params = _same_model(model, cfg.checkpoint)
    weights = cfg.checkpoint
  if cfg.learned:
    params, trained = _with_trained(params, _names(cfg.learned, "learned", ()))
    settings += [s for s in trained if s not in settings]
  examples = [testbed.example(f, cfg.split, cfg.seed, i) for f in families
              for i in range(cfg.per_family)]
  mesh = make_mesh(tuple((str(n), int(s)) for n, s in cfg.mesh), cfg.axis_types)
  opts = sweep_lib.SweepOptions(batch_size=cfg.batch_size, max_len=cfg.max_len,
                                max_new_tokens=cfg.max_new_tokens, signal_layer=cfg.signal_layer,
                                vit_layer=cfg.vit_layer, llm_layer=cfg.llm_layer,
                                options=options, mesh=mesh, workers=cfg.workers,
                                latency=bool(cfg.latency), latency_reps=cfg.latency_reps,
                                pictures=cfg.pictures)
  progress = None
  if cfg.progress:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top
    progress = lambda total: tqdm(total=total, desc="sweep", unit="step", dynamic_ncols=True)
  rows = sweep_lib.run(model, params, tok, examples, settings, opts, progress)
  seconds = time.perf_counter() - start
  cpu_seconds = time.process_time() - cpu_start

  os.makedirs(cfg.out, exist_ok=True)
  plots = report.plots(rows, families, cfg.out)
  plots += report.retained_pictures(rows, examples, cfg.out, model.config.img.patch_size)
  # The pictures' patch maps stay out of sweep.json (one int per patch per setting).
  rows = [{k: v for k, v in r.items() if k != "retained"} for r in rows]
  text = report.table(rows, families)
  adaptive_text = report.adaptive_table(rows, families)
  info = {"config": cfg.to_dict(), "devices": [str(d) for d in jax.devices()],
          "mesh": dict(mesh.shape), "seconds": seconds, "cpu_seconds": cpu_seconds,
          "examples": len(examples),
          "settings": len(settings), "rows": rows}
  paths = {"json": os.path.join(cfg.out, "sweep.json"),
           "markdown": os.path.join(cfg.out, "sweep.md")}
  with open(paths["json"], "w") as f:
    json.dump(sweep_lib.clean(info), f, indent=1, default=str)
  with open(paths["markdown"], "w") as f:
    f.write(f"# Sweep on {weights}\n\n{len(examples)} testbed examples "
            f"({cfg.per_family} per family), {len(settings)} settings, {seconds:.0f} s "
            f"({cpu_seconds:.0f} s of CPU) on {len(jax.devices())} "
            f"{jax.devices()[0].platform} device(s).\n\n{text}\n\n"
            + (f"## Adaptive budgets against fixed budgets at equal mean tokens\n\n"
               f"{adaptive_text}\n\n" if adaptive_text else "")
            + "".join(f"![{os.path.basename(p)}]({os.path.basename(p)})\n" for p in plots))
  return {"rows": rows, "table": text, "adaptive_table": adaptive_text, "plots": plots,
          "seconds": seconds,
          "cpu_seconds": cpu_seconds, **paths}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  res = sweep(_CONFIG.value)
  print(res["table"])
  if res["adaptive_table"]:
    print(f"\nAdaptive budgets against fixed budgets at equal mean tokens:\n\n"
          f"{res['adaptive_table']}")
  print(f"\n{len(res['rows'])} settings in {res['seconds']:.0f} s ({res['cpu_seconds']:.0f} s "
        f"of CPU). Table: {res['markdown']}, "
        f"rows: {res['json']}; plots:")
  for p in res["plots"]:
    print(f"  {p}")


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file("config", "configs/sweep.py", "sweep config")
  app.run(main)
