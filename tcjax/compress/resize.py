"""Bilinear resize of each frame's patch grid (LLaVA-OneVision `get_2dPool(mode='bilinear')`).

LLaVA-OneVision (arXiv 2408.03326) shrinks video frames with PyTorch
`F.interpolate(mode='bilinear', align_corners=False)`: half-pixel centres and *no* antialiasing.
`jax.image.resize` antialiases by default when downsampling, so the default here is
`antialias=False` (PyTorch semantics); `antialias=True` gives JAX's triangle filter widened by the
scale factor.

Bookkeeping: each original patch is carried by the output token whose sample centre is nearest,
so `size` counts those patches; an output token's `pos` is the original patch nearest its centre
(always one it carries).
"""

import jax
import jax.numpy as jnp
import numpy as np

from tcjax.compress import primitives as P
from tcjax.compress.registry import register


def resize_weights(n_in: int, n_out: int, antialias: bool) -> np.ndarray:
  """float32[n_out, n_in]: 1-D bilinear resampling matrix, half-pixel centres."""
  with jax.ensure_compile_time_eval():  # static constants, even while tracing under jit
    eye = jnp.eye(n_in, dtype=jnp.float32)
    w = jax.image.resize(eye, (n_out, n_in), "bilinear", antialias=antialias)
  return np.asarray(w)


def nearest_output(n_in: int, n_out: int) -> np.ndarray:
  """int[n_in]: the output sample whose centre (i + 1/2) * n_in / n_out - 1/2 is nearest."""
  return np.minimum(((np.arange(n_in) + 0.5) * n_out / n_in).astype(np.int64), n_out - 1)


def nearest_input(n_in: int, n_out: int) -> np.ndarray:
  """int[n_out]: the input index nearest each output centre."""
  centre = (np.arange(n_out) + 0.5) * n_in / n_out - 0.5
  return np.clip(np.floor(centre + 0.5), 0, n_in - 1).astype(np.int64)


@register("resize", family="pooling", stages=("post_vit", "post_proj"),
          paper="bilinear resize, LLaVA-OneVision get_2dPool (arXiv 2408.03326)")
def resize(tokens, budget, *, antialias=False):
  """Bilinearly resize every frame's h x w grid to the h' x w' sub-grid with T*h'*w' == budget.

  Args:
    tokens: raw grid tokens (N == T * h * w).
    budget: T * h' * w' (h' <= h, w' <= w, aspect closest to h : w).
    antialias: False = PyTorch `interpolate` (official); True = JAX's antialiased resize.
  """
  P.check_tokens(tokens, "resize")
  budget = P.check_budget(tokens, budget, "resize")
  t, h, w = P.check_grid_tokens(tokens, "resize")
  try:
    hh, ww = P.grid_for_budget(h, w, budget, frames=t)
  except ValueError as e:
    raise ValueError(f"resize: {e}") from None
  b, n, d = tokens.x.shape
  wh, ww_ = resize_weights(h, hh, antialias), resize_weights(w, ww, antialias)
  x = P.batch_reshape(tokens.x.astype(jnp.float32), (b, t, h, w, d))
  x = jnp.einsum("ih,jw,bthwd->btijd", wh, ww_, x)
  x = P.batch_reshape(x, (b, budget, d)).astype(tokens.x.dtype)
  # Static bookkeeping, identical for every example.
  ro, co = nearest_output(h, hh), nearest_output(w, ww)
  f, r, c = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
  old_to_new = ((f * hh + ro[r]) * ww + co[c]).reshape(-1)
  size = np.bincount(old_to_new, minlength=budget).astype(np.float32)
  f, i, j = np.meshgrid(np.arange(t), nearest_input(h, hh), nearest_input(w, ww), indexing="ij")
  pos = np.stack([f, i, j], -1).reshape(budget, 3).astype(np.int32)
  like = lambda a: jnp.broadcast_to(jnp.asarray(a), (b,) + a.shape)
  return tokens.replace(x=x, pos=like(pos), size=like(size),
                        mask=jnp.ones((b, budget), bool),
                        src=P.remap_src_static(tokens.src, old_to_new))
