"""Pixels of the synthetic corpus: shapes drawn with numpy, videos encoded to H.264 mp4 with PyAV.

Every frame is computed from the plan alone (no random state), and the encoder runs single-threaded
with fixed settings, so the same plan gives the same bytes. Frames outside events are plain
background; inside an event the shape moves, grows, shrinks or spins with the event's progress
u in [0, 1] (first to last frame of the event).
"""

from __future__ import annotations

import pathlib

import numpy as np

from . import vocabulary

HALF_SIZE = 0.26  # a shape's half-size at scale 1, as a fraction of the frame side: large on purpose
TRAVEL = 0.18  # how far slides and moves go from the centre, as a fraction of the frame side
SCALE_RANGE = (0.45, 1.15)  # grows from / shrinks to these scales
CRF = 18  # near-lossless at this size: colours survive 4:2:0 chroma subsampling on large flat shapes


def _pose(motion: str, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Returns (centre x, centre y, scale, angle) per progress value, each float[F]; coordinates in [0, 1]."""
  ones, zeros = np.ones_like(u), np.zeros_like(u)
  cx, cy, scale, angle = 0.5 * ones, 0.5 * ones, ones, zeros
  lo, hi = SCALE_RANGE
  if motion == "slides to the left":
    cx = 0.5 + TRAVEL - 2 * TRAVEL * u
  elif motion == "slides to the right":
    cx = 0.5 - TRAVEL + 2 * TRAVEL * u
  elif motion == "moves up":  # image y grows downwards
    cy = 0.5 + TRAVEL - 2 * TRAVEL * u
  elif motion == "moves down":
    cy = 0.5 - TRAVEL + 2 * TRAVEL * u
  elif motion == "grows":
    scale = lo + (hi - lo) * u
  elif motion == "shrinks":
    scale = hi - (hi - lo) * u
  elif motion == "spins":
    angle = 2 * np.pi * u
  else:
    raise ValueError(f"unknown motion {motion!r}")
  return cx, cy, scale, angle


def _inside(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Returns bool[...]: which points (shape coordinates, unit half-size, y down) the shape covers."""
  ax, ay = np.abs(x), np.abs(y)
  if shape == "square":
    return (ax <= 0.85) & (ay <= 0.85)
  if shape == "circle":
    return x * x + y * y <= 1.0
  if shape == "triangle":  # apex up at (0, -1), base from (-1, 0.8) to (1, 0.8)
    return (y <= 0.8) & (y >= -1.0 + 1.8 * ax)
  if shape == "cross":
    arm = 0.34
    return ((ax <= 1.0) & (ay <= arm)) | ((ax <= arm) & (ay <= 1.0))
  raise ValueError(f"unknown shape {shape!r}")


def shape_masks(shape: str, motion: str, u: np.ndarray, size: int) -> np.ndarray:
  """Returns bool[F, size, size]: the shape's pixels at each progress value in `u` (float[F])."""
  cx, cy, scale, angle = (v[:, None, None] for v in _pose(motion, np.asarray(u, np.float64)))
  centres = (np.arange(size) + 0.5) / size
  px, py = centres[None, None, :], centres[None, :, None]
  dx, dy = (px - cx) / (HALF_SIZE * scale), (py - cy) / (HALF_SIZE * scale)
  # Rotating the shape by +angle is rotating the sample points by -angle.
  c, s = np.cos(angle), np.sin(angle)
  return _inside(shape, c * dx + s * dy, -s * dx + c * dy)


def _progress(event: vocabulary.Event) -> np.ndarray:
  """Returns float[F]: progress 0 .. 1 over the event's frames."""
  n = event.end_frame - event.start_frame
  return np.arange(n, dtype=np.float64) / max(n - 1, 1)


def render_video(plan: vocabulary.VideoPlan, size: int) -> np.ndarray:
  """Returns uint8[num_frames, size, size, 3]: the plan's frames, RGB."""
  frames = np.empty((plan.num_frames, size, size, 3), np.uint8)
  frames[:] = vocabulary.BACKGROUND
  for event in plan.events:
    masks = shape_masks(event.shape, event.motion, _progress(event), size)
    clip = frames[event.start_frame:event.end_frame]
    clip[masks] = vocabulary.COLOURS[event.colour]
  return frames


def render_still(event: vocabulary.Event, size: int) -> np.ndarray:
  """Returns uint8[size, size, 3]: the event at mid-progress, the frame a stage-1 still shows."""
  frame = np.empty((size, size, 3), np.uint8)
  frame[:] = vocabulary.BACKGROUND
  frame[shape_masks(event.shape, event.motion, np.array([0.5]), size)[0]] = vocabulary.COLOURS[event.colour]
  return frame


def write_mp4(path: pathlib.Path, frames: np.ndarray, fps: int) -> None:
  """Writes uint8[T, H, W, 3] RGB frames as an H.264 (yuv420p) mp4 with a constant `fps`."""
  import av  # pylint: disable=g-import-not-at-top

  tmp = path.with_name(path.name + ".tmp")
  with av.open(str(tmp), "w", format="mp4") as container:
    stream = container.add_stream("libx264", rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    # ultrafast: no B-frames (decode order = presentation order) and the fastest encode; one
    # thread: x264's output depends on its thread count, and we want the same bytes everywhere.
    stream.codec_context.options = {"preset": "ultrafast", "crf": str(CRF), "threads": "1"}
    for frame in frames:
      container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
    container.mux(stream.encode())
  tmp.replace(path)  # a stopped run never leaves a truncated video under the real name


def write_png(path: pathlib.Path, image: np.ndarray) -> None:
  """Writes a uint8[H, W, 3] RGB image as PNG."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  tmp = path.with_name(path.name + ".tmp")
  Image.fromarray(image, "RGB").save(tmp, format="PNG")
  tmp.replace(path)
