"""Annotation adapters: Charades-STA and ActivityNet into the evaluation format; bad input names file and line."""

import json

import pytest

from vtimellm_jax import cli
from vtimellm_jax.errors import UserError
from vtimellm_jax.evaluation import annotations

STA = """3MSZA 24.3 30.4##person turn a light on.
3MSZA 0.0 5.2##person is sitting on a chair.

0A8CF 1.5 7.9##a person is opening a door.
"""

# Charades' own CSV: quoted free text, one description spanning two lines.
CSV = """id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length
3MSZA,HR43,Kitchen,6,7,Yes,"A person turns on a light.","light","A person walks in,
turns the light on.",c001 0.0 5.0,30.96
0A8CF,XX11,Hallway,5,6,Yes,"Opens door.","door","Door.",c002 1.0 8.0,10.25
"""


def test_charades_from_csv(tmp_path):
  (tmp_path / "sta.txt").write_text(STA)
  (tmp_path / "Charades_v1_test.csv").write_text(CSV)
  ann = annotations.read_annotations(tmp_path / "sta.txt", tmp_path / "Charades_v1_test.csv")
  assert list(ann) == ["3MSZA", "0A8CF"]
  assert ann["3MSZA"] == annotations.VideoAnnotation(
      30.96, ((24.3, 30.4), (0.0, 5.2)), ("person turn a light on.", "person is sitting on a chair."))
  assert ann["0A8CF"].duration == 10.25 and ann["0A8CF"].timestamps == ((1.5, 7.9),)


def test_charades_from_json_durations_and_round_trip(tmp_path):
  (tmp_path / "sta.txt").write_text(STA)
  (tmp_path / "durations.json").write_text(json.dumps({"3MSZA": 30.96, "0A8CF": {"duration": 10.25}}))
  ann = annotations.read_charades_sta(tmp_path / "sta.txt", tmp_path / "durations.json")
  annotations.write_annotations(ann, tmp_path / "out.json")
  written = json.loads((tmp_path / "out.json").read_text())
  assert written["3MSZA"] == {"duration": 30.96, "timestamps": [[24.3, 30.4], [0.0, 5.2]],
                              "sentences": ["person turn a light on.", "person is sitting on a chair."]}
  assert annotations.read_activitynet(tmp_path / "out.json") == ann


@pytest.mark.parametrize("bad_line, message", [
    ("3MSZA 24.3##no end time", "expected 'VIDEO_ID START END##sentence'"),
    ("3MSZA 24.3 30.4 person without separator", "expected 'VIDEO_ID START END##sentence'"),
    ("3MSZA abc 30.4##words", "are not numbers"),
    ("3MSZA 1.0 2.0##   ", "empty sentence"),
    ("ZZZZZ 1.0 2.0##unknown video", "has no duration"),
])
def test_charades_bad_lines_name_the_line(tmp_path, bad_line, message):
  (tmp_path / "sta.txt").write_text(STA + bad_line + "\n")
  with pytest.raises(UserError) as err:
    annotations.read_charades_sta(tmp_path / "sta.txt", {"3MSZA": 30.96, "0A8CF": 10.25})
  assert "sta.txt line 5" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize("csv_text, message", [
    ("id,length\n3MSZA,30.96\n0A8CF,ten\n", "line 3: length 'ten' is not a number"),
    ("id,length\n3MSZA,-1\n", "line 2: duration must be positive"),
    ("name,seconds\n3MSZA,30\n", "line 1: need an id column"),
])
def test_bad_durations_name_the_line(tmp_path, csv_text, message):
  (tmp_path / "d.csv").write_text(csv_text)
  with pytest.raises(UserError, match=message):
    annotations.read_durations(tmp_path / "d.csv")


@pytest.mark.parametrize("record, message", [
    ({"duration": "long", "timestamps": [[0, 1]], "sentences": ["a"]}, "duration must be a finite number"),
    ({"duration": 10, "timestamps": [[0, 1], [2, 3]], "sentences": ["a"]}, "2 timestamps but 1 sentences"),
    ({"duration": 10, "timestamps": [[0]], "sentences": ["a"]}, r"timestamps\[0\] must be \[start, end\]"),
    ({"duration": 10, "sentences": ["a"]}, "missing field"),
])
def test_activitynet_errors_name_file_and_video(tmp_path, record, message):
  path = tmp_path / "val_2.json"
  path.write_text(json.dumps({"v_ok": {"duration": 5, "timestamps": [[0, 1]], "sentences": ["x"]}, "v_bad": record}))
  with pytest.raises(UserError, match=message) as err:
    annotations.read_activitynet(path)
  assert "val_2.json" in str(err.value) and "v_bad" in str(err.value)


def test_activitynet_fixture(official_fixtures):
  ann = annotations.read_activitynet(official_fixtures / "data_example.json")
  assert ann["v_CN01Gm2Yc4k"].duration == 17.56 and ann["v_CN01Gm2Yc4k"].timestamps[1] == (5.0, 12.2)
  assert ann["v_bXdq2zI1Ms0"].sentences[1] == " The man in front begins to do karate on the mat."


def test_metrics_cli_on_charades(tmp_path, capsys):
  (tmp_path / "sta.txt").write_text(STA)
  (tmp_path / "d.csv").write_text(CSV)
  log = tmp_path / "log.jsonl"
  # 3MSZA sentence 0 is [24.3, 30.4] of 30.96 s -> [0.785, 0.982]; "from 78 to 98" gives IoU 0.98 / 0.982.
  records = [("3MSZA", 0, "from 78 to 98"), ("3MSZA", 1, "no idea"), ("0A8CF", 0, "from 90 to 99")]
  log.write_text("".join(json.dumps({"video_id": v, "task": "grounding", "query_id": 0, "answer": a,
                                     "info": {"sentence_id": s}}) + "\n" for v, s, a in records))
  rc = cli.main(["metrics", "--json", "--log", str(log), "--data", str(tmp_path / "sta.txt"),
                 "--durations", str(tmp_path / "d.csv")])
  assert rc == 0
  metrics = json.loads(capsys.readouterr().out)
  iou = round((0.98 - 24.3 / 30.96) / (30.4 / 30.96 - 0.78), 2)
  assert metrics["mIoU"] == pytest.approx(100 * iou / 3)
  assert metrics["R1@0.7"] == pytest.approx(100 / 3)


def test_charades_without_durations_is_a_user_error(tmp_path, capsys):
  (tmp_path / "sta.txt").write_text(STA)
  (tmp_path / "log.jsonl").write_text("")
  assert cli.main(["metrics", "--log", str(tmp_path / "log.jsonl"), "--data", str(tmp_path / "sta.txt")]) == 2
  assert "--durations" in capsys.readouterr().err
