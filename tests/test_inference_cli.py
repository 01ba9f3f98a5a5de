"""`chat` and `eval` end to end on a tiny model directory, against HF generate on the same weights."""

import io
import os
import json
import re

import numpy as np
import pytest

from inference_fixtures import SYSTEM, tiny_vtimellm, write_features  # noqa: F401
from vtimellm_jax import cli
from vtimellm_jax.data import tokenizer as tokenizer_lib

GROUNDING_Q = "During which frames can we see {}?"
CAPTIONING_Q = ('Could you please describe the events in the video in detail? Be specific about the activities '
                'of individuals, their surroundings, and interactions with others. The output should be in JSON '
                'format, structured as follows: {"event": "xx", "timestamps": "from xx to xx"}.')


def _run(argv, capsys, monkeypatch=None, stdin=None):
  if stdin is not None:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def _v1(*rounds):
  """Returns the Vicuna v1 prompt of (question, answer) rounds, the last answer None (SPEC section 2)."""
  text = SYSTEM + " "
  for question, answer in rounds:
    text += "USER: " + question + " " + ("ASSISTANT:" if answer is None else "ASSISTANT: " + answer + "</s>")
  return text


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
  folder = tmp_path_factory.mktemp("feat")
  return folder, write_features(folder, ["v1", "v2", "v3"])


def test_chat_query_json_equals_hf_greedy(tiny_vtimellm, feats, capsys):
  folder, arrays = feats
  query = "During which frames can we see a man walks?"
  code, out, err = _run(["chat", "--model", tiny_vtimellm.model_dir, "--features", folder / "v1.npy", "--query", query,
                         "--temperature", "0", "--max-new-tokens", "6", "--json"], capsys)
  assert code == 0, err
  result = json.loads(out)
  assert result["token_ids"] == tiny_vtimellm.hf_greedy(_v1(("<video>\n" + query, None)), arrays["v1"], 6)
  assert len(result["token_ids"]) > 0 and isinstance(result["answer"], str)
  assert result["moments"] is None  # no duration known


def test_chat_sets_the_answering_xla_flags(tiny_vtimellm, feats, capsys, monkeypatch):
  """chat leaves GPU matmuls to cuBLAS (vtimellm_jax/xla_flags.py) and keeps the user's flags."""
  folder, _ = feats
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  code, _, err = _run(["chat", "--model", tiny_vtimellm.model_dir, "--features", folder / "v1.npy", "--query", "hi",
                       "--max-new-tokens", "2"], capsys)
  assert code == 0, err
  assert os.environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8",
                                             "--xla_gpu_enable_triton_gemm=false"]


def test_chat_session_keeps_history(tiny_vtimellm, feats, capsys, monkeypatch):
  folder, arrays = feats
  code, out, err = _run(["chat", "--model", tiny_vtimellm.model_dir, "--features", folder / "v2.npy",
                         "--temperature", "0", "--max-new-tokens", "5", "--json", "--duration", "50"],
                        capsys, monkeypatch, stdin="describe the video\n\nwhat is the dog doing\nexit\nnever asked\n")
  assert code == 0, err
  first, second = [json.loads(line) for line in out.strip().split("\n")]
  q1 = "<video>\ndescribe the video"
  assert first["token_ids"] == tiny_vtimellm.hf_greedy(_v1((q1, None)), arrays["v2"], 5)
  prompt2 = _v1((q1, first["answer"]), ("what is the dog doing", None))
  assert second["token_ids"] == tiny_vtimellm.hf_greedy(prompt2, arrays["v2"], 5)
  assert second["moments"] == []  # duration known, no moment in a random model's answer


def test_chat_top_k_one_samples_the_greedy_answer(tiny_vtimellm, feats, capsys):
  # --top-k reaches the sampler: with k = 1 a draw at temperature 1 can only be the argmax.
  folder, _ = feats
  answers = []
  for sampling in (["--temperature", "0"], ["--temperature", "1", "--top-k", "1", "--seed", "3"]):
    code, out, err = _run(["chat", "--model", tiny_vtimellm.model_dir, "--features", folder / "v1.npy",
                           "--query", "describe the video", "--max-new-tokens", "6", "--json", *sampling], capsys)
    assert code == 0, err
    answers.append(json.loads(out)["token_ids"])
  assert answers[0] == answers[1]


@pytest.mark.parametrize("command", ["chat", "eval"])
def test_negative_top_k_is_a_user_error(tiny_vtimellm, feats, tmp_path, capsys, command):
  folder, _ = feats
  source = (["--features", folder / "v1.npy", "--query", "hi"] if command == "chat" else
            ["--features", folder, "--data", tmp_path / "ann.json", "--out", tmp_path / "log.jsonl"])
  with pytest.raises(SystemExit) as e:  # argparse refuses it before anything loads
    _run([command, "--model", tiny_vtimellm.model_dir, *source, "--top-k", "-1"], capsys)
  err = capsys.readouterr().err
  assert e.value.code == 2 and "argument --top-k: must be >= 0, got -1" in err and "Traceback" not in err


@pytest.mark.parametrize("content,message", [
    (np.zeros((100, 512), np.float16), "expected [N, 768]"),
    (np.zeros((2, 100, 768), np.float16), "expected [N, 768]"),
    (None, "not found"),
])
def test_chat_bad_features_are_user_errors(tiny_vtimellm, tmp_path, capsys, content, message):
  path = tmp_path / "f.npy"
  if content is not None:
    np.save(path, content)
  code, _, err = _run(["chat", "--model", tiny_vtimellm.model_dir, "--features", path, "--query", "hi"], capsys)
  assert code == 2 and message in err and str(path) in err and "Traceback" not in err


