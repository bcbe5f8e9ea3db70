"""The Tokens contract (docs/architecture.md), checked for every registered method."""

from absl.testing import parameterized
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import tcjax
from tcjax import compress
from tcjax.compress import METHODS
from tcjax.parallel import make_mesh

from helpers import case, check_contract, inputs, make_signals, make_tokens, np_tree

NAMES = sorted(METHODS)


def run(name, tokens, budget, signals):
  """Op by op (the error tests and the eager side of JitMatchesEager)."""
  return compress.apply(name, tokens, budget, **signals)


_JITTED = {}


def jit_run(name, tokens, budget, signals):
  """`run` under one `jax.jit` per method and budget: the contract checks below compile each
  method once per input shape instead of dispatching its ops one by one (op by op, the video
  methods took up to 30 s a test); JitMatchesEager checks that the two agree."""
  key = (name, budget)
  if key not in _JITTED:
    _JITTED[key] = jax.jit(lambda t, s: compress.apply(name, t, budget, **s))
  return _JITTED[key](tokens, signals)


@pytest.mark.parametrize("name", NAMES)
def test_registry_entry(name):
  m = METHODS[name]
  assert getattr(compress, name) is m.fn
  assert m.fn.__module__.startswith("tcjax.compress.")
  assert m.fn.__doc__ and m.paper


@pytest.mark.parametrize("name", NAMES)
def test_shape_order_src(name):
  tokens, signals, budget = inputs(name, batch=3)
  out = jit_run(name, tokens, budget, signals)
  check_contract(out, budget, 3)


@pytest.mark.parametrize("name", NAMES)
def test_batch_examples_are_independent(name):
  tokens, signals, budget = inputs(name, batch=3)
  out = np_tree(jit_run(name, tokens, budget, signals))
  if "rng" in METHODS[name].needs:
    return  # one key draws one batch of noise; covered by test_random_* in its own file
  for b in range(3):
    one = jax.tree.map(lambda a: a[b:b + 1], tokens)
    sig = {k: v[b:b + 1] for k, v in signals.items()}
    single = np_tree(jit_run(name, one, budget, sig))
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[b:b + 1], out), single, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_examples_differ_when_inputs_differ(name):
  tokens, signals, budget = inputs(name, batch=2, seed=3)
  out = np_tree(jit_run(name, tokens, budget, signals))
  # A method that keeps nothing (VTW: every visual token withdrawn) says so in the registry
  # (the sweep then runs it at one budget); every other one keeps something.
  assert METHODS[name].keeps_none == (not out.mask.any()), name
  if not out.mask.any():
    return
  assert not np.allclose(out.x[0], out.x[1])


