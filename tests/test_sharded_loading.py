"""Loading checkpoints straight into a target sharding (8 simulated devices, tests/conftest.py):
the rules' shardings, the stored values, FSDP weights really split, one parameter read at a time."""

import json

import jax
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import save_file

import tcjax.checkpoints as ckpt
from tiny_checkpoints import random_params, write_hf_dir
from configs.sharding import PALIGEMMA_RULES
from tcjax.checkpoints import hf as hf_ckpt
from tcjax.nn.config import GemmaConfig, PaliGemmaConfig, SiglipConfig
from tcjax.parallel import make_mesh

# Sizes chosen so that every FSDP-ruled weight has a dimension divisible by 8.
CONFIG = PaliGemmaConfig(
    img=SiglipConfig(width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=4, image_size=8),
    llm=GemmaConfig(version=1, vocab_size=40, width=16, depth=2, mlp_dim=32, num_heads=2,
                    num_kv_heads=1, head_dim=8))
HF_VOCAB = 48
HF_CONFIG = {
    "model_type": "paligemma", "image_token_index": 40, "projection_dim": 16,
    "vision_config": {"hidden_size": 16, "num_hidden_layers": 2, "intermediate_size": 32,
                      "num_attention_heads": 2, "patch_size": 4, "image_size": 8},
    "text_config": {"model_type": "gemma", "hidden_size": 16, "num_hidden_layers": 2,
                    "intermediate_size": 32, "num_attention_heads": 2,
                    "num_key_value_heads": 1, "head_dim": 8, "vocab_size": HF_VOCAB},
}

# PALIGEMMA_RULES on a data axis of 8, worked by hand from the shapes in CONFIG: "fsdp" splits
# the largest dimension divisible by 8 (the first of equal ones). Everything else is replicated.
BLK = "img/Transformer/encoderblock/"
FSDP_8 = {
    "llm/embedder/input_embedding": P("data", None),                      # [40, 16]
    "llm/layers/attn/q_einsum/w": P(None, None, "data", None),            # [2, 2, 16, 8]
    "llm/layers/attn/kv_einsum/w": P(None, None, None, "data", None),     # [2, 2, 1, 16, 8]
    "llm/layers/attn/attn_vec_einsum/w": P(None, None, None, "data"),     # [2, 2, 8, 16]
    "llm/layers/mlp/gating_einsum": P(None, None, None, "data"),          # [2, 2, 16, 32]
    "llm/layers/mlp/linear": P(None, "data", None),                       # [2, 32, 16]
    "img/embedding/kernel": P(None, None, None, "data"),                  # [4, 4, 3, 16]
    "img/head/kernel": P("data", None),                                   # [16, 16]
    BLK + "MultiHeadDotProductAttention_0/query/kernel": P(None, "data", None, None),  # [2,16,2,8]
    BLK + "MultiHeadDotProductAttention_0/key/kernel": P(None, "data", None, None),
    BLK + "MultiHeadDotProductAttention_0/value/kernel": P(None, "data", None, None),
    BLK + "MultiHeadDotProductAttention_0/out/kernel": P(None, None, None, "data"),  # [2,2,8,16]
    BLK + "MlpBlock_0/Dense_0/kernel": P(None, None, "data"),             # [2, 16, 32]
    BLK + "MlpBlock_0/Dense_1/kernel": P(None, "data", None),             # [2, 32, 16]
}


@pytest.fixture
def npz(tmp_path):
  flat = random_params(ckpt.param_shapes(CONFIG), seed=0)
  path = tmp_path / "pg.npz"
  np.savez(path, **flat)
  return path, flat


@pytest.fixture
def hf_dir(tmp_path):
  return write_hf_dir(tmp_path / "hf", CONFIG, HF_CONFIG, HF_VOCAB, seed=1)


def data8():
  return make_mesh((("data", 8),), axis_types="explicit")


def check_placed(params, mesh, fsdp, fraction):
  """Every leaf has the hand-worked spec, and each device holds only its `fraction` of the
  FSDP-ruled weights (the whole of the others)."""
  flat = ckpt.flatten(params)
  assert flat.keys() == ckpt.param_shapes(CONFIG).keys()
  for name, a in flat.items():
    spec = fsdp.get(name, P())
    assert a.sharding.is_equivalent_to(NamedSharding(mesh, spec), a.ndim), (name, a.sharding)
    shards = a.addressable_shards
    assert len(shards) == 8
    for s in shards:
      assert s.data.size * (fraction if name in fsdp else 1) == a.size, (name, s.data.shape)
    if name in fsdp:  # `fraction` distinct slices, together the whole array
      assert len({str(s.index) for s in shards}) == fraction, name


def test_npz_into_fsdp_sharding(npz):
  path, stored = npz
  mesh = data8()
  _, params = ckpt.load_big_vision(path, mesh=mesh, rules=PALIGEMMA_RULES)
  check_placed(params, mesh, FSDP_8, fraction=8)
  _, plain = ckpt.load_big_vision(path)  # the one-device load
  for name, a in ckpt.flatten(params).items():
    np.testing.assert_array_equal(np.asarray(a), stored[name], err_msg=name)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(ckpt.flatten(plain)[name]))
    assert a.dtype == np.float32


def test_hf_into_fsdp_sharding_on_a_2d_mesh(hf_dir):
  # FSDP over "data" of 2 on a 2 x 4 mesh: each device holds half of a weight, replicated
  # over the 4 devices of the "seq" axis.
  mesh = make_mesh((("data", 2), ("seq", 4)), axis_types="auto")
  _, params = ckpt.load_hf(hf_dir, mesh=mesh, rules=PALIGEMMA_RULES)
  # Each FSDP weight's largest dimension divides by 8, so by 2: the axes of FSDP_8 again.
  check_placed(params, mesh, FSDP_8, fraction=2)
  _, plain = ckpt.load_hf(hf_dir)
  plain = ckpt.flatten(plain)
  for name, a in ckpt.flatten(params).items():
    np.testing.assert_array_equal(np.asarray(a), np.asarray(plain[name]), err_msg=name)


