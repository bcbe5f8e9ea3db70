"""Compression plans: which method acts where in the model, validated once, hashable.

A plan is an ordered tuple of `(stage, options)` pairs (docs/architecture.md):

  (("vit", {"method": "tome", "r": 8}),                       # ToMe in every ViT block
   ("vit", {"method": "fastervlm", "layer": 12, "budget": 128}),  # select after ViT layer 12
   ("post_vit", {"method": "visionzip", "budget": 64}),        # on the ViT output
   ("post_proj", {"method": "text_relevance", "keep": 0.5}),   # after the projector, with text
   ("llm", {"method": "fastv", "layer": 2, "keep": 0.5}),      # inside the decoder at layer K
   ("llm", {"method": "pyramiddrop", "layers": (2, 4), "ratios": (0.5, 0.25)}),
   ("llm", {"method": "sparsevlm", "layers": (1, 3), "budgets": (96, 48)}),
   ("decode", {"method": "dycoke", "layer": 3, "prune": 0.8}))  # KV policy while decoding

Entry options of a `tcjax.compress` method (every other key is one of the method's own options):
  budget / keep   tokens kept: an int, or a fraction of the tokens present (round, >= 1); exactly
                  one of them.
  signals         the optional signals the method gets (below).
  seed            PRNG seed, for methods that take `rng`.
  vit:            layer (the ViT layer whose output is reduced; signals come from that layer's
                  attention).
  post_vit/proj:  signal_layer (the ViT layer whose attention / keys are the signals), for
                  methods that use them; default the method's `signal_layer` (-2, the
                  penultimate layer, as VisionZip and FasterVLM, unless it registers
                  another). Entries may read different layers: the ViT provides the signals
                  of each.
  llm:            layer K (the hidden states entering decoder layer K are pruned, or merged by
                  a merging method), attn_from ("prev": attention / keys of layer K-1, the
                  official signal of FastV and DART; "next": layer K's own projections,
                  PyramidDrop's lookahead), for methods that use a layer's attention or keys;
                  positions ("original": the survivors keep their RoPE positions; "reindex":
                  they are renumbered 0..n-1 and decoding continues from the cache length;
                  default: the method's official choice, `Method.llm_positions` - "original"
                  for every single method but mustdrop). What the decoder computes for it the
                  method declares in its registration (`register(llm_attn=, llm_kv=,
                  llm_features=, llm_signals=, llm_rows=)`, `LLMHook`).
                  An entry whose method takes `vit_scores` (MustDrop) also reads signal_layer:
                  the ViT layer whose received attention gives the scores (default
                  the method's `signal_layer`).
Decode-time KV policies (`compress.registry.DECODE_POLICIES`: dycoke, mustdrop) at the decode
stage: method, layer L (the layers >= L attend only the image entries the policy keeps at each
decoding step; a policy reading attention reads layer L - 1's, so L >= 1) and the policy's own
options; no budget. `decode_hooks` expands them; the model carries them in the KV cache.
Learned compressors (`tcjax.nn.learned.LEARNED`: tokenlearner, perceiver, qformer, ldpv2) at
post_vit / post_proj: method, budget (an int), name (their parameter subtree
`compressor/<name>`, default "<stage>_<method>_<budget>") and the module's options; the model
runs the module (`PaliGemma` declares it when the plan names it).
Schedules (plan-level, not single methods):
  vit "tome":     r (int, (r, inflect) or per-layer list), layers ("all" or indices), prop_attn
                  (True); ToMe between attention and MLP of those ViT blocks.
  llm:            the multi-layer schedules methods register (`compress.registry.SCHEDULES`,
                  `register_schedule`): layers + one of the schedule's size keys (one value
                  per layer), attn_from (default: the schedule's), positions (default: its
                  official one) and the step method's options the schedule lets through; one
                  step of its method per listed layer (`llm_hooks`), sized by the schedule's own
                  function. Built in:
    "pyramiddrop" (`compress/pyramiddrop.py`): layers + ratios (of the image tokens entering
                  the LLM), FastV steps on the last prompt token's attention, attn_from
                  ("next"), positions ("reindex", official; "original").
    "sparsevlm"   (`compress/sparsevlm.py`): layers + budgets (or keeps: fractions of the
                  tokens present), one `compress.sparsevlm` step per layer on the attention of
                  layer - 1 (attn_from "prev": official pruning_loc l is layer l + 1), raters
                  chosen once from the decoder's input embeddings (`Method.llm_rows`); a budget
                  is what the official lists hold, the tokens kept by score (at most the tokens
                  present - 1), and v1.5's recycled clusters come on top
                  (`sparsevlm.output_size`); the method's own options: version ("v1.5",
                  official default; "v2.0"), heads (v2.0's priority heads, 14); positions
                  (default the version's official one: v1.5 "reindex", v2.0 "original").

Signals. A method always gets the signals it needs (`METHODS[name].needs`). Its optional signals
(`Method.optional`) change what it computes, so the entry chooses them: "signals" names the
optional signals to pass, e.g. `("post_vit", {"method": "vispruner", "budget": 64, "signals":
("keys",)})` de-duplicates on the ViT's head-mean keys instead of the features (official
VisPruner; DivPrune alike). Without "signals" an entry passes the method's `default_signals`
(`register(default_signals=)`) where the stage has them - the optional inputs the official method
uses: DART's text pivots, ranked by the text keys, and FastV's mask of valid prompt rows - and no
other; `"signals": ()` passes none. Signals are named by the method's arguments; each signal name
means one thing at every stage (`compress.registry.SIGNALS`), and in the decoder a method's
registration may feed an argument from another signal (`Method.llm_signals`: DART's `keys` are
the `keys_concat`, heads concatenated, as its official code). STAGE_SIGNALS says what each stage
can provide (post_proj has text only when the model is called with text); naming a signal the
stage can never provide is an error.

Validation. `normalize` (run whenever a PaliGemmaConfig is built) refuses any key an entry's
method or schedule does not read, checks the type of every plan option and of every method
option whose default is a bool, an int or a float, the value of every option with fixed choices
(`compress.registry.CHOICES`, attn_from, positions, signals) and the shape of schedules. What depends on
the model (budget <= tokens present, layer < depth) and the range of a method's numeric options
(and the options whose default is None) are checked when the method runs. Every error is a
ValueError naming the entry, `plan[i] (stage, method)`, and the option.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import jax

from tcjax.compress.registry import (DECODE_POLICIES, DECODE_STAGE, METHODS, POSITIONS,
                                     SCHEDULES, SIGNALS, STAGES, apply)
from tcjax.nn import learned

# Signals the model can hand a method at each stage.
STAGE_SIGNALS = {
    "vit": ("scores", "attn", "keys", "keys_heads", "rng"),
    "post_vit": ("scores", "attn", "keys", "keys_heads", "rng"),
    "post_proj": ("scores", "attn", "keys", "keys_heads", "text", "text_mask", "rng"),
    "llm": ("scores", "attn", "attn_heads", "rope_logits", "keys", "keys_concat", "keys_heads",
            "text", "text_normed", "text_mask", "text_keys", "text_keys_concat", "rng",
            "vit_scores", "image_count"),
}
# Every stage a plan entry may name: the Tokens stages, then the decode stage (decode-time KV
# policies, `compress.registry.DECODE_POLICIES`).
PLAN_STAGES = STAGES + (DECODE_STAGE,)
# Signals that come from a layer's attention (the ViT signal layer, decoder layer K-1 or K).
_LAYER_SIGNALS = ("scores", "attn", "attn_heads", "keys", "keys_concat", "keys_heads",
                  "text_keys", "text_keys_concat")
# Keys the plan reads in entries of `tcjax.compress` methods; the others go to the method.
_PLAN_KEYS = ("method", "budget", "keep", "signals", "seed", "layer", "signal_layer", "attn_from",
              "positions")
# The ViT's plan-level schedule (not a single `tcjax.compress` method) and the keys it reads.
# The llm stage's multi-layer schedules are registered by their methods
# (`compress.registry.SCHEDULES`, `register_schedule`).
_VIT_SCHEDULES = {"tome": ("method", "r", "layers", "prop_attn")}
# RoPE positions of the tokens that stay after an llm-stage step (the entry option "positions",
# `compress.registry.POSITIONS`):
#   "original"  each keeps the position it had (pruned tokens leave holes); decoding continues
#               from the last position + 1.
#   "reindex"   the survivors are renumbered 0..n-1 by rank among the valid tokens (image, then
#               text, contiguously) and RoPE uses the new numbers in every later layer; decoding
#               continues in those layers from the number of tokens their cache holds.
# An entry without "positions" follows its method's official code: `Method.llm_positions`
# (`register(llm_positions=)`; mustdrop "reindex") or its schedule's `positions` (pyramiddrop
# "reindex", sparsevlm by version); each method file cites the official code it follows. The
# others keep the original positions in their official code: FastV (pkunlp-icler/FastV,
# `src/transformers/.../llama/modeling_llama.py` and `src/FastV/lmms-eval/fastv_kvcache.py`:
# `position_ids = keep_indexs`), DART (`DART_K_norm` in ZichenWen1/DART's LLaVA model, and the
# llmc port `llmc/compression/token_reduction/dart.py`: the kept indices), VTW (lzhxmu/VTW
# `llava/model/language_model/VTW.py`: `pe_type = "keep"`; its other pe_type is "reindex"),
# keynorm / ViTCoP's deep step (chaser682/ViTCoP `vitcop_modeling_llama.py`: `position_ids =
# all_keep`), holitom_llm (cokeshao/HoliTom `holitom/modeling_qwen2.py`: `keep_indexs`) and
# prunevid_llm (Visual-AI/PruneVid `models/pllava/elastic_cache.py`: `position_ids[:, index_list]`,
# decoding from the unpruned length); methods with no official in-LLM code keep them too.
# How a per-layer ToMe r list is stored (plans freeze lists to tuples, and a tuple r means
# (r, inflect)).
_PER_LAYER = "per_layer"


def _freeze(v):
  if isinstance(v, Mapping):
    return tuple(sorted((k, _freeze(x)) for k, x in v.items()))
  if isinstance(v, list):
    return tuple(_freeze(x) for x in v)
  return v


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_fraction(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1


def normalize(plan) -> Tuple[Tuple[str, Tuple[Tuple[str, Any], ...]], ...]:
  """Validates a plan and returns its hashable form (options as sorted (key, value) tuples).

  Raises ValueError naming the entry and the stage, method or option that is wrong.
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
    if stage not in PLAN_STAGES:
      raise ValueError(f"plan[{i}]: stage must be one of {PLAN_STAGES}, got {stage!r}")
    try:
      opts = dict(opts)
    except (TypeError, ValueError):
      raise ValueError(f"plan[{i}] ({stage}): options must be a dict, got {opts!r}") from None
    out.append((stage, _freeze(_check_entry(i, stage, opts))))
  learned.check_keys(out)
  return tuple(out)


