"""Remat (jax.checkpoint around each scanned layer) changes memory, never values: gradients with
and without it agree, and the backward pass really recomputes (a remat primitive in the jaxpr)."""

import dataclasses

import jax
import numpy as np

from tcjax.train import loss_fn
from test_model import CONFIGS, inputs, make_params


def test_remat_same_gradients():
  config = CONFIGS[2]
  remat = dataclasses.replace(config, img=dataclasses.replace(config.img, remat=True),
                              llm=dataclasses.replace(config.llm, remat=True))
  model, params, _ = make_params(config, seed=7)
  model_r, _, _ = make_params(remat, seed=7)
  image, text, mask_ar = inputs(seed=3, B=2)
  batch = {"image": image, "text": text, "mask_ar": mask_ar, "mask_loss": mask_ar}
  grad = lambda m: jax.grad(lambda p: loss_fn(m, p, batch)[0])
  want = jax.jit(grad(model))(params)
  got = jax.jit(grad(model_r))(params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  jaxpr = str(jax.make_jaxpr(grad(model_r))(params))
  assert "remat" in jaxpr or "checkpoint" in jaxpr
  assert "remat" not in str(jax.make_jaxpr(grad(model))(params))
