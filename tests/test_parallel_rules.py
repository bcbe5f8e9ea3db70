"""Mesh helper, regex parameter rules, sharded training step, process-local batch assembly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from configs import sharding as sharding_cfg
from tcjax.parallel import (global_batch_from_local, initialize_distributed, make_mesh,
                            mesh_from_config, param_specs, shard_activations, shard_params)


@pytest.mark.parametrize("kind,expected", [("explicit", AxisType.Explicit), ("auto", AxisType.Auto)])
def test_mesh_minus_one_and_types(kind, expected):
  mesh = make_mesh((("data", 2), ("seq", -1)), axis_types=kind)
  assert dict(mesh.shape) == {"data": 2, "seq": 4}
  assert mesh.axis_types == (expected, expected)
  with pytest.raises(ValueError):
    make_mesh((("data", -1), ("seq", -1)), axis_types=kind)
  with pytest.raises(ValueError):
    make_mesh((("data", 3), ("seq", -1)), axis_types=kind)  # 8 devices do not divide by 3


def test_mesh_from_config():
  cfg = sharding_cfg.get_config()
  mesh = mesh_from_config(cfg)
  assert mesh.axis_names == ("data", "seq") and dict(mesh.shape) == {"data": 2, "seq": 4}
  assert all(t == AxisType.Explicit for t in mesh.axis_types)


def _fake_paligemma(L=2, H=4, KVH=1, D=16, Dh=8, F=32, V=64, Ld=2, Dv=12):
  s = jax.ShapeDtypeStruct
  f = jnp.float32
  return {
      "llm": {
          "embedder": {"input_embedding": s((V, D), f)},
          "layers": {
              "attn": {"q_einsum": {"w": s((L, H, D, Dh), f)},
                       "kv_einsum": {"w": s((L, 2, KVH, D, Dh), f)},
                       "attn_vec_einsum": {"w": s((L, H, Dh, D), f)}},
              "mlp": {"gating_einsum": s((L, 2, D, F), f), "linear": s((L, F, D), f)},
              "pre_attention_norm": {"scale": s((L, D), f)},
          },
          "final_norm": {"scale": s((D,), f)},
      },
      "img": {
          "embedding": {"kernel": s((14, 14, 3, Dv), f), "bias": s((Dv,), f)},
          "pos_embedding": s((1, 16, Dv), f),
          "Transformer": {"encoderblock": {"MlpBlock_0": {"Dense_0": {
              "kernel": s((Ld, Dv, 4 * Dv), f), "bias": s((Ld, 4 * Dv), f)}}}},
          "head": {"kernel": s((Dv, D), f), "bias": s((D,), f)},
      },
  }


def test_paligemma_rules_golden_specs():
  mesh = make_mesh((("data", 2), ("seq", 4)), axis_types="explicit")
  specs = param_specs(_fake_paligemma(), mesh, sharding_cfg.PALIGEMMA_RULES)
  llm, img = specs["llm"], specs["img"]
  assert llm["embedder"]["input_embedding"] == P("data", None)  # V=64 largest
  assert llm["layers"]["attn"]["q_einsum"]["w"] == P(None, None, "data", None)  # D=16
  assert llm["layers"]["attn"]["kv_einsum"]["w"] == P(None, None, None, "data", None)
  assert llm["layers"]["attn"]["attn_vec_einsum"]["w"] == P(None, None, None, "data")
  assert llm["layers"]["mlp"]["gating_einsum"] == P(None, None, None, "data")  # F=32
  assert llm["layers"]["mlp"]["linear"] == P(None, "data", None)
  assert llm["layers"]["pre_attention_norm"]["scale"] == P()
  assert llm["final_norm"]["scale"] == P()
  assert img["embedding"]["kernel"] == P("data", None, None, None)  # 14 first among ties
  assert img["Transformer"]["encoderblock"]["MlpBlock_0"]["Dense_0"]["kernel"] == \
      P(None, None, "data")
  assert img["pos_embedding"] == P()
  # Tensor-parallel rules give the stated specs.
  tmesh = make_mesh((("data", 2), ("tensor", 4)), axis_types="explicit")
  tspecs = param_specs(_fake_paligemma(), tmesh, sharding_cfg.PALIGEMMA_TENSOR_RULES)
  assert tspecs["llm"]["layers"]["attn"]["q_einsum"]["w"] == P(None, "tensor", None, None)
  assert tspecs["llm"]["layers"]["mlp"]["linear"] == P(None, "tensor", None)


def test_unmatched_param_is_error_and_first_match_wins():
  mesh = make_mesh((("data", 8),), axis_types="explicit")
  params = {"a": {"w": np.zeros((8, 3))}, "b": np.zeros((16,))}
  with pytest.raises(ValueError, match="b"):
    param_specs(params, mesh, [(r"a/w", "fsdp")])
  specs = param_specs(params, mesh, [(r"a/w", "replicate"), (r"a/.*", "fsdp"), (r".*", "fsdp")])
  assert specs == {"a": {"w": P()}, "b": P("data")}
  # fsdp with no divisible axis replicates.
  assert param_specs({"c": np.zeros((3, 5))}, mesh, [(r".*", "fsdp")]) == {"c": P(None, None)}


def _mlp_loss(params, x, y):
  h = jax.nn.gelu(x @ params["l1"]["kernel"] + params["l1"]["bias"])
  out = h @ params["l2"]["kernel"]
  return jnp.mean((out - y) ** 2)


@pytest.mark.parametrize("kind", ["explicit", "auto"])
def test_sharded_train_step_equals_unsharded(kind):
  rng = np.random.default_rng(0)
  params = {"l1": {"kernel": rng.normal(size=(16, 32)).astype(np.float32),
                   "bias": rng.normal(size=(32,)).astype(np.float32)},
            "l2": {"kernel": rng.normal(size=(32, 8)).astype(np.float32)}}
  x = rng.normal(size=(8, 16)).astype(np.float32)
  y = rng.normal(size=(8, 8)).astype(np.float32)
  step = jax.value_and_grad(_mlp_loss)

  def fsdp_step(p, x, y):
    # FSDP: gather the weights for the forward pass (on Explicit axes this is written out; on
    # Auto axes XLA inserts it). Gradients flow back to the sharded parameters.
    if kind == "explicit":
      p = jax.tree.map(lambda w: jax.sharding.reshard(w, P()), p)
    return _mlp_loss(p, x, y)

  ref_loss, ref_grads = jax.jit(step)(params, x, y)
  mesh = make_mesh((("data", 2), ("seq", 4)), axis_types=kind)
  rules = [(r".*kernel", "fsdp"), (r".*", "replicate")]
  sp = shard_params(params, mesh, rules)
  assert sp["l1"]["kernel"].sharding.spec == P(None, "data")
  xs = jax.device_put(x, NamedSharding(mesh, P("data")))
  with jax.set_mesh(mesh):
    loss, grads = jax.jit(jax.value_and_grad(fsdp_step))(sp, xs, y)
  assert grads["l1"]["kernel"].sharding.spec == P(None, "data") or kind == "auto"
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
               grads, ref_grads)


@pytest.mark.parametrize("kind", ["explicit", "auto"])
def test_shard_activations(kind):
  mesh = make_mesh((("data", 2), ("seq", 4)), axis_types=kind)
  x = np.arange(2 * 8 * 3, dtype=np.float32).reshape(2, 8, 3)
  with jax.set_mesh(mesh):
    out = jax.jit(lambda a: shard_activations(a, mesh) * 2)(x)
  np.testing.assert_array_equal(out, 2 * x)
  eager = shard_activations(jnp.asarray(x), mesh)
  assert eager.sharding.spec[:2] == P("data", "seq")[:2] or kind == "auto"


def test_global_batch_single_process_and_no_op_init():
  assert initialize_distributed() is False
  mesh = make_mesh((("data", 8),), axis_types="explicit")
  local = {"x": np.arange(16 * 3).reshape(16, 3).astype(np.float32)}
  g = global_batch_from_local(local, mesh, P("data"))
  assert g["x"].shape == (16, 3) and g["x"].sharding.spec == P("data")
  np.testing.assert_array_equal(np.asarray(g["x"]), local["x"])
