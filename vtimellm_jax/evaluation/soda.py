"""SODA_c (Fujita et al., ECCV 2020): story-oriented dense-captioning score, the variant the release reports.

Per video, predictions and ground-truth moments are both sorted by start time. Each pair (gt i,
prediction j) is worth IoU(i, j) * METEOR(i, j) (in the release, gt sentence i is METEOR's hypothesis
and prediction j its reference: see `soda_c_video`). The best order-preserving one-to-one matching
(a longest-common-subsequence style dynamic programme over the two time-ordered lists) gives a
total S; precision = S / #predictions, recall = S / #gt, and the video's SODA_c is their F1.
A video with no prediction scores 0. SODA_c of a set is the mean over videos.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

Interval = tuple[float, float]


def segment_iou(first: Interval, second: Interval) -> float:
  """Returns the temporal IoU of two intervals as ActivityNet's and SODA's evaluators compute it.

  The union is capped by the summed lengths (so disjoint intervals do not count the gap) and 1e-8
  guards the division. The summed lengths are added as `first` then `second`: the two evaluators pass
  (prediction, gt) in opposite orders, and the order decides the last bit, which can decide a
  `>= tIoU` comparison.
  """
  (s1, e1), (s2, e2) = first, second
  intersection = max(0.0, min(e1, e2) - max(s1, s2))
  union = min(max(e1, e2) - min(s1, s2), e1 - s1 + e2 - s2)
  return intersection / (union + 1e-8)


def best_ordered_matching(scores: np.ndarray) -> float:
  """Returns the largest total of `scores[i, j]` over matchings that keep both index orders (float[G, P] >= 0).

  dp[i][j] = max(dp[i-1][j], dp[i][j-1], dp[i-1][j-1] + scores[i-1, j-1]), with an empty row/column of
  zeros. Scores are non-negative, so this equals SODA's memoised recursion, which differs only in
  how it seeds the borders.
  """
  n_gt, n_pred = scores.shape
  dp = np.zeros((n_gt + 1, n_pred + 1))
  for i in range(1, n_gt + 1):
    for j in range(1, n_pred + 1):
      dp[i, j] = max(dp[i - 1, j], dp[i, j - 1], dp[i - 1, j - 1] + scores[i - 1, j - 1])
  return float(dp[n_gt, n_pred])


@dataclasses.dataclass(frozen=True)
class SodaScore:
  """One video's SODA_c precision, recall and F1 (fractions, not percent)."""

  precision: float
  recall: float
  f1: float


def soda_c_video(gt_spans: Sequence[Interval], pred_spans: Sequence[Interval], meteor: np.ndarray) -> SodaScore:
  """Returns SODA_c of one video.

  Args:
    gt_spans: ground-truth moments in seconds, sorted by start.
    pred_spans: predicted moments in seconds, sorted by start.
    meteor: float[G, P], the caption score of pair (gt i, prediction j). The release fills it with
      METEOR of gt sentence i as the hypothesis against prediction j as the only reference.
  """
  if not pred_spans:
    return SodaScore(0.0, 0.0, 0.0)
  meteor = np.asarray(meteor, dtype=np.float64)
  if meteor.shape != (len(gt_spans), len(pred_spans)):
    raise ValueError(f"meteor matrix {meteor.shape} does not match {len(gt_spans)} gt x {len(pred_spans)} predictions")
  iou = np.array([[segment_iou(p, g) for p in pred_spans] for g in gt_spans])
  total = best_ordered_matching(iou * meteor)
  precision, recall = total / len(pred_spans), total / len(gt_spans)
  f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
  return SodaScore(precision, recall, f1)


def soda_c(videos: Sequence[SodaScore]) -> float:
  """Returns the mean F1 over videos (a fraction), the number the release reports as soda_c."""
  if not videos:
    raise ValueError("no videos to average")
  return float(np.mean([v.f1 for v in videos]))
