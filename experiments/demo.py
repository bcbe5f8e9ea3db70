"""Demo: every registered compression method on a real photograph, with pictures.

`python -m experiments.demo [--budgets 64 16] [--out experiments/out]`

Takes scikit-image's astronaut photo, resizes it to 224 x 224 and cuts it into a 16 x 16 grid of
14 x 14 patches (SigLIP/14 at 224 px). There are no pretrained weights here, so the patch features
are deterministic stand-ins: the patch's mean colour plus a fixed random projection of its
pixels (D = 64). Signals are derived from the image: saliency = distance of a patch's feature to
the mean patch (scores; softmaxed into a CLS-like attention row), keys = the features, text = a
few fixed embeddings. Video-only methods get a 4-frame clip of the photo panning right.

For every method and budget it prints the tokens kept, the time per call under jit and the cost
relative to one transformer block at the same N and D (measured in the same run), and writes a
PNG per method and budget: kept patches at full colour, dropped patches dimmed, merged groups
painted with their mean colour (through `compress.to_grid`).
"""

from __future__ import annotations

import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

import tcjax
from tcjax import compress
from tcjax.compress import METHODS

from experiments._signals import make_signals, method_call, pick_budget
from experiments.bench_compress import block, block_params, time_call

SIZE, PATCH, DIM, FRAMES = 224, 14, 64, 4
GRID = SIZE // PATCH
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")


def load_photo(size=SIZE) -> np.ndarray:
  """float32[size, size, 3] in [0, 1]: scikit-image's astronaut, resized with PIL."""
  from skimage import data  # pylint: disable=g-import-not-at-top
  img = Image.fromarray(data.astronaut()).resize((size, size), Image.BICUBIC)
  return np.asarray(img, np.float32) / 255.0


