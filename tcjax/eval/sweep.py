"""The sweep: compression methods x stages x budgets, answered and costed on one model.

  settings = sweep.settings(methods="all", stages="all", budgets=(64, 32, 16))
  rows = sweep.run(model, params, tokenizer, examples, settings, SweepOptions(...))

A `Setting` is one (method, stage, budget) cell; `FULL` is the uncompressed model, always run
first (loyalty and relative accuracy are measured against it). `plan_for` turns a setting into
a plan entry for one input shape: `budget` is always the number of image tokens per example
that reach the decoder (for a clip at the vit stage, where the ViT sees frames one at a time,
that is `budget // frames` per frame), and at the llm stage the number kept from decoder layer
`llm_layer` on. For an adaptive policy (`adaptive_settings`) `budget` is the capacity and the
row reports how many tokens each example kept.

Sharing (so that the sweep costs little more than its decoders):
  - the ViT runs once per batch (`PaliGemma.encode_image`, with the signals of every ViT layer
    a setting reads: each method's own default, or `signal_layer` for all), and every post_vit
    / post_proj setting starts from it;
  - every llm setting starts from the uncompressed projected tokens (`prefill(image_tokens=)`),
    except one whose entry reads the ViT's attention (`vit_scores`: MustDrop's key set), which
    runs its own ViT from the image;
  - only vit settings run their own ViT;
  - each setting's compression is one jitted function, compiled once per input shape; the
    decoder (prefill + greedy decoding) is compiled once per image-token count for every
    setting that leaves the decoder alone, and once per setting for the llm stage.

A setting that raises (a budget a method cannot reach, an option it refuses, a modality it does
not handle) is recorded with its error for the families of that input shape; the sweep goes on.

Latency and memory (`SweepOptions.latency`): outside the accuracy loop, one setting at a time
(no other setting compiling beside it), on the first batch of each input shape: the prefill as
the setting runs it (ViT, compression + projector, decoder prefill filling the KV cache) and one
decoding step (the decoding loop's time / the steps it ran: it stops when every example of the
batch has emitted EOS), each program's median over
`latency_reps` calls after a warm-up call, and peak memory as the largest `program_bytes`
(`compiled.memory_analysis()`) of those programs. Programs several settings share (the ViT, the
projector, the decoder of one image-token count, a decoding loop over one cache layout) are
measured once per input shape.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import math
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from tcjax.compress.adaptive import POLICIES
from tcjax.compress.registry import METHODS, STAGES
from tcjax.compress.sparsevlm import scored_for
from tcjax.eval import cost as cost_lib
from tcjax.eval import runner
from tcjax.nn import plan as plan_lib
from tcjax.nn.learned import LEARNED
from tcjax.nn import sampling

# Plan-level decoder schedules swept beside the registered methods (one pruning layer each;
# `sparsevlm` is also the registered method its schedule runs at each layer).
SCHEDULES = {"pyramiddrop": ("llm",), "sparsevlm": ("llm",)}


@dataclasses.dataclass(frozen=True)
class Setting:
  """One cell of the sweep: `method` at `stage` down to `budget` image tokens (FULL: none);
  `options`: ((option, value), ...) of this cell's plan entry (an adaptive policy's threshold,
  its budget being the capacity), over the sweep's options of the method."""

  method: str
  stage: str
  budget: Optional[int]
  options: Tuple[Tuple[str, Any], ...] = ()

  @property
  def name(self) -> str:
    if self.budget is None:
      return "full"
    opts = ",".join(f"{k}={v}" for k, v in self.options)
    return f"{self.method}@{self.stage}/{self.budget}" + (f"[{opts}]" if opts else "")

  @property
  def family(self) -> str:
    """The method's family (sampling, merging, pooling, cross_modal); "-" for FULL."""
    if self.budget is None:
      return "-"
    if self.method in METHODS:
      return METHODS[self.method].family
    if self.method in LEARNED:
      return LEARNED[self.method].family
    return "sampling"  # PyramidDrop: prompt-attention pruning, as FastV


FULL = Setting("full", "-", None)


def stages_of(method: str) -> Tuple[str, ...]:
  """The stages where `method` (a registered method, a SCHEDULES entry or a learned
  compressor of `tcjax.nn.learned.LEARNED`) may act."""
  if method in SCHEDULES:
    return SCHEDULES[method]
  if method in LEARNED:
    return LEARNED[method].stages
  return METHODS[method].stages


# stages="primary": each method once, at the first of these where it applies (after the ViT
# first, so that most settings share one ViT run).
PRIMARY = ("post_vit", "post_proj", "llm", "vit")


