"""The resumable training loop behind `python -m experiments.train` (big_vision style).

`train(config, workdir)` trains a PaliGemma on the testbed (or on user JSONL data) and keeps in
`workdir`:

  ckpt/<step>/        orbax CheckpointManager: params, optimizer state, step, RNG, and the grain
                      iterator's state; every `config.ckpt_every` steps and at exit, last
                      `config.keep_ckpts` kept. Running the same command again resumes from the
                      newest one, and ends bit-identical to a run that was never interrupted
                      (same data, same order, same float ops).
  metrics.jsonl       one JSON object per logged step / evaluation
  tb/                 TensorBoard event files (tensorboardX)
  checkpoint.npz      the final parameters as a big_vision `.npz` (written at the end)
  compressors.npz     with learned compressors in the plan: their parameters alone, with their
                      plan entries (`tcjax.nn.learned.save_trained`; the sweep's `learned`)

Config fields: see `configs/testbed.py`; a `distill` section (`configs/distill.py`,
`tcjax.train.distill.Options`) trains the model as a student of a frozen teacher.
"""

from __future__ import annotations

import json
import os
import re
import time
from typing import Any, Dict

import chex
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
from flax import traverse_util
from jax.experimental import multihost_utils
from jax.sharding import PartitionSpec as P

from tcjax.data import pipeline, testbed
from tcjax.nn import GemmaConfig, PaliGemma, PaliGemmaConfig, SiglipConfig, learned
from tcjax.nn.params import sincos_2d
from tcjax.parallel import global_batch_from_local, make_mesh, param_shardings
from tcjax.train import distill, light_encoder
from tcjax.train.step import TrainState, make_train_step


# -------------------------------------------------------------------------------------------
# Model, optimizer


def model_config(cfg: ml_collections.ConfigDict) -> PaliGemmaConfig:
  """`config.model` (img / llm dicts, plan, optional frame_embedding) -> PaliGemmaConfig.
  Unknown fields are refused by the dataclasses."""
  m = cfg.model
  return PaliGemmaConfig(img=SiglipConfig(**m.img.to_dict()),
                         llm=GemmaConfig(**m.llm.to_dict()), plan=model_plan(cfg),
                         frame_embedding=m.get("frame_embedding", 0))


def model_plan(cfg: ml_collections.ConfigDict) -> tuple:
  """`config.model.plan` as ((stage, options dict), ...)."""
  return tuple((stage, dict(opts)) for stage, opts in cfg.model.get("plan", ()))


def plan_choices(cfg: ml_collections.ConfigDict) -> tuple:
  """`config.model.plan_choices`: plans of which the loop trains one per step, drawn at random
  (e.g. Matryoshka's nested pooling levels); () trains `config.model.plan` only. Each plan is
  validated (`tcjax.nn.plan.normalize`)."""
  from tcjax.nn import plan as plan_lib  # pylint: disable=g-import-not-at-top
  choices = cfg.model.get("plan_choices", ()) or ()
  return tuple(plan_lib.normalize(tuple((st, dict(o)) for st, o in p)) for p in choices)


def choice_for_step(seed: int, step: int, n: int) -> int:
  """Which of `n` plan choices trains at `step`: a pure function of (seed, step), so a resumed
  run draws what an uninterrupted one would."""
  return int(np.random.default_rng((seed, step)).integers(n))


def trainable_mask(params, pattern: str):
  """Pytree of bools: True where the parameter's '/'-joined path fully matches `pattern`."""
  rx = re.compile(pattern)
  flat = traverse_util.flatten_dict(params, sep="/")
  mask = {k: bool(rx.fullmatch(k)) for k in flat}
  if not any(mask.values()):
    raise ValueError(f"trainable={pattern!r} matches no parameter (paths like "
                     f"{next(iter(flat))!r})")
  return traverse_util.unflatten_dict(mask, sep="/")


