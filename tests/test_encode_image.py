"""PaliGemma.encode_image / embed_image(encoded=) / prefill(image_tokens=): starting from the
shared ViT output or from projected image tokens gives what the image path gives, and
mismatched inputs are refused."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tcjax
from tcjax.nn import GemmaConfig, PaliGemma, PaliGemmaConfig, SiglipConfig

MODEL = PaliGemma(PaliGemmaConfig(
    img=SiglipConfig(width=16, depth=3, mlp_dim=32, num_heads=2, patch_size=4, image_size=16),
    llm=GemmaConfig(width=16, depth=2, mlp_dim=32, num_heads=2, num_kv_heads=1, head_dim=8,
                    vocab_size=32)))
TEXT = np.array([[2, 5, 6, 7], [2, 8, 9, 0]], np.int32)
MASK = TEXT != 0
PARAMS = jax.jit(MODEL.init)(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32),
                             TEXT[:1])["params"]
V = {"params": PARAMS}


def _image(clip: bool):
  shape = (2, 2, 16, 16, 3) if clip else (2, 16, 16, 3)
  return np.random.default_rng(1).uniform(-1, 1, shape).astype(np.float32)


VISIONZIP = (("post_vit", {"method": "visionzip", "budget": 8}),)  # signals of ViT layer -2
PRUMERGE = (("post_vit", {"method": "prumerge", "budget": 8}),)  # signals of ViT layer -1
POOL_TEXT = (("post_vit", {"method": "pool", "budget": 8}),  # 2 x 2 per frame of a clip
             ("post_proj", {"method": "text_relevance", "budget": 3}))  # text


@pytest.mark.parametrize("plan, clip", [((), False), (VISIONZIP, False), (VISIONZIP, True),
                                        (PRUMERGE, False), (POOL_TEXT, True)])
def test_encoded_equals_image_path(plan, clip):
  image = _image(clip)
  m = MODEL.with_plan(plan)
  zimg, tokens, aux = m.apply(V, image, TEXT, None, MASK, method=m.embed_image)
  # One ViT run for plans reading different layers (VisionZip -2, PruMerge -1).
  enc = MODEL.apply(V, image, signal_layers=(-2, -1), method=MODEL.encode_image)
  assert enc.signal_layers == (1, 2) and enc.frames == (2 if clip else None)
  assert set(enc.signals) == {1, 2} and enc.signals[2]["keys_heads"].shape[2:] == (2, 8)
  zimg2, tokens2, aux2 = m.apply(V, None, TEXT, None, MASK, encoded=enc, method=m.embed_image)
  np.testing.assert_allclose(zimg2, zimg, atol=1e-5)
  np.testing.assert_array_equal(tokens2.pos, tokens.pos)
  np.testing.assert_array_equal(tokens2.src, tokens.src)
  assert aux2["vit_tokens"] == aux["vit_tokens"] == (16, 16, 16)
  # The decoder from the projected tokens: the same greedy tokens as from the image.
  want = tcjax.generate(m, PARAMS, image, TEXT, max_new_tokens=2, prefix_mask=MASK)
  got = tcjax.generate(MODEL, PARAMS, None, TEXT, max_new_tokens=2, prefix_mask=MASK,
                       image_tokens=tokens2)
  np.testing.assert_array_equal(got, want)


def test_llm_stage_acts_on_given_image_tokens():
  plan = (("llm", {"method": "fastv", "layer": 1, "budget": 4}),)
  m = MODEL.with_plan(plan)
  image = _image(False)
  _, tokens, _ = MODEL.apply(V, image, method=MODEL.embed_image)
  want, _, aux = m.apply(V, image, TEXT, None, MASK, method=m.prefill)
  got, _, aux2 = m.apply(V, None, TEXT, None, MASK, image_tokens=tokens, method=m.prefill)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert aux2["llm_tokens"] == aux["llm_tokens"] == (20, 8)
  assert aux2["image_tokens"] == 16


def test_mismatches_are_refused():
  image = _image(False)
  plain = MODEL.apply(V, image, method=MODEL.encode_image)  # no signals
  assert plain.signal_layers == () and plain.signals == {}
  m = MODEL.with_plan(VISIONZIP)
  with pytest.raises(ValueError, match=r"signals of ViT layer\(s\) \[1\]"):
    m.apply(V, None, encoded=plain, method=m.embed_image)
  penultimate = MODEL.apply(V, image, signal_layers=-2, method=MODEL.encode_image)
  m = MODEL.with_plan(PRUMERGE)  # reads the last layer, which `penultimate` lacks
  with pytest.raises(ValueError, match=r"layer\(s\) \[2\], encoded carries \[1\]"):
    m.apply(V, None, encoded=penultimate, method=m.embed_image)
  tome = MODEL.with_plan((("vit", {"method": "tome", "r": 2}),))
  with pytest.raises(ValueError, match="vit stage"):
    tome.apply(V, None, encoded=plain, method=tome.embed_image)
  with pytest.raises(ValueError, match="image=None"):
    MODEL.apply(V, image, encoded=plain, method=MODEL.embed_image)
  _, tokens, _ = MODEL.apply(V, image, method=MODEL.embed_image)
  with pytest.raises(ValueError, match="image=None"):
    MODEL.apply(V, image, TEXT, image_tokens=tokens, method=MODEL.prefill)
  with pytest.raises(ValueError, match="must be Tokens"):
    MODEL.apply(V, None, TEXT, image_tokens=jnp.zeros((2, 16, 16)), method=MODEL.prefill)