def settings(methods="all", stages="all", budgets: Sequence[int] = (64, 32, 16)
             ) -> List[Setting]:
  """FULL, then every method (sorted by name) at every stage of `stages` where it applies, at
  every budget (a method that keeps no token, `Method.keeps_none`, at the smallest only).
  methods: "all" (every training-free method) or a sequence of names, learned compressors
  (`tcjax.nn.learned.LEARNED`) included: their settings run the `compressor/<key>` parameters
  of the plan entry {"method", "budget"} (key "<stage>_<method>_<budget>", or the sweep
  options' "name"), which `params` must hold (a setting without them records the error);
  stages: "all", "primary" (each method at its first stage in PRIMARY order) or a sequence of
  names. Unknown names raise ValueError.
  """
  free = sorted(set(METHODS) - set(SCHEDULES)) + sorted(SCHEDULES)
  known = free + sorted(LEARNED)
  methods = free if methods == "all" else list(_names(methods, "methods"))
  primary = stages == "primary"
  stages = STAGES if stages in ("all", "primary") else tuple(_names(stages, "stages"))
  bad = [m for m in methods if m not in known]
  if bad:
    raise ValueError(f"unknown method(s) {bad}; known: {known}")
  bad = [s for s in stages if s not in STAGES]
  if bad:
    raise ValueError(f"unknown stage(s) {bad}; stages: {STAGES}")
  if isinstance(budgets, (str, int)) or not budgets or not all(
      isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in budgets):
    raise ValueError(f"budgets must be a non-empty sequence of positive ints, got {budgets!r}")
  out = [FULL]
  for m in methods:
    where = [s for s in STAGES if s in stages and s in stages_of(m)]  # the model's order
    if primary:
      where = [s for s in PRIMARY if s in where][:1]
    # A method that keeps no token (VTW) answers alike at every budget: once, at the smallest.
    bs = [min(budgets)] if m in METHODS and METHODS[m].keeps_none else budgets
    for s in where:
      out += [Setting(m, s, int(b)) for b in bs]
  if len(out) == 1:
    raise ValueError(f"no method of {methods} acts at stages {stages}")
  return out


def adaptive_settings(spec: Mapping[str, Mapping[str, Sequence[Any]]], stages: Sequence[str],
                      capacity: int) -> List[Setting]:
  """One setting per adaptive policy x option value x stage: `spec` is {policy: {option:
  values}} (policies from `tcjax.compress.adaptive.POLICIES`, e.g. {"adaptive_mass": {"mass":
  (0.2, 0.4)}}), each run at every stage of `stages` where it acts, with `capacity` as its
  budget (the most tokens it may keep). Unknown policies, options or stages raise ValueError."""
  if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
    raise ValueError(f"adaptive capacity must be a positive int, got {capacity!r}")
  stages = tuple(_names(stages, "stages"))
  bad = [s for s in stages if s not in STAGES]
  if bad:
    raise ValueError(f"unknown stage(s) {bad}; stages: {STAGES}")
  out = []
  for m, opts in spec.items():
    if m not in POLICIES:
      raise ValueError(f"unknown adaptive policy {m!r}; policies: {list(POLICIES)}")
    for key, values in dict(opts).items():
      if key not in METHODS[m].options:
        raise ValueError(f"{m} has no option {key!r}; options: {sorted(METHODS[m].options)}")
      if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
        raise ValueError(f"{m}: {key} needs a non-empty sequence of values, got {values!r}")
      for s in STAGES:
        if s in stages and s in stages_of(m):
          out += [Setting(m, s, capacity, ((key, v),)) for v in values]
  return out


def _names(v, what: str) -> Tuple[str, ...]:
  if isinstance(v, str):
    raise ValueError(f"{what} must be 'all' or a sequence of names, got {v!r}")
  return tuple(v)


