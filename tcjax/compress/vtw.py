"""VTW: every visual token withdrawn from the decoder at layer K.

Lin et al., "Boosting Multimodal Large Language Models with Visual Tokens Withdrawal for Rapid
Inference", arXiv 2405.05803, AAAI 2025 (official code: lzhxmu/VTW,
`llava/model/language_model/VTW.py`).

Axis legend: B batch, N visual tokens, M original patches, D features, V vocabulary,
S calibration samples, C candidate layers.

Official behaviour (followed here), with the plan entry `("llm", {"method": "vtw", "layer": K,
"budget": 1})`:
  1. At the input of decoder layer K, during prefill, all visual tokens leave the hidden states
     and `position_ids` (LLaVA-1.5's span [35, 611) is hard-coded); with the default
     `pe_type="keep"` the text keeps its original positions.
  2. Layers >= K run on the text alone and their KV caches never hold a visual entry; layers < K
     keep the full sequence and cache.
  3. Decoding continues at the original length (positions come from the generation loop).
  No signal is read: K is the only knob (`temp_cache.k = 15` and the README's `--k=15` for
  LLaVA-1.5-7B, 32 layers; the argparse default is 16). Under PaliGemma's prefix-LM the text has
  attended to the image bidirectionally in layers < K; the official LLaVA is causal.

Static shapes: the contract has every method return `budget >= 1` tokens, so VTW returns
`budget` slots that are all padding (mask False, size 0, zero features, and `src` all -1: no
patch is carried). The decoder masks padding out of every later layer's attention and KV cache,
so the text computes exactly what it computes with the visual tokens deleted; the price is
`budget` inert slots per layer >= K (one with budget=1, the smallest capacity; a larger budget
only adds padding). Expressed this way, withdrawal needs no change to the model or to the
in-LLM hook protocol: any pruning step may leave padding behind.

The official alternative `pe_type` (re-index the text at layer K and decode from that layer's
cache length) is the plan entry's `positions="reindex"`; the default, "original", is
`pe_type="keep"`. Not ported (not the official default): `mode="random"` (an ablation dropping
as many random tokens of the whole sequence, text included, as there are visual tokens).

Finding K (official `--findk`, `lmms_eval/__main__.py`): for each candidate layer 5..L-1 run the
prompt with withdrawal at that layer and take the last token's logits; `withdrawal_kl` compares
them with the full model's; average over a few calibration samples (README: 20 ScienceQA-IMG
questions); K = the first candidate whose mean divergence is <= eta (`first_layer_within`;
eta = 0.003 for LLaVA-1.5-7B, 0.0005 for 13B, 0.0001 for LLaVA-1.6-Vicuna-7B - calibrate your
own for Gemma depths).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tcjax.compress import primitives as P
from tcjax.compress.registry import register
from tcjax.parallel.mesh import like_batch


@register("vtw", family="sampling", stages=("llm",),
          paper="VTW, Lin et al., arXiv 2405.05803 (AAAI 2025)", token_sharded=True,
          keeps_none=True)
def vtw(tokens, budget):
  """Withdraw every visual token: `budget` padding slots, no token kept.

  Args:
    tokens: N visual tokens (the hidden states entering decoder layer K).
    budget: static capacity of the all-padding output; 1 is the official VTW (module docstring).

  Returns:
    `budget` padding tokens (mask False, size 0, zero x and pos) and `src` all -1.
  """
  name = "vtw"
  P.check_tokens(tokens, name)
  budget = P.check_budget(tokens, budget, name)
  b, _, d = tokens.x.shape
  batched = lambda a, ref: like_batch(a, ref)  # Explicit meshes: batch-sharded like the input
  return tokens.replace(
      x=batched(jnp.zeros((b, budget, d), tokens.x.dtype), tokens.x),
      pos=batched(jnp.zeros((b, budget, 3), jnp.int32), tokens.x),
      size=batched(jnp.zeros((b, budget), jnp.float32), tokens.x),
      mask=batched(jnp.zeros((b, budget), bool), tokens.x),
      src=batched(jnp.full(tokens.src.shape, -1, jnp.int32), tokens.x))


def withdrawal_kl(full_logits, withdrawn_logits) -> jax.Array:
  """float32[] the official K-search divergence of one batch of prompts.

  `nn.KLDivLoss(reduction="batchmean")(log_softmax(full), softmax(withdrawn))`: the mean over the
  batch of KL(p_withdrawn || p_full), from the last prompt token's logits.

  Args:
    full_logits: float[B, V] logits of the model without withdrawal.
    withdrawn_logits: float[B, V] logits with withdrawal at the candidate layer.
  """
  full = P.check_array(full_logits, "full_logits", "vtw", (None, None)).astype(jnp.float32)
  cand = P.check_array(withdrawn_logits, "withdrawn_logits", "vtw",
                       full.shape).astype(jnp.float32)
  log_q = jax.nn.log_softmax(cand, -1)
  kl = jnp.sum(jnp.exp(log_q) * (log_q - jax.nn.log_softmax(full, -1)), -1)
  return kl.mean()


def first_layer_within(kl, eta: float, layers: Sequence[int]) -> int:
  """The withdrawal layer K: the first of `layers` whose mean divergence is <= `eta`.

  Args:
    kl: float[S, C] divergence of each calibration sample at each candidate layer (averaged over
      S, as the official `torch.tensor(KL_di_total).mean(dim=0)`), or float[C] already averaged.
    eta: threshold (official: 0.003 for LLaVA-1.5-7B).
    layers: the C candidate layers, in the order of `kl`'s last axis (official: 5..L-1).

  Raises:
    ValueError if the shapes disagree or no candidate reaches `eta` (the official code fails
    with an IndexError there).
  """
  kl = np.asarray(kl, np.float64)
  layers = [int(l) for l in layers]
  if kl.ndim not in (1, 2) or kl.shape[-1] != len(layers) or not layers:
    raise ValueError(f"vtw: kl must be float[S, C] or float[C] with C = len(layers) = "
                     f"{len(layers)} > 0, got shape {kl.shape}")
  mean = kl.mean(0) if kl.ndim == 2 else kl
  hits = np.flatnonzero(mean <= eta)
  if hits.size == 0:
    raise ValueError(f"vtw: no candidate layer reaches mean KL <= eta={eta}; smallest is "
                     f"{np.nanmin(mean):.3g} at layer {layers[int(np.nanargmin(mean))]}")
  return layers[int(hits[0])]
