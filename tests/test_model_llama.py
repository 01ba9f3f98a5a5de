"""Our LLaMA equals HF's LlamaForCausalLM (fp32): every layer's hidden states and the logits."""

import jax.numpy as jnp
import numpy as np
import pytest

from hf_reference import assert_forward_matches_hf, hf_llama, jax_from_hf, random_batch
from vtimellm_jax.errors import UserError
from vtimellm_jax.models.llama import LlamaConfig


@pytest.mark.parametrize("kv_heads", [4, 2])  # MHA as Vicuna, and grouped KV heads
def test_hidden_states_and_logits_match_hf(kv_heads):
  config = LlamaConfig.tiny(num_kv_heads=kv_heads, num_layers=3)
  hf = hf_llama(config)
  ours = jax_from_hf(hf, config)
  ids, mask = random_batch(config.vocab_size, 3, 16, [16, 11, 5])
  assert_forward_matches_hf(ours, hf, ids, mask, config.num_layers)


def test_kv_cache_decode_matches_full_forward():
  config = LlamaConfig.tiny()
  hf = hf_llama(config)
  ours = jax_from_hf(hf, config)
  ids, mask = random_batch(config.vocab_size, 2, 10, [10, 7])
  full = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
  # Prefill the first 4 tokens of each row, then feed the rest one at a time.
  cache = ours.init_cache(2, 16)
  lengths = jnp.array([4, 4])
  embeds = ours.model.embed(jnp.asarray(ids[:, :4]))
  positions = jnp.broadcast_to(jnp.arange(4), (2, 4))
  hidden, cache, _ = ours.model(embeds, positions, lengths, cache=cache, cache_index_b=jnp.zeros(2, jnp.int32))
  np.testing.assert_allclose(np.asarray(ours.lm_head(hidden)), full[:, :4], atol=1e-4)
  for t in range(4, 7):
    step = ours.model.embed(jnp.asarray(ids[:, t:t + 1]))
    pos = jnp.full((2, 1), t)
    hidden, cache, _ = ours.model(step, pos, lengths, cache=cache, cache_index_b=jnp.full((2,), t, jnp.int32))
    np.testing.assert_allclose(np.asarray(ours.lm_head(hidden))[:, 0], full[:, t], atol=1e-4)


def test_presets_and_hf_config():
  assert LlamaConfig.vicuna_7b().hidden_size == 4096 and LlamaConfig.vicuna_7b().num_layers == 32
  c13 = LlamaConfig.vicuna_13b()
  assert (c13.hidden_size, c13.num_layers, c13.num_heads, c13.intermediate_size) == (5120, 40, 40, 13824)
  hf = LlamaConfig.tiny(num_kv_heads=2).to_hf_dict()
  assert LlamaConfig.from_hf_dict(hf) == LlamaConfig.tiny(num_kv_heads=2, head_dim=16)
  with pytest.raises(UserError) as e:
    LlamaConfig.from_hf_dict({**hf, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "hidden_act": "gelu"})
  message = str(e.value)
  assert "gpt2" in message and "GPT2LMHeadModel" in message and "gelu" in message  # every problem at once
