"""Measured cost (tcjax.eval.cost): the analytic FLOPs per stage against XLA's own count of the
compiled stages on a tiny model, uncompressed and compressed; memory and latency helpers on
hand-worked programs. Nothing here asserts a wall-clock threshold."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tcjax import checkpoints
from tcjax.eval import cost
from tcjax.nn import GemmaConfig, PaliGemma, PaliGemmaConfig, SiglipConfig

# Wide enough for the matrix products to dominate (the analytic count is those alone): the
# elementwise ops XLA also counts are O(n d) per layer against O(n d^2).
CONFIG = PaliGemmaConfig(
    img=SiglipConfig(width=64, depth=2, mlp_dim=128, num_heads=2, patch_size=4, image_size=16),
    llm=GemmaConfig(width=64, depth=3, mlp_dim=128, num_heads=2, num_kv_heads=1, head_dim=32,
                    vocab_size=64))
POOL_FASTV = (("post_vit", {"method": "pool", "budget": 4}),        # 16 patches -> 4 tokens
              ("llm", {"method": "fastv", "layer": 1, "budget": 2}))  # -> 2 from layer 1 on
TOME = (("vit", {"method": "tome", "r": 4}),)                         # 16 -> 12 -> 8 in the ViT


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.default_rng(0)
  params = checkpoints.unflatten({n: 0.2 * rng.normal(size=s).astype(np.float32)
                                  for n, s in checkpoints.param_shapes(CONFIG).items()})
  image = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
  text = rng.integers(2, 64, (2, 6)).astype(np.int32)
  mask = np.ones((2, 6), bool)
  mask[1, 4:] = False  # a right-padded prompt
  return params, image, text, mask


@pytest.fixture(scope="module")
def stages(inputs):
  params, image, text, mask = inputs
  model = PaliGemma(CONFIG)
  return {name: cost.stage_flops(model.with_plan(plan), params, image, text, mask)
          for name, plan in (("full", ()), ("pool_fastv", POOL_FASTV), ("tome", TOME))}


def test_analytic_counts_follow_the_plans(stages):
  # Token counts by hand: 16 patches, 6 text tokens; the decoder sees image + text.
  full, small, tome = stages["full"], stages["pool_fastv"], stages["tome"]
  d, m, hq, hk = 64, 128, 64, 32
  layer = lambda n: 2.0 * (2 * n * d * hq + 2 * n * d * hk + 2 * n * n * hq + 3 * n * d * m)
  head = 2.0 * d * 64  # logits of the last prompt token
  assert full["llm"]["analytic"] == 3 * layer(16 + 6) + head
  assert small["llm"]["analytic"] == layer(4 + 6) + 2 * layer(2 + 6) + head
  assert small["projector"]["analytic"] == 2.0 * 4 * 64 * 64
  # ViT width 64, MLP 128, 4x4x3 patches: ToMe merges 4 tokens between attention and MLP.
  stem = 2.0 * 16 * 4 * 4 * 3 * 64
  vit = lambda n, r: 2.0 * (4 * n * 64 * 64 + 2 * n * n * 64 + 2 * (n - r) * 64 * 128)
  assert full["vit"]["analytic"] == small["vit"]["analytic"] == stem + 2 * vit(16, 0)
  assert tome["vit"]["analytic"] == stem + vit(16, 4) + vit(12, 4)


@pytest.mark.parametrize("plan", ["full", "pool_fastv", "tome"])
def test_flops_agree_with_xla(stages, plan):
  """XLA counts every op of the compiled stage; the analytic count is its matrix products, so
  XLA is at least the analytic count and above it by the elementwise work only (measured:
  0.3-7% per stage at this width; the bound leaves room for XLA versions)."""
  st = stages[plan]
  for stage in ("vit", "projector", "llm", "total"):
    assert st[stage]["loops"] == 0, (stage, "a loop body would be counted once")
    assert 1.0 <= st[stage]["ratio"] < 1.15, (stage, st[stage])
    assert st[stage]["transcendentals"] > 0 or stage == "projector"


def test_the_bound_tells_token_counts_apart(stages):
  """The agreement band is narrow enough to catch a wrong token count: the uncompressed
  decoder's XLA count is far outside the band around the compressed decoder's analytic count,
  and the other way round."""
  full, small = stages["full"]["llm"], stages["pool_fastv"]["llm"]
  assert full["xla"] / small["analytic"] > 1.5
  assert small["xla"] / full["analytic"] < 0.7


def test_stage_flops_refuses_bad_input(inputs):
  params, image, text, mask = inputs
  model = PaliGemma(CONFIG)
  with pytest.raises(ValueError, match="batch"):
    cost.stage_flops(model, params, image[:1], text, mask)
  with pytest.raises(ValueError, match="text"):
    cost.stage_flops(model, params, image, text[0], mask)


def test_program_bytes_hand_worked():
  x = jnp.ones((1000,), jnp.float32)  # 4000 bytes
  plain = cost.compile_program(jax.jit(lambda a: a * 2.0 + 1.0), x)
  mem = plain.memory_analysis()
  assert (mem.argument_size_in_bytes, mem.output_size_in_bytes) == (4000, 4000)
  assert cost.program_bytes(plain) == 8000 + mem.temp_size_in_bytes
  # Donated: the output reuses the argument's buffer, so the program holds 4000 bytes fewer.
  donated = cost.compile_program(jax.jit(lambda a: a * 2.0 + 1.0, donate_argnums=0), x)
  assert donated.memory_analysis().alias_size_in_bytes == 4000
  assert cost.program_bytes(donated) == 4000 + donated.memory_analysis().temp_size_in_bytes


def test_median_seconds_calls_and_refuses():
  calls = []

  def fn(a):
    calls.append(1)
    return a + 1

  seconds = cost.median_seconds(fn, jnp.zeros(3), reps=3, warmup=2)
  assert len(calls) == 5 and seconds > 0
  for bad in (0, 2.5, True):
    with pytest.raises(ValueError, match="reps"):
      cost.median_seconds(fn, jnp.zeros(3), reps=bad)
