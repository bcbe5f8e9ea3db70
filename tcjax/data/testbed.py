"""The procedural testbed: question families that each stress one thing token compression can break.

Every example is a pure function of `(family, split, seed, index)`: nothing is stored, the same
call gives the same bytes on any machine. An example is a dict

  image:  float32[64, 64, 3] in [-1, 1]              (image families)
          float32[F, 64, 64, 3]                      (`video`: F = 8 frames; `audio`: F = 4
                                                      time segments of a log-mel spectrogram)
  prefix: str     the question, e.g. "count red"
  suffix: str     the answer, e.g. "3"
  family: str
  scene:  dict    what was drawn (objects, colours, boxes, frames, tones): `answer(family, scene)`
                  recomputes the answer from it without looking at the pixels.

Families (`FAMILIES`):
  count    "count red" -> "3"                        global information
  binding  "color of the square" -> "blue"           an attribute bound to one object
  digit    "digit in the box" -> "7"                 one small handwritten digit among others
  number   "read the number" -> "4 0 7"              3-4 small digits, left to right (dense text)
  locate   "detect 7" -> "<loc0160><loc0320><loc0352><loc0512>"   the digit's box (y0 x0 y1 x1)
  video    "when does the square appear" -> "5"; "how many times does the circle blink" -> "2"
  audio    "how many tones" -> "3"; "is the last tone higher than the first" -> "yes"

Training-only (`AUX_FAMILIES`, never evaluated):
  describe "describe" -> a scene of any image family, listed: every colour's count ("red 3
           blue 1"), or every object's box and name / every digit's box and label in reading
           order. Many supervised tokens per image, to ground the towers faster than the
           questions' 1-4 answer tokens do.
  glyph    "read the digit" -> "7": one digit alone, anywhere on the 4-px grid. Teaches the
           towers the ten glyphs before they must also find the boxed one among others.
  nth      "digit 2 of the number" -> "0": one digit of a `number` scene, counted from the left.
           The step between reading one glyph and reading them all in order.

Digits are scikit-learn's bundled 8x8 handwritten digits (UCI optdigits), at their native
8 px (`DIGIT_PX`) and placed on a 4-px grid (`DIGIT_GRID`); the
train split draws from the even-numbered images and every other split from the odd ones, so test
digits are never seen in training.

Location tokens follow PaliGemma: a coordinate c in [0, S] px becomes `<locNNNN>` with
NNNN = round(c / S * 1023), in the order y0 x0 y1 x1 (`loc_tokens` / `parse_loc`).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import os
import re
from typing import Any, Dict, List, Tuple

import numpy as np

IMAGE_SIZE = 64
VIDEO_FRAMES = 8
AUDIO_SEGMENTS = 4
DIGIT_PX = 8
# Digits at the set's native 8 x 8 px on a 4-px grid (the bundled model's patch size): each glyph
# covers exactly 2 x 2 patches, always aligned the same way. With free placement (any offset)
# the 3-layer ViT had to learn each digit at 16 sub-patch alignments and read none after 2800
# steps; upscaled to 12 px (3 x 3 patches, aligned) it read none after 1800 more (RESULTS.md).
DIGIT_GRID = 4
COUNT_PX = 10  # side of every object in `count` scenes
BOX_FILL = (0.35, 0.25, 0.0)  # `digit`: the box's fill behind the boxed glyph (amber)
LOC_BINS = 1024

IMAGE_FAMILIES = ("count", "binding", "digit", "number", "locate")
FAMILIES = IMAGE_FAMILIES + ("video", "audio")
# Training-only families: dense supervision that is not a question the evaluation asks.
AUX_FAMILIES = ("describe", "glyph", "nth")
ALL_FAMILIES = FAMILIES + AUX_FAMILIES
SPLITS = ("train", "val", "test")

COLORS = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.85, 0.2), "blue": (0.15, 0.35, 1.0),
          "yellow": (1.0, 0.9, 0.1), "white": (1.0, 1.0, 1.0)}
SHAPES = ("square", "circle", "triangle")

# Audio: 8 kHz, 64 mel bands, 256 STFT hops of 128 samples (4.1 s), cut into 4 segments of 64.
SAMPLE_RATE = 8000
N_MELS = 64
HOP = 128
N_FFT = 512


def modality(family: str) -> str:
  """'image', 'video' or 'audio': examples of one modality share one array shape."""
  if family not in ALL_FAMILIES:
    raise ValueError(f"unknown testbed family {family!r}; families: {ALL_FAMILIES}")
  return family if family in ("video", "audio") else "image"


def image_shape(family: str) -> Tuple[int, ...]:
  m = modality(family)
  frames = {"image": (), "video": (VIDEO_FRAMES,), "audio": (AUDIO_SEGMENTS,)}[m]
  return frames + (IMAGE_SIZE, IMAGE_SIZE, 3)


# ------------------------------------------------------------------------------------------
# Location tokens


def loc_token(c: float, size: float = IMAGE_SIZE) -> str:
  return f"<loc{int(round(np.clip(c / size, 0.0, 1.0) * (LOC_BINS - 1))):04d}>"


def loc_tokens(box, size: float = IMAGE_SIZE) -> str:
  """box (y0, x0, y1, x1) in pixels -> "<locY0><locX0><locY1><locX1>"."""
  return "".join(loc_token(c, size) for c in box)


def parse_loc(text: str, size: float = IMAGE_SIZE):
  """The first four `<locNNNN>` tokens of `text` -> box (y0, x0, y1, x1) in pixels, or None."""
  found = re.findall(r"<loc(\d{4})>", text)
  if len(found) < 4:
    return None
  return tuple(int(v) / (LOC_BINS - 1) * size for v in found[:4])


def box_iou(a, b) -> float:
  """IoU of two boxes (y0, x0, y1, x1); 0 when either is None or empty."""
  if a is None or b is None:
    return 0.0
  h = min(a[2], b[2]) - max(a[0], b[0])
  w = min(a[3], b[3]) - max(a[1], b[1])
  inter = max(h, 0.0) * max(w, 0.0)
  area = lambda r: max(r[2] - r[0], 0.0) * max(r[3] - r[1], 0.0)
  union = area(a) + area(b) - inter
  return float(inter / union) if union > 0 else 0.0


# ------------------------------------------------------------------------------------------
# Digits


@functools.lru_cache(maxsize=None)
def _digits(split: str) -> Tuple[np.ndarray, np.ndarray]:
  """(images float32[n, DIGIT_PX, DIGIT_PX] in [0, 1], labels int[n]) of one split's half of
  the set (resized from the set's 8 x 8 px when DIGIT_PX differs)."""
  rows = _digits_file()
  half = slice(0, None, 2) if split == "train" else slice(1, None, 2)
  imgs = rows[half, :64].reshape(-1, 8, 8).astype(np.float32) / 16.0
  if DIGIT_PX != 8:
    from scipy.ndimage import zoom  # pylint: disable=g-import-not-at-top
    imgs = np.stack([np.clip(zoom(im, DIGIT_PX / 8, order=1), 0, 1) for im in imgs])
  return imgs, rows[half, 64].astype(np.int64)


@functools.lru_cache(maxsize=None)
def _digits_file() -> np.ndarray:
  """float64[1797, 65]: scikit-learn's bundled digits file, 64 pixels (0-16) and the label per
  row, the data `sklearn.datasets.load_digits` returns. Read straight from the installed
  package: importing scikit-learn itself took 5-16 s of this CPU, 0.03 s for the file
  (measured), a large part of the README's five-minute main job."""
  spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
  if spec is None or not spec.submodule_search_locations:
    raise ImportError("the testbed's digits come with scikit-learn: pip install scikit-learn")
  path = os.path.join(spec.submodule_search_locations[0], "datasets", "data", "digits.csv.gz")
  return np.loadtxt(path, delimiter=",")


def _pick_digit(rng, split: str, label=None) -> Tuple[int, int]:
  """(index into the split's digits, label); a random image of `label` if given."""
  imgs, labels = _digits(split)
  if label is None:
    i = int(rng.integers(len(labels)))
  else:
    i = int(rng.choice(np.flatnonzero(labels == label)))
  return i, int(labels[i])


# ------------------------------------------------------------------------------------------
# Drawing


def _canvas(rng) -> np.ndarray:
  """A dark background with faint noise: float32[S, S, 3] in [0, 1]."""
  return (0.08 + 0.04 * rng.random((IMAGE_SIZE, IMAGE_SIZE, 3))).astype(np.float32)


def _shape_mask(shape: str, size: int) -> np.ndarray:
  yy, xx = np.mgrid[:size, :size] + 0.5
  c = size / 2
  if shape == "square":
    return np.ones((size, size), bool)
  if shape == "circle":
    return (yy - c) ** 2 + (xx - c) ** 2 <= c ** 2
  if shape == "triangle":  # apex at the top, base at the bottom
    return np.abs(xx - c) <= yy / 2
  raise ValueError(f"unknown shape {shape!r}")


def _draw_object(img: np.ndarray, obj: Dict[str, Any]) -> None:
  y, x, s = obj["y"], obj["x"], obj["size"]
  m = _shape_mask(obj["shape"], s)
  img[y:y + s, x:x + s][m] = COLORS[obj["color"]]


def _draw_digit(img: np.ndarray, split: str, d: Dict[str, Any]) -> None:
  glyph = _digits(split)[0][d["image"]]
  region = img[d["y"]:d["y"] + DIGIT_PX, d["x"]:d["x"] + DIGIT_PX]
  np.maximum(region, glyph[..., None], out=region)


def _draw_box(img: np.ndarray, box) -> None:
  """A 1-px light-grey outline on the rectangle (y0, x0, y1, x1) (exclusive ends)."""
  y0, x0, y1, x1 = box
  col = (0.7, 0.7, 0.7)
  img[y0, x0:x1] = col
  img[y1 - 1, x0:x1] = col
  img[y0:y1, x0] = col
  img[y0:y1, x1 - 1] = col


def _cells(rng, n: int, cell: int) -> List[Tuple[int, int]]:
  """n distinct cells of a (S // cell)^2 grid, as their top-left pixel."""
  per = IMAGE_SIZE // cell
  flat = rng.choice(per * per, size=n, replace=False)
  return [(int(f // per) * cell, int(f % per) * cell) for f in flat]


def _objects(rng, n: int, colors, shapes, size=None) -> List[Dict[str, Any]]:
  """n non-overlapping shapes, each inside its own 16-px cell.

  size None: 8 or 12 px, placed on the DIGIT_GRID grid, so that an object covers whole patches
  of the bundled model and always looks the same to it (the lesson of the digits, above; with
  8-12 px anywhere, the bundled model's description of a scene named the wrong shapes and
  colours, experiments/RESULTS.md). An int: that size, jittered anywhere in the cell.
  """
  out = []
  for (cy, cx), color, shape in zip(_cells(rng, n, 16), colors, shapes):
    if size is None:
      s = int(rng.choice((8, 12)))
      y, x = (DIGIT_GRID * int(rng.integers(0, (16 - s) // DIGIT_GRID + 1)) for _ in range(2))
    else:
      s = size
      y, x = (int(rng.integers(0, 16 - s + 1)) for _ in range(2))
    out.append({"shape": shape, "color": color, "size": s, "y": cy + y, "x": cx + x})
  return out


def _to_model(img: np.ndarray) -> np.ndarray:
  return (img * 2.0 - 1.0).astype(np.float32)


# ------------------------------------------------------------------------------------------
# Families: each returns (image in [0, 1], prefix, scene); the answer comes from `answer`.


def _count(rng, split):
  color = str(rng.choice(list(COLORS)))
  k = int(rng.integers(1, 6))
  others = [c for c in COLORS if c != color]
  n_other = int(rng.integers(0, 9 - k))
  colors = [color] * k + [str(rng.choice(others)) for _ in range(n_other)]
  # Squares of one size: every object covers the same area, so a model (or a compressed token
  # set) that keeps the colour mass can count; varied shapes and sizes left counting unlearned
  # by the bundled model's budget (chance after 10 k count-only examples).
  shapes = ["square"] * len(colors)
  objs = _objects(rng, len(colors), colors, shapes, size=COUNT_PX)
  img = _canvas(rng)
  for o in objs:
    _draw_object(img, o)
  return img, f"count {color}", {"objects": objs, "color": color}


def _binding(rng, split):
  n = int(rng.integers(2, 4))
  shapes = [str(s) for s in rng.permutation(SHAPES)[:n]]
  colors = [str(c) for c in rng.choice(list(COLORS), size=n)]
  objs = _objects(rng, n, colors, shapes)
  img = _canvas(rng)
  for o in objs:
    _draw_object(img, o)
  target = shapes[int(rng.integers(n))]
  return img, f"color of the {target}", {"objects": objs, "shape": target}


def _place_digits(rng, split, labels) -> List[Dict[str, Any]]:
  """Digits of the given labels (None = any) in distinct 16-px cells, each at offset 0 or
  DIGIT_GRID in its cell along each axis (so on the DIGIT_GRID grid)."""
  out = []
  for (cy, cx), label in zip(_cells(rng, len(labels), 16), labels):
    i, lab = _pick_digit(rng, split, label)
    out.append({"image": i, "label": lab, "y": cy + DIGIT_GRID * int(rng.integers(0, 2)),
                "x": cx + DIGIT_GRID * int(rng.integers(0, 2))})
  for d in out:  # keep every glyph inside the canvas
    d["y"] = int(np.clip(d["y"], 0, IMAGE_SIZE - DIGIT_PX))
    d["x"] = int(np.clip(d["x"], 0, IMAGE_SIZE - DIGIT_PX))
  return out


def _digit(rng, split):
  """2-4 digits; one sits in a box: an amber fill (`BOX_FILL`) behind the glyph inside a 1-px
  grey outline 2 px out.

  The fill puts the mark on the glyph's own patches. With the outline alone (stages 1-11) the
  mark was on the neighbouring patches only, and no run learned to pick the boxed glyph: stage
  9 chose among the scene's digits about at random even on training scenes (0.48 on train,
  0.33 on val), and so did a model trained from scratch on the digit families
  (experiments/RESULTS.md, eleventh session). With the fill, 100 steps from stage 9 took `digit`
  from 0.42 to 0.70 on 64 val scenes (twelfth session). The question stays what the family is
  for: reading one small glyph among distractors.
  """
  n = int(rng.integers(2, 5))
  digits = _place_digits(rng, split, [None] * n)
  target = int(rng.integers(n))
  t = digits[target]
  box = (max(t["y"] - 2, 0), max(t["x"] - 2, 0), min(t["y"] + DIGIT_PX + 2, IMAGE_SIZE),
         min(t["x"] + DIGIT_PX + 2, IMAGE_SIZE))
  img = _canvas(rng)
  img[box[0]:box[2], box[1]:box[3]] = BOX_FILL
  for d in digits:
    _draw_digit(img, split, d)
  _draw_box(img, box)
  return img, "digit in the box", {"digits": digits, "boxed": target, "box": box}


def _number(rng, split):
  n = int(rng.integers(3, 5))
  step = DIGIT_PX + DIGIT_GRID * int(rng.integers(0, 2))  # touching, or one grid step apart
  x0 = DIGIT_GRID * int(rng.integers(0, (IMAGE_SIZE - step * (n - 1) - DIGIT_PX) // DIGIT_GRID
                                     + 1))
  y = DIGIT_GRID * int(rng.integers(0, (IMAGE_SIZE - DIGIT_PX) // DIGIT_GRID + 1))
  digits = []
  for j in range(n):
    i, lab = _pick_digit(rng, split)
    digits.append({"image": i, "label": lab, "y": y, "x": x0 + j * step})
  img = _canvas(rng)
  for d in digits:
    _draw_digit(img, split, d)
  return img, "read the number", {"digits": digits}


def _locate(rng, split):
  n = int(rng.integers(1, 4))
  labels = [int(v) for v in rng.choice(10, size=n, replace=False)]
  digits = _place_digits(rng, split, labels)
  img = _canvas(rng)
  for d in digits:
    _draw_digit(img, split, d)
  target = labels[int(rng.integers(n))]
  return img, f"detect {target}", {"digits": digits, "target": target}


def _video(rng, split):
  """8 frames of static shapes; a square appears at frame t (question 'appear'), or a circle
  blinks off for single frames k times (question 'blink')."""
  question = str(rng.choice(["appear", "blink"]))
  F = VIDEO_FRAMES
  n_bg = int(rng.integers(1, 3))
  bg_shapes = ["triangle"] * n_bg
  colors = [str(c) for c in rng.choice(list(COLORS), size=n_bg + 1)]
  actor = "square" if question == "appear" else "circle"
  objs = _objects(rng, n_bg + 1, colors, bg_shapes + [actor])
  visible = np.ones(F, bool)
  if question == "appear":
    t = int(rng.integers(1, F))
    visible[:t] = False
    prefix = "when does the square appear"
  else:
    k = int(rng.integers(0, 4))
    # k blinks: single off frames, never adjacent, never the first or last frame; drawn
    # uniformly from every such set (a greedy draw can corner itself, e.g. {2, 5} for k = 3)
    sets = [c for c in itertools.combinations(range(1, F - 1), k)
            if all(b - a > 1 for a, b in zip(c, c[1:]))]
    off = list(sets[int(rng.integers(len(sets)))])
    visible[off] = False
    prefix = "how many times does the circle blink"
  base = _canvas(rng)
  for o in objs[:-1]:
    _draw_object(base, o)
  frames = []
  for f in range(F):
    img = base.copy()
    if visible[f]:
      _draw_object(img, objs[-1])
    frames.append(img)
  scene = {"objects": objs, "question": question, "visible": visible.tolist()}
  return np.stack(frames), prefix, scene


def _mel_filterbank() -> np.ndarray:
  """float32[N_FFT // 2 + 1, N_MELS]: triangular filters evenly spaced on the HTK mel scale."""
  mel = lambda f: 2595.0 * np.log10(1.0 + f / 700.0)
  hz = lambda m: 700.0 * (10 ** (m / 2595.0) - 1.0)
  edges = hz(np.linspace(mel(50.0), mel(SAMPLE_RATE / 2), N_MELS + 2))
  freqs = np.linspace(0, SAMPLE_RATE / 2, N_FFT // 2 + 1)
  lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
  up = (freqs[None] - lo) / (mid - lo)
  down = (hi - freqs[None]) / (hi - mid)
  return np.maximum(0.0, np.minimum(up, down)).T.astype(np.float32)


def _audio(rng, split):
  """1-5 tones (pitch 200-3200 Hz, 0.2-0.4 s, gaps >= 0.15 s) in noise, as a log-mel
  spectrogram [64 mel, 256 hops] cut into 4 time segments of 64 hops (frames), low
  frequencies at the bottom row."""
  from scipy import signal  # pylint: disable=g-import-not-at-top
  question = str(rng.choice(["count", "compare"]))
  n = int(rng.integers(1, 6)) if question == "count" else int(rng.integers(2, 6))
  total = AUDIO_SEGMENTS * 64 * HOP  # samples
  t_total = total / SAMPLE_RATE
  durs = rng.uniform(0.2, 0.4, size=n)
  slack = t_total - durs.sum() - 0.15 * (n + 1)
  gaps = rng.dirichlet(np.ones(n + 1)) * slack + 0.15
  pitches = np.exp(rng.uniform(np.log(200), np.log(3200), size=n))
  if question == "compare":  # first and last at least a semitone-and-a-half apart
    while abs(np.log2(pitches[-1] / pitches[0])) < 0.15:
      pitches[-1] = np.exp(rng.uniform(np.log(200), np.log(3200)))
  t = np.arange(total) / SAMPLE_RATE
  wave = 0.05 * rng.standard_normal(total)
  tones = []
  start = gaps[0]
  for j in range(n):
    on = (t >= start) & (t < start + durs[j])
    wave += on * 0.5 * np.sin(2 * np.pi * pitches[j] * t)
    tones.append({"start": float(start), "duration": float(durs[j]), "pitch": float(pitches[j])})
    start += durs[j] + gaps[j + 1]
  _, _, spec = signal.stft(wave, fs=SAMPLE_RATE, nperseg=N_FFT, noverlap=N_FFT - HOP)
  power = np.abs(spec[:, :AUDIO_SEGMENTS * 64]) ** 2
  logmel = np.log(_mel_filterbank().T @ power + 1e-6)  # [64, T]
  logmel = np.clip((logmel - logmel.max() + 12.0) / 12.0, 0.0, 1.0)[::-1]  # low rows: bass
  segs = logmel.reshape(N_MELS, AUDIO_SEGMENTS, 64).transpose(1, 0, 2)
  frames = np.repeat(segs[..., None], 3, axis=-1).astype(np.float32)
  prefix = "how many tones" if question == "count" else "is the last tone higher than the first"
  return frames, prefix, {"question": question, "tones": tones}


def _describe(rng, split):
  """A scene of any image family, and the prompt "describe"; the answer lists what it holds."""
  kind = IMAGE_FAMILIES[int(rng.integers(len(IMAGE_FAMILIES)))]
  img, _, scene = _MAKERS[kind](rng, split)
  return img, "describe", dict(scene, kind=kind)


def _glyph(rng, split):
  """One digit, nothing else, at a random position on the DIGIT_GRID grid."""
  i, label = _pick_digit(rng, split)
  cells = (IMAGE_SIZE - DIGIT_PX) // DIGIT_GRID + 1
  d = {"image": i, "label": label, "y": DIGIT_GRID * int(rng.integers(cells)),
       "x": DIGIT_GRID * int(rng.integers(cells))}
  img = _canvas(rng)
  _draw_digit(img, split, d)
  return img, "read the digit", {"digits": [d]}


def _nth(rng, split):
  """A `number` scene asked for one of its digits: "digit k of the number" (k from 1, left to
  right). The step between reading one glyph and reading them all in order: the bundled model
  answered `number` with one glyph read and repeated ("4 4 4 4" for "4 4 5 4")."""
  img, _, scene = _number(rng, split)
  k = int(rng.integers(1, len(scene["digits"]) + 1))
  return img, f"digit {k} of the number", dict(scene, k=k)


_MAKERS = {"count": _count, "binding": _binding, "digit": _digit, "number": _number,
           "locate": _locate, "video": _video, "audio": _audio, "describe": _describe,
           "glyph": _glyph, "nth": _nth}


def _reading_order(items, size_of):
  """Items sorted by their 16-px row band (of the item's centre), then left to right."""
  return sorted(items, key=lambda o: ((o["y"] + size_of(o) // 2) // 16, o["x"]))


def describe(scene: Dict[str, Any]) -> str:
  """The `describe` answer: ~20 supervised tokens per image where a question has 1-4.

  count scenes: "<colour> <n>" for each colour present, in `COLORS` order (every colour's count
    at once). Other shape scenes: each object's box (4 location tokens) then its colour and
    shape. Digit scenes: each digit's box then its label. Objects and digits in reading order.
  """
  if scene["kind"] == "count":
    n = {c: sum(o["color"] == c for o in scene["objects"]) for c in COLORS}
    return " ".join(f"{c} {n[c]}" for c in COLORS if n[c])
  if "objects" in scene:
    return "".join(f"{loc_tokens((o['y'], o['x'], o['y'] + o['size'], o['x'] + o['size']))} "
                   f"{o['color']} {o['shape']}"
                   for o in _reading_order(scene["objects"], lambda o: o["size"]))
  return "".join(f"{loc_tokens(_digit_box(d))} {d['label']}"
                 for d in _reading_order(scene["digits"], lambda d: DIGIT_PX))


def _digit_box(d) -> Tuple[int, int, int, int]:
  return (d["y"], d["x"], d["y"] + DIGIT_PX, d["x"] + DIGIT_PX)


def answer(family: str, scene: Dict[str, Any]) -> str:
  """The answer to a family's question, from the scene description alone."""
  if family == "count":
    return str(sum(o["color"] == scene["color"] for o in scene["objects"]))
  if family == "binding":
    return next(o["color"] for o in scene["objects"] if o["shape"] == scene["shape"])
  if family == "digit":
    return str(scene["digits"][scene["boxed"]]["label"])
  if family == "number":
    return " ".join(str(d["label"]) for d in sorted(scene["digits"], key=lambda d: d["x"]))
  if family == "locate":
    d = next(d for d in scene["digits"] if d["label"] == scene["target"])
    return loc_tokens(_digit_box(d))
  if family == "video":
    vis = scene["visible"]
    if scene["question"] == "appear":
      return str(vis.index(True))
    return str(sum(1 for a, b in zip(vis, vis[1:]) if a and not b))
  if family == "audio":
    tones = scene["tones"]
    if scene["question"] == "count":
      return str(len(tones))
    return "yes" if tones[-1]["pitch"] > tones[0]["pitch"] else "no"
  if family == "describe":
    return describe(scene)
  if family == "glyph":
    return str(scene["digits"][0]["label"])
  if family == "nth":
    return str(sorted(scene["digits"], key=lambda d: d["x"])[scene["k"] - 1]["label"])
  raise ValueError(f"unknown testbed family {family!r}; families: {ALL_FAMILIES}")


def target_box(scene: Dict[str, Any]):
  """`locate`: the target digit's box (y0, x0, y1, x1) in pixels."""
  d = next(d for d in scene["digits"] if d["label"] == scene["target"])
  return _digit_box(d)


def _seed(family: str, split: str, seed: int, index: int) -> np.random.Generator:
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}; splits: {SPLITS}")
  if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
    raise ValueError(f"index must be an int >= 0, got {index!r}")
  return np.random.default_rng([ALL_FAMILIES.index(family), SPLITS.index(split), int(seed),
                                int(index)])


def example(family: str, split: str, seed: int, index: int) -> Dict[str, Any]:
  """One testbed example, a pure function of its arguments (see the module docstring)."""
  modality(family)  # validates the family
  rng = _seed(family, split, seed, index)
  img, prefix, scene = _MAKERS[family](rng, "train" if split == "train" else "test")
  return {"image": _to_model(img), "prefix": prefix, "suffix": answer(family, scene),
          "family": family, "scene": scene}


def corpus() -> List[str]:
  """Every word and answer the testbed can produce (for training its tokenizer)."""
  lines = [f"count {c}" for c in COLORS] + [f"color of the {s}" for s in SHAPES]
  # (`nth`'s "digit 3 of the number" is made of these words; it came after the shipped
  # tokenizer was trained, and adding it here would change that tokenizer if retrained)
  lines += ["digit in the box", "read the number", "read the digit", "when does the square appear",
            "how many times does the circle blink", "how many tones",
            "is the last tone higher than the first", "yes", "no"]
  lines += [f"detect {d}" for d in range(10)] + list(COLORS)
  lines += [" ".join(str(int(c)) for c in np.random.default_rng(i).integers(0, 10, 4))
            for i in range(50)]
  return lines
