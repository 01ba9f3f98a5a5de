"""Grounding metrics against references written here from the release's metric rules (its metric.py), malformed answers included."""

import json
import random
import re

import pytest

from vtimellm_jax import cli
from vtimellm_jax.errors import UserError
from vtimellm_jax.evaluation import annotations, answer_log, grounding


def _reference_iou(answer: str, gt: tuple[float, float], duration: float) -> float:
  """The release's metric: first `(\\d{2}) (to|and) (\\d{2})`, / 100, IoU with gt / duration, rounded to 2; no match -> 0."""
  m = re.search(r"(\d{2}) (to|and) (\d{2})", answer)
  if not m:
    return 0.0
  a, b = int(m.group(1)) / 100, int(m.group(3)) / 100
  s, e = gt[0] / duration, gt[1] / duration
  inter = max(0.0, min(b, e) - max(a, s))
  union = max(b, e) - min(a, s)
  return round(inter / union, 2)


def _reference_metrics(ious):
  n = len(ious)
  return {"mIoU": 100 * sum(ious) / n, **{f"R1@{m}": 100 * sum(i >= m for i in ious) / n for m in (0.3, 0.5, 0.7)}}


def _write(tmp_path, ann: dict, records: list[dict]):
  data, log = tmp_path / "ann.json", tmp_path / "log.jsonl"
  data.write_text(json.dumps(ann))
  log.write_text("".join(json.dumps(r) + "\n" for r in records))
  return str(log), str(data)


def test_hand_computed_values():
  # gt [20, 60] of 100 s = [0.2, 0.6]; answer [0.30, 0.70]: inter 0.3, union 0.5 -> 0.6.
  assert grounding.span_iou(30, 70, 20.0, 60.0, 100.0) == 0.6
  # Disjoint: 0. Identical: 1.
  assert grounding.span_iou(70, 90, 20.0, 60.0, 100.0) == 0.0
  assert grounding.span_iou(20, 60, 20.0, 60.0, 100.0) == 1.0
  # gt [0, 5] of 17.56 s, answer 00-17: inter 0.17, union 5/17.56 -> 0.597... -> 0.6 (the fixture's value).
  assert grounding.span_iou(0, 17, 0.0, 5.0, 17.56) == 0.6


@pytest.mark.parametrize("answer, start, end, problems", [
    ("It happens from 10 to 25.", 10, 25, ()),
    ("between 07 and 42", 7, 42, ()),
    ("from 3 to 9, then 12 to 30", 12, 30, ()),  # single digits never match; the first two-digit span wins
    ("no moment here", None, None, (grounding.NO_TIMESTAMPS,)),
    ("from 60 to 20", 60, 20, (grounding.REVERSED,)),
    ("from 100 to 120", 0, 12, (grounding.OVER_99,)),  # read as "00 to 12", as the release reads it
    ("from 150 to 20", 50, 20, (grounding.OVER_99, grounding.REVERSED)),
])
def test_parse_answer(answer, start, end, problems):
  parsed = grounding.parse_answer(answer)
  assert (parsed.start, parsed.end) == (start, end)
  assert set(parsed.problems) == set(problems)


def test_random_logs_match_reference(tmp_path, capsys):
  rng = random.Random(3)
  ann, records, expected = {}, [], []
  templates = ["The event is from {a:02d} to {b:02d}.", "between {a:02d} and {b:02d}", "from {a} to {b}",
               "I cannot tell.", "from {c} to {d}", "{a:02d} to {b:02d} and later 10 to 20"]
  for v in range(6):
    duration = round(rng.uniform(5, 300), 2)
    stamps = []
    for _ in range(rng.randint(1, 5)):
      s = round(rng.uniform(0, duration), 2)
      stamps.append([s, round(rng.uniform(s, duration), 2)])
    ann[f"v{v}"] = {"duration": duration, "timestamps": stamps, "sentences": [f"s{i}" for i in range(len(stamps))]}
    for i, gt in enumerate(stamps):
      answer = rng.choice(templates).format(a=rng.randint(0, 99), b=rng.randint(0, 99), c=rng.randint(100, 300),
                                            d=rng.randint(0, 300))
      records.append({"video_id": f"v{v}", "task": "grounding", "query_id": 0, "answer": answer,
                      "info": {"sentence_id": i, "iou": -1}})  # the logged iou is not trusted
      expected.append(_reference_iou(answer, gt, duration))
  log, data = _write(tmp_path, ann, records)

  scores = grounding.score_grounding(answer_log.read_log(log).records, annotations.read_activitynet(data))
  assert list(scores.ious) == expected
  reference = _reference_metrics(expected)
  assert scores.metrics == pytest.approx(reference)

  assert cli.main(["metrics", "--json", "--task", "grounding", "--log", log, "--data", data]) == 0
  assert json.loads(capsys.readouterr().out) == pytest.approx(reference)


