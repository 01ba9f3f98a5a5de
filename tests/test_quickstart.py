"""A shortened quickstart: synthetic videos -> features -> stages 0-3 -> eval -> metrics, end to end."""

import contextlib
import io
import json

import numpy as np
import pytest

from vtimellm_jax import cli, quickstart
from vtimellm_jax.data import tokenizer as tokenizer_lib
from vtimellm_jax.errors import UserError
from vtimellm_jax.evaluation import annotations as annotations_lib
from vtimellm_jax.inference import served
from vtimellm_jax.video import standardize


# Few videos and steps, one device (tests/conftest.py gives the process 8 host devices).
SHORT = ["--train-videos", "8", "--eval-videos", "3", "--steps", "2", "--config.global_batch=4",
         "--config.micro_batch=4", "--config.mesh.devices=1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """Returns (workdir, printed output) of a shortened default quickstart."""
  workdir = tmp_path_factory.mktemp("quickstart") / "qs"
  buffer = io.StringIO()
  with contextlib.redirect_stdout(buffer):
    code = cli.main(["quickstart", "--workdir", str(workdir), *SHORT, "--stage-steps", "stage2=3"])
  assert code == 0, buffer.getvalue()[-2000:]
  return workdir, buffer.getvalue()


@pytest.mark.slow
def test_short_quickstart_runs_every_step(tiny_run):
  workdir, out = tiny_run
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
  # Stage 0's captions read their stills' features, its conversations the blank (zero) feature.
  stage0 = json.loads((workdir / "stage0.json").read_text())
  captions = [r for r in stage0 if r["id"] != quickstart.BLANK_ID]
  assert len(captions) == len(json.loads((workdir / "corpus" / "stage1.json").read_text())) < len(stage0)
  for record in captions:
    np.testing.assert_array_equal(np.load(workdir / "features" / "stage0" / f"{record['id']}.npy"),
                                  np.load(workdir / "features" / "stills" / f"{record['id']}.npy"))
  assert not np.load(workdir / "features" / "stage0" / f"{quickstart.BLANK_ID}.npy").any()
  # Stage 2 of the tiny run trains every parameter; stage 3 starts from its export.
  assert json.loads((workdir / "runs" / "stage3" / "run.json").read_text())["model"]["base"] == str(
      workdir / "models" / "stage2")


@pytest.mark.slow
def test_quickstart_workdir_serves_its_model_with_its_features(tiny_run):
  """serving.json names the exported model, and a video asked about through the workdir is encoded
  as the quickstart encoded its corpus (the same random CLIP, then the same standardisation)."""
  workdir, _ = tiny_run
  spec = served.resolve(workdir)
  assert spec.model_dir == workdir / "models" / "vtimellm" and spec.clip == "tiny-random-64"
  video = sorted((workdir / "corpus" / "videos" / "eval").glob("*.mp4"))[0]
  feats, duration = served.VideoCache(spec)(video)
  stored = np.load(workdir / "features" / "videos" / f"{video.stem}.npy").astype(np.float32)
  # Unit-scale features; extract-features encoded the corpus in batches, the cache one video alone.
  np.testing.assert_allclose(feats, stored, atol=0.02)
  assert duration > 0
  with pytest.raises(UserError, match="drop --clip"):
    served.resolve(workdir, "some/other/clip")


def test_stage_steps_are_parsed_and_checked():
  assert quickstart.parse_stage_steps("stage0=100, stage2=300") == {"stage0": 100, "stage2": 300}
  assert quickstart.parse_stage_steps("") == {}
  for bad in ("stage9=10", "stage1=0", "stage1=ten", "stage1"):
    with pytest.raises(UserError, match="--stage-steps"):
      quickstart.parse_stage_steps(bad)


@pytest.mark.slow
def test_real_size_recipe_runs_on_a_converted_base(tiny_run, tmp_path):
  """`--size 7b --base DIR`: the recipe's own stage configs (LoRA in stage 2, merged before stage 3's
  fresh one) on a base model directory with its tokenizer. The tiny run's stage-0 export stands in
  for a converted Vicuna: the model's shape comes from the base, so this is the 7B path at CPU size."""
  base = tiny_run[0] / "models" / "stage0"
  workdir = tmp_path / "qs7b"
  # One bucket length: each compile of the 7B config's step (bfloat16, full remat) takes most of a minute here.
  assert cli.main(["quickstart", "--workdir", str(workdir), "--size", "7b", "--base", str(base), *SHORT,
                   "--config.data.num_buckets=1"]) == 0
  assert not (workdir / "tokenizer").exists() and not (workdir / "runs" / "stage0").exists()
  stage3 = json.loads((workdir / "runs" / "stage3" / "run.json").read_text())
  assert stage3["size"] == "7b" and stage3["trainable"] == "lora"
  assert stage3["model"]["base"] == str(base)
  assert stage3["load"] == {"adapter": str(workdir / "runs" / "stage1"), "merge_lora": str(workdir / "runs" / "stage2")}
  assert json.loads((workdir / "runs" / "stage2" / "run.json").read_text())["trainable"] == "lora"
  metrics = json.loads((workdir / "eval" / "metrics.json").read_text())
  assert {"R1@0.5", "mIoU"} <= set(metrics["model"])


def test_real_size_recipe_needs_a_base(tmp_path, capsys):
  assert cli.main(["quickstart", "--workdir", str(tmp_path / "qs"), "--size", "7b"]) == 2
  assert "--size 7b needs --base" in capsys.readouterr().err
  assert cli.main(["quickstart", "--workdir", str(tmp_path / "qs"), "--family", "chatglm3", "--size", "7b"]) == 2
  assert "--family chatglm3 has sizes 6b, tiny, not 7b" in capsys.readouterr().err
  assert not (tmp_path / "qs").exists()


@pytest.mark.learning
def test_chatglm3_family_trains_the_three_stages_and_its_loss_falls(tmp_path):
  """`--family chatglm3`: a ChatGLM3-style tokenizer and a tiny ChatGLM3-shaped model through stage 0
  and the release's three glm-template stages, then eval; the loss falls in every stage that trains
  the LLM (stage 1 trains only the adapter on captions, too few steps here to show a trend)."""
  from vtimellm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.models import load  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "qs_glm"
  assert cli.main(["quickstart", "--family", "chatglm3", "--workdir", str(workdir), "--train-videos", "8",
                   "--eval-videos", "2", "--steps", "12", "--config.global_batch=4", "--config.micro_batch=4",
                   "--config.mesh.devices=1"]) == 0
  assert type(tokenizer_lib.load_encoder(workdir / "tokenizer")).__name__ == "ChatGLMEncoder"
  for stage in ("stage0", "stage1", "stage2", "stage3"):
    run = json.loads((workdir / "runs" / stage / "run.json").read_text())
    assert run["data"]["template"] == "glm" and run["model"]["preset"] == "chatglm3_tiny", stage
    losses = [json.loads(line)["loss"] for line in (workdir / "runs" / stage / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 12 and all(np.isfinite(losses)), stage
    if stage != "stage1":
      assert np.mean(losses[-4:]) < 0.85 * np.mean(losses[:4]), (stage, losses)
  config = load.load_model(workdir / "models" / "vtimellm").config
  assert (config.fused_projections, config.qkv_bias, config.num_kv_heads) == (True, True, 2)
  assert json.loads((workdir / "runs" / "stage3" / "run.json").read_text())["lora"]["targets"] == [
      "qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head"]
  answers = (workdir / "eval" / "answers.jsonl").read_text().splitlines()
  assert len(answers) > 2 and (workdir / "eval" / "metrics.json").is_file()
