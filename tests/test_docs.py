"""docs/ stays true to the code.

- Every `tcjax.` name in backticks on docs/api.md resolves, and the parameters an entry lists
  are the function's own (in order, every required one listed, literal defaults equal).
- Every relative link in docs/*.md and README.md points at a file or directory inside the
  repository; docs/ links nowhere else.
- The ```python blocks of docs/adding_a_method.md run in order in one namespace (the worked
  method, its use in a plan, its test), and every `test_*` function they define passes, for
  every parameter value.
"""

import ast
import importlib
import inspect
import itertools
import os
import re

import pytest

from test_readme import python_blocks  # the README's ```python block parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
DOC_FILES = ("architecture.md", "api.md", "adding_a_method.md")


def _read(path):
  with open(path, encoding="utf-8") as f:
    return f.read()


def test_docs_exist_and_readme_links_them():
  readme = _read(os.path.join(ROOT, "README.md"))
  for name in DOC_FILES:
    assert os.path.isfile(os.path.join(DOCS, name)), name
    assert f"(docs/{name})" in readme, f"README.md does not link docs/{name}"


# ---------------------------------------------------------------------------------------------
# docs/api.md
# ---------------------------------------------------------------------------------------------

API = _read(os.path.join(DOCS, "api.md"))
# `tcjax.a.b` or `tcjax.a.b(params)` at the start of a backtick span.
NAME = re.compile(r"`(tcjax(?:\.\w+)+)(\(([^`]*)\))?`")
ENTRIES = sorted({(m.group(1), m.group(3)) for m in NAME.finditer(API)},
                 key=lambda e: (e[0], e[1] or ""))


def resolve(dotted):
  """The object a dotted name reaches: attributes from `import tcjax` on; where one is missing,
  the module of that path is imported (a subpackage its parent does not import, or a module
  shadowed by a function of the same name, as `tcjax.compress.pyramid`)."""
  parts = dotted.split(".")
  obj = importlib.import_module(parts[0])
  for i, part in enumerate(parts[1:], 1):
    if hasattr(obj, part):
      obj = getattr(obj, part)
      continue
    prefix = ".".join(parts[:i])
    try:
      obj = getattr(importlib.import_module(prefix), part)
    except (ImportError, AttributeError):
      obj = importlib.import_module(f"{prefix}.{part}")  # raises if it does not exist either
  return obj


def split_params(text):
  """'a, b=(1, 2), *, c="x,y"' -> ['a', 'b=(1, 2)', '*', 'c="x,y"'] (top-level commas only)."""
  out, depth, quote, cur = [], 0, None, ""
  for ch in text:
    if quote:
      quote = None if ch == quote and not cur.endswith("\\") else quote
    elif ch in "'\"":
      quote = ch
    elif ch in "([{":
      depth += 1
    elif ch in ")]}":
      depth -= 1
    elif ch == "," and depth == 0:
      out.append(cur.strip())
      cur = ""
      continue
    cur += ch
  if cur.strip():
    out.append(cur.strip())
  return out


def test_api_lists_names():
  assert len(ENTRIES) > 150
  for module in ("tcjax.compress", "tcjax.nn", "tcjax.parallel", "tcjax.checkpoints",
                 "tcjax.data", "tcjax.train", "tcjax.eval"):
    assert any(name.startswith(module + ".") for name, _ in ENTRIES), module


@pytest.mark.parametrize("name, params", ENTRIES, ids=[n for n, _ in ENTRIES])
def test_api_name_resolves(name, params):
  obj = resolve(name)
  if params is None:
    return
  real = [p for p in inspect.signature(obj).parameters.values() if p.name not in ("self", "cls")]
  by_name = {p.name: p for p in real}
  listed = []
  for item in split_params(params):
    if item == "*":
      continue
    key, _, default = item.partition("=")
    key = key.strip().lstrip("*")
    assert key in by_name, f"{name}: no parameter {key!r}; it has {list(by_name)}"
    listed.append(key)
    if default:
      try:
        value = ast.literal_eval(default.strip())
      except (ValueError, SyntaxError):
        continue  # not a literal (a dtype, a PartitionSpec, '...'): not compared
      if value is not Ellipsis:
        assert by_name[key].default == value, f"{name}: {key} defaults to {by_name[key].default!r}"
  order = [p.name for p in real]
  assert listed == sorted(listed, key=order.index), f"{name}: parameters out of order"
  required = [p.name for p in real if p.default is p.empty
              and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
  missing = [p for p in required if p not in listed]
  assert not missing, f"{name}: required parameters {missing} not listed"


# ---------------------------------------------------------------------------------------------
# Links
# ---------------------------------------------------------------------------------------------

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _links(path):
  text = re.sub(r"```.*?```", "", _read(path), flags=re.S)  # not inside code blocks
  return LINK.findall(text)


@pytest.mark.parametrize("doc", [os.path.join("docs", d) for d in DOC_FILES] + ["README.md"])
def test_relative_links_exist(doc):
  path = os.path.join(ROOT, doc)
  in_docs = doc.startswith("docs")
  for target in _links(path):
    if re.match(r"[a-z]+:", target) or target.startswith("#"):
      assert not in_docs, f"{doc} links outside the repository: {target}"
      continue
    where = os.path.normpath(os.path.join(os.path.dirname(path), target.split("#")[0]))
    assert where == ROOT or where.startswith(ROOT + os.sep), f"{doc}: {target} leaves the repository"
    assert os.path.exists(where), f"{doc}: {target} does not exist"
  if in_docs:
    assert "../shared" not in _read(path)


def test_links_are_checked():
  assert len(_links(os.path.join(DOCS, "architecture.md"))) > 20


# ---------------------------------------------------------------------------------------------
# docs/adding_a_method.md: the worked examples run
# ---------------------------------------------------------------------------------------------


def _calls(fn):
  """The keyword arguments of every call pytest would make of `fn` (parametrize marks)."""
  grids = []
  for mark in getattr(fn, "pytestmark", []):
    if mark.name != "parametrize":
      continue
    names, values = mark.args[0], mark.args[1]
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    grids.append([dict(zip(names, v if len(names) > 1 else (v,))) for v in values])
  return [dict(kv for d in combo for kv in d.items()) for combo in itertools.product(*grids)]


def test_adding_a_method_examples_run():
  from tcjax.compress import registry  # pylint: disable=g-import-not-at-top

  path = os.path.join(DOCS, "adding_a_method.md")
  blocks = python_blocks(_read(path))
  assert len(blocks) >= 6
  # The examples register methods: the registry is restored afterwards, so that other tests
  # (which iterate over METHODS) see the real one.
  saved = (dict(registry.METHODS), dict(registry.CHOICES), dict(registry.SCHEDULES))
  namespace = {"__name__": "__docs__"}
  try:
    for line, _, code in blocks:
      exec(compile(code, f"docs/adding_a_method.md:{line}", "exec"), namespace)  # pylint: disable=exec-used
    assert {"featnorm", "maxattn"} <= set(registry.METHODS)
    tests = {k: v for k, v in namespace.items() if k.startswith("test_") and callable(v)}
    assert len(tests) >= 6, sorted(tests)
    for name, fn in sorted(tests.items()):
      for kwargs in _calls(fn):
        fn(**kwargs)
  finally:
    for live, old in zip((registry.METHODS, registry.CHOICES, registry.SCHEDULES), saved):
      live.clear()
      live.update(old)
