"""`vtimellm-jax metrics` on the release's own example log reproduces the numbers the release printed."""

import json
import shutil

import pytest

from vtimellm_jax import cli

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="captioning metrics need Java")


def _expected(official_fixtures):
  with open(official_fixtures / "expected_metrics.json") as f:
    expected = json.load(f)
  return expected["captioning"], expected["grounding"]


def _run_json(capsys, *argv):
  rc = cli.main(["metrics", "--json", *argv])
  out = capsys.readouterr()
  lines = [line for line in out.out.splitlines() if line.strip()]
  assert len(lines) == 1, out.out
  return rc, json.loads(lines[0]), out.err


@needs_java
def test_example_log_matches_release_numbers(official_fixtures, capsys):
  captioning, grounding = _expected(official_fixtures)
  rc, metrics, err = _run_json(capsys, "--log", str(official_fixtures / "example_log.txt"),
                               "--data", str(official_fixtures / "data_example.json"))
  assert rc == 0
  assert set(metrics) == {"soda_c", "METEOR", "CIDEr", "mIoU", "R1@0.3", "R1@0.5", "R1@0.7"}
  for key, value in {**captioning, **grounding}.items():
    assert metrics[key] == pytest.approx(value, abs=0.01), key
  assert "0 of 2 answers malformed" in err and "0 of 6 answers malformed" in err


def test_example_log_grounding_only(official_fixtures, capsys):
  _, grounding = _expected(official_fixtures)
  rc, metrics, _ = _run_json(capsys, "--task", "grounding", "--log", str(official_fixtures / "example_log.txt"),
                             "--data", str(official_fixtures / "data_example.json"))
  assert rc == 0
  assert set(metrics) == set(grounding)
  for key, value in grounding.items():
    assert metrics[key] == pytest.approx(value, abs=0.01), key


def test_example_log_recomputed_ious_equal_logged_ones(official_fixtures):
  """The release stored its IoUs in `info.iou`; recomputing them from the answers must give the same."""
  from vtimellm_jax.evaluation import annotations, answer_log, grounding  # pylint: disable=import-outside-toplevel
  log = answer_log.read_log(official_fixtures / "example_log.txt")
  ann = annotations.read_activitynet(official_fixtures / "data_example.json")
  scores = grounding.score_grounding(log.records, ann)
  with open(official_fixtures / "example_log.txt") as f:
    logged = [json.loads(line)["info"]["iou"] for line in f if '"grounding"' in line]
  assert list(scores.ious) == logged


def test_without_java_grounding_still_reported(official_fixtures, capsys, monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no `java` on PATH
  rc = cli.main(["metrics", "--json", "--log", str(official_fixtures / "example_log.txt"),
                 "--data", str(official_fixtures / "data_example.json")])
  out = capsys.readouterr()
  assert rc == 2
  assert set(json.loads(out.out.strip())) == {"mIoU", "R1@0.3", "R1@0.5", "R1@0.7"}
  assert "need Java" in out.err and "Traceback" not in out.err

  rc = cli.main(["metrics", "--task", "captioning", "--log", str(official_fixtures / "example_log.txt"),
                 "--data", str(official_fixtures / "data_example.json")])
  out = capsys.readouterr()
  assert rc == 2 and "need Java" in out.err and out.out == ""


def test_a_repeated_answer_line_is_reported_and_scored_once(official_fixtures, capsys, tmp_path):
  """Concatenated or double-written logs: the release would count lines 2 and 5 twice (mIoU 34.57)."""
  _, grounding = _expected(official_fixtures)
  lines = (official_fixtures / "example_log.txt").read_text().splitlines()
  log = tmp_path / "log.txt"
  log.write_text("\n".join(lines + [lines[1], lines[4]]) + "\n")
  rc, metrics, err = _run_json(capsys, "--task", "grounding", "--log", str(log),
                               "--data", str(official_fixtures / "data_example.json"))
  assert rc == 0
  for key, value in grounding.items():
    assert metrics[key] == pytest.approx(value, abs=0.01), key
  assert "2 log line(s) answer a query already answered and were not scored: line 9 (first at line 2), " \
         "line 10 (first at line 5)" in err


def test_the_query_key_tells_sentences_and_videos_apart():
  from vtimellm_jax.evaluation import answer_log  # pylint: disable=import-outside-toplevel
  line = {"video_id": "v", "task": "grounding", "query_id": 0, "answer": "from 01 to 02", "info": {"sentence_id": 0}}
  other_sentence = {**line, "info": {"sentence_id": 1}}
  other_video = {**line, "video_id": "w"}
  changed_answer = {**line, "answer": "from 03 to 04"}
  log = answer_log.parse_log_lines([json.dumps(x) for x in (line, other_sentence, other_video, changed_answer)])
  assert [r.line for r in log.records] == [1, 2, 3]
  assert log.repeated_lines == ((4, 1),)
  assert log.records[0].answer == "from 01 to 02"  # the first answer is the one scored
