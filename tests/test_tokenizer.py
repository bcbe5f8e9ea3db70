"""Gemma-style SentencePiece tokenizer and PaliGemma prompt format (tcjax.tokenizer)."""

import io

import numpy as np
import pytest
import sentencepiece as spm

from tcjax.tokenizer import Tokenizer

LINES = ["a photo of a cat", "caption en", "answer the question", "what is in the image",
         "a dog on the grass", "two cats and a dog", "the sky is blue"] * 5


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
  # Gemma's id layout: pad 0, eos 1, bos 2, unk 3; "\n" is its own piece.
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(LINES), model_writer=buf, vocab_size=64, model_type="bpe",
      pad_id=0, eos_id=1, bos_id=2, unk_id=3, user_defined_symbols=["\n"],
      normalization_rule_name="identity", add_dummy_prefix=False,
      remove_extra_whitespaces=False, minloglevel=2, hard_vocab_limit=False)
  path = tmp_path_factory.mktemp("sp") / "tiny.model"
  path.write_bytes(buf.getvalue())
  return str(path)


@pytest.fixture(scope="module")
def sp(model_path):
  return spm.SentencePieceProcessor(model_file=model_path)


def test_ids(model_path):
  tok = Tokenizer(model_path)
  assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
  assert tok.vocab_size == 64


def test_training_prompt_layout(model_path, sp):
  tok = Tokenizer(model_path)
  ex = tok.prompt("caption en", "a dog on the grass")
  pre, sep, suf = sp.encode("caption en"), sp.encode("\n"), sp.encode("a dog on the grass")
  want = [2] + pre + sep + suf + [1]
  np.testing.assert_array_equal(ex["text"], want)
  n_pre = 1 + len(pre) + len(sep)
  np.testing.assert_array_equal(ex["mask_ar"], [0] * n_pre + [1] * (len(suf) + 1))
  np.testing.assert_array_equal(ex["mask_loss"], [0] * n_pre + [1] * (len(suf) + 1))
  np.testing.assert_array_equal(ex["mask_input"], np.ones(len(want)))
  assert all(v.dtype == np.int32 for v in ex.values())


def test_generation_prompt_has_no_suffix_or_eos(model_path, sp):
  tok = Tokenizer(model_path)
  ex = tok.prompt("what is in the image")
  np.testing.assert_array_equal(ex["text"], [2] + sp.encode("what is in the image") + [4])
  assert not ex["mask_ar"].any() and not ex["mask_loss"].any()


def test_image_tokens_for_hf(model_path, sp):
  tok = Tokenizer(model_path)
  ex = tok.prompt("caption en", "a cat", num_image_tokens=3, image_token_id=63)
  body = [2] + sp.encode("caption en") + [4] + sp.encode("a cat") + [1]
  np.testing.assert_array_equal(ex["text"], [63, 63, 63] + body)
  assert ex["mask_ar"][:3 + 1 + len(sp.encode("caption en")) + 1].sum() == 0
  with pytest.raises(ValueError, match="image_token_id"):
    tok.prompt("x", num_image_tokens=2)


@pytest.mark.parametrize("padding", ["right", "left"])
def test_batch_padding(model_path, padding):
  tok = Tokenizer(model_path)
  a = tok.prompt("caption en", "a cat")
  b = tok.prompt("what is in the image", "two cats and a dog")
  out = tok.batch(["caption en", "what is in the image"], ["a cat", "two cats and a dog"],
                  padding=padding)
  T = max(len(a["text"]), len(b["text"]))
  assert out["text"].shape == (2, T)
  n = len(a["text"])
  sl = slice(0, n) if padding == "right" else slice(T - n, T)
  pad = slice(n, T) if padding == "right" else slice(0, T - n)
  for k in ("text", "mask_ar", "mask_loss", "mask_input"):
    np.testing.assert_array_equal(out[k][0, sl], a[k])
    np.testing.assert_array_equal(out[k][1], b[k])
  # big_vision's tolen pad values: text 0, mask_ar 1, mask_loss 0; mask_input marks padding
  assert (out["text"][0, pad] == 0).all() and (out["mask_ar"][0, pad] == 1).all()
  assert (out["mask_loss"][0, pad] == 0).all() and (out["mask_input"][0, pad] == 0).all()


def test_batch_truncates_to_max_len(model_path):
  tok = Tokenizer(model_path)
  full = tok.prompt("what is in the image", "two cats and a dog")
  out = tok.batch(["what is in the image"], ["two cats and a dog"], max_len=5)
  np.testing.assert_array_equal(out["text"][0], full["text"][:5])
  with pytest.raises(ValueError, match="suffixes"):
    tok.batch(["a", "b"], ["c"])


def test_decode_round_trip(model_path):
  tok = Tokenizer(model_path)
  ids = tok.encode("a dog on the grass")
  assert tok.decode(ids + [1, 5, 6]) == "a dog on the grass"  # stops at EOS
  assert tok.decode([0, 0] + ids) == "a dog on the grass"     # padding dropped
