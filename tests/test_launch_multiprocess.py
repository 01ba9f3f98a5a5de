"""Two processes on localhost (jax.distributed, 4 CPU devices each) train like one process with 8."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from training_fixtures import make_dataset
from vtimellm_jax.training import config_loading, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]

# One process of the pair: the coordinator comes from the environment, as launch/gpu/run.sh sets it.
_WORKER = textwrap.dedent("""
    import json, os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from vtimellm_jax.training import config_loading, trainer
    config = config_loading.load_config({config!r}, {overrides!r})
    summary = trainer.train(config, {workdir!r}, log=lambda _: None)
    print(json.dumps(dict(summary, processes=jax.process_count(), local=jax.local_device_count(),
                          devices=jax.device_count(), index=jax.process_index())))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _losses(workdir):
  return [json.loads(line)["loss"] for line in open(pathlib.Path(workdir) / "metrics.jsonl")]


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
  data = make_dataset(tmp_path / "data", records=16)
  config = str(ROOT / "configs/stage2.py") + ":tiny"
  # 16 rows over 8 devices (micro-batch 2, no accumulation) puts the same rows on the same devices
  # in both runs; host p of 2 loads rows [8p, 8p + 8) of each global batch.
  overrides = [f"--config.data.json={data['stage2']}", f"--config.data.features={data['features']}",
               f"--config.data.tokenizer={data['tokenizer']}", "--config.max_steps=3", "--config.epochs=3",
               "--config.global_batch=16", "--config.micro_batch=2", "--config.log_every=1000",
               "--config.checkpoint.async_save=False"]
  port = _free_port()
  script = _WORKER.format(config=config, overrides=overrides, workdir=str(tmp_path / "two"))
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_"))}
  procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                                JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  try:
    # The reference runs here meanwhile: one process over conftest's 8 devices.
    assert jax.device_count() == 8
    single = trainer.train(config_loading.load_config(config, overrides), tmp_path / "one", log=lambda _: None)
    outputs = [p.communicate(timeout=400) for p in procs]
  finally:
    for p in procs:
      p.kill()
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-3000:]
  summaries = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
  assert sorted(s["index"] for s in summaries) == [0, 1]
  assert all((s["processes"], s["local"], s["devices"], s["steps"]) == (2, 4, 8, 3) for s in summaries)
  assert single["steps"] == 3
  # Only process 0 writes metrics; every process computes the same global loss.
  np.testing.assert_allclose(_losses(tmp_path / "two"), _losses(tmp_path / "one"), rtol=0, atol=1e-5)
  assert summaries[0]["final_loss"] == summaries[1]["final_loss"]
