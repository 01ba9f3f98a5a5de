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
  """Returns the Vicuna v1 prompt of (question, answer) rounds, the last answer None (the release's conversation format)."""
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
               "--temperature", "0", "--max-new-tokens", "4", "--no-progress", *extra], capsys)  # grounding at 4 too


def _release_iou(answer, start, end, duration):
  m = re.search(r"(\d{2}) (to|and) (\d{2})", answer)
  if not m:
    return 0
  s, e, gs, ge = int(m.group(1)) / 100, int(m.group(3)) / 100, start / duration, end / duration
  return round(max(0, min(e, ge) - max(s, gs)) / (max(e, ge) - min(s, gs)), 2)


@pytest.mark.slow  # eval end to end, interrupted and resumed (CI's second run)
def test_eval_is_resumable_and_writes_the_release_log(tiny_vtimellm, feats, tmp_path, capsys):
  folder, arrays = feats
  data = _annotations(tmp_path / "ann.json")
  full, resumed = tmp_path / "full.jsonl", tmp_path / "resumed.jsonl"
  code, _, err = _eval(tiny_vtimellm, tmp_path / "ann.json", folder, full, capsys, "--batch-size", "4")
  assert code == 0, err
  assert "eval: batch size 4 (--batch-size)" in err
  assert re.search(r"8 answered now, 0 already logged, 0 left of 8; \d answer\(s\) cut at their token budget", err)
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


def test_eval_budget_per_task_and_auto_batch_on_cpu(tiny_vtimellm, feats, tmp_path, capsys):
  """Grounding answers stop at their own budget; on a CPU auto keeps the batch of 8."""
  folder, arrays = feats
  _annotations(tmp_path / "ann.json")
  out = tmp_path / "log.jsonl"
  code, _, err = _run(["eval", "--model", tiny_vtimellm.model_dir, "--data", tmp_path / "ann.json", "--features",
                       folder, "--out", out, "--temperature", "0", "--max-new-tokens", "4",
                       "--grounding-max-new-tokens", "2", "--no-progress"], capsys)
  assert code == 0, err
  assert "eval: batch size auto: captioning 8, the default where the device reports no free memory; grounding 8" in err
  records = [json.loads(line) for line in out.read_text().splitlines()]
  decode = lambda ids: tokenizer_lib.load_tokenizer(tiny_vtimellm.model_dir).decode(ids, skip_special_tokens=True).strip()
  grounding = tiny_vtimellm.hf_greedy(_v1(("<video>\n" + GROUNDING_Q.format("a man walks into the kitchen"), None)),
                                      arrays["v1"], 2)
  assert records[1]["answer"] == decode(grounding)
  caption = tiny_vtimellm.hf_greedy(_v1(("<video>\n " + CAPTIONING_Q, None)), arrays["v1"], 4)
  assert records[0]["answer"] == decode(caption)


def test_eval_batch_size_flag_takes_auto_or_a_number(capsys):
  for value, message in (("0", "must be >= 1, got 0"), ("many", "expected auto or an integer, got 'many'")):
    with pytest.raises(SystemExit):
      cli.main(["eval", "--model", "m", "--data", "d", "--out", "o", "--batch-size", value])
    assert f"argument --batch-size: {message}" in capsys.readouterr().err


class _FakeAnswerer:
  """Answers with as many tokens as the question asks ('long': the whole budget), recording every call."""

  def __init__(self):
    self.calls = []

  def answer(self, conversations, features, config, keys, batch_size):
    from vtimellm_jax.inference.answerer import Answer
    self.calls.append(([q for _, q in conversations], config.max_new_tokens, batch_size, keys))
    return [Answer(q[-12:], (5,) * (config.max_new_tokens if "long" in q else 1)) for _, q in conversations]


class _FakeSource:
  def locate(self, video_id):
    return video_id

  def __call__(self, video_id):
    return np.zeros((100, 768), np.float32)


