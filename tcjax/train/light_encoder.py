"""A lightweight student vision tower: fewer ViT layers and / or a larger patch size than its
teacher's, started from the teacher's weights (then distilled, `tcjax.train.distill`).

  config = light_encoder.student_config(teacher.config, depth=1, patch_size=8)
  params = light_encoder.init_from_teacher(teacher_params, teacher.config, config)

Axis legend: g teacher grid side, k patch-size factor, D ViT width, L layers.

The student keeps the teacher's decoder and projector shapes, so its projected image tokens
live where the teacher's decoder reads them; a patch k times larger gives (g / k)^2 tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

import jax
import jax.numpy as jnp

from tcjax.nn.config import PaliGemmaConfig

OPTIONS = ("depth", "patch_size")  # what a student tower may change; 0 keeps the teacher's


def student_config(teacher: PaliGemmaConfig, *, depth: int = 0, patch_size: int = 0,
                   plan=None, where: str = "student_img") -> PaliGemmaConfig:
  """The teacher's config with a lighter ViT (and `plan`, None: the teacher's).

  depth: ViT layers, 1 .. the teacher's (0: the teacher's). patch_size: a whole multiple of the
  teacher's that divides the image size (0: the teacher's). ValueError naming `where.<field>`.
  """
  img = teacher.img
  for name, v in (("depth", depth), ("patch_size", patch_size)):
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
      raise ValueError(f"{where}.{name} must be an int >= 0 (0: the teacher's), got {v!r}")
  depth = depth or img.depth
  patch_size = patch_size or img.patch_size
  if depth > img.depth:
    raise ValueError(f"{where}.depth must be at most the teacher's {img.depth} ViT layers, "
                     f"got {depth}")
  if patch_size % img.patch_size or img.image_size % patch_size:
    raise ValueError(f"{where}.patch_size must be a multiple of the teacher's "
                     f"{img.patch_size} that divides the image size {img.image_size}, "
                     f"got {patch_size}")
  light = dataclasses.replace(img, depth=depth, patch_size=patch_size)
  return dataclasses.replace(teacher, img=light,
                             plan=teacher.plan if plan is None else plan)


def _pool_grid(x, g: int, k: int):
  """float[B, g*g, D] raster tokens -> float[B, (g/k)^2, D] means of k x k windows."""
  b, _, d = x.shape
  s = g // k
  return x.reshape(b, s, k, s, k, d).mean(axis=(2, 4)).reshape(b, s * s, d)


def init_from_teacher(teacher_params: Dict[str, Any], teacher: PaliGemmaConfig,
                      student: PaliGemmaConfig) -> Dict[str, Any]:
  """Student parameters (new arrays) from the teacher's, for `student_config`'s config.

  The decoder, projector and ViT norms are copies; the ViT blocks are the teacher's first
  `depth`. A patch k times larger gets the teacher's patch kernel [p, p, 3, D] tiled k x k and
  divided by k^2, and its position embeddings averaged over k x k windows: the stem is linear,
  so the student's first layer starts on the k x k mean of the teacher's first-layer input.
  """
  t, s = teacher.img, student.img
  k = s.patch_size // t.patch_size
  img = dict(teacher_params["img"])
  blocks = img["Transformer"]["encoderblock"]
  img["Transformer"] = dict(img["Transformer"],
                            encoderblock=jax.tree.map(lambda a: a[:s.depth], blocks))
  if k > 1:
    kernel = img["embedding"]["kernel"]
    img["embedding"] = dict(img["embedding"], kernel=jnp.tile(kernel, (k, k, 1, 1)) / k ** 2)
    img["pos_embedding"] = _pool_grid(img["pos_embedding"], t.grid[0], k)
  out = dict(teacher_params, img=img)
  return jax.tree.map(jnp.copy, out)  # never the teacher's buffers: a donated step frees them
