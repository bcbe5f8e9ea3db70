"""PaliGemma: SigLIP -> linear projector (`img/head`) -> Gemma, with a static compression plan.

Follows big_vision's `models/proj/paligemma/paligemma.py` method split and parameter names
(`img/...`, `llm/...`), so big_vision `.npz` and converted HF checkpoints load without remapping.

  text_logits, aux = model.apply({"params": params}, image, text, mask_ar)
  text_logits, hidden, img_tokens, aux = model.apply(variables, image, text, mask_ar,
                                                     method=model.features)
  zimg, img_tokens, aux = model.apply(variables, image, text, mask_ar, method=model.embed_image)
  last_logits, cache, aux = model.apply(variables, image, text, mask_ar, method=model.prefill)
  logits, cache = model.apply(variables, token, cache, method=model.decode_step)

Shapes: image float[B, H, W, 3] in [-1, 1] or uint8 in [0, 255] (a clip: [B, F, H, W, 3]; uint8
frames are converted per frame chunk, so a long clip stays 1 byte per pixel); text int32[B, T]
(BOS, prefix, separator, suffix; no image placeholder tokens); mask_ar int32[B, T] (0 prefix,
1 causal suffix); input_mask bool[B, T] (False = padding, default all valid).

The plan (config.plan, see `tcjax.nn.plan`) acts in `embed_image` (vit, post_vit, post_proj
stages) and in the decoder (llm stage) of `__call__` and `prefill`. `aux` reports what it did:
"vit_tokens" (tokens entering each ViT layer), "image_tokens" (to the LLM), "llm_tokens" (tokens
entering each decoder layer, the KV entries each layer caches), "llm_valid_tokens" int32[B, L].
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import struct

from tcjax import compress
from tcjax.nn import gemma
from tcjax.nn import learned
from tcjax.nn import plan as plan_lib
from tcjax.nn import siglip
from tcjax.nn.config import PaliGemmaConfig
from tcjax.nn.params import ParamTree
from tcjax.parallel.mesh import batch_reshape, constrain, gather_params, like_batch, map_batch
from tcjax.tokens import Tokens


def _check_text(text, mask_ar, input_mask):
  text = jnp.asarray(text)
  if text.ndim != 2 or not jnp.issubdtype(text.dtype, jnp.integer):
    raise ValueError(f"text must be int32[B, T], got {text.dtype}{list(text.shape)}")
  mask_ar = jnp.zeros_like(text) if mask_ar is None else jnp.asarray(mask_ar)
  if mask_ar.shape != text.shape:
    raise ValueError(f"mask_ar must have the shape of text {text.shape}, got {mask_ar.shape}")
  if input_mask is None:
    input_mask = jnp.ones(text.shape, bool)
  input_mask = jnp.asarray(input_mask)
  if input_mask.shape != text.shape:
    raise ValueError(f"input_mask must have the shape of text {text.shape}, "
                     f"got {input_mask.shape}")
  return text, mask_ar.astype(jnp.int32), input_mask.astype(bool)


def _vit_scores(vit_out: Tokens, scores, tokens: Tokens):
  """float32[B, N]: for each of `tokens` (after the post-ViT stages), the ViT signal layer's
  score of the ViT output token that carried its origin patch (`vit_out.src`); 0 on padding.

  vit_out: the ViT output Tokens [B, N0]; scores: float32[B, N0] over them."""
  carrier = jnp.take_along_axis(vit_out.src, tokens.linear_pos(), 1)  # int32[B, N]
  s = jnp.take_along_axis(scores, jnp.maximum(carrier, 0), 1)
  return jnp.where(tokens.mask & (carrier >= 0), s, 0.0).astype(jnp.float32)


def add_frame_embedding(table, x, frame, mask, frames: int):
  """x float[B, N, E] + table[frame] on the valid visual tokens of a clip or spectrogram.

  RoPE rotates queries and keys, so a token's position changes which tokens attend to it but
  never the value it contributes; a learned row per frame puts the frame index into the token
  itself, where a question like "when does the square appear" can read it directly.

  table: float[K, E] (`llm/frame_embedding`); frame: int32[B, N] each token's frame
  (`Tokens.pos[..., 0]`: the original one, kept by every compression method; a merged token
  has its representative's); mask: bool[B, N], padding (False) gets nothing added; frames: the
  static frame count of the grid (1, an image: x is returned as is). The rows are cast to x's
  dtype. Raises ValueError (at trace time) for a clip of more frames than the table's K rows.
  """
  if frames == 1:
    return x
  if frames > table.shape[0]:
    raise ValueError(f"a clip of {frames} frames, but the frame embedding has "
                     f"{table.shape[0]} rows (config.frame_embedding)")
  rows = gemma.take_rows(table, frame).astype(x.dtype)
  return x + jnp.where(mask[..., None], rows, jnp.zeros((), x.dtype))


def _vit_plan(plan) -> tuple:
  """The vit-stage entries of a normalized plan (what `encode_image` depends on)."""
  return tuple(e for e in plan if e[0] == "vit")


@struct.dataclass
class Encoded:
  """The ViT stage's output for one batch (`PaliGemma.encode_image`), for reuse by plans that
  differ only after the ViT.

  tokens: the ViT output Tokens float[B, N, D] (a clip's frames joined: N = F * n); signals:
  {layer: {"attn": float32[B, 1, N], "scores": float32[B, N], "keys": float32[B, N, h],
  "keys_heads": float32[B, N, H, h]}} for each ViT layer of `signal_layers` (ascending, resolved;
  () and {} when none); vit_tokens: tokens entering each ViT layer; vit_plan: the vit entries
  that made it; frames: a clip's frame count (None: images).
  """

  tokens: Tokens
  signals: Dict[int, Dict[str, jax.Array]]
  vit_tokens: Tuple[int, ...] = struct.field(pytree_node=False)
  signal_layers: Tuple[int, ...] = struct.field(pytree_node=False)
  vit_plan: tuple = struct.field(pytree_node=False)
  frames: Optional[int] = struct.field(pytree_node=False, default=None)


class PaliGemma(nn.Module):
  """PaliGemma 1 / 2 with compression hook points. `config`: a `PaliGemmaConfig`."""

  config: PaliGemmaConfig

  def setup(self):
    self.img_params = ParamTree.for_config(self.config, "img")
    self.llm_params = ParamTree.for_config(self.config, "llm")
    # Learned compressors of the plan, under `compressor/<key>` (no parameters without any).
    self.compressor = learned.Compressors(entries=learned.compressor_entries(self.config.plan))

  def img(self):
    """The `img` parameters (stacked layers gathered one at a time inside their scan)."""
    return gather_params(self.img_params(), skip=("encoderblock",))

  def llm(self):
    return gather_params(self.llm_params(), skip=("layers",))

  @nn.nowrap
  def with_plan(self, plan) -> "PaliGemma":
    """The same model (same parameters) with another compression plan."""
    return PaliGemma(dataclasses.replace(self.config, plan=plan), parent=None)

  # ---------------------------------------------------------------------------------------
  def _vit_stage(self, p, image, framewise_ok: bool, want: Optional[Tuple[int, ...]] = None):
    """The ViT with the plan's vit stage -> (tokens: ViT output, a clip's frames joined; signals
    {layer: {name: array}} of the ViT layers `want` (None: the plan's signal layers); aux;
    frames or None; the post_vit entries still to run)."""
    cfg, plan = self.config, self.config.plan
    image = jnp.asarray(image)
    if not (jnp.issubdtype(image.dtype, jnp.floating) or image.dtype == jnp.uint8):
      raise ValueError(f"image must be float in [-1, 1] or uint8 in [0, 255], got {image.dtype}")
    frames = None
    if image.ndim == 5:  # a clip: frames are encoded independently
      frames = image.shape[1]
      image = batch_reshape(image, (image.shape[0] * frames,) + image.shape[2:])
    elif image.ndim != 4:
      raise ValueError(f"image must be float[B, H, W, 3] or a clip float[B, F, H, W, 3], "
                       f"got shape {image.shape}")
    # Frames are independent: spread them over every device of the mesh (data and seq).
    image = constrain(image, ("data", "seq") if frames else "data")
    if want is None:
      want = plan_lib.signal_layers(plan, cfg.img.depth)
    post_vit = plan_lib.entries(plan, "post_vit")
    # Leading per-frame pooling runs on each frame as it leaves the ViT (inside the frame
    # chunks): the same result as on the clip, without ever holding the clip's raw tokens.
    framewise = []
    while framewise_ok and frames is not None and not want and post_vit \
        and post_vit[0][1]["method"] in plan_lib.FRAMEWISE:
      framewise.append(post_vit.pop(0))

    def encode(im):
      if im.dtype == jnp.uint8:  # decoded video frames: to [-1, 1] one chunk at a time
        im = im.astype(p["embedding"]["kernel"].dtype) / 127.5 - 1.0
      tokens, signals, aux = siglip.encode(p, im, cfg.img, plan, want_signals=want)
      for i, opts in framewise:
        tokens = plan_lib.run_entry(plan_lib.per_frame(opts, frames, f"plan[{i}]"), tokens,
                                    signals, "post_vit", f"plan[{i}] (post_vit, {opts['method']})")
      return tokens, signals, aux

    if frames is not None and cfg.frame_chunks > 1:
      # ViT activations exist for one chunk of frames at a time.
      aux = {}

      def encode_chunk(im):
        tokens, signals, a = encode(im)
        aux.update(a)  # static per-layer counts, the same for every chunk
        return tokens, signals

      tokens, signals = map_batch(encode_chunk, (image,), cfg.frame_chunks, "frame_chunks")
    else:
      tokens, signals, aux = encode(image)
    if frames is not None:
      changed = tokens.num_tokens != cfg.img.num_patches
      tokens = siglip.frames_to_video(tokens, frames)
      tokens = tokens.replace(x=self._clip_constraint(tokens.x, post_vit))
      signals = siglip.video_signals(signals, frames)
      if changed:  # per-frame padding must move behind every frame's valid tokens
        from tcjax.compress import primitives as cp  # pylint: disable=g-import-not-at-top
        tokens = cp.sort_by_position(tokens)
    return tokens, signals, aux, frames, post_vit

  def _clip_constraint(self, x, post_vit):
    """A clip's tokens stay spread over `seq` only if every later method runs exactly on a
    sharded token axis; otherwise they are gathered per example here, on purpose (e.g.
    temporal merging compares neighbouring frames), and the decoder re-shards them."""
    later = post_vit + plan_lib.entries(self.config.plan, "post_proj")
    seq_ok = all(o["method"] in compress.METHODS and compress.METHODS[o["method"]].token_sharded
                 for _, o in later)
    return constrain(x, "data", "seq" if seq_ok else None)

  def encode_image(self, image, *, signal_layers: Union[None, int, Sequence[int]] = None
                   ) -> Encoded:
    """The ViT stage alone (the plan's vit entries, nothing after): image or clip -> `Encoded`.

    Its output goes to `embed_image(..., encoded=)` of any model with the same parameters whose
    plan has the same vit stage and reads no ViT signal layer it lacks, so that plans differing
    after the ViT share one run of the vision tower.

    signal_layers: the ViT layer(s) whose attention / keys become the signals (negative: from
      the end, e.g. -2 as most post-ViT methods' default); None: this plan's (none if it uses
      none).
    """
    depth = self.config.img.depth
    if signal_layers is None:
      want = plan_lib.signal_layers(self.config.plan, depth)
    else:
      layers = (signal_layers,) if isinstance(signal_layers, int) else tuple(signal_layers)
      want = tuple(sorted({plan_lib.resolve_layer(l, depth, "signal_layers") for l in layers}))
    tokens, signals, aux, frames, _ = self._vit_stage(self.img(), image, False, want)
    return Encoded(tokens=tokens, signals=signals, vit_tokens=tuple(aux["vit_tokens"]),
                   signal_layers=want, vit_plan=_vit_plan(self.config.plan), frames=frames)

  def embed_image(self, image, text=None, mask_ar=None, input_mask=None, *, encoded=None
                  ) -> Tuple[jax.Array, Tokens, Dict[str, Any]]:
    """Image (or clip) -> projected image tokens, after the vit / post_vit / post_proj stages.

    Returns (zimg float[B, N, E], tokens: their Tokens bookkeeping (pos / size / mask / src on
    the patch grid; x = zimg), aux). `text` is needed only by text-guided post_proj methods.
    encoded: `encode_image`'s output to start from instead of running the ViT (pass
    image=None); it must come from the same vit stage and carry this plan's ViT signals.
    A clip's frame embedding (config.frame_embedding) is not in zimg: `embed_image_and_text`
    adds it, so these tokens can go to `prefill(image_tokens=)` and get it there once.
    """
    cfg, plan = self.config, self.config.plan
    p = self.img()
    if encoded is None:
      tokens, signals, aux, _, post_vit = self._vit_stage(p, image, framewise_ok=True)
    else:
      tokens, signals, aux, post_vit = self._from_encoded(image, encoded)
    vit_out = tokens  # the ViT output, whose signals the llm entries' `vit_scores` read
    depth = cfg.img.depth
    layer_signals = lambda opts, stage: signals.get(
        plan_lib.entry_signal_layer(opts, stage, depth), {})
    for i, opts in post_vit:
      tokens = self._run_entry("post_vit", i, opts, tokens, layer_signals(opts, "post_vit"))
    head = p["head"]
    tokens = tokens.replace(x=tokens.x @ head["kernel"] + head["bias"])
    post_proj = plan_lib.entries(plan, "post_proj")
    if post_proj:
      extra = {}
      if text is not None:
        text, mask_ar, input_mask = _check_text(text, mask_ar, input_mask)
        extra["text"] = gemma.embed_text(self.llm(), text, cfg.llm)
        extra["text_mask"] = input_mask & (mask_ar == 0)
      for i, opts in post_proj:
        tokens = self._run_entry("post_proj", i, opts, tokens,
                                 {**layer_signals(opts, "post_proj"), **extra})
    aux = dict(aux, image_tokens=tokens.num_tokens, image_tokens_valid=tokens.count())
    score_layers = plan_lib.vit_score_layers(plan, depth)
    if score_layers:  # only when an llm entry asks for `vit_scores` (MustDrop's key set)
      aux["vit_scores"] = {l: _vit_scores(vit_out, signals[l]["scores"], tokens)
                           for l in score_layers}
    return tokens.x, tokens, aux

  def _run_entry(self, stage: str, i: int, opts, tokens: Tokens, signals) -> Tokens:
    """One post_vit / post_proj plan entry: a `tcjax.compress` method, or a learned compressor
    (`tcjax.nn.learned`) run as the `compressor/<key>` submodule with the signals it needs."""
    where = f"plan[{i}] ({stage}, {opts['method']})"
    if not learned.is_learned(opts):
      return plan_lib.run_entry(opts, tokens, signals, stage, where)
    kw = {}
    for s in learned.LEARNED[opts["method"]].needs(opts, stage):
      if signals.get(s) is None:
        raise ValueError(f"{where}: needs signal {s!r}" + (
            ", which exists only when the model is called with text"
            if s in ("text", "text_mask") else ""))
      kw[s] = signals[s]
    return self.compressor(learned.entry_key(stage, opts), tokens, **kw)

  def _from_encoded(self, image, encoded):
    """(tokens, signals, aux, post_vit entries) from `encode_image`'s output, checked against
    this model's plan."""
    cfg, plan = self.config, self.config.plan
    if image is not None:
      raise ValueError("embed_image: pass image=None with encoded= (the ViT already ran)")
    if not isinstance(encoded, Encoded):
      raise ValueError(f"encoded must be the Encoded of encode_image, got {type(encoded)}")
    if encoded.vit_plan != _vit_plan(plan):
      raise ValueError(f"encoded comes from the vit stage {encoded.vit_plan}, but this plan's "
                       f"is {_vit_plan(plan)}")
    missing = set(plan_lib.signal_layers(plan, cfg.img.depth)) - set(encoded.signal_layers)
    if missing:
      raise ValueError(f"the plan needs the signals of ViT layer(s) {sorted(missing)}, encoded "
                       f"carries {list(encoded.signal_layers) or 'none'}")
    post_vit = plan_lib.entries(plan, "post_vit")
    tokens = encoded.tokens
    if encoded.frames is not None:
      tokens = tokens.replace(x=self._clip_constraint(tokens.x, post_vit))
    return tokens, encoded.signals, {"vit_tokens": encoded.vit_tokens}, post_vit

  def embed_text(self, text):
    """int32[B, T] -> float[B, T, E] (scaled by sqrt(E))."""
    return gemma.embed_text(self.llm(), jnp.asarray(text), self.config.llm)

  def embed_image_and_text(self, image, text, mask_ar=None, input_mask=None, *,
                           image_tokens=None):
    """-> (x float[B, N+T, E], input_mask bool[B, N+T], mask_ar int32[B, N+T]), as big_vision,
    plus the image Tokens and aux. image_tokens: projected image Tokens (`embed_image`'s; x is
    zimg) used instead of encoding `image` (pass image=None).

    Every path into the decoder passes here, after the whole plan before the llm stage: with
    config.frame_embedding > 0, a clip's tokens get their frame's row of the table
    (`add_frame_embedding`) here, once, and the returned Tokens' x is then that sum (the
    decoder input)."""
    text, mask_ar, input_mask = _check_text(text, mask_ar, input_mask)
    if image_tokens is None:
      zimg, img, aux = self.embed_image(image, text, mask_ar, input_mask)
    else:
      if image is not None:
        raise ValueError("pass image=None with image_tokens= (the image is already embedded)")
      if not isinstance(image_tokens, Tokens):
        raise ValueError(f"image_tokens must be Tokens, got {type(image_tokens)}")
      img = image_tokens
      zimg = img.x
      aux = {"image_tokens": img.num_tokens, "image_tokens_valid": img.count()}
    ztxt = self.embed_text(text)
    same = lambda a: like_batch(a, ztxt)  # Explicit meshes: one batch sharding for the concat
    zimg = same(zimg.astype(ztxt.dtype))
    if self.config.frame_embedding:
      zimg = add_frame_embedding(self.llm()["frame_embedding"], zimg, same(img.pos[..., 0]),
                                 same(img.mask), img.grid[0])
      img = img.replace(x=zimg)
    x = jnp.concatenate([zimg, ztxt], 1)
    valid = jnp.concatenate([same(img.mask), same(input_mask)], 1)
    ar = jnp.concatenate([same(jnp.zeros(img.mask.shape, jnp.int32)), same(mask_ar)], 1)
    return x, valid, ar, img, aux

  def _decoder(self, image, text, mask_ar, input_mask, cache_size, image_tokens=None):
    x, valid, ar, img, aux = self.embed_image_and_text(image, text, mask_ar, input_mask,
                                                       image_tokens=image_tokens)
    # Positions count valid tokens only (big_vision: cumsum(input_mask) - 1), so merged-away
    # padding leaves no holes in RoPE.
    pos = gemma.renumber(valid)
    seq = gemma.Seq(x=x, pos=pos, valid=valid, mask_ar=ar, n_img=img.num_tokens)
    cfg = self.config
    hooks = tuple(h if h.vit_layer is None else dataclasses.replace(
        h, vit_layer=plan_lib.resolve_layer(h.vit_layer, cfg.img.depth, "signal_layer"))
                  for h in plan_lib.llm_hooks(cfg.plan, cfg.llm.depth))
    image_signals = {"vit_scores": aux.pop("vit_scores")} if "vit_scores" in aux else None
    out, seq, cache, llm_aux = gemma.prefill(
        self.llm(), seq, img, cfg.llm, hooks, cache_size=cache_size,
        decode_hooks=plan_lib.decode_hooks(cfg.plan, cfg.llm.depth), image_signals=image_signals)
    return out, seq, cache, {**aux, **llm_aux}, img

  def __call__(self, image, text, mask_ar=None, input_mask=None):
    """Training / scoring forward: (text_logits float[B, T, V], aux)."""
    out, seq, _, aux, _ = self._decoder(image, text, mask_ar, input_mask, 0)
    return gemma.logits(self.llm(), out[:, seq.n_img:], self.config.llm), aux

  def features(self, image, text, mask_ar=None, input_mask=None):
    """`__call__` with what distillation compares (`tcjax.train.distill`):
    (text_logits float[B, T, V], hidden float[B, T, E], image Tokens, aux).

    hidden: the last decoder layer's states at the text positions after the final norm (what
    the output embedding reads: a scale the norm keeps comparable between two models, where
    the raw residual stream may grow). image: the projected image tokens as they enter the
    decoder (x float[B, N, E], after the vit / post_vit / post_proj stages and the frame
    embedding; `src` maps each patch of the grid to the token carrying it).
    """
    out, seq, _, aux, img = self._decoder(image, text, mask_ar, input_mask, 0)
    p, cfg = self.llm(), self.config.llm
    hidden = gemma.final_norm(p, out[:, seq.n_img:], cfg)
    return gemma.readout(p, hidden, cfg), hidden, img, aux

  def prefill(self, image, text, mask_ar=None, input_mask=None, *, cache_size: int = 0,
              image_tokens=None):
    """Prefill the KV cache with image + prompt; `cache_size` entries are reserved for decoding.
    image_tokens: `embed_image`'s projected Tokens instead of `image` (None): the plan's llm
    stage still acts, its earlier stages are taken as done.

    Returns (logits float[B, V] at each example's last valid prompt token, cache, aux).
    """
    out, seq, cache, aux, _ = self._decoder(image, text, mask_ar, input_mask, cache_size,
                                            image_tokens)
    last = jnp.take_along_axis(out, gemma._last_valid(seq.valid)[:, None, None], 1)[:, 0]  # pylint: disable=protected-access
    return gemma.logits(self.llm(), last, self.config.llm), cache, aux

  def decode_step(self, token, cache):
    """token int32[B] -> (logits float[B, V], cache)."""
    return gemma.decode_step(self.llm(), jnp.asarray(token), cache, self.config.llm)
