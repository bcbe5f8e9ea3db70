"""Readable printing: a Method as one line, the registry as a table, a plan one entry a line."""

from tcjax.compress import METHODS, Method, registry
from tcjax.nn import plan as plan_lib


def _fn(tokens, budget, *, keys, k=5, mode="mean"):
  del keys, k, mode
  return tokens


# Made here rather than registered, so the expected strings do not follow the real registry.
MERGE = Method("merge_a", _fn, "merging", ("vit", "post_vit"), ("keys",), {"k": 5, "mode": "mean"},
               "Someone et al., arXiv 0000.00000")
SAMPLE = Method("zz_top", _fn, "sampling", ("llm",), (), {}, "", token_sharded=True)


def test_method_repr_is_one_readable_line():
  assert repr(MERGE) == ("Method(merge_a: merging; stages vit, post_vit; needs keys; "
                         "options k=5, mode='mean'; paper Someone et al., arXiv 0000.00000)")
  assert str(SAMPLE) == ("Method(zz_top: sampling, token-sharded; stages llm; needs -; "
                         "options -; paper -)")


def test_describe_table():
  # Given out of order: rows come sorted by name; columns padded to their widest cell.
  want = "\n".join([
      "method   family    stages         needs  options           sharded  paper",
      "-------  --------  -------------  -----  ----------------  -------  "
      "--------------------------------",
      "merge_a  merging   vit, post_vit  keys   k=5, mode='mean'  no       "
      "Someone et al., arXiv 0000.00000",
      "zz_top   sampling  llm            -      -                 yes      -",
  ])
  assert registry.describe([SAMPLE, MERGE]) == want
  assert registry.describe({"b": SAMPLE, "a": MERGE}) == want


def test_describe_whole_registry():
  lines = registry.describe().split("\n")
  assert len(lines) == 2 + len(METHODS)
  assert lines[0].split() == ["method", "family", "stages", "needs", "options", "sharded",
                              "paper"]
  assert [l.split()[0] for l in lines[2:]] == sorted(METHODS)
  assert all("function" not in repr(m) for m in METHODS.values())  # no `fn` address


def test_plan_describe_raw_and_normalized():
  plan = (("vit", {"method": "tome", "r": 8}),
          ("post_vit", {"method": "visionzip", "budget": 64}),
          ("llm", {"method": "fastv", "layer": 2, "keep": 0.5}),
          ("llm", {"method": "pyramiddrop", "layers": (2, 4), "ratios": (0.5, 0.25)}))
  assert plan_lib.describe(plan) == "\n".join([
      "vit: tome(r=8)",
      "post_vit: visionzip(budget=64)",
      "llm: fastv(keep=0.5, layer=2)",  # budget / keep first
      "llm: pyramiddrop(layers=(2, 4), ratios=(0.5, 0.25))",
  ])
  # The hashable form (sorted option pairs) prints the same lines.
  frozen = tuple((s, tuple(sorted(o.items()))) for s, o in plan)
  assert plan_lib.describe(frozen) == plan_lib.describe(plan)
  assert plan_lib.describe(()) == "(no compression)"
  assert plan_lib.describe(None) == "(no compression)"
