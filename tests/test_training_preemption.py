"""Surviving preemption: SIGTERM and SIGINT stop a run with a checkpoint of the step reached, an
unreadable checkpoint falls back to the newest readable one, and a rerun keeps run.json's settings."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from etils import epath

from training_fixtures import make_dataset
from vtimellm_jax.errors import UserError
from vtimellm_jax.training import checkpointing, config_loading, preemption, run_record, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/stage2.py") + ":tiny"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_dataset(tmp_path_factory.mktemp("data"))


def _overrides(dataset, *more):
  return [f"--config.data.json={dataset['stage2']}", f"--config.data.features={dataset['features']}",
          f"--config.data.tokenizer={dataset['tokenizer']}", "--config.log_every=1000", "--config.mesh.devices=1",
          "--config.global_batch=8", "--config.epochs=8", "--config.data.num_buckets=1", *more]


def _steps(workdir):
  return [json.loads(line)["step"] for line in open(workdir / "metrics.jsonl")]


def _same_params(a, b):
  for x, y in zip(jax.tree.leaves(checkpointing.restore_params(a)), jax.tree.leaves(checkpointing.restore_params(b)),
                  strict=True):
    np.testing.assert_array_equal(x, y)


_SIGNALLED_RUN = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import conftest  # the same fake devices and precision as the parent
    from vtimellm_jax.training import config_loading, preemption, trainer
    config = config_loading.load_config({config!r}, {overrides!r})
    def preempt(step):
      if step == {signal_at}:
        os.kill(os.getpid(), signal.SIGTERM)  # as a spot VM's shutdown does; the step is done
    summary = trainer.train(config, {workdir!r}, on_step=preempt, log=lambda _: None)
    sys.exit(preemption.EXIT_STATUS.get(summary["stopped_by"], 0))
""")


def test_sigterm_saves_the_step_reached_and_an_unreadable_checkpoint_falls_back(dataset, tmp_path):
  overrides = _overrides(dataset, "--config.max_steps=8", "--config.checkpoint.every_steps=3")
  script = _SIGNALLED_RUN.format(tests=str(ROOT / "tests"), config=CONFIG, overrides=overrides, signal_at=5,
                                 workdir=str(tmp_path / "stopped"))
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
  assert checkpointing.latest_step(tmp_path / "stopped") == 5  # not a periodic step (every 3)
  assert _steps(tmp_path / "stopped") == [1, 2, 3, 4, 5]

  # A copy whose newest checkpoint lost half of a file: it resumes from step 3 instead. In another,
  # no checkpoint reads: an error naming them, nothing trained.
  shutil.copytree(tmp_path / "stopped", tmp_path / "torn")
  shutil.copytree(tmp_path / "stopped", tmp_path / "broken")
  for step in (3, 5):
    shutil.rmtree(tmp_path / f"broken/checkpoints/{step}/params")
  files = sorted((p for p in (tmp_path / "torn/checkpoints/5/params").rglob("*") if p.is_file()),
                 key=lambda p: p.stat().st_size)
  files[-1].write_bytes(files[-1].read_bytes()[: files[-1].stat().st_size // 2])

  config = config_loading.load_config(CONFIG, overrides)
  with pytest.raises(UserError, match=r"no checkpoint is readable \(steps \[5, 3\]\)"):
    trainer.train(config, tmp_path / "broken", log=lambda _: None)
  trainer.train(config, tmp_path / "straight", log=lambda _: None)
  logs = []
  trainer.train(config, tmp_path / "stopped", log=logs.append)
  assert any("resumed from step 5" in line for line in logs)
  trainer.train(config, tmp_path / "torn", log=logs.append)
  assert any(f"checkpoint {tmp_path / 'torn/checkpoints/5'} is unreadable" in line for line in logs), logs
  assert any("resumed from step 3" in line for line in logs)
  assert [p.name.split("-")[0] for p in (tmp_path / "torn" / trainer.UNREADABLE_DIR).iterdir()] == ["5"]
  for workdir in ("stopped", "torn"):
    _same_params(tmp_path / workdir, tmp_path / "straight")
    assert _steps(tmp_path / workdir) == list(range(1, 9))


def test_train_command_stops_on_sigint_with_status_130_and_no_traceback(dataset, tmp_path):
  workdir = tmp_path / "w"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.Popen([sys.executable, "-m", "vtimellm_jax.cli", "train", "--config", CONFIG, "--workdir",
                           str(workdir), *_overrides(dataset, "--config.max_steps=100000", "--config.epochs=5000",
                                                     "--config.checkpoint.every_steps=100000")],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if (workdir / "metrics.jsonl").exists() and len((workdir / "metrics.jsonl").read_text().splitlines()) >= 2:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 130, err[-2000:]
  assert "Traceback" not in err and "stopped by SIGINT after step" in out + err
  reached = _steps(workdir)[-1]
  assert checkpointing.latest_step(workdir) == reached >= 2


def test_a_second_signal_is_not_deferred():
  # Python's own Ctrl-C handler, which a process started in the background of a script lacks (SIGINT
  # is ignored there); the second signal gets whatever handler was in place before.
  outer = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    with preemption.StopOnSignal() as stop:
      os.kill(os.getpid(), signal.SIGINT)
      assert stop.requested() == "SIGINT"
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler runs between bytecodes; it must raise here
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  finally:
    signal.signal(signal.SIGINT, outer)


def _record(workdir, has_checkpoint=True, allow=False, **changes):
  config = config_loading.load_config(CONFIG, [f"--config.{k.replace('__', '.')}={v}" for k, v in changes.items()])
  logs = []
  run_record.record_run(epath.Path(workdir), config, has_checkpoint=has_checkpoint, allow_changes=allow,
                        log=logs.append)
  return logs


def test_a_rerun_with_other_settings_is_refused_listing_them(tmp_path):
  _record(tmp_path)
  with pytest.raises(UserError) as e:
    _record(tmp_path, optim__lr=3e-4, global_batch=8, micro_batch=2)
  assert "  - global_batch: 16 in run.json, 8 now" in str(e.value)
  assert "  - optim.lr: 0.0001 in run.json, 0.0003 now" in str(e.value)
  assert "micro_batch" not in str(e.value) and "--allow-config-change" in str(e.value)
  assert not (tmp_path / "run.1.json").exists()
  # How the run executes may change; the previous record is kept.
  assert "run.1.json" in _record(tmp_path, micro_batch=2, mesh__fsdp=2, model__remat="full")[0]
  assert json.loads((tmp_path / "run.1.json").read_text())["micro_batch"] == 4
  assert json.loads((tmp_path / "run.json").read_text())["micro_batch"] == 2
  # The explicit override takes the new settings, keeping the record again.
  _record(tmp_path, allow=True, optim__lr=3e-4)
  assert json.loads((tmp_path / "run.2.json").read_text())["optim"]["lr"] == 1e-4
  assert json.loads((tmp_path / "run.json").read_text())["optim"]["lr"] == 3e-4
  # Without a checkpoint nothing resumes: any change is recorded.
  _record(tmp_path / "fresh", has_checkpoint=False)
  _record(tmp_path / "fresh", has_checkpoint=False, lora__rank=4)
  assert json.loads((tmp_path / "fresh/run.json").read_text())["lora"]["rank"] == 4
