"""Distillation (tcjax.train.distill): the KD and feature terms against NumPy references written
here (softmax, KL and pooling by hand, logits and states from the float64 NumPy model of
paligemma_ref) on a batch with uneven answers; the teacher gets no gradient and stays unchanged
through steps; bad options are refused naming the field."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

import paligemma_ref as ref
from tcjax.train import TrainState, distill, loop, loss_fn
from tcjax.train import distill_loss as dl
from test_model import CONFIGS, inputs, make_params

POOL4 = (("post_vit", {"method": "pool", "budget": 4}),)    # 4 x 4 patches -> 2 x 2 tokens
UNIFORM5 = (("post_vit", {"method": "uniform", "budget": 5}),)  # 5 of the 16 patches


def uneven_batch(seed=0):
  """4 examples, 3 answer tokens each before: example 0 keeps one loss token, example 1 none
  (it must count for nothing), example 2 two, example 3 all three."""
  image, text, mask_ar = inputs(seed=seed, B=4)
  ml = mask_ar.copy()
  suffix = np.nonzero(ml[0])[0]
  ml[0, suffix[1:]] = 0
  ml[1] = 0
  ml[2, suffix[2:]] = 0
  assert ml[:, 1:].sum(1).tolist() == [1, 0, 2, 3]
  return {"image": image, "text": text, "mask_ar": mask_ar, "mask_loss": ml}


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kd(teacher_logits, student_logits, t):
  """KL(teacher || student) at temperature t, times t^2, at positions 0 .. T-2: [B, T-1]."""
  lt = np_log_softmax(teacher_logits[:, :-1] / t)
  ls = np_log_softmax(student_logits[:, :-1] / t)
  return (np.exp(lt) * (lt - ls)).sum(-1) * t * t


def np_nll(logits, text):
  lp = np_log_softmax(logits[:, :-1])
  return -np.take_along_axis(lp, text[:, 1:, None], -1)[..., 0]


def np_mean(values, w, norm):
  """The batch mean of values [B, K] under weights [B, K], per example or per token."""
  if norm == "token":
    return (values * w).sum() / w.sum()
  rows = [(values[i] * w[i]).sum() / w[i].sum() for i in range(len(w)) if w[i].sum() > 0]
  return np.mean(rows)


def _loss(student, opts, norms=("example", "token")):
  """Jitted (student params, teacher params, batch) -> {norm: (loss, metrics)}; the teacher is
  the student's architecture without a plan."""
  def f(sp, tp, b):
    t = distill.teacher_outputs(student, tp, b)
    return {n: distill.distill_loss(student, sp, b, t, opts=opts, loss_norm=n) for n in norms}
  return jax.jit(f)


def test_kd_and_ce_match_numpy_on_uneven_batch():
  """Teacher and student: two parameter sets of one architecture (Gemma 2: soft-caps, window),
  so both models' logits come from the NumPy reference; alpha 0.3, temperature 2.5."""
  cfg = CONFIGS[2]
  model, tp, tflat = make_params(cfg, seed=0)
  _, sp, sflat = make_params(cfg, seed=1)
  b = uneven_batch(seed=1)
  got = _loss(model, distill.Options(alpha=0.3, temperature=2.5))(sp, tp, b)
  lt = ref.paligemma_logits(tflat, cfg, b["image"], b["text"], b["mask_ar"])
  ls = ref.paligemma_logits(sflat, cfg, b["image"], b["text"], b["mask_ar"])
  w = b["mask_loss"][:, 1:].astype(np.float64)
  kd_rows, nll = np_kd(lt, ls, 2.5), np_nll(ls, b["text"])
  for norm in ("example", "token"):
    loss, m = got[norm]
    kd, ce = np_mean(kd_rows, w, norm), np_mean(nll, w, norm)
    np.testing.assert_allclose(float(m["kd"]), kd, rtol=1e-4, err_msg=norm)
    np.testing.assert_allclose(float(m["ce"]), ce, rtol=1e-4, err_msg=norm)
    np.testing.assert_allclose(float(loss), 0.3 * kd + 0.7 * ce, rtol=1e-4, err_msg=norm)
    assert int(m["tokens"]) == 6
  # The two norms really differ here, and so does a KD that forgot the T^2.
  assert abs(float(got["example"][1]["kd"]) - float(got["token"][1]["kd"])) > 1e-3
  assert abs(np_mean(kd_rows / 2.5 ** 2, w, "example") - float(got["example"][1]["kd"])) > 1e-3


