"""AOT dry run for a target topology: compiles from shapes alone (no weights, no data) and prints memory."""

import pathlib

import pytest

from vtimellm_jax import cli
from vtimellm_jax.errors import UserError
from vtimellm_jax.training import aot, config_loading

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/stage2.py") + ":tiny"


def test_dry_run_for_virtual_8_device_topology_prints_per_device_memory(tmp_path, capsys, monkeypatch):
  reports = []
  compile_step = aot.compile_step
  monkeypatch.setattr(aot, "compile_step", lambda *a, **k: reports.append(compile_step(*a, **k)) or reports[-1])
  # No data, tokenizer or model files exist: the config points at none and the CLI must not need them.
  code = cli.main(["train", "--config", TINY, "--workdir", str(tmp_path / "w"), "--dry-run", "--topology", "cpu-8",
                   "--seq-len", "160", "--num-features", "4"])
  out = capsys.readouterr().out
  assert code == 0, out
  assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1} on 8 cpu devices" in out
  assert "cpu-8: per device" in out and "text length 157" in out and "micro-batch 2 x accumulation 1" in out
  assert not (tmp_path / "w").exists()

  (eight,) = reports
  one = compile_step(config_loading.load_config(TINY), "cpu-1", seq_len=160, num_features=4, log=lambda _: None)
  assert (one.micro_batch, one.accumulation) == (16, 1) and (eight.micro_batch, eight.accumulation) == (2, 1)
  # FSDP splits the frozen base (and the LoRA state) 8 ways; the batch is split 8 ways too.
  assert eight.arguments < one.arguments / 4
  assert one.fits is None and one.total > eight.total > 0


def test_bad_topology_and_too_few_devices_are_user_errors(tmp_path, capsys):
  assert cli.main(["train", "--config", TINY, "--workdir", str(tmp_path), "--dry-run", "--topology", "v9-1"]) == 2
  assert "unknown topology 'v9-1'" in capsys.readouterr().err
  with pytest.raises(UserError, match="needs 16 cpu devices"):
    aot.compile_step(config_loading.load_config(TINY), "cpu-16", seq_len=64, num_features=4, log=lambda _: None)


def test_memory_report_verdict():
  report = aot.MemoryReport("v5e-16", 1949, 8, 1, arguments=2 * 2**30, outputs=2**30, temporaries=12 * 2**30,
                            aliased=2**30, hbm_gib=16)
  assert report.total == 14 * 2**30 and report.fits
  assert "14.00 GiB of 16 GiB HBM: fits" in report.line()
  assert not aot.MemoryReport("v5e-16", 1949, 8, 1, 2**30, 0, 16 * 2**30, 0, 16).fits
