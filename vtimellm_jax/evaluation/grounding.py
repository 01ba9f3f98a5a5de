"""Temporal grounding metrics: R1@{0.3, 0.5, 0.7} and mIoU, with the release's rules.

The release scores a grounding answer by the first match of `(\\d{2}) (to|and) (\\d{2})` anywhere in
the text, read as frame indices / 100 (fractions of the video), against the annotated moment divided
by the video duration; the IoU is rounded to 2 decimals before averaging and thresholding, and an
answer with no match scores IoU 0. Malformed answers are scored exactly so, and counted.

Answers in Chinese (the release's ChatGLM3 model, trained on its Chinese data, writes a moment as
"从 SS 到 EE") are read when the release's pattern finds nothing: the first `ZH_SPAN_RE` match,
"[从][第]SS[帧] 到|至|和 [第]EE[帧]" with or without spaces. English answers are read exactly as
the release reads them.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Sequence

from vtimellm_jax.errors import UserError
from vtimellm_jax.evaluation.annotations import Annotations
from vtimellm_jax.evaluation.answer_log import LogRecord

THRESHOLDS = (0.3, 0.5, 0.7)
_SPAN_RE = re.compile(r"(\d{2}) (to|and) (\d{2})")
# The two indices are groups 1 and 2; "从" and the ordinal/frame words are part of the match.
ZH_SPAN_RE = re.compile(r"(?:从\s*)?(?:第\s*)?(\d{2})\s*(?:帧\s*)?(?:到|至|和)\s*(?:第\s*)?(\d{2})(?:\s*帧)?")

# Problem names, counted per answer.
NO_TIMESTAMPS = "no timestamps"
REVERSED = "reversed (start > end)"
OVER_99 = "value > 99"


@dataclasses.dataclass(frozen=True)
class GroundingAnswer:
  """What the release reads from an answer: two frame indices (None if no match) and what looked wrong."""

  start: int | None
  end: int | None
  problems: tuple[str, ...]


def parse_answer(answer: str) -> GroundingAnswer:
  """Returns the span the release would read from `answer`, with the problems found."""
  match = _SPAN_RE.search(answer)
  first, last = 1, 3
  if match is None:
    match, last = ZH_SPAN_RE.search(answer), 2
  if match is None:
    return GroundingAnswer(None, None, (NO_TIMESTAMPS,))
  start, end = int(match.group(first)), int(match.group(last))
  problems = []
  # "from 100 to 120" matches as "00 to 12": the release reads those digits, and so do we, but the
  # answer really named frames outside 00-99.
  before = answer[match.start(first) - 1] if match.start(first) > 0 else ""
  after = answer[match.end(last)] if match.end(last) < len(answer) else ""
  if before.isdigit() or after.isdigit():
    problems.append(OVER_99)
  if start > end:
    problems.append(REVERSED)
  return GroundingAnswer(start, end, tuple(problems))


def span_iou(start: int, end: int, gt_start: float, gt_end: float, duration: float) -> float:
  """Returns the release's IoU of frame span [start, end] (of 100) with a moment in seconds, rounded to 2 decimals."""
  pred_s, pred_e = float(start) / 100, float(end) / 100
  gt_s, gt_e = gt_start / duration, gt_end / duration
  intersection = max(0, min(pred_e, gt_e) - max(pred_s, gt_s))
  union = max(pred_e, gt_e) - min(pred_s, gt_s)
  if union <= 0:
    # Zero-length prediction on a zero-length moment: the release divides by zero here; no overlap.
    return 0.0
  return round(intersection / union, 2)


@dataclasses.dataclass(frozen=True)
class GroundingScores:
  """Per-query IoUs (log order), the metrics in percent, and how many answers had each problem."""

  ious: tuple[float, ...]
  metrics: dict[str, float]
  problems: dict[str, int]
  malformed: int
  records: tuple[LogRecord, ...] = ()
  spans: tuple[tuple[int, int] | None, ...] = ()


def metrics_from_ious(ious: Sequence[float]) -> dict[str, float]:
  """Returns mIoU and R1@m (IoU >= m) in percent, in the release's key order."""
  n = len(ious)
  if n == 0:
    raise ValueError("no IoUs to average")
  metrics = {"mIoU": sum(ious) / n * 100}
  for m in THRESHOLDS:
    metrics[f"R1@{m}"] = sum(iou >= m for iou in ious) / n * 100
  return metrics


def score_grounding(records: Sequence[LogRecord], annotations: Annotations, log_path: str = "<log>") -> GroundingScores:
  """Returns the grounding scores of `records` (task "grounding") against `annotations`.

  Raises UserError naming the log line when a record's video or sentence is not in the annotations.
  """
  records = [r for r in records if r.task == "grounding"]
  if not records:
    raise UserError(f"{log_path}: no grounding answers in the log")
  ious, spans, problems, malformed = [], [], Counter(), 0
  for record in records:
    where = f"{log_path} line {record.line}"
    video = annotations.get(record.video_id)
    if video is None:
      raise UserError(f"{where}: video {record.video_id!r} is not in the annotations")
    if not 0 <= record.sentence_id < len(video.sentences):
      raise UserError(f"{where}: sentence_id {record.sentence_id} is out of range; video {record.video_id!r} "
                      f"has {len(video.sentences)} annotated sentences")
    parsed = parse_answer(record.answer)
    if parsed.problems:
      malformed += 1
      problems.update(parsed.problems)
    if parsed.start is None:
      ious.append(0.0)
      spans.append(None)
      continue
    gt_start, gt_end = video.timestamps[record.sentence_id]
    ious.append(span_iou(parsed.start, parsed.end, gt_start, gt_end, video.duration))
    spans.append((parsed.start, parsed.end))
  return GroundingScores(tuple(ious), metrics_from_ious(ious), dict(problems), malformed, tuple(records), tuple(spans))
