"""The release's benchmark run: every query of an annotation file answered into a resumable log.

Queries (the release's eval.py): per video, in annotation order, the dense-captioning query (task
"captioning", query_id 0) and then one grounding query per annotated sentence (task "grounding",
query_id 0, `info.sentence_id`). Log lines are the release's:

  {"video_id": ..., "task": "captioning", "query_id": 0, "answer": ...}
  {"video_id": ..., "task": "grounding", "query_id": 0, "answer": ..., "info": {"sentence_id": i, "iou": u}}

Unlike the release, many queries (of one or several videos) share a `generate` call. Each batch's
lines are appended and flushed as soon as it is answered, so a stopped run loses at most the batch
in flight; a rerun skips the queries already in the log and first cuts a torn last line (a run
killed mid-write), so the finished log has each query exactly once. Every query samples with its
own key (derived from the seed and the query's place in the full list), so the answers do not
depend on the batch size or on where a run was resumed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable

import jax

from vtimellm_jax.data import templates
from vtimellm_jax.errors import UserError
from vtimellm_jax.evaluation import grounding
from vtimellm_jax.evaluation.annotations import Annotations
# One list of tasks and one query key for the log's writer and reader.
from vtimellm_jax.evaluation.answer_log import TASKS, query_key


@dataclasses.dataclass(frozen=True)
class Query:
  """One benchmark question; `index` is its place in the full query list (its sampling key)."""

  index: int
  video_id: str
  task: str
  question: str
  sentence_id: int | None = None

  @property
  def key(self) -> tuple:
    return (self.video_id, self.task, 0, self.sentence_id)


@dataclasses.dataclass
class EvalSummary:
  total: int = 0  # queries of the annotation file for the chosen task(s)
  already_done: int = 0  # found in the log at start
  answered: int = 0  # answered in this run
  skipped_videos: list[str] = dataclasses.field(default_factory=list)  # no features (--skip-missing)
  torn_line_removed: bool = False
  remaining: int = 0  # still to answer (a partial run with max_batches)


def build_queries(annotations: Annotations, task: str) -> list[Query]:
  """Returns the release's queries of `annotations` for task grounding, captioning or all, in its order."""
  if task not in TASKS + ("all",):
    raise UserError(f"--task must be grounding, captioning or all, got {task!r}")
  queries = []
  for video_id, video in annotations.items():
    if task in ("captioning", "all"):
      queries.append(Query(len(queries), video_id, "captioning", templates.captioning_question()))
    if task in ("grounding", "all"):
      for sentence_id, sentence in enumerate(video.sentences):
        queries.append(Query(len(queries), video_id, "grounding", templates.grounding_question(sentence), sentence_id))
  return queries


def log_line(query: Query, answer: str, annotations: Annotations) -> str:
  """Returns the release's JSON log line (no newline) of an answered query, with the IoU for grounding."""
  record = {"video_id": query.video_id, "task": query.task, "query_id": 0, "answer": answer}
  if query.task == "grounding":
    video = annotations[query.video_id]
    parsed = grounding.parse_answer(answer)
    iou = 0
    if parsed.start is not None:
      start, end = video.timestamps[query.sentence_id]
      iou = grounding.span_iou(parsed.start, parsed.end, start, end, video.duration)
    record["info"] = {"sentence_id": query.sentence_id, "iou": iou}
  return json.dumps(record)


def _logged_key(obj) -> tuple | None:
  if not isinstance(obj, dict) or obj.get("task") not in TASKS:
    return None
  return query_key(obj)


