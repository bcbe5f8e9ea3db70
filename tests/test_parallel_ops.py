"""Two-stage top-k and sequence-sharded attention vs single-device NumPy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from tcjax.parallel import gathered_kv_attention, make_mesh, ring_attention, topk

MESHES = [((("seq", 8),), None), ((("data", 2), ("seq", 4)), "data")]


def _put(x, mesh, spec):
  return jax.device_put(x, NamedSharding(mesh, spec))


@pytest.mark.parametrize("kind", ["explicit", "auto"])
@pytest.mark.parametrize("axes,batch_axis", MESHES)
@pytest.mark.parametrize("k", [1, 5, 12])
def test_topk_equals_lax_topk_with_ties(axes, batch_axis, kind, k):
  mesh = make_mesh(axes, axis_types=kind)
  rng = np.random.default_rng(k)
  # Few distinct values: many ties across and within shards.
  x = rng.integers(0, 4, size=(2, 32)).astype(np.float32)
  x[1, :] = 1.0  # all tied
  xs = _put(x, mesh, P(batch_axis, "seq"))
  v, i = jax.jit(lambda a: topk(a, k, mesh=mesh, axis="seq", batch_axis=batch_axis))(xs)
  # Oracle: stable sort by -value (ties lower index first).
  order = np.argsort(-x, axis=-1, kind="stable")[:, :k]
  np.testing.assert_array_equal(np.asarray(i), order)
  np.testing.assert_array_equal(np.asarray(v), np.take_along_axis(x, order, -1))
  rv, ri = jax.lax.top_k(jnp.asarray(x), k)
  np.testing.assert_array_equal(np.asarray(i), np.asarray(ri))


def _ref_attention(q, k, v, mask_ar, kv_valid, scale, softcap=None):
  b, t, h, dh = q.shape
  kvh = k.shape[2]
  k = np.repeat(k, h // kvh, axis=2)
  v = np.repeat(v, h // kvh, axis=2)
  s = np.einsum("bthd,bshd->bhts", q.astype(np.float64), k.astype(np.float64)) * scale
  if softcap is not None:
    s = np.tanh(s / softcap) * softcap
  cum = np.cumsum(mask_ar, axis=1)
  allowed = (cum[:, None, :] <= cum[:, :, None]) & kv_valid[:, None, :]
  s = np.where(allowed[:, None], s, -np.inf)
  m = np.max(s, -1, keepdims=True)
  p = np.exp(s - np.where(np.isfinite(m), m, 0))
  p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
  return np.einsum("bhts,bshd->bthd", p, v.astype(np.float64))


@pytest.mark.parametrize("fn", [ring_attention, gathered_kv_attention])
@pytest.mark.parametrize("kind", ["explicit", "auto"])
@pytest.mark.parametrize("axes,batch_axis", MESHES)
@pytest.mark.parametrize("t", [16, 13])
def test_sharded_attention_equals_full(fn, axes, batch_axis, kind, t):
  mesh = make_mesh(axes, axis_types=kind)
  n = mesh.shape["seq"]
  rng = np.random.default_rng(t)
  b, h, kvh, dh = 2, 4, 2, 8
  q = rng.normal(size=(b, t, h, dh)).astype(np.float32)
  k = rng.normal(size=(b, t, kvh, dh)).astype(np.float32)
  v = rng.normal(size=(b, t, kvh, dh)).astype(np.float32)
  # Prefix-LM: example 0 has a 5-token prefix, example 1 a 9-token prefix; padding at the end.
  mask_ar = np.zeros((b, t), np.int32)
  mask_ar[0, 5:] = 1
  mask_ar[1, 9:] = 1
  kv_valid = np.ones((b, t), bool)
  kv_valid[1, t - 3:] = False
  scale = dh ** -0.5
  ref = _ref_attention(q, k, v, mask_ar, kv_valid, scale, softcap=30.0)
  tp = t + (-t) % n

  def pad(a, val=0):
    w = [(0, 0)] * a.ndim
    w[1] = (0, tp - t)
    return np.pad(a, w, constant_values=val)

  if t % n == 0:
    args = [_put(a, mesh, P(batch_axis, "seq")) for a in (q, k, v, mask_ar, kv_valid)]
  else:  # uneven: the function pads internally; inputs are replicated on the token axis.
    args = [_put(a, mesh, P(batch_axis)) for a in (q, k, v, mask_ar, kv_valid)]
  f = jax.jit(lambda q, k, v, m, kv: fn(q, k, v, mesh=mesh, axis="seq", batch_axis=batch_axis,
                                         mask_ar=m, kv_valid=kv, scale=scale, softcap=30.0))
  out = np.asarray(f(*args))
  assert out.shape == q.shape
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fn", [ring_attention, gathered_kv_attention])
@pytest.mark.parametrize("local", [True, False])
def test_sliding_window_attention_equals_full(fn, local):
  """Gemma 2 local layers: q_pos - k_pos < window unless both in the prefix, with positions that
  have holes (pruned tokens keep theirs)."""
  mesh = make_mesh((("data", 2), ("seq", 4)), axis_types="auto")
  rng = np.random.default_rng(7)
  b, t, h, kvh, dh, window = 2, 20, 4, 2, 8, 5
  q = rng.normal(size=(b, t, h, dh)).astype(np.float32)
  k = rng.normal(size=(b, t, kvh, dh)).astype(np.float32)
  v = rng.normal(size=(b, t, kvh, dh)).astype(np.float32)
  mask_ar = np.zeros((b, t), np.int32)
  mask_ar[:, 8:] = 1
  kv_valid = np.ones((b, t), bool)
  pos = np.sort(rng.choice(40, size=(b, t), replace=False), axis=1).astype(np.int32)
  scale = dh ** -0.5
  # Reference with an explicit mask (NumPy, float64).
  cum = np.cumsum(mask_ar, 1)
  allowed = cum[:, None, :] <= cum[:, :, None]
  if local:
    near = (pos[:, :, None] - pos[:, None, :]) < window
    prefix = cum == 0
    allowed &= near | (prefix[:, :, None] & prefix[:, None, :])
  kk, vv = np.repeat(k, h // kvh, 2), np.repeat(v, h // kvh, 2)
  s = np.einsum("bthd,bshd->bhts", q.astype(np.float64), kk) * scale
  s = np.where(allowed[:, None], s, -np.inf)
  p = np.exp(s - s.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  ref = np.einsum("bhts,bshd->bthd", p, vv)
  args = [_put(a, mesh, P("data", "seq")) for a in (q, k, v, mask_ar, kv_valid, pos)]
  f = jax.jit(lambda q, k, v, m, kv, ps, loc: fn(
      q, k, v, mesh=mesh, axis="seq", batch_axis="data", mask_ar=m, kv_valid=kv, scale=scale,
      positions=ps, window=window, local=loc))
  out = np.asarray(f(*args, jnp.asarray(local)))
  np.testing.assert_allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", [None, "explicit"])
def test_map_batch_equals_one_call(kind):
  # Strided sequential steps over the batch give the batched call's result in the original
  # order; with the batch on 4 devices each of the 2 steps keeps 4 sharded examples.
  from tcjax.parallel.mesh import map_batch
  x = jnp.arange(8 * 3, dtype=jnp.float32).reshape(8, 3)
  fn = lambda a, b: (a * 2 + b[:, None], a.sum(-1))
  want = fn(x, jnp.arange(8.0))
  args = (x, jnp.arange(8.0))
  if kind is not None:
    mesh = make_mesh((("data", 4),), axis_types=kind)
    args = tuple(_put(a, mesh, P("data")) for a in args)
    with jax.set_mesh(mesh):
      got = jax.jit(lambda *a: map_batch(fn, a, 2))(*args)
    assert got[0].sharding.spec[0] == "data"
  else:
    got = jax.jit(lambda *a: map_batch(fn, a, 4))(*args)
    one_each = jax.jit(lambda *a: map_batch(fn, a, 8))(*args)  # one example per step
    np.testing.assert_array_equal(one_each[0], want[0])
    np.testing.assert_array_equal(one_each[1], want[1])
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])
  with pytest.raises(ValueError, match="chunks=3 must be a positive divisor of the batch of 8"):
    map_batch(fn, (x, jnp.arange(8.0)), 3)


def test_constrain_and_match_batch_on_explicit_axes():
  """constrain keeps the major axes of an entry that divide the size (a pair of 3-frame clips'
  6 frames: data alone); match_batch reshards the batch axis alone, like the reference's."""
  from tcjax.parallel.mesh import constrain, match_batch
  mesh = make_mesh((("data", 2), ("seq", 4)), axis_types="explicit")
  spec = lambda a: jax.typeof(a).sharding.spec
  with jax.set_mesh(mesh):
    for rows, want in ((8, ("data", "seq")), (6, "data"), (3, None)):
      out = jax.jit(lambda a: constrain(a, ("data", "seq")))(jnp.zeros((rows, 4)))
      assert spec(out) == P(want, None), rows
    x = _put(jnp.zeros((2, 8)), mesh, P(None, "seq"))
    ref = _put(jnp.zeros((2, 3)), mesh, P("data"))
    assert spec(jax.jit(match_batch)(x, ref)) == P("data", "seq")
    assert spec(jax.jit(match_batch)(ref, x)) == P(None, None)
