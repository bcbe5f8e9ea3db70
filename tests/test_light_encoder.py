"""The lightweight student tower (tcjax.train.light_encoder): its config's refusals, its output
shapes, its start from the teacher (the stem gives the k x k mean of the teacher's first-layer
input, checked in NumPy), and the image-token term on its coarser grid against a NumPy
reference (the teacher's tokens averaged over each student patch)."""

import jax
import numpy as np
import pytest
from flax import traverse_util

import paligemma_ref as ref
from tcjax.nn import PaliGemma, param_shapes
from tcjax.train import distill, light_encoder
from tcjax.tokens import Tokens
from tcjax.train import distill_loss as dl
from test_distill import uneven_batch
from test_model import CONFIGS, make_params

TEACHER = CONFIGS[1]  # 16 x 16 px, patch 4: a 4 x 4 grid, 3 ViT layers


def flat(params):
  return {k: np.asarray(v, np.float64)
          for k, v in traverse_util.flatten_dict(params, sep="/").items()}


def np_stem(p, image, patch):
  """NumPy: the ViT's first-layer input [B, g*g, D] (patches @ kernel + bias + pos)."""
  b, s, _, c = image.shape
  g = s // patch
  x = image.reshape(b, g, patch, g, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, -1)
  return x @ p["img/embedding/kernel"].reshape(-1, p["img/embedding/bias"].shape[0]) \
      + p["img/embedding/bias"] + p["img/pos_embedding"]


def np_pool2(z, g):
  """[B, g*g, D] raster tokens -> means of 2 x 2 windows [B, (g/2)^2, D], by loops."""
  b, _, d = z.shape
  grid = z.reshape(b, g, g, d)
  out = np.zeros((b, g // 2, g // 2, d))
  for r in range(g // 2):
    for c in range(g // 2):
      out[:, r, c] = grid[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean((1, 2))
  return out.reshape(b, -1, d)


@pytest.mark.parametrize("kw, field", [
    (dict(depth=4), "student_img.depth"),
    (dict(depth=-1), "student_img.depth"),
    (dict(depth=True), "student_img.depth"),
    (dict(patch_size=6), "student_img.patch_size"),     # not a multiple of 4
    (dict(patch_size=12), "student_img.patch_size"),    # does not divide 16
])
def test_bad_student_towers_are_refused(kw, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    light_encoder.student_config(TEACHER, **kw)


def test_student_shapes_and_start():
  """Patch 8, one layer: 4 image tokens of the decoder's width; the parameter tree is the
  light config's; blocks are the teacher's first; the stem is the teacher's 2 x 2 mean."""
  teacher, tp, tflat = make_params(TEACHER, seed=0)
  cfg = light_encoder.student_config(TEACHER, depth=1, patch_size=8)
  assert (cfg.img.depth, cfg.img.patch_size, cfg.img.num_patches) == (1, 8, 4)
  assert cfg.llm == TEACHER.llm and cfg.img.width == TEACHER.img.width
  sp = jax.jit(lambda p: light_encoder.init_from_teacher(p, TEACHER, cfg))(tp)
  sflat = flat(sp)
  assert {k: v.shape for k, v in sflat.items()} == param_shapes(cfg)
  for k, v in sflat.items():
    if k.startswith("llm/") or k.startswith("img/head") or "encoder_norm" in k:
      np.testing.assert_array_equal(v, tflat[k], err_msg=k)
    elif "encoderblock" in k:
      np.testing.assert_array_equal(v, tflat[k][:1], err_msg=k)
  image = np.random.default_rng(1).uniform(-1, 1, (2, 16, 16, 3))
  want = np_pool2(np_stem({k: np.asarray(v, np.float64) for k, v in tflat.items()}, image, 4), 4)
  np.testing.assert_allclose(np_stem(sflat, image, 8), want, rtol=1e-5, atol=1e-5)

  student = PaliGemma(cfg)
  b = uneven_batch(seed=1)
  zimg, tokens, _ = jax.jit(lambda p: student.apply(
      {"params": p}, b["image"], method=student.embed_image))(sp)
  assert zimg.shape == (4, 4, TEACHER.llm.width)
  assert tokens.grid == (1, 2, 2)
  logits, hidden, img, _ = jax.jit(lambda p: student.apply(
      {"params": p}, b["image"], b["text"], b["mask_ar"], method=student.features))(sp)
  t = b["text"].shape[1]
  assert logits.shape == (4, t, TEACHER.llm.vocab_size)
  assert hidden.shape == (4, t, TEACHER.llm.width) and img.x.shape == zimg.shape
  # new arrays: a donated student step never frees the teacher's buffers
  assert not any(a is c for a, c in zip(jax.tree.leaves(sp), jax.tree.leaves(tp)))


@pytest.mark.parametrize("plan", [(), (("post_vit", {"method": "pool", "budget": 1}),)],
                         ids=["grid", "pool1"])
def test_image_term_on_the_coarser_grid_matches_numpy(plan):
  """The student's tokens (patch 8: 2 x 2 tokens; or all pooled into one) against the
  teacher's averaged over the 4 (or all 16) teacher patches each carries; parameters of both
  through the NumPy reference."""
  teacher, tp, tflat = make_params(TEACHER, seed=2)
  cfg = light_encoder.student_config(TEACHER, depth=2, patch_size=8, plan=plan)
  student = PaliGemma(cfg)
  _, other, _ = make_params(TEACHER, seed=3)  # a student that is not its teacher's mean
  sp = light_encoder.init_from_teacher(other, TEACHER, cfg)
  b = uneven_batch(seed=2)
  _, m = jax.jit(lambda sp, tp: distill.distill_loss(
      student, sp, b, distill.teacher_outputs(teacher, tp, b),
      opts=distill.Options(alpha=0.0, image=1.0)))(sp, tp)
  zt = ref.image_embed(tflat, TEACHER, b["image"])            # [B, 16, E]
  zs = ref.image_embed(flat(sp), cfg, b["image"])             # [B, 4, E]
  if plan:
    zs, target = zs.mean(1, keepdims=True), zt.mean(1, keepdims=True)
  else:
    target = np_pool2(zt, 4)
  want = ((zs - target) ** 2).mean(-1).mean()
  np.testing.assert_allclose(float(m["image"]), want, rtol=1e-4)


def test_grids_that_do_not_nest_are_refused():
  tokens = Tokens.from_grid(np.zeros((1, 9, 4), np.float32), (3, 3))
  with pytest.raises(ValueError, match="does not tile"):
    dl.fine_src(tokens, (1, 4, 4))
  assert dl.fine_src(tokens, (1, 6, 6)).shape == (1, 36)  # 2 x 2 teacher patches per token
