"""The bundled model: a small PaliGemma trained on the testbed, shipped in the repository.

  model, params, tokenizer = tcjax.bundled.load()

Same code as a real PaliGemma (SigLIP-style ViT, linear projector, Gemma decoder), 64 x 64 px
images at patch 4 (256 visual tokens; a clip of 8 frames gives 2048), the testbed tokenizer.
How it was trained (command, steps, wall time, accuracy per family): `experiments/RESULTS.md`.
"""

from __future__ import annotations

import os
from typing import Any, Tuple

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")
CHECKPOINT = os.path.join(ASSETS, "bundled.npz")
TOKENIZER = os.path.join(ASSETS, "testbed_tokenizer.model")


def load(*, plan=(), dtype="float32") -> Tuple[Any, Any, Any]:
  """-> (model: PaliGemma, params, tokenizer: tcjax.tokenizer.Tokenizer).

  plan: a compression plan for the model (the parameters do not depend on it).
  """
  from tcjax import checkpoints  # pylint: disable=g-import-not-at-top
  from tcjax.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  if not os.path.exists(CHECKPOINT):
    raise FileNotFoundError(f"{CHECKPOINT} is missing: the bundled model ships with the "
                            "repository (train it with `python -m experiments.train`)")
  model, params = checkpoints.load_big_vision(CHECKPOINT, dtype=dtype, plan=plan)
  return model, params, Tokenizer(TOKENIZER)
