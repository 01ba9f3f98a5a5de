"""Dense video captioning metrics of an answer log: SODA_c, METEOR and CIDEr, with the release's rules.

Reading an answer (release `metric.py`): the first `[...]` span on one line (regex `\\[.*\\]`) is
parsed as JSON; each item's "timestamps" gives frame indices by position (characters 5-6 and the
last two, as in "from 05 to 42") and "event" the sentence; an unreadable item ends the reading,
keeping the items before it; an answer with no readable list predicts nothing. Consecutive items
with near-identical sentences (difflib ratio > 0.98) whose spans touch (gap within 1) are merged;
indices become seconds as start * duration / 100 and (end + 1) * duration / 100. Timestamps in
Chinese ("从 05 到 42", the release's ChatGLM3 model; grounding.ZH_SPAN_RE) are read by that
pattern instead of by position. When a video has
several captioning answers the last one counts. All of this is applied to malformed answers too,
which are also counted by kind.

Videos are taken in log order. The release takes them in Python set order, which changes from run to
run, and the PTB tokenizer decides whether a line-final "a." or "etc." ends a sentence by looking at
the next line, which for a video's last sentence is the next video's first: so the release's own
numbers can move in the fourth digit between runs when such sentences occur; ours do not.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
from collections import Counter
from collections.abc import Sequence

import numpy as np

from vtimellm_jax.errors import UserError
from vtimellm_jax.evaluation import coco_java, densevid, grounding, soda
from vtimellm_jax.evaluation.annotations import Annotations
from vtimellm_jax.evaluation.answer_log import LogRecord
from vtimellm_jax.evaluation.densevid import Event

_LIST_RE = re.compile(r"\[.*\]")
_STANDARD_RE = re.compile(r"from \d{2} to \d{2}")

# Problem names, counted per answer.
NO_JSON = "no JSON list"
NO_EVENTS = "empty event list"
BAD_ITEM = "unreadable item (it and later items dropped)"
NONSTANDARD = "timestamps not 'from xx to xx' (or '从 xx 到 xx')"
REVERSED = "reversed (start > end)"
OVER_99 = "value > 99"


@dataclasses.dataclass(frozen=True)
class CaptionAnswer:
  """The (start index, end index, sentence) items the release reads from an answer, and what looked wrong."""

  items: tuple[tuple[int, int, str], ...]
  problems: tuple[str, ...]


def parse_answer(answer: str) -> CaptionAnswer:
  """Returns the events the release would read from a dense-captioning answer, with the problems found."""
  match = _LIST_RE.search(answer)
  if match is None:
    return CaptionAnswer((), (NO_JSON,))
  try:
    decoded = json.loads(match.group(0))
  except (ValueError, RecursionError):
    return CaptionAnswer((), (NO_JSON,))
  items, problems = [], []
  for item in decoded:
    stamps = item.get("timestamps") if isinstance(item, dict) else None
    sentence = item.get("event") if isinstance(item, dict) else None
    chinese = grounding.ZH_SPAN_RE.fullmatch(stamps.strip()) if isinstance(stamps, str) else None
    try:
      # Read by position, like the release: "from 100 to 120" reads as 10 and 20.
      start, end = (int(chinese.group(1)), int(chinese.group(2))) if chinese else (int(stamps[5:7]), int(stamps[-2:]))
    except (TypeError, ValueError):
      start = end = None
    if not isinstance(stamps, str) or start is None or not isinstance(sentence, str):
      problems.append(BAD_ITEM)
      break
    if re.search(r"\d{3}", stamps):
      problems.append(OVER_99)
    elif not (chinese or _STANDARD_RE.fullmatch(stamps)):
      problems.append(NONSTANDARD)
    if start > end:
      problems.append(REVERSED)
    items.append((start, end, sentence))
  if not decoded:
    problems.append(NO_EVENTS)
  # One count per kind and answer, in first-seen order.
  return CaptionAnswer(tuple(items), tuple(dict.fromkeys(problems)))


def merge_similar(items: Sequence[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
  """Returns `items` with runs of consecutive near-identical sentences whose spans touch merged into one."""
  merged = []
  for start, end, sentence in items:
    if merged:
      last_start, last_end, last_sentence = merged[-1]
      similar = difflib.SequenceMatcher(None, last_sentence, sentence).ratio() > 0.98
      if similar and -1 <= start - last_end <= 1:
        merged[-1] = (last_start, end, last_sentence)
        continue
    merged.append((start, end, sentence))
  return merged


def to_events(items: Sequence[tuple[int, int, str]], duration: float) -> list[Event]:
  """Returns items as events in seconds: frame index i covers [i, i + 1) hundredths of the video."""
  return [Event(start * duration / 100, (end + 1) * duration / 100, sentence) for start, end, sentence in items]


@dataclasses.dataclass(frozen=True)
class CaptioningScores:
  """Metrics in percent, per-video predictions and SODA scores, and how many answers had each problem."""

  metrics: dict[str, float]
  predictions: dict[str, list[Event]]
  soda_per_video: dict[str, soda.SodaScore]
  per_tiou: dict[float, dict[str, float]]
  problems: dict[str, int]
  malformed: int
  answers: int


def read_predictions(records: Sequence[LogRecord], annotations: Annotations, log_path: str = "<log>"
                     ) -> tuple[dict[str, list[Event]], Counter, int]:
  """Returns ({video: predicted events}, problem counts, number of malformed answers) of captioning records."""
  predictions, problems, malformed = {}, Counter(), 0
  for record in records:
    video = annotations.get(record.video_id)
    if video is None:
      raise UserError(f"{log_path} line {record.line}: video {record.video_id!r} is not in the annotations")
    parsed = parse_answer(record.answer)
    if parsed.problems:
      malformed += 1
      problems.update(parsed.problems)
    predictions[record.video_id] = to_events(merge_similar(parsed.items), video.duration)
  return predictions, problems, malformed


def _ground_truth(annotations: Annotations, videos) -> dict[str, list[Event]]:
  return {vid: [Event(s, e, text) for (s, e), text in zip(annotations[vid].timestamps, annotations[vid].sentences)]
          for vid in videos}


def _by_start(events: Sequence[Event]) -> list[Event]:
  # SODA's order: a stable sort on start time, ties kept in their listed order.
  return sorted(events, key=lambda e: e.start)


def _soda_scores(predictions, ground_truth, tokenize, meteor: coco_java.Meteor) -> dict[str, soda.SodaScore]:
  preds = {vid: _by_start(events) for vid, events in predictions.items()}
  gts = {vid: _by_start(ground_truth[vid]) for vid in predictions}
  # Tokenized as two batches, every prediction then every gt sentence, videos in turn: the PTB
  # tokenizer looks at the next line when reading a final "a." or "etc.", so the batches mirror
  # SODA's for the tokens to be the release's.
  pred_tokens = iter(tokenize([e.sentence for events in preds.values() for e in events]))
  gt_tokens = iter(tokenize([e.sentence for events in gts.values() for e in events]))
  scores = {}
  for vid in predictions:
    video_preds = [next(pred_tokens) for _ in preds[vid]]
    video_gts = [next(gt_tokens) for _ in gts[vid]]
    if not video_preds:
      scores[vid] = soda.soda_c_video([], [], np.zeros((len(video_gts), 0)))
      continue
    # SODA hands pycocoevalcap's `compute_score(gts, res)` its arguments the other way round, so the
    # release's matrix holds METEOR of each gt sentence as the hypothesis against a prediction as the
    # reference. METEOR weighs recall above precision, so the swap changes the numbers; we keep it.
    flat = meteor.segment_scores([(g, p) for g in video_gts for p in video_preds])
    matrix = np.array(flat, dtype=np.float64).reshape(len(video_gts), len(video_preds))
    scores[vid] = soda.soda_c_video([(g.start, g.end) for g in gts[vid]], [(p.start, p.end) for p in preds[vid]],
                                    matrix)
  return scores


def score_captioning(records: Sequence[LogRecord], annotations: Annotations, log_path: str = "<log>",
                     seed: int = 0) -> CaptioningScores:
  """Returns SODA_c, METEOR and CIDEr (percent) of the captioning records of a log.

  Raises JavaMissingError (a UserError) when Java or pycocoevalcap is missing, and UserError naming
  the log line when a video is not in the annotations.
  """
  records = [r for r in records if r.task == "captioning"]
  if not records:
    raise UserError(f"{log_path}: no captioning answers in the log")
  predictions, problems, malformed = read_predictions(records, annotations, log_path)
  ground_truth = _ground_truth(annotations, predictions)
  coco_java.java_command()
  with coco_java.Meteor() as meteor:
    soda_per_video = _soda_scores(predictions, ground_truth, coco_java.ptb_tokenize, meteor)
    dense = densevid.evaluate(predictions, ground_truth, coco_java.ptb_tokenize, meteor.corpus_score,
                              densevid.cider_d, seed=seed)
  metrics = {"soda_c": soda.soda_c(list(soda_per_video.values())) * 100,
             "METEOR": dense.meteor * 100, "CIDEr": dense.cider * 100}
  return CaptioningScores(metrics, predictions, soda_per_video, dense.per_tiou, dict(problems), malformed, len(records))
