"""The bundled model: one call loads model, parameters and tokenizer; the shipped files fit the
20 MB budget; 64 px images give 256 visual tokens and 8-frame clips 2048; greedy answers come
back in each family's answer format."""

import os
import re

import jax
import numpy as np

import tcjax
from tcjax import bundled
from tcjax.data import testbed


def test_files_fit_the_budget():
  size = os.path.getsize(bundled.CHECKPOINT) + os.path.getsize(bundled.TOKENIZER)
  assert size <= 20 * 2 ** 20, size


def test_load_and_token_counts():
  model, params, tok = bundled.load()
  cfg = model.config
  assert cfg.img.num_patches >= 256 and cfg.img.image_size == testbed.IMAGE_SIZE
  assert cfg.llm.vocab_size == tok.vocab_size
  assert all(str(a.dtype) == "float32" for a in jax.tree.leaves(params))
  ex = testbed.example("video", "test", 0, 0)
  prompt = tok.batch([ex["prefix"]])
  counts = {}

  def embed(p):  # traced only: the token count is static
    counts.update(model.apply({"params": p}, ex["image"][None], prompt["text"],
                              np.zeros_like(prompt["text"]), method=model.embed_image)[2])
    return 0

  jax.eval_shape(embed, params)
  assert counts["image_tokens"] == testbed.VIDEO_FRAMES * cfg.img.num_patches


def test_answers_have_each_family_format():
  """Greedy decoding of one example per family, batched by modality: the answer is a digit
  string, a colour, yes/no, or four <loc> tokens, as the family asks."""
  model, params, tok = bundled.load()
  formats = {"count": r"[0-9]", "binding": "|".join(testbed.COLORS), "digit": r"[0-9]",
             "number": r"[0-9]( [0-9])*", "locate": r"(<loc[0-9]{4}>){4}",
             "video": r"[0-9]", "audio": r"[0-9]|yes|no"}
  by_shape = {}
  for fam in testbed.FAMILIES:  # one generate call per modality (one compile each)
    by_shape.setdefault(testbed.image_shape(fam), []).append(testbed.example(fam, "test", 0, 1))
  for exs in by_shape.values():
    prompt = tok.batch([e["prefix"] for e in exs])
    out = tcjax.generate(model, params, np.stack([e["image"] for e in exs]), prompt["text"],
                         max_new_tokens=8, prefix_mask=prompt["mask_input"].astype(bool),
                         eos_id=tok.eos_id)
    for e, row in zip(exs, np.asarray(out)):
      answer = tok.decode(row).strip()
      assert re.fullmatch(formats[e["family"]], answer), (e["family"], answer)


def _iou(a, b):
  """Boxes (y0, x0, y1, x1) in pixels."""
  inter = max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  area = lambda r: (r[2] - r[0]) * (r[3] - r[1])
  return inter / (area(a) + area(b) - inter)


def _box(answer):
  """Four <locYYYY> tokens (y0, x0, y1, x1 in 1024 bins over the image) -> pixel box, or None."""
  vals = [int(v) for v in re.findall(r"<loc(\d{4})>", answer)]
  return None if len(vals) != 4 else [v / 1023 * testbed.IMAGE_SIZE for v in vals]


def test_answers_beat_chance_where_the_model_learned():
  """The shipped weights answer held-out (test split) questions better than a question-blind
  guess: binding (5 colours, chance 0.2) and locate (a box with IoU >= 0.5 to the digit's glyph
  box, which guessing essentially never gives). The issue's targets (>= 0.9 / 0.8) are not met by
  this model; experiments/RESULTS.md has every family's accuracy. References come from each
  example's scene, not from the model."""
  model, params, tok = bundled.load()
  n = 32
  for fam, floor in (("binding", 0.3), ("locate", 0.2)):
    exs = [testbed.example(fam, "test", 0, i) for i in range(n)]
    prompt = tok.batch([e["prefix"] for e in exs])
    out = tcjax.generate(model, params, np.stack([e["image"] for e in exs]), prompt["text"],
                         max_new_tokens=6, prefix_mask=prompt["mask_input"].astype(bool),
                         eos_id=tok.eos_id)
    right = 0
    for e, row in zip(exs, np.asarray(out)):
      answer = tok.decode(row).strip()
      if fam == "binding":
        truth = [o["color"] for o in e["scene"]["objects"] if o["shape"] == e["scene"]["shape"]]
        right += answer == truth[0]
      else:
        d = next(d for d in e["scene"]["digits"] if d["label"] == e["scene"]["target"])
        glyph = (d["y"], d["x"], d["y"] + testbed.DIGIT_PX, d["x"] + testbed.DIGIT_PX)
        box = _box(answer)
        right += box is not None and _iou(box, glyph) >= 0.5
    assert right / n >= floor, (fam, right / n)


# Families the shipped weights answer at all; `number` (3-4 digits read in a row, exact match)
# is at 0 in every stage so far (experiments/RESULTS.md), so no example of it can be asked for.
ANSWERED = ("count", "binding", "digit", "locate", "video", "audio")


def test_answers_an_example_of_every_answered_family_correctly():
  """Among the first 32 `test` examples of each family, at least one greedy answer is right:
  the testbed's answer string (checked against the pixels in test_testbed) exactly, or for
  `locate` a box with IoU >= 0.5 to the asked digit's glyph."""
  model, params, tok = bundled.load()
  n = 32
  for fam in ANSWERED:
    exs = [testbed.example(fam, "test", 0, i) for i in range(n)]
    prompt = tok.batch([e["prefix"] for e in exs])
    out = tcjax.generate(model, params, np.stack([e["image"] for e in exs]), prompt["text"],
                         max_new_tokens=8, prefix_mask=prompt["mask_input"].astype(bool),
                         eos_id=tok.eos_id)
    right = []
    for i, (e, row) in enumerate(zip(exs, np.asarray(out))):
      answer = tok.decode(row).strip()
      if fam == "locate":
        d = next(d for d in e["scene"]["digits"] if d["label"] == e["scene"]["target"])
        box = _box(answer)
        ok = box is not None and _iou(box, (d["y"], d["x"], d["y"] + testbed.DIGIT_PX,
                                            d["x"] + testbed.DIGIT_PX)) >= 0.5
      else:
        ok = answer == e["suffix"]
      if ok:
        right.append(i)
    assert right, (fam, "no example answered correctly")
