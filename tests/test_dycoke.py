"""DyCoke against a NumPy transcription of the official code (KD-TAO/DyCoke): the TTM
(`llava_arch.py::dycole_ttm`) on random clips (same kept tokens, same features), the decode-time
KV policy (`modeling_qwen2.py::PrunableDynamicCache.dycoke_pruning / update_cache`) on random
attention rows, both gates, and through the tiny model: prefill + decoding steps against the
NumPy decoder (tests/paligemma_ref.py) with the policy's pruned entries hidden from layers >= L,
and a policy that prunes nothing leaves the model's logits unchanged."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import paligemma_ref as ref
import tcjax
from tcjax import compress
from tcjax.compress.dycoke import dycoke_kv_init, ttm_count, ttm_layout
from tcjax.nn import plan as plan_lib

from helpers import check_contract, greedy_decode
from test_model import CONFIGS, N, T_PREFIX, inputs, make_params

# ---- The official algorithm, in NumPy (float64). ----


def _normalize(x, eps=1e-12):  # torch.nn.functional.normalize
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def _cos(a, b, eps=1e-8):  # torch.nn.functional.cosine_similarity along the last axis
  return (a * b).sum(-1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1),
                                      eps)


def _least(sim, m):  # topk(m, largest=False).indices; ties to the lower index
  return np.argsort(sim, kind="stable")[:m]


def ttm_numpy(feat, per_frame, merging_ratio=0.7):
  """`dycole_ttm` on one clip feat [T * P, D]: the kept original token indices, in the official
  output order (frames in order, a compared frame's tokens by ascending similarity)."""
  t = feat.shape[0] // per_frame
  keep_ratio = 1 - merging_ratio
  m = int(keep_ratio * per_frame)
  frame = lambda i: feat[i * per_frame:(i + 1) * per_frame]
  ids = lambda i: np.arange(i * per_frame, (i + 1) * per_frame)
  out = []  # one index list per pair member, as the official `modified_image_feature`
  for i in range(0, t - 1, 2):
    sim = _cos(_normalize(frame(i)), _normalize(frame(i + 1)))
    out += [ids(i), ids(i + 1)[_least(sim, m)]]
  if not list(range(0, t - 4, 4)):
    raise ValueError("torch.stack([]): the official needs T > 4")
  for i in range(0, t - 4, 4):
    sim = _cos(frame(i), frame(i + 2))
    out[i] = ids(i)
    out[i + 2] = ids(i + 2)[_least(sim, m)]
  return np.concatenate(out)


def kv_numpy(rows, valid, p=0.8, threshold=0.9, gate="official"):
  """`dycoke_pruning` + `update_cache` over decoding steps for one example: rows [steps, n] the
  new token's head-mean attention at layer L - 1 over the visual span; valid [n] the entries
  that exist. Returns the kept visual entries (bool [steps, n]) layers >= L attend each step."""
  n_valid = int(valid.sum())
  idx = np.flatnonzero(valid)
  previous, chosen, out = None, None, []
  for a in rows:
    a = a[idx]  # the visual span (padding entries are not in the official cache at all)
    similarity = 0.0 if previous is None else _cos(a, previous)
    previous = a
    keep = np.zeros(len(valid), bool)
    if similarity < threshold:
      num_keep = int(n_valid * (1 - p))
      top = np.argsort(-a, kind="stable")[:num_keep]
      keep[idx[top]] = True
      chosen = keep
    elif gate == "official":  # kv_cache stays None: the full cache
      keep[idx] = True
    else:  # the paper: the previous subset again
      keep = chosen
    out.append(keep)
  return np.stack(out)


TTM = jax.jit(compress.dycoke, static_argnums=1, static_argnames=("prune", "official_tail"))


def clip_tokens(frames, grid=(4, 4), batch=3, dim=8, seed=0):
  x = jax.random.normal(jax.random.key(seed), (batch, frames * grid[0] * grid[1], dim))
  return tcjax.Tokens.from_video(x, frames=frames, grid=grid)


def kept(out):
  """[per example: input index of each valid output token] (raw-grid input: read off src)."""
  src = np.asarray(out.src)
  return [np.flatnonzero(s >= 0) for s in src]


# ---- Stage 1: TTM. ----


@pytest.mark.parametrize("frames", [5, 32])
def test_ttm_matches_official(frames):
  t = clip_tokens(frames, seed=frames)
  p = 16
  count = ttm_count(frames, p, int(0.3 * p))
  out = jax.jit(lambda t: compress.dycoke(t, count, prune=0.7))(t)
  check_contract(out, count, 3)
  x = np.asarray(t.x, np.float64)
  for b in range(3):
    want = ttm_numpy(x[b], p)
    assert len(want) == count
    got = kept(out)[b]
    np.testing.assert_array_equal(got, np.sort(want))  # the same tokens, in raster order
    np.testing.assert_allclose(np.asarray(out.x[b]), x[b, got], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(out.pos[b]), np.asarray(t.pos[b, got]))
  if frames == 32:  # 9 frames whole (0, 4, ..., 28 and 30, the official tail), 23 at m = 4
    assert count == 9 * 16 + 23 * 4


def test_layout_and_counts():
  np.testing.assert_array_equal(ttm_layout(8), [-1, 0, 0, 2, -1, 4, -1, 6])
  np.testing.assert_array_equal(ttm_layout(8, official_tail=False), [-1, 0, 0, 2, -1, 4, 4, 6])
  np.testing.assert_array_equal(ttm_layout(5), [-1, 0, 0, 2, -2])  # odd: the last frame goes
  np.testing.assert_array_equal(ttm_layout(2), [-1, 0])
  # Official sizes: 32 frames of 196 at K = 0.7 keep 58 per compared frame, 3098 in all.
  assert int(0.3 * 196) == 58 and ttm_count(32, 196, 58) == 3098
  with pytest.raises(ValueError, match="T > 4"):  # the official fails on 4 frames ...
    ttm_numpy(np.ones((64, 4)), 16)
  t = clip_tokens(4)  # ... tcjax keeps frames 0 and 2 (the tail) whole, 4 of frames 1 and 3
  per_frame = lambda out: [int(((np.asarray(out.pos[0, :, 0]) == f) & np.asarray(out.mask[0]))
                               .sum()) for f in range(4)]
  run = TTM
  out = run(t, 40, prune=0.7)
  np.testing.assert_array_equal(out.count(), [40] * 3)
  assert per_frame(out) == [16, 4, 16, 4]
  out = run(t, 48, prune=0.7, official_tail=False)  # frame 2 against frame 0 too
  assert per_frame(out) == [16, 4, 4, 4]
  assert int(out.count()[0]) == 28 and not np.asarray(out.mask[:, 28:]).any()


def test_budget_sets_the_per_frame_count():
  t = clip_tokens(8, seed=1)
  # 8 frames: 3 whole (0, 4, 6), 5 compared; budget 78 -> m = (78 - 48) // 5 = 6, no padding.
  out = TTM(t, 78)
  np.testing.assert_array_equal(out.count(), [78] * 3)
  np.testing.assert_array_equal(kept(out)[0], kept(TTM(t, 78, prune=1 - 6 / 16))[0])
  out = TTM(t, 80)  # 2 more slots than 5 frames can share: padding
  check_contract(out, 80, 3)
  np.testing.assert_array_equal(out.count(), [78] * 3)
  with pytest.raises(ValueError, match="at least 48"):
    compress.dycoke(t, 40)
  with pytest.raises(ValueError, match="below the TTM's"):
    compress.dycoke(t, 60, prune=0.5)


def test_padding_and_nan_are_never_kept():
  t = clip_tokens(4, batch=2, seed=2)
  x = np.asarray(t.x).copy()
  x[0, 16 + 3] = np.nan  # frame 1, token 3: NaN similarity ranks last
  mask = np.ones((2, 64), bool)
  mask[1, 16 + 5] = False  # a padding token in frame 1
  t = t.replace(x=jnp.asarray(x), mask=jnp.asarray(mask))
  out = TTM(t, 40, prune=0.7)
  assert 16 + 3 not in kept(out)[0]
  assert 16 + 5 not in kept(out)[1]


def test_jit_vmap_and_batch():
  t0, t1 = clip_tokens(4, batch=2, seed=3), clip_tokens(4, batch=2, seed=4)
  f = jax.jit(functools.partial(compress.dycoke, budget=40))
  chex.assert_trees_all_close(f(t0), compress.dycoke(t0, 40))  # jit = op by op
  both = jax.tree.map(lambda a, b: jnp.stack([a, b]), t0, t1)
  out = jax.jit(jax.vmap(f))(both)
  chex.assert_trees_all_close(jax.tree.map(lambda a: a[1], out), f(t1), atol=1e-6)
  one = jax.tree.map(lambda a: a[1:], t0)  # example 1 alone = example 1 of the batch
  chex.assert_trees_all_close(jax.tree.map(lambda a: a[1:], f(t0)), f(one))


def test_bad_input():
  t = clip_tokens(4)
  image = tcjax.Tokens.from_grid(jnp.ones((2, 16, 8)), (4, 4))
  with pytest.raises(ValueError, match="2 frames"):
    compress.dycoke(image, 8)
  with pytest.raises(ValueError, match="prune"):
    compress.dycoke(t, 40, prune=1.5)
  with pytest.raises(ValueError, match="official_tail"):
    compress.dycoke(t, 40, official_tail=1)
  with pytest.raises(ValueError, match="colour"):
    compress.apply("dycoke", t, 40, colour=1)
  with pytest.raises(ValueError, match="budget"):
    compress.dycoke(t, 0)
  with pytest.raises(ValueError, match="tokens"):
    compress.dycoke(t.x, 40)


# ---- Stage 2: the decode-time KV policy. ----


def run_policy(rows, valid, **options):
  """Our policy over steps: keep [steps, B, n] and the states."""
  state = compress.init_decode("dycoke", valid, **options)
  step = jax.jit(lambda s, a: compress.apply_decode("dycoke", s, valid=valid, attn=a, **options))
  keeps = []
  for a in rows:
    state, keep = step(state, a)
    keeps.append(np.asarray(keep))
  return np.stack(keeps), state


@pytest.mark.parametrize("gate", ["official", "paper"])
def test_kv_policy_matches_official(gate):
  rng = np.random.default_rng(0)
  steps, b, n = 8, 3, 40
  base = rng.random((b, n))
  rows = []
  for s in range(steps):  # alternate stable (a small wobble) and changed (a new row) steps
    base = base + 0.02 * rng.random((b, n)) if s % 3 else rng.random((b, n))
    rows.append(base / base.sum(-1, keepdims=True))
  rows = np.asarray(rows, np.float32)
  valid = np.ones((b, n), bool)
  valid[1, 30:] = False  # example 1 has 30 image entries
  got, state = run_policy(jnp.asarray(rows), jnp.asarray(valid), gate=gate)
  for i in range(b):
    want = kv_numpy(rows[:, i].astype(np.float64), valid[i], gate=gate)
    np.testing.assert_array_equal(got[:, i], want)
  # Both branches ran: 20 % kept on changed steps, the full span or the old subset on the rest.
  counts = got.sum(-1)
  # The official's Python floats: int(40 * (1 - 0.8)) = int(7.999...) = 7, int(30 * 0.2) = 5.
  assert int(counts[0, 0]) == 7 and int(counts[0, 1]) == 5
  assert counts[:, 0].max() == (40 if gate == "official" else 7)
  np.testing.assert_allclose(np.asarray(state["prev"][0]), rows[-1, 0])


def test_kv_policy_options_and_errors():
  valid = jnp.ones((2, 10), bool)
  state = dycoke_kv_init(valid)
  a = jnp.full((2, 10), 0.1)
  _, keep = compress.apply_decode("dycoke", state, valid=valid, attn=a, prune=0.0)
  assert bool(keep.all())  # nothing pruned
  _, keep = compress.apply_decode("dycoke", state, valid=valid, attn=a, prune=1.0)
  assert not bool(keep.any())
  with pytest.raises(ValueError, match="colour"):
    compress.apply_decode("dycoke", state, valid=valid, attn=a, colour=1)
  with pytest.raises(ValueError, match="attn"):
    compress.apply_decode("dycoke", state, valid=valid)
  with pytest.raises(ValueError, match="attn"):
    compress.apply_decode("dycoke", state, valid=valid, attn=a[:, :9])
  with pytest.raises(ValueError, match="gate"):
    compress.apply_decode("dycoke", state, valid=valid, attn=a, gate="later")
  with pytest.raises(ValueError, match="prune"):
    compress.init_decode("dycoke", valid, prune=2)
  with pytest.raises(ValueError, match="unknown decode policy"):
    compress.apply_decode("nope", state, valid=valid)
  policy = compress.DECODE_POLICIES["dycoke"]
  assert policy.needs == ("attn",) and policy.family == "sampling" and policy.paper
  assert policy.options == {"prune": 0.8, "threshold": 0.9, "gate": "official"}


@pytest.mark.parametrize("entry, word", [
    ({"method": "dycoke", "layer": 2, "gate": "later"}, "gate"),
    ({"method": "dycoke", "layer": 2, "colour": 1}, "colour"),
    ({"method": "dycoke", "layer": 2, "prune": "0.5"}, "prune"),
    ({"method": "dycoke"}, "'layer'"),
    ({"method": "dycoke", "layer": 2, "budget": 4}, "budget"),
    ({"method": "nope", "layer": 2}, "unknown decode policy"),
])
def test_decode_entries_are_checked(entry, word):
  with pytest.raises(ValueError, match=word):
    plan_lib.normalize((("decode", entry),))


def test_decode_hooks():
  plan = plan_lib.normalize((("decode", {"method": "dycoke", "layer": -1, "prune": 0.5}),))
  (h,) = plan_lib.decode_hooks(plan, 4)
  assert (h.layer, h.method, h.options, h.signals, h.signal_layer) == (
      3, "dycoke", (("prune", 0.5),), ("attn",), 2)
  with pytest.raises(ValueError, match="layer >= 1"):
    plan_lib.decode_hooks(plan_lib.normalize((("decode", {"method": "dycoke", "layer": 0}),)), 4)
  with pytest.raises(ValueError, match="layer"):
    plan_lib.decode_hooks(plan_lib.normalize((("decode", {"method": "dycoke", "layer": 4}),)), 4)


# ---- Through the model. ----

L = 2  # the policy's layer in the 4-layer tiny decoder (attention of layer 1)


def test_decoding_equals_reference_with_pruned_entries_hidden():
  _check_decoding_against_reference(1, "official")


@pytest.mark.parametrize("version, gate", [(2, "paper"), (2, "official"), (1, "paper")])
def test_decoding_equals_reference_other_gates_and_gemma2(version, gate):
  _check_decoding_against_reference(version, gate)


def _check_decoding_against_reference(version, gate):
  """Every decoding step: the policy's attention row is the reference decoder's (layer L - 1,
  the new token's row, mean over heads), its kept entries are the official rule's, and the
  logits are the reference decoder's with each generated token's pruned image entries hidden
  from layers >= L (so a pruned entry is never attended)."""
  config = CONFIGS[version]
  model, params, flat = make_params(config, seed=version)
  image, text, _ = inputs(seed=11, t_suffix=0)
  steps = 4
  plan = (("decode", {"method": "dycoke", "layer": L, "prune": 0.5, "threshold": 0.995,
                      "gate": gate}),)
  logits, _, caches, tokens = greedy_decode(model, params, plan, image, text, steps)
  b = text.shape[0]
  zimg = ref.image_embed(flat, config, image)
  rows, rules = [], []
  for s in range(steps + 1):
    ids = np.concatenate([text, tokens[:, :s]], 1)
    x = np.concatenate([zimg, ref.embed_text(flat, config, ids)], 1)
    ar = np.concatenate([np.zeros((b, N + T_PREFIX)), np.ones((b, s))], 1)
    if s:  # step s fed tokens[:, s - 1], at position N + T_PREFIX + s - 1
      _, attns, _ = ref.decoder(flat, config, x, ar, attn_layers=(L - 1,), hide=list(rules))
      rows.append(attns[L - 1][:, :, -1, :N].mean(1))  # [B, N], layers < L see everything
      state = caches[s].decode_state[0]
      np.testing.assert_allclose(np.asarray(state["prev"]), rows[-1], atol=1e-5)
      keep = np.stack([kv_numpy(np.asarray(rows)[:, i], np.ones(N, bool), p=0.5,
                                threshold=0.995, gate=gate)[-1] for i in range(b)])
      np.testing.assert_array_equal(np.asarray(state["keep"]), keep, err_msg=f"step {s}")
      pos = N + T_PREFIX + s - 1
      rules.append((np.where(keep, -1, np.arange(N)), pos, L, pos + 1))  # image pos = index
    want, _, _ = ref.decoder(flat, config, x, ar, hide=list(rules))
    np.testing.assert_allclose(logits[s], want[:, -1], atol=2e-4, rtol=2e-4, err_msg=f"step {s}")
  assert any(r[0].max() >= 0 for r in rules)  # something was pruned
  if (version, gate) == (1, "official"):  # generate's loop carries the policy in the cache
    gen = tcjax.generate(model, params, image, text, max_new_tokens=steps, plan=plan)
    np.testing.assert_array_equal(np.asarray(gen), tokens)


def test_pruning_nothing_leaves_the_model_unchanged():
  model, params, _ = make_params(CONFIGS[1], seed=1)
  image, text, _ = inputs(seed=12, t_suffix=0)
  plain, _, _, tokens = greedy_decode(model, params, (), image, text, 3)
  plan = (("decode", {"method": "dycoke", "layer": 1, "prune": 0.0}),)
  got, _, caches, got_tokens = greedy_decode(model, params, plan, image, text, 3)
  np.testing.assert_array_equal(got_tokens, tokens)
  for a, b in zip(got, plain):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  assert bool(np.asarray(caches[-1].decode_state[0]["keep"]).all())


def test_clip_through_ttm_and_kv_policy():
  """The whole method on a 4-frame clip: TTM after the projector, then the KV policy; the
  image tokens reaching the decoder are the TTM's, and `generate` runs (a policy's state rides
  in the cache through the decoding loop)."""
  model, params, _ = make_params(CONFIGS[1], seed=1)
  rng = np.random.default_rng(13)
  clip = rng.uniform(-1, 1, size=(2, 4, 16, 16, 3)).astype(np.float32)
  text = np.full((2, 4), 5, np.int32)
  plan = (("post_proj", {"method": "dycoke", "budget": 40, "prune": 0.7}),
          ("decode", {"method": "dycoke", "layer": 2}))
  m = model.with_plan(plan)
  _, aux = jax.jit(m.apply)({"params": params}, clip, text)
  assert aux["image_tokens"] == 40 and aux["llm_tokens"][0] == 40 + 4
  out = tcjax.generate(model, params, clip, text, max_new_tokens=3, plan=plan)
  assert out.shape == (2, 3)
