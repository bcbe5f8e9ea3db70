"""grain testbed streams (tcjax.data.pipeline): batch layout, the documented global index ->
example mapping (checked by decoding the tokens), per-process shards that concatenate to the
one-process batch, argument checks, mixing by modality (deterministic, weighted, resumable from
the iterator state), and prompt-only evaluation batches."""

import grain
import numpy as np
import pytest

from tcjax.data import pipeline, testbed
from tcjax.tokenizer import Tokenizer

TOKENIZER = "tcjax/assets/testbed_tokenizer.model"
IMAGE_FAMS = ("count", "binding", "locate")  # locate: answers made of <locNNNN> pieces
T = 24  # long enough for every testbed prompt + answer + EOS
# One reader thread: the machine is shared, and a few batches ahead is plenty here.
READ = grain.ReadOptions(num_threads=1, prefetch_buffer_size=2)


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(TOKENIZER)


def stream(tok, families, batch_size, *, split="train", seed=0, process_index=0,
           process_count=1, max_len=T):
  return pipeline.testbed_stream(families, tok, split=split, seed=seed, batch_size=batch_size,
                                 max_len=max_len, process_index=process_index,
                                 process_count=process_count)


def expected_example(families, split, seed, g):
  """The module docstring's mapping, written out: global example g of a stream."""
  return testbed.example(families[g % len(families)], split, seed, g // len(families))


def check_row(tok, row, ex):
  """One batch row against its testbed example: pixels, family, and the tokens, which must be
  BOS prefix | suffix EOS | padding, decoding back to the example's question and answer."""
  text, ar, loss, valid = row["text"], row["mask_ar"], row["mask_loss"], row["input_mask"]
  n = int(valid.sum())
  assert valid[:n].all() and not valid[n:].any(), "input_mask is not right-padded"
  assert (text[n:] == tok.pad_id).all()
  assert text[0] == tok.bos_id and text[n - 1] == tok.eos_id  # nothing cut by max_len
  assert set(np.unique(ar[:n])) == {0, 1} and (np.diff(ar[:n]) >= 0).all()  # prefix, then suffix
  np.testing.assert_array_equal(loss[:n], ar[:n])  # the loss is on the suffix and EOS only
  assert not loss[n:].any()
  assert tok.decode(text[:n][ar[:n] == 0]) == ex["prefix"]
  assert tok.decode(text[:n][ar[:n] == 1]) == ex["suffix"]
  assert row["image"].tobytes() == ex["image"].tobytes()
  assert row["family"] == testbed.FAMILIES.index(ex["family"])


def rows(batch):
  return [{k: v[i] for k, v in batch.items()} for i in range(len(batch["text"]))]


@pytest.mark.parametrize("families, batch_size, image_shape", [
    (IMAGE_FAMS, 4, (64, 64, 3)),
    (("video",), 2, (8, 64, 64, 3)),
    (("audio",), 2, (4, 64, 64, 3)),
], ids=["image", "video", "audio"])
def test_batches_have_the_documented_layout_and_examples(tok, families, batch_size, image_shape):
  s = stream(tok, families, batch_size, split="val", seed=3)
  for b in (0, 2):  # batch 2 so that the batch offset (b * B) enters the mapping
    batch = s[b]
    want = {"image": ((batch_size,) + image_shape, np.float32),
            "text": ((batch_size, T), np.int32), "mask_ar": ((batch_size, T), np.int32),
            "mask_loss": ((batch_size, T), np.int32), "input_mask": ((batch_size, T), np.bool_),
            "family": ((batch_size,), np.int32)}
    assert {k: (v.shape, v.dtype) for k, v in batch.items()} == want
    for j, row in enumerate(rows(batch)):
      check_row(tok, row, expected_example(families, "val", 3, b * batch_size + j))


def test_families_of_one_batch_cycle_in_order(tok):
  # Hand-worked: batch 1 of 4 holds global examples 4..7 -> families 4 % 3, ... = 1, 2, 0, 1.
  fam = stream(tok, IMAGE_FAMS, 4)[1]["family"]
  assert [testbed.FAMILIES[f] for f in fam] == ["binding", "locate", "count", "binding"]


def test_a_repeated_family_is_drawn_more_often_and_never_twice_the_same(tok):
  # Hand-worked: cycle (count, locate, count); batches of 3, batch 1 = global examples 3, 4, 5
  # -> count #2, locate #1, count #3 (count has two slots per cycle: indices 2q and 2q + 1).
  fams = ("count", "locate", "count")
  batch = stream(tok, fams, 3, seed=1)[1]
  for row, (fam, index) in zip(rows(batch), [("count", 2), ("locate", 1), ("count", 3)]):
    check_row(tok, row, testbed.example(fam, "train", 1, index))
  images = [stream(tok, fams, 3, seed=1)[b]["image"] for b in range(4)]
  counts = np.concatenate(images)[[i for i in range(12) if fams[i % 3] == "count"]]
  assert len({c.tobytes() for c in counts}) == 8  # eight count slots, eight distinct examples


def test_process_shards_concatenate_to_the_global_batch(tok):
  whole = stream(tok, IMAGE_FAMS, 4)
  parts = [stream(tok, IMAGE_FAMS, 4, process_index=p, process_count=2) for p in range(2)]
  for b in (0, 1):
    local = [parts[p][b] for p in range(2)]
    assert all(len(l["text"]) == 2 for l in local)
    for k, v in whole[b].items():
      assert np.concatenate([l[k] for l in local]).tobytes() == v.tobytes(), (b, k)


def test_argument_errors(tok):
  with pytest.raises(ValueError, match="mix image shapes"):
    stream(tok, ("count", "video"), 4)
  with pytest.raises(ValueError, match="mix image shapes"):
    stream(tok, ("video", "audio"), 4)
  with pytest.raises(ValueError, match="not divisible"):
    stream(tok, IMAGE_FAMS, 3, process_count=2)
  with pytest.raises(ValueError, match="process_index"):
    stream(tok, IMAGE_FAMS, 4, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="unknown"):
    stream(tok, ("count", "sing"), 4)
  with pytest.raises(ValueError, match="empty"):
    stream(tok, (), 4)
  img = stream(tok, IMAGE_FAMS, 2)
  with pytest.raises(ValueError):
    pipeline.mixed_stream([img, img], [1.0])
  with pytest.raises(ValueError):
    pipeline.mixed_stream([img, img], [1.0, 0.0])


def test_by_modality_groups_families_in_testbed_order():
  got = pipeline.by_modality(("audio", "count", "video", "locate"))
  assert got == {"audio": ("audio",), "image": ("count", "locate"), "video": ("video",)}


WEIGHTS = {"image": 0.6, "video": 0.2, "audio": 0.2}
MIX_FAMS = {"image": ("count", "digit"), "video": ("video",), "audio": ("audio",)}


def mixed(tok):
  streams = {m: stream(tok, f, 2, max_len=T) for m, f in MIX_FAMS.items()}
  return pipeline.mixed_stream(list(streams.values()), list(WEIGHTS.values())), streams


def modality_of(batch):
  return testbed.modality(testbed.FAMILIES[int(batch["family"][0])])


def test_mix_is_deterministic_weighted_and_skips_nothing(tok):
  m, streams = mixed(tok)
  batches = [m[i] for i in range(50)]
  mods = [modality_of(b) for b in batches]
  for b, mod in zip(batches, mods):  # one modality (one image shape) per batch
    assert len({testbed.modality(testbed.FAMILIES[f]) for f in b["family"]}) == 1
  counts = {k: mods.count(k) for k in WEIGHTS}
  for k, w in WEIGHTS.items():  # 30 / 10 / 10 expected
    assert abs(counts[k] - 50 * w) <= 3, counts
  # The n-th batch of a modality in the mix is that stream's n-th batch: none skipped or repeated.
  seen = {k: 0 for k in WEIGHTS}
  for b, mod in zip(batches[:12], mods[:12]):
    want = streams[mod][seen[mod]]
    assert all(b[k].tobytes() == want[k].tobytes() for k in want), (mod, seen[mod])
    seen[mod] += 1
  # Built again from scratch: the same sequence, byte for byte.
  again, _ = mixed(tok)
  for i in (0, 7, 31, 49):
    assert all(again[i][k].tobytes() == batches[i][k].tobytes() for k in batches[i])


def test_iterator_state_round_trip(tok):
  m, _ = mixed(tok)
  it = iter(m.to_iter_dataset(READ))
  for _ in range(4):
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(5)]
  assert len({modality_of(b) for b in want}) > 1  # the resumed part crosses modalities
  fresh, _ = mixed(tok)
  it2 = iter(fresh.to_iter_dataset(READ))
  it2.set_state(state)
  got = [next(it2) for _ in range(5)]
  for g, w in zip(got, want):
    assert g.keys() == w.keys()
    assert all(g[k].tobytes() == w[k].tobytes() for k in w)


