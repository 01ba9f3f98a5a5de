"""A shortened quickstart: synthetic videos -> features -> stages 0-3 -> eval -> metrics, end to end."""

import json

import numpy as np
import pytest

from vtimellm_jax import cli, quickstart
from vtimellm_jax.data import tokenizer as tokenizer_lib
from vtimellm_jax.errors import UserError
from vtimellm_jax.evaluation import annotations as annotations_lib
from vtimellm_jax.video import standardize


def test_short_quickstart_runs_every_step(tmp_path, capsys):
  workdir = tmp_path / "qs"
  code = cli.main(["quickstart", "--workdir", str(workdir), "--train-videos", "8", "--eval-videos", "3",
                   "--steps", "2", "--stage-steps", "stage2=3", "--config.global_batch=4", "--config.micro_batch=4",
                   "--config.mesh.devices=1"])
  out = capsys.readouterr().out
  assert code == 0
  for stage, steps in (("stage0", 2), ("stage1", 2), ("stage2", 3), ("stage3", 2)):
    lines = (workdir / "runs" / stage / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == steps, stage
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
  # The random CLIP's features were standardised with training-video statistics: the files the
  # stages read have zero mean and unit spread per dimension over the training frames.
  stats = np.load(workdir / "features" / standardize.STATS_FILE)
  train_ids = [p.stem for p in (workdir / "corpus" / "videos" / "train").glob("*.mp4")]
  frames = np.concatenate([np.load(workdir / "features" / "videos" / f"{vid}.npy").astype(np.float32)
                           for vid in train_ids])
  raw = np.concatenate([np.load(workdir / "features" / "clip" / "videos" / f"{vid}.npy").astype(np.float32)
                        for vid in train_ids])
  np.testing.assert_allclose(frames.mean(0), 0.0, atol=0.02)
  np.testing.assert_allclose(raw.mean(0), stats["mean"], rtol=1e-3, atol=1e-3)
  assert 0.9 < frames.std(0).mean() < 1.1
  # Stage 2 of the tiny run trains every parameter; stage 3 starts from its export.
  assert json.loads((workdir / "runs" / "stage3" / "run.json").read_text())["model"]["base"] == str(
      workdir / "models" / "stage2")


def test_stage_steps_are_parsed_and_checked():
  assert quickstart.parse_stage_steps("stage0=100, stage2=300") == {"stage0": 100, "stage2": 300}
  assert quickstart.parse_stage_steps("") == {}
  for bad in ("stage9=10", "stage1=0", "stage1=ten", "stage1"):
    with pytest.raises(UserError, match="--stage-steps"):
      quickstart.parse_stage_steps(bad)
