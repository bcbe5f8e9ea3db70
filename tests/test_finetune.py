"""The fine-tuning recipe (configs/finetune.py) in-process on 8 simulated devices: a tiny random
PaliGemma saved as a big_vision .npz is fine-tuned on a user JSONL file (PNG images) over a data
mesh of 8 with the FSDP rules of configs/sharding.py (one example and 1/8 of every large weight
per device; test_train.py runs the same step on (data, seq) meshes, which here would double the
compile time). Only the decoder's attention moves, the parameters stay sharded through training,
the step compiles once, and the result is written as a big_vision .npz next to resumable
checkpoints. An HF save_pretrained directory is taken as `init` too."""

import json
import logging
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image

import configs.finetune
import configs.sharding
import tcjax
from tcjax.checkpoints import save_big_vision
from tcjax.nn import GemmaConfig, PaliGemmaConfig, SiglipConfig
from tcjax.train import loop
from test_model import make_params

TOKENIZER = os.path.join(os.path.dirname(tcjax.__file__), "assets", "testbed_tokenizer.model")
# Gemma 2 decoder; the vocabulary covers the testbed tokenizer's 1152 pieces.
TINY = PaliGemmaConfig(
    img=SiglipConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=16),
    llm=GemmaConfig(version=2, vocab_size=1152, width=32, depth=2, mlp_dim=64, num_heads=2,
                    num_kv_heads=1, head_dim=16))
MESH = (("data", 8),)
STEPS = 4
TRAINED = r"llm/layers/attn/.*"  # the recipe's default


def write_data(d):
  """4 records: PNGs of different sizes and colours (resized to 16 px by the loader)."""
  recs = []
  for i, (rgb, size, colour) in enumerate([((230, 20, 20), (20, 24), "red"),
                                           ((20, 20, 230), (32, 32), "blue"),
                                           ((20, 200, 20), (9, 13), "green"),
                                           ((240, 240, 240), (16, 16), "white")]):
    Image.new("RGB", size, rgb).save(d / f"{i}.png")
    recs.append({"image": f"{i}.png", "prefix": "color of the square", "suffix": colour})
  path = d / "train.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in recs))
  return str(path)


def finetune_config(init, data):
  c = configs.finetune.get_config()
  c.init = init
  c.tokenizer = TOKENIZER
  c.data.jsonl = data
  c.total_steps = STEPS
  c.ckpt_every = 2
  c.mesh = MESH
  c.param_rules = configs.sharding.PALIGEMMA_RULES
  c.data.batch_size = {"image": 8}
  c.data.max_len = 16
  c.optim.lr = 1e-3  # the recipe's 3e-5 suits real checkpoints; here any move must show
  return c


def read_npz(path):
  with np.load(path) as f:
    return {k: f[k] for k in f.files}


class Compilations(logging.Handler):
  """Counts XLA compilations of the training step (jax.log_compiles messages)."""

  def __init__(self):
    super().__init__(logging.DEBUG)
    self.count = 0

  def emit(self, record):
    msg = record.getMessage()
    self.count += msg.startswith("Finished XLA compilation of jit(step)")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  d = tmp_path_factory.mktemp("finetune")
  _, params, _ = make_params(TINY, seed=31)
  init = str(d / "tiny.npz")
  save_big_vision(init, params)
  workdir = str(d / "work")
  c = finetune_config(init, write_data(d))
  # Two micro-batches per update (updates 0 and 1: lr 0, then lr / 4 of the warm-up): the
  # accumulated gradients are optimizer state to keep sharded too.
  c.grad_accum = 2
  compiled = Compilations()
  logging.getLogger("jax").addHandler(compiled)
  try:
    with jax.log_compiles(True):
      out = loop.train(c, workdir, progress=False)
  finally:
    logging.getLogger("jax").removeHandler(compiled)
  return init, workdir, dict(out, step_compilations=compiled.count)


def test_finishes_and_writes_checkpoints(run):
  _, workdir, out = run
  assert out["step"] == STEPS and out["eval"] == {}
  assert os.path.isfile(os.path.join(workdir, "checkpoint.npz"))
  assert sorted(os.listdir(os.path.join(workdir, "ckpt"))) == ["2", "4"]  # ckpt_every 2, keep 2
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [1, 2, 3, 4]  # log_every 1
  assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in rows)
  # Every example's answer is one colour piece + EOS: 2 loss tokens, 8 examples per step.
  assert all(r["tokens"] == 16 for r in rows), [r["tokens"] for r in rows]


