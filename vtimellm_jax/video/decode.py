"""Decoding only the frames VTimeLLM samples, with PyAV (FFmpeg): seeking where the file allows it.

The release decodes with decord, whose frame i is the i-th frame in presentation order and whose
frame count is the number of video packets. We demux the packets first (cheap: no decoding) to get
every frame's timestamp and the keyframes, then decode forward from the keyframe before each
wanted frame, seeking again only when a later keyframe lies between where the decoder is and the
next wanted frame (seeking there skips decoding the frames in between).

Seeking needs timestamps that name frames and a container that seeks to them. Where the file says
otherwise, the video is decoded front to back and frame i is the i-th frame the decoder gives
(`VideoIndex.front_to_back` says why):
- MPEG program and transport streams (.mpg, .vob, .ts; any demuxer whose timestamps may jump) have
  no index: FFmpeg seeks them by a search over decode times, lands past the keyframe asked for, and
  the frames right after such a seek can carry shifted timestamps.
- Packets without timestamps, or several packets sharing one (the last two frames of an MPEG-1
  file), do not name frames.
- Timestamps in decode order on a stream with B-frames (H.264 in AVI, which stores no presentation
  times) do not name frames either: the decoder gives each reordered frame another's timestamp.
- A seek that lands past the frame it was for is retried at the keyframe's decode time (an AVI
  index is in decode time), then from the keyframe before; if those land past it too, the video is
  decoded front to back.

Packets an mp4/mov edit list hides (`ffmpeg -ss ... -c copy` keeps the GOP before the cut) are
decoded, since later frames are predicted from them, but are not frames: the decoder drops them
and the index does not count them. A display matrix (phone videos store portrait frames sideways)
turns the frames as the player and decord show them.
"""

from __future__ import annotations

import bisect
import dataclasses
import pathlib
import time
from collections.abc import Sequence

import numpy as np

from vtimellm_jax.video import sampling

# Every extension a video is looked for or listed by (`extract-features`, `chat`, `eval --videos`,
# `serve`, `demo`). The first three are the release's eval.py's, in its lookup order.
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".wmv", ".3gp",
                    ".ts", ".ogv")

# libavformat's AVFMT_NOTIMESTAMPS and AVFMT_TS_DISCONT: demuxers with no frame index to seek by.
_UNINDEXED_FORMAT_FLAGS = 0x0080 | 0x0200
_SEEK_TRIES = 4  # a keyframe's presentation then decode time, then the keyframe before's


class DecodeError(ValueError):
  """This file cannot be decoded (corrupt, truncated, not a video); the run reports it and goes on."""


@dataclasses.dataclass(frozen=True)
class VideoIndex:
  """The frames of a video stream, in presentation order."""

  total_frames: int  # frames the decoder shows (decord's len, less the packets an edit list hides)
  pts: np.ndarray  # int64[total_frames]: their timestamps in stream time base, sorted (empty if front_to_back)
  keyframe_pts: np.ndarray  # int64[K]: timestamps of keyframes, sorted (hidden ones included)
  keyframe_dts: np.ndarray  # int64[K]: their decode timestamps (the presentation ones where absent)
  fps: float  # average frame rate (decord's get_avg_fps)
  width: int  # as stored, before any display rotation
  height: int
  front_to_back: str | None = None  # why frames cannot be reached by seeking, None if they can


@dataclasses.dataclass(frozen=True)
class Sampled:
  """A video's sampled frames."""

  frames: np.ndarray  # uint8[num_frames, H, W, 3] RGB, as displayed
  indices: np.ndarray  # int32[num_frames]: their frame indices
  front_to_back: str | None  # why the video was decoded front to back, None if it was sought


def _reason(error: Exception) -> str:
  """Returns what went wrong, without the file name PyAV appends (every caller names the file once)."""
  text = getattr(error, "strerror", None) or str(error)
  return f"{type(error).__name__}: {text}"


