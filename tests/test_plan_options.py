"""Plan options: every key and every fixed-choice value of every method and schedule is checked
when the plan is built, and optional signals reach a method only when the entry asks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tcjax
import tcjax.checkpoints as ckpt
from tcjax import compress
from tcjax.compress import METHODS
from tcjax.compress.registry import CHOICES, OPTIONAL_TYPES, STAGES
from tcjax.nn import GemmaConfig, PaliGemma, PaliGemmaConfig, SiglipConfig, gemma, siglip
from tcjax.nn import plan as plan_lib

from helpers import inputs, make_tokens

LAYER_SIGNALS = {"attn", "attn_heads", "keys", "keys_heads", "scores", "text_keys"}
# Every key the plan itself reads somewhere, with a valid value.
PLAN_KEYS = {"layer": 1, "seed": 3, "signal_layer": 1, "attn_from": "next", "signals": (),
             "r": 2, "layers": (1, 2), "prop_attn": False, "ratios": (0.5, 0.25),
             "budgets": (8, 4), "keeps": (0.5, 0.25), "positions": "reindex"}
SCHEDULES = {
    ("vit", "tome"): {"method": "tome", "r": 2},
    ("llm", "pyramiddrop"): {"method": "pyramiddrop", "layers": (1, 2), "ratios": (0.5, 0.25)},
    ("llm", "sparsevlm"): {"method": "sparsevlm", "layers": (1, 2), "budgets": (8, 4)},
}
SCHEDULE_KEYS = {("vit", "tome"): {"r", "layers", "prop_attn"},
                 ("llm", "pyramiddrop"): {"layers", "ratios", "attn_from", "positions"},
                 ("llm", "sparsevlm"): {"layers", "budgets", "attn_from", "positions", "version",
                                        "heads"}}


def _method_cases():
  return [(stage, name) for name in sorted(METHODS) for stage in METHODS[name].stages
          if not plan_lib.is_schedule(stage, name)]


def _entry(stage, name, **extra):
  opts = {"method": name, "budget": 8}
  if stage in ("vit", "llm"):
    opts["layer"] = 1
  return ((stage, {**opts, **extra}),)


def _fails(plan, *words):
  with pytest.raises(ValueError) as err:
    plan_lib.normalize(plan)
  for w in words:
    assert w in str(err.value), (w, str(err.value))
  return str(err.value)


def _signals_used(stage, name):
  """What an entry without "signals" hands the method: its needs and the defaults the stage has."""
  m = METHODS[name]
  defaults = {"dart": {"text", "text_mask", "text_keys"}, "fastv": {"text_mask"}}.get(name, set())
  return set(m.needs) | (defaults & set(plan_lib.STAGE_SIGNALS[stage]))


@pytest.mark.parametrize("stage, name", _method_cases())
def test_method_entries_take_only_their_options(stage, name):
  m = METHODS[name]
  where = f"plan[0] ({stage}, {name})"
  assert plan_lib.normalize(_entry(stage, name))
  _fails(_entry(stage, name, foo=1), "'foo'", where)
  _fails(_entry(stage, name, version="v9.9"), "'version'", where)
  used = _signals_used(stage, name)
  reads = {"signals"} | ({"layer"} if stage in ("vit", "llm") else set())
  if stage == "llm":
    reads.add("positions")
  if "rng" in used:
    reads.add("seed")
  if used & LAYER_SIGNALS:
    reads |= {"post_vit": {"signal_layer"}, "post_proj": {"signal_layer"},
              "llm": {"attn_from"}}.get(stage, set())
  if "vit_scores" in used and stage == "llm":  # the ViT layer of the scores (MustDrop)
    reads.add("signal_layer")
  for key, value in PLAN_KEYS.items():
    plan = _entry(stage, name, **{key: value})
    if key in reads:
      plan_lib.normalize(plan)
    else:
      _fails(plan, repr(key), where)
  for key, default in m.options.items():  # the method's own options, at their defaults
    if default is not None:
      plan_lib.normalize(_entry(stage, name, **{key: default}))


@pytest.mark.parametrize("stage, name", _method_cases())
def test_method_entry_values(stage, name):
  m = METHODS[name]
  where = f"plan[0] ({stage}, {name})"
  for key, values in m.choices.items():
    for v in values:
      plan_lib.normalize(_entry(stage, name, **{key: v}))
    _fails(_entry(stage, name, **{key: "bogus"}), key, "'bogus'", where)
  for key, default in m.options.items():  # typed by the default: bool, int, float
    if isinstance(default, bool):
      _fails(_entry(stage, name, **{key: 1}), key, where)
    elif isinstance(default, (int, float)):
      for bad in ("1", True, None) + ((1.5,) if isinstance(default, int) else ()):
        _fails(_entry(stage, name, **{key: bad}), key, where)
      plan_lib.normalize(_entry(stage, name, **{key: default + 1}))
    elif default is None:  # None, or a value of its OPTIONAL_TYPES kind
      kind = m.optional_types[key]
      plan_lib.normalize(_entry(stage, name, **{key: None}))
      plan_lib.normalize(_entry(stage, name, **{key: {"int": 2, "float": 0.5, "bool": True}[kind]}))
      for bad in ("1",) + ((1.5, True) if kind == "int" else (True,) if kind == "float" else (1,)):
        _fails(_entry(stage, name, **{key: bad}), key, where)
  for opts, word in [({"budget": 0}, "budget"), ({"budget": 2.5}, "budget"),
                     ({"budget": True}, "budget"), ({"keep": 0}, "keep"), ({"keep": 1.5}, "keep"),
                     ({"keep": 0.5}, "exactly one"), ({"signals": "keys"}, "signals"),
                     ({"signals": ("bogus",)}, "bogus")]:
    _fails(_entry(stage, name, **opts), word, where)
  no_size = dict(_entry(stage, name)[0][1])
  del no_size["budget"]
  _fails(((stage, no_size),), "exactly one", where)
  if stage in ("vit", "llm"):
    no_layer = dict(_entry(stage, name)[0][1])
    del no_layer["layer"]
    _fails(((stage, no_layer),), "'layer'", where)
    _fails(_entry(stage, name, layer="1"), "layer", where)
  if stage == "llm" and _signals_used(stage, name) & LAYER_SIGNALS:
    _fails(_entry(stage, name, attn_from="later"), "attn_from", where)
  if stage == "llm":
    for v in plan_lib.POSITIONS:
      plan_lib.normalize(_entry(stage, name, positions=v))
    _fails(_entry(stage, name, positions="renumber"), "positions", "'renumber'", where)
  for s in m.optional:  # every optional signal the stage has can be asked for, no other
    plan = _entry(stage, name, signals=(s,))
    if s in plan_lib.STAGE_SIGNALS[stage]:
      plan_lib.normalize(plan)
    else:
      _fails(plan, "cannot provide", repr(s), where)


@pytest.mark.parametrize("key", sorted(SCHEDULES), ids=lambda k: f"{k[0]}-{k[1]}")
def test_schedules_take_only_their_options(key):
  stage, name = key
  base = SCHEDULES[key]
  where = f"plan[0] ({stage}, {name})"
  plan_lib.normalize(((stage, base),))
  for extra, value in [("foo", 1), ("version", "v9.9"), ("budget", 8), ("keep", 0.5),
                       ("seed", 1), ("signals", ()), ("signal_layer", 1)] + list(PLAN_KEYS.items()):
    opts = {**base, extra: value}
    if name == "sparsevlm" and extra == "keeps":
      continue  # the other size key: "exactly one of" below
    if name == "sparsevlm" and extra == "version":  # its own option, a value it refuses
      _fails(((stage, opts),), "version must be one of", "'v9.9'", where)
      continue
    if extra in SCHEDULE_KEYS[key]:
      plan_lib.normalize(((stage, opts),))
    else:
      _fails(((stage, opts),), repr(extra), where)


@pytest.mark.parametrize("opts, word", [
    ({"r": -1}, "r must be"), ({"r": 2.0}, "r must be"), ({"r": (2,)}, "(r, inflect)"),
    ({"r": (2, "x")}, "(r, inflect)"), ({"r": [1, -1]}, "list"), ({"layers": "some"}, "layers"),
    ({"layers": ()}, "layers"), ({"layers": (1.5,)}, "layers"), ({"prop_attn": 1}, "prop_attn"),
])
def test_tome_schedule_values(opts, word):
  _fails((("vit", {"method": "tome", **opts}),), word, "plan[0] (vit, tome)")


@pytest.mark.parametrize("name, opts, word", [
    ("pyramiddrop", {"layers": (2, 1), "ratios": (0.5, 0.25)}, "increasing"),
    ("pyramiddrop", {"layers": (1, 2), "ratios": (0.5,)}, "one value"),
    ("pyramiddrop", {"layers": (1, 2), "ratios": (0.5, 1.5)}, "ratios"),
    ("pyramiddrop", {"layers": 1, "ratios": (0.5,)}, "layers"),
    ("pyramiddrop", {"layers": ("1",), "ratios": (0.5,)}, "layers"),
    ("pyramiddrop", {"layers": (1,), "ratios": (0.5,), "attn_from": "later"}, "attn_from"),
    ("pyramiddrop", {"layers": (1,), "ratios": (0.5,), "positions": "keep"}, "positions"),
    ("sparsevlm", {"layers": (1,), "budgets": (8,), "positions": "keep"}, "positions"),
    ("sparsevlm", {"layers": (1,)}, "exactly one"),
    ("sparsevlm", {"layers": (1,), "budgets": (8,), "keeps": (0.5,)}, "exactly one"),
    ("sparsevlm", {"layers": (1,), "budgets": (0,)}, "budgets"),
    ("sparsevlm", {"layers": (1,), "keeps": (2,)}, "keeps"),
    ("sparsevlm", {"layers": (1,), "budgets": (8,), "version": "v9.9"}, "version must be one"),
    ("sparsevlm", {"layers": (1,), "budgets": (8,), "heads": 2.5}, "heads must be an int"),
])
def test_llm_schedule_values(name, opts, word):
  _fails((("llm", {"method": name, **opts}),), word, f"plan[0] (llm, {name})")


def test_errors_name_the_entry():
  plan = (("post_vit", {"method": "pool", "budget": 4}),
          ("llm", {"method": "fastv", "layer": 1, "keep": 0.5, "query": "first"}))
  _fails(plan, "plan[1] (llm, fastv)", "query", "'first'")
  _fails((("llm", {"budget": 4}),), "plan[0] (llm)", "'method'")
  _fails((("llm", {"method": "nope", "budget": 4}),), "plan[0] (llm)", "unknown method")
  _fails((("post_vit", {"method": "fastv", "budget": 4}),), "plan[0] (post_vit, fastv)",
         "acts at stages")
  _fails((("llm", 3),), "plan[0] (llm)", "dict")


def test_normalize_is_idempotent_and_keeps_per_layer_r():
  plan = (("vit", {"method": "tome", "r": [3, 0, 2]}),
          ("vit", {"method": "tome", "r": (2, -1.0), "layers": [0]}),
          ("post_vit", {"method": "vispruner", "budget": 8, "signals": ["keys"]}),
          ("llm", {"method": "pyramiddrop", "layers": [1, 2], "ratios": [0.5, 0.25]}))
  once = plan_lib.normalize(plan)
  assert plan_lib.normalize(once) == once and hash(once) is not None
  # A per-layer list stays a list; (r, inflect) stays a ramp (from 2 * (1 + 1) = 4 down to 0).
  assert plan_lib.tome_schedule(once, 4)[0] == (3 + 4, 0, 2, 0)
  # Frozen, the list [2, 2] must not turn into the ramp (r=2, inflect=2).
  twice = plan_lib.normalize(plan_lib.normalize((("vit", {"method": "tome", "r": [2, 2]}),)))
  assert plan_lib.tome_schedule(twice, 3)[0] == (2, 2, 0)


def test_every_option_defaulting_to_none_has_a_type():
  """OPTIONAL_TYPES declares every option whose default is None, and nothing else, so that
  `normalize` checks every option of every method."""
  for name, m in METHODS.items():
    nones = {k for k, v in m.options.items() if v is None}
    assert nones == set(m.optional_types), (name, nones)
    assert set(m.optional_types.values()) <= {"int", "float", "bool"}
  assert set(OPTIONAL_TYPES) <= set(METHODS)


def test_choices_match_the_methods():
  """CHOICES holds an entry for every option whose default is a string, every listed value runs,
  and the method itself refuses a value outside them."""
  for name, m in METHODS.items():
    strings = {k for k, v in m.options.items() if isinstance(v, str)}
    assert strings <= set(m.choices), (name, strings)
  assert set(CHOICES) <= set(METHODS)
  for name, options in CHOICES.items():
    tokens, signals, budget = inputs(name, batch=1)
    for key, values in options.items():
      assert key in METHODS[name].options
      for v in values:
        compress.apply(name, tokens, budget, **signals, **{key: v})
      with pytest.raises(ValueError, match=key):
        compress.apply(name, tokens, budget, **signals, **{key: "bogus"})


# ---- Optional signals reach a method only when the entry asks. ----


def _vit_signals(n=64, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  attn = jax.nn.softmax(3 * jax.random.normal(keys[0], (2, 1, n)), -1)
  return {"attn": attn, "scores": attn[:, 0], "keys": jax.random.normal(keys[1], (2, n, 6))}


def _run(opts, tokens, signals, stage="post_vit"):
  (stage, frozen), = plan_lib.normalize(((stage, opts),))
  return plan_lib.run_entry(dict(frozen), tokens, signals, stage, "test")


def _same(a, b):
  np.testing.assert_array_equal(np.asarray(a.src), np.asarray(b.src))
  np.testing.assert_allclose(np.asarray(a.x), np.asarray(b.x))


def test_vispruner_and_divprune_compare_features_unless_asked_for_keys():
  tokens = make_tokens(2, 1, (8, 8), seed=1)
  sig = _vit_signals()
  for name, need in (("vispruner", {"attn": sig["attn"]}), ("divprune", {})):
    feats = getattr(compress, name)(tokens, 12, **need)
    on_keys = getattr(compress, name)(tokens, 12, **need, keys=sig["keys"])
    assert not np.array_equal(np.asarray(feats.src), np.asarray(on_keys.src))
    _same(_run({"method": name, "budget": 12}, tokens, sig), feats)
    _same(_run({"method": name, "budget": 12, "signals": ()}, tokens, sig), feats)
    _same(_run({"method": name, "budget": 12, "signals": ("keys",)}, tokens, sig), on_keys)


def test_rng_and_text_signals_by_entry():
  tokens = make_tokens(2, 1, (8, 8), seed=2)
  # DPC-KNN's official density noise only when asked, from the entry's seed.
  want = compress.dpc_knn(tokens, 10, rng=jax.random.key(5))
  _same(_run({"method": "dpc_knn", "budget": 10, "signals": ("rng",), "seed": 5}, tokens, {}),
        want)
  _same(_run({"method": "dpc_knn", "budget": 10}, tokens, {}), compress.dpc_knn(tokens, 10))
  # DART before the LLM: its text pivots by default (when there is text), none with ().
  sig = _vit_signals(seed=3)
  text = jax.random.normal(jax.random.key(4), (2, 5, 8))
  text_mask = jnp.array([[True] * 5, [True, True, True, False, False]])
  extra = {**sig, "text": text, "text_mask": text_mask}
  _same(_run({"method": "dart", "budget": 20}, tokens, extra, "post_proj"),
        compress.dart(tokens, 20, keys=sig["keys"], text=text, text_mask=text_mask))
  _same(_run({"method": "dart", "budget": 20}, tokens, sig, "post_proj"),
        compress.dart(tokens, 20, keys=sig["keys"]))
  _same(_run({"method": "dart", "budget": 20, "signals": ()}, tokens, extra, "post_proj"),
        compress.dart(tokens, 20, keys=sig["keys"]))
  # Asked for but missing (no text given to the model): a clear error.
  with pytest.raises(ValueError, match="'text'.*without text"):
    _run({"method": "dart", "budget": 20, "signals": ("text",)}, tokens, sig, "post_proj")


def test_only_entries_using_vit_signals_set_the_signal_layers():
  depth = 4
  sl = lambda plan: plan_lib.signal_layers(plan_lib.normalize(plan), depth)
  assert sl((("post_vit", {"method": "divprune", "budget": 8}),)) == ()
  assert sl((("post_vit", {"method": "divprune", "budget": 8, "signals": ("keys",)}),)) == (2,)
  assert sl((("post_vit", {"method": "pool", "budget": 16}),
             ("post_proj", {"method": "topk", "budget": 8, "signal_layer": 1}))) == (1,)
  # Each entry its own layer: VisionZip's penultimate, PruMerge's last (its default).
  assert sl((("post_vit", {"method": "visionzip", "budget": 16, "signal_layer": 1}),
             ("post_proj", {"method": "divprune", "budget": 8, "signals": ("keys",)}))) == (1, 2)
  assert sl((("post_vit", {"method": "prumerge", "budget": 16}),)) == (3,)
  assert sl((("post_vit", {"method": "prumerge_plus", "budget": 16, "signal_layer": -2}),)) == (2,)


def test_llm_hooks_carry_the_entry_signals():
  hooks = lambda plan: plan_lib.llm_hooks(plan_lib.normalize(plan), 4)
  (h,) = hooks((("llm", {"method": "dart", "layer": 2, "budget": 8}),))
  assert h.signals == ("keys", "text", "text_mask", "text_keys")
  (h,) = hooks((("llm", {"method": "dart", "layer": 2, "budget": 8, "signals": ()}),))
  assert h.signals == ("keys",)
  (h,) = hooks((("llm", {"method": "fastv", "layer": 2, "keep": 0.5}),))
  assert h.signals == ("attn", "text_mask")
  (h,) = hooks((("llm", {"method": "divprune", "layer": 0, "budget": 8}),))
  assert h.signals == ()
  for h in hooks((("llm", {"method": "sparsevlm", "layers": (1, 2), "keeps": (0.5, 0.5)}),)):
    assert h.signals == ("attn", "text_mask") and h.rows is not None
  with pytest.raises(ValueError, match="layer 0"):
    hooks((("llm", {"method": "divprune", "layer": 0, "budget": 8, "signals": ("keys",)}),))


# ---- Through the model. ----

IMG = SiglipConfig(width=16, depth=3, mlp_dim=32, num_heads=2, patch_size=4, image_size=16)
CONFIG = PaliGemmaConfig(img=IMG, llm=GemmaConfig(
    version=1, vocab_size=50, width=24, depth=4, mlp_dim=48, num_heads=2, num_kv_heads=1,
    head_dim=8))


@pytest.fixture(scope="module")
def model_params():
  rng = np.random.default_rng(0)
  flat = {k: (rng.normal(size=s) / np.sqrt(s[-2] if len(s) > 1 else s[-1])).astype(np.float32)
          for k, s in ckpt.param_shapes(CONFIG).items()}
  return PaliGemma(CONFIG), ckpt.unflatten({k: jnp.asarray(v) for k, v in flat.items()})


def test_vispruner_through_the_model(model_params):
  """The plan's VisPruner = VisPruner on the ViT output and the penultimate layer's attention,
  comparing features by default and the ViT's head-mean keys when the entry asks for keys."""
  model, params = model_params
  image = np.random.default_rng(2).uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  tokens, sig, _ = siglip.encode(params["img"], jnp.asarray(image), IMG, (), want_signals=(1,))
  sig = sig[1]
  head = params["img"]["head"]
  embed = lambda m: jax.jit(lambda p, i: m.apply({"params": p}, i, method=m.embed_image))
  results = []
  for extra, kw in (({}, {}), ({"signals": ("keys",)}, {"keys": sig["keys"]})):
    plan = (("post_vit", {"method": "vispruner", "budget": 8, **extra}),)
    z, out, _ = embed(model.with_plan(plan))(params, image)
    want = compress.vispruner(tokens, 8, attn=sig["attn"], **kw)
    np.testing.assert_array_equal(np.asarray(out.src), np.asarray(want.src))
    np.testing.assert_allclose(np.asarray(z), np.asarray(want.x @ head["kernel"] + head["bias"]),
                               atol=1e-5, rtol=1e-5)
    results.append(np.asarray(out.src))
  assert not np.array_equal(*results)


def test_dart_in_the_llm_gets_text_and_text_keys(model_params, monkeypatch):
  model, params = model_params
  seen = []
  real = compress.apply

  def spy(name, tokens, budget, **kw):
    seen.append((name, {k: getattr(v, "shape", v) for k, v in kw.items()}))
    return real(name, tokens, budget, **kw)

  monkeypatch.setattr(gemma.compress, "apply", spy)
  image = np.zeros((2, 16, 16, 3), np.float32)
  text = np.arange(14, dtype=np.int32).reshape(2, 7) % 50
  for extra, names in (({}, {"keys", "text", "text_mask", "text_keys"}), ({"signals": ()}, {"keys"})):
    seen.clear()
    plan = (("llm", {"method": "dart", "layer": 2, "budget": 6, **extra}),)
    # Traced, not run: the signals reach the method at trace time (an eager run compiles the
    # whole model op by op).
    jax.eval_shape(model.with_plan(plan).apply, {"params": params}, image, text)
    ((name, kw),) = seen
    assert name == "dart" and set(kw) == names
    if "text_keys" in kw:  # every text row: one key per head x head dim
      assert kw["text_keys"] == (2, 7, 8) and kw["keys"] == (2, 16, 8)
