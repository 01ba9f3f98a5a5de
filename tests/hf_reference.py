"""Reference PyTorch models for parity tests: HF LLaMA built with random weights, in fp32."""

from __future__ import annotations

import numpy as np
import torch
import transformers

from vtimellm_jax.convert import llama as llama_convert
from vtimellm_jax.models import load
from vtimellm_jax.models.llama import LlamaConfig, LlamaForCausalLM


def hf_llama(config: LlamaConfig, seed: int = 0) -> transformers.LlamaForCausalLM:
  """Returns an HF LlamaForCausalLM of the same architecture with random (non-trivial) weights."""
  torch.manual_seed(seed)
  hf_dict = {k: v for k, v in config.to_hf_dict().items() if k not in ("architectures", "model_type")}
  model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_dict, attn_implementation="eager"))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))  # exercise the norm scale, not just ones
  return model.eval()


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def jax_from_hf(hf_model, config: LlamaConfig, model_cls=LlamaForCausalLM, seed: int = 0):
  """Returns our model holding the HF model's weights, mapped through the conversion table."""
  from flax import nnx

  expected = llama_convert.abstract_params(config)
  tensors = (("<memory>", k, v) for k, v in state_dict_numpy(hf_model).items())
  flat = llama_convert.convert_tensors(tensors, expected, np.float32, "hf model")
  arrays = load.ArraySource({tuple(path.split("/")): value for path, value in flat.items()}, name="hf model")
  return load.sharded_model(lambda: model_cls(config, nnx.Rngs(seed)), sources=[arrays],
                            may_initialise=lambda path: model_cls is not LlamaForCausalLM)


def random_batch(vocab: int, batch: int, length: int, lengths: list[int], seed: int = 0):
  """Returns (ids int64[B, T], mask int64[B, T]) right-padded to `lengths`."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, vocab, (batch, length))
  mask = (np.arange(length)[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
  ids = np.where(mask == 1, ids, 0)
  return ids, mask