def tome_r(n: int, budget: int, depth: int, layers: Sequence[int]) -> List[int]:
  """Per-layer ToMe r (length `depth`) merging `n` tokens down to `budget` in `layers`: as even
  as possible, front-loaded only as far as needed, each round at most half the tokens (ToMe's
  bipartite matching). Raises ValueError when the layers cannot get that low."""
  r = [0] * depth
  left = sorted(layers)
  cur = n
  for i, l in enumerate(left):
    later = len(left) - i - 1
    even = -(-(cur - budget) // (later + 1))
    needed = cur - budget * 2 ** later  # the later rounds halve at most
    r[l] = max(0, min(cur // 2, max(even, needed)))
    cur -= r[l]
  if cur != budget:
    raise ValueError(f"tome: {len(left)} ViT layers merge at most half the tokens each, "
                     f"{n} -> {cur} at least; budget {budget} is out of reach")
  return r


def plan_for(setting: Setting, *, n_tokens: int, frames: int, vit_depth: int,
             vit_layer: int, llm_layer: int, options: Optional[Mapping[str, Any]] = None,
             signal_layer: Optional[int] = None) -> tuple:
  """The (raw) plan of `setting` for inputs of `frames` frames (1: images) giving `n_tokens`
  ViT tokens in all. options: extra entry options of this method (they override the sweep's).
  signal_layer: the ViT layer a post_vit / post_proj entry that reads ViT attention / keys
  reads (None: the method's default, `Method.signal_layer`).

  Raises ValueError when the setting has no plan at this shape (e.g. a vit-stage budget that
  does not split over the frames, or a ToMe schedule that cannot reach the budget).
  """
  if setting.budget is None:
    return ()
  m, stage, b = setting.method, setting.stage, setting.budget
  opts = {**(options or {}), **dict(setting.options)}
  if stage == "vit":
    if b % frames:
      raise ValueError(f"{m}: the ViT sees frames one at a time; budget {b} does not split "
                       f"over {frames} frames")
    per_frame = b // frames
    if m == "tome":  # ToMe merges inside the blocks from vit_layer on
      layer = plan_lib.resolve_layer(vit_layer, vit_depth, "vit_layer")
      layers = list(range(layer, vit_depth))
      entry = {"method": "tome", "r": tome_r(n_tokens // frames, per_frame, vit_depth, layers)}
    else:
      entry = {"method": m, "layer": vit_layer, "budget": per_frame}
  elif stage == "llm" and m == "pyramiddrop":
    # Ratios are of the image tokens entering the decoder; +0.5 so int() lands on the budget.
    entry = {"method": m, "layers": (llm_layer,), "ratios": ((b + 0.5) / n_tokens,)}
  elif stage == "llm" and m == "sparsevlm":
    # Its budgets count the tokens kept by score; v1.5's recycled clusters come on top.
    version = opts.get("version", METHODS[m].options["version"])
    entry = {"method": m, "layers": (llm_layer,),
             "budgets": (scored_for(n_tokens, min(b, n_tokens), version),)}
  elif stage == "llm":
    entry = {"method": m, "layer": llm_layer, "budget": b}
  else:
    entry = {"method": m, "budget": b}
    if signal_layer is not None and plan_lib.entry_signal_layer(entry, stage, vit_depth) \
        is not None:
      entry["signal_layer"] = signal_layer
  return ((stage, {**entry, **opts}),)


@dataclasses.dataclass
class SweepOptions:
  """How the sweep runs (see configs/sweep.py for the fields' meaning)."""

  batch_size: int = 32
  max_len: int = 16
  max_new_tokens: int = 10
  signal_layer: Optional[int] = None
  vit_layer: int = 1
  llm_layer: int = 1
  options: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)
  mesh: Any = None  # a jax Mesh with a "data" axis (None: no mesh)
  workers: int = 1  # settings run (compiled) at once, in threads
  latency: bool = False  # time prefill / decoding and read peak memory, per setting and shape
  latency_reps: int = 5  # timed calls per program (median), after one warm-up call
  pictures: int = 0  # examples per image family whose retained patches each setting records


def _error_text(e: BaseException) -> str:
  """The first part of an exception's message (JAX appends a traceback note after a rule)."""
  msg = str(e).split("\n--------------------")[0].strip()
  return f"{type(e).__name__}: {msg}"


def _batches(idx: List[int], size: int) -> List[List[int]]:
  return [idx[s:s + size] for s in range(0, len(idx), size)]


class _Group:
  """Examples of one input shape, their prompts, and the per-shape facts of each setting."""

  def __init__(self, shape, idx, exs, tok, opts: SweepOptions, data_size: int):
    self.shape = shape
    self.idx = idx
    self.frames = shape[0] if len(shape) == 4 else 1
    self.families = sorted({exs[i]["family"] for i in idx})
    # Fixed batch shape (the last batch padded by repeating its last example) -> one compile.
    self.size = -(-min(opts.batch_size, len(idx)) // data_size) * data_size
    longest = max(len(tok.prompt(exs[i]["prefix"])["text"]) for i in idx)
    if longest > opts.max_len:
      raise ValueError(f"max_len={opts.max_len} cuts prompts of {longest} tokens")
    self.prompts = tok.batch([exs[i]["prefix"] for i in idx], max_len=opts.max_len)
    # The first `opts.pictures` examples of each family (images only): retained-patch pictures.
    firsts: Dict[str, List[int]] = {}
    if self.frames == 1:
      for i in idx:
        f = firsts.setdefault(exs[i]["family"], [])
        if len(f) < opts.pictures:
          f.append(i)
    self.picture_idx = {i for f in firsts.values() for i in f}


def run(model, params, tokenizer, examples: Sequence[Dict[str, Any]],
        sweep_settings: Sequence[Setting], opts: SweepOptions,
        progress: Optional[Callable[[int], Any]] = None) -> List[Dict[str, Any]]:
  """Runs every setting on `examples` ([{"image", "prefix", "suffix", "family", "scene"}]).

  progress: a tqdm-like object factory `progress(total)` (with .update / .set_postfix_str /
  .close), or None.

  Returns one row per setting, in `sweep_settings` order (FULL first): method, stage, budget,
  family, plans (per input shape), errors {family: message}, accuracy / loyalty / relative
  accuracy overall and per family, cost per family and averaged over the examples that ran
  ("flops", "kv_bytes", "image_tokens", "mean_llm_tokens", "mean_llm_image_tokens",
  "image_tokens_valid"; per family also "llm_tokens_per_layer"), answers, and seconds (wall time
  of the setting, compilation and its latency measurement included, alongside `workers - 1`
  other settings; FULL's include the shared ViT runs). With `opts.latency`, also
  "prefill_seconds" and "decode_seconds" (one batch of "latency_batch" examples; decode: one
  generated token), "peak_bytes" and, per family, "programs" (each program's seconds and
  bytes); "latency_error" where the measurement failed. Rows of adaptive policies
  (`tcjax.compress.adaptive.POLICIES`) add "kept_tokens" and "kept_per_family": the mean number
  of image tokens the policy kept per example (valid tokens after it; at the llm stage, read
  from the decoder's hook by one more prefill). "iou_per_family": mean IoU of the box families
  (`locate`). With `opts.pictures`, rows of vit / post_vit / post_proj settings add
  "retained": {example index: int[N] the token carrying each ViT patch of that image, -1
  dropped} for the first `opts.pictures` examples of each image family
  (`report.retained_pictures` draws them).
  """
  if not sweep_settings or sweep_settings[0] != FULL:
    raise ValueError("the settings must start with FULL (the baseline of loyalty)")
  if opts.latency and (isinstance(opts.latency_reps, bool)
                       or not isinstance(opts.latency_reps, int) or opts.latency_reps < 1):
    raise ValueError(f"latency_reps must be a positive int, got {opts.latency_reps!r}")
  base = model.with_plan(())
  cfg = model.config
  variables = {"params": params}
  param_bytes = jax.tree.leaves(params)[0].dtype.itemsize
  data_size = _data_size(opts.mesh)
  groups: Dict[Tuple[int, ...], List[int]] = {}
  for i, e in enumerate(examples):
    groups.setdefault(tuple(np.shape(e["image"])), []).append(i)
  groups = [_Group(s, idx, examples, tokenizer, opts, data_size) for s, idx in groups.items()]
  n_set = len(sweep_settings)
  answers: List[List[Optional[str]]] = [[None] * len(examples) for _ in range(n_set)]
  errors: List[Dict[str, str]] = [{} for _ in range(n_set)]
  plans: List[Dict[str, str]] = [{} for _ in range(n_set)]
  costs: List[Dict[str, Dict[str, float]]] = [{} for _ in range(n_set)]
  valid_tokens: List[Dict[str, List[float]]] = [{} for _ in range(n_set)]
  kept_tokens: List[Dict[str, List[float]]] = [{} for _ in range(n_set)]  # adaptive policies
  retained: List[Dict[str, List[int]]] = [{} for _ in range(n_set)]  # pictures: src per example
  seconds = [0.0] * n_set
  total = sum(len(_batches(g.idx, g.size)) for g in groups) * n_set
  bar = progress(total) if progress else None

  vit_seen: Dict[Any, Tuple[int, ...]] = {}
  llm_counts: Dict[Any, Dict[str, Any]] = {}

  def embed_fn(plan, from_encoded: bool):
    """jitted (variables, encoded or image, text, mask) -> projected Tokens of `plan`."""
    m = model.with_plan(plan)

    def f(v, inp, text, mask):
      zeros = jnp.zeros(text.shape, jnp.int32)
      if from_encoded:
        _, toks, aux = m.apply(v, None, text, zeros, mask, encoded=inp, method=m.embed_image)
      else:
        _, toks, aux = m.apply(v, inp, text, zeros, mask, method=m.embed_image)
      vit_seen[plan] = aux["vit_tokens"]  # static, read while tracing
      return toks

    return jax.jit(f)

  def llm_model(plan):
    """The model that decodes `plan`'s image tokens: its llm entries only."""
    return base.with_plan(tuple(e for e in plan if e[0] == "llm"))

  def run_setting(g: _Group, si: int, plan, batches):
    """One setting on every batch of group `g` (in a worker thread: the mesh is per thread).
    Returns its jitted compression (None for FULL and the llm stage), kept for timing."""
    st, gname = sweep_settings[si], _shape_name(g)
    t0 = time.perf_counter()
    fn = kept_fn = None
    n_done = 0
    # Pictures of vision-side settings on images (at the llm stage nothing is cut before the
    # decoder; a clip's picture would be one per frame).
    keep_src = bool(g.picture_idx) and st.stage in ("vit", "post_vit", "post_proj")
    # An llm entry reading the ViT's attention (MustDrop's key set, `vit_scores`) decodes from
    # the image: its decoder runs its own ViT for them (the projected tokens do not carry them).
    from_image = st.stage == "llm" and plan is not None and bool(
        plan_lib.vit_score_layers(plan, cfg.img.depth))
    with _mesh_context(opts.mesh):
      if plan is not None:
        try:
          if st.stage in ("vit", "post_vit", "post_proj"):
            fn = embed_fn(plan, st.stage != "vit")
          dec = llm_model(plan)
          if st.stage == "llm" and st.method in POLICIES:  # how many the decoder's hook kept
            kept_fn = jax.jit(lambda v, toks, text, mask, dec=dec: dec.apply(
                v, None, text, None, mask, image_tokens=toks, method=dec.prefill
            )[2]["image_tokens_kept"])
          for chunk, image, text, mask, enc, full_toks in batches:
            if st.stage in ("vit", "post_vit", "post_proj"):
              toks = fn(variables, image if st.stage == "vit" else enc, text, mask)
            else:  # FULL and the llm stage decode the uncompressed tokens
              toks = full_toks
            out = runner.answer_batch(dec, variables["params"], tokenizer,
                                      image if from_image else None, text, mask,
                                      max_new_tokens=opts.max_new_tokens,
                                      image_tokens=None if from_image else toks)
            if gname not in costs[si]:
              vit = vit_seen[plan] if st.stage == "vit" else enc.vit_tokens
              merged = plan_lib.tome_schedule(plan, cfg.img.depth)[0]  # ToMe: before the MLP
              costs[si][gname] = _cost(cfg, dec, variables, text, mask, toks, llm_counts,
                                       param_bytes, vit, merged, g.frames, opts.max_len,
                                       image if from_image else None)
            if keep_src:  # the picture examples in this batch: which token carries each patch
              src = None
              for r in chunk:
                if g.idx[r] in g.picture_idx:
                  src = np.asarray(toks.src) if src is None else src
                  retained[si][str(g.idx[r])] = src[r - chunk[0]].tolist()
            valid = np.asarray(toks.mask.sum(-1))
            kept = valid if kept_fn is None else np.asarray(kept_fn(variables, toks, text, mask))
            for r, a, nv, nk in zip(chunk, out, valid, kept):
              answers[si][g.idx[r]] = a
              fam = examples[g.idx[r]]["family"]
              valid_tokens[si].setdefault(fam, []).append(float(nv))
              if st.method in POLICIES:
                kept_tokens[si].setdefault(fam, []).append(float(nk))
            n_done += 1
            if bar is not None:
              bar.set_postfix_str(f"{gname} {st.name}", refresh=False)
              bar.update(1)
        except Exception as e:  # pylint: disable=broad-except
          _fail(errors[si], g, e)
          for i in g.idx:  # no partial results for a shape that failed
            answers[si][i] = None
          for i in g.picture_idx:
            retained[si].pop(str(i), None)
          for fam in g.families:
            valid_tokens[si].pop(fam, None)
            kept_tokens[si].pop(fam, None)
    # A setting's compression is compiled code nobody else uses: release it now (hundreds of
    # live executables exhaust the process's memory mappings); its compression once it is timed.
    if kept_fn is not None:
      kept_fn.clear_cache()
    if fn is not None and not opts.latency:
      fn.clear_cache()
    seconds[si] += time.perf_counter() - t0
    if bar is not None and n_done < len(batches):  # skipped or failed
      bar.update(len(batches) - n_done)
    return fn

  def time_settings(g: _Group, done, timer) -> None:
    """Latency and memory of settings `done` [(index, compression fn)], one at a time."""
    gname = _shape_name(g)
    with _mesh_context(opts.mesh):
      for si, fn in done:
        plan = gplans[si]
        t0 = time.perf_counter()
        if plan is not None and gname in costs[si] and not any(
            f in errors[si] for f in g.families):
          if bar is not None:
            bar.set_postfix_str(f"{gname} {sweep_settings[si].name} (timing)")
          try:
            costs[si][gname].update(timer.measure(sweep_settings[si], plan, fn,
                                                  llm_model(plan)))
          except Exception as e:  # pylint: disable=broad-except
            costs[si][gname]["latency_error"] = _error_text(e)
        if fn is not None:
          fn.clear_cache()
        seconds[si] += time.perf_counter() - t0

  # FULL and the settings that leave the decoder alone first (they share its executables),
  # then the llm stage, each with its own decoder. `workers` settings at a time: compilation,
  # most of the cost, runs in parallel threads.
  order = sorted(range(1, n_set), key=lambda i: sweep_settings[i].stage == "llm")
  with _mesh_context(opts.mesh):
    variables = _place(variables, opts.mesh, batch=False)
  for g in groups:
    gname = _shape_name(g)
    n_tok = int(np.prod(g.shape[:-1]) // cfg.img.patch_size ** 2)  # ViT tokens of an example
    gplans: List[Optional[tuple]] = []
    for si, st in enumerate(sweep_settings):
      try:
        p = plan_for(st, n_tokens=n_tok, frames=g.frames, vit_depth=cfg.img.depth,
                     vit_layer=opts.vit_layer, llm_layer=opts.llm_layer,
                     options=opts.options.get(st.method), signal_layer=opts.signal_layer)
        p = plan_lib.normalize(p)
        plans[si][gname] = plan_lib.describe(p)
        gplans.append(p)
      except Exception as e:  # pylint: disable=broad-except
        _fail(errors[si], g, e)
        gplans.append(None)
    # The ViT once per batch, with the signals of every layer a setting reads, and the
    # uncompressed projected tokens, for every setting.
    layers = sorted({l for p in gplans if p is not None
                     for l in plan_lib.signal_layers(p, cfg.img.depth)})
    encode = jax.jit(lambda v, im, layers=tuple(layers): base.apply(
        v, im, signal_layers=layers, method=base.encode_image))
    t0 = time.perf_counter()
    batches = []
    full_embed = embed_fn((), True)
    with _mesh_context(opts.mesh):
      for chunk in _batches(list(range(len(g.idx))), g.size):
        rows = chunk + [chunk[-1]] * (g.size - len(chunk))
        image = _place(np.stack([examples[g.idx[r]]["image"] for r in rows]), opts.mesh)
        text = _place(g.prompts["text"][rows], opts.mesh)
        mask = _place(g.prompts["mask_input"][rows].astype(bool), opts.mesh)
        enc = encode(variables, image)
        batches.append((chunk, image, text, mask, enc, full_embed(variables, enc, text, mask)))
    seconds[0] += time.perf_counter() - t0
    timer = _Timer(base, variables, encode, full_embed, batches[0], opts, tokenizer.eos_id,
                   tokenizer.pad_id) if opts.latency else None
    done = [(0, run_setting(g, 0, gplans[0], batches))]
    # With latency, settings go in chunks, each timed alone once its chunk is done, so that a
    # timed call never shares the CPU with another setting's compilation, and at most one
    # chunk's compressions stay compiled.
    chunk = max(1, 4 * opts.workers) if opts.latency else max(1, len(order))
    for part in _batches(order, chunk):
      if timer is not None:
        time_settings(g, done, timer)
      if opts.workers > 1:
        with concurrent.futures.ThreadPoolExecutor(opts.workers) as pool:
          fns = list(pool.map(lambda si: run_setting(g, si, gplans[si], batches), part))
      else:
        fns = [run_setting(g, si, gplans[si], batches) for si in part]
      done = list(zip(part, fns))
    if timer is not None:
      time_settings(g, done, timer)
    # The shape is done: drop its shared ViT, decoders and every llm setting's decoder.
    full_embed.clear_cache()
    encode.clear_cache()
    sampling.clear_cache()
  if bar is not None:
    bar.close()
  if errors[0]:
    raise RuntimeError(f"the uncompressed model failed, nothing to compare: {errors[0]}")
  rows = _rows(examples, sweep_settings, answers, errors, plans, costs, valid_tokens, kept_tokens,
               seconds, groups)
  for row, ret in zip(rows, retained):
    if ret:
      row["retained"] = ret
  return rows


def _mesh_context(mesh):
  """`jax.set_mesh(mesh)` (a per-thread setting), or nothing without a mesh."""
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def _data_size(mesh) -> int:
  if mesh is None:
    return 1
  if "data" not in mesh.axis_names:
    raise ValueError(f"the sweep's mesh needs a 'data' axis, got {mesh.axis_names}")
  return int(dict(mesh.shape)["data"])


def _place(x, mesh, batch: bool = True):
  """Batch arrays on the mesh's data axis, parameters replicated (the tower is small)."""
  if mesh is None:
    return x
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  spec = P("data") if batch else P()
  return jax.device_put(x, NamedSharding(mesh, spec))


def _shape_name(g: _Group) -> str:
  return "x".join(str(d) for d in g.shape[:-1])


def _fail(errs: Dict[str, str], g: _Group, e: BaseException) -> None:
  for fam in g.families:
    errs.setdefault(fam, _error_text(e))


def _cost(cfg, dec, variables, text, mask, toks, cache, param_bytes, vit_tokens, vit_merged,
          frames, text_len, image=None) -> Dict[str, float]:
  """Per-example cost of one setting on one input shape; the decoder's token counts traced
  once per (decoder plan, image-token count). image: the images, for a decoder that starts
  from them (an llm entry reading `vit_scores`); else it starts from `toks`."""
  key = (dec.config.plan, toks.x.shape, text.shape, image is None)
  if key not in cache:
    cache[key] = runner.token_counts(dec, variables["params"], image, text, mask,
                                     image_tokens=toks if image is None else None)
  counts = dict(cache[key], vit_tokens=vit_tokens, vit_merged=vit_merged, frames=frames)
  return dict(runner.cost(cfg, counts, text_len, param_bytes),
              llm_tokens_per_layer=[int(n) for n in counts["llm_tokens"]])


class _Timer:
  """Latency and memory of settings on one batch of one input shape (see the module docstring).

  A setting's prefill is the programs it runs: the ViT (`encode_image`; the shared run with the
  post-ViT signals when its plan reads them, else a plain one; none for the vit stage, whose
  compression program includes the ViT), its compression + projector (the projector alone for
  FULL and the llm stage), and the decoder prefill from the projected tokens; then one decoding
  step on the cache that prefill filled. Each program is measured once per shape and reused by
  every setting that runs it (measurements keyed like the programs; a decoding step by the
  cache's layout).
  """

  def __init__(self, base, variables, encode, full_embed, batch, opts: SweepOptions,
               eos_id: int, pad_id: int):
    self.base, self.variables, self.encode, self.full_embed = base, variables, encode, full_embed
    self.eos_id, self.pad_id = eos_id, pad_id
    _, self.image, self.text, self.mask, self.enc, self.full_toks = batch
    self.opts = opts
    self.measured: Dict[Any, Dict[str, Any]] = {}

  def _measure(self, fn, *args, out: bool = False) -> Dict[str, Any]:
    """{"seconds", "bytes"} of `fn(*args)` (a jitted function: the call goes through its
    executable cache, so a program the accuracy pass ran is not compiled again), and its output
    ("out") if asked for."""
    fn = fn if hasattr(fn, "lower") else jax.jit(fn)
    m = {"seconds": cost_lib.median_seconds(fn, *args, reps=self.opts.latency_reps),
         "bytes": cost_lib.program_bytes(cost_lib.compile_program(fn, *args))}
    return dict(m, out=fn(*args)) if out else m

  def _once(self, key, make: Callable[[], Dict[str, Any]]) -> Dict[str, Any]:
    if key not in self.measured:
      self.measured[key] = make()
    return self.measured[key]

  def _vit(self, signals: bool) -> Dict[str, Any]:
    if signals:  # the sweep's shared ViT run, with the signals of every layer a setting reads
      return self._once("vit+signals", lambda: self._measure(self.encode, self.variables,
                                                              self.image))
    base = self.base
    plain = lambda v, im: base.apply(v, im, method=base.encode_image)
    return self._once("vit", lambda: self._measure(plain, self.variables, self.image))

  def _decoder(self, dec, toks, from_image: bool = False
               ) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """(prefill, decode step) measurements of decoder `dec` on image tokens `toks` (from the
    image, ViT included, with `from_image`: an llm entry reading `vit_scores`): the two
    programs `runner.answer_batch` ran on this batch (`sampling.generate_programs`, called as
    the accuracy pass calls them, so their executables are reused, not compiled again); the
    decode step is the decoding loop's time / the steps it ran (it stops at the batch's last
    EOS)."""
    opts = self.opts
    key = ("decoder", dec.config.plan, toks.x.shape, self.text.shape, from_image)
    if key not in self.measured:
      programs = sampling.generate_programs(
          dec, self.variables["params"], self.image if from_image else None, self.text,
          max_new_tokens=opts.max_new_tokens, prefix_mask=np.asarray(self.mask).astype(bool),
          eos_id=self.eos_id, pad_id=self.pad_id, image_tokens=None if from_image else toks)
      pre_fn, pre_args = programs["prefill"]
      dec_fn, dec_args = programs["decode"]
      pre = self._measure(pre_fn, *pre_args)
      # The loop depends on the cache's layout only: settings leaving the same cache share it.
      cache = dec_args[3]
      layout = (jax.tree.structure(cache),
                tuple((a.shape, str(a.dtype)) for a in jax.tree.leaves(cache)))
      # The loop stops when every example has emitted EOS: per token = its time / the steps
      # it ran. A step's cost depends on the cache's layout, not on the answers, so the first
      # setting with a layout measures it for all.
      loop = self._once(("decode", layout), lambda: self._measure(dec_fn, *dec_args, out=True))
      steps = max(int(loop["out"][1]), 1)
      step = {"seconds": loop["seconds"] / steps, "bytes": loop["bytes"]}
      self.measured[key] = {"prefill": pre, "step": step}
    m = self.measured[key]
    return m["prefill"], m["step"]

  def measure(self, setting: Setting, plan, fn, dec) -> Dict[str, Any]:
    """{"prefill_seconds", "decode_seconds", "peak_bytes", "latency_batch", "programs"} of one
    setting; `fn` its jitted compression (None for FULL and the llm stage), `dec` its decoder."""
    toks = self.full_toks
    if setting.stage == "vit":  # its compression program runs the ViT
      vit = None
      embed = self._measure(fn, self.variables, self.image, self.text, self.mask, out=True)
    elif fn is not None:
      vit = self._vit(bool(plan_lib.signal_layers(plan, self.base.config.img.depth)))
      embed = self._measure(fn, self.variables, self.enc, self.text, self.mask, out=True)
    else:
      vit = self._vit(False)
      embed = self._once("projector", lambda: self._measure(
          self.full_embed, self.variables, self.enc, self.text, self.mask))
    if "out" in embed:
      toks = embed.pop("out")
    from_image = setting.stage == "llm" and bool(
        plan_lib.vit_score_layers(plan, self.base.config.img.depth))
    prefill, step = self._decoder(dec, toks, from_image)
    programs = {"vit": vit, "compress": embed, "decoder": prefill, "decode_step": step}
    programs = {k: None if p is None else {"seconds": float(p["seconds"]),
                                           "bytes": int(p["bytes"])}
                for k, p in programs.items()}
    run = [p for k, p in programs.items() if p is not None and k != "decode_step"]
    return {"prefill_seconds": sum(p["seconds"] for p in run),
            "decode_seconds": programs["decode_step"]["seconds"],
            "peak_bytes": max(p["bytes"] for p in programs.values() if p is not None),
            "latency_batch": int(self.text.shape[0]), "programs": programs}


def _rows(examples, sweep_settings, answers, errors, plans, costs, valid_tokens, kept_tokens,
          seconds,
          groups) -> List[Dict[str, Any]]:
  fam_shape = {f: _shape_name(g) for g in groups for f in g.families}
  out = []
  baseline = None
  for si, st in enumerate(sweep_settings):
    done = [i for i, a in enumerate(answers[si]) if a is not None]
    row: Dict[str, Any] = {"setting": st.name, "method": st.method, "stage": st.stage,
                           "budget": st.budget, "family": st.family, "plans": plans[si],
                           "errors": dict(errors[si]), "seconds": seconds[si]}
    if done:
      ex = [examples[i] for i in done]
      ans = [answers[si][i] for i in done]
      scores = runner.score_answers([e["family"] for e in ex], ans, [e["suffix"] for e in ex],
                                    [e.get("scene") for e in ex])
      base = None
      if baseline is not None:
        base = {"accuracy": _mean_acc(baseline, done, examples),
                "per_family": baseline["per_family"],
                "answers": [baseline["answers_by_index"][i] for i in done]}
      summary = runner.summarize(scores, ans, base)
      row.update({k: summary[k] for k in ("accuracy", "per_family", "iou_per_family", "loyalty",
                                          "loyalty_per_family", "relative_accuracy",
                                          "relative_per_family")})
      fams = [e["family"] for e in ex]
      per_fam_cost = {f: costs[si][fam_shape[f]] for f in sorted(set(fams))}
      row["cost_per_family"] = {f: dict(c, image_tokens_valid=float(np.mean(
          valid_tokens[si][f]))) for f, c in per_fam_cost.items()}
      for k in ("flops", "kv_bytes", "image_tokens", "mean_llm_tokens", "mean_llm_image_tokens",
                "image_tokens_valid") + _LATENCY_KEYS:
        if all(k in row["cost_per_family"][f] for f in fams):  # latency: when measured
          row[k] = float(np.mean([row["cost_per_family"][f][k] for f in fams]))
      if kept_tokens[si]:  # an adaptive policy: the image tokens it kept, per example
        row["kept_per_family"] = {f: float(np.mean(v)) for f, v in kept_tokens[si].items()}
        row["kept_tokens"] = float(np.mean(sum(kept_tokens[si].values(), [])))
      row["answers"] = {str(i): a for i, a in zip(done, ans)}
      row["complete"] = not row["errors"]
      if baseline is None:
        baseline = dict(row, answers_by_index=answers[si])
    else:
      row.update({"accuracy": None, "per_family": {}, "iou_per_family": {}, "loyalty": None,
                  "loyalty_per_family": {}, "relative_accuracy": None,
                  "relative_per_family": {}, "cost_per_family": {}, "answers": {},
                  "complete": False})
    out.append(row)
  return out


# Per-setting latency and memory, averaged over the examples like the analytic cost.
_LATENCY_KEYS = ("prefill_seconds", "decode_seconds", "peak_bytes")


def _mean_acc(baseline, done, examples) -> float:
  """The baseline's accuracy over the examples `done` (families a setting did run)."""
  fams = [examples[i]["family"] for i in done]
  counts = {f: fams.count(f) for f in set(fams)}
  return sum(baseline["per_family"][f] * n for f, n in counts.items()) / len(done)


def clean(x):
  """`x` with NaN / inf floats as None (strict JSON)."""
  if isinstance(x, float) and not math.isfinite(x):
    return None
  if isinstance(x, dict):
    return {k: clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [clean(v) for v in x]
  return x
