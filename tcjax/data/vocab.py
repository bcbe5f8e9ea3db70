"""The testbed's SentencePiece tokenizer: its words plus PaliGemma's 1024 `<locNNNN>` tokens.

Built with SentencePiece's own trainer, so the model loads through `tcjax.tokenizer.Tokenizer`
exactly as a real PaliGemma tokenizer does. Piece ids follow Gemma: pad 0, eos 1, bos 2, unk 3;
digits are split into single pieces (as Gemma does), so "4 0 7" is one piece per digit.

  python -m tcjax.data.vocab tcjax/assets/testbed_tokenizer.model   # rebuild the stored model
"""

from __future__ import annotations

import io
import sys

from tcjax.data import testbed

LOC_TOKENS = [f"<loc{i:04d}>" for i in range(testbed.LOC_BINS)]


def build(path: str) -> None:
  """Trains the tokenizer on `testbed.corpus()` and writes the `.model` file to `path`."""
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top
  sentences = testbed.corpus() * 4
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, model_type="bpe",
      vocab_size=len(LOC_TOKENS) + 128, hard_vocab_limit=False, split_digits=True,
      user_defined_symbols=LOC_TOKENS, pad_id=0, eos_id=1, bos_id=2, unk_id=3,
      character_coverage=1.0, minloglevel=2)
  with open(path, "wb") as f:
    f.write(model.getvalue())


if __name__ == "__main__":
  build(sys.argv[1])
