"""The 2-D sine-cosine position table (`tcjax.nn.params.sincos_2d`) against hand-worked values
and its defining invariant, and its use in training (`config.posemb_sincos`)."""

import jax.numpy as jnp
import numpy as np
import pytest

from tcjax.nn import SiglipConfig
from tcjax.nn.params import sincos_2d
from tcjax.train.loop import with_sincos_posemb


def test_hand_worked_width_8():
  # width 8: two frequencies, 1 and 10000 ** -1; patch (row 1, col 2) of a 3 x 4 grid is row 6
  t = sincos_2d((3, 4), 8)
  assert t.shape == (12, 8) and t.dtype == np.float32
  w = 1e-4
  want = [np.sin(2), np.sin(2 * w), np.cos(2), np.cos(2 * w),
          np.sin(1), np.sin(w), np.cos(1), np.cos(w)]
  np.testing.assert_allclose(t[6], want, rtol=1e-6, atol=1e-7)


def test_similarity_depends_only_on_the_offset():
  # sin a sin b + cos a cos b = cos(a - b): the code of a patch shifted by (dy, dx) has the
  # same dot product with every other shifted patch, the property attention can use
  g = 6
  t = sincos_2d((g, g), 32).astype(np.float64)
  s = t @ t.T
  rows, cols = np.divmod(np.arange(g * g), g)
  for dy, dx in ((0, 1), (1, 0), (2, 3)):
    pairs = [(i, j) for i in range(g * g) for j in range(g * g)
             if rows[j] - rows[i] == dy and cols[j] - cols[i] == dx]
    vals = np.array([s[i, j] for i, j in pairs])
    np.testing.assert_allclose(vals, vals[0], atol=1e-9)
  np.testing.assert_allclose(np.diag(s), 16.0, atol=1e-9)  # 16 (sin, cos) pairs of unit norm


def test_refusals():
  with pytest.raises(ValueError, match="multiple of 4"):
    sincos_2d((4, 4), 30)
  cfg = SiglipConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=16)
  params = {"img": {"pos_embedding": jnp.zeros((1, 16, 16))}}
  with pytest.raises(ValueError, match="positive"):
    with_sincos_posemb(params, cfg, 0.0)
  wrong = SiglipConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=20)
  with pytest.raises(AssertionError):  # chex: a 5 x 5 grid's table on a 4 x 4 embedding
    with_sincos_posemb(params, wrong, 1.0)


def test_added_once_to_the_learned_table():
  cfg = SiglipConfig(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, image_size=16)
  rng = np.random.default_rng(0)
  pe = rng.normal(size=(1, 16, 16)).astype(np.float32)
  params = {"img": {"pos_embedding": jnp.asarray(pe), "other": 1}, "llm": 2}
  out = with_sincos_posemb(params, cfg, 0.5)
  rows, cols = np.divmod(np.arange(16), 4)
  freq = 1e4 ** -(np.arange(4) / 3)
  want = pe[0] + 0.5 * np.concatenate([np.sin(cols[:, None] * freq), np.cos(cols[:, None] * freq),
                                       np.sin(rows[:, None] * freq), np.cos(rows[:, None] * freq)], 1)
  np.testing.assert_allclose(out["img"]["pos_embedding"][0], want, rtol=1e-6)
  assert out["img"]["other"] == 1 and out["llm"] == 2
  np.testing.assert_array_equal(params["img"]["pos_embedding"], pe)  # input untouched
