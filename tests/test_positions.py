"""RoPE positions after in-LLM pruning (`positions="original" | "reindex"`).

Official PyramidDrop (Cooperx521/PyramidDrop `llava/model/modeling_llama_pdrop.py`,
`pdrop_rank_drop` / `pdrop_forward`) and SparseVLM v1.5 (Gumpest/SparseVLMs
`llava/model/language_model/modelling_sparse_llama.py`) renumber the surviving sequence 0..n-1
and decode each layer at its own cache length; FastV, DART, VTW (`pe_type="keep"`), ViTCoP,
HoliTom, PruneVid and SparseVLM v2.0 keep the original positions. Checked here:
  - the plan defaults per method, and the option's errors;
  - a NumPy transcription of both official rules against `gemma.renumber` and against the
    positions the model uses in each cache segment (`aux["llm_positions"]`) and for decoding;
  - with "reindex", the pruned prefill equals the uncompressed model run on the survivors alone
    at positions 0..n-1 (from the pruning layer on; from layer 0 the whole model);
  - prefill + KV-cached decoding equal a full forward pass (no cache) under both options.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcjax import compress
from tcjax.nn import GemmaConfig, PaliGemma, PaliGemmaConfig, SiglipConfig, gemma
from tcjax.nn import plan as plan_lib

from test_model import make_params

# ---- The official rules, transcribed in NumPy (per example, lists of token indices). ----


def official_renumbered(valid, kept):
  """PyramidDrop `pdrop_rank_drop` (and SparseVLM v1.5, whose `position_ids` are cut to the new
  length): the valid tokens are taken out of the padded row, the image span keeps only `kept`,
  and the new row gets positions arange(0, len). -> {old index: new position}."""
  stay = [i for i in range(len(valid)) if valid[i] and kept[i]]
  return {i: p for p, i in enumerate(stay)}


def official_kept(pos, valid, kept):
  """FastV (`position_ids = keep_indexs`), SparseVLM v2.0 (`batch_index_select(position_ids,
  ...)`), DART, VTW `pe_type="keep"`: each survivor keeps its position. -> {old index: pos}."""
  return {i: int(pos[i]) for i in range(len(valid)) if valid[i] and kept[i]}


def official_decode_position(cache_valid_entries, step):
  """SparseVLM v1.5 (`get_usable_length(kv_seq_len, layer_idx)`) and PyramidDrop (the position
  lowered by the tokens dropped at each stage passed): a layer's new token sits at the number of
  entries its cache holds."""
  return cache_valid_entries + step


# ---- Plan defaults and errors. ----


def _hooks(opts, depth=8):
  return plan_lib.llm_hooks(plan_lib.normalize((("llm", opts),)), depth)


def test_official_defaults_and_overrides():
  pd = {"method": "pyramiddrop", "layers": (2, 4), "ratios": (0.5, 0.25)}
  assert [h.positions for h in _hooks(pd)] == ["reindex", "reindex"]
  assert [h.positions for h in _hooks({**pd, "positions": "original"})] == ["original"] * 2
  sv = {"method": "sparsevlm", "layers": (3,), "budgets": (8,)}
  assert _hooks(sv)[0].positions == "reindex"  # v1.5, the default version
  assert _hooks({**sv, "version": "v2.0"})[0].positions == "original"
  assert _hooks({**sv, "version": "v2.0", "positions": "reindex"})[0].positions == "reindex"
  singles = {"fastv": {}, "dart": {}, "vtw": {}, "keynorm": {}, "holitom_llm": {},
             "prunevid_llm": {}, "topk": {}, "random": {}, "divprune": {}}
  for name in singles:
    assert _hooks({"method": name, "layer": 2, "budget": 4})[0].positions == "original", name
    (h,) = _hooks({"method": name, "layer": 2, "budget": 4, "positions": "reindex"})
    assert h.positions == "reindex"
  # Every llm-stage method takes the option; no other stage does.
  for name, m in compress.METHODS.items():
    if "llm" in m.stages and not plan_lib.is_schedule("llm", name):
      plan_lib.normalize((("llm", {"method": name, "layer": 2, "budget": 4,
                                   "positions": "reindex"}),))


@pytest.mark.parametrize("entry", [
    ("llm", {"method": "fastv", "layer": 2, "keep": 0.5, "positions": "renumber"}),
    ("llm", {"method": "pyramiddrop", "layers": (2,), "ratios": (0.5,), "positions": "new"}),
    ("llm", {"method": "sparsevlm", "layers": (2,), "budgets": (4,), "positions": None}),
])
def test_unknown_values_are_refused(entry):
  with pytest.raises(ValueError, match="positions must be one of"):
    plan_lib.normalize((entry,))


def test_other_stages_have_no_positions():
  with pytest.raises(ValueError, match="'positions'"):
    plan_lib.normalize((("post_vit", {"method": "topk", "budget": 4, "positions": "reindex"}),))
  with pytest.raises(ValueError, match="'positions'"):
    plan_lib.normalize((("vit", {"method": "tome", "r": 2, "positions": "reindex"}),))


# ---- The pure helper against the transcription. ----


def test_renumber_is_the_official_renumbering():
  """Random batches with padded text and padded image slots: gathering the survivors (tcjax's
  static shapes: dropped image slots become padding at the end of the image part) and
  `renumber` give every valid survivor the position the official rule gives it."""
  rng = np.random.default_rng(0)
  b, n, t = 4, 12, 7
  for _ in range(5):
    valid = np.ones((b, n + t), bool)
    valid[:, n:] = rng.random((b, t)) < 0.8  # text padding anywhere
    valid[:, :n] = rng.random((b, n)) < 0.9  # padding among the image tokens too
    kept_img = rng.random((b, n)) < 0.5
    keep = 6
    # tcjax: order-preserving gather of up to `keep` kept image tokens, then padding.
    idx = np.zeros((b, keep), np.int32)
    mask = np.zeros((b, keep), bool)
    for i in range(b):
      sel = np.flatnonzero(kept_img[i] & valid[i, :n])[:keep]
      idx[i, :len(sel)], mask[i, :len(sel)] = sel, True
    new_valid = np.concatenate([mask, valid[:, n:]], 1)
    got = np.asarray(gemma.renumber(jnp.asarray(new_valid)))
    old_index = np.concatenate([idx, np.broadcast_to(np.arange(n, n + t), (b, t))], 1)
    for i in range(b):
      stay = np.zeros(n + t, bool)
      stay[idx[i][mask[i]]] = True
      stay[n:] = True
      want = official_renumbered(valid[i], stay)
      for j in np.flatnonzero(new_valid[i]):
        assert got[i, j] == want[old_index[i, j]]
    # Before any step the positions are the same rule over the input (big_vision's).
    np.testing.assert_array_equal(np.asarray(gemma.renumber(jnp.asarray(valid))),
                                  np.maximum(np.cumsum(valid, 1) - 1, 0))


# ---- Through the model: Gemma 2 (its sliding window reads positions) with padded prompts. ----

IMG = SiglipConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=16)
N = IMG.num_patches  # 16
CONFIG = PaliGemmaConfig(img=IMG, llm=GemmaConfig(
    version=2, vocab_size=40, width=24, depth=4, mlp_dim=48, num_heads=4, num_kv_heads=2,
    head_dim=8, query_pre_attn_scalar=8, attn_logits_softcap=20.0, final_logits_softcap=10.0,
    sliding_window=10))
T, LENGTHS = 6, (6, 4)  # prompt capacity, each example's prompt length
PROMPT_MASK = np.arange(T)[None] < np.asarray(LENGTHS)[:, None]
STEPS = 3


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(3)
  _, params, flat = make_params(CONFIG, seed=3)
  image = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  text = rng.integers(3, 40, (2, T)).astype(np.int32)
  text[:, 0] = 2
  text = np.where(PROMPT_MASK, text, 0).astype(np.int32)
  return params, image, text, PROMPT_MASK


def _prefill(params, image, text, prompt_mask, plan, cache_size=0):
  m = PaliGemma(CONFIG).with_plan(plan)
  fn = jax.jit(lambda p: m.apply({"params": p}, image, text, np.zeros_like(text), prompt_mask,
                                 method=m.prefill, cache_size=cache_size))
  return m, fn(params)


PYRAMID = {"method": "pyramiddrop", "layers": (1, 2), "ratios": (0.5, 0.25)}


def check_segment_positions(aux, official):
  """The RoPE positions of every cache segment (`aux["llm_positions"]`) against the NumPy rule:
  PyramidDrop's renumbering (`official="reindex"`) or FastV's kept positions."""
  valid0 = np.concatenate([np.ones((2, N), bool), PROMPT_MASK], 1)
  pos0 = np.maximum(np.cumsum(valid0, 1) - 1, 0)
  segs = aux["llm_positions"]
  assert len(segs) == len(aux["llm_kept_pos"]) + 1
  np.testing.assert_array_equal(np.asarray(segs[0]), np.where(valid0, pos0, -1))
  for j, kept_pos in enumerate(aux["llm_kept_pos"], 1):
    got = np.asarray(segs[j])
    kept_pos = np.asarray(kept_pos)  # positions entering the decoder = indices here
    n_img = kept_pos.shape[1]
    for b in range(2):
      keep = np.zeros(N + T, bool)
      keep[kept_pos[b][kept_pos[b] >= 0]] = True
      keep[N:] = True
      if official == "reindex":
        want = official_renumbered(valid0[b], keep)
      else:
        want = official_kept(pos0[b], valid0[b], keep)
      old = list(kept_pos[b]) + list(range(N, N + T))
      for slot, i in enumerate(old):
        ok = (slot < n_img and i >= 0) or (slot >= n_img and valid0[b, i])
        assert got[b, slot] == (want[i] if ok else -1), (j, b, slot)


def check_decode_positions(before, after, s, official):
  """Decode step `s` wrote its token, in every segment, at that segment's cache length (the
  official reindex rule) or at the original next position (original)."""
  for seg, nseg in zip(before.segments, after.segments):
    at = np.asarray(nseg.pos)[:, seg.length + s]
    if official == "reindex":
      entries = np.asarray(seg.valid)[:, :seg.length].sum(1)  # valid prefill entries
      np.testing.assert_array_equal(at, official_decode_position(entries, s))
    else:
      np.testing.assert_array_equal(at, np.asarray(LENGTHS) + N + s)


def test_a_hook_with_an_unknown_value_fails_at_trace_time(setup):
  params, image, text, prompt_mask = setup
  plain = PaliGemma(CONFIG)
  (hook,) = _hooks({"method": "fastv", "layer": 2, "budget": 4})
  hook = dataclasses.replace(hook, positions="bogus")

  def run(p):
    x, valid, ar, img, _ = plain.apply({"params": p}, image, text, np.zeros_like(text),
                                       prompt_mask, method=plain.embed_image_and_text)
    seq = gemma.Seq(x=x, pos=gemma.renumber(valid), valid=valid, mask_ar=ar, n_img=N)
    return gemma.prefill(p["llm"], seq, img, CONFIG.llm, (hook,))

  with pytest.raises(ValueError, match="positions must be one of"):
    jax.eval_shape(run, params)


def _survivors(tokens, kept_pos):
  """The image Tokens of `embed_image` cut to the survivors (positions = indices here)."""
  kept_pos = np.asarray(kept_pos)
  hit = np.zeros((kept_pos.shape[0], tokens.num_tokens), np.float32)
  for b in range(kept_pos.shape[0]):
    hit[b, kept_pos[b][kept_pos[b] >= 0]] = 1.0
  return compress.topk(tokens, kept_pos.shape[1], scores=jnp.asarray(hit))


def test_reindex_at_layer_zero_is_a_fresh_forward_on_the_survivors(setup):
  """A step at layer 0 with positions="reindex": the pruned prefill is the uncompressed model's
  prefill over the survivors alone (positions 0..n-1, the text right after)."""
  params, image, text, prompt_mask = setup
  plain = PaliGemma(CONFIG)
  _, img_tokens, _ = jax.jit(lambda p: plain.apply({"params": p}, image,
                                                   method=plain.embed_image))(params)
  plan = (("llm", {"method": "fastv", "layer": 0, "budget": 6, "attn_from": "next",
                   "positions": "reindex"}),)
  _, (logits, _, aux) = _prefill(params, image, text, prompt_mask, plan)
  np.testing.assert_array_equal(np.asarray(aux["llm_positions"][0])[:, :6],
                                np.broadcast_to(np.arange(6), (2, 6)))
  short = _survivors(img_tokens, aux["llm_kept_pos"][0])
  fresh, _, _ = jax.jit(lambda p, t: plain.apply(
      {"params": p}, None, text, np.zeros_like(text), prompt_mask, image_tokens=t,
      method=plain.prefill))(params, short)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(fresh), atol=2e-5, rtol=2e-5)


def _layers(p, lo, hi):
  return dict(p, layers=jax.tree.map(lambda a: a[lo:hi], p["layers"]))


def test_after_the_step_it_is_the_uncompressed_model_on_the_shortened_input(setup):
  """PyramidDrop (official "reindex") at layer 2 (even: Gemma 2's local / global layers keep
  their parity): layers 0-1 on everything, then the uncompressed layers 2-3 over the survivors'
  hidden states alone at positions 0..n-1 give the pruned prefill's logits."""
  params, image, text, prompt_mask = setup
  plan = (("llm", {"method": "pyramiddrop", "layers": (2,), "ratios": (0.25,)}),)
  _, (logits, _, aux) = _prefill(params, image, text, prompt_mask, plan)
  plain = PaliGemma(CONFIG)
  cfg2 = dataclasses.replace(CONFIG.llm, depth=2)

  def reference(p, kept_pos):
    x, valid, ar, img, _ = plain.apply({"params": p}, image, text, np.zeros_like(text),
                                       prompt_mask, method=plain.embed_image_and_text)
    llm = p["llm"]
    seq = gemma.Seq(x=x, pos=gemma.renumber(valid), valid=valid, mask_ar=ar, n_img=N)
    h, _, _, _ = gemma.prefill(_layers(llm, 0, 2), seq, img, cfg2)  # uncompressed, layers 0-1
    keep = kept_pos >= 0
    idx = jnp.where(keep, kept_pos, 0)
    take = lambda a: jnp.concatenate([jnp.take_along_axis(
        a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), 1), a[:, N:]], 1)
    valid2 = jnp.concatenate([keep, valid[:, N:]], 1)
    short = gemma.Seq(x=take(h), pos=gemma.renumber(valid2), valid=valid2, mask_ar=take(ar), n_img=idx.shape[1])
    out, _, _, _ = gemma.prefill(_layers(llm, 2, 4), short, img, cfg2)  # layers 2-3
    last = gemma._last_valid(valid2)  # pylint: disable=protected-access
    return gemma.logits(llm, jnp.take_along_axis(out, last[:, None, None], 1)[:, 0], cfg2)

  want = jax.jit(reference)(params, aux["llm_kept_pos"][0])
  np.testing.assert_allclose(np.asarray(logits), np.asarray(want), atol=2e-5, rtol=2e-5)


