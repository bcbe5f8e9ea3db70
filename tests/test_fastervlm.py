"""`fastervlm`: [CLS] row / mean received attention, hand-worked; NaN policy."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import tcjax
from tcjax import compress

from helpers import make_tokens


def kept(out):
  return np.flatnonzero(np.asarray(out.src[0]) >= 0).tolist()


# Two query rows over 6 patches. Row 0 (CLS) favours 4, 1; the mean of both rows is
# [.15, .3, .1, .2, .15, .1] -> 1, 3 on top.
ATTN = jnp.array([[[0.1, 0.3, 0.1, 0.0, 0.4, 0.1],
                   [0.2, 0.3, 0.1, 0.4, -0.1, 0.1]]])


def test_fastervlm_hand_worked():
  t = tcjax.Tokens.from_grid(jnp.arange(6.0).reshape(1, 6, 1), (2, 3))
  assert kept(compress.fastervlm(t, 2, attn=ATTN, reduce="cls")) == [1, 4]
  out = compress.fastervlm(t, 2, attn=ATTN)
  assert kept(out) == [1, 3]
  np.testing.assert_array_equal(out.x[0, :, 0], [1, 3])  # raster order kept
  # Q = 1 (a CLS-only row): mean == cls
  chex.assert_trees_all_equal(compress.fastervlm(t, 3, attn=ATTN[:, :1]),
                              compress.fastervlm(t, 3, attn=ATTN, reduce="cls"))


def test_fastervlm_nan_ranks_last():
  t = tcjax.Tokens.from_grid(jnp.arange(6.0).reshape(1, 6, 1), (2, 3))
  attn = ATTN.at[0, 1, 3].set(jnp.nan)  # token 3's mean is NaN: never beats a real score
  assert kept(compress.fastervlm(t, 2, attn=attn)) == [0, 1]  # .15 ties -> lower index
  assert kept(compress.fastervlm(t, 6, attn=attn)) == list(range(6))


def test_fastervlm_full_budget_is_identity():
  t = make_tokens(2, 1, (3, 5))
  attn = jnp.ones((2, 1, 15)) / 15
  chex.assert_trees_all_equal(compress.fastervlm(t, 15, attn=attn), t)


def test_fastervlm_bad_reduce():
  with pytest.raises(ValueError, match="reduce"):
    compress.fastervlm(make_tokens(1, 1, (2, 3)), 2, attn=ATTN, reduce="max")
