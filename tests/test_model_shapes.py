"""Full-size PaliGemma variants, by shape only (`jax.eval_shape`: nothing is allocated).

Parameter counts are checked against HF transformers' PaliGemma built on the meta device (an
independent implementation of the same architecture) and against the published sizes.
"""

import numpy as np
import jax
import jax.numpy as jnp
import pytest
import torch
import transformers

import tcjax.checkpoints as ckpt
from tcjax.nn import GemmaConfig, PaliGemma, PaliGemmaConfig, SiglipConfig

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
              num_attention_heads=16, patch_size=14, vision_use_head=False)
VARIANTS = {
    # name: (tcjax Gemma preset, HF text config, published total in billions)
    "paligemma-3b": ("gemma_2b", dict(model_type="gemma", hidden_size=2048,
                                      intermediate_size=16384, num_hidden_layers=18,
                                      num_attention_heads=8, num_key_value_heads=1,
                                      head_dim=256), 2.92),
    "paligemma2-3b": ("gemma2_2b", dict(model_type="gemma2", hidden_size=2304,
                                        intermediate_size=9216, num_hidden_layers=26,
                                        num_attention_heads=8, num_key_value_heads=4,
                                        head_dim=256), 3.03),
}
VOCAB, HF_VOCAB = 257152, 257216  # HF adds <image> and pads to a multiple of 64


def hf_param_count(text, image_size):
  vision = dict(SO400M, image_size=image_size)
  cfg = transformers.PaliGemmaConfig(vision_config=vision,
                                     text_config=dict(text, vocab_size=HF_VOCAB),
                                     projection_dim=text["hidden_size"])
  with torch.device("meta"):
    model = transformers.PaliGemmaForConditionalGeneration(cfg)
  return sum(p.numel() for p in model.parameters())  # the tied lm_head counts once


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("image_size", [224, 448])
def test_param_count_matches_hf_and_published(name, image_size):
  preset, text, published = VARIANTS[name]
  config = PaliGemmaConfig(img=SiglipConfig.from_variant("So400m/14", image_size=image_size),
                           llm=GemmaConfig.from_variant(preset))
  model = PaliGemma(config)
  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), image, tokens)["params"]
  count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
  want = hf_param_count(text, image_size) - (HF_VOCAB - VOCAB) * text["hidden_size"]
  assert count == want
  assert abs(count / 1e9 - published) < 0.01
  assert {k: tuple(v.shape) for k, v in ckpt.flatten(shapes).items()} == ckpt.param_shapes(config)


def test_full_size_forward_shapes():
  config = PaliGemmaConfig(img=SiglipConfig.from_variant("So400m/14"),
                           llm=GemmaConfig.from_variant("gemma2_2b"),
                           plan=(("llm", {"method": "fastv", "layer": 2, "keep": 0.5}),))
  model = PaliGemma(config)
  params = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32),
                          jax.ShapeDtypeStruct((1, 8), jnp.int32))
  logits, aux = jax.eval_shape(model.apply, params,
                               jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32),
                               jax.ShapeDtypeStruct((2, 10), jnp.int32))
  assert logits.shape == (2, 10, VOCAB)
  assert len(aux["llm_tokens"]) == 26 and aux["llm_valid_tokens"].shape == (2, 26)
