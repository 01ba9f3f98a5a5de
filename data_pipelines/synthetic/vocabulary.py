"""The synthetic corpus's world: shapes x colours x motions, and seeded plans of multi-event videos.

A plan says everything about a video before a pixel is drawn: its frame count, frame rate and its
2-4 events, each a (shape, colour, motion) shown on a half-open frame interval. Rendering
(`render.py`) and annotation (`annotations.py`) both read plans, so the pixels and the text can not
drift apart.

Why events look the way they do: the quickstart encodes frames with a *randomly initialised* tiny
CLIP, whose CLS embedding is a fixed random function of the pixels. Such a function separates
inputs that differ in many pixels (a large saturated shape against a black background, a different
hue over a third of the frame) and barely sees small changes (a few pixels of motion). So colour and
shape carry the identity of an event, and within one video every event has its own colour *and*
its own shape: a grounding query can always be answered from colour alone. Motion is in the text
and in the frames, but nothing depends on the model seeing it.

Timing: boundaries are drawn on the 0-100 grid the release's `<sN>/<eN>` tokens live on (events at
least `MIN_EVENT_PCT` long, separated by at least `MIN_GAP_PCT` of empty frames), then snapped to
whole frames; the annotated seconds are those frames' times, so the annotation is exactly what is
drawn and a rounding of one index either way never reaches into a neighbouring event.
"""

from __future__ import annotations

import dataclasses

import numpy as np

# Saturated colours one hue sextant apart (0, 60, ..., 300 degrees): far from each other and from
# the black background in every channel combination a random projection could weigh.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 30, 30),
    "yellow": (235, 225, 30),
    "green": (30, 200, 40),
    "cyan": (30, 210, 225),
    "blue": (40, 60, 235),
    "magenta": (225, 40, 215),
}
BACKGROUND = (0, 0, 0)
BACKGROUND_NAME = "black"
SHAPES = ("square", "circle", "triangle", "cross")
# Third-person verb phrases: "a red square" + " " + motion is the event's sentence.
MOTIONS = ("slides to the left", "slides to the right", "moves up", "moves down", "grows", "shrinks",
           "spins")
# A spinning circle looks still; it is never planned.
_FORBIDDEN = frozenset({("circle", "spins")})

MIN_EVENTS, MAX_EVENTS = 2, 4
MIN_EVENT_PCT = 12.0  # shortest event, in percent of the video (12 of the 100 sampled frames)
MIN_GAP_PCT = 6.0  # least empty time between two events, in percent of the video


@dataclasses.dataclass(frozen=True)
class Event:
  """One visible event: a shape of one colour doing one motion on frames [start_frame, end_frame)."""

  shape: str
  colour: str
  motion: str
  start_frame: int
  end_frame: int

  @property
  def subject(self) -> str:
    """Returns the noun phrase, e.g. 'a red square'."""
    return f"a {self.colour} {self.shape}"

  @property
  def sentence(self) -> str:
    """Returns the lower-case sentence without a final period, e.g. 'a red square slides to the left'."""
    return f"{self.subject} {self.motion}"

  @property
  def caption(self) -> str:
    """Returns the ActivityNet-style sentence: capitalised, ending with a period."""
    s = self.sentence
    return s[0].upper() + s[1:] + "."


@dataclasses.dataclass(frozen=True)
class VideoPlan:
  """One video: `num_frames` frames at `fps`, and its events in time order (non-overlapping)."""

  id: str
  num_frames: int
  fps: int
  events: tuple[Event, ...]

  @property
  def duration(self) -> float:
    """Returns the length in seconds (num_frames / fps), rounded to milliseconds for the JSON files."""
    return round(self.num_frames / self.fps, 3)

  def seconds(self, frame: int) -> float:
    """Returns the time of a frame boundary in seconds, rounded to milliseconds."""
    return round(frame / self.fps, 3)

  def span(self, k: int) -> tuple[float, float]:
    """Returns (start, end) seconds of event k."""
    e = self.events[k]
    return self.seconds(e.start_frame), self.seconds(e.end_frame)

  def signature(self) -> tuple[tuple[str, str, str], ...]:
    """Returns the (shape, colour, motion) sequence: what makes two videos the same story."""
    return tuple((e.shape, e.colour, e.motion) for e in self.events)


def _layout(rng: np.random.Generator, n: int) -> list[tuple[float, float]]:
  """Returns n (start, end) percent intervals in [0, 100], in order, respecting the minimum sizes."""
  free = 100.0 - n * MIN_EVENT_PCT - (n - 1) * MIN_GAP_PCT
  # 2n + 1 parts of the free time: leading gap, (event, gap) * (n - 1), event, trailing gap. A flat
  # Dirichlet spreads events anywhere, so no single fixed answer fits many events (the constant
  # baseline of the quickstart stays low).
  parts = rng.dirichlet(np.ones(2 * n + 1)) * free
  spans, t = [], parts[0]
  for k in range(n):
    start = t
    end = start + MIN_EVENT_PCT + parts[2 * k + 1]
    spans.append((start, end))
    t = end + MIN_GAP_PCT + parts[2 * k + 2]
  return spans


def plan_video(rng: np.random.Generator, video_id: str, *, fps: int, min_seconds: float,
               max_seconds: float) -> VideoPlan:
  """Returns a random plan: 2-4 events, distinct shapes and distinct colours, on a random timeline."""
  num_frames = int(rng.integers(round(min_seconds * fps), round(max_seconds * fps) + 1))
  n = int(rng.integers(MIN_EVENTS, MAX_EVENTS + 1))
  shapes = [SHAPES[i] for i in rng.permutation(len(SHAPES))[:n]]
  colour_names = list(COLOURS)
  colours = [colour_names[i] for i in rng.permutation(len(colour_names))[:n]]
  events = []
  for shape, colour, (p0, p1) in zip(shapes, colours, _layout(rng, n)):
    motions = [m for m in MOTIONS if (shape, m) not in _FORBIDDEN]
    motion = motions[int(rng.integers(len(motions)))]
    start = round(p0 / 100 * num_frames)
    end = round(p1 / 100 * num_frames)
    events.append(Event(shape, colour, motion, start, end))
  return VideoPlan(video_id, num_frames, fps, tuple(events))


def plan_corpus(seed: int, *, num_train: int, num_eval: int, fps: int, min_seconds: float,
                max_seconds: float) -> tuple[list[VideoPlan], list[VideoPlan]]:
  """Returns (train plans, eval plans); no eval video tells the same story as a train video.

  Video i of a split draws from its own generator `(seed, split, i)`, so a bigger corpus with the
  same seed starts with the smaller one's videos.
  """
  kw = {"fps": fps, "min_seconds": min_seconds, "max_seconds": max_seconds}
  train = [plan_video(np.random.default_rng([seed, 0, i]), f"syn_train_{i:05d}", **kw)
           for i in range(num_train)]
  seen = {p.signature() for p in train}
  evals = []
  for i in range(num_eval):
    rng = np.random.default_rng([seed, 1, i])
    plan = plan_video(rng, f"syn_eval_{i:05d}", **kw)
    while plan.signature() in seen:  # held out in content, not only in file name
      plan = plan_video(rng, plan.id, **kw)
    seen.add(plan.signature())
    evals.append(plan)
  return train, evals

