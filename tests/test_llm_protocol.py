"""The in-LLM protocol: a method declares what it needs at a decoder layer in its registration,
and the model serves it without knowing it by name.

Two methods are defined and registered here, outside the package: `rowmean_test` (head-mean
prompt-row attention, its own text rows from the decoder's input embeddings, a two-layer
registered schedule with renumbered positions) and `keyfeat_test` (head-mean keys on a model
with 2 KV heads, features after the final norm). Both run through a plan on a tiny Gemma 2 and
are checked against the NumPy decoder (tests/paligemma_ref.py) and a NumPy transcription of
their definitions; DART's declared inputs (final-norm features, KV heads concatenated) likewise.
"""

import ast
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paligemma_ref as ref
import tcjax
from tcjax import compress
from tcjax.compress import primitives as P
from tcjax.compress import registry
from tcjax.nn import GemmaConfig, PaliGemma, PaliGemmaConfig, SiglipConfig
from tcjax.nn import plan as plan_lib

from test_model import make_params

IMG = SiglipConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=16)
N = IMG.num_patches  # 16 image tokens, a 4 x 4 grid
T, PREFIX = 7, 5  # text rows: 5 prompt rows, then 2 suffix rows
CONFIG = PaliGemmaConfig(img=IMG, llm=GemmaConfig(
    version=2, vocab_size=40, width=24, depth=4, mlp_dim=48, num_heads=4, num_kv_heads=2,
    head_dim=8, query_pre_attn_scalar=8, attn_logits_softcap=20.0, final_logits_softcap=10.0,
    sliding_window=64))
HEAD_DIM = CONFIG.llm.head_dim


# ---- Two methods of a test's own, registered for this module only. ----


def loud_rows(x_img, x_text, text_mask, img_mask):
  """bool[B, T]: the valid prompt rows whose input embedding (x_text float[B, T, E]) has an L2
  norm at least the mean over the valid prompt rows (text_mask bool[B, T])."""
  del x_img, img_mask
  norm = jnp.linalg.norm(x_text.astype(jnp.float32), axis=-1)
  w = text_mask.astype(jnp.float32)
  mean = (norm * w).sum(1, keepdims=True) / jnp.maximum(w.sum(1, keepdims=True), 1.0)
  return text_mask & (norm >= mean)


def rowmean(tokens, budget, *, attn=None, text_mask=None):
  """Keep the `budget` tokens with the highest mean attention over the rows of `text_mask`.

  attn: float[B, Q, N] head-mean attention rows; text_mask: optional bool[B, Q]."""
  P.check_tokens(tokens, "rowmean_test")
  budget = P.check_budget(tokens, budget, "rowmean_test")
  b, n, _ = tokens.x.shape
  attn = P.check_array(attn, "attn", "rowmean_test", (b, None, n)).astype(jnp.float32)
  rows = jnp.ones(attn.shape[:2], bool) if text_mask is None else text_mask.astype(bool)
  w = rows.astype(jnp.float32)
  score = jnp.einsum("bq,bqn->bn", w, attn) / jnp.maximum(w.sum(1), 1.0)[:, None]
  return P.select_top(tokens, score, budget)


def keyfeat(tokens, budget, *, keys=None):
  """Keep the `budget` tokens with the largest L1 norm of `keys` times L2 norm of `tokens.x`.

  keys: float[B, N, h], one key per token (the decoder's head-mean keys)."""
  P.check_tokens(tokens, "keyfeat_test")
  budget = P.check_budget(tokens, budget, "keyfeat_test")
  b, n, _ = tokens.x.shape
  keys = P.check_array(keys, "keys", "keyfeat_test", (b, n, HEAD_DIM))
  chex.assert_shape(keys, (b, n, HEAD_DIM))
  score = (jnp.abs(keys.astype(jnp.float32)).sum(-1)
           * jnp.linalg.norm(tokens.x.astype(jnp.float32), axis=-1))
  return P.select_top(tokens, score, budget)


def keep_step(key, value, n, n_initial, options):
  """rowmean_steps: a fraction of the tokens present, rounded, at least one."""
  del key, n_initial, options
  return max(1, int(round(value * n))), {}