class JitMatchesEager(chex.TestCase):
  """Each method under `jax.jit` and op by op (chex variants) gives the op-by-op answer."""

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*NAMES)
  def test_jit_matches_eager(self, name):
    tokens, signals, budget = inputs(name, batch=2)
    eager = np_tree(run(name, tokens, budget, signals))
    got = self.variant(lambda t, s: run(name, t, budget, s))(tokens, signals)
    chex.assert_trees_all_close(np_tree(got), eager, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_vmap_over_extra_axis(name):
  (t0, s0, budget), (t1, s1, _) = inputs(name, batch=2, seed=0), inputs(name, batch=2, seed=5)
  stacked_t = jax.tree.map(lambda a, b: jnp.stack([a, b]), t0, t1)
  stacked_s = {k: jnp.stack([s0[k], s1[k]]) for k in s0}
  out = jax.jit(jax.vmap(lambda t, s: run(name, t, budget, s)))(stacked_t, stacked_s)
  for i, (t, s) in enumerate([(t0, s0), (t1, s1)]):
    chex.assert_trees_all_close(np_tree(jax.tree.map(lambda a: a[i], out)),
                                np_tree(jit_run(name, t, budget, s)), atol=1e-5)


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
@pytest.mark.parametrize("name", NAMES)
def test_sharded_batch_matches_one_device(name, axis_type):
  tokens, signals, budget = inputs(name, batch=8)
  mesh = make_mesh((("data", 8),), axis_types=axis_type)
  shard = lambda a: jax.device_put(a, NamedSharding(mesh, P("data")))
  tokens_s = jax.tree.map(shard, tokens)
  signals_s = {k: (v if k == "rng" else shard(v)) for k, v in signals.items()}
  with jax.set_mesh(mesh):
    out = jax.jit(lambda t, s: run(name, t, budget, s))(tokens_s, signals_s)
  ref = jit_run(name, tokens, budget, signals)
  chex.assert_trees_all_close(np_tree(out), np_tree(ref), atol=1e-5)


# The video methods on 3-frame clips (budget, options): batch x frames (6) does not divide the 8
# devices; prunevid needs int(3 * temporal_segment_ratio) >= 1 segment.
THREE_FRAMES = {"dycoke": (32, {}), "fastvid": (32, {}), "framefusion": (32, {}),
                "holitom": (16, {}), "prunevid": (24, {"temporal_segment_ratio": 0.34}),
                "prunevid_llm": (16, {}), "slowfast": (24, {}), "temporal_merge": (32, {})}


@pytest.mark.parametrize("axis_type", ["explicit", "auto"])
@pytest.mark.parametrize("name", sorted(THREE_FRAMES))
def test_three_frame_clips_on_8_devices_equal_one_device(name, axis_type):
  """Two 3-frame clips on (data 2, seq 4), placed as the model hands them over: x sharded over
  data, the bookkeeping and signals replicated. On Explicit axes the methods' vmap refused that
  ("Mapped away dimension ... data vs None"); the result is the one-device one, bit for bit."""
  budget, opts = THREE_FRAMES[name]
  tokens = make_tokens(2, 3, (4, 4))
  signals = make_signals(name, tokens)
  f = jax.jit(lambda t, s: run(name, t, budget, {**s, **opts}))
  want = np_tree(f(tokens, signals))
  mesh = make_mesh((("data", 2), ("seq", 4)), axis_types=axis_type)
  put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
  placed = jax.tree.map(lambda a: put(a, P()), (tokens, signals))
  placed = (placed[0].replace(x=put(tokens.x, P("data"))), placed[1])
  with jax.set_mesh(mesh):
    got = f(*placed)
  chex.assert_trees_all_equal(np_tree(got), want)


@pytest.mark.parametrize("name", NAMES)
def test_bad_budget(name):
  tokens, signals, _ = inputs(name, batch=2)
  n = tokens.num_tokens
  for bad in (0, -3, n + 1, 2.5, "8"):
    with pytest.raises(ValueError, match="budget"):
      run(name, tokens, bad, signals)
  with pytest.raises(ValueError, match="budget"):  # a traced budget is not static
    jax.jit(lambda b: run(name, tokens, b, signals))(4)


@pytest.mark.parametrize("name", [n for n in NAMES if METHODS[n].needs])
def test_missing_signal(name):
  tokens, signals, budget = inputs(name, batch=2)
  for s in METHODS[name].needs:
    rest = {k: v for k, v in signals.items() if k != s}
    with pytest.raises(ValueError, match=s):
      run(name, tokens, budget, rest)
    with pytest.raises(ValueError, match=s):  # direct call, not through apply
      getattr(compress, name)(tokens, budget, **rest)


@pytest.mark.parametrize("name", [n for n in NAMES if METHODS[n].needs])
def test_wrong_signal_shapes(name):
  tokens, signals, budget = inputs(name, batch=2)
  for s, v in signals.items():
    if s == "rng":
      continue
    # attn's axis 1 is Q, attn_heads' the heads (any count), rope_logits' the rows: cut their
    # token axis instead.
    cut = (v[..., 1:] if s in ("attn", "attn_heads", "rope_logits")
           else (v[:, 1:] if v.ndim >= 2 else v[1:]))
    bad = {**signals, s: cut}
    with pytest.raises(ValueError, match=s):
      run(name, tokens, budget, bad)
    bad = {**signals, s: v[0]}  # wrong rank
    with pytest.raises(ValueError, match=s):
      run(name, tokens, budget, bad)


@pytest.mark.parametrize("name", NAMES)
def test_bad_tokens(name):
  tokens, signals, budget = inputs(name, batch=2)
  with pytest.raises(ValueError, match="tokens"):
    run(name, tokens.x, budget, signals)
  as_int = tokens.replace(x=tokens.x.astype(jnp.int32))
  with pytest.raises(ValueError, match="floating"):
    run(name, as_int, budget, signals)
  wrong_src = tokens.replace(src=tokens.src[:, 1:])
  with pytest.raises(ValueError, match="src"):
    run(name, wrong_src, budget, signals)


def test_grid_must_match_n():
  x = jnp.zeros((2, 15, 4))
  with pytest.raises(ValueError, match="grid"):
    tcjax.Tokens.from_grid(x, (4, 4))
  with pytest.raises(ValueError, match="grid"):
    tcjax.Tokens.from_video(jnp.zeros((2, 32, 4)), frames=3, grid=(4, 4))
  with pytest.raises(ValueError, match="float"):
    tcjax.Tokens.from_grid(jnp.zeros((2, 16, 4), jnp.int32), (4, 4))


def test_apply_rejects_unknown():
  tokens, signals, budget = inputs("topk", batch=2)
  with pytest.raises(ValueError, match="unknown method"):
    compress.apply("nope", tokens, budget)
  with pytest.raises(ValueError, match="colour"):
    compress.apply("topk", tokens, budget, colour=1, **signals)


def test_every_method_runs_with_defaults_only():
  """Signals and budget are all a method needs: every option has a default (traced only; the
  tests above run each method)."""
  for name in NAMES:
    tokens, signals, budget = inputs(name, batch=2)
    out = jax.eval_shape(lambda t, s, name=name, budget=budget: compress.apply(
        name, t, budget, **s), tokens, signals)
    assert out.x.shape[1] == budget


def test_explicit_token_sharding_is_refused_clearly_by_whole_axis_methods():
  """On an Explicit `seq` axis, methods that need a whole example (merging, diversity, pooling)
  raise a ValueError naming themselves; the exact sharded top-k methods run (tested with their
  results in test_fastv.py / test_topk_pool.py)."""
  tokens, signals, budget = inputs("pool", batch=2)
  mesh = make_mesh((("data", 2), ("seq", 4)), axis_types="explicit")
  tok = NamedSharding(mesh, P("data", "seq"))
  sharded = tokens.replace(**{f: jax.device_put(getattr(tokens, f), tok)
                              for f in ("x", "pos", "size", "mask")})
  with jax.set_mesh(mesh):
    with pytest.raises(ValueError, match="pool: tokens.x has its token axis sharded over mesh "
                                         "axis 'seq'"):
      jax.jit(lambda t: compress.pool(t, budget))(sharded)
  assert not METHODS["pool"].token_sharded and METHODS["topk"].token_sharded


def test_registered_methods_check_their_output_shape():
  """The registry wraps every method in the contract's post-condition (chex shape checks), so a
  method returning the wrong number of tokens fails loudly instead of passing garbage on."""
  from tcjax.compress import registry  # pylint: disable=g-import-not-at-top

  @registry.register("_one_too_many", family="sampling", stages=("post_vit",))
  def one_too_many(tokens, budget):
    return compress.uniform(tokens, budget + 1)

  try:
    tokens, _, budget = inputs("uniform", batch=2)
    with pytest.raises(AssertionError, match="shape"):
      compress.apply("_one_too_many", tokens, budget)
  finally:
    del METHODS["_one_too_many"]