def test_the_step_compiles_once(run):
  # The optimizer state starts sharded like the parameters and the step returns it so: a state
  # created replicated, or gradient sums laid out anew by XLA, made the second call compile the
  # whole step again.
  assert run[2]["step_compilations"] == 1


def test_only_decoder_attention_changes(run):
  init, workdir, _ = run
  before, after = read_npz(init), read_npz(os.path.join(workdir, "checkpoint.npz"))
  assert sorted(after) == sorted(before)
  trained = [k for k in before if re.fullmatch(TRAINED, k)]
  assert len(trained) == 3  # q_einsum, kv_einsum, attn_vec_einsum
  for k in before:
    assert after[k].dtype == before[k].dtype == np.float32, k
    if k in trained:
      assert not np.array_equal(after[k], before[k]), k
    else:
      assert after[k].tobytes() == before[k].tobytes(), k


def test_parameters_stay_sharded(run):
  _, workdir, out = run
  p = out["params"]
  mesh = p["llm"]["embedder"]["input_embedding"].sharding.mesh
  assert dict(mesh.shape) == dict(MESH)
  # FSDP rule: the largest dimension divisible by data = 8 is split over it.
  specs = {
      "llm/embedder/input_embedding": ("data", None),              # [1152, 32]
      "llm/layers/attn/q_einsum/w": (None, None, "data", None),    # [2, 2, 32, 16]
      "llm/layers/mlp/linear": (None, "data", None),               # [2, 64, 32]
  }
  flat = tcjax.checkpoints.flatten(p)
  for name, spec in specs.items():
    leaf = flat[name]
    got = tuple(leaf.sharding.spec) + (None,) * (leaf.ndim - len(leaf.sharding.spec))
    assert got == spec, (name, leaf.sharding)
    assert not leaf.sharding.is_fully_replicated
    assert leaf.addressable_shards[0].data.size * 8 == leaf.size  # 1/8 per device
  scale = flat["llm/final_norm/scale"]
  assert scale.sharding.is_fully_replicated
  # The final .npz holds the gathered (whole) arrays.
  after = read_npz(os.path.join(workdir, "checkpoint.npz"))
  for name in specs:
    np.testing.assert_array_equal(after[name], np.asarray(jax.device_get(flat[name])))


def test_hf_directory_init(tmp_path):
  """`init` = an HF save_pretrained directory: loaded, placed by the FSDP rules and written
  back as big_vision arrays. No step is run: the step does not depend on where the weights came
  from, and its compilation would double this file's time."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                image_size=16, patch_size=4, projection_dim=32, vision_use_head=False)
  # HF's embedding: the 1152 real pieces, then <image> (1152) and padding up to 1216 rows.
  text = dict(model_type="gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=1216,
              sliding_window=64, query_pre_attn_scalar=16)
  torch.manual_seed(0)
  hf = transformers.PaliGemmaForConditionalGeneration(transformers.PaliGemmaConfig(
      vision_config=vision, text_config=text, image_token_index=1152, projection_dim=32))
  hf.save_pretrained(str(tmp_path / "hf"))
  weights = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
  c = finetune_config(str(tmp_path / "hf"), write_data(tmp_path))
  c.total_steps = 0
  out = loop.train(c, str(tmp_path / "work"), progress=False)
  assert out["step"] == 0
  emb = tcjax.checkpoints.flatten(out["params"])["llm/embedder/input_embedding"]
  assert emb.shape == (1152, 32) and not emb.sharding.is_fully_replicated
  got = read_npz(str(tmp_path / "work" / "checkpoint.npz"))
  embed = next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))
  np.testing.assert_array_equal(got["llm/embedder/input_embedding"], embed[:1152])
  patch = next(v for k, v in weights.items() if k.endswith("patch_embedding.weight"))
  # torch conv [out, in, kh, kw] -> flax [kh, kw, in, out]
  np.testing.assert_array_equal(got["img/embedding/kernel"], patch.transpose(2, 3, 1, 0))
