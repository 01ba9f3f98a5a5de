"""Evaluation annotations: ActivityNet-style `{video_id: {duration, timestamps, sentences}}` files.

Every benchmark is brought into the one format the release's `eval.py` / `metric.py` read (the format
of ActivityNet Captions `val_2.json`):

  {"v_bXdq2zI1Ms0": {"duration": 73.1, "timestamps": [[6.94, 69.08], ...], "sentences": ["...", ...]}}

Adapters: ActivityNet Captions (native) and Charades-STA (`charades_sta_test.txt` lines
`VID START END##sentence`, plus a source of video durations: the Charades `Charades_v1_test.csv`
with its `id` and `length` columns, any CSV with `id`/`video_id` and `length`/`duration` columns, or a
JSON object `{video_id: seconds}` / `{video_id: {"duration": seconds}}`).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os

from vtimellm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class VideoAnnotation:
  """One video's ground truth: its length in seconds and its captioned moments, in file order."""

  duration: float
  timestamps: tuple[tuple[float, float], ...]
  sentences: tuple[str, ...]

  def to_json(self) -> dict:
    """Returns the ActivityNet-style dict of this video."""
    return {"duration": self.duration, "timestamps": [list(t) for t in self.timestamps],
            "sentences": list(self.sentences)}


Annotations = dict[str, VideoAnnotation]


def _number(value, where: str, what: str) -> float:
  """Returns `value` as a finite float, or raises a UserError naming `where`."""
  # bool is an int subclass; `true` as a duration is a typo, not a number.
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise UserError(f"{where}: {what} must be a finite number, got {value!r}")
  return float(value)


def parse_video(video_id: str, record, where: str) -> VideoAnnotation:
  """Returns the VideoAnnotation of one ActivityNet-style record, checking every field."""
  where = f"{where}, video {video_id!r}"
  if not isinstance(record, dict):
    raise UserError(f"{where}: expected an object with duration/timestamps/sentences, got {type(record).__name__}")
  missing = [k for k in ("duration", "timestamps", "sentences") if k not in record]
  if missing:
    raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
  duration = _number(record["duration"], where, "duration")
  if duration <= 0:
    raise UserError(f"{where}: duration must be positive, got {duration}")
  stamps, sentences = record["timestamps"], record["sentences"]
  if not isinstance(stamps, list) or not isinstance(sentences, list):
    raise UserError(f"{where}: timestamps and sentences must be lists")
  if len(stamps) != len(sentences):
    raise UserError(f"{where}: {len(stamps)} timestamps but {len(sentences)} sentences")
  if not stamps:
    raise UserError(f"{where}: no annotated moments")
  pairs = []
  for i, pair in enumerate(stamps):
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
      raise UserError(f"{where}: timestamps[{i}] must be [start, end], got {pair!r}")
    pairs.append((_number(pair[0], where, f"timestamps[{i}][0]"), _number(pair[1], where, f"timestamps[{i}][1]")))
  for i, sentence in enumerate(sentences):
    if not isinstance(sentence, str):
      raise UserError(f"{where}: sentences[{i}] must be a string, got {sentence!r}")
  return VideoAnnotation(duration, tuple(pairs), tuple(sentences))


def read_activitynet(path: str | os.PathLike) -> Annotations:
  """Returns the annotations of an ActivityNet-style JSON file (e.g. ActivityNet Captions val_2.json)."""
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except OSError as e:
    raise UserError(f"cannot read annotations {path}: {e.strerror or e}") from None
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"annotations {path} is not valid JSON: {e}") from None
  if not isinstance(data, dict):
    raise UserError(f"annotations {path}: expected a JSON object {{video_id: {{duration, timestamps, sentences}}}}, "
                    f"got a {type(data).__name__}")
  return {str(vid): parse_video(str(vid), record, path) for vid, record in data.items()}


def read_durations(path: str | os.PathLike) -> dict[str, float]:
  """Returns {video_id: seconds} from a Charades-style CSV or a JSON mapping."""
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8", newline="") as f:
      text = f.read()
  except OSError as e:
    raise UserError(f"cannot read durations {path}: {e.strerror or e}") from None
  if path.lower().endswith(".json"):
    return _durations_from_json(text, path)
  try:
    return _durations_from_csv(text, path)
  except csv.Error as e:
    raise UserError(f"durations {path}: not a readable CSV file: {e}") from None