def _annotations(path):
  data = {
      "v1": {"duration": 40.0, "timestamps": [[0.0, 10.0], [12.5, 40.0]],
             "sentences": ["  A man walks into the kitchen.", "The dog Jumps."]},
      "v2": {"duration": 20.0, "timestamps": [[5.0, 15.0]], "sentences": ["woman is counting money"]},
      "v3": {"duration": 90.0, "timestamps": [[1.0, 2.0], [3.0, 80.0]], "sentences": ["Cooking.", "runs."]},
  }
  path.write_text(json.dumps(data))
  return data


def _eval(tiny, data, features, out, capsys, *extra):
  return _run(["eval", "--model", tiny.model_dir, "--data", data, "--features", features, "--out", out,
               "--temperature", "0", "--max-new-tokens", "4", "--no-progress", *extra], capsys)


def _release_iou(answer, start, end, duration):
  m = re.search(r"(\d{2}) (to|and) (\d{2})", answer)
  if not m:
    return 0
  s, e, gs, ge = int(m.group(1)) / 100, int(m.group(3)) / 100, start / duration, end / duration
  return round(max(0, min(e, ge) - max(s, gs)) / (max(e, ge) - min(s, gs)), 2)


def test_eval_is_resumable_and_writes_the_release_log(tiny_vtimellm, feats, tmp_path, capsys):
  folder, arrays = feats
  data = _annotations(tmp_path / "ann.json")
  full, resumed = tmp_path / "full.jsonl", tmp_path / "resumed.jsonl"
  code, _, err = _eval(tiny_vtimellm, tmp_path / "ann.json", folder, full, capsys, "--batch-size", "4")
  assert code == 0, err
  # Stop after one batch, tear the last line as a kill mid-write would, then rerun.
  code, _, err = _eval(tiny_vtimellm, tmp_path / "ann.json", folder, resumed, capsys, "--batch-size", "3",
                       "--max-batches", "1")
  assert code == 0 and len(resumed.read_text().splitlines()) == 3
  with open(resumed, "a") as f:
    f.write('{"video_id": "v2", "task": "grou')
  code, _, err = _eval(tiny_vtimellm, tmp_path / "ann.json", folder, resumed, capsys, "--batch-size", "3")
  assert code == 0 and "torn" in err
  assert resumed.read_text() == full.read_text()  # no duplicate, no missing line, same answers
  code, _, err = _eval(tiny_vtimellm, tmp_path / "ann.json", folder, resumed, capsys, "--batch-size", "3")
  assert code == 0 and "0 answered now, 8 already logged" in err and resumed.read_text() == full.read_text()

  records = [json.loads(line) for line in full.read_text().splitlines()]
  expected_order = [(vid, task, sid) for vid, ann in data.items()
                    for task, sid in [("captioning", None)] + [("grounding", i) for i in range(len(ann["sentences"]))]]
  assert [(r["video_id"], r["task"], r.get("info", {}).get("sentence_id")) for r in records] == expected_order
  for r in records:
    assert list(r) == (["video_id", "task", "query_id", "answer"] + (["info"] if r["task"] == "grounding" else []))
    assert r["query_id"] == 0
    if r["task"] == "grounding":
      ann = data[r["video_id"]]
      start, end = ann["timestamps"][r["info"]["sentence_id"]]
      assert r["info"]["iou"] == _release_iou(r["answer"], start, end, ann["duration"])
  # The release's query texts: checked through the answers HF gives for them, decoded as the
  # release decodes (HF tokenizer, special tokens skipped, stripped).
  decode = lambda ids: tokenizer_lib.load_tokenizer(tiny_vtimellm.model_dir).decode(ids, skip_special_tokens=True).strip()
  caption = tiny_vtimellm.hf_greedy(_v1(("<video>\n " + CAPTIONING_Q, None)), arrays["v1"], 4)
  assert records[0]["answer"] == decode(caption)
  grounding = tiny_vtimellm.hf_greedy(_v1(("<video>\n" + GROUNDING_Q.format("a man walks into the kitchen"), None)),
                                      arrays["v1"], 4)
  assert records[1]["answer"] == decode(grounding)


def test_eval_missing_features(tiny_vtimellm, feats, tmp_path, capsys):
  folder, arrays = feats
  _annotations(tmp_path / "ann.json")
  partial = tmp_path / "partial"
  write_features(partial, ["v1", "v2"])
  out = tmp_path / "log.jsonl"
  code, _, err = _eval(tiny_vtimellm, tmp_path / "ann.json", partial, out, capsys, "--task", "grounding")
  assert code == 2 and "1 video(s) have no features" in err and str(partial / "v3.npy") in err
  assert not out.exists() or out.read_text() == ""
  code, _, err = _eval(tiny_vtimellm, tmp_path / "ann.json", partial, out, capsys, "--task", "grounding",
                       "--skip-missing", "--batch-size", "4")
  assert code == 0 and "skipped 1 video" in err
  records = [json.loads(line) for line in out.read_text().splitlines()]
  assert [(r["video_id"], r["info"]["sentence_id"]) for r in records] == [("v1", 0), ("v1", 1), ("v2", 0)]