def test_malformed_answers_scored_and_counted(tmp_path, capsys):
  ann = {"v": {"duration": 50.0, "timestamps": [[0, 25], [10, 40], [0, 20], [0, 50], [5, 45]],
               "sentences": ["a", "b", "c", "d", "e"]}}
  answers = ["nothing useful", "from 40 to 10", "from 100 to 150", "from 00 to 99", '{"json": "not a span"}']
  records = [{"video_id": "v", "task": "grounding", "query_id": 0, "answer": a, "info": {"sentence_id": i}}
             for i, a in enumerate(answers)]
  log, data = _write(tmp_path, ann, records)
  with open(log, "a") as f:
    f.write('{"video_id": "v", "task": "grounding", "answ')  # a torn last line: skipped, reported
  assert cli.main(["metrics", "--task", "grounding", "--log", log, "--data", data]) == 0
  out = capsys.readouterr().out
  expected = [_reference_iou(a, ann["v"]["timestamps"][i], 50.0) for i, a in enumerate(answers)]
  assert expected[1] == 0.0 and expected[2] > 0  # reversed overlaps nothing; "00 to 15" is read from "100 to 150"
  reference = _reference_metrics(expected)
  assert f"mIoU         {reference['mIoU']:.2f}" in out.replace("\t", " ")
  assert "grounding: 4 of 5 answers malformed" in out
  assert re.search(r"2\s+no timestamps", out) and re.search(r"1\s+reversed", out) and re.search(r"1\s+value > 99", out)
  assert "1 log line(s) are not JSON" in out


@pytest.mark.parametrize("record, message", [
    ({"video_id": "zz", "task": "grounding", "answer": "from 10 to 20", "info": {"sentence_id": 0}}, "not in the annotations"),
    ({"video_id": "v", "task": "grounding", "answer": "from 10 to 20", "info": {"sentence_id": 7}}, "out of range"),
    ({"video_id": "v", "task": "grounding", "answer": "from 10 to 20"}, "sentence_id"),
    ({"video_id": "v", "task": "grounding"}, "missing field"),
])
def test_bad_log_records_name_the_line(tmp_path, capsys, record, message):
  ann = {"v": {"duration": 10.0, "timestamps": [[0, 5]], "sentences": ["a"]}}
  ok = {"video_id": "v", "task": "grounding", "answer": "from 10 to 20", "info": {"sentence_id": 0}}
  log, data = _write(tmp_path, ann, [ok, record])
  assert cli.main(["metrics", "--log", log, "--data", data]) == 2
  err = capsys.readouterr().err
  assert f"{log} line 2" in err and message in err and "Traceback" not in err
  with pytest.raises(UserError, match="line 2"):
    grounding.score_grounding(answer_log.read_log(log).records, annotations.read_activitynet(data), log)


def test_plot_written(tmp_path, capsys, official_fixtures):
  png = tmp_path / "eval.png"
  assert cli.main(["metrics", "--task", "grounding", "--log", str(official_fixtures / "example_log.txt"),
                   "--data", str(official_fixtures / "data_example.json"), "--plot", str(png)]) == 0
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
  assert "2 videos" in capsys.readouterr().out