def _open(path: pathlib.Path):
  import av

  try:
    container = av.open(str(path))
  except (av.FFmpegError, OSError, UnicodeDecodeError) as e:
    raise DecodeError(f"cannot open: {_reason(e)}") from e
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
  """Returns the presentation-order frames of the first video stream (demux only)."""
  import av

  stream = container.streams.video[0]
  pts, keys, untimed, hidden = [], [], 0, 0
  try:
    for packet in container.demux(stream):
      if packet.size == 0:  # the flush packet at the end
        continue
      t = packet.pts if packet.pts is not None else packet.dts
      if packet.is_keyframe and t is not None:
        keys.append((t, t if packet.dts is None else packet.dts))
      if packet.is_discard:  # hidden by an edit list: decoded for its references, never shown
        hidden += 1
        continue
      if t is None:
        untimed += 1
      else:
        pts.append(t)
  except av.FFmpegError as e:
    raise DecodeError(f"cannot read packets: {_reason(e)}") from e
  total = len(pts) + untimed
  if not total:
    raise DecodeError("the video stream has no frames")
  if stream.frames and total + hidden < stream.frames:
    # The container's table promises more frames than the file holds (decord would fail too).
    raise DecodeError(f"truncated: the container lists {stream.frames} frames but only {total + hidden} can be read")
  pts_sorted = np.sort(np.asarray(pts, dtype=np.int64))
  why = None
  if container.format.flags & _UNINDEXED_FORMAT_FLAGS:
    why = f"the {container.format.name} container has no frame index to seek by"
  elif untimed:
    why = f"{untimed} of {total} packets carry no timestamp"
  elif np.any(np.diff(pts_sorted) == 0):
    why = f"{len(pts_sorted) - len(np.unique(pts_sorted))} packets repeat another's timestamp"
  elif stream.codec_context.has_b_frames and len(pts) > 1 and np.all(np.diff(np.asarray(pts, np.int64)) > 0):
    # H.264 in AVI: the container stores no presentation times, FFmpeg numbers the packets in
    # decode order, and the decoder hands each reordered frame another packet's number.
    why = (f"the {container.format.name} container's timestamps are in decode order and the stream has "
           "B-frames, so they do not name frames")
  if not keys:  # no packet is flagged a keyframe: seeks go to the first frame
    keys = [(int(pts_sorted[0]),) * 2] if len(pts_sorted) else [(0, 0)]
  keys = np.asarray(sorted(keys), np.int64)
  return VideoIndex(total, pts_sorted if why is None else np.zeros(0, np.int64), keys[:, 0], keys[:, 1], _fps(stream),
                    stream.codec_context.width, stream.codec_context.height, why)


def probe(path: str | pathlib.Path) -> VideoIndex:
  """Returns the frame index of a video file."""
  container = _open(pathlib.Path(path))
  try:
    return build_index(container)
  finally:
    container.close()


def _rgb(frame) -> np.ndarray:
  """Returns uint8[H, W, 3] RGB of a decoded frame, turned as its display matrix says (decord does too)."""
  image = frame.to_ndarray(format="rgb24")
  quarter_turns = round(frame.rotation / 90) % 4  # counter-clockwise degrees of the display matrix
  return np.ascontiguousarray(np.rot90(image, quarter_turns)) if quarter_turns else image


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


class _SeekMissed(Exception):
  """Seeking cannot reach the wanted frames of this file: decode it front to back instead."""


def _check_deadline(deadline: float | None, found: int, total: int) -> None:
  if deadline is not None and time.monotonic() > deadline:
    raise DecodeError(f"decoding went past the time limit at frame {found} of the {total} sampled (--time-limit)")