def is_schedule(stage: str, method) -> bool:
  """Whether `method` at `stage` is a plan-level schedule rather than a compress method: ToMe
  in the ViT, a registered multi-layer schedule (`compress.registry.SCHEDULES`) in the decoder."""
  if stage == "vit":
    return method in _VIT_SCHEDULES
  return stage == "llm" and method in SCHEDULES


def _feeds(m, stage: str, argument: str) -> str:
  """The signal of `stage` that feeds the method's `argument` (`Method.llm_signals` in the
  decoder; elsewhere the signal of that name)."""
  return m.llm_signal(argument) if stage == "llm" else argument


def _check_entry(i: int, stage: str, opts: Dict[str, Any]) -> Dict[str, Any]:
  """The entry's options, checked (ValueError otherwise); a ToMe r list in its stored form."""
  method = opts.get("method")
  if method is None:
    raise ValueError(f"plan[{i}] ({stage}): options need a 'method'")
  where = f"plan[{i}] ({stage}, {method})"
  if stage == DECODE_STAGE:
    return _check_decode_entry(i, where, method, opts)
  if isinstance(method, str) and is_schedule(stage, method):
    if stage == "vit":
      _check_keys(where, opts, _VIT_SCHEDULES[method])
      return _check_tome(where, opts)
    sched = SCHEDULES[method]
    _check_keys(where, opts, ("method", "layers", *sched.sizes, "attn_from", "positions",
                              *sched.options))
    _check_llm_schedule(where, sched, opts)
    _check_method_options(where, METHODS[sched.step], opts)  # the step method's own options
    return opts
  if isinstance(method, str) and method in learned.LEARNED:
    if stage not in learned.STAGES:
      raise ValueError(f"{where}: learned compressor {method!r} acts at stages "
                       f"{learned.LEARNED[method].stages}, not {stage!r}")
    return learned.check_entry(where, stage, opts)
  if not isinstance(method, str) or method not in METHODS:
    raise ValueError(f"plan[{i}] ({stage}): unknown method {method!r}; known: {sorted(METHODS)}"
                     f"; learned compressors: {sorted(learned.LEARNED)}")
  m = METHODS[method]
  if stage not in m.stages:
    raise ValueError(f"{where}: method {method!r} acts at stages {m.stages}, not {stage!r}")
  missing = [s for s in m.needs if _feeds(m, stage, s) not in STAGE_SIGNALS[stage]]
  if missing:
    raise ValueError(f"{where}: needs signal(s) {missing}, which stage {stage!r} cannot provide")
  if "signals" in opts:
    names = opts["signals"]
    if isinstance(names, str) or not isinstance(names, (tuple, list)):
      raise ValueError(f"{where}: signals must be a tuple of signal names, got {names!r}")
    for s in names:
      if s not in m.optional + m.needs:
        raise ValueError(f"{where}: signals: {method!r} takes no signal {s!r}; its optional "
                         f"signals are {list(m.optional)}")
      if _feeds(m, stage, s) not in STAGE_SIGNALS[stage]:
        raise ValueError(f"{where}: signals: stage {stage!r} cannot provide {s!r}; it has "
                         f"{list(STAGE_SIGNALS[stage])}")
  used = {_feeds(m, stage, s) for s in sum(entry_signals(opts, stage), ())}
  allowed = {"method", "budget", "keep", "signals", *m.options}
  if stage in ("vit", "llm"):
    allowed.add("layer")
  if stage == "llm":
    allowed.add("positions")
  if "rng" in used:
    allowed.add("seed")
  if used & set(_LAYER_SIGNALS) and stage in ("post_vit", "post_proj"):
    allowed.add("signal_layer")
  if used & set(_LAYER_SIGNALS) and stage == "llm":
    allowed.add("attn_from")
  if "vit_scores" in used and stage == "llm":  # the ViT layer whose attention gives the scores
    allowed.add("signal_layer")
  _check_keys(where, opts, allowed)
  if ("budget" in opts) == ("keep" in opts):
    raise ValueError(f"{where}: needs exactly one of 'budget' (int) or 'keep' (fraction)")
  if "budget" in opts and (not _is_int(opts["budget"]) or opts["budget"] < 1):
    raise ValueError(f"{where}: budget must be a positive int, got {opts['budget']!r}")
  if "keep" in opts and not _is_fraction(opts["keep"]):
    raise ValueError(f"{where}: keep must be a fraction in (0, 1], got {opts['keep']!r}")
  if stage in ("vit", "llm") and "layer" not in opts:
    raise ValueError(f"{where}: needs 'layer' (the {'ViT' if stage == 'vit' else 'decoder'} "
                     "layer whose " + ("output" if stage == "vit" else "input") + " is reduced)")
  for key in ("layer", "signal_layer", "seed"):
    if key in opts and not _is_int(opts[key]):
      raise ValueError(f"{where}: {key} must be an int, got {opts[key]!r}")
  _check_attn_from(where, opts)
  _check_positions(where, opts)
  _check_method_options(where, m, opts)
  return opts


