"""Answer quality: exact match, box IoU from `<locNNNN>` tokens, loyalty, relative accuracy.

Loyalty follows EffiVLM-Bench: the share of examples on which the compressed model gives the
same answer as the uncompressed one, whether or not that answer is right (it measures how
faithfully compression preserves the model, independent of the model's own accuracy).
"""

from __future__ import annotations

import math
import re
from typing import Dict, Iterable, Optional, Sequence

from tcjax.data import testbed

BOX_THRESHOLD = 0.5  # a box counts as correct at IoU >= 0.5 (the usual detection criterion)


def normalize(text: str) -> str:
  """Whitespace-insensitive form of an answer: stripped, runs of spaces collapsed."""
  return re.sub(r"\s+", " ", text).strip()


def exact_match(prediction: str, reference: str) -> float:
  return float(normalize(prediction) == normalize(reference))


def box_iou(prediction: str, reference, size: float = testbed.IMAGE_SIZE) -> float:
  """IoU of the first four `<locNNNN>` tokens of `prediction` with `reference` (a box
  (y0, x0, y1, x1) in pixels of an image of side `size`, or a string of loc tokens); 0 when the
  prediction holds no box."""
  if isinstance(reference, str):
    reference = testbed.parse_loc(reference, size)
  return testbed.box_iou(testbed.parse_loc(prediction, size), reference)


def score(family: str, prediction: str, answer: str, scene=None) -> Dict[str, float]:
  """One testbed answer -> {"exact", "correct"} (+ "iou" for `locate`, where `correct` means
  IoU >= 0.5 with the true box from `scene`, or with the reference's box without a scene)."""
  exact = exact_match(prediction, answer)
  if family == "locate":
    ref = testbed.target_box(scene) if scene is not None else answer
    iou = box_iou(prediction, ref)
    return {"exact": exact, "iou": iou, "correct": float(iou >= BOX_THRESHOLD)}
  return {"exact": exact, "correct": exact}


def loyalty(predictions: Sequence[str], baseline: Sequence[str]) -> float:
  """Share of predictions equal (after `normalize`) to the uncompressed model's."""
  if len(predictions) != len(baseline):
    raise ValueError(f"{len(predictions)} predictions but {len(baseline)} baseline answers")
  if not predictions:
    raise ValueError("loyalty of no predictions")
  return sum(exact_match(p, b) for p, b in zip(predictions, baseline)) / len(predictions)


def relative_accuracy(accuracy: float, baseline_accuracy: float) -> float:
  """accuracy / the uncompressed model's (nan when the baseline scores 0)."""
  return accuracy / baseline_accuracy if baseline_accuracy > 0 else math.nan


def mean_by(rows: Iterable[Dict], key: str, group: str = "family",
            ) -> Dict[Optional[str], float]:
  """Mean of `row[key]` per `row[group]`, plus the mean over all rows under None."""
  sums: Dict[Optional[str], list] = {}
  for r in rows:
    for g in (r.get(group), None):
      s = sums.setdefault(g, [0.0, 0])
      s[0] += r[key]
      s[1] += 1
  return {g: s[0] / s[1] for g, s in sums.items()}
