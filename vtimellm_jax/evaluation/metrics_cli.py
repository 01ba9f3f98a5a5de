"""`vtimellm-jax metrics`: grounding and dense-captioning metrics of an answer log, as the release scores them.

  vtimellm-jax metrics --log eval_log.jsonl --data val_2.json [--task all] [--json] [--plot out.png]
  vtimellm-jax metrics --log charades_log.jsonl --data charades_sta_test.txt --durations Charades_v1_test.csv

Prints a table (or, with --json, one JSON line: soda_c, METEOR, CIDEr, mIoU, R1@0.3, R1@0.5, R1@0.7 in
percent, only the requested task's keys) and how many answers were malformed, by kind. Captioning
metrics need Java; grounding metrics do not, and are still reported when Java is missing.
"""

from __future__ import annotations

import argparse
import json
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--log", required=True, help="answer log: one JSON object per line (video_id, task, answer, info)")
  parser.add_argument("--data", required=True,
                      help="annotations: ActivityNet-style JSON (e.g. val_2.json) or a Charades-STA .txt")
  parser.add_argument("--durations", default=None,
                      help="video durations for a Charades-STA --data: Charades_v1_test.csv or JSON {id: seconds}")
  parser.add_argument("--task", choices=["grounding", "captioning", "all"], default="all")
  parser.add_argument("--json", action="store_true", help="print one JSON line of metrics (percent)")
  parser.add_argument("--plot", default=None, metavar="PNG", help="also draw timelines and the recall-vs-IoU curve")


def _problem_lines(name: str, malformed: int, total: int, problems: dict[str, int]) -> list[str]:
  lines = [f"{name}: {malformed} of {total} answers malformed"]
  lines += [f"  {count:6d}  {kind}" for kind, count in sorted(problems.items())]
  return lines


def _first_ten(items) -> str:
  items = list(items)
  return ", ".join(items[:10]) + (" ..." if len(items) > 10 else "")


def run(args: argparse.Namespace) -> int:
  # pylint: disable=import-outside-toplevel
  from vtimellm_jax.errors import UserError
  from vtimellm_jax.evaluation import annotations as annotations_lib
  from vtimellm_jax.evaluation import answer_log, captioning, coco_java, grounding

  log = answer_log.read_log(args.log)
  annotations = annotations_lib.read_annotations(args.data, args.durations)
  want = ("captioning", "grounding") if args.task == "all" else (args.task,)
  present = {r.task for r in log.records}
  if args.task == "all":
    want = tuple(t for t in want if t in present)
    if not want:
      raise UserError(f"{args.log}: no grounding or captioning answers in the log")

  metrics, notes, failure = {}, [], None
  caption_scores = grounding_scores = None
  if log.unreadable_lines:
    notes.append(f"{len(log.unreadable_lines)} log line(s) are not JSON and were skipped: "
                 f"line {_first_ten(map(str, log.unreadable_lines))}")
  if log.repeated_lines:
    notes.append(f"{len(log.repeated_lines)} log line(s) answer a query already answered and were not scored: "
                 f"{_first_ten(f'line {line} (first at line {first})' for line, first in log.repeated_lines)}")
  if "captioning" in want:
    try:
      caption_scores = captioning.score_captioning(log.records, annotations, args.log)
    except coco_java.JavaMissingError as e:
      if args.task == "captioning":
        raise
      # Grounding needs no Java: report it, then fail on the missing captioning metrics.
      failure = e
    else:
      metrics.update(caption_scores.metrics)
      notes += _problem_lines(f"captioning ({len(caption_scores.predictions)} videos)", caption_scores.malformed,
                              caption_scores.answers, caption_scores.problems)
  if "grounding" in want:
    grounding_scores = grounding.score_grounding(log.records, annotations, args.log)
    metrics.update(grounding_scores.metrics)
    notes += _problem_lines("grounding", grounding_scores.malformed, len(grounding_scores.ious),
                            grounding_scores.problems)

  if args.json:
    print(json.dumps(metrics))
    for line in notes:
      print(line, file=sys.stderr)
  else:
    print(f"{'metric':<10}{'value':>8}")
    for key, value in metrics.items():
      print(f"{key:<10}{value:8.2f}")
    print()
    print("\n".join(notes))

  if args.plot:
    from vtimellm_jax.evaluation import plot
    drawn = plot.plot_evaluation(args.plot, annotations, grounding_scores, caption_scores)
    print(f"wrote {args.plot} ({len(drawn)} videos)", file=sys.stderr if args.json else sys.stdout)

  if failure is not None:
    raise failure
  return 0
