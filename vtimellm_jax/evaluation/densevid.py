"""ActivityNet dense-captioning evaluation (Krishna et al.'s densevid_eval): METEOR and CIDEr over tIoUs.

For each tIoU threshold, every prediction is paired with every ground-truth moment it overlaps with
IoU >= tIoU; a prediction overlapping none is paired with a random string, so it adds a zero score
and its words still count against METEOR's precision. Each video's pairs are scored together
(METEOR's corpus score over the video's pairs; CIDEr-D with document frequencies from the video's own
references), a video with no prediction scores 0, and the per-video scores are averaged over videos
and then over the thresholds.

The random string: the release draws 10-20 letters from `a-z` with Python's unseeded `random`, so in
principle its output varies between runs. Such a string is one token that matches no word of the
prediction, and every scorer here only looks at matches and token counts, so its letters never
change a score. We draw it from a seeded generator, and redraw in the (astronomically rare) case it
equals a word of the prediction, which makes the result deterministic and equal to the release's.
"""

from __future__ import annotations

import dataclasses
import random
import re
import string
from collections.abc import Callable, Sequence

import numpy as np

from vtimellm_jax.evaluation.soda import segment_iou

TIOUS = (0.3, 0.5, 0.7, 0.9)


@dataclasses.dataclass(frozen=True)
class Event:
  """A captioned moment in seconds."""

  start: float
  end: float
  sentence: str


@dataclasses.dataclass(frozen=True)
class Pair:
  """A prediction's sentence and the reference it is scored against (a gt sentence or a random string)."""

  hypothesis: str
  reference: str
  matched: bool


def garbage_reference(rng: random.Random, hypothesis: str) -> str:
  """Returns a random 10-20 letter string (as the release draws it) that is not a word of `hypothesis`."""
  words = set(re.findall(r"[a-z]+", hypothesis.lower()))
  while True:
    text = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(10, 20)))
    if text not in words:
      return text


def tiou_pairs(predictions: Sequence[Event], ground_truth: Sequence[Event], tiou: float,
               rng: random.Random) -> list[Pair]:
  """Returns one video's scoring pairs at threshold `tiou`, predictions in the given order."""
  pairs = []
  for pred in predictions:
    matched = False
    for gt in ground_truth:
      # densevid_eval passes (prediction, gt) to a formula whose length sum starts with its second
      # argument; segment_iou sums its first argument first, hence (gt, prediction).
      if segment_iou((gt.start, gt.end), (pred.start, pred.end)) >= tiou:
        pairs.append(Pair(pred.sentence, gt.sentence, True))
        matched = True
    if not matched:
      pairs.append(Pair(pred.sentence, garbage_reference(rng, pred.sentence), False))
  return pairs


# A scorer maps (hypothesis, reference) pairs of one video, already tokenized, to that video's score.
VideoScorer = Callable[[Sequence[tuple[str, str]]], float]


@dataclasses.dataclass(frozen=True)
class DenseCaptionScores:
  """METEOR and CIDEr averaged over videos then tIoUs (fractions), and per tIoU."""

  meteor: float
  cider: float
  per_tiou: dict[float, dict[str, float]]


def evaluate(predictions: dict[str, Sequence[Event]], ground_truth: dict[str, Sequence[Event]],
             tokenize: Callable[[Sequence[str]], list[str]], meteor: VideoScorer, cider: VideoScorer,
             tious: Sequence[float] = TIOUS, seed: int = 0) -> DenseCaptionScores:
  """Returns the ActivityNet dense-captioning METEOR and CIDEr of `predictions`.

  Args:
    predictions: {video: events in seconds}; every video here is scored (empty lists score 0).
    ground_truth: {video: annotated events}, holding every predicted video.
    tokenize: sentences -> PTB-tokenized sentences, called with whole batches in order.
    meteor, cider: a video's tokenized pairs -> its score.
    tious: the thresholds averaged over.
    seed: seeds the random strings of unmatched predictions (they never change the scores).
  """
  rng = random.Random(seed)
  per_tiou = {}
  for t in tious:
    pairs = {vid: tiou_pairs(preds, ground_truth[vid], t, rng) for vid, preds in predictions.items()}
    # Two batches per threshold, all hypotheses then all references, as densevid_eval tokenizes them:
    # the PTB tokenizer reads a final "a." or "etc." differently depending on the next line.
    flat = [p for video_pairs in pairs.values() for p in video_pairs]
    tokens = iter(zip(tokenize([p.hypothesis for p in flat]), tokenize([p.reference for p in flat])))
    meteors, ciders = [], []
    for video_pairs in pairs.values():
      tokenized = [next(tokens) for _ in video_pairs]
      if not tokenized:
        meteors.append(0.0)
        ciders.append(0.0)
        continue
      meteors.append(meteor(tokenized))
      ciders.append(cider(tokenized))
    per_tiou[t] = {"METEOR": float(np.mean(meteors)), "CIDEr": float(np.mean(ciders))}
  return DenseCaptionScores(meteor=float(np.mean([s["METEOR"] for s in per_tiou.values()])),
                            cider=float(np.mean([s["CIDEr"] for s in per_tiou.values()])),
                            per_tiou=per_tiou)


def cider_d(pairs: Sequence[tuple[str, str]]) -> float:
  """Returns pycocoevalcap's CIDEr-D of tokenized (hypothesis, reference) pairs, IDF from these references."""
  from pycocoevalcap.cider.cider import Cider  # pylint: disable=import-outside-toplevel
  gts = {i: [ref] for i, (_, ref) in enumerate(pairs)}
  res = {i: [hyp] for i, (hyp, _) in enumerate(pairs)}
  return float(Cider().compute_score(gts, res)[0])
