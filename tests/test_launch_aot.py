"""AOT dry run for a target topology: compiles from shapes alone (no weights, no data) and prints memory."""

import pathlib

import pytest

from gpu_fixtures import has_cuda_plugin, needs_cuda_plugin
from vtimellm_jax import cli
from vtimellm_jax.errors import UserError
from vtimellm_jax.training import aot, config_loading, gpu_targets

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
  assert "2 layers scanned, remat none" in out


def test_bad_topology_and_too_few_devices_are_user_errors(tmp_path, capsys):
  assert cli.main(["train", "--config", TINY, "--workdir", str(tmp_path), "--dry-run", "--topology", "v9-1"]) == 2
  assert "unknown topology 'v9-1'" in capsys.readouterr().err
  with pytest.raises(UserError, match="needs 16 cpu devices"):
    aot.compile_step(config_loading.load_config(TINY), "cpu-16", seq_len=64, num_features=4, log=lambda _: None)



@pytest.mark.skipif(has_cuda_plugin(), reason="the CUDA plugin is installed: the next test compiles instead")
def test_gpu_preset_without_gpus_or_plugin_says_what_to_install(tmp_path, capsys):
  assert cli.main(["train", "--config", TINY, "--workdir", str(tmp_path), "--dry-run", "--topology", "8xH100"]) == 2
  err = capsys.readouterr().err
  assert "cannot compile for 8xH100 on this host" in err and "pip install -e '.[cuda]'" in err


@needs_cuda_plugin
def test_gpu_preset_compiles_without_gpus(capsys):
  # The plugin's compile-only H100s: a real GPU compile (cuBLAS / Triton fusions), no device needed.
  report = aot.compile_step(config_loading.load_config(TINY), "8xH100", seq_len=160, num_features=4, micro_batch=2)
  out = capsys.readouterr().out
  assert "mesh {'data': 1, 'fsdp': 8, 'tensor': 1} on 8 NVIDIA H100 80GB HBM3 devices" in out
  assert report.fits and report.hbm_gib == 80 and report.arguments > 0


def test_gpu_target_description_names_the_device():
  text = gpu_targets.target_config("h100")
  assert "core_count: 132" in text and 'device_description_str: "NVIDIA H100 80GB HBM3"' in text
  assert "cuda_compute_capability { major: 9 minor: 0 }" in text
  with pytest.raises(ValueError, match="no target description for GPU 'b300'"):
    gpu_targets.target_config("b300")


def test_memory_report_verdict():
  report = aot.MemoryReport("v5e-16", 1949, 8, 1, arguments=2 * 2**30, outputs=2**30, temporaries=12 * 2**30,
                            aliased=2**30, hbm_gib=16)
  assert report.total == 14 * 2**30 and report.fits
  assert "14.00 GiB of 16 GiB HBM: fits" in report.line()
  assert not aot.MemoryReport("v5e-16", 1949, 8, 1, 2**30, 0, 16 * 2**30, 0, 16).fits


# What libtpu says when a step does not fit (seen compiling 7B stage 2 at micro-batch 8 for v5e-16).
TPU_REFUSAL = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(24.66G) exceeds available HBM (15.75G).\nmore compiler detail")


def test_compiler_refusal_is_a_does_not_fit_report_and_exit_1(tmp_path, capsys, monkeypatch):
  import jax

  class RefusingStep:
    def lower(self, *args):
      return self

    def compile(self):
      raise jax.errors.JaxRuntimeError(TPU_REFUSAL)

  from vtimellm_jax.training import trainer

  monkeypatch.setattr(trainer.TrainState, "jit_step", lambda self: RefusingStep())
  reports = []
  compile_step = aot.compile_step
  monkeypatch.setattr(aot, "compile_step", lambda *a, **k: reports.append(compile_step(*a, **k)) or reports[-1])
  code = cli.main(["train", "--config", TINY, "--workdir", str(tmp_path / "w"), "--dry-run", "--topology", "cpu-8",
                   "--seq-len", "160", "--num-features", "4", "--config.micro_batch=1"])
  out = capsys.readouterr().out
  assert code == 1, out
  (report,) = reports
  assert report.fits is False and report.micro_batch == 1  # the command line's micro-batch beat the preset's 2
  assert report.temporaries == int(24.66 * 2**30)
  # Arguments are counted from their per-device shards: more than nothing, less than the whole model.
  whole = compile_step(config_loading.load_config(TINY), "cpu-1", seq_len=160, num_features=4, log=lambda _: None)
  assert 0 < report.arguments < whole.arguments
  assert "DOES NOT FIT" in out and "required for HLO temporaries (24.66G)" in out and "Traceback" not in out


def test_other_compiler_errors_are_not_hidden(monkeypatch):
  import jax

  from vtimellm_jax.training import trainer

  class BrokenStep:
    def lower(self, *args):
      return self

    def compile(self):
      raise jax.errors.JaxRuntimeError("INTERNAL: something else")

  monkeypatch.setattr(trainer.TrainState, "jit_step", lambda self: BrokenStep())
  with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
    aot.compile_step(config_loading.load_config(TINY), "cpu-8", seq_len=64, num_features=4, log=lambda _: None)