@pytest.fixture(scope="module")
def registered():
  """Registers the two methods and the schedule; the registries are restored afterwards."""
  saved = dict(registry.METHODS), dict(registry.SCHEDULES)
  try:
    registry.register("rowmean_test", family="sampling", stages=("llm",), needs=("attn",),
                      default_signals=("text_mask",), llm_rows=loud_rows)(rowmean)
    registry.register("keyfeat_test", family="sampling", stages=("llm",), needs=("keys",),
                      llm_features="final_norm")(keyfeat)
    registry.register_schedule("rowmean_steps", step="rowmean_test",
                               sizes={"keeps": "fraction"}, size=keep_step,
                               signals=("attn", "text_mask"), positions="reindex")
    yield
  finally:
    for live, old in zip((registry.METHODS, registry.SCHEDULES), saved):
      live.clear()
      live.update(old)


# ---- Inputs and the NumPy side. ----


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(7)
  _, params, flat = make_params(CONFIG, seed=7)
  image = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  text = rng.integers(3, 40, (2, T)).astype(np.int32)
  text[:, 0] = 2
  mask_ar = np.array([[0] * PREFIX + [1] * (T - PREFIX)] * 2, np.int32)
  x0 = np.concatenate([ref.image_embed(flat, CONFIG, image), ref.embed_text(flat, CONFIG, text)],
                      1)
  ar = np.concatenate([np.zeros((2, N), np.int32), mask_ar], 1)
  return flat, params, image, text, mask_ar, x0, ar


def run(params, plan, image, text, mask_ar):
  """(text logits float[B, T, V], aux) of the model with `plan`."""
  model = PaliGemma(CONFIG).with_plan(plan)
  return jax.jit(lambda p: model.apply({"params": p}, image, text, mask_ar))(params)


def top(score, k):
  """int[B, k] the k best indices per row, ascending (ties: lower index)."""
  return np.sort(np.argsort(-score, axis=1, kind="stable")[:, :k], axis=1)


def renumber(x, pos, ar, _):
  return x, np.broadcast_to(np.arange(x.shape[1], dtype=np.float64), x.shape[:2]), ar


def keep_mask(kept, n_img, n_text):
  """bool[B, n_img + n_text]: the image tokens at indices `kept: int[B, k]`, and all text."""
  out = np.zeros((kept.shape[0], n_img + n_text), bool)
  for b, idx in enumerate(kept):
    out[b, idx] = True
  out[:, n_img:] = True
  return out


def rowmean_numpy(attn, rows):
  """float[B, n]: mean over the rows (bool[B, T]) of head-mean attention attn float[B, T, n]."""
  return (attn * rows[..., None]).sum(1) / np.maximum(rows.sum(1), 1)[:, None]


# ---- Through the model. ----


def test_a_registered_schedule_of_a_new_method_matches_numpy(registered, setup):
  """rowmean_steps at layers 1 and 3 (16 -> 8 -> 4 tokens): each step scores with the head-mean
  attention of the previous layer's rows that `loud_rows` picked from the input embeddings
  (suffix rows never), keeps its top half, and renumbers the survivors (the schedule's official
  positions); the text logits equal the NumPy decoder run on that pruned sequence."""
  flat, params, image, text, mask_ar, x0, ar = setup
  plan = (("llm", {"method": "rowmean_steps", "layers": (1, 3), "keeps": (0.5, 0.5)}),)
  hooks = plan_lib.llm_hooks(plan_lib.normalize(plan), CONFIG.llm.depth)
  assert [(h.layer, h.method, h.size, h.positions, h.rows) for h in hooks] == [
      (1, "rowmean_test", ("keeps", 0.5), "reindex", loud_rows),
      (3, "rowmean_test", ("keeps", 0.5), "reindex", loud_rows)]
  logits, aux = run(params, plan, image, text, mask_ar)

  norm = np.linalg.norm(x0[:, N:], axis=-1)
  prompt = mask_ar == 0
  rows = prompt & (norm >= (norm * prompt).sum(1, keepdims=True) / prompt.sum(1, keepdims=True))
  assert 0 < rows.sum() < prompt.sum()  # the rows function matters on these inputs
  _, attns, _ = ref.decoder(flat, CONFIG, x0, ar, attn_layers=(0,))
  kept1 = top(rowmean_numpy(attns[0].mean(1)[:, N:, :N], rows), 8)  # [B, 8] of 16
  np.testing.assert_array_equal(np.asarray(aux["llm_kept_pos"][0]), kept1)
  prune1 = keep_mask(kept1, N, T)
  _, attns, _ = ref.decoder(flat, CONFIG, x0, ar, prune={1: prune1}, at_layer={1: renumber},
                            attn_layers=(2,))
  kept2 = top(rowmean_numpy(attns[2].mean(1)[:, 8:, :8], rows), 4)  # [B, 4] of the 8
  np.testing.assert_array_equal(np.asarray(aux["llm_kept_pos"][1]),
                                np.take_along_axis(kept1, kept2, 1))
  want, _, _ = ref.decoder(flat, CONFIG, x0, ar, prune={1: prune1, 3: keep_mask(kept2, 8, T)},
                           at_layer={1: renumber, 3: renumber})
  chex.assert_shape(logits, (2, T, CONFIG.llm.vocab_size))
  np.testing.assert_allclose(np.asarray(logits), want[:, -T:], atol=2e-4, rtol=2e-4)
  assert tuple(int(c) for c in aux["llm_tokens"]) == (N + T, 8 + T, 8 + T, 4 + T)