CACHED = {  # (entry, positions used: checked against the NumPy rules when not None)
    "pyramiddrop": (PYRAMID, "reindex"),  # official reindex, two stages, attn_from "next"
    "pyramiddrop-original": (dict(PYRAMID, positions="original"), "original"),
    # SparseVLM v1.5 (official reindex, a recycled cluster) then VTW renumbered (no image left).
    "sparsevlm-vtw": (({"method": "sparsevlm", "layers": (2,), "budgets": (6,)},
                       {"method": "vtw", "layer": 3, "budget": 1, "positions": "reindex"}), None),
}


@pytest.mark.parametrize("name", sorted(CACHED))
def test_cached_decoding_equals_the_full_forward(setup, name):
  """Prefill + KV-cached greedy decoding = the full (uncached) forward pass over the prompt and
  the decoded tokens (a causal suffix, which never changes what the prompt rows score), at
  every step, for prompts of different lengths in one batch; for pyramiddrop (official
  "reindex", and "original") the positions of every segment and of every decoded token follow
  the official rules."""
  params, image, text, prompt_mask = setup
  entries, official = CACHED[name]
  plan = tuple(("llm", e) for e in (entries if isinstance(entries, tuple) else (entries,)))
  m, (logits, cache, aux) = _prefill(params, image, text, prompt_mask, plan, cache_size=STEPS)
  if official:
    check_segment_positions(aux, official)
  step = jax.jit(lambda p, tok, c: m.apply({"params": p}, tok, c, method=m.decode_step))
  steps = [np.asarray(logits)]
  tokens = []
  for s in range(STEPS):
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    tokens.append(np.asarray(tok))
    logits, new = step(params, tok, cache)
    if official:
      check_decode_positions(cache, new, s, official)
    cache = new
    steps.append(np.asarray(logits))
  full_text = np.concatenate([text, np.stack(tokens, 1)], 1)
  ar = np.concatenate([np.zeros((2, T)), np.ones((2, STEPS))], 1).astype(np.int32)
  mask = np.concatenate([prompt_mask, np.ones((2, STEPS), bool)], 1)
  full, _ = jax.jit(lambda p: m.apply({"params": p}, image, full_text, ar, mask))(params)
  full = np.asarray(full)
  last = np.asarray(LENGTHS) - 1
  np.testing.assert_allclose(steps[0], full[np.arange(2), last], atol=5e-5, rtol=5e-5)
  for s in range(1, STEPS + 1):
    np.testing.assert_allclose(steps[s], full[:, T + s - 1], atol=5e-5, rtol=5e-5,
                               err_msg=f"step {s}")
