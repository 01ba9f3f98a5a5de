"""Two processes on localhost (jax.distributed, 4 CPU devices each) extract one folder together."""

import json
import os
import pathlib
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from test_vision_extract import _write_video
from vtimellm_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]

# One process of the pair: the coordinator comes from the environment, as launch/gpu/run.sh sets it.
_WORKER = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from vtimellm_jax import cli
    sys.exit(cli.main({args!r}))
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _args(videos, out):
  return ["extract-features", "--videos", str(videos), "--clip", "tiny-random", "--out", str(out),
          "--batch-size", "100", "--workers", "1", "--no-progress"]


def _run_pair(videos, out):
  port = _free_port()
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "XLA_"))}
  script = _WORKER.format(args=_args(videos, out))
  procs = [subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(env, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                                                JAX_PROCESS_ID=str(i)))
           for i in range(2)]
  try:
    outputs = [p.communicate(timeout=300) for p in procs]
  finally:
    for p in procs:
      p.kill()
  return [(p.returncode, err) for p, (_, err) in zip(procs, outputs)]


def _features(out):
  return {p.name: p.read_bytes() for p in sorted(out.glob("*.npy"))}


@pytest.mark.slow
def test_two_processes_extract_each_video_once_and_resume(tmp_path):
  videos = tmp_path / "videos"
  videos.mkdir()
  for k, name in enumerate(["a", "b", "c", "d", "e"]):
    _write_video(videos / f"{name}.mp4", 30 + 5 * k, 32, 32)
  (videos / "corrupt.mp4").write_bytes(b"\x00 not a video " * 40)

  # The reference: one process over conftest's 8 devices.
  assert cli.main(_args(videos, tmp_path / "one")) == 1
  single = _features(tmp_path / "one")
  assert sorted(single) == ["a.npy", "b.npy", "c.npy", "d.npy", "e.npy"]

  results = _run_pair(videos, tmp_path / "two")
  # Every process reports its own shard; the one holding the corrupt video exits 1.
  assert sorted(code for code, _ in results) == [0, 1], [err[-2000:] for _, err in results]
  assert _features(tmp_path / "two") == single  # the union, byte for byte
  shards = sorted(p.name for p in (tmp_path / "two").glob("failures.*-of-2.jsonl"))
  assert shards == ["failures.0-of-2.jsonl", "failures.1-of-2.jsonl"]
  merged = [json.loads(line) for line in (tmp_path / "two" / "failures.jsonl").read_text().splitlines()]
  assert [f["id"] for f in merged] == ["corrupt"]

  # A process killed mid-run leaves some ids missing and maybe a temp file: a rerun completes the set.
  for name in ("b.npy", "c.npy"):
    (tmp_path / "two" / name).unlink()
  (tmp_path / "two" / ".c.npy.123.tmp").write_bytes(b"partial")
  assert sorted(code for code, _ in _run_pair(videos, tmp_path / "two")) == [0, 1]
  assert _features(tmp_path / "two") == single
  np.testing.assert_array_equal(np.load(tmp_path / "two" / "b.npy"), np.load(tmp_path / "one" / "b.npy"))
