"""Why a testbed model misses `number` and `locate`: four measurements in one run.

  python -m experiments.diagnose_reading [--checkpoint CKPT.npz] [--n 192]

The bundled model reads a lone glyph and the boxed one, but not a number in order, and it
finds the asked-for digit's box only when the digit is alone. This script separates the parts
of reading among several glyphs (n scenes per measurement; the checkpoint's tokenizer is the
testbed's):

1. Where the label lives in the vision tower. A logistic-regression probe (scikit-learn) is
   fit on the ViT outputs of `number` glyphs of the train split and scored on the val split:
   once on a glyph's four patches together (float[4 * D]), once on each single patch. The
   decoder's attention scores one token at a time, so a label that is readable only from the
   four patches together cannot be what a query for "the 7" matches.
2. `locate` errors: whether a missed box is another digit's box (the wrong glyph chosen) or a
   misplaced one, and the hit rate by the number of digits in the scene.
3. `number` against `describe` on the same scenes: `describe` names every digit's box before
   its label, so it shows whether the model finds the glyphs in order and still reads one
   label for all.
4. A bound from the data: an RBF support-vector machine on the raw 8 x 8 pixels of the train
   half of scikit-learn's digits, scored on the other half (the testbed's split). A reader of
   per-glyph accuracy p gets a 3-4 digit number right about p^3.5 of the time even in perfect
   order; `number` >= 0.90 needs p >= 0.9^(1 / 3.5) = 0.970.
"""

from __future__ import annotations

import argparse
import re
from typing import Dict, List

import numpy as np

from tcjax.data import testbed

PATCH = 4  # the testbed models' patch size: a glyph covers 2 x 2 patches
GRID = testbed.IMAGE_SIZE // PATCH


def _scenes(family: str, split: str, n: int):
  """n (image in [-1, 1], scene) of one family, from the testbed's own generator."""
  out = []
  for i in range(n):
    ex = testbed.example(family, split, 0, i)
    out.append((ex["image"], ex["scene"]))
  return out


def _glyph_patches(d) -> List[int]:
  """Raster indices of the 2 x 2 patches a glyph covers (top-left, top-right, bottom-left,
  bottom-right)."""
  r, c = d["y"] // PATCH, d["x"] // PATCH
  return [r * GRID + c, r * GRID + c + 1, (r + 1) * GRID + c, (r + 1) * GRID + c + 1]


def vit_features(model, params, images: np.ndarray) -> np.ndarray:
  """float32[B, N, D]: the vision tower's output tokens (before any compression)."""
  import jax  # pylint: disable=g-import-not-at-top
  enc = jax.jit(lambda im: model.apply({"params": params}, im, method=model.encode_image))
  return np.concatenate([np.asarray(enc(images[s:s + 32]).tokens.x, np.float32)
                         for s in range(0, len(images), 32)])


