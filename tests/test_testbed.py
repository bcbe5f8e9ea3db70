"""The testbed: determinism, and answers checked against the rendered pixels (not the generator's
own bookkeeping): components counted with scipy, digit labels read from scikit-learn directly,
boxes against the glyph's pixels, video frames compared, tones found in the spectrogram."""

import numpy as np
import pytest
from scipy import ndimage
from sklearn.datasets import load_digits

from tcjax.data import testbed as tb

N = 40  # examples per family and check


def pixels(ex):
  return (ex["image"] + 1.0) / 2.0  # back to [0, 1]


def color_mask(img, rgb):
  return np.all(np.abs(img - np.asarray(rgb)) < 1e-4, axis=-1)


def sk_label(split, image_index):
  """The label scikit-learn gives the digit the testbed drew (train = even indices)."""
  d = load_digits()
  return int(d.target[2 * image_index + (0 if split == "train" else 1)])


@pytest.mark.parametrize("family", tb.ALL_FAMILIES)
def test_pure_function_of_arguments(family):
  a, b = tb.example(family, "train", 3, 17), tb.example(family, "train", 3, 17)
  assert a["image"].tobytes() == b["image"].tobytes()
  assert (a["prefix"], a["suffix"], a["scene"]) == (b["prefix"], b["suffix"], b["scene"])
  assert a["image"].shape == tb.image_shape(family) and a["image"].dtype == np.float32
  assert a["image"].min() >= -1.0 and a["image"].max() <= 1.0
  others = [tb.example(family, "train", 3, 18), tb.example(family, "train", 4, 17),
            tb.example(family, "test", 3, 17)]
  assert all(o["image"].tobytes() != a["image"].tobytes() for o in others)
  assert tb.answer(family, a["scene"]) == a["suffix"]


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="family"):
    tb.example("colour", "train", 0, 0)
  with pytest.raises(ValueError, match="split"):
    tb.example("count", "dev", 0, 0)
  with pytest.raises(ValueError, match="index"):
    tb.example("count", "train", 0, -1)


def test_count_matches_components():
  for i in range(N):
    ex = tb.example("count", "test", 0, i)
    color = ex["prefix"].split()[-1]
    lab, n = ndimage.label(color_mask(pixels(ex), tb.COLORS[color]))
    assert str(n) == ex["suffix"], i
    # every counted object is a 10 x 10 square, so the colour's area is 100 px per object
    assert (lab > 0).sum() == 100 * n, i


def test_binding_matches_shape_of_component():
  """Classify each component's shape by how much of its bounding box it fills (square 1,
  circle ~0.79, triangle ~0.5) and read the asked shape's colour."""
  def shape_of(component):
    ys, xs = np.nonzero(component)
    fill = component.sum() / ((np.ptp(ys) + 1) * (np.ptp(xs) + 1))
    return "square" if fill > 0.95 else "circle" if fill > 0.65 else "triangle"

  for i in range(N):
    ex = tb.example("binding", "test", 0, i)
    asked = ex["prefix"].split()[-1]
    found = []
    for name, rgb in tb.COLORS.items():
      lab, n = ndimage.label(color_mask(pixels(ex), rgb))
      found += [name for j in range(1, n + 1) if shape_of(lab == j) == asked]
    assert found == [ex["suffix"]], i


def test_digit_in_box_is_the_answer():
  d_all = load_digits()
  for i in range(N):
    ex = tb.example("digit", "test", 0, i)
    grey = color_mask(pixels(ex), (0.7, 0.7, 0.7))
    ys, xs = np.nonzero(grey)
    box = (ys.min(), xs.min(), ys.max() + 1, xs.max() + 1)
    inside = [d for d in ex["scene"]["digits"]
              if box[0] <= d["y"] and d["y"] + tb.DIGIT_PX <= box[2] + 2
              and box[1] <= d["x"] and d["x"] + tb.DIGIT_PX <= box[3] + 2]
    assert len(inside) == 1, i
    assert str(sk_label("test", inside[0]["image"])) == ex["suffix"], i
    # The amber fill: exactly the outline's inside, minus the glyph's lit pixels, so it marks the
    # boxed glyph's own 4-px patches and no other digit's.
    amber = color_mask(pixels(ex), (0.35, 0.25, 0.0))
    ys, xs = np.nonzero(amber)
    assert (ys.min() - 1, xs.min() - 1, ys.max() + 2, xs.max() + 2) == box, i
    d = inside[0]
    glyph = np.zeros(amber.shape, bool)
    lit = d_all.images[2 * d["image"] + 1] > 0  # scikit-learn's own pixels
    glyph[d["y"]:d["y"] + 8, d["x"]:d["x"] + 8] = lit
    interior = np.zeros(amber.shape, bool)
    interior[box[0] + 1:box[2] - 1, box[1] + 1:box[3] - 1] = True
    assert np.array_equal(amber, interior & ~glyph), i


