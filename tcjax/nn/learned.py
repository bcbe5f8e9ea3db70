"""Learned compressors: Linen modules a plan entry names at `post_vit` / `post_proj`.

Axis legend: B batch, N tokens in, K tokens out (the budget), M original patches, D features.

A learned compressor is a Linen module (one per file in `tcjax/nn/`) registered here with
`register`. A plan names it like a `tcjax.compress` method, with a static budget:

  ("post_vit", {"method": "tokenlearner", "budget": 16})
  ("post_proj", {"method": "qformer", "budget": 32, "depth": 2, "width": 96})

`PaliGemma` runs the entry's module inside `embed_image`; its parameters live under
`compressor/<key>/...`, key = the entry's "name" (default "<stage>_<method>_<budget>"), so the
pretrained towers' paths (`img/...`, `llm/...`) never change and the loop's regex freezing
(`trainable="compressor/.*"`) trains the compressor alone.

Entry keys: method, budget (a positive int: the module's parameters depend on it, e.g. one
learned query per output token), name, and the module's own options (its dataclass fields,
`LEARNED[method].options`). Unknown keys are refused when the plan is built (ValueError).

The Tokens contract for outputs that are not patches (resampled tokens). A learned slot k mixes
input tokens with weights w[k, j] >= 0 (TokenLearner's spatial map, a resampler's attention of
its last cross-attention layer). Then (`resampled`):
  pos   the position of the input token it weights most (its representative, as `merge`);
  size  the patches it stands for, shared softly: input token j's size is split over the slots
        in proportion to w[:, j], so sizes are > 0 and sum to the input's patch count;
  src   every patch goes to the slot that weights it most (never -1: nothing is dropped);
  mask  True (every slot is a token).
Grid-based compressors (LDPv2) keep the bookkeeping of the pooling they do (`pool_grid`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from typing import Any, Callable, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tcjax.compress import primitives as P
from tcjax.compress.registry import FAMILIES, METHODS, batch_sharded_like_x
from tcjax.nn.layers import NEG_INF, compute_dtype
from tcjax.parallel.mesh import match_batch
from tcjax.tokens import Tokens

STAGES = ("post_vit", "post_proj")
SUBTREE = "compressor"  # the top-level parameter subtree of every learned compressor
_NAME = re.compile(r"[A-Za-z0-9_]+")
# Module fields that are not options an entry may set.
_NOT_OPTIONS = ("budget", "parent", "name")


@dataclasses.dataclass(frozen=True)
class Learned:
  """A registered learned compressor.

  Attributes:
    name: the plan's method name.
    module: the Linen module class; `module(budget=K, **options)(tokens, **signals) -> Tokens`
      with exactly K tokens.
    family: one of `compress.registry.FAMILIES`.
    stages: where it may act (subset of STAGES).
    paper: short citation.
    choices: {option: allowed values} for options with fixed values.
    signals: `signals(options, stage) -> tuple` of the signals the module gets with these
      options ("text", "text_mask"); None: none.
    stage_defaults: {stage: {option: value}} filled into an entry at that stage when it does
      not set the option (e.g. the Q-Former reads the prompt only where the stage has it).
  """

  name: str
  module: type
  family: str
  stages: Tuple[str, ...]
  paper: str = ""
  choices: Dict[str, Tuple[Any, ...]] = dataclasses.field(default_factory=dict)
  signals: Optional[Callable[[Dict[str, Any], str], Tuple[str, ...]]] = None
  stage_defaults: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)

  @property
  def options(self) -> Dict[str, Any]:
    """{option: default} from the module's dataclass fields."""
    return {f.name: f.default for f in dataclasses.fields(self.module)
            if f.name not in _NOT_OPTIONS and f.default is not dataclasses.MISSING}

  def needs(self, options: Dict[str, Any], stage: str) -> Tuple[str, ...]:
    return tuple(self.signals(options, stage)) if self.signals else ()

  def __repr__(self):
    opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
    return (f"Learned({self.name}: {self.family}; stages {', '.join(self.stages)}; "
            f"options {opts or '-'}; paper {self.paper or '-'})")


LEARNED: Dict[str, Learned] = {}


