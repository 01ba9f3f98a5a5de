"""What `train` prints: the project's own lines only, on a first run, a resume and a fall back past
torn checkpoints (one line each, no traceback); and what a rerun says about run.json's fields."""

import asyncio
import json
import logging
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest
from etils import epath

from training_fixtures import make_dataset
from vtimellm_jax import quiet
from vtimellm_jax.errors import UserError
from vtimellm_jax.training import config_loading, run_record

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs/stage2.py") + ":tiny"
# The real command, in a process that cannot import torch, as `pip install -e .` leaves it (torch is
# an extra): transformers then says "PyTorch was not found" on import, unless quieted.
LAUNCH = "import sys; sys.modules['torch'] = None; from vtimellm_jax import cli; sys.exit(cli.main())"
# Lines third-party libraries printed on normal runs (issue 39); none applies to the user.
NOISE = ("Traceback", "Exception ignored", "Event loop is closed", "Ignored unknown kwarg option",
         "CheckpointManagerOptions.read_only", "Given directory is read only", "Metadata file does not exist",
         "PyTorch was not found")
# What `train` itself prints: its stage lines, the progress bar, run.json's and the fall-back's lines.
OWN = ("[stage2] ", "train: ", "settings changed since the last run ", "checkpoint ", "moved unreadable checkpoint(s) ")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_dataset(tmp_path_factory.mktemp("data"))