def make_optimizer(cfg: ml_collections.ConfigDict, params) -> optax.GradientTransformation:
  """Warm-up + cosine AdamW with global-norm clipping; parameters outside `cfg.trainable` get
  no update (and no optimizer state); `cfg.grad_accum` > 1 averages gradients over that many
  steps before one update (optax.MultiSteps)."""
  o = cfg.optim
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.lr, warmup_steps=o.warmup_steps,
      decay_steps=max(cfg.total_steps // max(cfg.grad_accum, 1), o.warmup_steps + 1),
      end_value=o.lr * o.end_lr_fraction)
  tx = optax.chain(optax.clip_by_global_norm(o.clip_norm),
                   optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay))
  labels = jax.tree.map(lambda t: "train" if t else "freeze",
                        trainable_mask(params, cfg.trainable))
  tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
  if cfg.grad_accum > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=cfg.grad_accum)
  return tx


def load_init(path: str, plan=(), *, mesh=None, rules=None):
  """(model, float32 params) from a big_vision `.npz` or an HF `save_pretrained` directory.

  mesh, rules: place each parameter into its sharding as it is read (both or neither), so a
  3B / 10B checkpoint never sits whole on one device."""
  from tcjax import checkpoints  # pylint: disable=g-import-not-at-top
  if os.path.isdir(path):
    return checkpoints.load_hf(path, dtype="float32", plan=plan, mesh=mesh, rules=rules)
  return checkpoints.load_big_vision(path, dtype="float32", plan=plan, mesh=mesh, rules=rules)


def grown(cfg: ml_collections.ConfigDict, model: PaliGemma, params, mesh=None, rules=None):
  """(model, params) with the decoder grown as `config.grow` says (`tcjax.train.grow`; fields
  llm_depth / llm_num_heads, 0 keeps; frame_embedding, rows of a zero frame table to add),
  placed in their shardings when a mesh is given."""
  from tcjax.train import grow  # pylint: disable=g-import-not-at-top
  opts = dict(cfg.grow)
  unknown = set(opts) - set(grow.GROW_FIELDS)
  if unknown:
    raise ValueError(f"config.grow: unknown fields {sorted(unknown)}; known: {grow.GROW_FIELDS}")
  new_config, params = grow.grow_decoder(params, model.config, seed=cfg.seed, **opts)
  model = PaliGemma(new_config)
  if mesh is not None:
    params = jax.device_put(params, param_shardings(jax.eval_shape(lambda: params), mesh, rules))
  return model, params


def init_fn(model: PaliGemma, seed: int):
  """A function of no arguments returning freshly initialised parameters (to jit)."""
  inputs = learned.dummy_inputs(model.config)  # a clip where a learned entry is shaped for one
  return lambda: model.init(jax.random.key(seed), *inputs)["params"]


def with_sincos_posemb(params, img_config, scale: float):
  """params with `scale` x the 2-D sine-cosine table (`tcjax.nn.params.sincos_2d`) added to
  the ViT's learned position embedding img/pos_embedding float[1, h * w, D].

  Why: the bundled model's learned table, after ~14 h of training from its random init, had no
  spatial structure (cosine of neighbouring patches' rows 0.04, the same as far ones), and the
  model never learned a relation between patches (the digit in the box, digits left to right),
  while it read a lone digit (experiments/RESULTS.md). The sum stays a learned parameter, so
  checkpoints keep their layout. Applied once, to fresh or loaded parameters, never on resume.
  """
  if not scale > 0:
    raise ValueError(f"config.posemb_sincos must be a positive scale, got {scale!r}")
  pe = params["img"]["pos_embedding"]
  table = sincos_2d(img_config.grid, img_config.width)
  chex.assert_shape(pe, (1, table.shape[0], table.shape[1]))
  img = dict(params["img"], pos_embedding=pe + jnp.asarray(scale * table, pe.dtype)[None])
  return dict(params, img=img)


