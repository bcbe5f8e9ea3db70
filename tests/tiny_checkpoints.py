"""Tiny random checkpoint files for loader tests: an HF `save_pretrained`-style directory
(safetensors + config.json, written without torch) and random parameters by name."""

import json

import numpy as np
from safetensors.numpy import save_file

from tcjax.checkpoints import hf as hf_ckpt


def random_params(shapes, seed):
  """{name: float32 array of `shapes[name]`}, N(0, 0.1^2)."""
  rng = np.random.default_rng(seed)
  return {k: (rng.normal(size=s) * 0.1).astype(np.float32) for k, s in shapes.items()}


def write_hf_dir(directory, config, hf_config, hf_vocab, seed):
  """`directory`/model.safetensors (random weights in HF's names and shapes for `config`)
  and `directory`/config.json (`hf_config`); returns the directory."""
  directory.mkdir()
  save_file(random_params(hf_ckpt.hf_shapes(config, hf_vocab), seed),
            str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps(hf_config))
  return directory