def _durations_from_json(text: str, path: str) -> dict[str, float]:
  try:
    data = json.loads(text)
  except json.JSONDecodeError as e:
    raise UserError(f"durations {path} is not valid JSON: {e}") from None
  if not isinstance(data, dict):
    raise UserError(f"durations {path}: expected a JSON object {{video_id: seconds}}")
  durations = {}
  for vid, value in data.items():
    if isinstance(value, dict):
      value = value.get("duration")
    durations[str(vid)] = _positive(value, f"{path}, video {vid!r}")
  return durations


def _durations_from_csv(text: str, path: str) -> dict[str, float]:
  # Charades' CSV quotes free-text columns that may hold newlines, so rows are not lines.
  rows = csv.reader(io.StringIO(text))
  header = [h.strip().lower() for h in next(rows, [])]
  id_col = next((header.index(n) for n in ("id", "video_id", "vid") if n in header), None)
  len_col = next((header.index(n) for n in ("length", "duration") if n in header), None)
  if id_col is None or len_col is None:
    raise UserError(f"durations {path} line 1: need an id column (id/video_id) and a length column "
                    f"(length/duration), got header {header}")
  durations = {}
  for row in rows:
    if not row or not any(cell.strip() for cell in row):
      continue
    where = f"{path} line {rows.line_num}"
    if len(row) <= max(id_col, len_col):
      raise UserError(f"{where}: expected at least {max(id_col, len_col) + 1} columns, got {len(row)}")
    try:
      value = float(row[len_col])
    except ValueError:
      raise UserError(f"{where}: length {row[len_col]!r} is not a number") from None
    durations[row[id_col].strip()] = _positive(value, where)
  return durations


def _positive(value, where: str) -> float:
  seconds = _number(value, where, "duration")
  if seconds <= 0:
    raise UserError(f"{where}: duration must be positive, got {seconds}")
  return seconds


def read_charades_sta(path: str | os.PathLike, durations: dict[str, float] | str | os.PathLike) -> Annotations:
  """Returns the annotations of a Charades-STA file (`VID START END##sentence` lines), videos in file order.

  Args:
    path: e.g. `charades_sta_test.txt`.
    durations: {video_id: seconds}, or the path of a file `read_durations` accepts.
  """
  path = os.fspath(path)
  if not isinstance(durations, dict):
    durations = read_durations(durations)
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise UserError(f"cannot read Charades-STA file {path}: {e.strerror or e}") from None
  except UnicodeDecodeError as e:
    raise UserError(f"Charades-STA file {path} is not UTF-8 text: {e}") from None
  videos: dict[str, dict] = {}
  for line_no, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    where = f"{path} line {line_no}"
    head, sep, sentence = line.partition("##")
    fields = head.split()
    if not sep or len(fields) != 3:
      raise UserError(f"{where}: expected 'VIDEO_ID START END##sentence', got {line!r}")
    vid, start_text, end_text = fields
    try:
      start, end = float(start_text), float(end_text)
    except ValueError:
      raise UserError(f"{where}: start/end {start_text!r} {end_text!r} are not numbers") from None
    if not (math.isfinite(start) and math.isfinite(end)):
      raise UserError(f"{where}: start/end must be finite, got {start_text} {end_text}")
    if not sentence.strip():
      raise UserError(f"{where}: empty sentence")
    if vid not in durations:
      raise UserError(f"{where}: video {vid!r} has no duration in the durations source")
    video = videos.setdefault(vid, {"timestamps": [], "sentences": []})
    video["timestamps"].append((start, end))
    video["sentences"].append(sentence.strip())
  if not videos:
    raise UserError(f"Charades-STA file {path} has no annotation lines")
  return {vid: VideoAnnotation(durations[vid], tuple(v["timestamps"]), tuple(v["sentences"]))
          for vid, v in videos.items()}


def read_annotations(path: str | os.PathLike, durations: str | os.PathLike | None = None) -> Annotations:
  """Returns the annotations of `path`: Charades-STA for `.txt` files (needs `durations`), else ActivityNet JSON."""
  path = os.fspath(path)
  if path.lower().endswith(".txt"):
    if durations is None:
      raise UserError(f"{path} looks like a Charades-STA file; its video durations are needed too "
                      "(--durations Charades_v1_test.csv or a JSON {video_id: seconds})")
    return read_charades_sta(path, durations)
  return read_activitynet(path)


def write_annotations(annotations: Annotations, path: str | os.PathLike) -> None:
  """Writes `annotations` as an ActivityNet-style JSON file."""
  with open(path, "w", encoding="utf-8") as f:
    json.dump({vid: a.to_json() for vid, a in annotations.items()}, f, ensure_ascii=False)
