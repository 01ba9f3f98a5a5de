"""`vtimellm-jax bench train` runs the trainer's step on CPU (smoke test; no timing assertions)."""

import json
import math

from vtimellm_jax import cli
from vtimellm_jax.models.llama import LlamaConfig
from vtimellm_jax.training.step import training_flops_per_token


def test_bench_train_smoke(capsys):
  args = ["bench", "train", "--size", "tiny", "--batch", "2", "--text-len", "24", "--iters", "1", "--warmup", "1",
          "--lora-rank", "4"]
  assert cli.main(args) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["what"] == "jax_lora_train" and result["L"] == 24 - 1 + 100 and result["B"] == 2
  assert math.isfinite(result["loss"]) and result["tokens_per_s"] > 0
  # Full rematerialisation of the scanned layers changes no number: the same loss after the same steps.
  assert cli.main([*args, "--remat", "full"]) == 0
  remat = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert remat["remat"] == "full" and result["remat"] == "none"
  assert math.isclose(remat["loss"], result["loss"], rel_tol=1e-5)


def test_flops_count_matches_the_baselines_formula():
  # shared/bench/torch_peft_baseline.py: 4 * (all - trainable - embeddings) + 3 * 4 * L * d * layers; its count
  # also includes the RMSNorm weights (0.004% of the total), which do no matmul and are left out here.
  c = LlamaConfig.vicuna_7b()
  all_params = (c.vocab_size * c.hidden_size * 2 + c.num_layers * (4 * c.hidden_size**2 + 3 * c.hidden_size * c.intermediate_size
                                                                  + 2 * c.hidden_size) + c.hidden_size)
  norms = c.num_layers * 2 * c.hidden_size + c.hidden_size
  frozen_matmul = all_params - c.vocab_size * c.hidden_size - norms
  want = 4 * frozen_matmul + 3 * 4 * 256 * c.hidden_size * c.num_layers
  assert training_flops_per_token(c, 256) == want


def test_peak_tflops_by_device_kind():
  from types import SimpleNamespace
  from vtimellm_jax.training.step import peak_tflops
  h100 = SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
  v5e = SimpleNamespace(device_kind="TPU v5 lite")
  assert peak_tflops([h100, h100]) == 2 * 989.0
  assert peak_tflops([v5e]) == 197.0
  assert peak_tflops([SimpleNamespace(device_kind="cpu")]) == 0.0  # unknown: no MFU rather than a wrong one
