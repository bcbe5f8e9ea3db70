"""Visual-token compression methods: pure functions `method(tokens, budget, *, signals, options)`.

`METHODS[name]` describes each method (family, stages, needs, options); `apply(name, ...)` runs
one by name. Every method module registers itself on import, below.
"""

from tcjax.compress.registry import METHODS, Method, apply, register
from tcjax.compress.primitives import to_grid, unmerge

# Methods, one file each. Keep this list sorted.
from tcjax.compress.pool import pool
from tcjax.compress.topk import topk

__all__ = ["METHODS", "Method", "apply", "register", "to_grid", "unmerge"] + sorted(METHODS)