def test_kd_of_a_compressed_student_and_the_limits():
  """The student is the teacher's parameters under a pool plan (its logits from the model);
  the student without a plan has KD 0; alpha 0 is exactly the plain cross-entropy."""
  cfg = CONFIGS[1]
  teacher, p, _ = make_params(cfg, seed=2)
  student = teacher.with_plan(POOL4)
  b = uneven_batch(seed=2)

  @jax.jit
  def f(p, b):
    t = distill.teacher_outputs(teacher, p, b)
    kd = lambda m: distill.distill_loss(m, p, b, t, opts=distill.Options(alpha=1.0,
                                                                         temperature=0.7))
    ce_only = distill.distill_loss(student, p, b, t, opts=distill.Options(alpha=0.0))
    logits = lambda m: m.apply({"params": p}, b["image"], b["text"], b["mask_ar"])[0]
    return (kd(student), kd(teacher), ce_only, loss_fn(student, p, b), logits(teacher),
            logits(student))

  (loss, m), (same, _), (ce_loss, ce_m), (want_ce, _), lt, ls = f(p, b)
  w = b["mask_loss"][:, 1:].astype(np.float64)
  want = np_mean(np_kd(np.asarray(lt, np.float64), np.asarray(ls, np.float64), 0.7), w,
                 "example")
  assert want > 1e-3  # the plan changes the answers' distributions
  np.testing.assert_allclose(float(m["kd"]), want, rtol=1e-4)
  np.testing.assert_allclose(float(loss), want, rtol=1e-4)
  assert abs(float(same)) < 1e-6
  assert "kd" not in ce_m
  np.testing.assert_allclose(float(ce_loss), float(want_ce), rtol=1e-6)


def test_hidden_states_term_matches_numpy():
  """The decoder's final-normed text states of two parameter sets (NumPy reference), MSE at the
  answer positions (those whose logits predict an answer token) or at every text position."""
  cfg = CONFIGS[1]
  model, tp, tflat = make_params(cfg, seed=3)
  _, sp, sflat = make_params(cfg, seed=4)
  b = uneven_batch(seed=3)
  runs = {at: _loss(model, distill.Options(alpha=0.0, hidden=2.0, hidden_at=at))(sp, tp, b)
          for at in distill.HIDDEN_AT}
  _, ht, _ = ref.paligemma_features(tflat, cfg, b["image"], b["text"], b["mask_ar"])
  ls, hs, _ = ref.paligemma_features(sflat, cfg, b["image"], b["text"], b["mask_ar"])
  err = ((hs - ht) ** 2).mean(-1)  # [B, T]
  answer = np.zeros(err.shape)
  answer[:, :-1] = b["mask_loss"][:, 1:]  # position t predicts text[t + 1]
  for at, w in (("answer", answer), ("text", np.ones(err.shape))):
    for norm in ("example", "token"):
      loss, m = runs[at][norm]
      want = np_mean(err, w, norm)
      ce = np_mean(np_nll(ls, b["text"]), b["mask_loss"][:, 1:], norm)
      np.testing.assert_allclose(float(m["hidden"]), want, rtol=1e-4, err_msg=(at, norm))
      np.testing.assert_allclose(float(loss), ce + 2.0 * want, rtol=1e-4, err_msg=(at, norm))
  assert abs(float(runs["answer"]["example"][1]["hidden"])
             - float(runs["text"]["example"][1]["hidden"])) > 1e-4


