"""Static model configurations: SigLIP ViT, Gemma 1/2 decoder, PaliGemma.

Frozen dataclasses, hashable, so a config (and a compression plan) can be a static argument
under `jax.jit`. Variant strings follow big_vision (`So400m/14`, `B/16`) and Gemma names.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Tuple

# name -> (width, depth, mlp_dim, num_heads), as in big_vision's vit.decode_variant.
_VIT_SIZES = {
    "mu": (32, 1, 128, 2),  # tiny, for tests
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
}


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
  """SigLIP ViT image tower (no pooling head: all patch tokens are kept)."""

  width: int = 1152
  depth: int = 27
  mlp_dim: int = 4304
  num_heads: int = 16
  patch_size: int = 14
  image_size: int = 224
  norm_eps: float = 1e-6
  remat: bool = False  # recompute layer activations in the backward pass (training memory)

  @classmethod
  def from_variant(cls, variant: str, image_size: int = 224, **overrides) -> "SiglipConfig":
    """`variant` like "So400m/14" or "B/16"."""
    try:
      name, patch = variant.split("/")
      width, depth, mlp, heads = _VIT_SIZES[name]
      patch = int(patch)
    except (ValueError, KeyError):
      raise ValueError(f"unknown ViT variant {variant!r}; sizes: {sorted(_VIT_SIZES)}")
    return cls(width=width, depth=depth, mlp_dim=mlp, num_heads=heads, patch_size=patch,
               image_size=image_size, **overrides)

  @property
  def grid(self) -> Tuple[int, int]:
    g = self.image_size // self.patch_size
    return g, g

  @property
  def num_patches(self) -> int:
    return self.grid[0] * self.grid[1]


@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """Gemma decoder. version 1 = Gemma (PaliGemma), 2 = Gemma 2 (PaliGemma 2)."""

  version: int = 1
  vocab_size: int = 257152
  width: int = 2048
  depth: int = 18
  mlp_dim: int = 16384
  num_heads: int = 8
  num_kv_heads: int = 1
  head_dim: int = 256
  norm_eps: float = 1e-6
  rope_base: float = 10_000.0
  # Gemma 2 only (None / 0 = off):
  query_pre_attn_scalar: Optional[float] = None  # queries scaled by this ** -0.5; None: head_dim
  attn_logits_softcap: Optional[float] = None
  final_logits_softcap: Optional[float] = None
  sliding_window: Optional[int] = None  # local layers (even layer indices in Gemma 2)
  remat: bool = False  # recompute layer activations in the backward pass (training memory)

  @classmethod
  def from_variant(cls, variant: str, **overrides) -> "GemmaConfig":
    presets = {
        "gemma_2b": dict(version=1, width=2048, depth=18, mlp_dim=16384, num_heads=8,
                         num_kv_heads=1, head_dim=256),
        "gemma2_2b": dict(version=2, width=2304, depth=26, mlp_dim=9216, num_heads=8,
                          num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256,
                          attn_logits_softcap=50.0, final_logits_softcap=30.0,
                          sliding_window=4096),
        "gemma2_9b": dict(version=2, width=3584, depth=42, mlp_dim=14336, num_heads=16,
                          num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256,
                          attn_logits_softcap=50.0, final_logits_softcap=30.0,
                          sliding_window=4096),
    }
    if variant not in presets:
      raise ValueError(f"unknown Gemma variant {variant!r}; known: {sorted(presets)}")
    return cls(**{**presets[variant], **overrides})


@dataclasses.dataclass(frozen=True)
class PaliGemmaConfig:
  """SigLIP -> linear projector (`img/head`) -> Gemma, with a static compression plan.

  plan: ordered tuple of (stage, options) pairs (see `tcjax.nn.plan` and docs/architecture.md); options may be
  given as dicts: they are validated and stored as sorted (key, value) tuples, so the config
  stays hashable and can be a static argument under `jax.jit`.

  frame_embedding: rows K of a learned table `llm/frame_embedding` float[K, E] (E = llm.width)
  whose row f is added to the decoder input of every visual token of frame f of a clip or
  spectrogram (`PaliGemma.embed_image_and_text`); 0 (default) = no table, images never get one.
  Why: RoPE rotates queries and keys only, so a token's position shapes the attention scores
  but never the values attended to; without this table a question whose answer is a frame
  index ("when does the square appear") can read the frame only from where attention falls.
  """

  img: SiglipConfig = SiglipConfig()
  llm: GemmaConfig = GemmaConfig()
  plan: Tuple[Tuple[str, Tuple[Tuple[str, Any], ...]], ...] = ()
  # Encode a clip's frames in this many sequential chunks (memory for ViT activations / chunks).
  frame_chunks: int = 1
  frame_embedding: int = 0

  def __post_init__(self):
    from tcjax.nn import plan as plan_lib  # pylint: disable=g-import-not-at-top
    object.__setattr__(self, "plan", plan_lib.normalize(self.plan))
    if isinstance(self.frame_chunks, bool) or not isinstance(self.frame_chunks, int) \
        or self.frame_chunks < 1:
      raise ValueError(f"frame_chunks must be a positive int, got {self.frame_chunks!r}")
    if isinstance(self.frame_embedding, bool) or not isinstance(self.frame_embedding, int) \
        or self.frame_embedding < 0:
      raise ValueError(f"frame_embedding must be an int >= 0 (rows of the frame table, 0 = "
                       f"none), got {self.frame_embedding!r}")
