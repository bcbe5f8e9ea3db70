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
           "text_mask", "text_keys", "rng")
# How the decoder serves an llm-stage method (`register(llm_attn=, llm_kv=)`):
#   llm_attn  "model": attention signals are the layer's own softmax (RoPE, prefix-LM mask);
#             "raw": softmax of q k^T before RoPE over every valid token, no mask (PruneVid).
#   llm_kv    "after": the layers from K on cache only the kept tokens (FastV);
#             "all": the pruned tokens also leave the caches of layers < K (PruneVid), so
#             decoding attends to the kept tokens only, in every layer.
LLM_ATTN = ("model", "raw")
LLM_KV = ("after", "all")

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
