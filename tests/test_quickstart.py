"""A shortened quickstart: synthetic videos -> features -> stages 0-3 -> eval -> metrics, end to end."""

import json

from vtimellm_jax import cli
from vtimellm_jax.data import tokenizer as tokenizer_lib
from vtimellm_jax.evaluation import annotations as annotations_lib


def test_short_quickstart_runs_every_step(tmp_path, capsys):
  workdir = tmp_path / "qs"
  code = cli.main(["quickstart", "--workdir", str(workdir), "--train-videos", "8", "--eval-videos", "3",
                   "--steps", "2", "--config.global_batch=4", "--config.micro_batch=4", "--config.mesh.devices=1"])
  out = capsys.readouterr().out
  assert code == 0
  for stage in ("stage0", "stage1", "stage2", "stage3"):
    lines = (workdir / "runs" / stage / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2, stage
  annotations = annotations_lib.read_annotations(workdir / "corpus" / "eval.json")
  answers = [json.loads(l) for l in (workdir / "eval" / "answers.jsonl").read_text().splitlines()]
  assert len(answers) == len(annotations) + sum(len(v.sentences) for v in annotations.values())
  metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
  for name in ("model", "constant_baseline"):
    assert {"R1@0.5", "mIoU", "soda_c", "CIDEr", "METEOR"} <= set(metrics[name])
  baseline = [json.loads(l) for l in (workdir / "eval" / "constant_baseline.jsonl").read_text().splitlines()]
  assert len(baseline) == len(answers)
  assert len({b["answer"] for b in baseline if b["task"] == "grounding"}) == 1
  assert (workdir / "eval" / "timeline.png").stat().st_size > 0
  assert "R1@0.5" in out and "constant" in out
  # The tokenizer learnt the chat frame as pieces, not letters (it is in every training sequence).
  tok = tokenizer_lib.load_tokenizer(workdir / "tokenizer")
  assert len(tokenizer_lib.ReleaseEncoder(tok).encode(" ASSISTANT:", add_bos=False)) <= 3
