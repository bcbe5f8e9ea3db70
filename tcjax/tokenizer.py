"""Gemma SentencePiece tokenizer and PaliGemma's prompt format.

A PaliGemma example is (big_vision `configs/proj/paligemma/transfers/common.py`):

  [image tokens] BOS prefix SEP suffix EOS
  mask_ar:    0     0    0    0     1    1     0 = prefix (full attention), 1 = causal suffix
  mask_loss:  0     0    0    0     1    1     the loss covers the suffix and EOS only

with SEP = "\n" tokenised on its own (so it never merges with the prefix or suffix pieces).
big_vision's model takes the image separately, so its `text` has NO image tokens
(`num_image_tokens=0`, the default); HF's `input_ids` start with `num_image_tokens` copies of
`<image>` (pass `image_token_id`), and HF's `token_type_ids` equal `mask_ar` on valid tokens.
Batches are padded to a common length like big_vision's `tolen`: text with `pad_id` (0), mask_ar
with 1, mask_loss and mask_input with 0; longer examples are truncated at the end.
"""

from __future__ import annotations

from typing import Dict, Optional, Sequence

import numpy as np


class Tokenizer:
  """SentencePiece tokenizer from a local `.model` file (e.g. big_vision's
  `paligemma_tokenizer.model`).

  Attributes: bos_id, eos_id, pad_id (0 when the model defines none, as in Gemma),
  vocab_size.
  """

  def __init__(self, path: str, *, pad_id: Optional[int] = None):
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top
    self.sp = spm.SentencePieceProcessor(model_file=str(path))
    self.bos_id = self.sp.bos_id()
    self.eos_id = self.sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise ValueError(f"{path}: the SentencePiece model defines no BOS or EOS piece")
    if pad_id is None:
      pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
    self.pad_id = int(pad_id)

  @property
  def vocab_size(self) -> int:
    return self.sp.get_piece_size()

  def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> list:
    ids = list(self.sp.encode(text))
    return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

  def decode(self, ids: Sequence[int], *, stop_at_eos: bool = True) -> str:
    """ids -> text; stops at the first EOS, drops padding and ids outside the vocabulary."""
    out = []
    for i in np.asarray(ids).tolist():
      if stop_at_eos and i == self.eos_id:
        break
      if i == self.pad_id or not 0 <= i < self.vocab_size:
        continue
      out.append(i)
    return self.sp.decode(out)

  def prompt(self, prefix: str, suffix: Optional[str] = None, *, sep: str = "\n",
             num_image_tokens: int = 0, image_token_id: Optional[int] = None
             ) -> Dict[str, np.ndarray]:
    """One example -> {"text", "mask_ar", "mask_loss", "mask_input"}: int32[T] each.

    suffix None builds the generation prompt (BOS prefix SEP, all mask_ar 0, no EOS).
    """
    if num_image_tokens and image_token_id is None:
      raise ValueError("num_image_tokens > 0 needs image_token_id")
    pre = self.encode(prefix, bos=True) + self.encode(sep)
    suf = self.encode(suffix, eos=True) if suffix is not None else []
    img = [image_token_id] * num_image_tokens
    text = img + pre + suf
    mask_ar = [0] * (len(img) + len(pre)) + [1] * len(suf)
    mask_loss = [0] * (len(img) + len(pre)) + [1] * len(suf)
    return {"text": np.asarray(text, np.int32), "mask_ar": np.asarray(mask_ar, np.int32),
            "mask_loss": np.asarray(mask_loss, np.int32),
            "mask_input": np.ones(len(text), np.int32)}

  def batch(self, prefixes: Sequence[str], suffixes: Optional[Sequence[Optional[str]]] = None,
            *, max_len: Optional[int] = None, padding: str = "right", sep: str = "\n",
            num_image_tokens: int = 0, image_token_id: Optional[int] = None
            ) -> Dict[str, np.ndarray]:
    """Prompts of a batch, padded to one length -> {"text", "mask_ar", "mask_loss",
    "mask_input"}: int32[B, T].

    max_len: T; None = the longest example. Longer examples are cut at the end.
    padding: "right" (big_vision) or "left" (the usual choice for HF generate).
    """
    if padding not in ("right", "left"):
      raise ValueError(f"padding={padding!r}; use 'right' or 'left'")
    if suffixes is None:
      suffixes = [None] * len(prefixes)
    if len(suffixes) != len(prefixes):
      raise ValueError(f"{len(prefixes)} prefixes but {len(suffixes)} suffixes")
    ex = [self.prompt(p, s, sep=sep, num_image_tokens=num_image_tokens,
                      image_token_id=image_token_id) for p, s in zip(prefixes, suffixes)]
    T = max_len if max_len is not None else max(len(e["text"]) for e in ex)
    pads = {"text": self.pad_id, "mask_ar": 1, "mask_loss": 0, "mask_input": 0}
    out = {k: np.full((len(ex), T), v, np.int32) for k, v in pads.items()}
    for b, e in enumerate(ex):
      n = min(len(e["text"]), T)
      for k in pads:
        if padding == "right":
          out[k][b, :n] = e[k][:n]
        else:
          out[k][b, T - n:] = e[k][:n]
    return out
