"""Compression plans: which method acts where in the model, validated once, hashable.

A plan is an ordered tuple of `(stage, options)` pairs (DESIGN.md):

  (("vit", {"method": "tome", "r": 8}),                       # ToMe in every ViT block
   ("vit", {"method": "fastervlm", "layer": 12, "budget": 128}),  # select after ViT layer 12
   ("post_vit", {"method": "visionzip", "budget": 64}),        # on the ViT output
   ("post_proj", {"method": "text_relevance", "keep": 0.5}),   # after the projector, with text
   ("llm", {"method": "fastv", "layer": 2, "keep": 0.5}),      # inside the decoder at layer K
   ("llm", {"method": "pyramiddrop", "layers": (2, 4), "ratios": (0.5, 0.25)}),
   ("llm", {"method": "sparsevlm", "layers": (1, 3), "budgets": (96, 48)}))

Stage options (everything else is passed to the method as its own options):
  budget / keep   tokens kept: an int, or a fraction of the tokens present (round, >= 1).
  vit:            "tome": r (int, (r, inflect) or per-layer list), layers ("all" or indices),
                  prop_attn (True). Other methods: layer (ViT layer whose output is reduced;
                  signals come from that layer's attention).
  post_vit/proj:  signal_layer (-2: the ViT layer whose attention / keys are the signals, as
                  VisionZip and FasterVLM use the penultimate layer), seed (for `rng`).
  llm:            layer K (the hidden states entering decoder layer K are pruned), attn_from
                  ("prev": attention of layer K-1, FastV's official signal; "next": layer K's own
                  projections, PyramidDrop's lookahead), seed. Pruning keeps original RoPE
                  positions. "pyramiddrop": layers + ratios (of the image tokens entering the
                  LLM), attention of the last prompt token, attn_from "next". "sparsevlm":
                  layers + budgets (or keeps), SparseVLM raters chosen from the layer-0
                  embeddings, score = mean rater attention (v2.0-style: no recycling, original
                  positions).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import jax

from tcjax.compress.registry import METHODS, STAGES, apply

# Keys every stage reads itself; the rest go to the method.
_STAGE_KEYS = {
    "vit": ("method", "budget", "keep", "layer", "layers", "r", "prop_attn", "seed"),
    "post_vit": ("method", "budget", "keep", "signal_layer", "seed"),
    "post_proj": ("method", "budget", "keep", "signal_layer", "seed"),
    "llm": ("method", "budget", "keep", "budgets", "keeps", "ratios", "layer", "layers",
            "attn_from", "seed"),
}
# Plan-level schedules that are not single `tcjax.compress` methods.
_SCHEDULES = {"vit": ("tome",), "llm": ("pyramiddrop", "sparsevlm")}


def _freeze(v):
  if isinstance(v, Mapping):
    return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
  if isinstance(v, list):
    return tuple(_freeze(x) for x in v)
  return v


def normalize(plan) -> Tuple[Tuple[str, Tuple[Tuple[str, Any], ...]], ...]:
  """Validates a plan and returns its hashable form (options as sorted (key, value) tuples).

  Raises ValueError naming the stage, method or option that is wrong.
  """
  if plan is None:
    return ()
  if not isinstance(plan, (tuple, list)):
    raise ValueError(f"plan must be a tuple of (stage, options) pairs, got {type(plan).__name__}")
  out = []
  for i, entry in enumerate(plan):
    if not isinstance(entry, (tuple, list)) or len(entry) != 2:
      raise ValueError(f"plan[{i}] must be a (stage, options) pair, got {entry!r}")
    stage, opts = entry
    opts = dict(opts)
    if stage not in STAGES:
      raise ValueError(f"plan[{i}]: stage must be one of {STAGES}, got {stage!r}")
    method = opts.get("method")
    if method is None:
      raise ValueError(f"plan[{i}] ({stage}): options need a 'method'")
    if method not in _SCHEDULES.get(stage, ()):
      if method not in METHODS:
        raise ValueError(f"plan[{i}]: unknown method {method!r}; known: {sorted(METHODS)}")
      m = METHODS[method]
      if stage not in m.stages:
        raise ValueError(f"plan[{i}]: method {method!r} acts at stages {m.stages}, not {stage!r}")
      if stage == "llm" and m.family == "merging":
        raise ValueError(f"plan[{i}]: merging method {method!r} cannot prune inside the LLM")
      unknown = sorted(set(opts) - set(_STAGE_KEYS[stage]) - set(m.options))
      if unknown:
        raise ValueError(f"plan[{i}]: method {method!r} at stage {stage!r} takes no option(s) "
                         f"{unknown}; stage keys {_STAGE_KEYS[stage]}, method options "
                         f"{sorted(m.options)}")
      if method != "tome" and "budget" not in opts and "keep" not in opts:
        raise ValueError(f"plan[{i}]: {method!r} needs 'budget' (int) or 'keep' (fraction)")
    out.append((stage, _freeze(opts)))
  return tuple(out)


# Methods that act on every frame of a clip alike (k x k windows of each frame's grid), so a
# clip's result equals the per-frame results stacked: the model runs them frame by frame.
FRAMEWISE = ("pool",)


def per_frame(opts: Mapping[str, Any], frames: int, where: str) -> Dict[str, Any]:
  """A clip-level entry of a FRAMEWISE method as the entry for one of its `frames` frames."""
  opts = dict(opts)
  if "budget" in opts:
    if opts["budget"] % frames:
      raise ValueError(f"{where}: {opts['method']} budget {opts['budget']} must split evenly "
                       f"over the {frames} frames")
    opts["budget"] //= frames
  return opts


def entries(plan, stage: str):
  """[(index, options dict)] of the plan's entries at `stage`, in plan order."""
  return [(i, dict(o)) for i, (s, o) in enumerate(plan) if s == stage]