def test_declared_features_and_head_mean_keys(registered, setup):
  """keyfeat_test at layer 2: `keys` are layer 1's post-RoPE keys averaged over the 2 KV heads
  (float[B, N, head_dim]) and `tokens.x` the hidden states entering layer 2 after the final
  norm (its `llm_features`)."""
  flat, params, image, text, mask_ar, x0, ar = setup
  plan = (("llm", {"method": "keyfeat_test", "layer": 2, "budget": 5}),)
  _, aux = run(params, plan, image, text, mask_ar)
  hidden = {}
  _, attns, _ = ref.decoder(flat, CONFIG, x0, ar, attn_layers=(1,), hidden=hidden)
  pos = np.broadcast_to(np.arange(N + T, dtype=np.float64), (2, N + T))
  k = ref._rope(attns[("raw", 1)][1], pos, CONFIG.llm.rope_base)  # [B, S, K, h]
  feats = ref._rms(hidden[2], flat["llm/final_norm/scale"], CONFIG.llm.norm_eps)
  score = np.abs(k[:, :N].mean(2)).sum(-1) * np.linalg.norm(feats[:, :N], axis=-1)
  np.testing.assert_array_equal(np.asarray(aux["llm_kept_pos"][0]), top(score, 5))
  # The concatenation would rank otherwise on these inputs: the name's meaning matters.
  concat = np.abs(k[:, :N].reshape(2, N, -1)).sum(-1) * np.linalg.norm(feats[:, :N], axis=-1)
  assert not np.array_equal(top(concat, 5), top(score, 5))


def test_dart_gets_what_its_registration_declares(setup):
  """DART at layer 2: features and text after the final norm, keys and text keys with the KV
  heads concatenated (`llm_signals`), text pivots over the valid prompt rows (its
  default_signals); the kept tokens are compress.dart's on those NumPy-computed inputs."""
  flat, params, image, text, mask_ar, x0, ar = setup
  plan = (("llm", {"method": "dart", "layer": 2, "budget": 6}),)
  (h,) = plan_lib.llm_hooks(plan_lib.normalize(plan), CONFIG.llm.depth)
  assert h.sources == ("keys_concat", "text_normed", "text_mask", "text_keys_concat")
  assert h.features == "final_norm"
  _, aux = run(params, plan, image, text, mask_ar)
  hidden = {}
  _, attns, _ = ref.decoder(flat, CONFIG, x0, ar, attn_layers=(1,), hidden=hidden)
  pos = np.broadcast_to(np.arange(N + T, dtype=np.float64), (2, N + T))
  k = ref._rope(attns[("raw", 1)][1], pos, CONFIG.llm.rope_base).reshape(2, N + T, -1)
  feats = ref._rms(hidden[2], flat["llm/final_norm/scale"], CONFIG.llm.norm_eps)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  tokens = tcjax.Tokens.from_grid(f32(feats[:, :N]), grid=(4, 4))
  want = compress.dart(tokens, 6, keys=f32(k[:, :N]), text=f32(feats[:, N:]),
                       text_mask=jnp.asarray(mask_ar == 0), text_keys=f32(k[:, N:]))
  kept = np.stack([np.flatnonzero(s >= 0) for s in np.asarray(want.src)])  # [B, 6] ascending
  np.testing.assert_array_equal(np.asarray(aux["llm_kept_pos"][0]), kept)


# ---- What the protocol refuses. ----