def patchify(img: np.ndarray, patch=PATCH) -> np.ndarray:
  """float[H, W, 3] -> float[(H/p)*(W/p), p*p*3] in raster order."""
  h, w, c = img.shape
  g = img.reshape(h // patch, patch, w // patch, patch, c).transpose(0, 2, 1, 3, 4)
  return g.reshape(-1, patch * patch * c)


def features(patches: np.ndarray, dim=DIM, seed=0) -> np.ndarray:
  """float32[N, dim]: mean colour (3) and a fixed random projection of the centred pixels."""
  mean_colour = patches.reshape(len(patches), -1, 3).mean(1)
  proj = np.random.default_rng(seed).normal(size=(patches.shape[1], dim - 3)) / np.sqrt(
      patches.shape[1])
  return np.concatenate([4 * mean_colour, (patches - patches.mean(1, keepdims=True)) @ proj],
                        axis=1).astype(np.float32)


def clip_of(img: np.ndarray, frames=FRAMES) -> np.ndarray:
  """float[frames, H, W, 3]: the photo panning right by one patch per frame."""
  return np.stack([np.roll(img, -PATCH * f, axis=1) for f in range(frames)])


def image_signals(x: jax.Array, text_len=4, seed=1):
  """Signals derived from the features x: float[1, N, D]."""
  sal = jnp.linalg.norm(x - x.mean(1, keepdims=True), axis=-1)  # [1, N]
  text = jax.random.normal(jax.random.key(seed), (x.shape[0], text_len, x.shape[-1]))
  return sal, text


def picture(frames_img: np.ndarray, out, grid) -> Image.Image:
  """Kept patches in full colour, dropped ones dimmed, merged groups in their mean colour."""
  t, h, w = grid
  src = np.asarray(out.src[0])
  k = out.num_tokens
  colour = frames_img.reshape(t, h, PATCH, w, PATCH, 3).mean((2, 4)).reshape(-1, 3)
  carried = src >= 0
  sums = np.zeros((k, 3))
  np.add.at(sums, src[carried], colour[carried])
  counts = np.bincount(src[carried], minlength=k)
  group = sums / np.maximum(counts, 1)[:, None]  # mean colour of each token's patches
  per_patch = np.asarray(compress.to_grid(out, jnp.asarray(group[None], jnp.float32)))[0]
  merged = np.asarray(compress.to_grid(out, out.size))[0] > 1  # [t, h, w]
  kept = carried.reshape(t, h, w)
  up = lambda a: np.repeat(np.repeat(a, PATCH, axis=1), PATCH, axis=2)
  canvas = np.where(up(kept)[..., None], frames_img, 0.25 * frames_img + 0.15)
  canvas = np.where(up(merged)[..., None], up(per_patch), canvas)
  canvas = np.concatenate(list(canvas), axis=1)  # frames side by side
  return Image.fromarray((np.clip(canvas, 0, 1) * 255).astype(np.uint8))


def run(budgets=(64, 16), out_dir=OUT, methods=None, reps=5, log=print):
  """Runs every method (or `methods`) at `budgets`; returns the table rows, writes PNGs."""
  os.makedirs(out_dir, exist_ok=True)
  photo = load_photo()
  setups = {}
  for kind, frames_img in (("image", photo[None]), ("clip", clip_of(photo))):
    t = len(frames_img)
    x = jnp.asarray(np.concatenate([features(patchify(f)) for f in frames_img]))[None]
    tokens = (tcjax.Tokens.from_grid(x, (GRID, GRID)) if t == 1
              else tcjax.Tokens.from_video(x, frames=t, grid=(GRID, GRID)))
    sal, text = image_signals(x)
    params = block_params(jax.random.key(0), d=DIM, mlp=4 * DIM)
    t_block = time_call(jax.jit(lambda p, v: block(p, v, heads=4)), (params, x), reps)
    setups[kind] = (frames_img, tokens, sal, text, t_block)
  rows = []
  for name in methods or sorted(METHODS):
    for want in budgets:
      best = None  # the input (image, else clip) whose accepted budget is closest to `want`/frame
      for kind in ("image", "clip"):
        frames_img, tokens, sal, text, t_block = setups[kind]
        signals = make_signals(name, tokens, attn_logits=sal / sal.std(), text=text, key_dim=DIM)
        if "keys" in signals:
          signals["keys"] = tokens.x
        if "keys_heads" in signals:  # one head: the features, as `keys`
          signals["keys_heads"] = tokens.x[:, :, None]
        b = pick_budget(name, tokens, signals, fraction=want / (GRID * GRID))
        if b is not None:
          err = abs(np.log(b / (want * len(frames_img))))
          if best is None or err < best[0] - 1e-9:
            best = (err, kind, signals, b)
      if best is None:
        log(f"{name}: no budget near {want} accepted, skipped")
        continue
      _, kind, signals, budget = best
      frames_img, tokens, _, _, t_block = setups[kind]
      fn = jax.jit(method_call(name, budget))
      out = fn(tokens, signals)
      ms = time_call(fn, (tokens, signals), reps) * 1e3
      kept = int(out.count()[0])
      picture(frames_img, out, tokens.grid).save(os.path.join(out_dir, f"{name}_{want}.png"))
      rows.append(dict(method=name, family=METHODS[name].family, input=kind,
                       n=tokens.num_tokens, budget=budget, kept=kept, ms=ms,
                       block_ratio=ms / (t_block * 1e3)))
  return rows


def table(rows) -> str:
  lines = ["| method | family | input (N) | budget | tokens kept | ms/call | cost vs one block |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['method']} | {r['family']} | {r['input']} ({r['n']}) | {r['budget']} | "
                 f"{r['kept']} | {r['ms']:.2f} | {100 * r['block_ratio']:.1f}% |")
  return "\n".join(lines)


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--budgets", type=int, nargs="+", default=[64, 16])
  ap.add_argument("--out", default=OUT)
  ap.add_argument("--methods", nargs="+", default=None)
  ap.add_argument("--reps", type=int, default=5)
  args = ap.parse_args(argv)
  rows = run(args.budgets, args.out, args.methods, args.reps, log=print)
  print(table(rows))
  print(f"\npictures: {os.path.abspath(args.out)}")
  return rows


if __name__ == "__main__":
  main()