def glyph_probe(model, params, n: int) -> Dict[str, float]:
  """Val accuracy of linear label probes on `number` glyphs: 'glyph' (its 4 patches together)
  and 'patch 0' ... 'patch 3' (one patch each)."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top

  def rows(split, count):
    scenes = _scenes("number", split, count)
    feats = vit_features(model, params, np.stack([im for im, _ in scenes]))
    x, y = [], []
    for f, (_, scene) in zip(feats, scenes):
      for d in scene["digits"]:
        x.append(f[_glyph_patches(d)])
        y.append(d["label"])
    return np.stack(x), np.asarray(y)

  (xtr, ytr), (xva, yva) = rows("train", 4 * n), rows("val", n)
  out = {}
  for name, sel in [("glyph", slice(None))] + [(f"patch {p}", p) for p in range(4)]:
    fit = LogisticRegression(max_iter=3000).fit(xtr[:, sel].reshape(len(xtr), -1), ytr)
    out[name] = float(fit.score(xva[:, sel].reshape(len(xva), -1), yva))
  return out


def _answers(model, params, tokenizer, images, prefix: str, max_new_tokens: int) -> List[str]:
  from tcjax.eval import runner  # pylint: disable=g-import-not-at-top
  out = []
  for s in range(0, len(images), 16):
    chunk = images[s:s + 16]
    prompt = tokenizer.batch([prefix] * len(chunk), max_len=32)
    out += runner.answer_batch(model, params, tokenizer, np.stack(chunk), prompt["text"],
                               prompt["mask_input"].astype(bool), max_new_tokens=max_new_tokens)
  return out


def locate_errors(model, params, tokenizer, n: int) -> Dict[str, object]:
  """`locate` on n val scenes: counts of hits (IoU >= 0.5), boxes of another digit, other
  misses; and the hit rate by digits in the scene."""
  from tcjax.data import pipeline  # pylint: disable=g-import-not-at-top
  from tcjax.eval import runner  # pylint: disable=g-import-not-at-top
  answers, scenes = [], []
  for _, b in pipeline.eval_batches(("locate",), tokenizer, split="val", seed=0, per_family=n,
                                    batch_size=16, max_len=32):
    answers += runner.answer_batch(model, params, tokenizer, b["image"], b["text"],
                                   b["input_mask"], max_new_tokens=8)
    scenes += b["scene"]
  kinds = {"hit": 0, "another digit's box": 0, "other miss": 0}
  by_count: Dict[int, List[bool]] = {}
  for a, scene in zip(answers, scenes):
    box, want = testbed.parse_loc(a), testbed.target_box(scene)
    hit = box is not None and testbed.box_iou(box, want) >= 0.5
    by_count.setdefault(len(scene["digits"]), []).append(hit)
    others = [testbed._digit_box(d) for d in scene["digits"]  # pylint: disable=protected-access
              if d["label"] != scene["target"]]
    if hit:
      kinds["hit"] += 1
    elif box is not None and any(testbed.box_iou(box, o) >= 0.5 for o in others):
      kinds["another digit's box"] += 1
    else:
      kinds["other miss"] += 1
  return {"kinds": kinds,
          "hit rate by digits": {k: (len(v), float(np.mean(v))) for k, v in sorted(by_count.items())}}


def number_vs_describe(model, params, tokenizer, n: int) -> Dict[str, float]:
  """On n val `number` scenes: exact match of "read the number"; of the labels `describe`
  lists; of `describe`'s boxes (all of them, in order); each glyph's box and label in its place;
  and how often `describe` gives one label for every digit of a scene whose digits are not all
  the same."""
  scenes = _scenes("number", "val", n)
  images = [im for im, _ in scenes]
  truth = [testbed.answer("number", sc) for _, sc in scenes]
  boxes = [testbed.describe(dict(sc, kind="number")) for _, sc in scenes]
  read = _answers(model, params, tokenizer, images, "read the number", 8)
  desc = _answers(model, params, tokenizer, images, "describe", 26)
  labels = [" ".join(re.sub(r"<loc\d+>", " ", d).split()) for d in desc]
  locs = [re.findall(r"<loc\d+>", d) for d in desc]
  want_locs = [re.findall(r"<loc\d+>", b) for b in boxes]
  mixed = [len(set(t.split())) > 1 for t in truth]
  one_label = [len(set(l.split())) == 1 for l in labels]
  return {"read the number": float(np.mean([a == t for a, t in zip(read, truth)])),
          "describe labels": float(np.mean([a == t for a, t in zip(labels, truth)])),
          "describe boxes": float(np.mean([a == w for a, w in zip(locs, want_locs)])),
          "describe boxes per glyph": float(np.mean(
              [a[k:k + 4] == w[k:k + 4] for a, w in zip(locs, want_locs)
               for k in range(0, len(w), 4)])),
          "describe labels per glyph": float(np.mean(
              [k < len(a.split()) and a.split()[k] == d for a, t in zip(labels, truth)
               for k, d in enumerate(t.split())])),
          "describe: one label for mixed digits": float(
              np.sum(np.logical_and(mixed, one_label)) / max(1, np.sum(mixed)))}


def pixel_bound() -> Dict[str, float]:
  """Per-glyph accuracy of an RBF SVM on the raw pixels (train half -> the other half), and
  the number exact match it implies in perfect order (p^3.5)."""
  from sklearn.svm import SVC  # pylint: disable=g-import-not-at-top
  tr_x, tr_y = testbed._digits("train")  # pylint: disable=protected-access
  te_x, te_y = testbed._digits("test")  # pylint: disable=protected-access
  # gamma / C: the best of a small grid on this split (0.05-0.5 x 1-100); the bound is the
  # classifier's, not a claim about the best possible reader.
  svm = SVC(gamma=0.2, C=10.0).fit(tr_x.reshape(len(tr_x), -1), tr_y)
  p = float(svm.score(te_x.reshape(len(te_x), -1), te_y))
  return {"per glyph": p, "number in perfect order (p^3.5)": p ** 3.5}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--checkpoint", default="", help="a testbed .npz (default: the bundled model)")
  ap.add_argument("--n", type=int, default=192, help="scenes per measurement")
  args = ap.parse_args(argv)
  from tcjax import bundled  # pylint: disable=g-import-not-at-top
  if args.checkpoint:  # the bundled model's weights are not read for another checkpoint
    from tcjax.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
    from tcjax.train.loop import load_init  # pylint: disable=g-import-not-at-top
    model, params = load_init(args.checkpoint)
    tokenizer = Tokenizer(bundled.TOKENIZER)
  else:
    model, params, tokenizer = bundled.load()
  print("1. label probes on the ViT outputs (val accuracy):",
        {k: round(v, 3) for k, v in glyph_probe(model, params, args.n).items()}, flush=True)
  loc = locate_errors(model, params, tokenizer, args.n)
  print("2. locate:", loc["kinds"], "hit rate by digits in the scene:",
        {k: (c, round(r, 2)) for k, (c, r) in loc["hit rate by digits"].items()}, flush=True)
  print("3. number scenes:", {k: round(v, 3) for k, v in
                              number_vs_describe(model, params, tokenizer, args.n).items()},
        flush=True)
  print("4. raw-pixel SVM bound:", {k: round(v, 4) for k, v in pixel_bound().items()})


if __name__ == "__main__":
  main()
