"""Damaged checkpoint files raise ValueError naming the file (and the tensor), never a bare error.

Each case damages a file written from a tiny model's random parameters: HF safetensors + config.json
(written with the `safetensors` library and a hand-written config.json, no torch) and big_vision
`.npz`. The undamaged files load, so the damage is the only thing each case changes.
"""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest

import tcjax.checkpoints as ckpt
from tiny_checkpoints import random_params, write_hf_dir
from tcjax.checkpoints import hf as hf_ckpt
from tcjax.nn.config import GemmaConfig, PaliGemmaConfig, SiglipConfig

CONFIG = PaliGemmaConfig(
    img=SiglipConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=8),
    llm=GemmaConfig(version=1, vocab_size=40, width=16, depth=1, mlp_dim=32, num_heads=2,
                    num_kv_heads=1, head_dim=8))
HF_VOCAB = 48  # HF's embedding: 40 real rows, <image> at 40, padding to 48
HF_CONFIG = {
    "model_type": "paligemma", "image_token_index": 40, "projection_dim": 16,
    "vision_config": {"hidden_size": 16, "num_hidden_layers": 1, "intermediate_size": 32,
                      "num_attention_heads": 2, "patch_size": 4, "image_size": 8},
    "text_config": {"model_type": "gemma", "hidden_size": 16, "num_hidden_layers": 1,
                    "intermediate_size": 32, "num_attention_heads": 2,
                    "num_key_value_heads": 1, "head_dim": 8, "vocab_size": HF_VOCAB},
}


@pytest.fixture
def hf_dir(tmp_path):
  return write_hf_dir(tmp_path / "hf", CONFIG, HF_CONFIG, HF_VOCAB, seed=0)


@pytest.fixture
def npz_path(tmp_path):
  flat = random_params(ckpt.param_shapes(CONFIG), seed=1)
  path = tmp_path / "pg.npz"
  ckpt.save_big_vision(path, ckpt.unflatten(flat))
  return path


def header(path):
  """(header length, header dict) of a safetensors file, read by hand (test-side only)."""
  raw = path.read_bytes()
  n = int.from_bytes(raw[:8], "little")
  return n, json.loads(raw[8:8 + n])


def raises(fn, *needles):
  with pytest.raises(ValueError) as e:
    fn()
  msg = str(e.value)
  for s in needles:
    assert s in msg, (s, msg)
  return msg


def test_undamaged_files_load(hf_dir, npz_path):
  model, _ = ckpt.load_hf(hf_dir)
  assert model.config.img == CONFIG.img and model.config.llm == CONFIG.llm
  model, _ = ckpt.load_big_vision(npz_path)
  assert model.config.img == CONFIG.img and model.config.llm == CONFIG.llm


# ------------------------------------------------------------------------------------------------
# HF safetensors / config.json
# ------------------------------------------------------------------------------------------------
def test_truncated_safetensors_names_file_and_tensor(hf_dir):
  f = hf_dir / "model.safetensors"
  n, hdr = header(f)
  last = max((k for k in hdr if k != "__metadata__"), key=lambda k: hdr[k]["data_offsets"][1])
  f.write_bytes(f.read_bytes()[:-100])  # today: "cannot reshape array of size ..."
  msg = raises(lambda: ckpt.load_hf(hf_dir), str(f), last)
  assert "truncated" in msg
  raises(lambda: hf_ckpt.read_safetensors(f), str(f), last)


def test_huge_header_length_is_a_value_error(hf_dir):
  f = hf_dir / "model.safetensors"
  raw = f.read_bytes()
  f.write_bytes(struct.pack("<Q", 10 ** 12) + raw[8:])  # today: MemoryError
  raises(lambda: ckpt.load_hf(hf_dir), str(f))


def test_garbage_header_names_file(hf_dir):
  f = hf_dir / "model.safetensors"
  raw = f.read_bytes()
  n, _ = header(f)
  f.write_bytes(raw[:8] + b"#" * n + raw[8 + n:])  # today: a bare JSONDecodeError
  raises(lambda: ckpt.load_hf(hf_dir), str(f))


def test_empty_safetensors_names_file(hf_dir):
  f = hf_dir / "model.safetensors"
  f.write_bytes(b"")
  raises(lambda: ckpt.load_hf(hf_dir), str(f))


@pytest.mark.parametrize("text", ['{"model_type": "paligemma", "vision_con', "[1, 2]", "\xff\xfe"])
def test_broken_config_json_names_file(hf_dir, text):
  cfg = hf_dir / "config.json"
  cfg.write_bytes(text.encode("latin-1"))  # today: a bare JSON error without the file name
  raises(lambda: ckpt.load_hf(hf_dir), str(cfg))


