"""`keynorm`: smallest L2 (ViTCoP, default) / largest L1 (DART) key norms, hand-worked."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import tcjax
from tcjax import compress

from helpers import make_tokens

# Keys of 5 tokens:     L2     L1
KEYS = jnp.array([[[3.0, 4.0],    # 5      7
                   [1.0, 1.0],    # 1.414  2
                   [0.0, -6.0],   # 6      6
                   [2.0, 0.0],    # 2      2
                   [-2.5, 2.5]]])  # 3.536  5


def kept(out):
  return np.flatnonzero(np.asarray(out.src[0]) >= 0).tolist()


def tokens():
  return tcjax.Tokens.from_grid(jnp.arange(5.0).reshape(1, 5, 1), (1, 5))


def test_keynorm_hand_worked():
  assert kept(compress.keynorm(tokens(), 2, keys=KEYS)) == [1, 3]  # L2 1.414, 2
  assert kept(compress.keynorm(tokens(), 2, keys=KEYS, order="largest")) == [0, 2]  # L2 5, 6
  assert kept(compress.keynorm(tokens(), 2, keys=KEYS, order="largest", norm="l1")) == [0, 2]
  assert kept(compress.keynorm(tokens(), 3, keys=KEYS, order="largest", norm="l1")) == [0, 2, 4]
  # L1 ties 2, 2 at tokens 1, 3 and the next is 5 at token 4
  assert kept(compress.keynorm(tokens(), 3, keys=KEYS, norm="l1")) == [1, 3, 4]


def test_keynorm_nan_and_inf():
  keys = KEYS.at[0, 1, 0].set(jnp.nan).at[0, 3, 1].set(jnp.inf)
  # NaN ranks last either way; an infinite norm is the largest
  assert kept(compress.keynorm(tokens(), 2, keys=keys)) == [0, 4]  # smallest: 3.536, 5
  assert kept(compress.keynorm(tokens(), 1, keys=keys, order="largest")) == [3]


def test_keynorm_full_budget_is_identity():
  t = make_tokens(2, 1, (3, 5))
  chex.assert_trees_all_equal(compress.keynorm(t, 15, keys=jnp.ones((2, 15, 4))), t)


def test_keynorm_bad_options():
  with pytest.raises(ValueError, match="order"):
    compress.keynorm(tokens(), 2, keys=KEYS, order="middle")
  with pytest.raises(ValueError, match="norm"):
    compress.keynorm(tokens(), 2, keys=KEYS, norm="linf")
