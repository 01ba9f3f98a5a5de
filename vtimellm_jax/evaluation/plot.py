"""A picture of an evaluation: per-video timelines of ground truth vs predictions, and recall vs IoU.

Each video gets one panel: every annotated moment on its own lane (grey), the grounding answer for
that sentence on the same lane (blue, thinner), and the dense-captioning events on lanes below
(orange). The last panel plots recall against the IoU threshold: for grounding, the share of queries
whose (rounded) IoU reaches it; for captioning, the share of annotated moments that some predicted
event overlaps that much.
"""

from __future__ import annotations

import os

import numpy as np

from vtimellm_jax.evaluation.annotations import Annotations
from vtimellm_jax.evaluation.captioning import CaptioningScores
from vtimellm_jax.evaluation.grounding import THRESHOLDS, GroundingScores
from vtimellm_jax.evaluation.soda import segment_iou

_GT, _GROUNDING, _CAPTION = "#9e9e9e", "#1f77b4", "#ff7f0e"


def recall_curve(ious: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """Returns the share of `ious` that are >= each threshold."""
  ious = np.asarray(ious, dtype=np.float64)
  if ious.size == 0:
    return np.zeros_like(thresholds)
  return (ious[None, :] >= thresholds[:, None]).mean(axis=1)


def _caption_best_ious(annotations: Annotations, captioning: CaptioningScores) -> list[float]:
  best = []
  for vid, events in captioning.predictions.items():
    for gt in annotations[vid].timestamps:
      best.append(max((segment_iou(gt, (e.start, e.end)) for e in events), default=0.0))
  return best


def _videos(grounding: GroundingScores | None, captioning: CaptioningScores | None) -> list[str]:
  order = [r.video_id for r in grounding.records] if grounding else []
  order += list(captioning.predictions) if captioning else []
  return list(dict.fromkeys(order))


def plot_evaluation(path: str | os.PathLike, annotations: Annotations, grounding: GroundingScores | None = None,
                    captioning: CaptioningScores | None = None, max_videos: int = 12) -> list[str]:
  """Writes the PNG and returns the ids of the videos drawn (at most `max_videos`, in log order)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  videos = _videos(grounding, captioning)[:max_videos]
  lanes = {}
  for vid in videos:
    n_captions = len(captioning.predictions.get(vid, [])) if captioning else 0
    lanes[vid] = len(annotations[vid].timestamps) + n_captions
  heights = [max(1.0, 0.35 * lanes[v] + 0.6) for v in videos] + [3.0]
  fig, axes = plt.subplots(len(heights), 1, figsize=(10, sum(heights) + 0.5),
                           gridspec_kw={"height_ratios": heights}, squeeze=False)
  axes = axes[:, 0]

  for ax, vid in zip(axes, videos):
    video = annotations[vid]
    for lane, (start, end) in enumerate(video.timestamps):
      ax.barh(lane, end - start, left=start, height=0.8, color=_GT)
    if grounding:
      for record, span in zip(grounding.records, grounding.spans):
        if record.video_id == vid and span is not None:
          start, end = span[0] * video.duration / 100, span[1] * video.duration / 100
          ax.barh(record.sentence_id, end - start, left=start, height=0.35, color=_GROUNDING)
    if captioning:
      for k, event in enumerate(captioning.predictions.get(vid, [])):
        ax.barh(len(video.timestamps) + k, event.end - event.start, left=event.start, height=0.6, color=_CAPTION)
    ax.set_xlim(0, video.duration)
    ax.set_ylim(lanes[vid] - 0.5, -0.5)
    ax.set_yticks([])
    ax.set_title(f"{vid} ({video.duration:.1f} s)", fontsize=9, loc="left")
  if videos:
    axes[0].legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in (_GT, _GROUNDING, _CAPTION)],
                   labels=["ground truth", "grounding answer", "captioning event"], fontsize=7, loc="upper right")
  axes[-2 if videos else -1].set_xlabel("seconds")

  ax = axes[-1]
  thresholds = np.linspace(0.0, 1.0, 101)
  if grounding:
    ax.plot(thresholds, 100 * recall_curve(np.array(grounding.ious), thresholds), color=_GROUNDING,
            label="grounding R1@IoU")
  if captioning:
    ax.plot(thresholds, 100 * recall_curve(np.array(_caption_best_ious(annotations, captioning)), thresholds),
            color=_CAPTION, label="captioning: gt moments covered")
  for m in THRESHOLDS:
    ax.axvline(m, color="#cccccc", linewidth=0.8, zorder=0)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 100)
  ax.set_xlabel("IoU threshold")
  ax.set_ylabel("recall (%)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(os.fspath(path), dpi=100)
  plt.close(fig)
  return videos
