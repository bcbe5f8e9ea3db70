"""HF `transformers` PaliGemma checkpoints (config.json + safetensors) -> tcjax.

A directory written by `PaliGemmaForConditionalGeneration.save_pretrained` holds `config.json` and
`model.safetensors` (or shards listed in `model.safetensors.index.json`). We read the safetensors
files with the `safetensors` library's numpy framework (memory-mapped, tensor by tensor; bf16 via
ml_dtypes, so torch is not needed), map HF names to big_vision's tree and build the
PaliGemmaConfig from config.json. A damaged file raises ValueError naming the file (and tensor).

Conventions that differ between the two (checked against transformers' modeling code):
- key layouts: transformers releases name the same weights `language_model.model.layers.*`,
  `model.language_model.layers.*` or `language_model.layers.*`; `vision_tower.vision_model.*`,
  `model.vision_tower.vision_model.*` or `vision_tower.*`; `lm_head.weight` or
  `language_model.lm_head.weight`. All are normalised to one canonical layout first.
- vocabulary: HF appends `<image>` (id 257152) and pads the embedding to a multiple of 64 rows;
  big_vision's embedding has the 257152 real rows. We slice the rows from the image token on.
- RMSNorm: HF Gemma / Gemma 2 compute `x * (1 + weight)` with `weight` initialised to 0, i.e. the
  stored value is big_vision's `scale` as is (no +1 to add or remove).
- Gemma 1's HF `post_attention_layernorm` is the norm BEFORE the MLP (big_vision `pre_ffw_norm`);
  in Gemma 2 it is the norm after attention (`post_attention_norm`).
- torch Linear weights are [out, in]; the conv stem is OIHW (big_vision: HWIO).
- HF scales image features inside the text embedding module only (text ids x sqrt(width)), as
  big_vision does, so the projector maps over unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import re
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

# Not used by name: safetensors' numpy framework builds bf16 arrays by asking numpy for the
# dtype "bfloat16", a name numpy knows only once ml_dtypes is imported. Measured with
# safetensors 0.8.0: without this import get_tensor on a BF16 tensor raises
# TypeError("data type 'bfloat16' not understood"); with it, it returns ml_dtypes.bfloat16 arrays
# bit-exact with torch's, so no bf16 path of our own is needed.
import ml_dtypes  # noqa: F401  pylint: disable=unused-import
import numpy as np
from safetensors import safe_open

from tcjax.checkpoints import big_vision as _bv
from tcjax.checkpoints import tree as _tree
from tcjax.nn.config import GemmaConfig, PaliGemmaConfig, SiglipConfig

_TANH_GELUS = ("gelu_pytorch_tanh", "gelu_fast", "gelu_new")


# ------------------------------------------------------------------------------------------------
# safetensors reading
# ------------------------------------------------------------------------------------------------
def _open_safetensors(path: str):
  """safe_open(path) (reads and checks the header only); ValueError naming a damaged file."""
  try:
    return safe_open(path, framework="numpy")
  except (FileNotFoundError, IsADirectoryError, PermissionError):
    raise  # not damage: OSError already names the path
  except Exception as e:  # pylint: disable=broad-except
    # safetensors validates the whole header when opening (length, JSON, offsets covering the
    # file exactly) and raises SafetensorError, which is no ValueError.
    raise ValueError(f"{path}: not a readable safetensors file ({e}){_past_end(path)}") from e


class _Stored(_tree.Deferred):
  """A tensor of an open safetensors file, read from its memory map only when asked:
  `read()` the whole tensor, `rows(start, stop)` a block of leading-axis rows."""

  __slots__ = ("_f", "_path", "_name")

  def __init__(self, f, path: str, name: str):
    self._f, self._path, self._name = f, path, name
    super().__init__(self._guard(lambda: f.get_slice(name).get_shape()),
                     lambda: self._guard(lambda: f.get_tensor(name)))

  def rows(self, start: int, stop: int) -> np.ndarray:
    stop = min(stop, self.shape[0])  # safetensors refuses a slice past the end; numpy clips
    return self._guard(lambda: self._f.get_slice(self._name)[start:stop])

  def _guard(self, fn):
    try:
      return fn()
    except Exception as e:  # pylint: disable=broad-except
      # e.g. a float8 dtype this numpy / ml_dtypes cannot represent
      dtype = self._f.get_slice(self._name).get_dtype()
      raise ValueError(f"{self._path}: cannot read tensor {self._name!r} of dtype {dtype} "
                       f"({type(e).__name__}: {e})") from e


def read_safetensors(path) -> Dict[str, np.ndarray]:
  """One `.safetensors` file -> {name: np.ndarray}, read tensor by tensor from a memory map.

  Raises ValueError naming the file (and the tensor) when the file is damaged.
  """
  path = os.fspath(path)
  with _open_safetensors(path) as f:
    return {name: _Stored(f, path, name).read() for name in f.keys()}


def _past_end(path: str) -> str:
  """For a truncated file, the tensors whose bytes lie past its end ("" if none / unknown).

  Diagnostic only: safetensors reports truncation as "incomplete metadata, file not fully
  covered" without naming a tensor, so we read the header ourselves to say which ones are cut.
  """
  try:
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
      n = int.from_bytes(fh.read(8), "little")
      if not 0 < n <= size - 8:
        return ""
      header = json.loads(fh.read(n))
    cut = sorted(k for k, v in header.items()
                 if k != "__metadata__" and 8 + n + int(v["data_offsets"][1]) > size)
  except Exception:  # pylint: disable=broad-except
    return ""  # the header itself is damaged: the library's message says how
  if not cut:
    return ""
  more = f" ... and {len(cut) - 10} more" if len(cut) > 10 else ""
  return f"; truncated at {size} bytes, tensors cut off: {', '.join(cut[:10])}{more}"


def _read_json(file: str) -> Dict[str, Any]:
  """A JSON object from `file`; ValueError naming the file if it is not one."""
  try:
    with open(file, encoding="utf-8") as f:
      obj = json.load(f)
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise ValueError(f"{file}: not valid JSON ({e})") from e
  if not isinstance(obj, dict):
    raise ValueError(f"{file}: expected a JSON object, got {type(obj).__name__}")
  return obj


def open_hf_dir(path, stack: contextlib.ExitStack
                ) -> Tuple[Dict[str, Any], Dict[str, _tree.Deferred]]:
  """(config.json dict, merged state dict of not-yet-read tensors) of a `save_pretrained`
  directory; its safetensors files stay open until `stack` closes."""
  path = os.fspath(path)
  cfg_file = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_file):
    raise ValueError(f"{path!r} has no config.json; expected a save_pretrained directory")
  cfg = _read_json(cfg_file)
  index = os.path.join(path, "model.safetensors.index.json")
  if os.path.isfile(index):
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str)
                                                    for v in weight_map.values()):
      raise ValueError(f"{index}: no weight_map of tensor name -> file name")
    files = sorted(set(weight_map.values()))
    absent = [f for f in files if not os.path.isfile(os.path.join(path, f))]
    if absent:
      raise ValueError(f"{index} lists shards that are not in {path!r}: {absent}")
  elif os.path.isfile(os.path.join(path, "model.safetensors")):
    files = ["model.safetensors"]
  else:
    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise ValueError(f"{path!r} holds no .safetensors weights (pytorch .bin is not supported)")
  state = {}
  for fname in files:
    file = os.path.join(path, fname)
    f = stack.enter_context(_open_safetensors(file))
    part = {name: _Stored(f, file, name) for name in f.keys()}
    dup = set(part) & set(state)
    if dup:
      raise ValueError(f"tensors stored twice across shards (again in {fname}): {sorted(dup)}")
    state.update(part)
  return cfg, state


def read_hf_dir(path) -> Tuple[Dict[str, Any], Dict[str, np.ndarray]]:
  """(config.json dict, merged state dict) of a `save_pretrained` directory."""
  with contextlib.ExitStack() as stack:
    cfg, state = open_hf_dir(path, stack)
    return cfg, {k: v.read() for k, v in state.items()}


# ------------------------------------------------------------------------------------------------
# config
# ------------------------------------------------------------------------------------------------
def image_token_id(hf: Dict[str, Any]) -> Optional[int]:
  for k in ("image_token_id", "image_token_index"):
    if hf.get(k) is not None:
      return int(hf[k])
  return None


def real_vocab_size(hf: Dict[str, Any]) -> int:
  """Rows of the HF embedding that big_vision has: those before `<image>` and its padding.

  HF appends `<image>` after the real vocabulary and pads to a multiple of 64, so when the image
  token sits in that trailing block (< 128 ids from the end) the vocabulary ends at it; otherwise
  (e.g. the image token inside the vocabulary) the full embedding is kept.
  """
  v = int(hf["text_config"]["vocab_size"])
  img = image_token_id(hf)
  if img is not None and 0 < img < v and v - img <= 128:
    return img
  return v


def config_from_hf(hf: Dict[str, Any], *, vocab_size: Optional[int] = None,
                   plan=()) -> PaliGemmaConfig:
  """PaliGemmaConfig from a HF PaliGemma config.json dict."""
  if hf.get("model_type") not in (None, "paligemma"):
    raise ValueError(f"config.json model_type is {hf.get('model_type')!r}, not 'paligemma'")
  vc, tc = hf["vision_config"], hf["text_config"]
  act = vc.get("hidden_act", "gelu_pytorch_tanh")
  if act not in _TANH_GELUS:
    raise ValueError(f"vision_config.hidden_act={act!r}; tcjax's SigLIP uses tanh-GELU")
  img = SiglipConfig(width=vc["hidden_size"], depth=vc["num_hidden_layers"],
                     mlp_dim=vc["intermediate_size"], num_heads=vc["num_attention_heads"],
                     patch_size=vc["patch_size"], image_size=vc["image_size"],
                     norm_eps=vc.get("layer_norm_eps", 1e-6))

  mt = tc.get("model_type", "gemma")
  if mt not in ("gemma", "gemma2"):
    raise ValueError(f"text_config.model_type={mt!r}; supported: 'gemma', 'gemma2'")
  act = tc.get("hidden_activation") or tc.get("hidden_act") or "gelu_pytorch_tanh"
  if act not in _TANH_GELUS:
    raise ValueError(f"text_config.hidden_activation={act!r}; tcjax's Gemma uses tanh-GELU")
  heads = tc["num_attention_heads"]
  head_dim = tc.get("head_dim") or tc["hidden_size"] // heads
  rope = tc.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default":
    raise ValueError(f"text_config rope_type={rope.get('rope_type')!r}; only 'default' RoPE")
  rope_base = rope.get("rope_theta", tc.get("rope_theta", 10_000.0))
  kw = dict(version=1 if mt == "gemma" else 2,
            vocab_size=vocab_size if vocab_size is not None else real_vocab_size(hf),
            width=tc["hidden_size"], depth=tc["num_hidden_layers"],
            mlp_dim=tc["intermediate_size"], num_heads=heads,
            num_kv_heads=tc.get("num_key_value_heads") or heads, head_dim=head_dim,
            norm_eps=tc.get("rms_norm_eps", 1e-6), rope_base=float(rope_base))
  if mt == "gemma2":
    types = tc.get("layer_types")
    window = tc.get("sliding_window")
    expect = ["sliding_attention" if i % 2 == 0 else "full_attention"
              for i in range(tc["num_hidden_layers"])]
    if window is not None and types is not None and list(types) != expect:
      raise ValueError(f"text_config.layer_types={types}; tcjax's Gemma 2 alternates local "
                       "(even layers) and global attention")
    kw.update(query_pre_attn_scalar=tc.get("query_pre_attn_scalar", head_dim),
              attn_logits_softcap=tc.get("attn_logit_softcapping"),
              final_logits_softcap=tc.get("final_logit_softcapping"),
              sliding_window=window)
  llm = GemmaConfig(**kw)
  proj = vc.get("projection_dim", hf.get("projection_dim"))
  if proj is not None and proj != llm.width:
    raise ValueError(f"projector width {proj} != text hidden_size {llm.width}")
  return PaliGemmaConfig(img=img, llm=llm, plan=tuple(plan))


# ------------------------------------------------------------------------------------------------
# names
# ------------------------------------------------------------------------------------------------
_LAYOUT = [  # (pattern, replacement) applied in order; result is the canonical layout.
    (re.compile(r"^model\."), ""),
    (re.compile(r"^language_model\.model\."), "language_model."),
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^vision_tower\.vision_model\."), "vision_tower."),
]


def canonical_name(name: str) -> str:
  """Any transformers-release layout -> `language_model.*`, `vision_tower.*`, `lm_head.*`,
  `multi_modal_projector.*`."""
  for pat, rep in _LAYOUT:
    name = pat.sub(rep, name)
  return name


def _no_frame_table(config: PaliGemmaConfig):
  if config.frame_embedding:
    raise ValueError(f"frame_embedding={config.frame_embedding}: HF PaliGemma has no frame "
                     "embedding table (llm/frame_embedding), so this model has no HF form; "
                     "keep it as a big_vision .npz")


def hf_shapes(config: PaliGemmaConfig, hf_vocab: int) -> Dict[str, Tuple[int, ...]]:
  """Canonical HF names and shapes for `config` (the HF embedding has `hf_vocab` rows).
  ValueError for a config with a frame table (`frame_embedding` > 0): HF has none."""
  _no_frame_table(config)
  v, g = config.img, config.llm
  D, M, p = v.width, v.mlp_dim, v.patch_size
  s = {
      "vision_tower.embeddings.patch_embedding.weight": (D, 3, p, p),
      "vision_tower.embeddings.patch_embedding.bias": (D,),
      "vision_tower.embeddings.position_embedding.weight": (v.num_patches, D),
      "vision_tower.post_layernorm.weight": (D,),
      "vision_tower.post_layernorm.bias": (D,),
      "multi_modal_projector.linear.weight": (g.width, D),
      "multi_modal_projector.linear.bias": (g.width,),
      "language_model.embed_tokens.weight": (hf_vocab, g.width),
      "language_model.norm.weight": (g.width,),
  }
  for i in range(v.depth):
    b = f"vision_tower.encoder.layers.{i}."
    for n in ("layer_norm1", "layer_norm2"):
      s[b + n + ".weight"] = (D,)
      s[b + n + ".bias"] = (D,)
    for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
      s[b + f"self_attn.{n}.weight"] = (D, D)
      s[b + f"self_attn.{n}.bias"] = (D,)
    s[b + "mlp.fc1.weight"] = (M, D)
    s[b + "mlp.fc1.bias"] = (M,)
    s[b + "mlp.fc2.weight"] = (D, M)
    s[b + "mlp.fc2.bias"] = (D,)
  E, F, H, K, hd = g.width, g.mlp_dim, g.num_heads, g.num_kv_heads, g.head_dim
  norms = ["input_layernorm", "post_attention_layernorm"]
  if g.version == 2:
    norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"]
  for i in range(g.depth):
    b = f"language_model.layers.{i}."
    for n in norms:
      s[b + n + ".weight"] = (E,)
    s[b + "self_attn.q_proj.weight"] = (H * hd, E)
    s[b + "self_attn.k_proj.weight"] = (K * hd, E)
    s[b + "self_attn.v_proj.weight"] = (K * hd, E)
    s[b + "self_attn.o_proj.weight"] = (E, H * hd)
    s[b + "mlp.gate_proj.weight"] = (F, E)
    s[b + "mlp.up_proj.weight"] = (F, E)
    s[b + "mlp.down_proj.weight"] = (E, F)
  return s


def _rows(x, start: int, stop: int) -> np.ndarray:
  """Rows [start, stop) of an array or a stored tensor (reading only those)."""
  return x.rows(start, stop) if isinstance(x, _Stored) else _tree.read(x)[start:stop]


def _tied(a, b, block: int = 4096) -> bool:
  """np.array_equal(a, b), reading `block` rows of each at a time (embeddings are large)."""
  shape = tuple(np.shape(a))
  if shape != tuple(np.shape(b)):
    return False
  if not shape:
    return np.array_equal(_tree.read(a), _tree.read(b))
  return all(np.array_equal(_rows(a, i, i + block), _rows(b, i, i + block))
             for i in range(0, shape[0], block))


def _conversions(config: PaliGemmaConfig) -> Dict[str, Callable[[Mapping[str, Any]], np.ndarray]]:
  """{big_vision name: fn(state) -> that parameter} over a canonical-name, validated HF state.

  State values may be arrays or not-yet-read tensors: each fn reads only the tensors its one
  parameter is made of, so parameters can be converted and placed one at a time.
  """
  _no_frame_table(config)
  v, g = config.img, config.llm
  D, H = v.width, v.num_heads
  hd = D // H
  same = lambda w: w

  def one(name, fn=same):
    return lambda state: fn(_tree.read(state[name]))

  def stack(fmt, n, fn=same):  # per-layer tensors -> one array with layers stacked first
    return lambda state: np.stack([fn(_tree.read(state[fmt.format(i)])) for i in range(n)])

  out = {}
  vt = "vision_tower."
  out["img/embedding/kernel"] = one(vt + "embeddings.patch_embedding.weight",
                                    lambda w: w.transpose(2, 3, 1, 0))
  out["img/embedding/bias"] = one(vt + "embeddings.patch_embedding.bias")
  out["img/pos_embedding"] = one(vt + "embeddings.position_embedding.weight", lambda w: w[None])
  out["img/Transformer/encoder_norm/scale"] = one(vt + "post_layernorm.weight")
  out["img/Transformer/encoder_norm/bias"] = one(vt + "post_layernorm.bias")
  out["img/head/kernel"] = one("multi_modal_projector.linear.weight", lambda w: w.T)
  out["img/head/bias"] = one("multi_modal_projector.linear.bias")

  blk = "img/Transformer/encoderblock/"
  vl = vt + "encoder.layers.{}."
  for ln, hn in (("LayerNorm_0", "layer_norm1"), ("LayerNorm_1", "layer_norm2")):
    out[blk + ln + "/scale"] = stack(vl + hn + ".weight", v.depth)
    out[blk + ln + "/bias"] = stack(vl + hn + ".bias", v.depth)
  mha = blk + "MultiHeadDotProductAttention_0/"
  for bn, hn in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    out[mha + bn + "/kernel"] = stack(vl + f"self_attn.{hn}.weight", v.depth,
                                      lambda w: w.T.reshape(D, H, hd))
    out[mha + bn + "/bias"] = stack(vl + f"self_attn.{hn}.bias", v.depth,
                                    lambda b: b.reshape(H, hd))
  out[mha + "out/kernel"] = stack(vl + "self_attn.out_proj.weight", v.depth,
                                  lambda w: w.T.reshape(H, hd, D))
  out[mha + "out/bias"] = stack(vl + "self_attn.out_proj.bias", v.depth)
  for bn, hn in (("Dense_0", "fc1"), ("Dense_1", "fc2")):
    out[blk + f"MlpBlock_0/{bn}/kernel"] = stack(vl + f"mlp.{hn}.weight", v.depth, lambda w: w.T)
    out[blk + f"MlpBlock_0/{bn}/bias"] = stack(vl + f"mlp.{hn}.bias", v.depth)

  E, Hg, K, hg, V = g.width, g.num_heads, g.num_kv_heads, g.head_dim, g.vocab_size
  out["llm/embedder/input_embedding"] = (
      lambda state: _rows(state["language_model.embed_tokens.weight"], 0, V))
  out["llm/final_norm/scale"] = one("language_model.norm.weight")
  ll = "language_model.layers.{}."
  lay = "llm/layers/"
  if g.version == 1:
    norms = {"pre_attention_norm": "input_layernorm", "pre_ffw_norm": "post_attention_layernorm"}
  else:
    norms = {"pre_attention_norm": "input_layernorm",
             "post_attention_norm": "post_attention_layernorm",
             "pre_ffw_norm": "pre_feedforward_layernorm",
             "post_ffw_norm": "post_feedforward_layernorm"}
  for bn, hn in norms.items():
    out[lay + bn + "/scale"] = stack(ll + hn + ".weight", g.depth)
  # torch [heads * hd, E] -> big_vision [heads, E, hd]
  heads_first = lambda n: (lambda w: w.reshape(n, hg, E).transpose(0, 2, 1))
  q = stack(ll + "self_attn.q_proj.weight", g.depth, heads_first(Hg))
  k = stack(ll + "self_attn.k_proj.weight", g.depth, heads_first(K))
  vv = stack(ll + "self_attn.v_proj.weight", g.depth, heads_first(K))
  if K == Hg:
    out[lay + "attn/qkv_einsum/w"] = lambda state: np.stack([q(state), k(state), vv(state)], 1)
  else:
    out[lay + "attn/q_einsum/w"] = q
    out[lay + "attn/kv_einsum/w"] = lambda state: np.stack([k(state), vv(state)], 1)
  out[lay + "attn/attn_vec_einsum/w"] = stack(ll + "self_attn.o_proj.weight", g.depth,
                                              lambda w: w.reshape(E, Hg, hg).transpose(1, 2, 0))
  gate = stack(ll + "mlp.gate_proj.weight", g.depth, lambda w: w.T)
  up = stack(ll + "mlp.up_proj.weight", g.depth, lambda w: w.T)
  out[lay + "mlp/gating_einsum"] = lambda state: np.stack([gate(state), up(state)], 1)
  out[lay + "mlp/linear"] = stack(ll + "mlp.down_proj.weight", g.depth, lambda w: w.T)
  return out


def hf_to_big_vision(state: Dict[str, np.ndarray], config: PaliGemmaConfig
                     ) -> Dict[str, np.ndarray]:
  """Canonical-name HF state dict (already validated) -> flat big_vision tree."""
  return {name: fn(state) for name, fn in _conversions(config).items()}


def convert_state(state: Dict[str, Any], config: PaliGemmaConfig, hf_vocab: int, *,
                  ignore_vision_head: bool = False, source: str = "HF checkpoint",
                  deferred: bool = False) -> Dict[str, Any]:
  """Validates a HF state dict (any key layout) and maps it to the flat big_vision tree.

  state values: arrays, or not-yet-read tensors (`open_hf_dir`). deferred: return
  `tree.Deferred` leaves that convert their parameter when read, instead of arrays.
  Raises ONE ValueError naming (in HF's names) every missing, unexpected or mis-shaped tensor.
  """
  canon: Dict[str, np.ndarray] = {}
  origin: Dict[str, str] = {}
  clashes = []
  for name, a in state.items():
    c = canonical_name(name)
    if c in canon:
      clashes.append(f"{origin[c]} and {name}")
    canon[c] = a
    origin[c] = name
  if clashes:
    raise ValueError(f"{source}: the same tensor under two key layouts: {clashes}")
  if ignore_vision_head:  # SigLIP's MAP head: present when vision_use_head, unused by PaliGemma
    canon = {k: a for k, a in canon.items() if not k.startswith("vision_tower.head.")}
  lm_head = canon.pop("lm_head.weight", None)
  expected = hf_shapes(config, hf_vocab)
  _tree.check_flat(canon, expected, source=source)
  if lm_head is not None and not _tied(lm_head, canon["language_model.embed_tokens.weight"]):
    raise ValueError(f"{source}: lm_head.weight differs from the input embedding; tcjax ties "
                     "the output embedding to the input embedding")
  if config.llm.vocab_size > hf_vocab:
    raise ValueError(f"vocab_size={config.llm.vocab_size} > the {hf_vocab} embedding rows")
  if not deferred:
    return hf_to_big_vision(canon, config)
  shapes = _tree.param_shapes(config)
  return {name: _tree.Deferred(shapes[name], functools.partial(fn, canon))
          for name, fn in _conversions(config).items()}


def load_hf(path: str, *, dtype=None, vocab_size: Optional[int] = None, plan=(), mesh=None,
            rules=None, fsdp_axis="data") -> Tuple[Any, Dict[str, Any]]:
  """Loads a HF `PaliGemmaForConditionalGeneration.save_pretrained` directory, one big_vision
  parameter at a time (each read from the memory-mapped files, converted and placed).

  Args:
    path: directory with config.json and model.safetensors (or sharded safetensors + index).
    dtype: cast every parameter ("float32", "bfloat16", ...); None keeps the stored dtype.
    vocab_size: rows of the embedding to keep; None slices off `<image>` and HF's padding rows
      (`real_vocab_size`).
    plan: the compression plan of the returned model's config.
    mesh, rules, fsdp_axis: place each parameter straight into its sharding, as
      `load_big_vision` does. Both or neither.

  Returns:
    (model, params): `tcjax.nn.PaliGemma` and big_vision-named params.

  Raises:
    ValueError naming every missing, unexpected or wrongly shaped tensor (nothing is loaded then),
    or naming the file (and the tensor) when config.json, the index or a safetensors file is
    damaged.
  """
  path = os.fspath(path)
  with contextlib.ExitStack() as stack:  # the safetensors files stay open until all is placed
    hf, state = open_hf_dir(path, stack)
    cfg_file = os.path.join(path, "config.json")
    try:
      config = config_from_hf(hf, vocab_size=vocab_size)
      hf_vocab = int(hf["text_config"]["vocab_size"])
      use_head = bool(hf["vision_config"].get("vision_use_head", False))
    except KeyError as e:
      raise ValueError(f"{cfg_file}: required field {e} is missing") from e
    except (TypeError, AttributeError, ValueError) as e:
      raise ValueError(f"{cfg_file}: {e}") from e
    if plan:  # outside the try: a bad plan is not config.json's fault
      config = dataclasses.replace(config, plan=tuple(plan))
    source = f"HF checkpoint {path!r}"
    flat = convert_state(state, config, hf_vocab, ignore_vision_head=use_head, source=source,
                         deferred=True)
    return _bv.finish(flat, config, dtype=dtype, source=source, mesh=mesh, rules=rules,
                      fsdp_axis=fsdp_axis)
