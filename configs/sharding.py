"""Default mesh and PaliGemma parameter-sharding rules (big_vision tree paths; first match wins).

Shapes (stacked layers L): llm/layers/attn/q_einsum/w [L,H,D,Dh], kv_einsum/w [L,2,KVH,D,Dh],
attn_vec_einsum/w [L,H,Dh,D], mlp/gating_einsum [L,2,D,F], mlp/linear [L,F,D],
embedder/input_embedding [V,D]; img/Transformer/encoderblock/... stacked over depth.
"""

import ml_collections
from jax.sharding import PartitionSpec as P

PALIGEMMA_RULES = (
    # Large matrices: FSDP over the data axis (largest divisible dim).
    (r"llm/embedder/input_embedding", "fsdp"),
    (r"llm/layers/attn/(q_einsum|kv_einsum|attn_vec_einsum)/w", "fsdp"),
    (r"llm/layers/mlp/(gating_einsum|linear)", "fsdp"),
    (r"img/Transformer/encoderblock/.*/kernel", "fsdp"),
    (r"img/embedding/kernel", "fsdp"),
    (r"img/head/kernel", "fsdp"),
    # Norm scales, biases, position embeddings: small, replicate.
    (r".*", "replicate"),
)

# Tensor-parallel variant over a "tensor" axis (heads / hidden features).
PALIGEMMA_TENSOR_RULES = (
    (r"llm/layers/attn/q_einsum/w", P(None, "tensor", None, None)),
    (r"llm/layers/attn/kv_einsum/w", P(None, None, "tensor", None, None)),
    (r"llm/layers/attn/attn_vec_einsum/w", P(None, "tensor", None, None)),
    (r"llm/layers/mlp/gating_einsum", P(None, None, None, "tensor")),
    (r"llm/layers/mlp/linear", P(None, "tensor", None)),
    (r"llm/embedder/input_embedding", "fsdp"),
    (r".*", "replicate"),
)


def get_config():
  cfg = ml_collections.ConfigDict()
  cfg.mesh = (("data", 2), ("seq", -1))
  cfg.axis_types = "explicit"
  cfg.fsdp_axis = "data"
  cfg.rules = PALIGEMMA_RULES
  return cfg