def distill_options(cfg: ml_collections.ConfigDict):
  """`config.distill` as `distill.Options`, None without the section (ValueError on unknown
  or bad fields, and for a lighter student tower together with `config.init`)."""
  section = cfg.get("distill")
  if section is None:
    return None
  opts = distill.Options.from_config(section)
  if opts.light and cfg.get("init"):
    raise ValueError("distill.student_img builds the student from the teacher; it cannot start "
                     f"from config.init={cfg.init!r} too")
  return opts


def load_teacher(opts, *, mesh=None, rules=None):
  """(teacher model without a plan, its float32 params) from `opts.teacher` ("" bundled)."""
  from tcjax import bundled  # pylint: disable=g-import-not-at-top
  teacher, params = load_init(opts.teacher or bundled.CHECKPOINT, mesh=mesh, rules=rules)
  return teacher.with_plan(()), params


def student_from_teacher(cfg: ml_collections.ConfigDict, opts, teacher: PaliGemma,
                         teacher_params, *, mesh=None, rules=None):
  """(student model, params): the teacher's config with `config.model.plan` and the lighter
  tower `opts.student_img` asks for, its parameters new arrays made from the teacher's
  (`light_encoder.init_from_teacher`), placed in their shardings when a mesh is given."""
  config = light_encoder.student_config(teacher.config, plan=model_plan(cfg),
                                        where="distill.student_img", **dict(opts.student_img))
  make = lambda p: light_encoder.init_from_teacher(p, teacher.config, config)
  sh = None
  if mesh is not None:
    sh = param_shardings(jax.eval_shape(make, teacher_params), mesh, rules)
  return PaliGemma(config), jax.jit(make, out_shardings=sh)(teacher_params)


# -------------------------------------------------------------------------------------------
# Data

_MODEL_INPUTS = ("image", "text", "mask_ar", "mask_loss", "input_mask")


def train_stream(cfg: ml_collections.ConfigDict, tokenizer, image_size: int) -> grain.MapDataset:
  """The training stream: user JSONL records when `cfg.data.jsonl` is set, otherwise the
  testbed with one stream per modality, mixed batch by batch."""
  d = cfg.data
  if d.get("jsonl"):
    from tcjax.data import jsonl  # pylint: disable=g-import-not-at-top
    if d.batch_size["image"] % jax.process_count():
      raise ValueError(f"data.batch_size.image {d.batch_size['image']} is not divisible by "
                       f"{jax.process_count()} processes")
    return jsonl.dataset(d.jsonl, tokenizer, image_size=image_size, max_len=d.max_len,
                         batch_size=d.batch_size["image"] // jax.process_count(), seed=d.seed,
                         skip_bad=d.get("skip_bad", False))
  streams, weights = [], []
  for mod, fams in pipeline.by_modality(d.families).items():
    streams.append(pipeline.testbed_stream(
        fams, tokenizer, split="train", seed=d.seed, batch_size=d.batch_size[mod],
        max_len=d.max_len))
    weights.append(d.weights[mod])
  return pipeline.mixed_stream(streams, weights)


# -------------------------------------------------------------------------------------------
# Evaluation


def evaluate(model: PaliGemma, params, tokenizer, batches, *, max_new_tokens: int
             ) -> Dict[str, float]:
  """Greedy answers on held-out `pipeline.eval_batches` -> {"<family>/correct": mean, ...}
  (`correct`: exact match, or box IoU >= 0.5 for `locate`; see `tcjax.eval.answers.score`)."""
  from tcjax.eval import runner  # pylint: disable=g-import-not-at-top
  sums: Dict[str, Dict[str, float]] = {}
  counts: Dict[str, int] = {}
  for fam, b in batches:
    answers = runner.answer_batch(model, params, tokenizer, b["image"], b["text"],
                                  b["input_mask"], max_new_tokens=max_new_tokens)
    for s in runner.score_answers([fam] * len(answers), answers, b["answer"], b["scene"]):
      acc = sums.setdefault(fam, {})
      for k, v in s.items():
        if k != "family":
          acc[k] = acc.get(k, 0.0) + v
      counts[fam] = counts.get(fam, 0) + 1
  return {f"{fam}/{k}": v / counts[fam] for fam, acc in sums.items() for k, v in acc.items()}