def test_run_eval_batches_one_task_at_its_budget_and_counts_cut_answers(tmp_path):
  import jax
  from vtimellm_jax.evaluation.annotations import read_annotations
  from vtimellm_jax.inference import evaluate, generate

  (tmp_path / "ann.json").write_text(json.dumps({
      "v1": {"duration": 40.0, "timestamps": [[0.0, 10.0], [12.5, 40.0]], "sentences": ["a long walk", "a dog"]},
      "v2": {"duration": 20.0, "timestamps": [[5.0, 15.0], [1.0, 2.0]], "sentences": ["long money", "long runs"]}}))
  annotations = read_annotations(tmp_path / "ann.json")
  bot, log = _FakeAnswerer(), tmp_path / "log.jsonl"
  summary = evaluate.run_eval(bot, annotations, _FakeSource(), "all", log, generate.GenerationConfig(max_new_tokens=9),
                              batch_size={"captioning": 2, "grounding": 3}, max_new_tokens={"grounding": 3},
                              progress=False)
  queries = evaluate.build_queries(annotations, "all")
  # Captioning first (its first query comes first), then grounding; each batch one task, at its budget.
  grouped = [q for q in queries if q.task == "captioning"] + [q for q in queries if q.task == "grounding"]
  assert [(questions, budget, size) for questions, budget, size, _ in bot.calls] == [
      ([q.question for q in grouped[:2]], 9, 2), ([q.question for q in grouped[2:5]], 3, 3),
      ([grouped[5].question], 3, 3)]
  # Every query keeps its own sampling key, from its place in the full list.
  keys = np.concatenate([jax.random.key_data(keys) for *_, keys in bot.calls])
  want = np.stack([jax.random.key_data(jax.random.fold_in(jax.random.key(0), q.index)) for q in grouped])
  np.testing.assert_array_equal(keys, want)
  assert summary.answered == 6 and summary.remaining == 0 and summary.truncated == {"grounding": 3}
  # Written task by task, the finished log is in the release's order.
  logged = [json.loads(line) for line in log.read_text().splitlines()]
  assert [(r["video_id"], r["task"], r.get("info", {}).get("sentence_id")) for r in logged] == [
      (q.video_id, q.task, q.sentence_id) for q in queries]
  assert summary.log_reordered


def test_auto_batch_size_is_the_largest_power_of_two_that_fits():
  from types import SimpleNamespace
  from vtimellm_jax.inference import evaluate
  from vtimellm_jax.models import llama

  assert evaluate.auto_batch_size(None, llama.tiny(), 200, 128)[0] == 8  # a CPU reports no memory figures
  gib = 2**30
  # 7B in bfloat16 keeps 0.5 MiB of KV cache per position per row.
  vicuna = llama.vicuna_7b(dtype="bfloat16", param_dtype="bfloat16")
  h100 = {"bytes_limit": 60 * gib, "bytes_in_use": 14 * gib}  # after the 13.5 GB model
  size, why = evaluate.auto_batch_size(h100, vicuna, 224, 128)
  assert size == 64 and "KV cache of 224 + 128 positions in 512 slots, 256 MiB" in why and "46.0 GiB free" in why
  assert evaluate.auto_batch_size({"bytes_limit": 24 * gib, "bytes_in_use": 14 * gib}, vicuna, 224, 1024)[0] == 8
  size, why = evaluate.auto_batch_size({"bytes_limit": 15 * gib, "bytes_in_use": 14 * gib}, vicuna, 224, 1024)
  assert size == 1 and "not even one row fits" in why
  # The exact arithmetic: a row is 2 layers x (k, v) x 256 slots (10 positions, rounded up as generate
  # allocates them) x 2 kv heads x 4 dims x 4 bytes of cache + 6 prompt positions x (2 heads x 6 x 4
  # bytes of scores + 2 x 8 x 4 bytes of MLP) of prefill.
  toy = SimpleNamespace(num_layers=2, num_kv_heads=2, head_size=4, num_heads=2, intermediate_size=8,
                        compute_dtype=np.float32)
  row = 2 * 2 * 256 * 2 * 4 * 4 + 6 * (2 * 6 * 4 + 2 * 8 * 4)
  stats = lambda free: {"bytes_limit": free + gib + 100, "bytes_in_use": 100}  # noqa: E731  1 GiB kept back
  assert evaluate.auto_batch_size(stats(4 * row), toy, 6, 4)[0] == 4
  assert evaluate.auto_batch_size(stats(4 * row - 1), toy, 6, 4)[0] == 2
  assert evaluate.auto_batch_size(stats(1000 * row), toy, 6, 4, cap=16)[0] == 16
