"""A shortened quickstart learns to ground held-out videos, by a clear margin over the constant answer.

Minutes of CPU, so it is marked `learning` and left out of the README's test command; CI
(`.ci/run`) runs it after the suite: `python -m pytest -q -m learning tests`. It is the quickstart's
own schedule, shortened where that costs little (fewer videos, shorter stages 0, 1 and 3, fewer
held-out videos); stage 2 keeps most of its steps, as the query learns to find its frames only
after several hundred (docs/synthetic.md, "What the quickstart learns").
"""

import json

import pytest

from vtimellm_jax import cli

# One device: tests/conftest.py gives this process 8 host devices, over which stage 0's batch of 16
# (micro-batches of 4) does not divide; the quickstart on its own sees the one CPU device.
SHORTENED = ["--train-videos", "800", "--eval-videos", "12", "--config.mesh.devices=1",
             "--stage-steps", "stage0=200,stage1=150,stage2=800,stage3=10"]


@pytest.mark.learning
def test_shortened_quickstart_grounds_held_out_videos(tmp_path):
  workdir = tmp_path / "qs"
  assert cli.main(["quickstart", "--workdir", str(workdir), *SHORTENED]) == 0
  metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
  model, constant = metrics["model"], metrics["constant_baseline"]
  assert constant["R1@0.5"] < 20, metrics
  # Answering every query with the video's first event, what the model does before it learns to
  # find the asked one, scores about R1@0.5 23 / mIoU 21 on the full held-out set.
  assert model["R1@0.5"] >= constant["R1@0.5"] + 25, metrics
  assert model["mIoU"] >= constant["mIoU"] + 20, metrics
