"""Which frames of a video VTimeLLM looks at: the release's 100-index rule, and per-video splits.

The release samples N = 100 frame indices with `linspace(start, end, N)` cast to int32, so the
first and last frame of the range are both included. Without a split the range is the whole video
[0, T - 1]; with a split [s, e] in seconds it is [max(int(fps * s), 0), min(int(fps * e), T - 1)]
where fps is the stream's average frame rate. A frame index is a position in presentation order.
"""

from __future__ import annotations

import json
import pathlib
import sys
from collections.abc import Sequence

import numpy as np

from vtimellm_jax.data.records import NUM_FRAMES
from vtimellm_jax.errors import UserError


class SamplingError(ValueError):
  """The requested range holds no frame of this video (reported per video, the run goes on)."""


def frame_range(total_frames: int, fps: float, split: Sequence[float] | None = None) -> tuple[int, int]:
  """Returns the release's inclusive (start, end) frame range for a video and an optional split."""
  if total_frames <= 0:
    raise SamplingError("the video has no frames")
  if split is None:
    return 0, total_frames - 1
  if not fps > 0:
    raise SamplingError(f"cannot apply split {list(split)}: the stream has no usable frame rate")
  s, e = split
  start = max(int(fps * s), 0)
  end = min(int(fps * e), total_frames - 1)
  if start > end:
    raise SamplingError(f"split [{s}, {e}] s selects frames {start}..{end}, outside the video's {total_frames} "
                        f"frames at {fps:g} fps")
  return start, end


def frame_indices(total_frames: int, fps: float, split: Sequence[float] | None = None,
                  num_frames: int = NUM_FRAMES) -> np.ndarray:
  """Returns int32[num_frames]: `linspace(start, end, num_frames)` truncated, as the release samples."""
  start, end = frame_range(total_frames, fps, split)
  # The values are non-negative, so truncation (the release's int32 cast) equals floor.
  return np.floor(np.linspace(start, end, num_frames)).astype(np.int32)


def _check_split(value, where: str) -> tuple[float, float]:
  ok = (isinstance(value, (list, tuple)) and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
  if not ok:
    raise UserError(f"{where}: a split must be [start_seconds, end_seconds], got {value!r}")
  s, e = float(value[0]), float(value[1])
  if not (0 <= s <= e):
    raise UserError(f"{where}: split [{s}, {e}] needs 0 <= start <= end")
  return s, e


def load_data_file(path: str | pathlib.Path) -> tuple[list[str], dict[str, tuple[float, float]]]:
  """Returns (the video ids a stage-2/3 data file uses, each once in file order; their splits).

  The file is read and parsed once (a release data file has ~100k records).
  """
  data = _read_json(path)
  if not isinstance(data, list):
    raise UserError(f"{path}: expected a stage-2/3 data file (a list of records), got {type(data).__name__}")
  return list(dict.fromkeys(str(record["id"]) for record in _records(data, path))), _record_splits(data, path)


def _records(data: list, path) -> list[dict]:
  for n, record in enumerate(data):
    if not isinstance(record, dict) or "id" not in record:
      raise UserError(f"{path}, record {n}: expected an object with an 'id'")
  return data


def _read_json(path: str | pathlib.Path):
  path = pathlib.Path(path)
  try:
    return json.loads(path.read_text())
  except FileNotFoundError as e:
    raise UserError(f"{path}: file not found") from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: not valid JSON ({e})") from e


def load_splits(path: str | pathlib.Path) -> dict[str, tuple[float, float]]:
  """Returns {video id: (start s, end s)} from a splits JSON file.

  Accepted forms: `{"id": [s, e], ...}`, or a stage-2/3 data file (a list of records with "id"
  and an optional "meta": {"split": [s, e]}); records without a split are left out (whole video).
  """
  path = pathlib.Path(path)
  data = _read_json(path)
  splits: dict[str, tuple[float, float]] = {}
  if isinstance(data, dict):
    for vid, value in data.items():
      splits[str(vid)] = _check_split(value, f"{path}, id {vid!r}")
    return splits
  if not isinstance(data, list):
    raise UserError(f"{path}: expected an object {{id: [s, e]}} or a list of data records, got {type(data).__name__}")
  return _record_splits(data, path)


def _record_splits(data: list, path) -> dict[str, tuple[float, float]]:
  """Returns {id: split} of data records' `meta.split`s; an id with several keeps its first (warned)."""
  splits: dict[str, tuple[float, float]] = {}
  conflicts = []
  for n, record in enumerate(_records(data, path)):
    meta = record.get("meta") or {}
    if not isinstance(meta, dict) or meta.get("split") is None:
      continue
    vid = str(record["id"])
    split = _check_split(meta["split"], f"{path}, record {n} (id {vid!r})")
    if vid in splits and splits[vid] != split:
      conflicts.append(f"{vid}: {list(splits[vid])} kept, {list(split)} (record {n}) ignored")
      continue
    splits[vid] = split
  if conflicts:
    # One .npy per id cannot hold two ranges; the release's features have the same limitation.
    print(f"warning: {path}: {len(conflicts)} id(s) have several different splits, the first is used:\n  "
          + "\n  ".join(conflicts[:20]) + ("\n  ..." if len(conflicts) > 20 else ""), file=sys.stderr)
  return splits
