"""Trained compressors as files: `tcjax.nn.learned.save_trained` / `load_trained` round trip
(the model answers the same from the file as from the run's parameters), bad files refused, the
training loop writing `compressors.npz`, and the sweep running them (`config.learned`) and a
fine-tuned copy of the bundled model (`config.checkpoint`)."""

import json
import os

import jax
import numpy as np
import pytest
from flax import traverse_util

from configs import learned as learned_config
from configs.sweep import get_config as sweep_config
from experiments import sweep as sweep_cli
from tcjax import bundled, checkpoints
from tcjax.nn import PaliGemma, learned
from tcjax.train import loop
from test_learned_model import PLANS, config, flat, inputs


def _trained(plan):
  model = PaliGemma(config(plan))
  params = model.init(jax.random.key(3), *inputs())["params"]
  return model, params


@pytest.mark.parametrize("name", sorted(PLANS))
def test_round_trip_gives_the_same_answers(name, tmp_path):
  plan = PLANS[name]
  model, params = _trained(plan)
  path = str(tmp_path / "c.npz")
  keys = learned.save_trained(path, params, plan)
  assert keys == tuple(learned.entry_key(s, o) for s, o in plan)
  entries, tree = learned.load_trained(path)
  # The entries written are the plan's own (stage and every option), in key order.
  assert sorted(entries, key=lambda e: learned.entry_key(*e)) == sorted(
      plan, key=lambda e: learned.entry_key(*e))
  assert set(flat(tree)) == {k for k in flat(params) if k.startswith("compressor/")}
  # The towers (from elsewhere) + the file's compressors rebuild the model's outputs exactly.
  rebuilt = {**{k: v for k, v in params.items() if k != "compressor"}, **tree}
  model2 = PaliGemma(config(entries))
  want = model.apply({"params": params}, *inputs())[0]
  got = model2.apply({"params": rebuilt}, *inputs())[0]
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  # The file holds the compressors alone: smaller than the whole model.
  whole = sum(np.asarray(v).nbytes for v in jax.tree.leaves(params))
  assert os.path.getsize(path) < whole


def test_bad_files_and_plans_are_refused(tmp_path):
  plan = PLANS["perceiver+tokenlearner"]
  _, params = _trained(plan)
  with pytest.raises(ValueError, match="no learned compressor"):
    learned.save_trained(str(tmp_path / "x.npz"), params, (("post_vit", {"method": "pool",
                                                                          "budget": 4}),))
  with pytest.raises(ValueError, match="params have no compressor/post_vit_perceiver_16"):
    learned.save_trained(str(tmp_path / "x.npz"), {"img": params["img"]}, plan)
  path = str(tmp_path / "c.npz")
  learned.save_trained(path, params, plan)
  with np.load(path) as f:
    data = {k: f[k] for k in f.files}
  cases = {
      "towers": ({**data, "img/embedding/kernel": np.zeros(3)}, "neither"),
      "no entry": ({k: v for k, v in data.items() if k != "entry/post_vit_perceiver_16"},
                   "differ"),
      "wrong key": ({**{k: v for k, v in data.items() if k != "entry/post_vit_perceiver_16"},
                     "entry/post_vit_perceiver_16": np.asarray(json.dumps(
                         {"stage": "post_vit", "method": "perceiver", "budget": 8}))},
                    "gives parameter key"),
      "not learned": ({**{k: v for k, v in data.items() if k != "entry/post_vit_perceiver_16"},
                       "entry/post_vit_perceiver_16": np.asarray(json.dumps(
                           {"stage": "post_vit", "method": "pool", "budget": 16}))},
                      "not a learned compressor"),
  }
  for what, (arrays, match) in cases.items():
    bad = str(tmp_path / f"{what}.npz")
    np.savez(bad, **arrays)
    with pytest.raises(ValueError, match=match):
      learned.load_trained(bad)


def test_towers_fingerprint_guards_the_compressors(tmp_path):
  """save_trained stores the fingerprint of the towers (every parameter outside "compressor");
  the sweep refuses compressors whose towers differ from the model's, and accepts a file
  written before fingerprints (no "towers" array)."""
  plan = PLANS["perceiver+tokenlearner"]
  _, params = _trained(plan)
  path = str(tmp_path / "c.npz")
  learned.save_trained(path, params, plan)
  fp = learned.trained_towers(path)
  assert fp == learned.towers_fingerprint(params) and len(fp) == 64
  # The compressors' own parameters do not enter it; any tower value does.
  other_compressors = jax.tree.map(lambda v: v + 1, params["compressor"])
  assert learned.towers_fingerprint({**params, "compressor": other_compressors}) == fp
  towers = traverse_util.flatten_dict({k: v for k, v in params.items() if k != "compressor"})
  first = sorted(towers)[0]
  nudged = {**towers, first: np.asarray(towers[first]).copy()}
  nudged[first].flat[0] += 1e-6
  changed = traverse_util.unflatten_dict(nudged)
  assert learned.towers_fingerprint(changed) != fp
  # The sweep (the model's towers, the file's compressors): the same towers pass, other towers
  # are refused with the file named.
  merged, settings = sweep_cli._with_trained(traverse_util.unflatten_dict(towers), [path])
  assert len(settings) == 2 and set(merged["compressor"]) == set(params["compressor"])
  with pytest.raises(ValueError, match="c.npz was trained on other towers"):
    sweep_cli._with_trained(changed, [path])
  # A file without the fingerprint loads as before (no check possible).
  with np.load(path) as f:
    old = {k: f[k] for k in f.files if k != learned.TOWERS}
  legacy = str(tmp_path / "legacy.npz")
  np.savez(legacy, **old)
  assert learned.trained_towers(legacy) is None
  assert len(sweep_cli._with_trained(changed, [legacy])[1]) == 2


