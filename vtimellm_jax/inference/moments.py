"""Moments named in an answer ("from SS to EE", frame indices of the 100 samples) and their times.

VTimeLLM writes a moment as two two-digit indices 00-99 of the 100 frames sampled evenly over the
video; its training data map a time t to `round(t / duration * 100)`, so index i stands for
`i / 100 * duration` seconds, the reading the release's grounding metric uses too.

The release's answers say "from SS to EE"; its grounding metric reads any "SS to EE" or "SS and EE"
(evaluation/grounding.py), and the quickstart's model answers grounding queries "In red SS to EE."
(docs/synthetic.md says why), so a moment is any of those, "from" included in its span when there.
The release's ChatGLM3 model answers in Chinese, "从 SS 到 EE"; those are moments too, read with the
grounding metric's pattern (evaluation/grounding.py).
"""

from __future__ import annotations

import dataclasses
import re

from vtimellm_jax.evaluation import grounding

# "from 12 to 34", "12 to 34", "12 and 34"; the digits must not be part of a longer number ("from
# 100 to 120" is no moment).
_MOMENT_RE = re.compile(r"(?:\bfrom )?(?<!\d)(\d{2}) (?:to|and) (\d{2})(?!\d)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Moment:
  """One moment of an answer: frame indices (0-99) and where it sits in the answer text."""

  start: int
  end: int
  span: tuple[int, int]  # character offsets of "[from ]SS to EE" in the answer

  def seconds(self, duration: float) -> tuple[float, float]:
    """Returns (start, end) in seconds of a video `duration` seconds long."""
    return self.start / 100 * duration, self.end / 100 * duration


def find_moments(answer: str) -> list[Moment]:
  """Returns every moment ("[from ]SS to|and EE", "从SS到EE") of an answer, in order."""
  found = [Moment(int(m.group(1)), int(m.group(2)), m.span()) for m in _MOMENT_RE.finditer(answer)]
  for m in grounding.ZH_SPAN_RE.finditer(answer):
    digit_before = m.start(1) > 0 and answer[m.start(1) - 1].isdigit()
    digit_after = m.end(2) < len(answer) and answer[m.end(2)].isdigit()
    if not (digit_before or digit_after or any(_overlap(m.span(), f.span) for f in found)):
      found.append(Moment(int(m.group(1)), int(m.group(2)), m.span()))
  return sorted(found, key=lambda moment: moment.span)


def _overlap(a: tuple[int, int], b: tuple[int, int]) -> bool:
  return a[0] < b[1] and b[0] < a[1]


def moments_in_seconds(answer: str, duration: float | None) -> list[list[float]] | None:
  """Returns [[start_s, end_s], ...] (rounded to 0.01 s) of an answer's moments; None without a duration."""
  if duration is None:
    return None
  return [[round(s, 2), round(e, 2)] for s, e in (m.seconds(duration) for m in find_moments(answer))]


def annotate(answer: str, duration: float | None) -> str:
  """Returns the answer with each moment followed by its time span, e.g. "from 10 to 20 (3.0s-6.0s)"."""
  if duration is None:
    return answer
  out, last = [], 0
  for moment in find_moments(answer):
    start, end = moment.seconds(duration)
    out += [answer[last:moment.span[1]], f" ({start:.1f}s-{end:.1f}s)"]
    last = moment.span[1]
  return "".join(out) + answer[last:]
