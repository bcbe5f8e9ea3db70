"""The install files agree: every requirement (ranges, for accelerator installs) is pinned in
requirements-lock.txt at a version inside its range, and the README's quickstart and `.ci/run`
install through that lock."""

import pathlib
import re

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = pathlib.Path(__file__).resolve().parents[1]
RANGES = ("requirements.txt", "requirements-test.txt", "requirements-tpu.txt",
          "requirements-cuda.txt")


def _lines(name):
  for line in (ROOT / name).read_text().splitlines():
    line = line.split("#", 1)[0].strip()
    if line:
      yield line


def lock():
  """{canonical name: Version} from requirements-lock.txt (every line `name==version`)."""
  out = {}
  for line in _lines("requirements-lock.txt"):
    m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
    assert m, f"requirements-lock.txt: not an exact pin: {line!r}"
    out[canonicalize_name(m[1])] = Version(m[2])
  return out


def test_every_requirement_is_locked_inside_its_range():
  pins = lock()
  for name in RANGES:
    for line in _lines(name):
      req = Requirement(line)
      key = canonicalize_name(req.name)
      assert key in pins, f"{name}: {req.name} is missing from requirements-lock.txt"
      assert req.specifier.contains(pins[key], prereleases=True), \
          f"{name}: {line!r} excludes the locked {req.name}=={pins[key]}"


def test_runtime_ranges_admit_more_than_one_release():
  """Ranges, not pins, for the runtime (a TPU / GPU install must be free to pick its jaxlib);
  torch stays pinned on purpose (a bare `torch` pulls the multi-GB CUDA build)."""
  for line in _lines("requirements.txt"):
    req = Requirement(line)
    assert not any(s.operator == "==" for s in req.specifier), line


def test_quickstart_and_ci_install_through_the_lock():
  readme = (ROOT / "README.md").read_text()
  quick = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
  installs = re.findall(r"pip install[^&\n]*", quick)
  assert len(installs) >= 2, installs
  for cmd in installs:
    if ".[tpu]" in cmd or ".[cuda]" in cmd:
      continue
    assert "-c requirements-lock.txt" in cmd, cmd
  ci = (ROOT / ".ci" / "run").read_text()
  assert re.search(r"pip install .*-c requirements-lock\.txt", ci), ci
  # CI runs exactly the README's test command
  test_cmd = re.search(r"python -m pytest[^\n`]*", quick)[0].strip()
  assert test_cmd in ci.splitlines(), test_cmd


def test_every_slow_entry_names_a_test():
  """conftest.SLOW lists test functions by id; a renamed or deleted test must leave it."""
  from conftest import SLOW  # pylint: disable=g-import-not-at-top
  for nodeid in SLOW:
    path, *names = nodeid.split("::")
    text = (ROOT / path).read_text()
    func = names[-1].split("(")[0].rstrip("_")
    assert f"def {func}" in text or f"def {func.split('_(')[0]}" in text, nodeid