def register(name: str, *, family: str, stages: Tuple[str, ...] = STAGES, paper: str = "",
             choices: Optional[Dict[str, Tuple[Any, ...]]] = None, signals=None,
             stage_defaults: Optional[Dict[str, Dict[str, Any]]] = None):
  """Class decorator adding a Linen compressor module to LEARNED."""
  if family not in FAMILIES:
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
  if not stages or not set(stages) <= set(STAGES):
    raise ValueError(f"stages must be a subset of {STAGES}, got {stages}")

  def wrap(cls):
    if name in LEARNED or name in METHODS:
      raise ValueError(f"learned compressor {name!r} registered twice (or a compress method)")
    LEARNED[name] = Learned(name, cls, family, tuple(stages), paper, dict(choices or {}),
                            signals, dict(stage_defaults or {}))
    return cls

  return wrap


def make(name: str, budget: int, **options) -> nn.Module:
  """An unbound module of learned compressor `name` (ValueError for unknown names / options)."""
  if name not in LEARNED:
    raise ValueError(f"unknown learned compressor {name!r}; known: {sorted(LEARNED)}")
  spec = LEARNED[name]
  unknown = sorted(set(options) - set(spec.options))
  if unknown:
    raise ValueError(f"{name}: unknown option(s) {unknown}; options: {sorted(spec.options)}")
  for key, values in spec.choices.items():
    if key in options and options[key] not in values:
      raise ValueError(f"{name}: {key} must be one of {values}, got {options[key]!r}")
  return spec.module(budget=budget, **options)


# ---------------------------------------------------------------------------------------------
# Plan entries.
# ---------------------------------------------------------------------------------------------


def is_learned(opts) -> bool:
  """Whether a plan entry's options name a learned compressor."""
  return isinstance(opts.get("method"), str) and opts["method"] in LEARNED


def entry_key(stage: str, opts) -> str:
  """The parameter subtree `compressor/<key>` of a learned plan entry."""
  return opts.get("name") or f"{stage}_{opts['method']}_{opts['budget']}"


def module_options(opts) -> Dict[str, Any]:
  """The options meant for the module itself (the plan's keys removed)."""
  return {k: v for k, v in opts.items() if k not in ("method", "budget", "name")}


def check_entry(where: str, stage: str, opts: Dict[str, Any]) -> Dict[str, Any]:
  """A learned entry's options, checked when the plan is built (ValueError naming the entry)."""
  spec = LEARNED[opts["method"]]
  if stage not in spec.stages:
    raise ValueError(f"{where}: {spec.name} acts at stages {spec.stages}, not {stage!r}")
  if "keep" in opts:
    raise ValueError(f"{where}: needs 'budget', a positive int (learned compressors take no "
                     f"'keep': their parameters depend on the number of tokens out)")
  allowed = {"method", "budget", "name", *spec.options}
  unknown = [k for k in opts if k not in allowed]
  if unknown:
    raise ValueError(f"{where}: unknown option(s) {unknown}; this entry takes {sorted(allowed)}")
  opts = {**spec.stage_defaults.get(stage, {}), **opts}
  b = opts.get("budget")
  if isinstance(b, bool) or not isinstance(b, int) or b < 1:
    # A learned compressor's parameters depend on its output count: it must be static.
    raise ValueError(f"{where}: needs 'budget', a positive int (learned compressors take no "
                     f"'keep'), got {b!r}")
  if "name" in opts and (not isinstance(opts["name"], str) or not _NAME.fullmatch(opts["name"])):
    raise ValueError(f"{where}: name must be a non-empty string of letters, digits and '_', "
                     f"got {opts['name']!r}")
  for key, values in spec.choices.items():
    if key in opts and opts[key] not in values:
      raise ValueError(f"{where}: {key} must be one of {values}, got {opts[key]!r}")
  for key, default in spec.options.items():
    if key not in opts:
      continue
    v = opts[key]
    default = spec.stage_defaults.get(stage, {}).get(key, default)  # e.g. a None made a bool
    if isinstance(default, bool) and not isinstance(v, bool):
      raise ValueError(f"{where}: {key} must be True or False, got {v!r}")
    if isinstance(default, int) and not isinstance(default, bool) and (
        isinstance(v, bool) or not isinstance(v, int) or v < 1):
      raise ValueError(f"{where}: {key} must be a positive int, got {v!r}")
  from tcjax.nn.plan import STAGE_SIGNALS  # pylint: disable=g-import-not-at-top
  missing = [s for s in spec.needs(opts, stage) if s not in STAGE_SIGNALS[stage]]
  if missing:
    raise ValueError(f"{where}: with these options {spec.name} needs signal(s) {missing}, "
                     f"which stage {stage!r} cannot provide")
  return opts


