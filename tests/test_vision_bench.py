"""The CLIP benchmark runs on CPU with the tiny config and prints one JSON line per measurement."""

import json

import pytest

from vtimellm_jax.bench import clip as bench_clip


def test_bench_smoke(capsys):
  assert bench_clip.main(["--config", "tiny", "--batch-sizes", "8", "--warmup", "1", "--iters", "1"]) == 0
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert len(records) == 1
  assert records[0]["batch"] == 8 and records[0]["out"] == [8, 768] and records[0]["frames_per_s"] > 0
  # The default kernel choice, resolved for this CPU; model FLOPs beside the rate; no known peak for a CPU.
  assert records[0]["attention"] == "auto" and records[0]["attention_kernel"] == "xla"
  assert records[0]["gflops_per_frame"] > 0 and "peak_fraction" not in records[0]


def test_bench_attention_choice_and_peak_fraction(capsys, monkeypatch):
  from vtimellm_jax import device_peaks

  # A device whose 16-bit peak is known gets the fraction of it; at 1 TFLOP/s it is tflops_per_s.
  monkeypatch.setattr(device_peaks, "peaks", lambda device: device_peaks.DevicePeaks(1.0, 1.0))
  assert bench_clip.main(["--config", "tiny", "--batch-sizes", "4", "--warmup", "0", "--iters", "1",
                          "--attention", "xla"]) == 0
  (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert record["attention"] == "xla" and record["attention_kernel"] == "xla"
  expected = record["gflops_per_frame"] * 1e9 * record["frames_per_s"] / 1e12
  assert record["peak_fraction"] == pytest.approx(expected, rel=0.05, abs=1e-3)


def test_bench_preprocess_smoke(capsys):
  # An upscaled and a downscaled size: host window and packing, then the jitted device resize.
  assert bench_clip.main(["--config", "tiny", "--batch-sizes", "", "--preprocess", "48x64,300x400", "--iters", "1"]) == 0
  records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
  assert [(r["mode"], r["height"], r["width"]) for r in records] == [("preprocess", 48, 64), ("preprocess", 300, 400)]
  assert all(r["s_per_video"] > 0 for r in records)


def test_bench_extract_reports_host_cpu_per_video(official_fixtures, capsys):
  # The real demo video: ours measured; the release's path measured where decord and torchvision are.
  from vtimellm_jax import cli

  assert cli.main(["bench", "extract", "--videos", str(official_fixtures / "demo.mp4"), "--iters", "1"]) == 0
  records = {r["path"]: r for r in map(json.loads, capsys.readouterr().out.splitlines())}
  assert set(records) == {"ours", "release"}
  assert records["ours"]["videos"] == 1 and records["ours"]["host_cpu_s_per_video"] > 0
  assert records["ours"]["videos_per_s"] > 0
  release = records["release"]
  assert release.get("host_cpu_s_per_video", 0) > 0 or "torchvision" in release.get("skipped", "") \
      or "decord" in release.get("skipped", "")
