"""The PaliGemma model: faithful to an independent NumPy reference, plans that keep everything are
the identity, in-LLM pruning scores and KV-cached decoding checked against brute force."""

import dataclasses
import functools

import numpy as np
import jax
import jax.numpy as jnp
import pytest

import paligemma_ref as ref
import tcjax
import tcjax.checkpoints as ckpt
from tcjax.nn import GemmaConfig, PaliGemma, PaliGemmaConfig, SiglipConfig

IMG = SiglipConfig(width=16, depth=3, mlp_dim=32, num_heads=2, patch_size=4, image_size=16)
N = IMG.num_patches  # 16 image tokens
CONFIGS = {
    1: PaliGemmaConfig(img=IMG, llm=GemmaConfig(
        version=1, vocab_size=50, width=24, depth=4, mlp_dim=48, num_heads=2, num_kv_heads=1,
        head_dim=8)),
    # window 12 < image + prompt: the window binds, and the prefix-sees-prefix rule with it
    2: PaliGemmaConfig(img=IMG, llm=GemmaConfig(
        version=2, vocab_size=50, width=24, depth=4, mlp_dim=48, num_heads=4, num_kv_heads=2,
        head_dim=8, query_pre_attn_scalar=6, attn_logits_softcap=8.0, final_logits_softcap=5.0,
        sliding_window=12)),
}
T_PREFIX, T_SUFFIX = 6, 3


@functools.lru_cache(maxsize=None)
def make_params(config, seed=0):
  """Random params (NumPy: no init to compile) with non-trivial norm scales and biases, so no
  convention (the (1 + scale) norms, transposes) hides behind zeros or ones."""
  rng = np.random.default_rng(seed)
  flat = {}
  for k, shape in ckpt.param_shapes(config).items():
    if k.endswith("scale"):
      flat[k] = (k.startswith("img/") + rng.normal(size=shape) * 0.3).astype(np.float32)
    elif k.endswith("bias"):
      flat[k] = (rng.normal(size=shape) * 0.3).astype(np.float32)
    else:
      fan_in = shape[-2] if len(shape) > 1 and not k.endswith("embedding") else shape[-1]
      flat[k] = (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)
  return PaliGemma(config), ckpt.unflatten({k: jnp.asarray(v) for k, v in flat.items()}), flat


@pytest.fixture(scope="module", params=[1, 2], ids=["gemma1", "gemma2"])
def setup(request):
  config = CONFIGS[request.param]
  model, params, flat = make_params(config, seed=request.param)
  return config, model, params, flat


def inputs(seed=0, B=2, t_prefix=T_PREFIX, t_suffix=T_SUFFIX):
  rng = np.random.default_rng(seed)
  image = rng.uniform(-1, 1, size=(B, IMG.image_size, IMG.image_size, 3)).astype(np.float32)
  text = rng.integers(3, 50, size=(B, t_prefix + t_suffix)).astype(np.int32)
  text[:, 0] = 2
  mask_ar = np.concatenate([np.zeros((B, t_prefix)), np.ones((B, t_suffix))], 1).astype(np.int32)
  return image, text, mask_ar


def test_forward_matches_numpy_reference(setup):
  config, model, params, flat = setup
  image, text, mask_ar = inputs(seed=1)
  got, aux = jax.jit(model.apply)({"params": params}, image, text, mask_ar)
  want = ref.paligemma_logits(flat, config, image, text, mask_ar)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-4)
  assert aux["llm_tokens"] == (N + T_PREFIX + T_SUFFIX,) * config.llm.depth


KEEP_ALL = [
    (("post_vit", {"method": "topk", "budget": N}),),
    (("post_vit", {"method": "pool", "budget": N, "window": 1}),),
    (("post_proj", {"method": "text_relevance", "keep": 1.0}),),
    (("vit", {"method": "keynorm", "layer": 1, "budget": N}),),
    (("llm", {"method": "fastv", "layer": 2, "keep": 1.0}),),
    (("llm", {"method": "dart", "layer": 1, "budget": N}),),
    (("llm", {"method": "pyramiddrop", "layers": (1, 3), "ratios": (1.0, 1.0)}),),
    (("llm", {"method": "sparsevlm", "layers": (2,), "budgets": (N,)}),),
]


