"""Visual-token compression methods: pure functions `method(tokens, budget, *, signals, options)`.

`METHODS[name]` describes each method (family, stages, needs, options); `apply(name, ...)` runs
one by name. `SCHEDULES[name]` describes the multi-layer in-LLM schedules (`pyramiddrop`,
`sparsevlm`). Every method module registers itself on import, below.
"""

from tcjax.compress.registry import (DECODE_POLICIES, METHODS, SCHEDULES, DecodePolicy, Method,
                                     Schedule, apply, apply_decode, init_decode, register,
                                     register_decode, register_schedule)
from tcjax.compress.primitives import to_grid, unmerge

# Methods, one file each. Keep this list sorted.
from tcjax.compress.adaptive import adaptive_entropy, adaptive_mass
from tcjax.compress.cdpruner import cdpruner
from tcjax.compress.dart import dart
from tcjax.compress.divprune import divprune
from tcjax.compress.dpc_knn import dpc_knn
from tcjax.compress.dycoke import dycoke
from tcjax.compress.fastervlm import fastervlm
from tcjax.compress.fastv import fastv
from tcjax.compress.fastvid import fastvid
from tcjax.compress.framefusion import framefusion
from tcjax.compress.holitom import holitom, holitom_llm
from tcjax.compress.keynorm import keynorm
from tcjax.compress.mustdrop import mustdrop, mustdrop_merge
from tcjax.compress.pool import pool
from tcjax.compress.prumerge import prumerge, prumerge_plus
from tcjax.compress.prunevid import prunevid, prunevid_llm
from tcjax.compress.pyramid import pyramid
from tcjax.compress import pyramiddrop  # a schedule of fastv steps (registry.SCHEDULES)
from tcjax.compress.random import random
from tcjax.compress.resize import resize
from tcjax.compress.slowfast import slowfast
from tcjax.compress.sparsevlm import sparsevlm
from tcjax.compress.temporal_merge import temporal_merge
from tcjax.compress.text_relevance import text_relevance
from tcjax.compress.tome import tome
from tcjax.compress.topk import topk
from tcjax.compress.uniform import uniform
from tcjax.compress.visionzip import visionzip
from tcjax.compress.vispruner import vispruner
from tcjax.compress.vtw import vtw

__all__ = ["DECODE_POLICIES", "DecodePolicy", "METHODS", "Method", "SCHEDULES", "Schedule",
           "apply", "apply_decode", "init_decode", "register", "register_decode",
           "register_schedule", "to_grid", "unmerge"] + sorted(METHODS)
