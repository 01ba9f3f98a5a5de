"""Our LLaMA equals HF's LlamaForCausalLM (fp32): every layer's hidden states and the logits."""

import pytest

from hf_reference import (assert_cached_decode_matches_forward, assert_forward_matches_hf, hf_llama, jax_from_hf,
                          random_batch)
from vtimellm_jax.errors import UserError
from vtimellm_jax.models.llama import LlamaConfig
from vtimellm_jax.models import llama


@pytest.mark.parametrize("kv_heads", [4, 2])  # MHA as Vicuna, and grouped KV heads
def test_hidden_states_and_logits_match_hf(kv_heads):
  config = llama.tiny(num_kv_heads=kv_heads, num_layers=3)
  hf = hf_llama(config)
  ours = jax_from_hf(hf, config)
  ids, mask = random_batch(config.vocab_size, 3, 16, [16, 11, 5])
  assert_forward_matches_hf(ours, hf, ids, mask, config.num_layers)


@pytest.mark.parametrize("kv_heads,mode", [(4, "exact"), (2, "whole"), (2, "shared")])
def test_kv_cache_decode_matches_full_forward(kv_heads, mode):
  config = llama.tiny(num_kv_heads=kv_heads)
  ours = jax_from_hf(hf_llama(config), config)
  assert ours.init_cache(2, 16).k.shape == (2, 2, kv_heads, 16, 16)  # [L, B, K, S, H]
  assert_cached_decode_matches_forward(ours, config.vocab_size, mode)


def test_presets_and_hf_config():
  assert llama.vicuna_7b().hidden_size == 4096 and llama.vicuna_7b().num_layers == 32
  c13 = llama.vicuna_13b()
  assert (c13.hidden_size, c13.num_layers, c13.num_heads, c13.intermediate_size) == (5120, 40, 40, 13824)
  hf = llama.tiny(num_kv_heads=2).to_hf_dict()
  assert LlamaConfig.from_hf_dict(hf) == llama.tiny(num_kv_heads=2, head_dim=16)
  with pytest.raises(UserError) as e:
    LlamaConfig.from_hf_dict({**hf, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "hidden_act": "gelu"})
  message = str(e.value)
  assert "gpt2" in message and "GPT2LMHeadModel" in message and "gelu" in message  # every problem at once