def check_keys(plan) -> None:
  """Two learned entries may not share a parameter subtree (ValueError)."""
  seen: Dict[str, int] = {}
  for i, (stage, opts) in enumerate(plan):
    opts = dict(opts)
    if stage in STAGES and is_learned(opts):
      key = entry_key(stage, opts)
      if key in seen:
        raise ValueError(f"plan[{i}] ({stage}, {opts['method']}): parameter subtree "
                         f"{SUBTREE}/{key} is also plan[{seen[key]}]'s; give one a 'name'")
      seen[key] = i


class Compressors(nn.Module):
  """The `compressor` subtree: runs the plan's learned entries, each under its own key.

  entries: ((key, method, budget, ((option, value), ...)), ...), static.
  """

  entries: Tuple[Tuple[str, str, int, Tuple[Tuple[str, Any], ...]], ...] = ()

  @nn.compact
  def __call__(self, key: str, tokens: Tokens, **signals) -> Tokens:
    found = [e for e in self.entries if e[0] == key]
    if not found:
      raise ValueError(f"no learned plan entry with key {key!r}")
    _, method, budget, options = found[0]
    module = LEARNED[method].module(budget=budget, name=key, **dict(options))
    # On Explicit mesh axes, one batch sharding for the tokens' fields and the signals, as
    # every `tcjax.compress` method gets them.
    tokens, signals = batch_sharded_like_x(tokens, signals)
    return module(tokens, **signals)


def compressor_entries(plan) -> Tuple[Tuple[str, str, int, Tuple[Tuple[str, Any], ...]], ...]:
  """Static (key, method, budget, options) of a normalized plan's learned entries."""
  out = []
  for stage, opts in plan:
    opts = dict(opts)
    if stage in STAGES and is_learned(opts):
      out.append((entry_key(stage, opts), opts["method"], opts["budget"],
                  tuple(sorted(module_options(opts).items()))))
  return tuple(out)


TOWERS = "towers"  # save_trained's array: the fingerprint of the towers the compressors read


def towers_fingerprint(params) -> str:
  """SHA-256 over every parameter outside `SUBTREE` (paths sorted, float32 bytes): the towers a
  compressor was trained on. A compressor trained on frozen towers reads features of those
  towers only; on other towers (a retrained bundled model) its outputs mean nothing."""
  digest = hashlib.sha256()
  flat = traverse_util.flatten_dict({k: v for k, v in params.items() if k != SUBTREE}, sep="/")
  for k in sorted(flat):
    digest.update(k.encode())
    digest.update(np.ascontiguousarray(jax.device_get(flat[k]), np.float32).tobytes())
  return digest.hexdigest()


def trained_towers(path: str) -> Optional[str]:
  """The towers fingerprint `save_trained` stored in `path` (None in a file written without)."""
  with np.load(path) as f:
    return str(f[TOWERS]) if TOWERS in f.files else None


def save_trained(path: str, params, plan) -> Tuple[str, ...]:
  """Writes the trained compressors of `plan`'s learned entries to `path` (an `.npz`, without
  the towers: a few hundred KB where the whole model is MBs) -> the keys written.

  Arrays: "compressor/<key>/<param path>" from `params[SUBTREE]`; beside each key, "entry/<key>"
  holds its plan entry (stage and options, JSON), so that `load_trained` rebuilds the entry
  the parameters belong to; "towers" holds `towers_fingerprint(params)`, so that the sweep can
  refuse the compressors on other towers. ValueError when `plan` has no learned entry or
  `params` lacks one.
  """
  arrays, keys = {}, []
  for stage, opts in plan:
    opts = dict(opts)
    if stage not in STAGES or not is_learned(opts):
      continue
    key = entry_key(stage, opts)
    sub = params.get(SUBTREE, {}).get(key)
    if sub is None:
      raise ValueError(f"params have no {SUBTREE}/{key} for the plan entry ({stage}, {opts})")
    for k, v in traverse_util.flatten_dict(sub, sep="/").items():
      arrays[f"{SUBTREE}/{key}/{k}"] = np.asarray(jax.device_get(v))
    arrays[f"entry/{key}"] = np.asarray(json.dumps({"stage": stage, **opts}, sort_keys=True))
    keys.append(key)
  if not keys:
    raise ValueError(f"the plan {plan} has no learned compressor to save")
  arrays[TOWERS] = np.asarray(towers_fingerprint(params))
  with open(path, "wb") as f:
    np.savez(f, **arrays)
  return tuple(keys)