def _train(dataset, workdir, *more) -> str:
  """Returns the stdout and stderr of `vtimellm-jax train` on the tiny stage-2 run, which must succeed."""
  # Every parameter trains, so a checkpoint holds enough arrays that a torn one leaves reads in flight.
  overrides = [f"--config.data.json={dataset['stage2']}", f"--config.data.features={dataset['features']}",
               f"--config.data.tokenizer={dataset['tokenizer']}", "--config.log_every=1000", "--config.mesh.devices=1",
               "--config.global_batch=8", "--config.data.num_buckets=1", "--config.trainable=all",
               "--config.max_steps=3", "--config.checkpoint.every_steps=1", "--config.checkpoint.keep=3", *more]
  proc = subprocess.run([sys.executable, "-c", LAUNCH, "train", "--config", CONFIG, "--workdir", str(workdir),
                         *overrides], capture_output=True, text=True, cwd=ROOT, timeout=600, check=False,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  output = proc.stdout + proc.stderr
  assert proc.returncode == 0, output[-3000:]
  return output


def _assert_only_own_lines(output: str) -> None:
  for noise in NOISE:
    assert noise not in output, output[-3000:]
  # The progress bar redraws with carriage returns; a line printed meanwhile follows it unbroken.
  strange = [part for part in re.split(r"[\r\n]+", output) if part.strip() and not part.startswith(OWN)]
  assert not strange, strange


def test_train_resume_and_fall_back_past_torn_checkpoints_print_only_their_own_lines(dataset, tmp_path):
  workdir = tmp_path / "w"
  _assert_only_own_lines(_train(dataset, workdir, "--config.max_steps=2"))
  # A resume that extends the run (the settings change is allowed) reads checkpoint 2 and saves 3.
  resumed = _train(dataset, workdir, "--allow-config-change")
  _assert_only_own_lines(resumed)
  assert "[stage2] resumed from step 2" in resumed

  # Checkpoints 3 and 2 each lose half of their largest file (a torn write): the rerun names each once,
  # in one line, and resumes from 1.
  for step in (3, 2):
    files = sorted((p for p in (workdir / f"checkpoints/{step}/params").rglob("*") if p.is_file()),
                   key=lambda p: p.stat().st_size)
    files[-1].write_bytes(files[-1].read_bytes()[: files[-1].stat().st_size // 2])
  output = _train(dataset, workdir)
  _assert_only_own_lines(output)
  for step in (3, 2):
    assert len(re.findall(rf"checkpoint {re.escape(str(workdir / 'checkpoints' / str(step)))} is unreadable \(",
                          output)) == 1, output
  assert "[stage2] resumed from step 1" in output and "[stage2] done: 3 steps" in output


def test_quiet_drops_exactly_the_leftovers_of_a_failed_read(monkeypatch):
  passed_on = []
  monkeypatch.setattr(sys, "unraisablehook", passed_on.append)
  monkeypatch.setattr(quiet, "_done", False)
  quiet.setup()

  # TensorStore finishing a read after orbax closed the loop that awaited it, as a torn restore leaves it.
  import tensorstore as ts  # pylint: disable=g-import-not-at-top

  promise, future = ts.Promise.new()
  loop = asyncio.new_event_loop()
  asyncio.set_event_loop(loop)
  try:
    future.__await__()  # as `await` does: TensorStore's completion callback goes to this loop
  finally:
    asyncio.set_event_loop(None)
  loop.close()
  promise.set_result(0)
  # One of orbax's own read coroutines, closed with an error (what a collected leftover reports).
  from orbax.checkpoint._src.serialization import serialization  # pylint: disable=g-import-not-at-top

  reader = serialization._read_array_index_and_device_put(  # pylint: disable=protected-access
      [], (), None, global_shape=(), new_shard_shape=(), dtype=None, byte_limiter=None, strict=True, dll=None,
      memory_kind=None)
  error = Exception("Encountered error while reading array index: ()")
  sys.unraisablehook(types.SimpleNamespace(exc_type=Exception, exc_value=error, exc_traceback=None, err_msg=None,
                                           object=reader))
  reader.close()
  assert passed_on == []

  # Anything else still comes through: the same error from another coroutine, a closed loop met in Python.
  async def other():
    pass

  mine = other()
  sys.unraisablehook(types.SimpleNamespace(exc_type=Exception, exc_value=error, exc_traceback=None, err_msg=None,
                                           object=mine))
  mine.close()
  closed = asyncio.new_event_loop()
  closed.close()
  try:
    closed.call_soon(print)
  except RuntimeError as e:
    sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=e, exc_traceback=e.__traceback__,
                                             err_msg=None, object=None))
  assert [u.exc_type for u in passed_on] == [Exception, RuntimeError]


def test_quiet_drops_only_the_item_metadata_warning_of_a_training_checkpoint(monkeypatch):
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  monkeypatch.setattr(quiet, "_done", False)
  monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
  quiet.setup()
  records = []
  handler = logging.Handler()
  handler.emit = records.append
  absl_logging.get_absl_logger().addHandler(handler)
  try:
    absl_logging.warning("Metadata file does not exist: %s", "/runs/s2/checkpoints/40/params/_CHECKPOINT_METADATA")
    absl_logging.warning("Metadata file does not exist: %s", "/models/vtimellm/params/_CHECKPOINT_METADATA")
    absl_logging.warning("Failed to read Metadata file: %s", "/runs/s2/checkpoints/40/params/_CHECKPOINT_METADATA")
  finally:
    absl_logging.get_absl_logger().removeHandler(handler)
  assert [r.getMessage().split(": ", 1)[1] for r in records] == [
      "/models/vtimellm/params/_CHECKPOINT_METADATA", "/runs/s2/checkpoints/40/params/_CHECKPOINT_METADATA"]
  assert os.environ[quiet.NO_ADVISORY_ENV]


def _record(workdir, *overrides, has_checkpoint=True):
  config = config_loading.load_config(CONFIG, list(overrides))
  logs = []
  run_record.record_run(epath.Path(workdir), config, has_checkpoint=has_checkpoint, log=logs.append)
  return logs


def _edit_run_json(workdir, edit):
  saved = json.loads((workdir / "run.json").read_text())
  edit(saved)
  (workdir / "run.json").write_text(json.dumps(saved))


def test_a_run_json_without_a_field_of_today_resumes_with_todays_value(tmp_path):
  _record(tmp_path)
  _edit_run_json(tmp_path, lambda saved: saved["model"].pop("time_code"))
  logs = _record(tmp_path)
  assert [line for line in logs if "model.time_code" in line] == [
      (f"{tmp_path / 'run.json'} predates config field(s) model.time_code (an older vtimellm-jax wrote it); "
       "taking today's: model.time_code=0.0")]
  assert json.loads((tmp_path / "run.json").read_text())["model"]["time_code"] == 0.0
  assert "time_code" not in json.loads((tmp_path / "run.1.json").read_text())["model"]
  assert _record(tmp_path) == []  # recorded whole now: the next rerun has nothing to say
  # A field both have that differs is still refused, naming only it.
  _edit_run_json(tmp_path, lambda saved: saved["model"].pop("time_code"))
  with pytest.raises(UserError) as e:
    _record(tmp_path, "--config.optim.lr=3e-4")
  assert "  - optim.lr: 0.0001 in run.json, 0.0003 now" in str(e.value) and "time_code" not in str(e.value)


def test_a_run_json_field_today_lacks_is_named_and_ignored(tmp_path):
  _record(tmp_path)
  _edit_run_json(tmp_path, lambda saved: saved["data"].update(shuffle_buffer=512))
  logs = _record(tmp_path)
  assert [line for line in logs if "data.shuffle_buffer" in line] == [
      f"{tmp_path / 'run.json'} has config field(s) this vtimellm-jax no longer has, ignored: data.shuffle_buffer=512"]
  assert "shuffle_buffer" not in json.loads((tmp_path / "run.json").read_text())["data"]


def test_a_longer_run_is_refused_with_the_ways_to_extend_it(tmp_path):
  _record(tmp_path, "--config.max_steps=100")
  with pytest.raises(UserError) as e:
    _record(tmp_path, "--config.max_steps=200")
  message = str(e.value)
  assert "  - max_steps: 100 in run.json, 200 now" in message
  assert "To train this run for longer on purpose: pass --allow-config-change with the new max_steps" in message
  assert f"vtimellm-jax export --workdir {tmp_path} --out DIR" in message and "--config.model.base=DIR" in message
  with pytest.raises(UserError) as e:
    _record(tmp_path, "--config.max_steps=100", "--config.optim.lr=3e-4")
  assert "for longer on purpose" not in str(e.value)