def read_done(log_path: str | os.PathLike, summary: EvalSummary) -> set[tuple]:
  """Returns the keys of the queries already in the log, after cutting a torn (unterminated) last line."""
  if not os.path.exists(log_path):
    return set()
  try:
    with open(log_path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise UserError(f"cannot read the log {log_path}: {e.strerror or e}") from None
  if data and not data.endswith(b"\n"):
    # Only a killed write leaves a line without its newline: drop it, its query is asked again.
    cut = data.rfind(b"\n") + 1
    with open(log_path, "r+b") as f:
      f.truncate(cut)
    data = data[:cut]
    summary.torn_line_removed = True
  done = set()
  for line_no, line in enumerate(data.decode("utf-8", errors="replace").split("\n"), start=1):
    if not line.strip():
      continue
    try:
      key = _logged_key(json.loads(line))
    except json.JSONDecodeError:
      raise UserError(f"{log_path} line {line_no}: not a JSON log line; fix or remove it, or write to "
                      "another --out") from None
    if key is not None:
      done.add(key)
  return done


def run_eval(answerer, annotations: Annotations, source, task: str, log_path: str | os.PathLike,
             config, *, batch_size: int = 8, seed: int = 0, skip_missing: bool = False,
             max_batches: int | None = None, progress: bool = True,
             on_batch: Callable[[int], None] | None = None) -> EvalSummary:
  """Answers every query not yet in the log, appending log lines batch by batch; returns counts.

  Args:
    answerer: an `Answerer` (model + tokenizer).
    annotations: the benchmark's videos and sentences.
    source: a `FeatureSource` (video id -> float32[N, D] features).
    task: grounding, captioning or all.
    log_path: the JSON-lines log to append to (created if missing).
    config: a `GenerationConfig`.
    batch_size: queries per generate call.
    seed: sampling seed.
    skip_missing: skip (and count) videos without features instead of failing.
    max_batches: stop after this many batches (a partial run; rerun to continue).
    progress: show a tqdm progress bar on stderr.
    on_batch: called with the batch number after each batch's lines are written.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  if batch_size < 1:
    raise UserError(f"--batch-size must be at least 1, got {batch_size}")
  queries = build_queries(annotations, task)
  summary = EvalSummary(total=len(queries))
  done = read_done(log_path, summary)
  pending = [q for q in queries if q.key not in done]
  summary.already_done = len(queries) - len(pending)
  missing = sorted({q.video_id for q in pending if source.locate(q.video_id) is None})
  if missing and not skip_missing:
    shown = "\n".join(f"  - {vid}: {source.describe_lookup(vid)} not found" for vid in missing[:10])
    more = f"\n  ... and {len(missing) - 10} more" if len(missing) > 10 else ""
    raise UserError(f"{len(missing)} video(s) have no features:\n{shown}{more}\n"
                    "(--skip-missing skips them, as the release does)")
  summary.skipped_videos = missing
  pending = [q for q in pending if q.video_id not in set(missing)]
  base_key = jax.random.key(seed)
  batches = [pending[i:i + batch_size] for i in range(0, len(pending), batch_size)]
  if max_batches is not None:
    batches = batches[:max_batches]
  bar = tqdm(total=len(pending), desc="eval", unit="query", disable=not progress, file=sys.stderr)
  with open(log_path, "a", encoding="utf-8") as log:
    for number, batch in enumerate(batches, start=1):
      feats = [source(q.video_id) for q in batch]
      counts = {(q.video_id, f.shape[0]) for q, f in zip(batch, feats)}
      if len({n for _, n in counts}) > 1:
        # Batched queries share one sequence length: every video needs the same number of frames.
        shown = ", ".join(f"{vid}: {n}" for vid, n in sorted(counts))
        raise UserError(f"feature files with different frame counts in one batch ({shown}); "
                        "evaluation expects [100, 768] per video")
      keys = jax.numpy.stack([jax.random.fold_in(base_key, q.index) for q in batch])
      answers = answerer.answer([((), q.question) for q in batch], feats, config, keys, batch_size=batch_size)
      # One write per batch of complete lines, flushed: a kill can tear at most the last line.
      log.write("".join(log_line(q, a.text, annotations) + "\n" for q, a in zip(batch, answers)))
      log.flush()
      summary.answered += len(batch)
      bar.update(len(batch))
      if on_batch is not None:
        on_batch(number)
  bar.close()
  summary.remaining = len(pending) - summary.answered
  return summary