def load_trained(path: str):
  """`save_trained`'s file -> (plan entries ((stage, options), ...), {SUBTREE: {key: params}}).

  ValueError naming the file when it is not such a file (an array outside "compressor/" and
  "entry/", a key without its entry or an entry without arrays, an unknown method).
  """
  with np.load(path) as f:
    data = {k: f[k] for k in f.files}
  entries, flat = {}, {}
  for k, v in data.items():
    head, _, rest = k.partition("/")
    if head == "entry" and rest:
      entries[rest] = json.loads(str(v))
    elif k == TOWERS:
      continue
    elif head == SUBTREE and "/" in rest:
      flat[rest] = v
    else:
      raise ValueError(f"{path}: array {k!r} is neither {SUBTREE}/<key>/... nor entry/<key>: "
                       f"not a file of trained compressors (tcjax.nn.learned.save_trained)")
  tree = traverse_util.unflatten_dict(flat, sep="/")
  if set(tree) != set(entries) or not entries:
    raise ValueError(f"{path}: compressor keys {sorted(tree)} and entries {sorted(entries)} "
                     f"differ (or are empty)")
  plan = []
  for key, e in sorted(entries.items()):
    stage = e.pop("stage", None)
    if stage not in STAGES or e.get("method") not in LEARNED:
      raise ValueError(f"{path}: entry {key!r} is not a learned compressor at {STAGES}: "
                       f"{dict(e, stage=stage)}")
    if entry_key(stage, e) != key:
      raise ValueError(f"{path}: entry {key!r} gives parameter key {entry_key(stage, e)!r}")
    plan.append((stage, e))
  return tuple(plan), {SUBTREE: tree}


def dummy_inputs(config):
  """A one-example input and prompt for initialising `config`'s model (shapes only matter):
  an image, or a clip of F frames when a learned entry of the plan has the option `frames=F`
  > 1 (its parameters are shaped per frame, e.g. TokenLearner's per-frame maps)."""
  frames = {dict(o)["frames"] for _, _, _, o in compressor_entries(config.plan)
            if dict(o).get("frames") not in (None, 1)}
  if len(frames) > 1:
    raise ValueError(f"learned entries want clips of different frame counts {sorted(frames)}: "
                     f"one model is initialised on one input shape")
  size = (config.img.image_size, config.img.image_size, 3)
  image = jnp.zeros((1,) + tuple(frames) + size, jnp.float32)
  text = jnp.ones((1, 4), jnp.int32)
  return image, text, jnp.zeros_like(text)


def param_shapes(config) -> Dict[str, Tuple[int, ...]]:
  """{"compressor/<key>/...": shape} of the learned entries of `config.plan` ({} if none),
  from an abstract init (nothing is computed)."""
  entries = compressor_entries(config.plan)
  if not entries:
    return {}
  from tcjax.nn.paligemma import PaliGemma  # pylint: disable=g-import-not-at-top
  model = PaliGemma(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), *dummy_inputs(config))["params"])
  flat = traverse_util.flatten_dict(shapes.get(SUBTREE, {}), sep="/")
  return {f"{SUBTREE}/{k}": tuple(v.shape) for k, v in flat.items()}


def init_missing(model, params, seed: int = 0, out_shardings=None):
  """`params` with the plan's learned compressors it lacks freshly initialised.

  Pretrained towers come from a checkpoint without the `compressor` subtree; this adds a
  subtree for every learned entry of `model.config.plan` not in `params` (entries present are
  kept). out_shardings: optional {key: sharding pytree} for the `compressor/<key>` subtrees
  (e.g. `tcjax.parallel.param_shardings` of the abstract init's `compressor`; keys present
  in `params` are ignored). Only the compressors' initialisers survive compilation (the towers' init and the
  forward pass are dead code for XLA).
  """
  entries = compressor_entries(model.config.plan)
  have = dict(params.get(SUBTREE, {}))
  missing = tuple(e[0] for e in entries if e[0] not in have)
  if not missing:
    return params
  inputs = dummy_inputs(model.config)

  def fresh():
    new = model.init(jax.random.key(seed), *inputs)["params"][SUBTREE]
    return {k: new[k] for k in missing}

  if out_shardings is not None:
    out_shardings = {k: out_shardings[k] for k in missing}
  new = jax.jit(fresh, out_shardings=out_shardings)()
  return {**params, SUBTREE: {**have, **new}}