def test_image_tokens_term_matches_numpy():
  """Pooled student tokens (2 x 2 windows) against the teacher's tokens averaged over the same
  windows; selected tokens (uniform, 5 of 16) against the teacher's token at their patch."""
  cfg = CONFIGS[1]
  teacher, tp, tflat = make_params(cfg, seed=5)
  _, sp, sflat = make_params(cfg, seed=6)
  b = uneven_batch(seed=4)
  opts = distill.Options(alpha=0.0, image=1.0)
  got_pool = _loss(teacher.with_plan(POOL4), opts, ("example",))(sp, tp, b)["example"][1]

  @jax.jit
  def selected(sp, tp, b):
    m = teacher.with_plan(UNIFORM5)
    _, metrics = distill.distill_loss(m, sp, b, distill.teacher_outputs(teacher, tp, b),
                                      opts=opts)
    zimg, tokens, _ = m.apply({"params": sp}, b["image"], method=m.embed_image)
    return metrics, tokens.pos

  got_sel, pos = selected(sp, tp, b)
  zt = ref.image_embed(tflat, cfg, b["image"])  # [B, 16, E], raster order on the 4 x 4 grid
  zs = ref.image_embed(sflat, cfg, b["image"])
  win = lambda z: z.reshape(len(z), 2, 2, 2, 2, -1).mean((2, 4)).reshape(len(z), 4, -1)
  want_pool = ((win(zs) - win(zt)) ** 2).mean(-1).mean()  # every token carries 4 patches
  np.testing.assert_allclose(float(got_pool["image"]), want_pool, rtol=1e-4)
  lin = np.asarray(pos)[..., 1] * 4 + np.asarray(pos)[..., 2]  # [B, 5] the kept patches
  rows = np.arange(len(lin))[:, None]
  want_sel = ((zs[rows, lin] - zt[rows, lin]) ** 2).mean(-1).mean()
  np.testing.assert_allclose(float(got_sel["image"]), want_sel, rtol=1e-4)


def test_pool_onto_matches_loops():
  """Soft assignments (learned resamplers) and drops: a random src with -1s and a token that
  carries nothing."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 12, 3)).astype(np.float32)
  src = rng.integers(-1, 4, size=(2, 12)).astype(np.int32)  # tokens 0..3 of 5; token 4 empty
  mean, count = jax.jit(dl.pool_onto, static_argnums=2)(x, src, 5)
  for i in range(2):
    for j in range(5):
      hit = src[i] == j
      assert count[i, j] == hit.sum()
      want = x[i, hit].mean(0) if hit.any() else np.zeros(3)
      np.testing.assert_allclose(np.asarray(mean[i, j]), want, rtol=1e-5, atol=1e-6)


def test_teacher_gets_no_gradient_and_stays_unchanged():
  """Gradients reach the student only; after three donated steps (the student made from the
  teacher's parameters, as the loop makes it) the teacher's parameters are bit-identical, the
  train state holds the student's tree only, and the distillation loss went down."""
  cfg = CONFIGS[1]
  teacher, tp, _ = make_params(cfg, seed=7)
  b = uneven_batch(seed=5)
  opts = distill.Options(alpha=0.5, temperature=2.0, hidden=0.5, image=0.5)
  student = teacher.with_plan(POOL4)

  @jax.jit
  def grads(sp, tp):
    f = lambda sp, tp: distill.distill_loss(
        student, sp, b, distill.teacher_outputs(teacher, tp, b), opts=opts)[0]
    return jax.grad(f, argnums=(0, 1))(sp, tp)

  gs, gt = grads(jax.tree.map(lambda a: a * 1.01, tp), tp)  # a student not equal to the teacher
  assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(gt))
  assert float(optax.global_norm(gs)) > 1e-3

  c = ml_collections.ConfigDict({"model": {"plan": POOL4}})
  student, sp = loop.student_from_teacher(c, opts, teacher, tp)
  before = jax.tree.map(np.array, tp)
  state = TrainState.create(apply_fn=student.apply, params=sp, tx=optax.adam(3e-3))
  step = jax.jit(distill.make_distill_step(student, teacher, opts), donate_argnums=0)
  losses = []
  for _ in range(4):
    state, m = step(state, b, tp)
    losses.append(float(m["loss"]))
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, tp), before)
  assert jax.tree.structure(state.params) == jax.tree.structure(tp)
  assert jax.tree.structure(state.opt_state) == jax.tree.structure(
      optax.adam(3e-3).init(state.params))
  assert {"kd", "ce", "hidden", "image", "grad_norm"} <= set(m)
  assert losses[-1] < losses[0], losses


