"""Answer metrics against hand-worked examples."""

import math

import pytest

from tcjax.eval import answers


def test_exact_match_ignores_spacing_only():
  assert answers.exact_match(" 4  0 7 ", "4 0 7") == 1.0
  assert answers.exact_match("407", "4 0 7") == 0.0
  assert answers.exact_match("Blue", "blue") == 0.0


def test_box_iou_hand_worked():
  # loc 0 and 512 of 1024 on a 64 px image: 0 px and 512 / 1023 * 64 = 32.03 px
  pred = "<loc0000><loc0000><loc0512><loc0512>"
  side = 512 / 1023 * 64
  assert answers.box_iou(pred, (0, 0, side, side)) == pytest.approx(1.0)
  # the same box against one shifted by half its side in x: overlap 1/2, union 3/2 -> 1/3
  assert answers.box_iou(pred, (0, side / 2, side, 1.5 * side)) == pytest.approx(1 / 3)
  assert answers.box_iou("no box", (0, 0, 8, 8)) == 0.0
  assert answers.box_iou(pred, pred) == pytest.approx(1.0)


def test_score_locate_counts_boxes_at_half_iou():
  ref = "<loc0000><loc0000><loc0512><loc0512>"
  off = "<loc0000><loc0128><loc0512><loc0640>"  # shifted by a quarter side: IoU 3/5
  s = answers.score("locate", off, ref)
  assert s["iou"] == pytest.approx(0.6, abs=0.01) and s["correct"] == 1.0 and s["exact"] == 0.0
  assert answers.score("count", "3", "3") == {"exact": 1.0, "correct": 1.0}


def test_loyalty_and_relative_accuracy():
  base = ["3", "blue", "4 0 7", "2"]
  comp = ["3", "red", "4 0 7", "5"]
  assert answers.loyalty(comp, base) == 0.5
  assert answers.loyalty(base, base) == 1.0
  with pytest.raises(ValueError):
    answers.loyalty(comp[:2], base)
  assert answers.relative_accuracy(0.45, 0.9) == pytest.approx(0.5)
  assert math.isnan(answers.relative_accuracy(0.3, 0.0))


def test_mean_by_family():
  rows = [{"family": "a", "c": 1.0}, {"family": "a", "c": 0.0}, {"family": "b", "c": 1.0}]
  assert answers.mean_by(rows, "c") == {"a": 0.5, "b": 1.0, None: pytest.approx(2 / 3)}
