"""`fastv`: last-row (official) vs mean-over-queries (paper), text_mask, NaN policy."""

import chex
import jax.numpy as jnp
import numpy as np
import pytest

import tcjax
from tcjax import compress

from helpers import make_tokens


def kept(out, b=0):
  return np.flatnonzero(np.asarray(out.src[b]) >= 0).tolist()


# Three query rows over 5 visual tokens.
ATTN = jnp.array([[[0.9, 0.0, 0.0, 0.1, 0.0],
                   [0.0, 0.5, 0.0, 0.0, 0.5],
                   [0.0, 0.0, 0.6, 0.3, 0.1]]])


def tokens():
  return tcjax.Tokens.from_grid(jnp.arange(5.0).reshape(1, 5, 1), (1, 5))


def test_fastv_last_row_is_official_default():
  assert kept(compress.fastv(tokens(), 2, attn=ATTN)) == [2, 3]  # row 2: .6, .3


def test_fastv_mean_over_queries():
  # mean = [.3, .1667, .2, .1333, .2] -> 0 then the .2 tie (2 before 4)
  assert kept(compress.fastv(tokens(), 2, attn=ATTN, query="mean")) == [0, 2]


def test_fastv_text_mask():
  valid = jnp.array([[True, True, False]])
  # last valid row is row 1: .5 at 1 and 4
  assert kept(compress.fastv(tokens(), 2, attn=ATTN, text_mask=valid)) == [1, 4]
  # mean over rows 0, 1 = [.45, .25, 0, .05, .25]; padding row 2 never counts, even as NaN
  nan_pad = ATTN.at[0, 2].set(jnp.nan)
  out = compress.fastv(tokens(), 3, attn=nan_pad, text_mask=valid, query="mean")
  assert kept(out) == [0, 1, 4]


def test_fastv_nan_ranks_last():
  attn = ATTN.at[0, 2, 2].set(jnp.nan)
  assert kept(compress.fastv(tokens(), 2, attn=attn)) == [3, 4]


def test_fastv_full_budget_is_identity():
  t = make_tokens(2, 1, (3, 5))
  chex.assert_trees_all_equal(compress.fastv(t, 15, attn=jnp.ones((2, 4, 15))), t)


def test_fastv_bad_options():
  with pytest.raises(ValueError, match="query"):
    compress.fastv(tokens(), 2, attn=ATTN, query="first")
  with pytest.raises(ValueError, match="text_mask"):
    compress.fastv(tokens(), 2, attn=ATTN, text_mask=jnp.ones((1, 2), bool))


@pytest.mark.parametrize("name", ["fastv", "fastervlm", "keynorm", "text_relevance", "random"])
def test_selection_methods_with_token_axis_sharded(name):
  """Top-k methods on a token axis sharded over an Explicit `seq` mesh axis == one device."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from tcjax.parallel import make_mesh
  from helpers import make_signals
  t = make_tokens(2, 1, (8, 8), seed=1)
  signals = make_signals(name, t, seed=2)
  mesh = make_mesh((("data", 2), ("seq", 4)), axis_types="explicit")
  tok = lambda a: jax.device_put(a, NamedSharding(mesh, P("data", "seq")))
  t_s = t.replace(x=tok(t.x), pos=tok(t.pos), size=tok(t.size), mask=tok(t.mask), src=tok(t.src))
  s_s = {k: (tok(v) if k in ("keys", "keys_heads") else v) for k, v in signals.items()}
  if "attn" in s_s:
    s_s["attn"] = jax.device_put(signals["attn"], NamedSharding(mesh, P("data", None, "seq")))
  with jax.set_mesh(mesh):
    out = jax.jit(lambda t, s: compress.apply(name, t, 20, **s))(t_s, s_s)
  chex.assert_trees_all_close(jax.device_get(out), compress.apply(name, t, 20, **signals))