def _check_decode_entry(i: int, where: str, method, opts: Dict[str, Any]) -> Dict[str, Any]:
  """A decode-stage entry: a registered decode policy, its decoder layer, its own options."""
  if not isinstance(method, str) or method not in DECODE_POLICIES:
    raise ValueError(f"plan[{i}] ({DECODE_STAGE}): unknown decode policy {method!r}; known: "
                     f"{sorted(DECODE_POLICIES)}")
  policy = DECODE_POLICIES[method]
  _check_keys(where, opts, {"method", "layer", *policy.options})
  if "layer" not in opts:
    raise ValueError(f"{where}: needs 'layer' (the first decoder layer whose attention to the "
                     "image entries of the KV cache the policy restricts)")
  if not _is_int(opts["layer"]):
    raise ValueError(f"{where}: layer must be an int, got {opts['layer']!r}")
  _check_method_options(where, policy, opts)
  return opts


def _check_method_options(where: str, m, opts) -> None:
  """The method's own options in `opts`: fixed choices (CHOICES), the type of the default (bool,
  int or float), and for an option whose default is None, None or its OPTIONAL_TYPES kind (its
  range is the method's to check when called)."""
  for key, values in m.choices.items():
    if key in opts and opts[key] not in values:
      raise ValueError(f"{where}: {key} must be one of {values}, got {opts[key]!r}")
  kinds = {"bool": False, "int": 0, "float": 0.0}
  for key, default in m.options.items():
    if key not in opts:
      continue
    v = opts[key]
    if default is None:
      if v is None:
        continue
      kind = m.optional_types.get(key)
      if kind is None:  # not declared (tests/test_plan_options.py wants every one declared)
        continue
      default = kinds[kind]
    if isinstance(default, bool) and not isinstance(v, bool):
      raise ValueError(f"{where}: {key} must be True or False, got {v!r}")
    if _is_int(default) and not _is_int(v):
      raise ValueError(f"{where}: {key} must be an int, got {v!r}")
    if isinstance(default, float) and (isinstance(v, bool) or not isinstance(v, (int, float))):
      raise ValueError(f"{where}: {key} must be a number, got {v!r}")


