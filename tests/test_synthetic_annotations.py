"""Synthetic corpus, text side: the release's formats, the `<sN>/<eN>` rule, the task mix, the CLI.

The files are also read back with the project's own readers (`data.records.prepare`, evaluation
`read_annotations`), so what the generator writes is what training and `eval` accept.
"""

import itertools
import json
import re

import numpy as np
import pytest

from vtimellm_jax.data import records, templates
from vtimellm_jax.data_pipelines import synthetic
from vtimellm_jax.data_pipelines.synthetic import vocabulary
from vtimellm_jax.errors import UserError
from vtimellm_jax.evaluation import annotations as eval_annotations

TOKEN = re.compile(r"<[se]\d+>")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  # Many records per video: the template mix is a property of the records, not of the videos.
  return synthetic.generate_corpus(tmp_path_factory.mktemp("synthetic"), num_train_videos=6, num_eval_videos=4,
                                   seed=11, fps=8, min_seconds=6, max_seconds=12, stage2_per_video=10,
                                   stage3_per_video=8)


def _load(corpus, key):
  return json.loads(corpus[key].read_text())


def _check_spans(spans, duration, where):
  assert 2 <= len(spans) <= 4, where
  flat = [t for span in spans for t in span]
  assert flat == sorted(flat) and all(s < e for s, e in spans), where  # ordered, non-overlapping
  assert 0 <= flat[0] and flat[-1] <= duration, where


def test_eval_file_is_activitynet_format_and_events_are_valid(corpus):
  raw = _load(corpus, "eval")
  parsed = eval_annotations.read_annotations(corpus["eval"])
  assert set(parsed) == set(raw) and len(raw) == 4
  for vid, ann in raw.items():
    assert set(ann) == {"duration", "timestamps", "sentences"}
    assert len(ann["timestamps"]) == len(ann["sentences"])
    _check_spans(ann["timestamps"], ann["duration"], vid)
    for sentence in ann["sentences"]:
      assert sentence[0].isupper() and sentence.endswith(".")
    # Distinct colours within a video: colour alone answers a grounding query.
    colours = [s.split()[1] for s in ann["sentences"]]
    assert len(set(colours)) == len(colours), vid


