"""`vtimellm-jax bench load` measures a load and a conversion in fresh processes (CPU smoke test, no timings)."""

import json

import torch

from hf_reference import hf_llama
from vtimellm_jax import cli
from vtimellm_jax.models import llama


def test_bench_load_reports_peak_memory_over_a_tiny_baseline(tmp_path, capsys):
  hf_llama(llama.tiny(num_layers=3), seed=1).to(torch.bfloat16).save_pretrained(tmp_path / "hf")
  assert cli.main(["bench", "load", "--convert-from", str(tmp_path / "hf")]) == 0
  converted = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert cli.main(["convert", "llama", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "jax")]) == 0
  capsys.readouterr()
  assert cli.main(["bench", "load", "--model", str(tmp_path / "jax"), "--mesh-fsdp", "2"]) == 0
  loaded = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  weights = (512 * 64 * 2 + 64 + 3 * (4 * 64 * 64 + 3 * 64 * 176 + 2 * 64)) * 2  # bf16 bytes of the tiny model
  for result, what in ((converted, "convert_llama"), (loaded, "load_model")):
    assert result["what"] == what and result["weight_gb"] == round(weights / 1e9, 3)
    assert result["peak_rss_gb"] > 0 and result["baseline_peak_rss_gb"] > 0 and result["seconds"] > 0
    assert abs(result["above_baseline_gb"] - (result["peak_rss_gb"] - result["baseline_peak_rss_gb"])) <= 0.002
  assert loaded["mesh_fsdp"] == 2