def _check_keys(where: str, opts, allowed) -> None:
  unknown = [k for k in opts if k not in allowed]
  if unknown:
    raise ValueError(f"{where}: unknown option(s) {unknown}; this entry takes "
                     f"{sorted(allowed)}")


def _check_attn_from(where: str, opts) -> None:
  if opts.get("attn_from", "prev") not in ("prev", "next"):
    raise ValueError(f"{where}: attn_from must be 'prev' or 'next', got {opts['attn_from']!r}")


def _check_positions(where: str, opts) -> None:
  if "positions" in opts and opts["positions"] not in POSITIONS:
    raise ValueError(f"{where}: positions must be one of {POSITIONS}, got {opts['positions']!r}")


def entry_positions(opts: Mapping[str, Any]) -> str:
  """The RoPE positions policy of an llm-stage entry (POSITIONS): its "positions", else the
  official one of its schedule (`Schedule.positions`, SparseVLM's by version) or method
  (`Method.llm_positions`)."""
  if "positions" in opts:
    return opts["positions"]
  if is_schedule("llm", opts["method"]):
    return SCHEDULES[opts["method"]].official_positions(dict(opts))
  return METHODS[opts["method"]].llm_positions


def _check_tome(where: str, opts: Dict[str, Any]) -> Dict[str, Any]:
  r = opts.get("r", 0)
  stored = isinstance(r, tuple) and len(r) == 2 and r[0] == _PER_LAYER
  if isinstance(r, list) or stored:
    values = list(r[1]) if stored else r
    if not all(_is_int(v) and v >= 0 for v in values):
      raise ValueError(f"{where}: r as a list must hold non-negative ints, got {r!r}")
    opts = dict(opts, r=(_PER_LAYER, tuple(values)))
  elif isinstance(r, tuple):
    if len(r) != 2 or not _is_int(r[0]) or r[0] < 0 or isinstance(r[1], bool) \
        or not isinstance(r[1], (int, float)):
      raise ValueError(f"{where}: r as a tuple must be (r, inflect), got {r!r}")
  elif not _is_int(r) or r < 0:
    raise ValueError(f"{where}: r must be a non-negative int, (r, inflect) or a list of "
                     f"per-layer values, got {r!r}")
  layers = opts.get("layers", "all")
  if layers != "all" and (not isinstance(layers, (tuple, list)) or not layers
                          or not all(_is_int(l) for l in layers)):
    raise ValueError(f"{where}: layers must be 'all' or a tuple of layer indices, got {layers!r}")
  if not isinstance(opts.get("prop_attn", True), bool):
    raise ValueError(f"{where}: prop_attn must be True or False, got {opts['prop_attn']!r}")
  return opts