@pytest.fixture(scope="module")
def plain_logits(setup):
  """The model without a plan on inputs(seed=2), jitted, once per config for every plan below
  (an eager apply per plan compiled the model op by op)."""
  _, model, params, _ = setup
  image, text, mask_ar = inputs(seed=2)
  return jax.jit(model.apply)({"params": params}, image, text, mask_ar)[0]


@pytest.mark.parametrize("plan", KEEP_ALL, ids=lambda p: f"{p[0][0]}-{p[0][1]['method']}")
def test_plans_that_keep_everything_are_the_identity(setup, plain_logits, plan):
  config, model, params, _ = setup
  image, text, mask_ar = inputs(seed=2)
  base = plain_logits
  got, aux = jax.jit(model.with_plan(plan).apply)({"params": params}, image, text, mask_ar)
  np.testing.assert_allclose(np.asarray(got), np.asarray(base), atol=1e-5, rtol=1e-5)


def _ref_text_rows(flat, config, image, text, mask_ar, layer):
  """Brute force: layer `layer`'s full attention (NumPy), mean over heads, prompt rows x image
  columns: [B, T_PREFIX, N]."""
  zimg = ref.image_embed(flat, config, image)
  x = np.concatenate([zimg, ref.embed_text(flat, config, text)], 1)
  ar = np.concatenate([np.zeros((text.shape[0], N)), mask_ar], 1)
  _, attn, _ = ref.decoder(flat, config, x, ar, attn_layers=(layer,))
  return attn[layer].mean(1)[:, N:N + T_PREFIX, :N], x


def _top_positions(scores, k):
  return np.sort(np.argsort(-scores, axis=-1, kind="stable")[:, :k], axis=-1)


