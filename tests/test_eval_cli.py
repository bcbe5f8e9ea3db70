"""experiments.eval on a tiny random big_vision checkpoint and a JSONL file made here: answers
scored by hand, the uncompressed row loyal to itself, the plan row cheaper by the FLOPs formula
and the cache size written out in the test."""

import json
import os

import numpy as np
from PIL import Image
import pytest

from configs.eval import get_config
from experiments import eval as eval_cli
from tcjax.checkpoints import save_big_vision
from tcjax.data import testbed
from tcjax.nn import GemmaConfig, PaliGemma, PaliGemmaConfig, SiglipConfig
from tcjax.train.loop import init_fn

import jax

TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(__file__)),
                         "tcjax/assets/testbed_tokenizer.model")


def test_eval_on_jsonl(tmp_path):
  cfg_model = PaliGemmaConfig(
      img=SiglipConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=16),
      llm=GemmaConfig(width=16, depth=2, mlp_dim=32, num_heads=2, num_kv_heads=1, head_dim=8,
                      vocab_size=1152))
  params = jax.jit(init_fn(PaliGemma(cfg_model), 0))()
  save_big_vision(tmp_path / "tiny.npz", params)
  lines = []
  for i in range(3):
    Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
    lines.append(json.dumps({"image": f"{i}.png", "prefix": "count red", "suffix": str(i)}))
  (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
  cfg = get_config()
  cfg.checkpoint = str(tmp_path / "tiny.npz")
  cfg.tokenizer = TOKENIZER
  cfg.data = str(tmp_path / "data.jsonl")
  cfg.plan = '(("post_vit", {"method": "pool", "budget": 4}),)'
  cfg.max_new_tokens = 3
  cfg.max_len = 8
  rows = eval_cli.evaluate(cfg)
  assert [r["setting"] for r in rows] == ["uncompressed", "plan"]
  base, plan = rows
  for r in rows:
    want = np.mean([a.strip() == str(i) for i, a in enumerate(r["answers"])])
    assert r["accuracy"] == want
  assert base["loyalty"] == 1.0
  assert plan["loyalty"] == np.mean([a == b for a, b in zip(plan["answers"], base["answers"])])
  assert (base["image_tokens"], plan["image_tokens"]) == (16, 4)
  # 2 decoder layers x tokens x (K + V) x 1 KV head x 8 dims x 4 bytes; text = 8 tokens
  assert base["kv_bytes"] == 2 * (16 + 8) * 2 * 8 * 4
  assert plan["kv_bytes"] == 2 * (4 + 8) * 2 * 8 * 4
  assert plan["flops"] < base["flops"]
  assert "| plan |" in eval_cli.table(rows)


def test_testbed_split_is_chosen_and_checked():
  # The examples of config.split, as the testbed makes them from (family, split, seed, index);
  # an unknown split is refused by the testbed itself.
  cfg = get_config()
  cfg.families = ("glyph", "digit")
  cfg.per_family = 2
  for split in ("train", "val", "test"):
    cfg.split = split
    got = eval_cli.examples(cfg, testbed.IMAGE_SIZE)
    want = [testbed.example(f, split, 0, i) for f in ("glyph", "digit") for i in range(2)]
    assert [(e["prefix"], e["suffix"]) for e in got] == [(e["prefix"], e["suffix"]) for e in want]
    for a, b in zip(got, want):
      np.testing.assert_array_equal(a["image"], b["image"])
  assert get_config().split == "test"
  cfg.split = "dev"
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    eval_cli.examples(cfg, testbed.IMAGE_SIZE)