def test_hf_into_sharding_with_dtype(hf_dir):
  mesh = data8()
  _, params = ckpt.load_hf(hf_dir, dtype="bfloat16", mesh=mesh, rules=PALIGEMMA_RULES)
  _, plain = ckpt.load_hf(hf_dir)
  plain = ckpt.flatten(plain)
  for name, a in ckpt.flatten(params).items():
    assert a.dtype == ml_dtypes.bfloat16, name
    want = np.asarray(plain[name]).astype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(np.asarray(a), want, err_msg=name)
  check_placed(params, mesh, FSDP_8, fraction=8)


class _Counted:
  """safe_open stand-in counting the bytes of every tensor (or slice of one) read."""

  def __init__(self, log, *args, **kwargs):
    self._f = _REAL_SAFE_OPEN(*args, **kwargs)
    self._log = log

  def __enter__(self):
    self._f.__enter__()
    return self

  def __exit__(self, *exc):
    return self._f.__exit__(*exc)

  def keys(self):
    return self._f.keys()

  def get_tensor(self, name):
    a = self._f.get_tensor(name)
    self._log.append(("read", a.nbytes))
    return a

  def get_slice(self, name):
    log, sl = self._log, self._f.get_slice(name)

    class Slice:
      get_shape, get_dtype = sl.get_shape, sl.get_dtype

      def __getitem__(self, idx):
        a = sl[idx]
        log.append(("read", a.nbytes))
        return a

    return Slice()


_REAL_SAFE_OPEN = hf_ckpt.safe_open


def _spy_placement(monkeypatch, log):
  real = jax.make_array_from_callback

  def spy(shape, sharding, callback, *args, **kwargs):
    log.append(("place", int(np.prod(shape)) * 4))  # float32 files, no cast
    return real(shape, sharding, callback, *args, **kwargs)

  monkeypatch.setattr(jax, "make_array_from_callback", spy)


def _one_at_a_time(log, num_params):
  """Between two placements exactly the bytes of the parameter placed were read."""
  assert sum(e == "place" for e, _ in log) == num_params
  read = 0
  for event, n in log:
    if event == "read":
      read += n
    else:
      assert read == n, log
      read = 0


def test_npz_reads_one_array_per_placement(npz, monkeypatch):
  path, _ = npz
  log = []
  real = np.lib.npyio.NpzFile.__getitem__

  def getitem(self, key):
    a = real(self, key)
    log.append(("read", a.nbytes))
    return a

  monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", getitem)
  _spy_placement(monkeypatch, log)
  ckpt.load_big_vision(path, mesh=data8(), rules=PALIGEMMA_RULES)
  _one_at_a_time(log, len(ckpt.param_shapes(CONFIG)))


def test_hf_reads_one_parameter_per_placement(hf_dir, monkeypatch):
  log = []
  monkeypatch.setattr(hf_ckpt, "safe_open", lambda *a, **k: _Counted(log, *a, **k))
  _spy_placement(monkeypatch, log)
  ckpt.load_hf(hf_dir, mesh=data8(), rules=PALIGEMMA_RULES)
  # A stacked parameter is read as its per-layer tensors, then placed; the embedding as its
  # first 40 of 48 rows only.
  _one_at_a_time(log, len(ckpt.param_shapes(CONFIG)))


def test_mesh_and_rules_go_together(npz, hf_dir):
  path, _ = npz
  with pytest.raises(ValueError, match="both mesh= and rules="):
    ckpt.load_big_vision(path, mesh=data8())
  with pytest.raises(ValueError, match="both mesh= and rules="):
    ckpt.load_hf(hf_dir, rules=PALIGEMMA_RULES)


def test_bad_tree_is_refused_before_anything_is_placed(npz, monkeypatch):
  path, stored = npz
  del stored["llm/layers/mlp/linear"]
  np.savez(path, **stored)
  placed = []
  monkeypatch.setattr(jax, "make_array_from_callback", lambda *a, **k: placed.append(a))
  with pytest.raises(ValueError, match="llm/layers/mlp/linear"):
    ckpt.load_big_vision(path, CONFIG, mesh=data8(), rules=PALIGEMMA_RULES)
  assert not placed


def test_hf_tied_lm_head_checked_without_reading_it_whole(hf_dir, tmp_path):
  with hf_ckpt.safe_open(str(hf_dir / "model.safetensors"), framework="numpy") as f:
    state = {k: f.get_tensor(k) for k in f.keys()}
  embed = state["language_model.embed_tokens.weight"]
  tied = tmp_path / "tied"
  tied.mkdir()
  (tied / "config.json").write_text(json.dumps(HF_CONFIG))
  save_file({**state, "lm_head.weight": embed.copy()}, str(tied / "model.safetensors"))
  mesh = data8()
  _, params = ckpt.load_hf(tied, mesh=mesh, rules=PALIGEMMA_RULES)
  np.testing.assert_array_equal(np.asarray(params["llm"]["embedder"]["input_embedding"]),
                                embed[:40])
  untied = embed.copy()
  untied[-1, -1] += 1.0  # in HF's padding rows, past the 40 that are kept
  save_file({**state, "lm_head.weight": untied}, str(tied / "model.safetensors"))
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    ckpt.load_hf(tied, mesh=mesh, rules=PALIGEMMA_RULES)