def test_registration_refuses_unknown_signals_and_options(registered):
  def fn(tokens, budget, *, attn=None, text_mask=None, alpha=1.0):
    return P.select_top(tokens, attn[:, 0], budget)

  reg = lambda **kw: registry.register("never_registered", family="sampling", stages=("llm",),
                                       needs=("attn",), **kw)(fn)
  with pytest.raises(ValueError, match="keys_sum"):
    reg(llm_signals={"attn": "keys_sum"})
  with pytest.raises(ValueError, match="'keys'"):
    reg(llm_signals={"keys": "keys_concat"})  # an argument fn does not take
  with pytest.raises(ValueError, match="'attn'"):
    reg(default_signals=("attn",))  # a need, not an optional signal
  with pytest.raises(ValueError, match="llm_features"):
    reg(llm_features="embeddings")
  with pytest.raises(ValueError, match="llm_positions"):
    reg(llm_positions="renumber")
  assert "never_registered" not in registry.METHODS
  sched = lambda **kw: registry.register_schedule(
      "never_scheduled", **{"step": "rowmean_test", "sizes": {"keeps": "fraction"},
                            "size": keep_step, **kw})
  with pytest.raises(ValueError, match="bogus"):
    sched(options=("bogus",))
  with pytest.raises(ValueError, match="'query'"):
    sched(fixed={"query": "last"})
  with pytest.raises(ValueError, match="keys"):
    sched(signals=("attn", "keys"))
  with pytest.raises(ValueError, match="sizes"):
    sched(sizes={"keeps": "percent"})
  with pytest.raises(ValueError, match="step"):
    sched(step="pool")  # not an llm-stage method
  with pytest.raises(ValueError, match="registered twice"):
    registry.register_schedule("rowmean_steps", step="rowmean_test",
                               sizes={"keeps": "fraction"}, size=keep_step)
  assert "never_scheduled" not in registry.SCHEDULES


def test_plan_refuses_unknown_options_of_a_registered_schedule(registered):
  base = {"method": "rowmean_steps", "layers": (1, 2), "keeps": (0.5, 0.5)}
  plan_lib.normalize((("llm", base),))
  for key, value in (("query", "last"), ("budget", 4), ("signals", ()), ("seed", 1),
                     ("layer", 1), ("ratios", (0.5, 0.5))):
    with pytest.raises(ValueError, match=f"plan\\[0\\] \\(llm, rowmean_steps\\).*'{key}'"):
      plan_lib.normalize((("llm", {**base, key: value}),))
  with pytest.raises(ValueError, match="keeps must be fractions"):
    plan_lib.normalize((("llm", {**base, "keeps": (0.5, 2)}),))
  with pytest.raises(ValueError, match="exactly one"):
    plan_lib.normalize((("llm", {"method": "rowmean_steps", "layers": (1,)}),))
  with pytest.raises(ValueError, match="keys_sum"):
    plan_lib.normalize((("llm", {"method": "rowmean_test", "layer": 1, "budget": 4,
                                 "signals": ("keys_sum",)}),))


def test_an_entry_without_signals_gets_the_registered_defaults(registered):
  hooks = lambda opts: plan_lib.llm_hooks(plan_lib.normalize((("llm", opts),)), 4)
  (h,) = hooks({"method": "rowmean_test", "layer": 1, "budget": 4})
  assert h.signals == ("attn", "text_mask") and h.rows is loud_rows
  (h,) = hooks({"method": "rowmean_test", "layer": 1, "budget": 4, "signals": ()})
  assert h.signals == ("attn",)


def _string_constants(path):
  """The string constants of a module's code, docstrings left out."""
  tree = ast.parse(open(path).read())
  docs = set()
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body and \
        isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant):
      docs.add(id(node.body[0].value))
  return {n.value for n in ast.walk(tree)
          if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs}


def test_the_model_and_the_plan_name_no_in_llm_method():
  """gemma.py and plan.py serve every llm-stage method and schedule from its registration: no
  string in their code is the name of one (a special case would have to name it)."""
  root = os.path.join(os.path.dirname(__file__), "..", "tcjax", "nn")
  names = {n for n, m in compress.METHODS.items() if "llm" in m.stages} | set(compress.SCHEDULES)
  assert {"fastv", "dart", "sparsevlm", "pyramiddrop", "mustdrop"} <= names
  for module in ("gemma.py", "plan.py"):
    found = _string_constants(os.path.join(root, module)) & names
    assert not found, (module, sorted(found))
