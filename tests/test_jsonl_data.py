"""JSONL user data (tcjax.data.jsonl): parsing, validation, images and clips, grain pipeline."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from tcjax.data import jsonl
from tcjax.tokenizer import Tokenizer

TOKENIZER = os.path.join(os.path.dirname(jsonl.__file__), "..", "assets",
                         "testbed_tokenizer.model")
S = 8  # image_size in these tests


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(TOKENIZER)


def _png(path, rgb, size=(12, 10)):
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.new("RGB", size, rgb).save(path)
  return path


def _write(path, lines):
  """JSONL file from dicts (dumped) and raw str lines (latin-1: "\\xff" stays one bad byte)."""
  text = "".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines)
  path.write_bytes(text.encode("latin-1"))
  return path


def _expected(rgb):
  """Solid colour -> the exact float32 pixel the loader must produce."""
  return np.asarray(rgb, np.float32) / np.float32(127.5) - np.float32(1)


@pytest.fixture
def data(tmp_path):
  """7 records, images under imgs/ (relative paths); line 3 is blank."""
  colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (51, 102, 204), (0, 0, 0),
             (255, 255, 255), (10, 20, 30)]
  recs = []
  for i, c in enumerate(colours):
    _png(tmp_path / "imgs" / f"{i}.png", c)
    recs.append({"image": f"imgs/{i}.png", "prefix": f"caption en {i}", "suffix": f"colour {i}"})
  lines = recs[:2] + [""] + recs[2:]
  return _write(tmp_path / "data.jsonl", lines), colours


def test_good_file(data, tmp_path, monkeypatch):
  path, colours = data
  monkeypatch.chdir(tmp_path / "imgs")  # relative paths resolve against the file, not cwd
  records, bad = jsonl.read_records(path)
  assert bad == []
  assert [r["line"] for r in records] == [1, 2, 4, 5, 6, 7, 8]
  assert records[0]["image"] == str(tmp_path / "imgs" / "0.png")
  assert records[0]["prefix"] == "caption en 0" and records[0]["suffix"] == "colour 0"
  src = jsonl.JsonlSource(path, image_size=S)
  assert len(src) == 7
  ex = src[0]
  assert ex["image"].dtype == np.float32 and ex["image"].shape == (S, S, 3)
  np.testing.assert_array_equal(ex["image"], np.broadcast_to([1, -1, -1], (S, S, 3)))
  for i, c in enumerate(colours):
    np.testing.assert_array_equal(src[i]["image"], np.broadcast_to(_expected(c), (S, S, 3)))
  assert src[3]["line"] == 5


def test_absolute_path_and_no_suffix(tmp_path, tok):
  img = _png(tmp_path / "elsewhere" / "x.png", (255, 0, 0))
  sub = tmp_path / "sub"
  sub.mkdir()
  path = _write(sub / "eval.jsonl", [{"image": str(img), "prefix": "q"},
                                     {"image": str(img), "prefix": "q", "suffix": None}])
  records, _ = jsonl.read_records(path)
  assert [r["suffix"] for r in records] == [None, None]
  assert records[0]["image"] == str(img)
  batch = jsonl.dataset(path, tok, image_size=S, max_len=6, batch_size=2, shuffle=False,
                        num_epochs=1, process_index=0, process_count=1)[0]
  assert batch["mask_loss"].sum() == 0  # generation prompts: nothing to learn


def test_loader_resize_matches_hand_computation(tmp_path):
  # 2x1 image (black | white) upsampled to 4 wide with PIL bilinear.
  img = np.zeros((1, 2, 3), np.uint8)
  img[:, 1] = 255
  p = tmp_path / "two.png"
  Image.fromarray(img).save(p)
  got = jsonl.load_image(p, 4)
  # Output pixel centres (j + .5) / 2 - .5 in input coordinates: -.25, .25, .75, 1.25; edges
  # clamp, so the white weight is 0, .25, .75, 1 -> 0, 64, 191, 255 (PIL rounds 8-bit results).
  want = np.asarray([0, 64, 191, 255], np.float32) / np.float32(127.5) - np.float32(1)
  np.testing.assert_array_equal(got[0, :, 0], want)
  assert got.shape == (4, 4, 3)


BAD = {
    "bad_json": ('{"image": "ok.png", "prefix": ', "invalid JSON"),
    "not_object": ('["ok.png", "q"]', "expected a JSON object, got list"),
    "missing_key": ({"image": "ok.png"}, "missing key(s) ['prefix']"),
    "wrong_type": ({"image": "ok.png", "prefix": 3}, "'prefix' must be a string, got int"),
    "wrong_suffix_type": ({"image": "ok.png", "prefix": "q", "suffix": ["a"]},
                          "'suffix' must be a string"),
    "missing_file": ({"image": "nope.png", "prefix": "q"}, "image 'nope.png' not found"),
    "unreadable_file": ({"image": "garbage.png", "prefix": "q"}, "cannot read image"),
    "unknown_key": ({"image": "ok.png", "prefix": "q", "answer": "x"},
                    "unknown key(s) ['answer']"),
    "duplicate_key": ('{"image": "ok.png", "prefix": "q", "prefix": "r"}', "duplicate key"),
    "not_utf8": ('{"image": "ok.png", "prefix": "\xff"}', "not valid UTF-8"),
}


def _bad_file(tmp_path, bad_line):
  _png(tmp_path / "ok.png", (1, 2, 3))
  (tmp_path / "garbage.png").write_bytes(b"this is not a png" * 10)
  good = {"image": "ok.png", "prefix": "q", "suffix": "a"}
  return _write(tmp_path / "data.jsonl", [good, "", bad_line, good])


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_record_names_file_and_line(tmp_path, case):
  line, what = BAD[case]
  path = _bad_file(tmp_path, line)
  with pytest.raises(ValueError) as e:
    jsonl.read_records(path)
  msg = str(e.value)
  assert msg.startswith(f"{path}:3: "), msg
  assert what in msg, msg
  with pytest.raises(ValueError, match="data.jsonl:3: "):
    jsonl.JsonlSource(path, image_size=S)


def test_skip_bad_reports_exactly_the_bad_lines(tmp_path, tok):
  _png(tmp_path / "ok.png", (255, 0, 0))
  (tmp_path / "garbage.png").write_bytes(b"\x89PNG nope")
  good = {"image": "ok.png", "prefix": "q", "suffix": "a"}
  lines = [good, BAD["bad_json"][0], good, BAD["missing_file"][0], BAD["unreadable_file"][0],
           good, BAD["unknown_key"][0]]
  path = _write(tmp_path / "data.jsonl", lines)
  records, bad = jsonl.read_records(path, skip_bad=True)
  assert [r["line"] for r in records] == [1, 3, 6]
  assert [m.split(": ")[0] for m in bad] == [f"{path}:{n}" for n in (2, 4, 5, 7)]
  src = jsonl.JsonlSource(path, image_size=S, skip_bad=True)
  assert len(src) == 3 and len(src.bad) == 4
  ds = jsonl.dataset(path, tok, image_size=S, max_len=8, batch_size=3, shuffle=False,
                     num_epochs=1, skip_bad=True, process_index=0, process_count=1)
  assert len(ds) == 1 and ds[0]["line"].tolist() == [1, 3, 6]


def test_truncated_image_fails_at_load_with_file_and_line(tmp_path):
  p = _png(tmp_path / "t.png", (5, 6, 7), size=(64, 64))
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(p)
  data = p.read_bytes()
  p.write_bytes(data[:len(data) // 2])  # header intact, pixel data cut
  path = _write(tmp_path / "d.jsonl", [{"image": "t.png", "prefix": "q"}])
  src = jsonl.JsonlSource(path, image_size=S)  # the header is fine
  with pytest.raises(ValueError, match=r"d\.jsonl:1: cannot read image .*t\.png"):
    src[0]


def test_tokens_match_tokenizer_batch(data, tok):
  path, _ = data
  # One long prefix so that max_len cuts it, one example without a suffix.
  extra = [{"image": "imgs/0.png", "prefix": "word " * 40, "suffix": "x"},
           {"image": "imgs/1.png", "prefix": "q"}]
  with open(path, "a") as f:
    f.write("".join(json.dumps(x) + "\n" for x in extra))
  records, _ = jsonl.read_records(path)
  ds = jsonl.dataset(path, tok, image_size=S, max_len=12, batch_size=len(records),
                     shuffle=False, num_epochs=1, process_index=0, process_count=1)
  b = ds[0]
  want = tok.batch([r["prefix"] for r in records], [r["suffix"] for r in records], max_len=12)
  for k in ("text", "mask_ar", "mask_loss"):
    assert b[k].dtype == np.int32 and b[k].shape == (len(records), 12)
    np.testing.assert_array_equal(b[k], want[k], err_msg=k)
  assert b["input_mask"].dtype == bool
  np.testing.assert_array_equal(b["input_mask"], want["mask_input"].astype(bool))
  assert b["image"].shape == (len(records), S, S, 3) and b["image"].dtype == np.float32
  assert b["line"].tolist() == [r["line"] for r in records]


def _lines(ds):
  return [int(x) for b in ds for x in b["line"]]


def test_process_shards_are_disjoint_and_cover_the_file(data, tok):
  path, _ = data
  kw = dict(image_size=S, max_len=8, batch_size=1, num_epochs=1, process_count=2,
            drop_remainder=False, seed=3)
  p0 = _lines(jsonl.dataset(path, tok, process_index=0, **kw))
  p1 = _lines(jsonl.dataset(path, tok, process_index=1, **kw))
  assert len(p0) == 4 and len(p1) == 3
  assert not set(p0) & set(p1)
  assert sorted(p0 + p1) == [1, 2, 4, 5, 6, 7, 8]
  # The processes interleave the one shuffled stream: p0 takes its even, p1 its odd places.
  one = _lines(jsonl.dataset(path, tok, process_index=0, **{**kw, "process_count": 1}))
  assert one[0::2] == p0 and one[1::2] == p1
  with pytest.raises(ValueError, match="process_index"):
    jsonl.dataset(path, tok, process_index=2, **kw)


def test_shuffle_is_deterministic(data, tok):
  path, _ = data
  kw = dict(image_size=S, max_len=8, batch_size=1, num_epochs=1, process_index=0,
            process_count=1)
  a = _lines(jsonl.dataset(path, tok, seed=0, **kw))
  b = _lines(jsonl.dataset(path, tok, seed=0, **kw))
  c = _lines(jsonl.dataset(path, tok, seed=1, **kw))
  plain = _lines(jsonl.dataset(path, tok, shuffle=False, **kw))
  assert a == b
  assert a != c and sorted(a) == sorted(c) == plain == [1, 2, 4, 5, 6, 7, 8]


def test_iterator_state_round_trip(data, tok):
  path, _ = data
  ds = jsonl.dataset(path, tok, image_size=S, max_len=8, batch_size=2, seed=5,
                     process_index=0, process_count=1)  # num_epochs=None: forever
  it = ds.to_iter_dataset().__iter__()
  for _ in range(3):
    next(it)
  state = it.get_state()
  after = [next(it) for _ in range(2)]
  it2 = ds.to_iter_dataset().__iter__()
  it2.set_state(state)
  again = [next(it2) for _ in range(2)]
  for x, y in zip(after, again):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)
  # Batches 4-5 are examples 6..9 of the stream: they cross into the second epoch.
  assert set(_lines(after)) <= {1, 2, 4, 5, 6, 7, 8}


def test_clip_from_frame_directory(tmp_path, tok):
  colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
  for name, c in zip(["f2.png", "f0.png", "f1.png"], [colours[2], colours[0], colours[1]]):
    _png(tmp_path / "clip" / name, c)
  (tmp_path / "clip" / ".DS_Store").write_bytes(b"junk")  # hidden files are not frames
  x = jsonl.load_image(tmp_path / "clip", S)
  assert x.shape == (3, S, S, 3) and x.dtype == np.float32
  for f, c in enumerate(colours):
    np.testing.assert_array_equal(x[f], np.broadcast_to(_expected(c), (S, S, 3)))
  path = _write(tmp_path / "v.jsonl", [{"image": "clip", "prefix": "q", "suffix": "a"}] * 2)
  b = jsonl.dataset(path, tok, image_size=S, max_len=8, batch_size=2, shuffle=False,
                    num_epochs=1, process_index=0, process_count=1)[0]
  assert b["image"].shape == (2, 3, S, S, 3)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="holds no frames"):
    jsonl.load_image(tmp_path / "empty", S)


def test_clip_from_npy(tmp_path, tok):
  u8 = np.zeros((2, 10, 6, 3), np.uint8)
  u8[0] = (255, 0, 0)
  u8[1] = (51, 102, 204)
  np.save(tmp_path / "u8.npy", u8)
  x = jsonl.load_image(tmp_path / "u8.npy", S)
  assert x.shape == (2, S, S, 3) and x.dtype == np.float32
  np.testing.assert_array_equal(x[0], np.broadcast_to(_expected((255, 0, 0)), (S, S, 3)))
  np.testing.assert_array_equal(x[1], np.broadcast_to(_expected((51, 102, 204)), (S, S, 3)))

  fl = np.empty((3, 5, 7, 3), np.float32)
  fl[:] = np.asarray([-1.0, 0.25, 1.0], np.float32)
  np.save(tmp_path / "f.npy", fl)
  y = jsonl.load_image(tmp_path / "f.npy", S)
  assert y.shape == (3, S, S, 3) and y.dtype == np.float32
  np.testing.assert_allclose(y, np.broadcast_to([-1.0, 0.25, 1.0], y.shape), atol=1e-6)
  same = np.linspace(-1, 1, 2 * S * S * 3, dtype=np.float32).reshape(2, S, S, 3)
  np.save(tmp_path / "same.npy", same)
  np.testing.assert_array_equal(jsonl.load_image(tmp_path / "same.npy", S), same)

  np.save(tmp_path / "range.npy", fl * 255)
  with pytest.raises(ValueError, match="already be in"):
    jsonl.load_image(tmp_path / "range.npy", S)
  np.save(tmp_path / "shape.npy", u8[0])
  path = _write(tmp_path / "v.jsonl", [{"image": "u8.npy", "prefix": "q"},
                                       {"image": "shape.npy", "prefix": "q"}])
  with pytest.raises(ValueError, match=r"v\.jsonl:2: clip .* has shape \(10, 6, 3\)"):
    jsonl.read_records(path)
  # Clips of different lengths cannot share a batch: the error names the lines.
  path = _write(tmp_path / "w.jsonl", [{"image": "u8.npy", "prefix": "q"},
                                       {"image": "f.npy", "prefix": "q"}])
  ds = jsonl.dataset(path, tok, image_size=S, max_len=8, batch_size=2, shuffle=False,
                     num_epochs=1, process_index=0, process_count=1)
  with pytest.raises(ValueError, match=r"line 1: \(2, 8, 8, 3\), line 2: \(3, 8, 8, 3\)"):
    ds[0]
