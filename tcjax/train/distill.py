"""Distillation: the uncompressed model teaches a compressed (or lighter) student.

  opts = distill.Options.from_config(cfg.distill)    # ValueError on unknown / bad fields
  step = distill.make_distill_step(student, teacher, opts, trainable=..., loss_norm=...)
  state, metrics = jax.jit(step, donate_argnums=0)(state, batch, teacher_params)

The student is a `PaliGemma` with a compression plan (training-free methods, or a learned
compressor under `compressor/...`), or with a lighter vision tower (`light_encoder`); the
teacher is a `PaliGemma` run without a plan. Its parameters are an argument of the step, never
part of the train state: no gradient, no optimizer state, not in the checkpoints. Its forward
runs before the student's and outside the differentiated function.

  loss = alpha * KD + (1 - alpha) * CE + hidden * MSE_hidden + image * MSE_image

CE: `step.loss_fn`'s cross-entropy on the answer tokens. KD: KL(teacher || student) at
`temperature`, times temperature^2, on the positions whose logits predict the answer tokens.
MSE_hidden: the decoder's last states after the final norm, at those positions (`hidden_at`
"answer") or at every valid text position ("text"). MSE_image: each of the student's projected
image tokens against the mean of the teacher's over the patches it carries (`Tokens.src`; a
lighter tower's larger patch carries the teacher patches inside it). Every term is averaged as
the cross-entropy is (`loss_norm`: per example, or per token; `step.masked_mean`).

Shapes as `tcjax.train.step` (batch: image, text, mask_ar, mask_loss, optional input_mask).
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, Dict, Mapping, Tuple

import jax
import jax.numpy as jnp

from tcjax.nn.paligemma import PaliGemma
from tcjax.train import distill_loss as dl
from tcjax.train import light_encoder
from tcjax.train.step import (TrainState, answer_weight, cast_for_compute, make_train_step,
                              masked_mean, next_token_nll)

FIELDS = ("teacher", "alpha", "temperature", "features", "hidden_at", "student_img")
FEATURES = ("hidden", "image")
HIDDEN_AT = ("answer", "text")


def _number(where: str, v) -> float:
  if isinstance(v, bool) or not isinstance(v, numbers.Real):
    raise ValueError(f"{where} must be a number, got {v!r}")
  return float(v)


@dataclasses.dataclass(frozen=True)
class Options:
  """What a distillation run does (`from_config` reads the config section).

  teacher: a big_vision `.npz` / HF directory, "" the bundled model (the training loop loads
    it). alpha in [0, 1]: the KD share of the logit loss. temperature > 0. hidden, image: the
    feature terms' weights (>= 0; 0 leaves the term out). hidden_at: "answer" or "text".
    student_img: ((field, value), ...) of a lighter vision tower (`light_encoder.OPTIONS`; 0
    keeps the teacher's).
  """

  teacher: str = ""
  alpha: float = 0.5
  temperature: float = 1.0
  hidden: float = 0.0
  image: float = 0.0
  hidden_at: str = "answer"
  student_img: Tuple[Tuple[str, int], ...] = ()

  def __post_init__(self):
    if not isinstance(self.teacher, str):
      raise ValueError(f"distill.teacher must be a path or '' (the bundled model), "
                       f"got {self.teacher!r}")
    alpha = _number("distill.alpha", self.alpha)
    if not 0.0 <= alpha <= 1.0:
      raise ValueError(f"distill.alpha must be in [0, 1], got {self.alpha!r}")
    temperature = _number("distill.temperature", self.temperature)
    if not temperature > 0.0:
      raise ValueError(f"distill.temperature must be > 0, got {self.temperature!r}")
    for name in FEATURES:
      w = _number(f"distill.features.{name}", getattr(self, name))
      if not w >= 0.0:
        raise ValueError(f"distill.features.{name} must be >= 0, got {w!r}")
      object.__setattr__(self, name, w)
    if self.hidden_at not in HIDDEN_AT:
      raise ValueError(f"distill.hidden_at must be one of {HIDDEN_AT}, got {self.hidden_at!r}")
    student_img = tuple(sorted(dict(self.student_img).items()))
    unknown = [k for k, _ in student_img if k not in light_encoder.OPTIONS]
    if unknown:
      raise ValueError(f"distill.student_img: unknown field(s) {unknown}; "
                       f"known: {light_encoder.OPTIONS}")
    for k, v in student_img:
      if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"distill.student_img.{k} must be an int >= 0 (0: the teacher's), "
                         f"got {v!r}")
    object.__setattr__(self, "alpha", alpha)
    object.__setattr__(self, "temperature", temperature)
    object.__setattr__(self, "student_img", tuple((k, v) for k, v in student_img if v))

  @property
  def light(self) -> bool:
    """Whether the student has a lighter vision tower than the teacher."""
    return bool(self.student_img)

  @classmethod
  def from_config(cls, section: Mapping[str, Any]) -> "Options":
    """From the `config.distill` section (a dict or ConfigDict): teacher, alpha, temperature,
    features={hidden: w, image: w}, hidden_at, student_img={depth, patch_size}. Missing fields
    take their defaults; unknown ones raise ValueError."""
    d = _plain(section)
    unknown = sorted(set(d) - set(FIELDS))
    if unknown:
      raise ValueError(f"distill: unknown field(s) {unknown}; known: {FIELDS}")
    features = d.pop("features", None) or {}
    if not isinstance(features, dict):
      raise ValueError(f"distill.features must be a dict {{name: weight}} with names in "
                       f"{FEATURES}, got {features!r}")
    bad = sorted(set(features) - set(FEATURES))
    if bad:
      raise ValueError(f"distill.features: unknown feature(s) {bad}; known: {FEATURES}")
    student_img = d.pop("student_img", None) or {}
    if not isinstance(student_img, dict):
      raise ValueError(f"distill.student_img must be a dict, got {student_img!r}")
    return cls(**d, **features, student_img=tuple(student_img.items()))


def _plain(section) -> Dict[str, Any]:
  """A ConfigDict (or dict) as nested plain dicts."""
  if hasattr(section, "to_dict"):
    section = section.to_dict()
  if not isinstance(section, Mapping):
    raise ValueError(f"the distill section must be a dict, got {section!r}")
  return {k: _plain(v) if hasattr(v, "to_dict") else v for k, v in dict(section).items()}


def check_pair(student: PaliGemma, teacher: PaliGemma, opts: Options) -> None:
  """ValueError unless the two models can be compared as `opts` asks."""
  s, t = student.config, teacher.config
  if s.llm.vocab_size != t.llm.vocab_size:
    raise ValueError(f"student and teacher vocabularies differ ({s.llm.vocab_size} vs "
                     f"{t.llm.vocab_size}): their next-token distributions cannot be compared")
  if (opts.hidden or opts.image) and s.llm.width != t.llm.width:
    raise ValueError(f"distill.features need the same decoder width, student {s.llm.width} vs "
                     f"teacher {t.llm.width}")
  if s.img.image_size != t.img.image_size:
    raise ValueError(f"student and teacher image sizes differ ({s.img.image_size} vs "
                     f"{t.img.image_size}): they must see the same batch")


def teacher_outputs(teacher: PaliGemma, params, batch: Dict[str, jax.Array], *,
                    compute_dtype=None) -> Dict[str, Any]:
  """The teacher's forward without a plan, gradient-free: {"logits": float32[B, T, V],
  "hidden": float32[B, T, E], "image": its projected image Tokens (x float32[B, M, E])}."""
  teacher = teacher.with_plan(())
  params, image = cast_for_compute(params, batch["image"], compute_dtype)
  logits, hidden, img, _ = teacher.apply(
      {"params": params}, image, batch["text"], batch["mask_ar"], batch.get("input_mask"),
      method=PaliGemma.features)
  f32 = lambda a: a.astype(jnp.float32)
  out = {"logits": f32(logits), "hidden": f32(hidden), "image": img.replace(x=f32(img.x))}
  return jax.lax.stop_gradient(out)


def hidden_weight(batch: Dict[str, jax.Array], hidden_at: str) -> jax.Array:
  """float32[B, T]: the text positions whose states the hidden term compares. "answer": those
  whose logits predict an answer token (the KD's); "text": every valid text position."""
  if hidden_at == "answer":
    return jnp.pad(answer_weight(batch), ((0, 0), (0, 1)))
  valid = batch.get("input_mask")
  if valid is None:
    return jnp.ones(batch["text"].shape, jnp.float32)
  return valid.astype(jnp.float32)


def distill_loss(model: PaliGemma, params, batch: Dict[str, jax.Array], teacher: Dict[str, Any],
                 *, opts: Options, compute_dtype=None, loss_norm: str = "example"
                 ) -> Tuple[jax.Array, Dict[str, jax.Array]]:
  """The student's loss against `teacher_outputs` (module docstring): (loss, metrics with the
  loss, ce, tokens, image_tokens_kept, and each active term: kd, hidden, image)."""
  params, image = cast_for_compute(params, batch["image"], compute_dtype)
  logits, hidden, img, aux = model.apply(
      {"params": params}, image, batch["text"], batch["mask_ar"], batch.get("input_mask"),
      method=PaliGemma.features)
  weight = answer_weight(batch)
  ce = masked_mean(next_token_nll(logits, batch["text"]), weight, loss_norm)
  metrics = {"ce": ce}
  loss = (1.0 - opts.alpha) * ce
  if opts.alpha > 0:  # static: an alpha of 0 never reads the teacher's logits
    kd = masked_mean(dl.kl_per_token(teacher["logits"], logits, opts.temperature), weight,
                     loss_norm)
    loss = loss + opts.alpha * kd
    metrics["kd"] = kd
  if opts.hidden > 0:
    mse = masked_mean(dl.hidden_mse(teacher["hidden"], hidden),
                      hidden_weight(batch, opts.hidden_at), loss_norm)
    loss = loss + opts.hidden * mse
    metrics["hidden"] = mse
  if opts.image > 0:
    err, w = dl.image_mse(img, teacher["image"])
    mse = masked_mean(err, w, loss_norm)
    loss = loss + opts.image * mse
    metrics["image"] = mse
  return loss, dict(metrics, loss=loss, tokens=weight.sum(),
                    image_tokens_kept=aux.get("image_tokens_kept"))


def make_distill_step(student: PaliGemma, teacher: PaliGemma, opts: Options, *,
                      compute_dtype=None, trainable=None, loss_norm: str = "example"
                      ) -> Callable[[TrainState, Dict[str, jax.Array], Any],
                                    Tuple[TrainState, Dict]]:
  """`step(state, batch, teacher_params) -> (state, metrics)`: `make_train_step`'s step on the
  student (its freezing, gradient norm and update) with `distill_loss`; the teacher's outputs
  enter it as constants. compute_dtype, trainable, loss_norm: as there."""
  check_pair(student, teacher, opts)
  inner = make_train_step(student, compute_dtype=compute_dtype, trainable=trainable,
                          loss_norm=loss_norm, loss=functools.partial(distill_loss, opts=opts))

  def step(state: TrainState, batch, teacher_params):
    return inner(state, batch, teacher_outputs(teacher, teacher_params, batch,
                                               compute_dtype=compute_dtype))

  return step