def _seek_wanted(container, index: VideoIndex, wanted: Sequence[int], deadline: float | None
                 ) -> dict[int, np.ndarray]:
  """Returns {frame index: RGB} for the (sorted, unique) wanted frames, seeking between distant ones.

  Raises _SeekMissed when a seek lands past its frame even from an earlier keyframe, or the
  decoder gives a frame the index does not have.
  """
  stream = container.streams.video[0]
  targets = [int(index.pts[i]) for i in wanted]
  slot = {t: i for t, i in zip(targets, wanted)}
  known = set(index.pts.tolist())
  keys, keys_dts = index.keyframe_pts.tolist(), index.keyframe_dts.tolist()

  def keyframe_index(t: int) -> int:
    return max(bisect.bisect_right(keys, t) - 1, 0)

  found: dict[int, np.ndarray] = {}
  n = 0
  attempt = 0  # of _SEEK_TRIES for targets[n] (after a seek landed past it)
  while n < len(targets):
    key = keyframe_index(targets[n])
    seek_to = (keys if attempt % 2 == 0 else keys_dts)[max(key - attempt // 2, 0)]
    container.seek(seek_to, stream=stream, backward=True, any_frame=False)
    first, landed_past = True, False
    for frame in _frames(container, stream, slot):
      if frame.pts is None or frame.pts not in known:
        raise _SeekMissed(f"after a seek the decoder gave a frame the packets do not have (timestamp {frame.pts})")
      if first and frame.pts > targets[n]:
        landed_past = True
        break
      first = False
      _check_deadline(deadline, len(found), len(targets))
      if frame.pts == targets[n]:
        found[slot[frame.pts]] = _rgb(frame)
        n += 1
        attempt = 0
      elif frame.pts > targets[n]:
        # A frame the packets promise that the decoder did not give (a corrupt stretch): missing.
        while n < len(targets) and targets[n] < frame.pts:
          n += 1
        if n < len(targets) and targets[n] == frame.pts:
          found[slot[frame.pts]] = _rgb(frame)
          n += 1
      # Seek again only once past the keyframe this seek was for (it may land earlier, or have been
      # aimed earlier after landing past), and when a keyframe lies between here and the next frame.
      if n == len(targets) or keyframe_index(targets[n]) > max(keyframe_index(frame.pts), key):
        break
    else:
      break  # end of stream: what was not found is missing
    if landed_past:
      attempt += 1
      if attempt >= _SEEK_TRIES or key - attempt // 2 < 0:
        raise _SeekMissed("a seek landed past the frame it was for")
  return found


def _decode_in_order(container, wanted: Sequence[int], deadline: float | None) -> dict[int, np.ndarray]:
  """Returns {frame index: RGB} for the (sorted, unique) wanted frames, frame i being the i-th decoded."""
  stream = container.streams.video[0]
  stream.codec_context.skip_frame = "DEFAULT"
  wanted_set, last = set(wanted), wanted[-1]
  found: dict[int, np.ndarray] = {}
  position = 0
  for frame in container.decode(stream):
    if position in wanted_set:
      _check_deadline(deadline, len(found), len(wanted))
      found[position] = _rgb(frame)
    position += 1
    if position > last:
      break
  return found


def _decode_wanted(path: pathlib.Path, container, index: VideoIndex, wanted: Sequence[int], threads: int,
                   deadline: float | None) -> tuple[dict[int, np.ndarray], str | None]:
  """Returns ({frame index: RGB} of the wanted frames that decode, why they were decoded front to back)."""
  import av

  def setup(c):
    stream = c.streams.video[0]
    if threads:
      stream.codec_context.thread_count = threads
    stream.thread_type = "AUTO"

  why = index.front_to_back
  try:
    if why is None:
      setup(container)
      try:
        return _seek_wanted(container, index, wanted, deadline), None
      except _SeekMissed as e:
        why = str(e)
    # From a fresh demuxer: indexing read this one to the end (and failed seeks left it anywhere).
    with _open(path) as again:
      setup(again)
      return _decode_in_order(again, wanted, deadline), why
  except av.FFmpegError as e:
    raise DecodeError(f"decoding failed: {_reason(e)}") from e


def read_frames(path: str | pathlib.Path, split: Sequence[float] | None = None,
                num_frames: int = sampling.NUM_FRAMES, threads: int = 0, time_limit: float = 0.0,
                max_bytes: int = 0) -> Sampled:
  """Returns the `num_frames` frames the release samples from a video (and `split`, in seconds).

  `threads`: FFmpeg's decoding threads for this video (0: its own choice). `time_limit` (seconds)
  and `max_bytes` (of the decoded frames), when above 0, turn a video that would take longer or
  more memory into a DecodeError before (memory) or while (time) it is decoded.
  """
  path = pathlib.Path(path)
  deadline = time.monotonic() + time_limit if time_limit > 0 else None
  container = _open(path)
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
    found, why = _decode_wanted(path, container, index, wanted, threads, deadline)
  finally:
    container.close()
  missing = [i for i in wanted if i not in found]
  if missing:
    raise DecodeError(f"{len(missing)} of the sampled frames could not be decoded (first: frame {missing[0]} of "
                      f"{index.total_frames}); the file may be truncated or corrupt")
  shapes = {found[i].shape for i in wanted}
  if len(shapes) != 1:
    raise DecodeError(f"frame size changes inside the video ({sorted(shapes)})")
  return Sampled(np.stack([found[i] for i in indices.tolist()]), indices, why)
