"""The release's benchmark run: every query of an annotation file answered into a resumable log.

Queries (the release's eval.py): per video, in annotation order, the dense-captioning query (task
"captioning", query_id 0) and then one grounding query per annotated sentence (task "grounding",
query_id 0, `info.sentence_id`). Log lines are the release's:

  {"video_id": ..., "task": "captioning", "query_id": 0, "answer": ...}
  {"video_id": ..., "task": "grounding", "query_id": 0, "answer": ..., "info": {"sentence_id": i, "iou": u}}

Unlike the release, many queries (of one or several videos) share a `generate` call, and each task
has its own answer budget: a batch holds queries of one task, so a grounding batch ("From 12 to
34.") stops at its short budget instead of the captioning one's 1,024 tokens. An answer that
reaches its budget without an eos is cut there and counted (`EvalSummary.truncated`). Each batch's
lines are appended and flushed as soon as it is answered, so a stopped run loses at most the batch
in flight; a rerun skips the queries already in the log and first cuts a torn last line (a run
killed mid-write), so the finished log has each query exactly once. A run that leaves nothing to
answer puts the log in the release's order (it is written task by task). Every query samples with
its own key (derived from the seed and the query's place in the full list), so the answers do not
depend on the batch size, on the grouping by task or on where a run was resumed.

`auto_batch_size` picks the batch from the device's free memory: the largest power of two whose KV
cache and prefill activations fit.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Callable, Mapping, Sequence

import jax
import numpy as np

from vtimellm_jax.data import records, templates
from vtimellm_jax.errors import UserError
from vtimellm_jax.evaluation import grounding
from vtimellm_jax.evaluation.annotations import Annotations
from vtimellm_jax.models import kv_cache
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
  # Per task, answers of this run that reached their token budget without an eos (cut there).
  truncated: dict[str, int] = dataclasses.field(default_factory=dict)
  log_reordered: bool = False  # the finished log was put in the release's query order


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


CPU_BATCH_SIZE = 8  # the batch where a device reports no memory figures (a CPU)
MAX_AUTO_BATCH_SIZE = 64  # beyond this the batch gains little: a decode step is bound by reading the weights


def auto_batch_size(memory_stats: Mapping[str, int] | None, config, prompt_positions: int, new_tokens: int, *,
                    cap: int = MAX_AUTO_BATCH_SIZE, default: int = CPU_BATCH_SIZE) -> tuple[int, str]:
  """Returns (batch size, why): the largest power of two <= `cap` whose answering fits the free device memory.

  A row holds its KV cache, num_layers x 2 (k, v) x slots x kv heads x head dim in the compute dtype
  (prompt_positions + new_tokens rounded up to the cache length `generate` allocates), plus the
  prefill's largest activations (one layer's float32 attention scores over the prompt and its MLP's
  gate and up projections). Free memory is `memory_stats`'
  bytes_limit - bytes_in_use, read after the model is loaded; a tenth of it (at least 1 GiB) is kept
  back for the logits, XLA's workspaces and fragmentation. Without memory figures (a CPU:
  `memory_stats()` is None) the batch is `default`.

  Args:
    memory_stats: `jax.Device.memory_stats()` of the device that answers, or None.
    config: the `LlamaConfig` of the language model.
    prompt_positions: the longest prompt in positions (frame features spliced in, text padded).
    new_tokens: the answer budget (max_new_tokens).
  """
  if not memory_stats or "bytes_limit" not in memory_stats:
    return default, f"{default}, the default where the device reports no free memory"
  free = int(memory_stats["bytes_limit"]) - int(memory_stats.get("bytes_in_use", 0))
  reserve = max(2**30, free // 10)
  itemsize = np.dtype(config.compute_dtype).itemsize
  slots = kv_cache.cache_length(prompt_positions + new_tokens)  # what `generate` allocates
  kv_row = kv_cache.bytes_per_position(config) * slots
  prefill_row = prompt_positions * (config.num_heads * prompt_positions * 4 + 2 * config.intermediate_size * itemsize)
  row = kv_row + prefill_row
  fits = (free - reserve) // row
  batch = 1
  while batch * 2 <= min(cap, fits):
    batch *= 2
  why = (f"{batch}: {row / 2**20:.0f} MiB a row (KV cache of {prompt_positions} + {new_tokens} positions in "
         f"{slots} slots, "
         f"{kv_row / 2**20:.0f} MiB, and prefill activations) in {free / 2**30:.1f} GiB free less "
         f"{reserve / 2**30:.1f} GiB kept back, at most {cap}")
  if fits < 1:
    why += "; not even one row fits: expect out-of-memory, lower the budget"
  return batch, why


def prompt_positions(answerer, questions: Sequence[str], num_frames: int = records.NUM_FRAMES) -> int:
  """Returns the most positions a prompt of `questions` takes: text padded as `Answerer` pads it, frames spliced in."""
  from vtimellm_jax.inference.answerer import PAD_MULTIPLE  # pylint: disable=g-import-not-at-top

  longest = max(len(answerer.prompt_ids((), question)) for question in questions)
  return -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE + num_frames - 1


def choose_batch_sizes(answerer, annotations: Annotations, task: str, budgets: Mapping[str, int],
                       batch_size: int | None, memory_stats: Mapping[str, int] | None) -> tuple[dict[str, int], str]:
  """Returns (batch size per task, one line saying why): `batch_size`, or `auto_batch_size` of each task's budget."""
  by_task: dict[str, list[Query]] = {}
  for q in build_queries(annotations, task):
    by_task.setdefault(q.task, []).append(q)
  if batch_size is not None:
    return {t: batch_size for t in by_task}, f"batch size {batch_size} (--batch-size)"
  config = answerer.model.config
  sizes, reasons = {}, []
  for t, queries in by_task.items():
    positions = prompt_positions(answerer, [q.question for q in queries])
    sizes[t], why = auto_batch_size(memory_stats, config, positions, budgets[t])
    reasons.append(f"{t} {why}")
  return sizes, "batch size auto: " + "; ".join(reasons)