def _check_llm_schedule(where: str, sched, opts) -> None:
  """A registered schedule's entry: increasing int `layers` and exactly one of its size keys,
  one value per layer, of the key's kind (`Schedule.sizes`)."""
  sizes = tuple(sched.sizes)
  given = [k for k in sizes if k in opts]
  layers = opts.get("layers")
  if not isinstance(layers, (tuple, list)) or not layers or len(given) != 1:
    raise ValueError(f"{where}: needs 'layers' (a tuple) and exactly one of {sizes}")
  if not all(_is_int(l) for l in layers):
    raise ValueError(f"{where}: layers must be ints, got {layers!r}")
  if list(layers) != sorted(set(layers)):
    raise ValueError(f"{where}: layers must be strictly increasing, got {layers!r}")
  key = given[0]
  values = opts[key]
  if not isinstance(values, (tuple, list)) or len(values) != len(layers):
    raise ValueError(f"{where}: '{key}' needs one value per layer in {tuple(layers)}")
  count = sched.sizes[key] == "count"
  ok = (lambda v: _is_int(v) and v >= 1) if count else _is_fraction
  if not all(ok(v) for v in values):
    kind = "positive ints" if count else "fractions in (0, 1]"
    raise ValueError(f"{where}: {key} must be {kind}, got {values!r}")
  _check_attn_from(where, opts)
  _check_positions(where, opts)