# ---------------------------------------------------------------------------------------------
# Shared pieces of the modules.
# ---------------------------------------------------------------------------------------------


def check_input(tokens, budget, method: str) -> Tokens:
  """The contract's input checks: Tokens with consistent shapes, a static budget in [1, N]."""
  tokens = P.check_tokens(tokens, method)
  P.check_budget(tokens, budget, method)
  return tokens


def check_text(tokens: Tokens, text, text_mask, method: str):
  """text float[B, T, E], text_mask bool[B, T] (None: all valid) -> (text, text_mask)."""
  b = tokens.x.shape[0]
  text = P.check_array(text, "text", method, (b, None, None))
  if text_mask is None:
    text_mask = jnp.ones(text.shape[:2], bool)
  text_mask = P.check_array(text_mask, "text_mask", method, text.shape[:2], floating=False)
  return text, text_mask.astype(bool)


def per_example(value, ref):
  """`value` (a learned table without a batch axis, or a constant) broadcast over the batch of
  `ref` float[B, ...], its batch axis sharded like ref's (`parallel.mesh.match_batch`): on
  Explicit mesh axes a table broadcast replicated cannot be concatenated with (or otherwise
  combined along a token axis with) the batch-sharded tokens."""
  value = jnp.asarray(value)
  return match_batch(jnp.broadcast_to(value, (ref.shape[0],) + value.shape), ref)


def masked_softmax(logits, valid, axis=-1):
  """Softmax over `axis` where `valid` (broadcastable), in at least float32 (float64 stays
  float64); fully masked rows give 0."""
  logits = jnp.where(valid, logits.astype(compute_dtype(logits)), NEG_INF)
  p = jax.nn.softmax(logits, axis=axis)
  return jnp.where(valid, p, 0.0)


def resampled(tokens: Tokens, x, weights) -> Tokens:
  """Tokens for K learned slots (module docstring: pos / size / src of non-patch tokens).

  tokens: the N input tokens; x: float[B, K, D] the slots' features; weights: float[B, K, N]
  weight of input token j in slot k (>= 0, zero on padding). Bookkeeping takes no gradient.
  """
  w = jax.lax.stop_gradient(weights.astype(compute_dtype(weights)))
  valid = tokens.mask
  w = jnp.where(valid[:, None, :], w, 0.0)
  # Share of input token j that slot k stands for (a uniform share where every weight is 0).
  k = w.shape[1]
  tot = w.sum(1, keepdims=True)
  share = jnp.where(tot > 0, w / jnp.maximum(tot, 1e-30), 1.0 / k)
  size = jnp.einsum("bkn,bn->bk", share, jnp.where(valid, tokens.size, 0.0))
  owner = jnp.argmax(w, axis=1).astype(jnp.int32)  # [B, N] the slot that weights j most
  old_to_new = jnp.where(valid, owner, -1)
  rep = jnp.argmax(jnp.where(valid[:, None, :], w, -1.0), axis=-1).astype(jnp.int32)  # [B, K]
  pos = jnp.take_along_axis(tokens.pos, rep[..., None], axis=1)
  b = x.shape[0]
  return Tokens(x=x.astype(tokens.x.dtype), pos=pos.astype(jnp.int32),
                size=size.astype(tokens.size.dtype),
                mask=jnp.ones((b, k), bool), src=P.remap_src(tokens.src, old_to_new),
                grid=tokens.grid)


def check_positive(module: str, **values) -> None:
  """ValueError unless every value is a positive int (a module's size options)."""
  for k, v in values.items():
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
      raise ValueError(f"{module}: {k} must be a positive int, got {v!r}")


# The modules, one file each; importing them registers them (they import `register` above).
from tcjax.nn import tokenlearner  # pylint: disable=g-import-not-at-top,wrong-import-position
from tcjax.nn import perceiver  # pylint: disable=g-import-not-at-top,wrong-import-position
from tcjax.nn import qformer  # pylint: disable=g-import-not-at-top,wrong-import-position
from tcjax.nn import ldpv2  # pylint: disable=g-import-not-at-top,wrong-import-position

del tokenlearner, perceiver, qformer, ldpv2