def _sort_log(log_path: str | os.PathLike, annotations: Annotations) -> bool:
  """Rewrites a finished log in the release's query order; returns whether the order changed.

  Lines of queries the annotations do not hold keep their order, after the others. The new log
  replaces the old in one rename, so a kill leaves one of the two whole.
  """
  order = {q.key: q.index for q in build_queries(annotations, "all")}
  with open(log_path, encoding="utf-8") as f:
    lines = [line for line in f.read().split("\n") if line.strip()]

  def place(numbered):
    number, line = numbered
    index = order.get(_logged_key(json.loads(line)))
    return (0, index, number) if index is not None else (1, number, number)

  ordered = [line for _, line in sorted(enumerate(lines), key=place)]
  if ordered == lines:
    return False
  temporary = f"{log_path}.sorting"
  with open(temporary, "w", encoding="utf-8") as f:
    f.write("".join(line + "\n" for line in ordered))
    f.flush()
    os.fsync(f.fileno())
  os.replace(temporary, log_path)
  return True


def run_eval(answerer, annotations: Annotations, source, task: str, log_path: str | os.PathLike,
             config, *, batch_size: int | Mapping[str, int] = CPU_BATCH_SIZE,
             max_new_tokens: Mapping[str, int] | None = None, seed: int = 0, skip_missing: bool = False,
             max_batches: int | None = None, progress: bool = True,
             on_batch: Callable[[int], None] | None = None) -> EvalSummary:
  """Answers every query not yet in the log, appending log lines batch by batch; returns counts.

  Args:
    answerer: an `Answerer` (model + tokenizer).
    annotations: the benchmark's videos and sentences.
    source: a `FeatureSource` (video id -> float32[N, D] features).
    task: grounding, captioning or all.
    log_path: the JSON-lines log to append to (created if missing).
    config: a `GenerationConfig`; its max_new_tokens is the budget of a task `max_new_tokens` omits.
    batch_size: queries per generate call, or per task.
    max_new_tokens: answer budget per task (e.g. {"grounding": 128}).
    seed: sampling seed.
    skip_missing: skip (and count) videos without features instead of failing.
    max_batches: stop after this many batches (a partial run; rerun to continue).
    progress: show a tqdm progress bar on stderr.
    on_batch: called with the batch number after each batch's lines are written.
  """
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  queries = build_queries(annotations, task)
  batch_sizes = batch_size if isinstance(batch_size, Mapping) else {t: batch_size for t in TASKS}
  if any(batch_sizes[t] < 1 for t in {q.task for q in queries}):
    raise UserError(f"--batch-size must be at least 1, got {batch_size}")
  configs = {t: dataclasses.replace(config, max_new_tokens=(max_new_tokens or {}).get(t, config.max_new_tokens))
             for t in TASKS}
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
  # Task by task (in order of first appearance), each in query order: one budget per batch.
  batches = []
  for t in dict.fromkeys(q.task for q in pending):
    of_task = [q for q in pending if q.task == t]
    batches += [of_task[i:i + batch_sizes[t]] for i in range(0, len(of_task), batch_sizes[t])]
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
      batch_task = batch[0].task
      budget = configs[batch_task].max_new_tokens
      answers = answerer.answer([((), q.question) for q in batch], feats, configs[batch_task], keys,
                                batch_size=batch_sizes[batch_task])
      # An answer as long as its budget found no eos within it: it was cut.
      cut = sum(len(a.token_ids) >= budget for a in answers)
      if cut:
        summary.truncated[batch_task] = summary.truncated.get(batch_task, 0) + cut
      # One write per batch of complete lines, flushed: a kill can tear at most the last line.
      log.write("".join(log_line(q, a.text, annotations) + "\n" for q, a in zip(batch, answers)))
      log.flush()
      summary.answered += len(batch)
      bar.update(len(batch))
      if on_batch is not None:
        on_batch(number)
  bar.close()
  summary.remaining = len(pending) - summary.answered
  if summary.remaining == 0 and os.path.exists(log_path):
    summary.log_reordered = _sort_log(log_path, annotations)
  return summary