@pytest.mark.parametrize("attn_from", ["prev", "next"])
def test_llm_attention_scores_equal_brute_force(setup, attn_from):
  config, model, params, flat = setup
  image, text, mask_ar = inputs(seed=3)
  K = 2
  plan = (("llm", {"method": "fastv", "layer": K, "keep": 0.5, "attn_from": attn_from}),)
  _, aux = jax.jit(model.with_plan(plan).apply)({"params": params}, image, text, mask_ar)
  want, _ = _ref_text_rows(flat, config, image, text, mask_ar, K - 1 if attn_from == "prev" else K)
  got = np.asarray(aux["llm_attn"][0])[:, :T_PREFIX]
  np.testing.assert_allclose(got, want, atol=1e-5)
  # FastV (official): the last prompt token's row decides; original positions are kept.
  np.testing.assert_array_equal(np.asarray(aux["llm_kept_pos"][0]),
                                _top_positions(want[:, -1], N // 2))


def test_sparsevlm_raters_and_scores_equal_brute_force(setup):
  config, model, params, flat = setup
  image, text, mask_ar = inputs(seed=4)
  plan = (("llm", {"method": "sparsevlm", "layers": (2,), "budgets": (5,)}),)
  _, aux = jax.jit(model.with_plan(plan).apply)({"params": params}, image, text, mask_ar)
  rows, x = _ref_text_rows(flat, config, image, text, mask_ar, 1)
  # Raters (SparseVLM v1 code): softmax over the prompt of raw visual-text dot products of the
  # layer-0 embeddings, mean over visual rows, keep the text tokens above the mean.
  s = np.einsum("bnd,btd->bnt", x[:, :N], x[:, N:N + T_PREFIX])
  m = np.exp(s - s.max(-1, keepdims=True))
  m /= m.sum(-1, keepdims=True)
  r = m.mean(1)
  raters = r > r.mean(-1, keepdims=True)
  scores = (rows * raters[..., None]).sum(1) / raters.sum(1, keepdims=True)
  # v1.5 (default): the 5 best by score stay, and 1 recycled cluster (int(0.3 * 11) + 1 = 4 of
  # the 11 deleted, int(4 / 10) + 1 = 1 cluster) joins them (tests/test_sparsevlm.py has it all).
  got = np.asarray(aux["llm_kept_pos"][0])
  assert got.shape == (2, 6)
  for b, want in enumerate(_top_positions(scores, 5)):
    assert np.isin(want, got[b]).all()


def _keep_masks(kept_pos, layers, n_text):
  """Reference pruning masks {layer: bool[B, S_K]} from the kept image positions of each hook
  (image token i sits at position i: no pre-LLM compression here)."""
  prune = {}
  img_pos = None
  for layer, kept in zip(layers, kept_pos):
    kept = np.asarray(kept)
    b = kept.shape[0]
    if img_pos is None:
      img_pos = np.broadcast_to(np.arange(N), (b, N))
    keep_img = np.stack([np.isin(img_pos[i], kept[i]) for i in range(b)])
    prune[layer] = np.concatenate([keep_img, np.ones((b, n_text), bool)], 1)
    img_pos = kept
  return prune


PRUNE_PLANS = {  # (plan, pruning layers, positions renumbered 0..n-1 from those layers on)
    "fastv": ((("llm", {"method": "fastv", "layer": 2, "keep": 0.25}),), (2,), False),
    # official PyramidDrop renumbers (the default; "original" in tests/test_positions.py)
    "pyramiddrop": ((("llm", {"method": "pyramiddrop", "layers": (1, 3),
                              "ratios": (0.5, 0.25)}),), (1, 3), True),
    "dart": ((("llm", {"method": "dart", "layer": 2, "budget": 6}),), (2,), False),
}


def _renumber(x, pos, ar, _):
  return x, np.broadcast_to(np.arange(x.shape[1], dtype=np.float64), x.shape[:2]), ar


@pytest.mark.parametrize("name", sorted(PRUNE_PLANS))
def test_pruned_prefill_then_decode_equals_pruned_reference(setup, name):
  """KV-cached decoding after in-LLM pruning = running the pruned sequence from scratch (NumPy,
  no cache) with the same positions (the original ones, or renumbered 0..n-1 at each pruning
  layer for PyramidDrop), at every step."""
  config, model, params, flat = setup
  plan, layers, reindex = PRUNE_PLANS[name]
  m = model.with_plan(plan)
  image, text, _ = inputs(seed=5, t_suffix=0)
  B, steps = text.shape[0], 4
  variables = {"params": params}
  logits, cache, aux = jax.jit(lambda v, i, t: m.apply(v, i, t, method=m.prefill,
                                                       cache_size=steps))(variables, image, text)
  step = jax.jit(lambda v, tok, c: m.apply(v, tok, c, method=m.decode_step))
  zimg = ref.image_embed(flat, config, image)
  tokens = []
  for s in range(steps + 1):
    ids = np.concatenate([text, np.asarray(tokens, np.int32).reshape(B, s)], 1)
    x = np.concatenate([zimg, ref.embed_text(flat, config, ids)], 1)
    ar = np.concatenate([np.zeros((B, N + T_PREFIX)), np.ones((B, s))], 1)
    prune = _keep_masks(aux["llm_kept_pos"], layers, ids.shape[1])
    want, _, _ = ref.decoder(flat, config, x, ar, prune=prune,
                             at_layer={l: _renumber for l in layers} if reindex else None)
    np.testing.assert_allclose(np.asarray(logits), want[:, -1], atol=1e-4, rtol=1e-4,
                               err_msg=f"step {s}")
    if s == steps:
      break
    tok = np.asarray(jnp.argmax(logits, -1)).astype(np.int32)
    tokens = np.concatenate([np.asarray(tokens, np.int32).reshape(B, s), tok[:, None]], 1)
    logits, cache = step(variables, jnp.asarray(tok), cache)
  # tcjax.generate runs the same loop: the same greedy tokens.
  gen = tcjax.generate(model, params, image, text, max_new_tokens=steps, plan=plan)
  np.testing.assert_array_equal(np.asarray(gen), tokens)
  # Layers from the pruning layer on cache only the retained tokens.
  n_kept = np.asarray(aux["llm_kept_pos"][-1]).shape[1]
  assert cache.segments[-1].k.shape[2] == n_kept + T_PREFIX + steps


def test_aux_reports_tokens_entering_each_layer():
  config = CONFIGS[1]
  model, params, _ = make_params(config)
  image, text, mask_ar = inputs(seed=6)
  T = T_PREFIX + T_SUFFIX
  plan = (("post_vit", {"method": "pool", "budget": 4}),
          ("llm", {"method": "fastv", "layer": 2, "budget": 2}))
  _, aux = jax.jit(model.with_plan(plan).apply)({"params": params}, image, text, mask_ar)
  assert aux["image_tokens"] == 4
  assert aux["llm_tokens"] == (4 + T, 4 + T, 2 + T, 2 + T)
  np.testing.assert_array_equal(np.asarray(aux["llm_valid_tokens"]), [[4 + T] * 2 + [2 + T] * 2] * 2)
  assert aux["vit_tokens"] == (N,) * IMG.depth


def test_prompts_of_different_lengths_generate_as_alone():
  # Gemma 2 (the sliding window sees positions, not slots) with in-LLM pruning (the scoring row
  # is each prompt's own last token).
  model, params, _ = make_params(CONFIGS[2])
  image, text, _ = inputs(seed=7, B=3, t_suffix=0)
  lengths = [6, 3, 5]
  prefix_mask = np.arange(T_PREFIX)[None] < np.asarray(lengths)[:, None]
  padded = np.where(prefix_mask, text, 0)
  for plan in [(("llm", {"method": "fastv", "layer": 1, "keep": 0.5}),)]:
    batch = np.asarray(tcjax.generate(model, params, image, padded, max_new_tokens=5, plan=plan,
                                      prefix_mask=prefix_mask))
    for b, n in enumerate(lengths):
      alone = tcjax.generate(model, params, image[b:b + 1], text[b:b + 1, :n], max_new_tokens=5,
                             plan=plan)
      np.testing.assert_array_equal(batch[b], np.asarray(alone)[0])


def test_sampling(setup):
  _, model, params, _ = setup
  image, text, _ = inputs(seed=8, t_suffix=0)
  greedy = tcjax.generate(model, params, image, text, max_new_tokens=6)
  cold = tcjax.generate(model, params, image, text, max_new_tokens=6, temperature=1e-4,
                        rng=jax.random.key(1))
  np.testing.assert_array_equal(np.asarray(cold), np.asarray(greedy))
  a, b, c = (tcjax.generate(model, params, image, text, max_new_tokens=6, temperature=3.0,
                            rng=jax.random.key(s)) for s in (2, 2, 3))
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert not np.array_equal(np.asarray(a), np.asarray(c))
  with pytest.raises(ValueError, match="rng"):
    tcjax.generate(model, params, image, text, max_new_tokens=2, temperature=1.0)
  with pytest.raises(ValueError, match="max_new_tokens"):
    tcjax.generate(model, params, image, text, max_new_tokens=0)


def test_eos_stops_an_example():
  model, params, _ = make_params(CONFIGS[1])
  image, text, _ = inputs(seed=9, t_suffix=0)
  greedy = np.asarray(tcjax.generate(model, params, image, text, max_new_tokens=6))
  eos = int(greedy[0, 1])  # pretend the second token of example 0 is EOS
  out = np.asarray(tcjax.generate(model, params, image, text, max_new_tokens=6, eos_id=eos,
                                  pad_id=0))
  first = int(np.argmax(greedy[0] == eos))
  assert np.all(out[0, first + 1:] == 0) and out[0, first] == eos


def test_decoding_stops_when_every_example_has_ended():
  # Two copies of one example decode the same greedy tokens; with the second of them as EOS the
  # loop must stop after that step, and with a token never emitted it runs every step.
  from tcjax.nn import sampling  # pylint: disable=g-import-not-at-top
  model, params, _ = make_params(CONFIGS[1])
  image, text, _ = inputs(seed=9, t_suffix=0)
  image, text = np.repeat(image[:1], 2, 0), np.repeat(text[:1], 2, 0)
  greedy = np.asarray(tcjax.generate(model, params, image, text, max_new_tokens=6))
  eos = int(greedy[0, 1])
  first = int(np.argmax(greedy[0] == eos))
  fn, args = sampling.generate_programs(model, params, image, text, max_new_tokens=6,
                                        eos_id=eos, pad_id=0)["decode"]
  tokens, steps = fn(*args)
  assert int(steps) == first + 1
  np.testing.assert_array_equal(np.asarray(tokens)[:, :first + 1], greedy[:, :first + 1])
  assert np.all(np.asarray(tokens)[:, first + 1:] == 0)
  never = int(max(greedy.max() + 1, 2))
  fn, args = sampling.generate_programs(model, params, image, text, max_new_tokens=6,
                                        eos_id=never, pad_id=0)["decode"]
  tokens, steps = fn(*args)
  assert int(steps) == 6
  np.testing.assert_array_equal(np.asarray(tokens), greedy)


def test_video_frames_are_encoded_independently():
  model, params, _ = make_params(CONFIGS[1])
  rng = np.random.default_rng(10)
  clip = rng.uniform(-1, 1, size=(2, 3, 16, 16, 3)).astype(np.float32)
  embed = jax.jit(lambda p, im: model.apply({"params": p}, im, method=model.embed_image))
  zv, tv, _ = embed(params, clip)
  assert tv.grid == (3, 4, 4) and zv.shape == (2, 3 * N, 24)
  for f in range(3):
    zf, _, _ = embed(params, clip[:, f])
    np.testing.assert_allclose(np.asarray(zv[:, f * N:(f + 1) * N]), np.asarray(zf), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(tv.pos[0, :, 0]), np.repeat(np.arange(3), N))
  # Encoding the frames in sequential chunks (bounded ViT memory) changes nothing.
  chunked = PaliGemma(dataclasses.replace(model.config, frame_chunks=3))
  zc, tc, _ = jax.jit(lambda p, c: chunked.apply({"params": p}, c, method=chunked.embed_image))(
      params, clip)
  np.testing.assert_allclose(np.asarray(zc), np.asarray(zv), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(tc.src), np.asarray(tv.src))
  # Decoded uint8 frames in [0, 255] are the float frames x * 127.5 + 127.5.
  raw = np.round((clip + 1) * 127.5).astype(np.uint8)
  zu, _, _ = jax.jit(lambda p, c: chunked.apply({"params": p}, c, method=chunked.embed_image))(
      params, raw)
  zf, _, _ = jax.jit(lambda p, c: chunked.apply({"params": p}, c, method=chunked.embed_image))(
      params, raw.astype(np.float32) / 127.5 - 1)
  np.testing.assert_allclose(np.asarray(zu), np.asarray(zf), atol=1e-4)
  uneven = PaliGemma(dataclasses.replace(model.config, frame_chunks=4))
  with pytest.raises(ValueError, match="frame_chunks=4 must be a positive divisor of the batch "
                                       "of 6"):
    uneven.apply({"params": params}, clip, method=uneven.embed_image)
  # Pooling runs frame by frame inside the chunks; it equals pooling the whole clip (the
  # projector is affine, so pooling before or after it is the same).
  pooled = PaliGemma(dataclasses.replace(model.config, frame_chunks=3,
                                         plan=(("post_vit", {"method": "pool", "keep": 0.25}),)))
  zp, tp, _ = jax.jit(lambda p, c: pooled.apply({"params": p}, c, method=pooled.embed_image))(
      params, clip)
  want = tcjax.compress.pool(tv.replace(x=zv), 12)
  np.testing.assert_allclose(np.asarray(zp), np.asarray(want.x), atol=1e-5)
  for field in ("pos", "size", "mask", "src"):
    np.testing.assert_array_equal(np.asarray(getattr(tp, field)), np.asarray(getattr(want, field)))
  plan = (("post_vit", {"method": "temporal_merge", "budget": 20}),)
  text = np.full((2, 4), 5, np.int32)
  logits, aux = jax.jit(model.with_plan(plan).apply)({"params": params}, clip, text)
  assert logits.shape == (2, 4, 50) and aux["llm_tokens"][0] == 20 + 4


@pytest.mark.parametrize("plan, match", [
    ((("post_vit", {"method": "nope", "budget": 4}),), "unknown method"),
    ((("post_vit", {"method": "fastv", "budget": 4}),), "acts at stages"),
    ((("post_vit", {"method": "pool"}),), "budget"),
    ((("llm", {"method": "fastv", "keep": 0.5}),), "layer"),
    ((("llm", {"method": "fastv", "layer": 9, "keep": 0.5}),), "layer"),
    ((("llm", {"method": "fastv", "layer": 0, "keep": 0.5}),), "layer 0"),
    ((("llm", {"method": "fastv", "layer": 1, "keep": 0.5}),
      ("llm", {"method": "dart", "layer": 1, "keep": 0.5})), "two llm-stage"),
    ((("llm", {"method": "pyramiddrop", "layers": (1, 2), "ratios": (0.5,)}),), "one value"),
    ((("post_vit", {"method": "pool", "budget": 99}),), "budget"),
    ((("bogus", {"method": "pool", "budget": 4}),), "stage"),
    ((("post_vit", {"method": "pool", "budget": 4, "colour": 1}),), "colour"),
])
def test_bad_plans_fail_clearly(plan, match):
  model, params, _ = make_params(CONFIGS[1])
  image, text, mask_ar = inputs()
  with pytest.raises(ValueError, match=match):
    # Traced only: the checks are Python, at trace time (eager, the ViT ran op by op first).
    jax.eval_shape(model.with_plan(plan).apply, {"params": params}, image, text, mask_ar)


def test_bad_inputs_fail_clearly():
  model, params, _ = make_params(CONFIGS[1])
  image, text, mask_ar = inputs()
  apply = functools.partial(jax.eval_shape, model.apply, {"params": params})  # as above
  with pytest.raises(ValueError, match="image"):
    apply(image[:, :8], text, mask_ar)
  with pytest.raises(ValueError, match="text"):
    apply(image, text.astype(np.float32), mask_ar)
  with pytest.raises(ValueError, match="mask_ar"):
    apply(image, text, mask_ar[:, :3])


def test_tome_in_the_vit_merges_exact_duplicates_without_changing_anything():
  """ToMe between attention and MLP of every ViT block, with proportional attention log(size):
  on an image of two kinds of identical patches (zero position embedding, so identical patches
  are identical tokens), merging duplicates must leave every patch's output unchanged - the
  invariant that size-weighted merging + proportional attention exist for."""
  model, params, _ = make_params(CONFIGS[1])
  params = jax.tree.map(lambda a: a, params)
  params["img"]["pos_embedding"] = jnp.zeros_like(params["img"]["pos_embedding"])
  rng = np.random.default_rng(14)
  kinds = rng.uniform(-1, 1, size=(2, 4, 4, 3)).astype(np.float32)  # two patch contents
  which = rng.integers(0, 2, size=(2, 4, 4))  # per example, per grid cell
  which[:, 0, :2] = [0, 1]  # both kinds present
  image = kinds[which].transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 16, 3)
  embed = lambda m: jax.jit(lambda p, i: m.apply({"params": p}, i, method=m.embed_image))
  dense, _, _ = embed(model)(params, image)
  plan = (("vit", {"method": "tome", "r": 3}),)
  z, tokens, aux = embed(model.with_plan(plan))(params, image)
  assert tuple(np.asarray(aux["vit_tokens"])) == (16, 13, 10) and z.shape[1] == 7
  np.testing.assert_array_equal(np.asarray(tokens.size.sum(1)), [16, 16])
  back = tcjax.compress.to_grid(tokens, z).reshape(2, N, -1)  # each patch: its token's output
  np.testing.assert_allclose(np.asarray(back), np.asarray(dense), atol=2e-5, rtol=2e-5)
  # Without proportional attention the merged duplicates are under-weighted: outputs change.
  plan = (("vit", {"method": "tome", "r": 3, "prop_attn": False}),)
  z, tokens, _ = embed(model.with_plan(plan))(params, image)
  back = tcjax.compress.to_grid(tokens, z).reshape(2, N, -1)
  assert np.abs(np.asarray(back) - np.asarray(dense)).max() > 1e-3
  # ToMe with r = 0 is the identity.
  z0, _, _ = embed(model.with_plan((("vit", {"method": "tome", "r": 0}),)))(params, image)
  np.testing.assert_allclose(np.asarray(z0), np.asarray(dense), atol=1e-6)
