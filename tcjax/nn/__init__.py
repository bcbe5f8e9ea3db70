"""Flax Linen PaliGemma (SigLIP + Gemma 1/2) with compression hook points."""

from tcjax.nn.config import GemmaConfig, PaliGemmaConfig, SiglipConfig
from tcjax.nn.paligemma import PaliGemma
from tcjax.nn.params import param_shapes
from tcjax.nn.plan import normalize as normalize_plan

__all__ = ["GemmaConfig", "PaliGemma", "PaliGemmaConfig", "SiglipConfig", "normalize_plan",
           "param_shapes"]