def budget(opts: Mapping[str, Any], n: int, where: str) -> int:
  """Static number of tokens to keep out of `n`, from 'budget' (int) or 'keep' (fraction)."""
  if "budget" in opts:
    b = opts["budget"]
    if isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= n:
      raise ValueError(f"{where}: budget must be an int in [1, {n}], got {b!r}")
    return b
  keep = opts.get("keep")
  if not isinstance(keep, (int, float)) or not 0 < keep <= 1:
    raise ValueError(f"{where}: keep must be a fraction in (0, 1], got {keep!r}")
  return max(1, min(n, int(round(keep * n))))


def method_options(opts: Mapping[str, Any], stage: str) -> Dict[str, Any]:
  """The options meant for the method itself (stage keys removed)."""
  return {k: v for k, v in opts.items() if k not in _STAGE_KEYS[stage]}


def resolve_layer(layer, depth: int, where: str) -> int:
  """A layer index in [0, depth), negative indices counted from the end."""
  if isinstance(layer, bool) or not isinstance(layer, int) or not -depth <= layer < depth:
    raise ValueError(f"{where}: layer must be an int in [-{depth}, {depth}), got {layer!r}")
  return layer % depth


@dataclasses.dataclass(frozen=True)
class LLMHook:
  """One pruning step at the input of decoder layer `layer`.

  method: a `tcjax.compress` method; size: ("budget", n) / ("keep", f) of the current image
  tokens / ("of_initial", f) of the image tokens entering the LLM; attn_from: "prev" / "next";
  query: which prompt rows score (the method's `query` option for fastv); raters: SparseVLM
  rater selection; options: the method's own options; seed: for `rng`.
  """

  layer: int
  method: str
  size: Tuple[str, Any]
  attn_from: str = "prev"
  raters: bool = False
  options: Tuple[Tuple[str, Any], ...] = ()
  seed: int = 0


def llm_hooks(plan, depth: int) -> Tuple[LLMHook, ...]:
  """The plan's decoder-stage entries expanded into per-layer hooks, sorted by layer."""
  hooks = []
  for i, opts in entries(plan, "llm"):
    where = f"plan[{i}] (llm, {opts['method']})"
    method, seed = opts["method"], opts.get("seed", 0)
    attn_from = opts.get("attn_from")
    if attn_from not in (None, "prev", "next"):
      raise ValueError(f"{where}: attn_from must be 'prev' or 'next', got {attn_from!r}")
    if method in ("pyramiddrop", "sparsevlm"):
      layers = opts.get("layers")
      sizes = {"pyramiddrop": ("ratios",), "sparsevlm": ("budgets", "keeps")}[method]
      key = next((k for k in sizes if k in opts), None)
      if not isinstance(layers, (tuple, list)) or not layers or key is None:
        raise ValueError(f"{where}: needs 'layers' (a tuple) and one of {sizes}")
      values = opts[key]
      if not isinstance(values, (tuple, list)) or len(values) != len(layers):
        raise ValueError(f"{where}: '{key}' needs one value per layer in {layers}")
      if list(layers) != sorted(set(layers)):
        raise ValueError(f"{where}: layers must be strictly increasing, got {layers}")
      kind = {"ratios": "of_initial", "budgets": "budget", "keeps": "keep"}[key]
      for layer, v in zip(layers, values):
        k = resolve_layer(layer, depth, where)
        if method == "pyramiddrop":
          hooks.append(LLMHook(k, "fastv", (kind, v), attn_from or "next",
                               options=(("query", "last"),), seed=seed))
        else:
          hooks.append(LLMHook(k, "fastv", (kind, v), attn_from or "prev", raters=True,
                               options=(("query", "mean"),), seed=seed))
      continue
    if "layer" not in opts:
      raise ValueError(f"{where}: needs 'layer' (the decoder layer whose input is pruned)")
    k = resolve_layer(opts["layer"], depth, where)
    size = ("budget", opts["budget"]) if "budget" in opts else ("keep", opts["keep"])
    hooks.append(LLMHook(k, method, size, attn_from or "prev",
                         options=tuple(sorted(method_options(opts, "llm").items())), seed=seed))
  hooks.sort(key=lambda h: h.layer)  # stable: plan order within a layer
  for h in hooks:
    if h.attn_from == "prev" and h.layer == 0 and _needs_layer_signal(h.method):
      raise ValueError(f"llm {h.method} at layer 0 has no previous layer's attention or keys;"
                       " use attn_from='next' or layer >= 1")
  return tuple(hooks)


