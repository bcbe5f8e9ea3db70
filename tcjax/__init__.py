"""tcjax: visual-token compression for PaliGemma-style multimodal models, in JAX."""

from tcjax.tokens import Tokens
from tcjax import compress
from tcjax.nn.sampling import generate
# An attribute of the package, so that `import tcjax; tcjax.checkpoints.load_hf(...)` works.
from tcjax import checkpoints

__all__ = ["Tokens", "checkpoints", "compress", "generate"]