# -------------------------------------------------------------------------------------------
# The loop


class _Writers:
  """metrics.jsonl + TensorBoard, appended to across resumes."""

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    if enabled:
      from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
      self.jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      self.tb = SummaryWriter(os.path.join(workdir, "tb"))

  def write(self, step: int, metrics: Dict[str, float]):
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self.jsonl.flush()
    for k, v in metrics.items():
      self.tb.add_scalar(k, v, step)
    self.tb.flush()

  def close(self):
    if self.enabled:
      self.jsonl.close()
      self.tb.close()


def _modality(image) -> str:
  """Which testbed modality a batch of images is, by rank: [B, H, W, 3] image, else a clip
  ([B, 8, ...] video or [B, 4, ...] audio segments; user clips count as video)."""
  if image.ndim == 4:
    return "image"
  return "audio" if image.shape[1] == testbed.AUDIO_SEGMENTS else "video"


def _state_shardings(state: TrainState, mesh) -> TrainState:
  """Shardings of `state` (abstract; its params placed already): every parameter-shaped
  leaf of the optimizer state (Adam's moments, MultiSteps' gradient sum) like its parameter,
  counters replicated. Left to jit, optax's zeros_like moments come out replicated: full-size
  on every device, and the step, which returns them sharded, compiled a second time."""
  tx, params = state.tx, state.params
  param_sh = jax.tree.map(lambda a: a.sharding, params)
  replicated = jax.sharding.NamedSharding(mesh, P())
  masked = lambda x: isinstance(x, optax.MaskedNode)  # frozen leaves: no state at all
  opt_sh = optax.tree_map_params(tx, lambda v, s: v if masked(v) else s,
                                 state.opt_state, param_sh,
                                 transform_non_params=lambda _: replicated, is_leaf=masked)
  return state.replace(params=param_sh, opt_state=opt_sh, step=replicated)


def _state_dict(state: TrainState, rng: np.ndarray) -> Dict[str, Any]:
  """What a checkpoint holds; rng: the run's key data (uint32, host)."""
  return {"params": state.params, "opt_state": state.opt_state, "step": state.step, "rng": rng}


