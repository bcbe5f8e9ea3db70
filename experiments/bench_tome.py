"""ToMe speed: tcjax `compress.tome` against a PyTorch transcription of the official code.

The official algorithm (facebookresearch/ToMe, `tome/merge.py`: `bipartite_soft_matching`, then
`merge_wavg` with the merge it returns) is written out below in PyTorch (CPU build; PyTorch is a
benchmark and test oracle only, never a dependency of tcjax). Both run one round with r = N / 4 on
the same inputs: batch 4, D = 1152 features, 64-dim keys (the matching metric), N in
(576, 1024, 4096). tcjax is timed as `jax.jit(compress.tome)` to N - r tokens (which is one
official round, then the tokens in raster order, with `pos`, `size`, `mask` and `src` kept);
the official call returns x and size in its scrambled order. Calls are interleaved (official,
tcjax, official, ...) so that load from other processes hits both alike; the ratio printed is
median(official) / median(tcjax) of the wall times over the repetitions of one run (> 1: tcjax
faster; the target is judged on it), beside the ratio of the fastest calls and the ratio of the
median process CPU times (all threads; less sensitive to other processes on a shared machine).
The official round runs at PyTorch's default thread count and at 1 thread, interleaved; the
baseline is whichever of the two had the lower median in the run (on a loaded 2-core machine a
2-thread PyTorch op waits for its descheduled second thread, which would flatter tcjax).

Usage: python -m experiments.bench_tome [--n 576 1024 4096] [--reps 15] [--write]
       (--write replaces the "## bench_tome" section of experiments/RESULTS.md)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from tcjax import Tokens, compress

from experiments._results import write_section

B, D, DK = 4, 1152, 64
GRIDS = {576: (24, 24), 1024: (32, 32), 4096: (64, 64)}
TARGET = 2.0


# ---------------------------------------------------------------------------------------------
# The official algorithm, transcribed (one round; no class / distillation token).
# ---------------------------------------------------------------------------------------------


def official_matching(metric: torch.Tensor, r: int):
  """`bipartite_soft_matching`: returns the merge function (a closure over the matching)."""
  t = metric.shape[1]
  r = min(r, t // 2)
  with torch.no_grad():
    metric = metric / metric.norm(dim=-1, keepdim=True)
    a, b = metric[..., ::2, :], metric[..., 1::2, :]
    scores = a @ b.transpose(-1, -2)
    node_max, node_idx = scores.max(dim=-1)
    edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]
    unm_idx = edge_idx[..., r:, :]
    src_idx = edge_idx[..., :r, :]
    dst_idx = node_idx[..., None].gather(dim=-2, index=src_idx)

  def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    src, dst = x[..., ::2, :], x[..., 1::2, :]
    n, t1, c = src.shape
    unm = src.gather(dim=-2, index=unm_idx.expand(n, t1 - r, c))
    src = src.gather(dim=-2, index=src_idx.expand(n, r, c))
    dst = dst.scatter_reduce(-2, dst_idx.expand(n, r, c), src, reduce=mode)
    return torch.cat([unm, dst], dim=1)

  return merge


def official_merge_wavg(merge, x: torch.Tensor, size=None):
  """`merge_wavg`: size-weighted average through `merge` (sum mode); returns (x, size)."""
  if size is None:
    size = torch.ones_like(x[..., 0, None])
  x = merge(x * size, mode="sum")
  size = merge(size, mode="sum")
  return x / size, size


def official_round(x: torch.Tensor, keys: torch.Tensor, r: int):
  with torch.no_grad():
    return official_merge_wavg(official_matching(keys, r), x)


# ---------------------------------------------------------------------------------------------
# Timing.
# ---------------------------------------------------------------------------------------------


def inputs(n: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((B, n, D)).astype(np.float32)
  keys = rng.standard_normal((B, n, DK)).astype(np.float32)
  return x, keys


def check_same_merges(out, ref_x, ref_size, n, r):
  """tcjax (raster order) and the official round (scrambled order) hold the same tokens."""
  x = np.asarray(out.x)
  size = np.asarray(out.size)
  ref_x, ref_size = ref_x.numpy(), ref_size.numpy()[..., 0]
  for b in range(B):
    # Sort both by (size, first feature): the same multiset of merged tokens.
    i = np.lexsort((x[b, :, 0], size[b]))
    j = np.lexsort((ref_x[b, :, 0], ref_size[b]))
    np.testing.assert_array_equal(size[b, i], ref_size[b, j])
    np.testing.assert_allclose(x[b, i], ref_x[b, j], rtol=1e-4, atol=1e-5)
  assert x.shape[1] == n - r


def bench_n(n: int, reps: int, log=print):
  r = n // 4
  x_np, k_np = inputs(n)
  grid = GRIDS[n]
  tokens = Tokens.from_grid(jnp.asarray(x_np), grid)
  keys = jnp.asarray(k_np)
  fn = jax.jit(lambda t, k: compress.tome(t, n - r, keys=k))
  xt, kt = torch.from_numpy(x_np), torch.from_numpy(k_np)

  out = jax.block_until_ready(fn(tokens, keys))  # compile + warm
  ref_x, ref_size = official_round(xt, kt, r)
  check_same_merges(out, ref_x, ref_size, n, r)

  threads = torch.get_num_threads()
  configs = sorted({threads, 1}, reverse=True)
  wall = {c: [] for c in configs + ["tcjax"]}
  cpu = {c: [] for c in configs + ["tcjax"]}

  def official(c):
    torch.set_num_threads(c)
    try:
      official_round(xt, kt, r)
    finally:
      torch.set_num_threads(threads)

  for c in configs:
    official(c)  # warm
  for _ in range(reps):
    calls = [(c, lambda c=c: official(c)) for c in configs]
    calls.append(("tcjax", lambda: jax.block_until_ready(fn(tokens, keys))))
    for name, call in calls:
      t0, c0 = time.perf_counter(), time.process_time()
      call()
      wall[name].append(time.perf_counter() - t0)
      cpu[name].append(time.process_time() - c0)
  med = statistics.median
  # The official baseline: whichever thread count ran faster (median wall time) in this run.
  best = min(configs, key=lambda c: med(wall[c]))
  ratio = med(wall[best]) / med(wall["tcjax"])
  ratio_min = min(min(wall[c]) for c in configs) / min(wall["tcjax"])
  cpu_ratio = min(med(cpu[c]) for c in configs) / med(cpu["tcjax"])
  for c in configs:
    log(f"N={n} r={r}: official, torch {c} thread(s): {med(wall[c]) * 1e3:.2f} ms "
        f"(fastest {min(wall[c]) * 1e3:.2f}, CPU {med(cpu[c]) * 1e3:.2f})")
  log(f"N={n} r={r}: tcjax {med(wall['tcjax']) * 1e3:.2f} ms (fastest "
      f"{min(wall['tcjax']) * 1e3:.2f}, CPU {med(cpu['tcjax']) * 1e3:.2f}): ratio {ratio:.2f}x "
      f"against {best} thread(s) (fastest/fastest {ratio_min:.2f}x, CPU time {cpu_ratio:.2f}x)")
  return n, r, med(wall[best]), best, med(wall["tcjax"]), ratio, ratio_min, cpu_ratio


def table(rows):
  out = ["| N | r | official (ms, median) | torch threads | tcjax (ms, median) | "
         "speedup (median) | speedup (fastest) | speedup (CPU time) | target | pass/miss |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  for n, r, t_off, threads, t_jax, ratio, ratio_min, cpu_ratio in rows:
    out.append(f"| {n} | {r} | {t_off * 1e3:.2f} | {threads} | {t_jax * 1e3:.2f} | {ratio:.2f}x | "
               f"{ratio_min:.2f}x | {cpu_ratio:.2f}x | >= {TARGET:.0f}x | "
               f"{'pass' if ratio >= TARGET else 'miss'} |")
  return "\n".join(out)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--n", type=int, nargs="+", default=sorted(GRIDS), choices=sorted(GRIDS))
  ap.add_argument("--reps", type=int, default=15)
  ap.add_argument("--write", action="store_true", help="write the table to RESULTS.md")
  args = ap.parse_args(argv)
  rows = [bench_n(n, args.reps) for n in args.n]
  text = table(rows)
  note = (f"jax {jax.__version__}, torch {torch.__version__} (threads {torch.get_num_threads()}), "
          f"{jax.devices()[0].platform} ({os.cpu_count()} cores, shared with other jobs); batch "
          f"{B}, D {D}, keys {DK}, one round r = N/4; {args.reps} interleaved calls each, "
          "ratio = median official (the faster of torch at its default threads and at 1 thread) / "
          "median tcjax; command: `python -m experiments.bench_tome"
          f"{' --n ' + ' '.join(map(str, args.n)) if args.n != sorted(GRIDS) else ''}"
          f"{' --reps ' + str(args.reps) if args.reps != 15 else ''}`")
  print(text)
  if args.write:
    write_section(note + "\n\n" + text, "## bench_tome")
  return rows


if __name__ == "__main__":
  main()
