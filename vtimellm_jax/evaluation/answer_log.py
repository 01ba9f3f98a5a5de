"""The answer log written during evaluation: one JSON object per line.

Each line is what the release's `eval.py` appends per query:
  {"video_id": "v_x", "task": "grounding", "query_id": 0, "answer": "...", "info": {"sentence_id": 1, "iou": 0.2}}
  {"video_id": "v_x", "task": "captioning", "query_id": 0, "answer": "..."}
`info.iou` is what the release computed at generation time; metrics are recomputed here from the
answer and the annotations, so a log is scored the same whoever wrote it. A query is
(video_id, task, query_id, info.sentence_id); a line that answers a query an earlier line already
answered (logs concatenated, or a run resumed by a writer that does not check) is reported and not
scored, where the release's metric script would count it twice.
"""

from __future__ import annotations

import dataclasses
import json
import os

from vtimellm_jax.errors import UserError

TASKS = ("grounding", "captioning")


@dataclasses.dataclass(frozen=True)
class LogRecord:
  """One answered query; `line` is its 1-based line number in the log file."""

  line: int
  video_id: str
  task: str
  answer: str
  sentence_id: int | None = None


@dataclasses.dataclass(frozen=True)
class AnswerLog:
  """The records of a log, one per query, and the lines that were skipped.

  `unreadable_lines` were not JSON (skipped, as the release does); `repeated_lines` holds
  (line, first line) for each line that answers a query already answered at `first line`.
  """

  path: str
  records: tuple[LogRecord, ...]
  unreadable_lines: tuple[int, ...] = ()
  repeated_lines: tuple[tuple[int, int], ...] = ()


def query_key(obj: dict) -> tuple:
  """Returns the query a decoded log line answers: (video_id, task, query_id, sentence_id or None)."""
  info = obj.get("info")
  sentence_id = info.get("sentence_id") if obj.get("task") == "grounding" and isinstance(info, dict) else None
  return (obj.get("video_id"), obj.get("task"), obj.get("query_id"), sentence_id)


def parse_record(obj, where: str, line: int) -> LogRecord | None:
  """Returns the LogRecord of one decoded line, None for tasks other than ours; raises UserError if malformed."""
  if not isinstance(obj, dict):
    raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
  missing = [k for k in ("video_id", "task", "answer") if k not in obj]
  if missing:
    raise UserError(f"{where}: missing field(s) {', '.join(missing)}")
  task = obj["task"]
  if task not in TASKS:
    # The release filters by task too; other tasks are someone else's queries.
    return None
  if not isinstance(obj["video_id"], str):
    raise UserError(f"{where}: video_id must be a string, got {obj['video_id']!r}")
  if not isinstance(obj["answer"], str):
    raise UserError(f"{where}: answer must be a string, got {obj['answer']!r}")
  sentence_id = None
  if task == "grounding":
    info = obj.get("info")
    sentence_id = info.get("sentence_id") if isinstance(info, dict) else None
    if isinstance(sentence_id, bool) or not isinstance(sentence_id, int):
      raise UserError(f"{where}: a grounding record needs an integer info.sentence_id, got info={info!r}")
  return LogRecord(line, obj["video_id"], task, obj["answer"], sentence_id)


def parse_log_lines(lines: list[str], path: str = "<log>") -> AnswerLog:
  """Returns the AnswerLog of the given lines (`path` only names the source in messages)."""
  records, unreadable, repeated, first_line = [], [], [], {}
  for line_no, text in enumerate(lines, start=1):
    if not text.strip():
      continue
    try:
      obj = json.loads(text)
    except json.JSONDecodeError:
      # A run killed mid-write leaves a torn last line; the release skips such lines and so do we.
      unreadable.append(line_no)
      continue
    record = parse_record(obj, f"{path} line {line_no}", line_no)
    if record is None:
      continue
    first = first_line.setdefault(query_key(obj), line_no)
    if first != line_no:
      repeated.append((line_no, first))
      continue
    records.append(record)
  return AnswerLog(path, tuple(records), tuple(unreadable), tuple(repeated))


def read_log(path: str | os.PathLike) -> AnswerLog:
  """Returns the AnswerLog of a JSON-lines answer log file."""
  path = os.fspath(path)
  try:
    with open(path, encoding="utf-8") as f:
      # Only "\n" ends a record (as when the release iterates the file); str.splitlines would also
      # split inside answers holding U+2028 and friends.
      lines = f.read().split("\n")
  except OSError as e:
    raise UserError(f"cannot read answer log {path}: {e.strerror or e}") from None
  except UnicodeDecodeError as e:
    raise UserError(f"answer log {path} is not UTF-8 text: {e}") from None
  return parse_log_lines(lines, path)
