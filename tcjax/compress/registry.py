"""The method registry: `METHODS[name]` describes a method, `apply(name, ...)` runs it."""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import Any, Callable, Dict, Tuple

import chex

FAMILIES = ("sampling", "merging", "pooling", "cross_modal")
STAGES = ("vit", "post_vit", "post_proj", "llm")
# What each signal holds at each stage: docs/architecture.md. `keys` is the head-mean in the ViT
# and the heads concatenated in the decoder; `keys_heads` keeps the head axis everywhere, so a
# method reduces the heads as its official code does. `attn_heads` (the decoder's prompt-row
# attention per head) and `rope_logits` (the RoPE term of those logits) exist in the decoder.
SIGNALS = ("scores", "attn", "attn_heads", "rope_logits", "keys", "keys_heads", "text",
           "text_mask", "text_keys", "rng", "vit_scores", "image_count")
# `vit_scores` (llm stage, float32[B, N]): the ViT's mean received attention at the entry's
# `signal_layer`, read for each image token at the ViT output token carrying its origin patch
# (MustDrop's key set); `image_count` (llm stage, int32[B]): the valid image tokens entering the
# decoder, before any llm-stage step. The model computes either only when an entry needs it.
# How the decoder serves an llm-stage method (`register(llm_attn=, llm_kv=)`):
#   llm_attn  "model": attention signals are the layer's own softmax (RoPE, prefix-LM mask);
#             "raw": softmax of q k^T before RoPE over every valid token, no mask (PruneVid).
#   llm_kv    "after": the layers from K on cache only the kept tokens (FastV);
#             "all": the pruned tokens also leave the caches of layers < K (PruneVid), so
#             decoding attends to the kept tokens only, in every layer.
LLM_ATTN = ("model", "raw")
LLM_KV = ("after", "all")

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


METHODS: Dict[str, Method] = {}


def register(name: str, *, family: str, stages: Tuple[str, ...], needs: Tuple[str, ...] = (),
             paper: str = "", token_sharded: bool = False, llm_attn: str = "model",
             llm_kv: str = "after", keeps_none: bool = False):
  """Decorator adding a method function to METHODS (see `Method` for the fields)."""
  if llm_attn not in LLM_ATTN or llm_kv not in LLM_KV:
    raise ValueError(f"llm_attn must be one of {LLM_ATTN} and llm_kv one of {LLM_KV}, got "
                     f"{llm_attn!r}, {llm_kv!r}")
  if family not in FAMILIES:
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
  if not set(stages) <= set(STAGES):
    raise ValueError(f"stages must be a subset of {STAGES}, got {stages}")
  if not set(needs) <= set(SIGNALS):
    raise ValueError(f"needs must be a subset of {SIGNALS}, got {needs}")

  def wrap(fn):
    if name in METHODS:
      raise ValueError(f"method {name!r} registered twice")
    params = inspect.signature(fn).parameters
    options = {k: p.default for k, p in params.items()
               if p.kind is p.KEYWORD_ONLY and k not in SIGNALS}

    @functools.wraps(fn)
    def checked(tokens, budget, *args, **kwargs):
      out = fn(tokens, budget, *args, **kwargs)
      _check_output(out, tokens, budget)
      return out

    METHODS[name] = Method(name, checked, family, tuple(stages), tuple(needs), options, paper,
                           token_sharded, llm_attn, llm_kv, bool(keeps_none))
    return checked

  return wrap


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
