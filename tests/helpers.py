"""Test inputs: tokens plus every signal a method declares it needs (contract tests), a
training batch of a config's testbed stream (training tests), and greedy KV-cached decoding
through a plan (decode-time policy tests)."""

import jax
import jax.numpy as jnp
import numpy as np

import tcjax
from tcjax.compress import METHODS

# Per-method test geometry where the default (one 8x8 image, budget 16) does not fit.
CASES = {
    "fastvid": dict(frames=4, grid=(4, 4), budget=40),
    "framefusion": dict(frames=4, grid=(4, 4), budget=40),
    "temporal_merge": dict(frames=4, grid=(4, 4), budget=40),
    "slowfast": dict(frames=4, grid=(4, 4), budget=28),
    "prunevid": dict(frames=4, grid=(4, 4), budget=24),
    "prunevid_llm": dict(frames=4, grid=(4, 4), budget=16),
    "holitom": dict(frames=4, grid=(4, 4), budget=16),
    "dycoke": dict(frames=4, grid=(4, 4), budget=40),
    "mustdrop_merge": dict(frames=1, grid=(6, 6), budget=30),
}
DEFAULT_CASE = dict(frames=1, grid=(8, 8), budget=16)


def case(name):
  return {**DEFAULT_CASE, **CASES.get(name, {})}


def make_tokens(batch, frames, grid, dim=8, seed=0, dtype=jnp.float32):
  n = frames * grid[0] * grid[1]
  x = jax.random.normal(jax.random.key(seed), (batch, n, dim), dtype)
  if frames == 1:
    return tcjax.Tokens.from_grid(x, grid)
  return tcjax.Tokens.from_video(x, frames=frames, grid=grid)


# Optional signals that some option values need (SparseVLM v2.0): made whenever accepted, so that
# every option value runs on the same inputs.
FOR_OPTIONS = ("attn_heads", "rope_logits")


def make_signals(name, tokens, seed=0, num_queries=3, text_len=5):
  """Random signals for method `name`, shaped after `tokens`."""
  b, n, d = tokens.x.shape
  keys = jax.random.split(jax.random.key(seed + 1000), 8)
  out = {}
  m = METHODS[name]
  for s in m.needs + tuple(s for s in FOR_OPTIONS if s in m.optional):
    if s == "scores":
      out[s] = jax.random.normal(keys[0], (b, n))
    elif s == "attn":
      out[s] = jax.nn.softmax(3 * jax.random.normal(keys[1], (b, num_queries, n)), -1)
    elif s == "attn_heads":
      out[s] = jax.nn.softmax(3 * jax.random.normal(keys[1], (b, 2, num_queries, n)), -1)
    elif s == "keys":
      out[s] = jax.random.normal(keys[2], (b, n, 6))
    elif s == "keys_heads":
      out[s] = jax.random.normal(keys[2], (b, n, 2, 3))
    elif s == "text":
      out[s] = jax.random.normal(keys[3], (b, text_len, d))
    elif s == "text_mask":
      rows = num_queries if {"attn", "attn_heads"} & set(METHODS[name].needs) else text_len
      lengths = jnp.arange(b) % (rows - 1) + 2
      out[s] = jnp.arange(rows)[None] < lengths[:, None]
    elif s == "rng":
      out[s] = keys[5]
    elif s == "vit_scores":
      out[s] = jax.random.uniform(keys[4], (b, n))
    elif s == "image_count":  # every token entered the decoder
      out[s] = jnp.full((b,), n, jnp.int32)
    elif s == "attn_heads":  # 2 heads
      out[s] = jax.nn.softmax(3 * jax.random.normal(keys[6], (b, 2, num_queries, n)), -1)
    elif s == "rope_logits":  # positive, as near the diagonal of real RoPE logits
      out[s] = 1 + jax.random.uniform(keys[7], (b, num_queries, n))
  return out


def inputs(name, batch=3, seed=0, dim=8):
  c = case(name)
  tokens = make_tokens(batch, c["frames"], c["grid"], dim=dim, seed=seed)
  return tokens, make_signals(name, tokens, seed=seed), c["budget"]


def np_tree(tree):
  return jax.tree.map(np.asarray, tree)