def entry_signals(opts: Mapping[str, Any], stage: str) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
  """(signals the entry's method must get, optional ones it gets where the model has them).

  Signals are named by the method's arguments (at the llm stage `Method.llm_signals` says which
  decoder signal feeds each). The method's needs and the signals the entry names in "signals"
  must be there; an entry without "signals" passes the method's `default_signals` that `stage`
  provides, when present.
  """
  if stage in learned.STAGES and learned.is_learned(opts):  # a module: its options decide
    return learned.LEARNED[opts["method"]].needs(opts, stage), ()
  m = METHODS[opts["method"]]
  if "signals" in opts:
    return tuple(s for s in SIGNALS if s in m.needs or s in opts["signals"]), ()
  maybe = tuple(s for s in m.default_signals
                if _feeds(m, stage, s) in STAGE_SIGNALS[stage] and s not in m.needs)
  return tuple(m.needs), maybe


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
    if not _is_int(b) or not 1 <= b <= n:
      raise ValueError(f"{where}: budget must be an int in [1, {n}], got {b!r}")
    return b
  keep = opts.get("keep")
  if not _is_fraction(keep):
    raise ValueError(f"{where}: keep must be a fraction in (0, 1], got {keep!r}")
  return max(1, min(n, int(round(keep * n))))


def method_options(opts: Mapping[str, Any]) -> Dict[str, Any]:
  """The options meant for the method itself (the plan's own keys removed)."""
  return {k: v for k, v in opts.items() if k not in _PLAN_KEYS}


def resolve_layer(layer, depth: int, where: str) -> int:
  """A layer index in [0, depth), negative indices counted from the end."""
  if not _is_int(layer) or not -depth <= layer < depth:
    raise ValueError(f"{where}: layer must be an int in [-{depth}, {depth}), got {layer!r}")
  return layer % depth


@dataclasses.dataclass(frozen=True)
class LLMHook:
  """One pruning step at the input of decoder layer `layer`: everything the decoder needs to
  serve it, read off the method's registration (the model knows no method by name).

  method: a `tcjax.compress` method; size: ("budget", n) / ("keep", f) of the current image
  tokens, or (size key, value) of its `schedule`, sized by `Schedule.size`; schedule: the
  registered schedule this step belongs to (`compress.registry.SCHEDULES`), None for a single
  method; attn_from: "prev" / "next"; options: the method's own options (e.g. fastv's `query`:
  which prompt rows score); signals: the method's signal arguments it gets (`entry_signals`);
  sources: the decoder signal feeding each of them (`Method.llm_signals`, same order); seed:
  for `rng`; attn, kv: how the decoder computes its attention signals and which caches drop the
  pruned tokens (`Method.llm_attn` / `llm_kv`); features: what `tokens.x` holds
  (`Method.llm_features`); rows: the method's text-row function (`Method.llm_rows`, SparseVLM's
  raters) or None; positions: the survivors' RoPE positions in the layers from `layer` on
  (POSITIONS, `entry_positions`); vit_layer: the ViT layer of its `vit_scores` as the entry
  names it (`signal_layer`, may be negative; the model resolves it), None when it takes none.
  """

  layer: int
  method: str
  size: Tuple[str, Any]
  attn_from: str = "prev"
  options: Tuple[Tuple[str, Any], ...] = ()
  signals: Tuple[str, ...] = ()
  seed: int = 0
  attn: str = "model"
  kv: str = "after"
  positions: str = "original"
  vit_layer: Optional[int] = None
  schedule: Optional[str] = None
  sources: Tuple[str, ...] = ()
  features: str = "hidden"
  rows: Optional[Callable[..., Any]] = None