def test_glyph_is_the_one_digit_drawn():
  """Exactly one glyph's worth of lit pixels, on the 4-px grid, carrying scikit-learn's label;
  the pixels are the set's own 8 x 8 image (scaled to [0, 1])."""
  d_all = load_digits()
  for i in range(N):
    ex = tb.example("glyph", "test", 0, i)
    (d,) = ex["scene"]["digits"]
    assert d["y"] % 4 == 0 and d["x"] % 4 == 0 and ex["prefix"] == "read the digit"
    img = pixels(ex)[..., 0]
    patch = img[d["y"]:d["y"] + 8, d["x"]:d["x"] + 8]
    expect = d_all.images[2 * d["image"] + 1] / 16.0
    lit = expect > 0.12
    np.testing.assert_allclose(patch[lit], expect[lit], atol=1e-6)
    outside = img.copy()
    outside[d["y"]:d["y"] + 8, d["x"]:d["x"] + 8] = 0
    assert outside.max() <= 0.12 + 1e-6, i  # the background's noise only
    assert ex["suffix"] == str(sk_label("test", d["image"])), i


def test_number_reads_left_to_right():
  for i in range(N):
    ex = tb.example("number", "train", 0, i)
    ds = sorted(ex["scene"]["digits"], key=lambda d: d["x"])
    assert ex["suffix"] == " ".join(str(sk_label("train", d["image"])) for d in ds)
    assert 3 <= len(ds) <= 4 and all(b["x"] - a["x"] >= tb.DIGIT_PX for a, b in zip(ds, ds[1:]))


def test_nth_is_the_kth_digit_from_the_left():
  """`nth` asks for the k-th glyph of a `number` scene, counted from 1 at the left; the label is
  scikit-learn's for the glyph whose column is the k-th smallest."""
  seen_k = set()
  for i in range(N):
    ex = tb.example("nth", "train", 0, i)
    k = int(ex["prefix"].split()[1])
    assert ex["prefix"] == f"digit {k} of the number", i
    xs = sorted(d["x"] for d in ex["scene"]["digits"])
    d = next(d for d in ex["scene"]["digits"] if d["x"] == xs[k - 1])
    assert ex["suffix"] == str(sk_label("train", d["image"])), i
    assert 1 <= k <= len(xs)
    seen_k.add(k)
  assert seen_k == {1, 2, 3, 4}


def test_locate_box_holds_the_glyph():
  """The decoded <loc> box (to a pixel of rounding) contains every lit pixel of the asked
  digit's glyph, and that digit carries the asked label."""
  for i in range(N):
    ex = tb.example("locate", "test", 0, i)
    target = int(ex["prefix"].split()[-1])
    box = tb.parse_loc(ex["suffix"])
    d = [d for d in ex["scene"]["digits"] if sk_label("test", d["image"]) == target]
    assert len(d) == 1, i
    d = d[0]
    lit = pixels(ex)[d["y"]:d["y"] + tb.DIGIT_PX, d["x"]:d["x"] + tb.DIGIT_PX, 0] > 0.3
    ys, xs = np.nonzero(lit)
    assert box[0] - 0.1 <= d["y"] + ys.min() and d["y"] + ys.max() + 1 <= box[2] + 0.1
    assert box[1] - 0.1 <= d["x"] + xs.min() and d["x"] + xs.max() + 1 <= box[3] + 0.1
    assert tb.box_iou(box, (d["y"], d["x"], d["y"] + 8, d["x"] + 8)) > 0.9  # native 8 x 8 px


def test_video_answers_from_frames():
  for i in range(N):
    ex = tb.example("video", "test", 0, i)
    frames = pixels(ex)
    # The actor's pixels: where any two frames differ. Present in a frame if they are lit.
    moving = np.any(np.abs(frames - frames[:1]) > 1e-4, axis=(0, -1)) | \
        np.any(np.abs(frames - frames[-1:]) > 1e-4, axis=(0, -1))
    present = [bool(np.any(f[moving].max(-1) > 0.5)) for f in frames]
    if ex["prefix"].startswith("when"):
      assert str(present.index(True)) == ex["suffix"], i
      assert all(present[present.index(True):])
    else:
      blinks = sum(a and not b for a, b in zip(present, present[1:]))
      assert str(blinks) == ex["suffix"], i


