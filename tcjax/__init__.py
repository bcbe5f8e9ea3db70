"""tcjax: visual-token compression for PaliGemma-style multimodal models, in JAX."""

from tcjax.tokens import Tokens
from tcjax import compress
from tcjax.nn.sampling import generate

__all__ = ["Tokens", "compress", "generate"]
