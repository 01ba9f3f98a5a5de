"""`vtimellm-jax bench train` runs the trainer's step on CPU (smoke test; no timing assertions)."""

import json
import math

from vtimellm_jax import cli
from vtimellm_jax.models.llama import REMAT_MODES
from vtimellm_jax.models import llama
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
  assert cli.main([*args, "--remat", "lora"]) == 0
  lora_remat = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert lora_remat["remat"] == "lora" and math.isclose(lora_remat["loss"], result["loss"], rel_tol=1e-5)
  assert "xla_flags" in result  # the environment's XLA_FLAGS, which an A/B of flags varies per process


def test_every_remat_mode_is_a_choice():
  from vtimellm_jax.bench import train
  for mode in REMAT_MODES:
    assert train._parse_args(["--remat", mode]).remat == mode  # pylint: disable=protected-access


def test_flops_count_matches_the_baselines_formula():
  # shared/bench/torch_peft_baseline.py: 4 * (all - trainable - embeddings) + 3 * 4 * L * d * layers; its count
  # also includes the RMSNorm weights (0.004% of the total), which do no matmul and are left out here.
  c = llama.vicuna_7b()
  all_params = (c.vocab_size * c.hidden_size * 2 + c.num_layers * (4 * c.hidden_size**2 + 3 * c.hidden_size * c.intermediate_size
                                                                  + 2 * c.hidden_size) + c.hidden_size)
  norms = c.num_layers * 2 * c.hidden_size + c.hidden_size
  frozen_matmul = all_params - c.vocab_size * c.hidden_size - norms
  want = 4 * frozen_matmul + 3 * 4 * 256 * c.hidden_size * c.num_layers
  assert training_flops_per_token(c, 256) == want