def test_features_are_the_forward():
  """`PaliGemma.features` gives `__call__`'s logits and the NumPy reference's final-normed
  states (the hidden term compares these)."""
  cfg = CONFIGS[2]
  model, p, flat = make_params(cfg, seed=8)
  image, text, mask_ar = inputs(seed=9)
  logits, hidden, img, _ = jax.jit(lambda p: model.apply(
      {"params": p}, image, text, mask_ar, method=model.features))(p)
  want_logits, want_hidden, want_img = ref.paligemma_features(flat, cfg, image, text, mask_ar)
  np.testing.assert_allclose(np.asarray(logits), want_logits, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(hidden), want_hidden, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(img.x), want_img, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Refusals


@pytest.mark.parametrize("section, field", [
    (dict(alpha=1.5), "distill.alpha"),
    (dict(alpha=-0.1), "distill.alpha"),
    (dict(alpha=True), "distill.alpha"),
    (dict(alpha="0.5"), "distill.alpha"),
    (dict(temperature=0.0), "distill.temperature"),
    (dict(temperature=-2), "distill.temperature"),
    (dict(features=dict(hidden=-1.0)), "distill.features.hidden"),
    (dict(features=dict(image=None)), "distill.features.image"),
    (dict(features=dict(logits=1.0)), "distill.features: unknown feature"),
    (dict(features=1.0), "distill.features"),
    (dict(hidden_at="prompt"), "distill.hidden_at"),
    (dict(teacher=None), "distill.teacher"),
    (dict(student_img=dict(width=8)), "distill.student_img: unknown field"),
    (dict(student_img=dict(depth=-1)), "distill.student_img.depth"),
    (dict(student_img=dict(patch_size=2.0)), "distill.student_img.patch_size"),
    (dict(alhpa=0.5), "distill: unknown field"),
])
def test_bad_options_are_refused(section, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    distill.Options.from_config(ml_collections.ConfigDict(section))


def test_good_options_and_defaults():
  o = distill.Options.from_config({"alpha": 1, "temperature": 3, "features": {"image": 2},
                                   "student_img": {"depth": 0, "patch_size": 8}})
  assert (o.alpha, o.temperature, o.hidden, o.image) == (1.0, 3.0, 0.0, 2.0)
  assert o.student_img == (("patch_size", 8),) and o.light
  assert not distill.Options.from_config({}).light


def test_pairs_that_cannot_be_compared_are_refused():
  import dataclasses  # pylint: disable=g-import-not-at-top
  from tcjax.nn import PaliGemma  # pylint: disable=g-import-not-at-top
  teacher = PaliGemma(CONFIGS[1])
  other = lambda **kw: PaliGemma(dataclasses.replace(
      CONFIGS[1], llm=dataclasses.replace(CONFIGS[1].llm, **kw)))
  with pytest.raises(ValueError, match="vocabularies differ"):
    distill.make_distill_step(other(vocab_size=60), teacher, distill.Options())
  with pytest.raises(ValueError, match="decoder width"):
    distill.make_distill_step(other(width=32), teacher, distill.Options(hidden=1.0))
  distill.make_distill_step(other(width=32), teacher, distill.Options())  # logits only: fine


def test_config_and_loop_refusals():
  from configs import distill as distill_config  # pylint: disable=g-import-not-at-top
  from configs import testbed as testbed_config  # pylint: disable=g-import-not-at-top
  for arg, match in (("nonsense", "unknown student"), ("pool,budget=-3", "bad argument part"),
                     ("pool,alpha=0.5", "bad argument part"), ("light,image=x", "bad argument")):
    with pytest.raises(ValueError, match=match):
      distill_config.get_config(arg)
  cfg = distill_config.get_config("light,smoke")
  cfg.init = "elsewhere.npz"
  with pytest.raises(ValueError, match="cannot start from config.init"):
    loop.distill_options(cfg)
  cfg = distill_config.get_config("smoke")
  cfg.distill.alpha = 2.0
  with pytest.raises(ValueError, match=r"distill\.alpha"):
    loop.distill_options(cfg)
  cfg.distill.alpha = 0.5
  cfg.distill.temprature = 1.0  # a misspelt field in a config file
  with pytest.raises(ValueError, match="unknown field"):
    loop.distill_options(cfg)
  assert loop.distill_options(testbed_config.get_config("smoke")) is None
  o = loop.distill_options(distill_config.get_config("perceiver,hidden=0.5,smoke"))
  assert (o.alpha, o.temperature, o.hidden, o.image, o.light) == (0.5, 2.0, 0.5, 0.0, False)
