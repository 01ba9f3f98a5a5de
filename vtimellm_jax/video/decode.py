"""Decoding only the frames VTimeLLM samples, with PyAV (FFmpeg), seeking between distant frames.

The release decodes with decord, whose frame i is the i-th frame in presentation order and whose
frame count is the number of video packets. We demux the packets first (cheap: no decoding) to get
every frame's timestamp and the keyframes, then decode forward from the keyframe before each
wanted frame, seeking again only when a later keyframe lies between where the decoder is and the
next wanted frame (seeking there skips decoding the frames in between).
"""

from __future__ import annotations

import bisect
import dataclasses
import pathlib
import time
from collections.abc import Sequence

import numpy as np

from vtimellm_jax.video import sampling


class DecodeError(ValueError):
  """This file cannot be decoded (corrupt, truncated, not a video); the run reports it and goes on."""


@dataclasses.dataclass(frozen=True)
class VideoIndex:
  """The frames of a video stream, in presentation order."""

  pts: np.ndarray  # int64[T]: timestamps in stream time base, sorted
  keyframe_pts: np.ndarray  # int64[K]: timestamps of keyframes, sorted
  fps: float  # average frame rate (decord's get_avg_fps)
  width: int
  height: int

  @property
  def total_frames(self) -> int:
    return len(self.pts)


def _open(path: pathlib.Path):
  import av

  try:
    container = av.open(str(path))
  except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
    raise DecodeError(f"cannot open: {type(e).__name__}: {e}") from e
  if not container.streams.video:
    container.close()
    raise DecodeError("no video stream")
  return container


def _fps(stream) -> float:
  for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
    if rate is not None and float(rate) > 0:
      return float(rate)
  return 0.0


def build_index(container) -> VideoIndex:
  """Returns the presentation-order frame timestamps of the first video stream (demux only)."""
  import av

  stream = container.streams.video[0]
  pts, keys = [], []
  try:
    for packet in container.demux(stream):
      if packet.size == 0:  # the flush packet at the end
        continue
      t = packet.pts if packet.pts is not None else packet.dts
      if t is None:
        raise DecodeError("packets carry no timestamps; cannot address frames")
      pts.append(t)
      if packet.is_keyframe:
        keys.append(t)
  except av.FFmpegError as e:
    raise DecodeError(f"cannot read packets: {type(e).__name__}: {e}") from e
  if not pts:
    raise DecodeError("the video stream has no frames")
  if stream.frames and len(pts) < stream.frames:
    # The container's table promises more frames than the file holds (decord would fail too).
    raise DecodeError(f"truncated: the container lists {stream.frames} frames but only {len(pts)} can be read")
  pts_sorted = np.sort(np.asarray(pts, dtype=np.int64))
  if np.any(np.diff(pts_sorted) == 0):
    raise DecodeError("several frames share one timestamp; cannot address frames")
  keys_sorted = np.sort(np.asarray(keys or [pts_sorted[0]], dtype=np.int64))
  return VideoIndex(pts_sorted, keys_sorted, _fps(stream), stream.codec_context.width, stream.codec_context.height)


def probe(path: str | pathlib.Path) -> VideoIndex:
  """Returns the frame index of a video file."""
  container = _open(pathlib.Path(path))
  try:
    return build_index(container)
  finally:
    container.close()


def _frames(container, stream, wanted_pts):
  """Yields the decoded frames from the container's position, not decoding what nothing needs.

  A packet whose frame is not wanted is decoded with FFmpeg's `skip_frame` "NONREF": the decoder
  drops it if no other frame references it (an H.264/HEVC non-reference picture, an MPEG B-frame, a
  VP9 frame that refreshes no reference), and decodes it otherwise. No wanted frame and nothing a
  wanted frame is predicted from is skipped, so the wanted frames are the same pixels; about half
  the decoding of a typical sample of 100 frames goes. FFmpeg reads the setting when a packet is
  submitted, with or without frame threads.
  """
  context = stream.codec_context
  for packet in container.demux(stream):
    context.skip_frame = "DEFAULT" if packet.size == 0 or packet.pts in wanted_pts else "NONREF"
    yield from packet.decode()