def _needs_layer_signal(method: str) -> bool:
  return bool({"attn", "keys", "scores"} & set(METHODS[method].needs))


def hook_size(hook: LLMHook, n_now: int, n_initial: int, where: str) -> int:
  kind, v = hook.size
  if kind == "of_initial":
    if not isinstance(v, (int, float)) or not 0 < v <= 1:
      raise ValueError(f"{where}: ratio must be in (0, 1], got {v!r}")
    return max(1, min(n_now, int(n_initial * v)))
  return budget({kind: v}, n_now, where)


def tome_schedule(plan, depth: int) -> Tuple[Tuple[int, ...], bool]:
  """(r merged in each ViT layer, proportional attention on) from the plan's ToMe entries."""
  r = [0] * depth
  prop = True
  for i, opts in entries(plan, "vit"):
    if opts["method"] != "tome":
      continue
    from tcjax.compress import tome as tome_lib  # pylint: disable=g-import-not-at-top
    sched = tome_lib.r_schedule(opts.get("r", 0), depth)
    layers = opts.get("layers", "all")
    if layers == "all":
      layers = range(depth)
    elif not isinstance(layers, (tuple, list)):
      raise ValueError(f"plan[{i}] (vit, tome): layers must be 'all' or a tuple of indices")
    for l in layers:
      l = resolve_layer(l, depth, f"plan[{i}] (vit, tome)")
      r[l] += sched[l]
    prop = bool(opts.get("prop_attn", True))
  return tuple(r), prop


def vit_selections(plan, depth: int) -> Dict[int, list]:
  """{layer: [(index, options)]} of non-ToMe ViT-stage entries, acting after that layer."""
  out: Dict[int, list] = {}
  for i, opts in entries(plan, "vit"):
    if opts["method"] == "tome":
      continue
    if "layer" not in opts:
      raise ValueError(f"plan[{i}] (vit, {opts['method']}): needs 'layer' (the ViT layer whose "
                       "output is reduced)")
    out.setdefault(resolve_layer(opts["layer"], depth, f"plan[{i}]"), []).append((i, opts))
  return out


def needed_signals(plan, stages: Sequence[str]):
  """Union of the signals the methods at `stages` need."""
  need = set()
  for stage in stages:
    for _, opts in entries(plan, stage):
      if opts["method"] in METHODS:
        need |= set(METHODS[opts["method"]].needs)
  return need


def signal_layer(plan, depth: int) -> Optional[int]:
  """The ViT layer whose attention / keys feed the post-ViT stages (None if none needs them)."""
  if not needed_signals(plan, ("post_vit", "post_proj")) & {"attn", "keys", "scores"}:
    return None
  layers = {opts.get("signal_layer", -2) for st in ("post_vit", "post_proj")
            for _, opts in entries(plan, st)}
  if len(layers) != 1:
    raise ValueError(f"post-ViT stages ask for signals of different ViT layers {sorted(layers)}")
  return resolve_layer(layers.pop(), depth, "signal_layer")


def run_entry(opts, tokens, signals, stage: str, where: str, rng_seed: int = 0):
  """Runs one plan entry's method on `tokens` (a `tcjax.Tokens`), passing the signals it needs
  and the optional ones it accepts from `signals` (what the model computed at that point).

  Raises ValueError naming the entry when a needed signal is not available at `stage`.
  """
  method = METHODS[opts["method"]]
  n = budget(opts, tokens.num_tokens, where)
  kw = dict(method_options(opts, stage))
  for s in method.needs:
    if s == "rng":
      kw["rng"] = jax.random.key(opts.get("seed", rng_seed))
    elif s not in signals:
      raise ValueError(f"{where}: needs signal {s!r}, which the model cannot provide at stage "
                       f"{stage!r}")
  kw.update({s: v for s, v in signals.items() if s in method.accepts and s not in kw})
  return apply(method.name, tokens, n, **kw)


def describe(plan) -> str:
  """A plan as text, one line per entry in plan order: "stage: method(budget=..., option=...)"
  (budget / keep first, then the other options as given). Raw or `normalize`d plans alike."""
  if not plan:
    return "(no compression)"
  lines = []
  for stage, opts in plan:
    opts = dict(opts)
    method = opts.pop("method", "?")
    first = [k for k in ("budget", "keep") if k in opts]
    keys = first + [k for k in opts if k not in first]
    lines.append(f"{stage}: {method}({', '.join(f'{k}={opts[k]!r}' for k in keys)})")
  return "\n".join(lines)