def test_config_json_missing_field_names_file_and_field(hf_dir):
  cfg = hf_dir / "config.json"
  bad = json.loads(json.dumps(HF_CONFIG))
  del bad["text_config"]["hidden_size"]
  cfg.write_text(json.dumps(bad))
  raises(lambda: ckpt.load_hf(hf_dir), str(cfg), "hidden_size")
  bad = {**HF_CONFIG, "vision_config": [1, 2]}
  cfg.write_text(json.dumps(bad))
  raises(lambda: ckpt.load_hf(hf_dir), str(cfg))


def test_broken_shard_index_names_file(hf_dir):
  index = hf_dir / "model.safetensors.index.json"
  index.write_text('{"weight_map": {"a": "model.safe')
  raises(lambda: ckpt.load_hf(hf_dir), str(index))
  index.write_text(json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}}))
  raises(lambda: ckpt.load_hf(hf_dir), str(index), "model-00002-of-00002.safetensors")


# ------------------------------------------------------------------------------------------------
# big_vision .npz
# ------------------------------------------------------------------------------------------------
def test_npz_missing_most_of_its_tree_names_file(npz_path):
  with np.load(npz_path) as z:
    keep = {k: z[k] for k in ("llm/final_norm/scale", "img/head/bias", "img/head/kernel")}
  np.savez(npz_path, **keep)
  raises(lambda: ckpt.load_big_vision(npz_path), str(npz_path), "img/embedding/kernel")
  # with a config: one error listing every missing parameter
  raises(lambda: ckpt.load_big_vision(npz_path, CONFIG), str(npz_path), "llm/layers/mlp/linear",
         "img/pos_embedding")


def test_npz_wrong_rank_names_file_and_tensor(npz_path):
  with np.load(npz_path) as z:
    flat = {k: z[k] for k in z.files}
  flat["img/embedding/kernel"] = flat["img/embedding/kernel"].reshape(-1)  # was 4-d
  np.savez(npz_path, **flat)
  raises(lambda: ckpt.load_big_vision(npz_path), str(npz_path), "img/embedding/kernel")


@pytest.mark.parametrize("cut", [lambda n: n // 2, lambda n: n - 10, lambda n: 3, lambda n: 0],
                         ids=["half", "tail", "3_bytes", "empty"])
def test_truncated_npz_names_file(npz_path, cut):
  raw = npz_path.read_bytes()
  npz_path.write_bytes(raw[:cut(len(raw))])  # today: BadZipFile / EOFError / a pickle error
  raises(lambda: ckpt.load_big_vision(npz_path), str(npz_path))


@pytest.mark.parametrize("compressed", [False, True])
def test_corrupt_npz_member_names_file_and_array(npz_path, compressed):
  with np.load(npz_path) as z:
    flat = {k: z[k] for k in z.files}
  name = "llm/layers/mlp/linear"
  (np.savez_compressed if compressed else np.savez)(npz_path, **flat)
  raw = bytearray(npz_path.read_bytes())
  with np.load(npz_path) as z:
    info = z.zip.getinfo(name + ".npy")
  # The member's data follows its 30-byte local header, file name and extra field.
  h = info.header_offset
  name_len, extra_len = struct.unpack("<HH", bytes(raw[h + 26:h + 30]))
  start = h + 30 + name_len + extra_len
  raw[start + info.compress_size // 2] ^= 0xFF
  npz_path.write_bytes(bytes(raw))
  raises(lambda: ckpt.load_big_vision(npz_path), str(npz_path), name)


def test_npz_odd_void_array_names_file_and_array(npz_path):
  with np.load(npz_path) as z:
    flat = {k: z[k] for k in z.files}
  flat["img/head/bias"] = flat["img/head/bias"].view("V4")
  np.savez(npz_path, **flat)
  raises(lambda: ckpt.load_big_vision(npz_path), str(npz_path), "img/head/bias")


def test_npy_instead_of_npz_names_file(tmp_path):
  path = tmp_path / "single.npy"
  np.save(path, np.zeros(3, ml_dtypes.bfloat16).view("V2"))
  raises(lambda: ckpt.load_big_vision(path), str(path))


def test_missing_file_stays_file_not_found(tmp_path):
  with pytest.raises(FileNotFoundError):
    ckpt.load_big_vision(tmp_path / "nowhere.npz")
  with pytest.raises(FileNotFoundError):
    hf_ckpt.read_safetensors(os.path.join(tmp_path, "nowhere.safetensors"))
