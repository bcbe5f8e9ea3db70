"""experiments/RESULTS.md: each benchmark owns one `## <name>` section and replaces only it."""

from __future__ import annotations

import os

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "RESULTS.md")


def write_section(text: str, heading: str, path: str = RESULTS) -> None:
  """Replace (or append) the `heading` section (e.g. "## bench_model"), leaving the others."""
  old = open(path).read() if os.path.exists(path) else "# Results\n"
  start = old.find(heading + "\n")
  if not text.startswith(heading):
    text = f"{heading}\n\n{text}"
  body = text.rstrip("\n") + "\n"
  if start < 0:
    new = old.rstrip("\n") + "\n\n" + body
  else:
    nxt = old.find("\n## ", start + len(heading))
    new = old[:start] + body + ("" if nxt < 0 else "\n" + old[nxt + 1:])
  with open(path, "w") as f:
    f.write(new)