def train(cfg: ml_collections.ConfigDict, workdir: str, *, tokenizer=None,
          progress: bool = True) -> Dict[str, Any]:
  """Trains (or resumes) per `cfg` in `workdir`; returns {"params", "step", "eval"}."""
  from tcjax.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  os.makedirs(workdir, exist_ok=True)
  if tokenizer is None:
    tokenizer = Tokenizer(cfg.tokenizer)
  mesh = make_mesh(tuple(cfg.mesh), axis_types="auto")
  rules = tuple(cfg.param_rules)
  is_main = jax.process_index() == 0
  dopts = distill_options(cfg)
  with jax.set_mesh(mesh):
    teacher = teacher_params = None
    if dopts is not None:  # frozen: an argument of the step, never in the train state
      teacher, teacher_params = load_teacher(dopts, mesh=mesh, rules=rules)
    # Parameters are made straight into their shardings (no host copy of the whole tree per
    # device), which is also what lets every process of a multi-host run build the same state.
    if cfg.get("grow") and not cfg.get("init"):
      raise ValueError("config.grow grows a trained decoder: set config.init to its checkpoint")
    if cfg.get("init") or teacher is not None:
      if cfg.get("init"):  # fine-tune a checkpoint: its config, the plan from cfg.model.plan
        model, params = load_init(cfg.init, plan=model_config(cfg).plan, mesh=mesh, rules=rules)
        if cfg.get("grow"):  # more decoder layers / heads, computing what the checkpoint did
          model, params = grown(cfg, model, params, mesh, rules)
      else:  # a distilled student starts as a copy of its teacher (cfg.model's towers unused)
        model, params = student_from_teacher(cfg, dopts, teacher, teacher_params, mesh=mesh,
                                             rules=rules)
      # Learned compressors of the plan the checkpoint lacks (pretrained towers): fresh ones.
      abstract = jax.eval_shape(init_fn(model, cfg.seed))
      if learned.SUBTREE in abstract:
        sh = param_shardings(abstract, mesh, rules)[learned.SUBTREE]
        params = learned.init_missing(model, params, cfg.seed, out_shardings=sh)
    else:
      model = PaliGemma(model_config(cfg))
      init = init_fn(model, cfg.seed)
      params = jax.jit(init, out_shardings=param_shardings(jax.eval_shape(init), mesh, rules))()
    if cfg.get("posemb_sincos"):  # structure in the ViT's position table (with_sincos_posemb)
      params = with_sincos_posemb(params, model.config.img, float(cfg.posemb_sincos))
    if model.config.llm.vocab_size < tokenizer.vocab_size:
      raise ValueError(f"the model's vocabulary ({model.config.llm.vocab_size}) is smaller than"
                       f" the tokenizer's {tokenizer.vocab_size} ({cfg.tokenizer})")
    choices = plan_choices(cfg)
    for plan in choices:  # learned compressors a sampled plan names: fresh ones
      abstract = jax.eval_shape(init_fn(model.with_plan(plan), cfg.seed))
      if learned.SUBTREE in abstract:
        sh = param_shardings(abstract, mesh, rules)[learned.SUBTREE]
        params = learned.init_missing(model.with_plan(plan), params, cfg.seed, out_shardings=sh)
    tx = make_optimizer(cfg, params)
    create = lambda p: TrainState.create(apply_fn=model.apply, params=p, tx=tx)
    state_sh = _state_shardings(jax.eval_shape(create, params).replace(params=params), mesh)
    state = jax.jit(create, out_shardings=state_sh)(params)
    rng = np.asarray(jax.random.key_data(jax.random.key(cfg.seed + 1)))

    # A few batches ahead on one thread: grain's default (16 threads, 500 elements ahead)
    # would keep both cores busy making batches the run may never reach.
    data_iter = iter(train_stream(cfg, tokenizer, model.config.img.image_size).to_iter_dataset(
        grain.ReadOptions(num_threads=cfg.data.get("threads", 1),
                          prefetch_buffer_size=cfg.data.get("prefetch", 2))))
    mngr = ocp.CheckpointManager(
        os.path.abspath(os.path.join(workdir, "ckpt")),
        options=ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_ckpts,
                                             enable_async_checkpointing=False),
        item_names=("state", "data"))
    if mngr.latest_step() is not None:
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _state_dict(state, rng))
      restored = mngr.restore(mngr.latest_step(), args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract),
          data=grain.checkpoint.CheckpointRestore(data_iter)))
      s = restored["state"]
      state = state.replace(params=s["params"], opt_state=s["opt_state"], step=s["step"])
      rng = np.asarray(s["rng"])

    # The state leaves the step as it came in: with Auto axes XLA would otherwise pick its
    # own layouts for some outputs (e.g. MultiSteps' gradient sums), and the next call, seeing
    # new input shardings, would compile the step again.
    def jitted_step(m):
      kw = dict(compute_dtype=cfg.get("compute_dtype"), loss_norm=cfg.get("loss_norm", "example"),
                trainable=trainable_mask(params, cfg.trainable))
      out_sh = (state_sh, jax.sharding.NamedSharding(mesh, P()))
      if teacher is None:
        return jax.jit(make_train_step(m, **kw), donate_argnums=0, out_shardings=out_sh)
      fn = jax.jit(distill.make_distill_step(m, teacher, dopts, **kw), donate_argnums=0,
                   out_shardings=out_sh)
      return lambda state, batch: fn(state, batch, teacher_params)

    step_fn = jitted_step(model)
    # One step function per sampled plan (each compiled on first use).
    choice_fns = [jitted_step(model.with_plan(p)) for p in choices]
    writers = _Writers(workdir, is_main)
    eval_families = [f for f in cfg.eval.get("families", cfg.data.families)
                     if f in cfg.data.families and f not in testbed.AUX_FAMILIES]
    eval_data = pipeline.eval_batches(
        eval_families, tokenizer, split="val", seed=cfg.data.seed,
        per_family=cfg.eval.per_family, batch_size=cfg.eval.batch_size,
        max_len=cfg.data.max_len) if cfg.eval.every and not cfg.data.get("jsonl") else []

    def save(step):
      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(_state_dict(state, rng)),
          data=grain.checkpoint.CheckpointSave(data_iter)), force=True)

    start = int(state.step)
    bar = None
    if progress and is_main:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      bar = tqdm(total=cfg.total_steps, initial=start, desc="train", dynamic_ncols=True)
    last_eval: Dict[str, float] = {}
    t0, seen = time.perf_counter(), 0
    interval: Dict[str, list] = {}  # modality (or sampled plan) -> step losses since the log
    for step in range(start + 1, cfg.total_steps + 1):
      local = {k: v for k, v in next(data_iter).items() if k in _MODEL_INPUTS}
      batch = global_batch_from_local(local, mesh, P("data"))
      if choice_fns:
        choice = choice_for_step(cfg.seed, step, len(choice_fns))
        state, metrics = choice_fns[choice](state, batch)
        interval.setdefault(f"plan{choice}", []).append(metrics["loss"])
      else:
        state, metrics = step_fn(state, batch)
      seen += len(local["text"]) * jax.process_count()
      interval.setdefault(_modality(local["image"]), []).append(metrics["loss"])
      if step % cfg.log_every == 0 or step == cfg.total_steps:
        m = {k: float(np.mean(v)) for k, v in jax.device_get(metrics).items() if v is not None}
        # The interval's mean loss per modality (one batch alone says little: the modalities
        # take turns, so every log step would see the same one).
        for mod, losses in interval.items():
          m[f"loss/{mod}"] = float(np.mean(jax.device_get(losses)))
        interval = {}
        dt = time.perf_counter() - t0
        m["examples_per_sec"] = seen / max(dt, 1e-9)
        writers.write(step, m)
        t0, seen = time.perf_counter(), 0
        if bar is not None:
          bar.set_postfix(loss=f"{m['loss']:.3f}", ex_s=f"{m['examples_per_sec']:.1f}")
      if bar is not None:
        bar.update(1)
      if eval_data and (step % cfg.eval.every == 0 or step == cfg.total_steps):
        last_eval = evaluate(model, state.params, tokenizer, eval_data,
                             max_new_tokens=cfg.eval.max_new_tokens)
        writers.write(step, {f"eval/{k}": v for k, v in last_eval.items()})
        if bar is not None:
          bar.write(f"step {step}: " + " ".join(
              f"{k}={v:.2f}" for k, v in last_eval.items() if k.endswith("/correct")))
      if step % cfg.ckpt_every == 0 or step == cfg.total_steps:
        save(step)
    if bar is not None:
      bar.close()
    if mngr.latest_step() != int(state.step):
      save(int(state.step))
    mngr.wait_until_finished()
    mngr.close()
    writers.close()
    if int(state.step) == cfg.total_steps:
      from tcjax.checkpoints import save_big_vision  # pylint: disable=g-import-not-at-top
      final = multihost_utils.process_allgather(state.params, tiled=True)  # every process
      if is_main:
        save_big_vision(os.path.join(workdir, "checkpoint.npz"), final)
        if learned.compressor_entries(model.config.plan):  # the compressors alone, to ship
          learned.save_trained(os.path.join(workdir, "compressors.npz"), final,
                               model.config.plan)
  return {"params": state.params, "step": int(state.step), "eval": last_eval}
