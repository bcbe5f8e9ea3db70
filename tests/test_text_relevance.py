"""`text_relevance`: cosine vs dot relevance, above-mean raters, padding text, NaN policy."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import tcjax
from tcjax import compress

from helpers import make_tokens


def kept(out):
  return np.flatnonzero(np.asarray(out.src[0]) >= 0).tolist()


X = jnp.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
TEXT = jnp.array([[[1.0, 0.0], [0.0, 5.0], [100.0, 100.0]]])  # the last one is padding
VALID = jnp.array([[True, True, False]])


def tokens(x=X):
  return tcjax.Tokens.from_grid(x, (1, x.shape[1]))


def test_cosine_hand_worked():
  # mean cosine over the 2 valid text tokens: [.5, .5, .707, -.5]
  assert kept(compress.text_relevance(tokens(), 1, text=TEXT, text_mask=VALID)) == [2]
  assert kept(compress.text_relevance(tokens(), 2, text=TEXT, text_mask=VALID)) == [0, 2]


def test_dot_hand_worked():
  # mean dot product: [.5, 2.5, 3, -.5] -> the long text vector dominates (the norm gap)
  out = compress.text_relevance(tokens(), 2, text=TEXT, text_mask=VALID, similarity="dot")
  assert kept(out) == [1, 2]


def test_padding_text_never_counts():
  # with the padding row valid, (100, 100) would make token 2 win alone and token 1 tie token 0
  all_valid = jnp.ones((1, 3), bool)
  ref = compress.text_relevance(tokens(), 2, text=TEXT, text_mask=VALID, similarity="dot")
  nan_pad = TEXT.at[0, 2].set(jnp.nan)
  out = compress.text_relevance(tokens(), 2, text=nan_pad, text_mask=VALID, similarity="dot")
  chex.assert_trees_all_equal(out, ref)
  # dot with (100,100) valid: [33.7, 35.3, 69, -33.2] -> 1, 2 still; at budget 3: 0, 1, 2
  out = compress.text_relevance(tokens(), 3, text=TEXT, text_mask=all_valid, similarity="dot")
  assert kept(out) == [0, 1, 2]
  # cosine with it valid: token 2's mean rises to (.707 + .707 + 1) / 3 and 0/1 tie at .569
  out = compress.text_relevance(tokens(), 2, text=TEXT, text_mask=all_valid)
  assert kept(out) == [0, 2]


def test_above_mean_raters_hand_worked():
  # Visual x = [e0, e1, e0, e0]; text t0 = e0, t1 = e1, t2 padding.
  # Cosine S rows: [1, 0], [0, 1], [1, 0], [1, 0]; softmax over the 2 text tokens:
  # [.731, .269] or [.269, .731]; r = mean over visual = [.6155, .3845] > mean .5 -> rater t0.
  # Scores = S[:, t0] = [1, 0, 1, 1] -> keep 0, 2, 3. With all text rating, every score is .5
  # and the first three win the tie.
  x = jnp.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]])
  text = jnp.array([[[1.0, 0.0], [0.0, 1.0], [3.0, -7.0]]])
  out = compress.text_relevance(tokens(x), 3, text=text, text_mask=VALID, raters="above_mean")
  assert kept(out) == [0, 2, 3]
  assert kept(compress.text_relevance(tokens(x), 3, text=text, text_mask=VALID)) == [0, 1, 2]


def test_above_mean_all_equal_relevance_falls_back_to_all_text():
  x = jnp.array([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]]])
  text = jnp.array([[[1.0, 0.0], [1.0, 0.0], [0.0, 0.0]]])  # identical raters: r ties
  a = compress.text_relevance(tokens(x), 2, text=text, text_mask=VALID, raters="above_mean")
  b = compress.text_relevance(tokens(x), 2, text=text, text_mask=VALID)
  chex.assert_trees_all_equal(a, b)
  assert kept(a) == [0, 2]


def test_nan_visual_token_ranks_last_and_no_text_keeps_first():
  x = X.at[0, 2, 0].set(jnp.nan)
  assert kept(compress.text_relevance(tokens(x), 2, text=TEXT, text_mask=VALID)) == [0, 1]
  none = jnp.zeros((1, 3), bool)
  assert kept(compress.text_relevance(tokens(), 2, text=TEXT, text_mask=none)) == [0, 1]


def test_full_budget_is_identity():
  t = make_tokens(2, 1, (3, 5), dim=4)
  out = compress.text_relevance(t, 15, text=jnp.ones((2, 3, 4)), text_mask=jnp.ones((2, 3), bool))
  chex.assert_trees_all_equal(out, t)


def test_bad_inputs():
  with pytest.raises(ValueError, match="text"):
    compress.text_relevance(tokens(), 2, text=jnp.ones((1, 3, 5)), text_mask=VALID)
  with pytest.raises(ValueError, match="raters"):
    compress.text_relevance(tokens(), 2, text=TEXT, text_mask=VALID, raters="some")
  with pytest.raises(ValueError, match="similarity"):
    compress.text_relevance(tokens(), 2, text=TEXT, text_mask=VALID, similarity="l2")