def _decode_wanted(container, index: VideoIndex, wanted: Sequence[int], threads: int = 0,
                   deadline: float | None = None) -> dict[int, np.ndarray]:
  """Returns {frame index: uint8[H, W, 3] RGB} for the (sorted, unique) wanted frame indices.

  Raises DecodeError once `time.monotonic()` passes `deadline`.
  """
  import av

  stream = container.streams.video[0]
  if threads:
    stream.codec_context.thread_count = threads
  stream.thread_type = "AUTO"
  targets = [int(index.pts[i]) for i in wanted]
  slot = {t: i for t, i in zip(targets, wanted)}
  keys = index.keyframe_pts.tolist()

  def keyframe_before(t: int) -> int:
    return keys[max(bisect.bisect_right(keys, t) - 1, 0)]

  found: dict[int, np.ndarray] = {}
  n = 0
  position = None  # pts of the last decoded frame
  for _ in range(len(targets) + 1):  # at most one seek per wanted frame, plus the first
    if n == len(targets):
      break
    seek_to = keyframe_before(targets[n])
    container.seek(seek_to, stream=stream, backward=True, any_frame=False)
    progressed = False
    try:
      for frame in _frames(container, stream, slot):
        if frame.pts is None:
          raise DecodeError("decoded frames carry no timestamps")
        position = frame.pts
        progressed = True
        if deadline is not None and time.monotonic() > deadline:
          raise DecodeError(f"decoding went past the time limit at frame {len(found)} of the {len(targets)} "
                            "sampled (--time-limit)")
        # Frames that never appear (pts below the current one) are reported as missing below.
        while n < len(targets) and targets[n] < frame.pts:
          n += 1
        if n < len(targets) and targets[n] == frame.pts:
          found[slot[frame.pts]] = frame.to_ndarray(format="rgb24")
          n += 1
        # Seek again only once past where this seek aimed: a seek may land on an earlier keyframe.
        if n == len(targets) or (position >= seek_to and keyframe_before(targets[n]) > position):
          break
      else:
        break  # end of stream
    except av.FFmpegError as e:
      raise DecodeError(f"decoding failed near frame {wanted[min(n, len(wanted) - 1)]}: {type(e).__name__}: {e}") from e
    if not progressed:
      break
  return found


def read_frames(path: str | pathlib.Path, split: Sequence[float] | None = None,
                num_frames: int = sampling.NUM_FRAMES, threads: int = 0, time_limit: float = 0.0,
                max_bytes: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Returns (uint8[num_frames, H, W, 3] RGB frames, int32[num_frames] their indices) of a video.

  `threads`: FFmpeg's decoding threads for this video (0: its own choice). `time_limit` (seconds)
  and `max_bytes` (of the decoded frames), when above 0, turn a video that would take longer or
  more memory into a DecodeError before (memory) or while (time) it is decoded.
  """
  deadline = time.monotonic() + time_limit if time_limit > 0 else None
  container = _open(pathlib.Path(path))
  try:
    index = build_index(container)
    needed = num_frames * index.width * index.height * 3
    if max_bytes and needed > max_bytes:
      raise DecodeError(f"{num_frames} frames of {index.width}x{index.height} take {needed / 2**30:.2f} GiB decoded, "
                        f"above the limit of {max_bytes / 2**30:.2f} GiB (--max-video-gb)")
    try:
      indices = sampling.frame_indices(index.total_frames, index.fps, split, num_frames)
    except sampling.SamplingError as e:
      raise DecodeError(str(e)) from e
    wanted = sorted(set(indices.tolist()))
    found = _decode_wanted(container, index, wanted, threads, deadline)
  finally:
    container.close()
  missing = [i for i in wanted if i not in found]
  if missing:
    raise DecodeError(f"{len(missing)} of the sampled frames could not be decoded (first: frame {missing[0]} of "
                      f"{index.total_frames}); the file may be truncated or corrupt")
  shapes = {found[i].shape for i in wanted}
  if len(shapes) != 1:
    raise DecodeError(f"frame size changes inside the video ({sorted(shapes)})")
  return np.stack([found[i] for i in indices.tolist()]), indices