def test_eval_batches_are_prompts_with_answers_apart(tok):
  fams = ("count", "locate")
  out = pipeline.eval_batches(fams, tok, split="test", seed=5, per_family=5, batch_size=2,
                              max_len=T)
  # 5 examples per family in chunks of 2: 2, 2, 1.
  assert [(f, len(b["answer"])) for f, b in out] == [
      ("count", 2), ("count", 2), ("count", 1), ("locate", 2), ("locate", 2), ("locate", 1)]
  i = {f: 0 for f in fams}
  for fam, b in out:
    assert b["image"].dtype == np.float32 and b["text"].dtype == np.int32
    assert b["input_mask"].dtype == np.bool_ and b["mask_ar"].dtype == np.int32
    for j in range(len(b["answer"])):
      ex = testbed.example(fam, "test", 5, i[fam])
      i[fam] += 1
      valid = b["input_mask"][j]
      n = int(valid.sum())
      assert valid[:n].all() and not valid[n:].any()
      text = b["text"][j]
      assert text[0] == tok.bos_id and tok.eos_id not in text[:n]
      assert not b["mask_ar"][j][:n].any()  # the whole prompt is prefix: nothing to predict
      assert tok.decode(text[:n]) == ex["prefix"]
      assert b["answer"][j] == ex["suffix"]
      assert b["scene"][j] == ex["scene"]
      assert b["image"][j].tobytes() == ex["image"].tobytes()


def test_a_prompt_longer_than_max_len_is_refused_not_cut(tok):
  full = tok.batch(["read the number"], ["1 2 3 4"])["text"].shape[1]
  assert pipeline.tokenize(tok, "read the number", "1 2 3 4", full)["text"].shape == (full,)
  with pytest.raises(ValueError, match="max_len"):
    pipeline.tokenize(tok, "read the number", "1 2 3 4", full - 1)
