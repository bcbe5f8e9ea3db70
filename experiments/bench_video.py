"""Longest video whose sharded prefill fits a per-device memory cap, for 1, 2, 4, 8 devices.

Config: the small-but-real PaliGemma of bench_model (SigLIP width 384, 6 layers, 224 px / patch
14 -> 256 tokens per frame; Gemma width 512, 6 layers, 8 heads, 1 KV head, MLP 2048, vocab
32000), batch 1, 16 prompt tokens, float32. Devices are simulated CPU devices; a mesh
(data 1, seq n) shards the frames and the token sequence (ring attention in the decoder) and the
parameters FSDP-style over `seq`. For each n we compile (never run) `model.prefill` on a clip of
F frames and read the per-device bytes from `compiled.memory_analysis()` (arguments + outputs +
temporaries - aliased), then search the largest F under the cap:

  - without compression: all F * 256 tokens reach the decoder;
  - with compression: 2x2 pooling per frame (4x), then temporal merging (keep 1/2 of the pooled
    tokens, frame 0 whole): 8x fewer tokens reach the decoder.

Targets (issue 5): F grows at least 0.8x linearly with the devices; compression multiplies F by
at least its ratio. Usage: python -m experiments.bench_video [--cap-gib 1.0] [--write]
"""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402
from tqdm import tqdm  # noqa: E402

from configs.sharding import PALIGEMMA_RULES  # noqa: E402
from experiments._results import write_section  # noqa: E402
from tcjax.nn import GemmaConfig, PaliGemma, PaliGemmaConfig, SiglipConfig  # noqa: E402
from tcjax.nn.params import nest, param_shapes  # noqa: E402
from tcjax.parallel import make_mesh, param_shardings  # noqa: E402

IMG = SiglipConfig(width=384, depth=6, mlp_dim=1536, num_heads=6, patch_size=14, image_size=224)
LLM = GemmaConfig(version=1, vocab_size=32000, width=512, depth=6, mlp_dim=2048, num_heads=8,
                  num_kv_heads=1, head_dim=64)
TOKENS_PER_FRAME = IMG.num_patches
T_TEXT = 16
PLANS = {
    "none": (),
    "temporal merge + 4x pool": (("post_vit", {"method": "pool", "keep": 0.25}),
                                 ("post_vit", {"method": "temporal_merge", "keep": 0.5})),
}
RATIO = {"none": 1, "temporal merge + 4x pool": 8}


def prefill_bytes(model, mesh, frames: int) -> int:
  """Per-device bytes of the compiled sharded prefill of a `frames`-frame clip.

  The frames go through the ViT in chunks of one frame per device (`frame_chunks`), so ViT
  activations do not grow with the clip; what grows is the tokens and the decoder.
  """
  model = PaliGemma(dataclasses.replace(model.config, frame_chunks=max(1, frames // mesh.size)))
  params = nest({k: jax.ShapeDtypeStruct(s, jnp.float32)
                 for k, s in param_shapes(model.config).items()})
  shard = param_shardings(params, mesh, PALIGEMMA_RULES, fsdp_axis="seq")
  params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        params, shard)
  clip = jax.ShapeDtypeStruct((1, frames, 224, 224, 3), jnp.uint8,  # decoded video frames
                              sharding=NamedSharding(mesh, P(None, "seq")))
  text = jax.ShapeDtypeStruct((1, T_TEXT), jnp.int32, sharding=NamedSharding(mesh, P()))
  fn = jax.jit(lambda p, c, t: model.apply({"params": p}, c, t, method=model.prefill))
  with jax.set_mesh(mesh):
    m = fn.lower(params, clip, text).compile().memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes \
      - m.alias_size_in_bytes


def longest(model, mesh, cap: int, start: int, log) -> int:
  """Largest frame count (>= 2, a multiple of the devices, whose frames the clip's sharding
  splits evenly) whose prefill fits `cap` bytes per device, or 0."""
  n = mesh.size
  unit = lambda f: max(2, f - f % n if f >= n else n)
  fits = lambda f: prefill_bytes(model, mesh, unit(f)) <= cap
  lo, hi = 0, max(2, start)
  while fits(hi):  # grow until it does not fit
    lo, hi = hi, hi * 2
    log(f"    fits {lo}")
  if lo == 0:
    if not fits(2):
      return 0
    lo = 2
  while hi - lo > n:  # bisect to one step of n frames
    mid = unit((lo + hi) // 2)
    if mid <= lo:
      break
    if fits(mid):
      lo = mid
    else:
      hi = mid
    log(f"    [{lo}, {hi})")
  return unit(lo)


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--cap-gib", type=float, default=1.0, help="per-device memory cap")
  ap.add_argument("--devices", default="1,2,4,8")
  ap.add_argument("--write", action="store_true", help="update experiments/RESULTS.md")
  args = ap.parse_args()
  cap = int(args.cap_gib * 2 ** 30)
  counts = [int(n) for n in args.devices.split(",")]
  lines = []

  def out(s=""):
    print(s, flush=True)
    lines.append(s)

  found = {}
  t0 = time.time()
  # One search per (plan, device count), each compiling the prefill at several frame counts.
  bar = tqdm(total=len(PLANS) * len(counts), desc="bench_video", unit="search",
             dynamic_ncols=True)
  quiet = bar.write
  for name, plan in PLANS.items():
    model = PaliGemma(PaliGemmaConfig(img=IMG, llm=LLM, plan=plan))
    start = 4
    for n in counts:
      bar.set_postfix_str(f"{name}, {n} devices")
      mesh = make_mesh((("data", 1), ("seq", n)), axis_types="auto", devices=jax.devices()[:n])
      f = longest(model, mesh, cap, start, quiet)
      found[name, n] = f
      quiet(f"  {name}, {n} devices: {f} frames ({time.time() - t0:.0f} s)")
      start = max(4, f * 2)
      bar.update(1)
  bar.close()

  out("## bench_video\n")
  out(f"`python -m experiments.bench_video --cap-gib {args.cap_gib}`: per-device cap "
      f"{args.cap_gib} GiB (`compiled.memory_analysis()`: arguments + outputs + temporaries - "
      f"aliased), jax {jax.__version__}, simulated CPU devices, batch 1, {TOKENS_PER_FRAME} "
      f"tokens per frame, {T_TEXT} prompt tokens, uint8 frames, float32 model; mesh (data 1, seq n), ring attention, "
      "FSDP parameters over seq, frames through the ViT one per device at a time (`frame_chunks`). Frame counts exact to one step of n frames (clips shard evenly).\n")
  out("| devices | frames, no compression | vs linear | frames, temporal merge + 4x pool | "
      "vs linear | compression gain (target >= 8) |")
  out("|---|---|---|---|---|---|")
  base = {name: found[name, counts[0]] / counts[0] for name in PLANS}
  for n in counts:
    f0, f1 = found["none", n], found["temporal merge + 4x pool", n]
    lin0 = f0 / (base["none"] * n) if base["none"] else float("nan")
    lin1 = f1 / (base["temporal merge + 4x pool"] * n) if base["temporal merge + 4x pool"] \
        else float("nan")
    gain = f1 / f0 if f0 else float("nan")
    out(f"| {n} | {f0} ({f0 * TOKENS_PER_FRAME} tokens) | {lin0:.2f} | {f1} | {lin1:.2f} | "
        f"{gain:.2f}x |")
  out()
  if args.write:
    write_section("\n".join(lines), "## bench_video")


if __name__ == "__main__":
  main()