@pytest.mark.slow  # a training run on the smoke model (a compile of the train step)
def test_the_loop_writes_the_compressors_of_its_plan(tmp_path):
  cfg = learned_config.get_config("tokenlearner,budget=8,smoke")
  cfg.total_steps, cfg.eval.every = 2, 0
  loop.train(cfg, str(tmp_path))
  entries, tree = learned.load_trained(str(tmp_path / "compressors.npz"))
  assert [(s, o["method"], o["budget"]) for s, o in entries] == [("post_vit", "tokenlearner", 8)]
  with np.load(tmp_path / "checkpoint.npz") as f:
    whole = {k: f[k] for k in f.files}
  got = flat(tree)  # "compressor/<key>/..."
  assert got and set(got) == {k for k in whole if k.startswith("compressor/")}
  for k, v in got.items():
    np.testing.assert_array_equal(v, whole[k], err_msg=k)


def test_video_config_trains_on_clips():
  cfg = learned_config.get_config("tokenlearner,budget=8,video")
  assert cfg.model.plan[0][1]["frames"] == 8 and cfg.data.families == ("video",)
  assert dict(cfg.data.weights) == {"video": 1.0} and cfg.eval.families == ("video",)
  assert learned_config.get_config("ldpv2,video").model.plan[0][1]["budget"] == 8 * 64
  assert "frames" not in learned_config.get_config("perceiver,video").model.plan[0][1]
  with pytest.raises(ValueError, match="video trains a compressor"):
    learned_config.get_config("m3,video")


@pytest.mark.slow  # a training run on the smoke model's clips
def test_the_loop_trains_a_tokenlearner_on_clips(tmp_path):
  """A TokenLearner shaped for 8-frame clips trains through the loop (initialised on a clip)."""
  cfg = learned_config.get_config("tokenlearner,budget=8,video,smoke")
  cfg.total_steps, cfg.eval.every = 2, 0
  loop.train(cfg, str(tmp_path))
  entries, tree = learned.load_trained(str(tmp_path / "compressors.npz"))
  assert entries[0][1]["frames"] == 8
  assert flat(tree)["compressor/post_vit_tokenlearner_8/map_out/kernel"].shape == (64, 1)


@pytest.mark.slow  # the bundled model's sweep compiled for three settings
def test_sweep_runs_trained_compressors_and_a_checkpoint(tmp_path):
  model, params, _ = bundled.load()
  entry = ("post_vit", {"method": "tokenlearner", "budget": 16, "bottleneck_dim": 16})
  trained = learned.init_missing(model.with_plan((entry,)), params, seed=0)
  path = str(tmp_path / "compressors.npz")
  learned.save_trained(path, trained, (entry,))
  # A "fine-tuned" copy: the bundled parameters with the decoder's embedding changed.
  copy = dict(jax.tree.map(np.asarray, params))
  copy["llm"] = dict(copy["llm"], embedder={"input_embedding": np.zeros_like(
      copy["llm"]["embedder"]["input_embedding"])})
  ckpt = str(tmp_path / "copy.npz")
  checkpoints.save_big_vision(ckpt, copy)

  cfg = sweep_config("tiny")
  cfg.out = str(tmp_path / "out")
  cfg.methods, cfg.budgets, cfg.families, cfg.per_family = "pool", (16,), ("count",), 4
  cfg.learned, cfg.checkpoint = path, ckpt
  # Trained on the bundled towers, the compressor is refused on the copy's.
  with pytest.raises(ValueError, match="trained on other towers"):
    sweep_cli.sweep(cfg)
  cfg.learned = str(tmp_path / "on_copy.npz")
  learned.save_trained(cfg.learned, {**copy, "compressor": trained["compressor"]}, (entry,))
  res = sweep_cli.sweep(cfg)
  rows = {r["setting"]: r for r in res["rows"]}
  name = "tokenlearner@post_vit/16[bottleneck_dim=16]"
  assert list(rows) == ["full", "pool@post_vit/16", name]
  assert rows[name]["errors"] == {} and rows[name]["image_tokens"] == 16
  # The checkpoint's parameters answered, not the bundled model's: with every input embedding
  # zero the decoder sees no prompt, so each answer is one fixed string.
  answers = list(rows["full"]["answers"].values())
  assert len(set(answers)) == 1, answers
  assert (tmp_path / "out" / "sweep.md").read_text().startswith(f"# Sweep on {ckpt}")
  # A checkpoint of another architecture is refused.
  small = str(tmp_path / "small.npz")
  towers = {k: v for k, v in _trained(PLANS["perceiver+tokenlearner"])[1].items()
            if k != "compressor"}
  checkpoints.save_big_vision(small, towers)
  cfg.checkpoint = small
  with pytest.raises(ValueError, match="not the bundled model's architecture"):
    sweep_cli.sweep(cfg)