def test_stage2_and_3_obey_the_time_token_rule(corpus):
  for key in ("stage2", "stage3"):
    for i, record in enumerate(_load(corpus, key)):
      meta = record["meta"]
      where = f"{key} record {i}"
      assert set(meta) == {"duration", "token"}
      keys = list(meta["token"])
      n = len(keys) // 2
      assert keys == [f"<{c}{k}>" for k in range(n) for c in "se"], where
      _check_spans([(meta["token"][f"<s{k}>"], meta["token"][f"<e{k}>"]) for k in range(n)], meta["duration"], where)
      used = {t for c in record["conversations"] for t in TOKEN.findall(c["value"])}
      assert used and used <= set(keys), where
      assert record["conversations"][0]["value"].startswith("<video>\n"), where
      assert [c["from"] for c in record["conversations"]] == ["human", "gpt"] * (len(record["conversations"]) // 2)
      prepared, faults = records.prepare(record)
      assert not faults and prepared is not None and not prepared.is_image, (where, faults)
      text = " ".join(v for _, v in prepared.turns)
      assert not TOKEN.search(text), where
      # Rendered indices: start < end, and one index of rounding never reaches the next event.
      idx = [min(round(meta["token"][k] / meta["duration"] * 100), 99) for k in keys]
      assert all(b - a >= 2 for a, b in itertools.pairwise(idx)), (where, idx)


def test_stage2_task_mix_and_templates(corpus):
  data = _load(corpus, "stage2")
  single = [r for r in data if len(r["conversations"]) == 2]
  assert len(data) == 60 and len(single) == 12  # 20% single-turn dense captioning
  for r in single:
    n = len(r["meta"]["token"]) // 2
    answer = r["conversations"][1]["value"]
    assert re.fullmatch(" ".join(rf"From <s{k}> to <e{k}>, a [a-z ]+\." for k in range(n)), answer), answer
  dense_q = {r["conversations"][0]["value"] for r in single}
  grounding_q, captioning_q = set(), set()
  for r in data:
    if r in single:
      continue
    turns = [c["value"] for c in r["conversations"]]
    grounded_events = []
    for q, a in zip(turns[0::2], turns[1::2]):
      q = q.removeprefix("<video>\n")
      grounded = re.fullmatch(r"In (\w+) <s(\d)> to <e\2>\.", a)
      if grounded:
        # The answer restates the asked colour right before the start index.
        assert re.search(rf"\ba {grounded[1]} \w+ ", q), (q, a)
        grounding_q.add(re.sub(r"a \w+ \w+ [a-z ]+", "X", q))
        grounded_events.append(int(grounded[2]))
      else:
        assert re.fullmatch(r"A [a-z ]+\.", a) and TOKEN.search(q), (q, a)
        captioning_q.add(TOKEN.sub("T", q))
    assert sorted(grounded_events) == list(range(len(r["meta"]["token"]) // 2))  # every event asked for, once
    assert len(turns) // 2 - len(grounded_events) <= len(grounded_events)  # at most one captioning turn each
  assert len(dense_q) >= 3 and len(grounding_q) >= 3 and len(captioning_q) >= 3
  # The release's own grounding query is among the templates, as `eval` asks it.
  assert any(q.startswith("During which frames can we see") for r in data for q in
             (c["value"] for c in r["conversations"]))


def test_stage3_dialogues_teach_the_eval_dense_captioning_answer(corpus):
  data = _load(corpus, "stage3")
  assert all(len(r["conversations"]) >= 6 for r in data)  # an opener and at least two follow-ups
  json_records = [r for r in data if r["conversations"][0]["value"] == templates.captioning_question()]
  assert json_records
  for r in json_records:
    prepared, _ = records.prepare(r)
    answer = prepared.turns[1][1]
    items = json.loads(answer[answer.index("["):answer.rindex("]") + 1])
    n = len(r["meta"]["token"]) // 2
    assert len(items) == n and all(set(it) == {"event", "timestamps"} for it in items)
    assert all(re.fullmatch(r"from \d\d to \d\d", it["timestamps"]) for it in items)


def test_stage1_records_are_llava_format(corpus):
  data = _load(corpus, "stage1")
  plans = _load(corpus, "plans")
  assert len(data) == sum(len(plans[v]["events"]) for v in plans if v.startswith("syn_train"))
  for record in data:
    assert set(record) == {"id", "image", "conversations"}
    human, gpt = record["conversations"]
    assert human["from"] == "human" and human["value"].startswith("<image>\n")
    assert gpt["from"] == "gpt" and gpt["value"].strip()
    assert (corpus["stills"] / record["image"]).is_file()
    prepared, faults = records.prepare(record)
    assert not faults and prepared.is_image


def test_corpus_text_covers_the_training_text(corpus):
  lines = corpus["corpus"].read_text().splitlines()
  assert not any(TOKEN.search(line) or "<video>" in line or "<image>" in line for line in lines)
  text = set(lines)
  for key in ("stage1", "stage2", "stage3"):
    for record in _load(corpus, key):
      prepared, _ = records.prepare(record)
      for _, value in prepared.turns:
        value = " ".join(value.replace("<video>", "").split())
        assert not value or value in text, value


def _spans(plans) -> np.ndarray:
  return np.array([(e.start_frame / p.num_frames, e.end_frame / p.num_frames) for p in plans for e in p.events])


def _iou(s, e, gt: np.ndarray) -> np.ndarray:
  """Returns float[C, G]: IoU of each candidate (s[c], e[c]) with each ground-truth span."""
  s, e = np.atleast_1d(s)[:, None], np.atleast_1d(e)[:, None]
  inter = np.clip(np.minimum(e, gt[None, :, 1]) - np.maximum(s, gt[None, :, 0]), 0, None)
  return inter / (np.maximum(e, gt[None, :, 1]) - np.minimum(s, gt[None, :, 0]))


def test_constant_answers_cannot_ground_the_events():
  """Timing varies enough that one fixed answer grounds few held-out events (the quickstart's baseline)."""
  train, evals = vocabulary.plan_corpus(0, num_train=300, num_eval=300, fps=10, min_seconds=6, max_seconds=20)
  gt = _spans(evals)
  mean_start, mean_end = _spans(train).mean(axis=0)
  assert (_iou(mean_start, mean_end, gt) >= 0.5).mean() < 0.15  # the average training answer
  assert (_iou(0.0, 1.0, gt) >= 0.5).mean() < 0.05  # "the whole video"
  # Even the best fixed answer chosen on the eval set itself (an oracle no baseline has).
  grid = np.arange(0, 1.001, 0.02)
  s, e = (a.ravel() for a in np.meshgrid(grid, grid))
  recall = (_iou(s[s < e], e[s < e], gt) >= 0.5).mean(axis=1)
  assert recall.max() < 0.3


def test_eval_plans_never_repeat_a_train_story():
  train, evals = vocabulary.plan_corpus(1, num_train=3000, num_eval=300, fps=10, min_seconds=6, max_seconds=20)
  train_stories = {p.signature() for p in train}
  assert not any(p.signature() in train_stories for p in evals)
  assert len({p.signature() for p in evals}) == len(evals)


def test_cli_writes_a_corpus_and_rejects_bad_arguments(tmp_path, capsys):
  assert synthetic.main(["--out", str(tmp_path / "c"), "--train", "1", "--eval", "1", "--fps", "8",
                         "--max-seconds", "7"]) == 0
  paths = json.loads(capsys.readouterr().out)
  assert set(paths) >= {"videos", "stills", "stage1", "stage2", "stage3", "eval", "corpus"}
  assert len(list((tmp_path / "c" / "videos").rglob("*.mp4"))) == 2
  assert synthetic.main(["--out", str(tmp_path / "d"), "--size", "63"]) == 2
  assert "size must be even" in capsys.readouterr().err
  with pytest.raises(UserError, match="min_seconds"):
    synthetic.generate_corpus(tmp_path / "e", num_train_videos=1, num_eval_videos=1, min_seconds=9, max_seconds=8)