def llm_hooks(plan, depth: int) -> Tuple[LLMHook, ...]:
  """The (normalized) plan's decoder-stage entries expanded into per-layer hooks, by layer.

  One path for every entry: a single method is one step (`layer`, `budget` / `keep`); a
  registered schedule one step of its method per listed layer, sized by its size key."""
  hooks = []
  for i, opts in entries(plan, "llm"):
    name = opts["method"]
    where = f"plan[{i}] (llm, {name})"
    positions = entry_positions(opts)
    vit_layer = None
    if is_schedule("llm", name):
      sched = SCHEDULES[name]
      m = METHODS[sched.step]
      key = next(k for k in sched.sizes if k in opts)
      steps = [(layer, (key, v)) for layer, v in zip(opts["layers"], opts[key])]
      options = {**sched.fixed, **{k: v for k, v in opts.items() if k in sched.options}}
      signals = sched.step_signals(options)
      attn_from = opts.get("attn_from", sched.attn_from)
      seed = 0
    else:
      sched, m = None, METHODS[name]
      must, maybe = entry_signals(opts, "llm")  # the decoder provides every signal
      signals = must + maybe
      steps = [(opts["layer"], ("budget", opts["budget"]) if "budget" in opts
                else ("keep", opts["keep"]))]
      options = method_options(opts)
      attn_from = opts.get("attn_from", "prev")
      seed = opts.get("seed", 0)
      if "vit_scores" in signals:
        vit_layer = opts.get("signal_layer", m.signal_layer)
    for layer, size in steps:
      hooks.append(LLMHook(
          resolve_layer(layer, depth, where), m.name, size, attn_from,
          options=tuple(sorted(options.items())), signals=tuple(signals), seed=seed,
          attn=m.llm_attn, kv=m.llm_kv, positions=positions, vit_layer=vit_layer,
          schedule=None if sched is None else sched.name,
          sources=tuple(m.llm_signal(s) for s in signals), features=m.llm_features,
          rows=m.llm_rows))
  hooks.sort(key=lambda h: h.layer)  # stable: plan order within a layer
  for h in hooks:
    if h.attn_from == "prev" and h.layer == 0 and set(h.sources) & set(_LAYER_SIGNALS):
      raise ValueError(f"llm {h.method} at layer 0 has no previous layer's attention or keys;"
                       " use attn_from='next' or layer >= 1")
  return tuple(hooks)


@dataclasses.dataclass(frozen=True)
class DecodeHook:
  """A decode-time KV policy (`compress.registry.DECODE_POLICIES`) acting from decoder layer
  `layer` on: at each decoding step the layers >= `layer` attend only the image entries of the
  cache its step keeps. method: the policy's name; options: its own options; signals: the
  decode signals it reads (its `needs`), computed at layer `layer` - 1."""

  layer: int
  method: str
  options: Tuple[Tuple[str, Any], ...] = ()
  signals: Tuple[str, ...] = ()

  @property
  def signal_layer(self) -> int:
    """The layer whose cache holds the image entries the policy sees (its attention for
    `attn`): layer - 1, or 0 for a policy at layer 0 (which may not read attention)."""
    return max(self.layer - 1, 0)


def decode_hooks(plan, depth: int) -> Tuple[DecodeHook, ...]:
  """The (normalized) plan's decode-stage entries as DecodeHooks, sorted by layer (stable)."""
  hooks = []
  for i, opts in entries(plan, DECODE_STAGE):
    where = f"plan[{i}] ({DECODE_STAGE}, {opts['method']})"
    policy = DECODE_POLICIES[opts["method"]]
    layer = resolve_layer(opts["layer"], depth, where)
    if layer == 0 and set(policy.needs) & {"attn", "attn_heads"}:
      raise ValueError(f"{where}: a policy reading the attention of layer - 1 needs layer >= 1")
    own = tuple(sorted((k, v) for k, v in opts.items() if k in policy.options))
    hooks.append(DecodeHook(layer, policy.name, own, tuple(policy.needs)))
  hooks.sort(key=lambda h: h.layer)
  return tuple(hooks)


def hook_size(hook: LLMHook, n_now: int, n_initial: int, where: str
              ) -> Tuple[int, Dict[str, Any]]:
  """(tokens the hook keeps out of `n_now`, extra static options for its method): its budget /
  keep, or its schedule's `size` (`n_initial`: the image tokens entering the decoder)."""
  kind, v = hook.size
  if hook.schedule is not None:
    sched = SCHEDULES[hook.schedule]
    try:
      return sched.size(kind, v, n_now, n_initial, sched.step_options(dict(hook.options)))
    except ValueError as err:
      raise ValueError(f"{where}: {err}") from None
  return budget({kind: v}, n_now, where), {}