def check_contract(out, budget, batch):
  """Invariants every output keeps, checked independently of the method's code.

  - exactly `budget` tokens, every leaf batched;
  - valid tokens first, in strictly increasing raster order of their origin;
  - `src` points at valid tokens only, and a valid token stands for exactly the patches mapped
    to it (`size` == count), one of which is its own origin `pos`.
  """
  o = np_tree(out)
  m = out.num_patches
  assert o.x.shape[:2] == (batch, budget)
  assert o.pos.shape == (batch, budget, 3) and o.pos.dtype == np.int32
  assert o.size.shape == (batch, budget) and o.mask.shape == (batch, budget)
  assert o.src.shape == (batch, m) and o.src.dtype == np.int32
  t, h, w = out.grid
  lin = (o.pos[..., 0] * h + o.pos[..., 1]) * w + o.pos[..., 2]
  for b in range(batch):
    valid = o.mask[b]
    count = int(valid.sum())
    assert valid[:count].all(), "padding must come after the valid tokens"
    assert np.all(np.diff(lin[b, :count]) > 0), "valid tokens must be in raster order"
    src = o.src[b]
    assert np.all((src >= -1) & (src < budget))
    assert np.all(valid[src[src >= 0]]), "src points at a padding token"
    counts = np.bincount(src[src >= 0], minlength=budget)
    np.testing.assert_allclose(o.size[b, :count], counts[:count], rtol=1e-5)
    assert np.all(counts[count:] == 0)
    np.testing.assert_array_equal(src[lin[b, :count]], np.arange(count),
                                  err_msg="a token's origin patch must be one it carries")
    assert np.all(np.isfinite(o.x[b, :count]))


def scene_clip(seed, batch=2, scenes=(3, 5), grid=(6, 6), dim=8, calm=0.6):
  """Clips of scenes in which a `calm` share of positions barely change (static) and the rest
  do: (x float32[batch, frames * h * w, dim], Tokens, the generator, for further draws)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import tcjax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  p = grid[0] * grid[1]
  xs = []
  for _ in range(batch):
    parts = []
    for length in scenes:
      base = rng.normal(size=(p, dim))
      scale = np.where(rng.random(p) < calm, 0.05, 1.5)[:, None]
      parts.append(base + scale * rng.normal(size=(length, p, dim)))
    xs.append(np.concatenate(parts).reshape(-1, dim))
  x = np.stack(xs).astype(np.float32)
  return x, tcjax.Tokens.from_video(jnp.asarray(x), frames=sum(scenes), grid=grid), rng


def train_batch(cfg, batch_size=8):
  """The first `batch_size` examples of config `cfg`'s testbed training stream (its families,
  tokenizer and max_len): the model's inputs "image", "text", "mask_ar", "mask_loss",
  "input_mask"."""
  from tcjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from tcjax.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  ds = pipeline.testbed_stream(cfg.data.families, Tokenizer(cfg.tokenizer), split="train",
                               seed=0, batch_size=batch_size, max_len=cfg.data.max_len)
  b = ds[0]
  return {k: b[k] for k in ("image", "text", "mask_ar", "mask_loss", "input_mask")}


def greedy_decode(model, params, plan, image, text, steps):
  """Prefill with `plan`, then `steps` greedy `decode_step`s, each program jitted once ->
  (logits: [prefill's, then each step's] float[B, V] arrays, the prefill's aux, caches: [the
  prefill's, then each step's], tokens: int32[B, steps] the greedy tokens fed back)."""
  m = model.with_plan(plan)
  variables = {"params": params}
  logits, cache, aux = jax.jit(lambda v, i, t: m.apply(v, i, t, method=m.prefill,
                                                       cache_size=steps))(variables, image, text)
  step = jax.jit(lambda v, tok, c: m.apply(v, tok, c, method=m.decode_step))
  out, caches, tokens = [np.asarray(logits)], [cache], []
  for _ in range(steps):
    tok = jnp.argmax(logits, -1).astype(jnp.int32)
    tokens.append(np.asarray(tok))
    logits, cache = step(variables, tok, cache)
    out.append(np.asarray(logits))
    caches.append(cache)
  return out, aux, caches, np.stack(tokens, 1)

