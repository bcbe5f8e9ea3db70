"""make_mesh goes through jax.make_mesh: device order, sizes, stated axis types, errors."""

import jax
import numpy as np
import pytest
from jax.sharding import AxisType

from tcjax.parallel import make_mesh


def ids(mesh):
  return np.vectorize(lambda d: d.id)(mesh.devices)


def test_same_devices_and_shape_as_a_list_order_reshape_on_cpu():
  # What the hand-built mesh was: jax.devices() in list order, reshaped (CPU has no topology).
  order = np.array([d.id for d in jax.devices()])
  mesh = make_mesh((("data", 2), ("seq", -1)), axis_types="explicit")
  assert mesh.axis_names == ("data", "seq") and dict(mesh.shape) == {"data": 2, "seq": 4}
  np.testing.assert_array_equal(ids(mesh), order.reshape(2, 4))
  # Fewer devices than there are: the first ones.
  mesh = make_mesh((("data", 2), ("seq", 2)), axis_types="auto")
  np.testing.assert_array_equal(ids(mesh), order[:4].reshape(2, 2))


def test_explicit_devices_keep_their_order():
  devices = jax.devices()[::-1]
  mesh = make_mesh((("data", -1), ("seq", 2)), axis_types="explicit", devices=devices)
  np.testing.assert_array_equal(ids(mesh), np.array([d.id for d in devices]).reshape(4, 2))
  mesh = make_mesh((("x", 3),), axis_types="auto", devices=devices[2:])
  np.testing.assert_array_equal(ids(mesh), [d.id for d in devices[2:5]])


def test_built_by_jax_make_mesh(monkeypatch):
  calls = []
  real = jax.make_mesh

  def spy(*args, **kwargs):
    calls.append((args, kwargs))
    return real(*args, **kwargs)

  monkeypatch.setattr(jax, "make_mesh", spy)
  make_mesh((("data", 2), ("seq", -1)), axis_types=("explicit", "auto"))
  assert len(calls) == 1
  args, kwargs = calls[0]
  assert args == ((2, 4), ("data", "seq"))
  assert kwargs["axis_types"] == (AxisType.Explicit, AxisType.Auto)
  assert list(kwargs["devices"]) == jax.devices()


@pytest.mark.parametrize("types,want", [
    ("explicit", (AxisType.Explicit,) * 2),
    ("auto", (AxisType.Auto,) * 2),
    (AxisType.Auto, (AxisType.Auto,) * 2),
    (("auto", AxisType.Explicit), (AxisType.Auto, AxisType.Explicit)),
    (("Explicit", "AUTO"), (AxisType.Explicit, AxisType.Auto)),
])
def test_axis_types_as_stated(types, want):
  # jax.make_mesh would default to Explicit; every type here is the one asked for.
  assert make_mesh((("a", 4), ("b", 2)), axis_types=types).axis_types == want


@pytest.mark.parametrize("axes,types,message", [
    ((("data", 2), ("data", 4)), "explicit", "unique"),
    ((("data", -1), ("seq", -1)), "explicit", "at most one"),
    ((("data", 0), ("seq", -1)), "explicit", "positive or -1"),
    ((("data", -2),), "explicit", "positive or -1"),
    ((("data", 3), ("seq", -1)), "explicit", "do not divide"),
    ((("data", 4), ("seq", 4)), "explicit", "needs 16 devices, have 8"),
    ((("data", 2), ("seq", 4)), ("explicit",), "one entry per axis"),
    ((("data", 2), ("seq", 4)), "manual-ish", "axis_types entries"),
])
def test_errors_kept(axes, types, message):
  with pytest.raises(ValueError, match=message):
    make_mesh(axes, axis_types=types)
