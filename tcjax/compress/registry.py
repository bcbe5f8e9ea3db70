"""The method registry: `METHODS[name]` describes a method, `apply(name, ...)` runs it."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Dict, Optional, Tuple

import chex

from tcjax.parallel.mesh import match_batch
from tcjax.tokens import Tokens

FAMILIES = ("sampling", "merging", "pooling", "cross_modal")
STAGES = ("vit", "post_vit", "post_proj", "llm")
# Signal names (docs/architecture.md). Each name means one thing at every stage that provides it:
#   scores       float32[B, N] the attention each token receives, one number (ViT: mean over
#                every query row; decoder: the last valid prompt row's), head-mean;
#   attn         float32[B, Q, N] attention rows to the tokens, head-mean (ViT: one row, the
#                mean over the queries; decoder: the T text rows);
#   attn_heads   float32[B, H, Q, N] the same per query head (decoder);
#   rope_logits  float32[B, T, N] the RoPE term alone of those logits (decoder);
#   keys         float[B, N, h] the tokens' attention keys, mean over the (KV) heads;
#   keys_concat  float[B, N, K * h] the same with the KV heads concatenated (decoder);
#   keys_heads   float[B, N, K, h] the same per (KV) head (decoder: post-RoPE, as cached);
#   text         float[B, T, E] the text tokens' hidden states where the stage acts (post_proj:
#                the embedded text; decoder: entering layer K);
#   text_normed  float[B, T, E] the decoder's text states after the model's final norm;
#   text_mask    bool[B, T] the valid prompt rows (prefix, not padding; never the suffix);
#   text_keys, text_keys_concat: the text tokens' keys, head-mean / KV heads concatenated;
#   rng          a PRNG key from the entry's seed.
# A method's keyword arguments are named after signals; at the llm stage a registration may feed
# an argument from another signal (`register(llm_signals=)`, e.g. DART's `keys` from
# `keys_concat`), so that a method acting at several stages reads each stage's right layout.
SIGNALS = ("scores", "attn", "attn_heads", "rope_logits", "keys", "keys_concat", "keys_heads",
           "text", "text_normed", "text_mask", "text_keys", "text_keys_concat", "rng",
           "vit_scores", "image_count")
# `vit_scores` (llm stage, float32[B, N]): the ViT's mean received attention at the entry's
# `signal_layer`, read for each image token at the ViT output token carrying its origin patch
# (MustDrop's key set); `image_count` (llm stage, int32[B]): the valid image tokens entering the
# decoder, before any llm-stage step. The model computes either only when an entry needs it.
# How the decoder serves an llm-stage method (`register(llm_attn=, llm_kv=, llm_features=)`):
#   llm_attn  "model": attention signals are the layer's own softmax (RoPE, prefix-LM mask);
#             "raw": softmax of q k^T before RoPE over every valid token, no mask (PruneVid).
#   llm_kv    "after": the layers from K on cache only the kept tokens (FastV);
#             "all": the pruned tokens also leave the caches of layers < K (PruneVid), so
#             decoding attends to the kept tokens only, in every layer.
#   llm_features  what `tokens.x` holds: "hidden" the hidden states entering layer K;
#             "final_norm" the same after the model's final RMSNorm (DART's features).
LLM_ATTN = ("model", "raw")
LLM_KV = ("after", "all")
LLM_FEATURES = ("hidden", "final_norm")
# RoPE positions of the tokens that stay after an llm-stage step (`tcjax.nn.plan.POSITIONS`).
POSITIONS = ("original", "reindex")

# The decode stage: policies that act on the KV cache while decoding, one token at a time
# (`DecodePolicy`, `register_decode`). The stage is not in STAGES: its entries are not Tokens ->
# Tokens methods.
DECODE_STAGE = "decode"
# What a decode policy acting at decoder layer L may ask for (`register_decode(needs=)`), each
# over the n image entries of the KV cache that layer L - 1 attends (the same tokens as layer
# L's unless an llm-stage step prunes at L):
#   attn        float32[B, n]: the new token's attention at layer L - 1 (the layer's own softmax
#               over every cache entry, its mask, mean over the query heads);
#   attn_heads  float32[B, H, n]: the same per query head;
#   kept        bool[B, n]: the entries that reach the last layer's cache (what the prefill's
#               llm-stage steps kept to the end).
DECODE_SIGNALS = ("attn", "attn_heads", "kept")

# Options that take one of a few fixed values, per method. `tcjax.nn.plan.normalize` checks them
# when a plan is built, long before the method is traced (each method checks again when called).
# tests/test_plan_options.py holds every entry to the method's own check and wants one for every
# option whose default is a string.
CHOICES: Dict[str, Dict[str, Tuple[Any, ...]]] = {
    "cdpruner": {"sign": ("negative", "positive"), "normalize": ("example", "batch")},
    "dart": {"quota": ("official", "even")},
    "dpc_knn": {"weighting": ("plain", "size")},
    "fastervlm": {"reduce": ("mean", "cls")},
    "fastv": {"query": ("last", "mean")},
    "holitom_llm": {"merge": ("official", "mean")},
    "keynorm": {"heads": ("mean", "concat"), "order": ("smallest", "largest"),
                "norm": ("l2", "l1")},
    "prumerge": {"heads": ("concat", "mean")},
    "prumerge_plus": {"heads": ("concat", "mean")},
    "sparsevlm": {"version": ("v1.5", "v2.0")},
    "text_relevance": {"similarity": ("cosine", "dot"), "raters": ("all", "above_mean")},
    "visionzip": {"merge": ("official", "mean")},
}

# The type of each option whose default is None ("the method decides"): None or a value of this
# kind ("int", "float": any number, "bool"). `plan.normalize` checks them like the options with
# a typed default; tests/test_plan_options.py wants an entry for every such option.
OPTIONAL_TYPES: Dict[str, Dict[str, str]] = {
    "cdpruner": {"theta": "float", "cache_gram": "bool"},
    "dart": {"num_pivots": "int"},
    "divprune": {"cache_gram": "bool"},
    "dycoke": {"prune": "float"},
    "framefusion": {"cost": "float"},
    "holitom": {"retain_ratio": "float"},
    "pool": {"window": "int"},
    "pyramid": {"level": "int"},
    "slowfast": {"slow_frames": "int", "fast_window": "int"},
    "sparsevlm": {"scored": "int"},
    "visionzip": {"dominant": "int", "contextual": "int"},
}


@dataclasses.dataclass(frozen=True)
class Method:
  """What a compression method is and what it needs.

  Attributes:
    name: registry key, also the public function name in `tcjax.compress`.
    fn: `fn(tokens, budget, *, <signals>, <options>) -> Tokens` with exactly `budget` tokens.
    family: one of FAMILIES (the survey's four families).
    stages: where in the model the method may act (subset of STAGES).
    needs: signals the caller must pass (subset of SIGNALS); optional signals are not listed
      (`optional` names them).
    options: static options and their defaults, read from the function signature.
    paper: short citation of the method's paper.
    token_sharded: runs exactly on a token axis sharded over an Explicit mesh axis (top-k
      selection through the two-stage `tcjax.parallel.topk`); the others need each example's
      whole token axis and say so with a ValueError instead of gathering it silently.
    llm_attn, llm_kv: how the decoder serves the method at the llm stage (LLM_ATTN, LLM_KV).
    keeps_none: the method keeps no token at any budget (the budget only sizes the padding), so
      its answers do not depend on the budget: a sweep runs it at one budget.
    default_signals: optional signals a plan entry passes unless its "signals" says otherwise
      (those the official method uses); the stage must provide them, else they are left out.
    llm_signals: {argument: signal}: at the llm stage the argument is fed from that decoder
      signal instead of the signal of its own name (DART: `keys` from `keys_concat`).
    llm_features: what `tokens.x` holds at the llm stage (LLM_FEATURES).
    llm_rows: None, or `rows(x_img float[B, N, E], x_text float[B, T, E], text_mask bool[B, T],
      img_mask bool[B, N]) -> bool[B, T]`: the text rows that count for this method (SparseVLM's
      raters), computed once from the decoder's input embeddings; at each of its steps the
      model passes `text_mask` (and scores `scores`, `attn` rows) restricted to them.
    llm_positions: the RoPE positions its official code gives the survivors (POSITIONS), the
      default of an llm entry's "positions".
    signal_layer: the ViT layer whose attention / keys a post_vit / post_proj entry reads (and
      whose received attention gives an llm entry's `vit_scores`) unless the entry names one:
      -2, the penultimate (VisionZip, FasterVLM), or where the official method reads another.
  """

  name: str
  fn: Callable[..., Any]
  family: str
  stages: Tuple[str, ...]
  needs: Tuple[str, ...]
  options: Dict[str, Any]
  paper: str
  token_sharded: bool = False
  llm_attn: str = "model"
  llm_kv: str = "after"
  keeps_none: bool = False
  default_signals: Tuple[str, ...] = ()
  llm_signals: Dict[str, str] = dataclasses.field(default_factory=dict)
  llm_features: str = "hidden"
  llm_rows: Optional[Callable[..., Any]] = None
  llm_positions: str = "original"
  signal_layer: int = -2

  def __call__(self, *args, **kwargs):
    return self.fn(*args, **kwargs)

  def __repr__(self):
    # One readable line instead of the dataclass's (whose `fn` prints as a function address).
    sharded = ", token-sharded" if self.token_sharded else ""
    return (f"Method({self.name}: {self.family}{sharded}; stages {_listed(self.stages)}; "
            f"needs {_listed(self.needs)}; options {_listed(_defaults(self.options))}; "
            f"paper {self.paper or '-'})")

  @property
  def accepts(self) -> frozenset:
    """Every keyword the function takes (signals, optional signals and options)."""
    return frozenset(inspect.signature(self.fn).parameters)

  @property
  def optional(self) -> Tuple[str, ...]:
    """Signals the function takes without needing them, in SIGNALS order."""
    return tuple(s for s in SIGNALS if s in self.accepts and s not in self.needs)

  @property
  def choices(self) -> Dict[str, Tuple[Any, ...]]:
    """{option: its allowed values} for the options with fixed choices (CHOICES)."""
    return CHOICES.get(self.name, {})

  @property
  def optional_types(self) -> Dict[str, str]:
    """{option: "int" / "float" / "bool"} for the options whose default is None."""
    return OPTIONAL_TYPES.get(self.name, {})

  def llm_signal(self, argument: str) -> str:
    """The decoder signal that feeds `argument` at the llm stage (`llm_signals`, else itself)."""
    return self.llm_signals.get(argument, argument)


METHODS: Dict[str, Method] = {}


def register(name: str, *, family: str, stages: Tuple[str, ...], needs: Tuple[str, ...] = (),
             paper: str = "", token_sharded: bool = False, llm_attn: str = "model",
             llm_kv: str = "after", keeps_none: bool = False,
             default_signals: Tuple[str, ...] = (), llm_signals: Optional[Dict[str, str]] = None,
             llm_features: str = "hidden", llm_rows: Optional[Callable[..., Any]] = None,
             llm_positions: str = "original", signal_layer: int = -2):
  """Decorator adding a method function to METHODS (see `Method` for the fields).

  Raises ValueError for a value outside its choices, and for signals the function does not take
  or that do not exist (naming them)."""
  if llm_attn not in LLM_ATTN or llm_kv not in LLM_KV:
    raise ValueError(f"llm_attn must be one of {LLM_ATTN} and llm_kv one of {LLM_KV}, got "
                     f"{llm_attn!r}, {llm_kv!r}")
  if llm_features not in LLM_FEATURES:
    raise ValueError(f"llm_features must be one of {LLM_FEATURES}, got {llm_features!r}")
  if llm_positions not in POSITIONS:
    raise ValueError(f"llm_positions must be one of {POSITIONS}, got {llm_positions!r}")
  if family not in FAMILIES:
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
  if not set(stages) <= set(STAGES):
    raise ValueError(f"stages must be a subset of {STAGES}, got {stages}")
  if not set(needs) <= set(SIGNALS):
    raise ValueError(f"needs must be a subset of {SIGNALS}, got {needs}")
  llm_signals = dict(llm_signals or {})
  unknown = sorted(set(llm_signals.values()) - set(SIGNALS))
  if unknown:
    raise ValueError(f"{name}: llm_signals names unknown signal(s) {unknown}; signals: {SIGNALS}")
  if isinstance(signal_layer, bool) or not isinstance(signal_layer, int):
    raise ValueError(f"{name}: signal_layer must be an int, got {signal_layer!r}")
  if llm_rows is not None and not callable(llm_rows):
    raise ValueError(f"{name}: llm_rows must be a function, got {llm_rows!r}")

  def wrap(fn):
    if name in METHODS:
      raise ValueError(f"method {name!r} registered twice")
    params = inspect.signature(fn).parameters
    options = {k: p.default for k, p in params.items()
               if p.kind is p.KEYWORD_ONLY and k not in SIGNALS}
    signal_args = {k for k in params if k in SIGNALS}
    bad = sorted(set(llm_signals) - signal_args)
    if bad:
      raise ValueError(f"{name}: llm_signals binds argument(s) {bad}, which are not signal "
                       f"arguments of the function ({sorted(signal_args)})")
    bad = sorted(set(default_signals) - (signal_args - set(needs)))
    if bad:
      raise ValueError(f"{name}: default_signals {bad} are not optional signals of the function")

    @functools.wraps(fn)
    def checked(tokens, budget, *args, **kwargs):
      tokens, kwargs = batch_sharded_like_x(tokens, kwargs)
      out = fn(tokens, budget, *args, **kwargs)
      _check_output(out, tokens, budget)
      return out

    METHODS[name] = Method(name, checked, family, tuple(stages), tuple(needs), options, paper,
                           token_sharded, llm_attn, llm_kv, bool(keeps_none),
                           tuple(default_signals), llm_signals, llm_features, llm_rows,
                           llm_positions, signal_layer)
    return checked

  return wrap


def batch_sharded_like_x(tokens, kwargs):
  """(tokens, kwargs) with the batch axis of the tokens' bookkeeping and of the array signals
  sharded like tokens.x's (`Tokens.sharded_like_x`, `parallel.mesh.match_batch`): methods vmap
  over them together, and on Explicit mesh axes they may arrive differently sharded (a clip's
  tokens resharded per example, ViT signals folded back from the frames). A no-op otherwise;
  anything else is left to the method's checks. The learned compressors (`tcjax.nn.learned`)
  get their inputs so too."""
  if not isinstance(tokens, Tokens):
    return tokens, kwargs
  return tokens.sharded_like_x(), {k: match_batch(v, tokens.x) if k in SIGNALS and k != "rng"
                                   else v for k, v in kwargs.items()}


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A multi-layer llm-stage schedule: one step of a registered method at each listed layer.

  A plan entry `("llm", {"method": name, "layers": (l_1, ..., l_m), <size key>: (v_1, ...,
  v_m), <options>})` runs `step` at the input of decoder layer l_i, sized by v_i.

  Attributes:
    name: the name a plan entry gives (SCHEDULES key; it may equal its step's name).
    step: the registered llm-stage method each step runs (METHODS key).
    sizes: {size key: "count" (positive ints) or "fraction" (in (0, 1])}: an entry gives
      exactly one of them, one value per layer.
    size: `size(key, value, n, n_initial, options) -> (budget, extra)`: the step's tokens out of
      the `n` present (`n_initial`: the image tokens entering the decoder) and extra static
      options for the step (SparseVLM's `scored`); raises ValueError for a value it cannot
      meet.
    options: the step method's options an entry may set (any other key is refused).
    fixed: options every step gets (PyramidDrop's FastV `query="last"`).
    signals: the step's signal arguments, a tuple or `signals(options) -> tuple`.
    attn_from: the default of the entry's "attn_from" ("prev" / "next").
    positions: the official RoPE positions (POSITIONS), or `positions(options) -> one of them`.
    paper: short citation.
  `options` given to the functions: the entry's own options over the step method's defaults.
  """

  name: str
  step: str
  sizes: Dict[str, str]
  size: Callable[..., Tuple[int, Dict[str, Any]]]
  options: Tuple[str, ...] = ()
  fixed: Dict[str, Any] = dataclasses.field(default_factory=dict)
  signals: Any = ()
  attn_from: str = "prev"
  positions: Any = "original"
  paper: str = ""

  def step_options(self, given: Dict[str, Any]) -> Dict[str, Any]:
    """The step method's options: its defaults for `options`, overridden by `given`."""
    defaults = METHODS[self.step].options
    return {**{k: defaults[k] for k in self.options}, **{k: v for k, v in given.items()
                                                          if k in self.options}}

  def step_signals(self, given: Dict[str, Any]) -> Tuple[str, ...]:
    out = self.signals(self.step_options(given)) if callable(self.signals) else self.signals
    return tuple(out)

  def official_positions(self, given: Dict[str, Any]) -> str:
    if callable(self.positions):
      return self.positions(self.step_options(given))
    return self.positions


SCHEDULES: Dict[str, Schedule] = {}
SIZE_KINDS = ("count", "fraction")


def register_schedule(name: str, *, step: str, sizes: Dict[str, str],
                      size: Callable[..., Tuple[int, Dict[str, Any]]],
                      options: Tuple[str, ...] = (), fixed: Optional[Dict[str, Any]] = None,
                      signals: Any = (), attn_from: str = "prev", positions: Any = "original",
                      paper: str = "") -> Schedule:
  """Adds a multi-layer llm-stage schedule to SCHEDULES (see `Schedule`) and returns it.

  Raises ValueError naming what is wrong: an unknown step method or one that does not act at
  the llm stage, options or fixed options the step does not take, signals it does not take,
  unknown size kinds, attn_from or positions outside their choices."""
  if name in SCHEDULES:
    raise ValueError(f"schedule {name!r} registered twice")
  if step not in METHODS or "llm" not in METHODS[step].stages:
    raise ValueError(f"schedule {name!r}: step must be a registered llm-stage method, got "
                     f"{step!r}")
  m = METHODS[step]
  fixed = dict(fixed or {})
  bad = sorted((set(options) | set(fixed)) - set(m.options))
  if bad:
    raise ValueError(f"schedule {name!r}: {step!r} has no option(s) {bad}; its options are "
                     f"{sorted(m.options)}")
  if not sizes or not set(sizes.values()) <= set(SIZE_KINDS):
    raise ValueError(f"schedule {name!r}: sizes must map size keys to one of {SIZE_KINDS}, got "
                     f"{sizes!r}")
  if attn_from not in ("prev", "next"):
    raise ValueError(f"schedule {name!r}: attn_from must be 'prev' or 'next', got {attn_from!r}")
  if not callable(positions) and positions not in POSITIONS:
    raise ValueError(f"schedule {name!r}: positions must be one of {POSITIONS} or a function, "
                     f"got {positions!r}")
  sched = Schedule(name, step, dict(sizes), size, tuple(options), fixed, signals, attn_from,
                   positions, paper)
  # Every signal it can ask for, over the step's option choices.
  variants = [{}] + [{k: v} for k in options for v in m.choices.get(k, ())]
  for given in variants:
    bad = sorted(set(sched.step_signals(given)) - (m.accepts & set(SIGNALS)))
    if bad:
      raise ValueError(f"schedule {name!r}: {step!r} takes no signal(s) {bad}")
  SCHEDULES[name] = sched
  return sched


def _check_output(out, tokens, budget) -> None:
  """The contract's post-condition (a bug in the method if it fails; input errors are
  ValueErrors raised before): exactly `budget` tokens with the input's batch and width, and a
  `src` over the same original patches."""
  b, _, d = tokens.x.shape
  k = int(budget)
  chex.assert_shape(out.x, (b, k, d))
  chex.assert_shape(out.pos, (b, k, 3))
  chex.assert_shape([out.size, out.mask], (b, k))
  chex.assert_shape(out.src, tokens.src.shape)


def apply(name: str, tokens, budget: int, **signals_and_options):
  """Run method `name` on `tokens` down to `budget` tokens.

  Raises ValueError for an unknown method, a missing signal, or an option the method lacks.
  """
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
  method = METHODS[name]
  missing = [s for s in method.needs if signals_and_options.get(s) is None]
  if missing:
    raise ValueError(f"method {name!r} needs signal(s) {missing}")
  unknown = sorted(set(signals_and_options) - method.accepts)
  if unknown:
    raise ValueError(f"method {name!r} takes no argument(s) {unknown}; "
                     f"signals {list(method.needs)}, options {sorted(method.options)}")
  return method.fn(tokens, budget, **signals_and_options)


@dataclasses.dataclass(frozen=True)
class DecodePolicy:
  """A decode-time KV-cache policy: which image entries of the cache layers >= L attend to.

  The model keeps the cache whole (static shapes): a policy only masks image entries, from its
  layer L to the last layer, one decoding step at a time. Its state rides in the cache.

  Attributes:
    name: registry key (`DECODE_POLICIES`); a plan names it in a ("decode", {"method": name,
      "layer": L, <options>}) entry.
    step: `step(state, *, valid, <signals>, <options>) -> (state, keep)`, per decoding step;
      valid: bool[B, n] the image entries present in the cache that layer L - 1 attends; keep:
      bool[B, n] the entries layers >= L may attend this step (a subset of `valid`).
    init: `init(valid, **options) -> state` (any pytree of arrays batched on axis 0), once after
      the prefill.
    family: one of FAMILIES.
    needs: decode signals the step reads (DECODE_SIGNALS); the model computes only those.
    options: static options and their defaults, read from `step`'s signature.
    paper: short citation.
    choices: {option: allowed values} for options with fixed values (checked in the plan).
  """

  name: str
  step: Callable[..., Any]
  init: Callable[..., Any]
  family: str
  needs: Tuple[str, ...]
  options: Dict[str, Any]
  paper: str
  choices: Dict[str, Tuple[Any, ...]] = dataclasses.field(default_factory=dict)
  optional_types: Dict[str, str] = dataclasses.field(default_factory=dict)

  def __repr__(self):
    return (f"DecodePolicy({self.name}: {self.family}; needs {_listed(self.needs)}; options "
            f"{_listed(_defaults(self.options))}; paper {self.paper or '-'})")


DECODE_POLICIES: Dict[str, DecodePolicy] = {}


def register_decode(name: str, *, family: str, init: Callable[..., Any],
                    needs: Tuple[str, ...] = (), paper: str = "",
                    choices: Dict[str, Tuple[Any, ...]] = None,
                    optional_types: Dict[str, str] = None):
  """Decorator adding a decode-time policy's `step` function to DECODE_POLICIES (see
  `DecodePolicy`). Keyword-only arguments of `step` other than `valid` and the DECODE_SIGNALS
  are its options."""
  if family not in FAMILIES:
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
  if not set(needs) <= set(DECODE_SIGNALS):
    raise ValueError(f"needs must be a subset of {DECODE_SIGNALS}, got {needs}")

  def wrap(fn):
    if name in DECODE_POLICIES:
      raise ValueError(f"decode policy {name!r} registered twice")
    params = inspect.signature(fn).parameters
    options = {k: p.default for k, p in params.items()
               if p.kind is p.KEYWORD_ONLY and k not in DECODE_SIGNALS and k != "valid"}
    bad = sorted(set(choices or {}) - set(options))
    if bad:
      raise ValueError(f"decode policy {name!r}: choices for unknown option(s) {bad}")
    DECODE_POLICIES[name] = DecodePolicy(name, fn, init, family, tuple(needs), options, paper,
                                         dict(choices or {}), dict(optional_types or {}))
    return fn

  return wrap


def apply_decode(name: str, state, *, valid, **signals_and_options):
  """One step of decode policy `name`: (state, keep bool[B, n]) (see `DecodePolicy.step`).

  Raises ValueError for an unknown policy, a missing signal, or an option it lacks.
  """
  if name not in DECODE_POLICIES:
    raise ValueError(f"unknown decode policy {name!r}; known: {sorted(DECODE_POLICIES)}")
  policy = DECODE_POLICIES[name]
  missing = [s for s in policy.needs if signals_and_options.get(s) is None]
  if missing:
    raise ValueError(f"decode policy {name!r} needs signal(s) {missing}")
  unknown = sorted(set(signals_and_options) - set(policy.needs) - set(policy.options))
  if unknown:
    raise ValueError(f"decode policy {name!r} takes no argument(s) {unknown}; signals "
                     f"{list(policy.needs)}, options {sorted(policy.options)}")
  state, keep = policy.step(state, valid=valid, **signals_and_options)
  chex.assert_shape(keep, valid.shape)  # the post-condition: one flag per image entry
  return state, keep


def init_decode(name: str, valid, **options):
  """The state of decode policy `name` before the first decoding step (`DecodePolicy.init`)."""
  if name not in DECODE_POLICIES:
    raise ValueError(f"unknown decode policy {name!r}; known: {sorted(DECODE_POLICIES)}")
  policy = DECODE_POLICIES[name]
  unknown = sorted(set(options) - set(policy.options))
  if unknown:
    raise ValueError(f"decode policy {name!r} takes no option(s) {unknown}; options "
                     f"{sorted(policy.options)}")
  return policy.init(valid, **{k: v for k, v in options.items()
                               if k in inspect.signature(policy.init).parameters})


def _listed(items) -> str:
  return ", ".join(items) or "-"


def _defaults(options) -> list:
  return [f"{k}={v!r}" for k, v in options.items()]


def describe(methods=None) -> str:
  """The registry as a text table, one row per method sorted by name: method, family, stages,
  needs, options with their defaults, token-sharded, paper.

  methods: Method objects (or a {name: Method} dict); None for every registered method.
  """
  if methods is None:
    methods = METHODS
  if isinstance(methods, dict):
    methods = methods.values()
  head = ("method", "family", "stages", "needs", "options", "sharded", "paper")
  rows = [(m.name, m.family, _listed(m.stages), _listed(m.needs), _listed(_defaults(m.options)),
           "yes" if m.token_sharded else "no", m.paper or "-")
          for m in sorted(methods, key=lambda m: m.name)]
  widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
  lines = [head, tuple("-" * w for w in widths)] + rows
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in lines)