def test_audio_answers_from_spectrogram():
  """Tones are runs of time columns whose loudest band stands out; their pitch is the row of
  that band (row 0 = highest frequency)."""
  for i in range(N // 2):
    ex = tb.example("audio", "test", 0, i)
    spec = np.concatenate(list(pixels(ex)[..., 0]), axis=1)  # [64 mel, 256 time]
    loud = spec.max(0) > 0.9
    lab, n = ndimage.label(loud)
    runs = [np.flatnonzero(lab == j) for j in range(1, n + 1)]
    runs = [r for r in runs if len(r) >= 4]
    if ex["prefix"] == "how many tones":
      assert str(len(runs)) == ex["suffix"], i
    else:
      row = lambda r: np.argmax(spec[:, r].mean(1))
      higher = row(runs[-1]) < row(runs[0])
      assert ("yes" if higher else "no") == ex["suffix"], i


def test_train_and_test_digits_are_disjoint():
  tr, te = tb._digits("train")[0], tb._digits("test")[0]  # pylint: disable=protected-access
  assert len(tr) + len(te) == len(load_digits().images)
  seen = {im.tobytes() for im in tr}
  assert not any(im.tobytes() in seen for im in te)
  used = {d["image"] for i in range(N) for d in tb.example("digit", "test", 0, i)["scene"]["digits"]}
  assert all(sk_label("test", j) == int(tb._digits("test")[1][j]) for j in used)


def test_loc_tokens_round_trip_and_iou():
  box = (8, 16, 20, 28)
  text = tb.loc_tokens(box)
  assert text == "<loc0128><loc0256><loc0320><loc0448>"  # round(v / 64 * 1023)
  np.testing.assert_allclose(tb.parse_loc(text + " 7"), box, atol=64 / 1023)
  assert tb.parse_loc("<loc0001><loc0002>") is None
  # two 4x4 boxes overlapping in a 2x4 strip: 8 / (16 + 16 - 8)
  assert tb.box_iou((0, 0, 4, 4), (2, 0, 6, 4)) == pytest.approx(1 / 3)
  assert tb.box_iou(None, (0, 0, 1, 1)) == 0.0


def test_describe_lists_what_the_pixels_hold():
  """`describe` (training only): count scenes give every colour's area in 10 x 10 squares
  (two squares of a colour may touch, so not its components); other
  scenes give one box per object or digit, each box holding that item's lit pixels and every
  lit pixel inside some box, in reading order (16-px row bands, then left to right)."""
  import re
  kinds = set()
  for i in range(3 * N):
    ex = tb.example("describe", "train", 0, i)
    img, kind = pixels(ex), ex["scene"]["kind"]
    kinds.add(kind)
    assert ex["prefix"] == "describe" and kind in tb.IMAGE_FAMILIES
    if kind == "count":
      want = []
      for name, rgb in tb.COLORS.items():  # the documented colour order
        n, rest = divmod(int(color_mask(img, rgb).sum()), tb.COUNT_PX ** 2)
        assert rest == 0, i
        want += [f"{name} {n}"] if n else []
      assert ex["suffix"] == " ".join(want), i
      continue
    items = re.findall(r"((?:<loc\d{4}>){4}) ([a-z]+ [a-z]+|\d)", ex["suffix"])
    assert "".join(f"{b} {name}" for b, name in items) == ex["suffix"], i
    lit = img.max(-1) > 0.3
    if kind == "digit":  # the drawn box (outline and amber fill) is not an item
      lit &= ~color_mask(img, (0.7, 0.7, 0.7)) & ~color_mask(img, (0.35, 0.25, 0.0))
    covered = np.zeros_like(lit)
    rows = []
    for b, name in items:
      y0, x0, y1, x1 = (int(round(v)) for v in tb.parse_loc(b))
      region = lit[y0:y1, x0:x1]
      assert region.any(), (i, name)
      covered[y0:y1, x0:x1] = True
      if name.isdigit():
        assert 0 <= int(name) <= 9
      else:
        color, shape = name.split()
        assert color_mask(img[y0:y1, x0:x1], tb.COLORS[color]).sum() >= 0.4 * (y1 - y0) ** 2
        assert shape in tb.SHAPES
      rows.append(((y0 + (y1 - y0) // 2) // 16, x0))
    assert not (lit & ~covered).any(), i
    assert rows == sorted(rows), i
  assert kinds == set(tb.IMAGE_FAMILIES)
  assert tb.modality("describe") == "image" and "describe" not in tb.FAMILIES


def test_digits_sit_on_the_patch_grid():
  """Every glyph's lit pixels fit an 8-px window starting on the 4-px grid (2 x 2 patches of
  the bundled model), found from the pixels of each digit alone."""
  for fam in ("digit", "number", "locate"):
    for i in range(N):
      ex = tb.example(fam, "train", 1, i)
      for d in ex["scene"]["digits"]:
        alone = np.zeros((tb.IMAGE_SIZE, tb.IMAGE_SIZE), np.float32)
        glyph = tb._digits("train")[0][d["image"]]
        alone[d["y"]:d["y"] + tb.DIGIT_PX, d["x"]:d["x"] + tb.DIGIT_PX] = glyph
        ys, xs = np.nonzero(alone > 0.3)
        for lo, hi in ((ys.min(), ys.max()), (xs.min(), xs.max())):
          starts = [s for s in range(0, tb.IMAGE_SIZE, tb.DIGIT_GRID)
                    if s <= lo and hi < s + tb.DIGIT_PX]
          assert starts, (fam, i, lo, hi)
        assert d["y"] % tb.DIGIT_GRID == 0 and d["x"] % tb.DIGIT_GRID == 0


def test_digits_are_scikit_learns():
  """The file the testbed reads is the data `sklearn.datasets.load_digits` returns: the even
  images (pixels / 16) and their labels for train, the odd ones for every other split."""
  d = load_digits()
  for split, start in (("train", 0), ("val", 1), ("test", 1)):
    imgs, labels = tb._digits(split)  # pylint: disable=protected-access
    np.testing.assert_array_equal(imgs, d.images[start::2].astype(np.float32) / 16.0)
    np.testing.assert_array_equal(labels, d.target[start::2])