def tome_schedule(plan, depth: int) -> Tuple[Tuple[int, ...], bool]:
  """(r merged in each ViT layer, proportional attention on) from the plan's ToMe entries."""
  r = [0] * depth
  prop = True
  for i, opts in entries(plan, "vit"):
    if not is_schedule("vit", opts["method"]):
      continue
    from tcjax.compress import tome as tome_lib  # pylint: disable=g-import-not-at-top
    spec = opts.get("r", 0)
    if isinstance(spec, tuple) and len(spec) == 2 and spec[0] == _PER_LAYER:
      spec = list(spec[1])
    sched = tome_lib.r_schedule(spec, depth)
    layers = opts.get("layers", "all")
    for l in range(depth) if layers == "all" else layers:
      l = resolve_layer(l, depth, f"plan[{i}] (vit, tome)")
      r[l] += sched[l]
    prop = bool(opts.get("prop_attn", True))
  return tuple(r), prop


def vit_selections(plan, depth: int) -> Dict[int, list]:
  """{layer: [(index, options)]} of non-ToMe ViT-stage entries, acting after that layer."""
  out: Dict[int, list] = {}
  for i, opts in entries(plan, "vit"):
    if is_schedule("vit", opts["method"]):
      continue
    out.setdefault(resolve_layer(opts["layer"], depth, f"plan[{i}]"), []).append((i, opts))
  return out


def needed_signals(plan, stages: Sequence[str]):
  """Union of the signals the entries at `stages` hand their methods (`entry_signals`)."""
  need = set()
  for stage in stages:
    for _, opts in entries(plan, stage):
      if not is_schedule(stage, opts["method"]):
        need |= set(sum(entry_signals(opts, stage), ()))
  return need


def entry_signal_layer(opts: Mapping[str, Any], stage: str, depth: int) -> Optional[int]:
  """The ViT layer (resolved) whose attention / keys a post_vit / post_proj entry reads, or
  whose mean received attention becomes an llm entry's `vit_scores`: its "signal_layer", else
  the `signal_layer` of its method (`register(signal_layer=)`, -2 unless it registers another);
  None if it reads none."""
  if stage == "llm":
    if is_schedule(stage, opts["method"]) or "vit_scores" not in sum(
        entry_signals(opts, stage), ()):
      return None
  elif stage not in ("post_vit", "post_proj"):
    return None
  elif not set(sum(entry_signals(opts, stage), ())) & set(_LAYER_SIGNALS):
    return None
  layer = opts.get("signal_layer", METHODS[opts["method"]].signal_layer)
  return resolve_layer(layer, depth, "signal_layer")


def signal_layers(plan, depth: int) -> Tuple[int, ...]:
  """The ViT layers (ascending) whose attention / keys feed the post_vit / post_proj entries, and
  whose received attention gives the llm entries' `vit_scores`."""
  layers = {entry_signal_layer(opts, st, depth)
            for st in ("post_vit", "post_proj", "llm") for _, opts in entries(plan, st)}
  return tuple(sorted(layers - {None}))


def vit_score_layers(plan, depth: int) -> Tuple[int, ...]:
  """The ViT layers (ascending, resolved) whose `vit_scores` the llm entries need; () for none."""
  layers = {entry_signal_layer(opts, "llm", depth) for _, opts in entries(plan, "llm")}
  return tuple(sorted(layers - {None}))


def run_entry(opts, tokens, signals, stage: str, where: str, rng_seed: int = 0):
  """Runs one plan entry's method on `tokens` (a `tcjax.Tokens`) with the signals the entry
  passes (`entry_signals`) out of `signals` (what the model computed at that point); `rng` is
  made from the entry's seed (default `rng_seed`).

  Raises ValueError naming the entry when a signal it must pass is not available.
  """
  method = METHODS[opts["method"]]
  n = budget(opts, tokens.num_tokens, where)
  kw = method_options(opts)
  must, maybe = entry_signals(opts, stage)
  for s in must + maybe:
    if s == "rng":
      kw["rng"] = jax.random.key(opts.get("seed", rng_seed))
    elif signals.get(s) is not None:
      kw[s] = signals[s]
    elif s in must:
      raise ValueError(f"{where}: needs signal {s!r}, which the model cannot provide at stage "
                       f"{stage!r}" + (" without text" if s in ("text", "text_mask") else ""))
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
