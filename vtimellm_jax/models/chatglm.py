"""The ChatGLM3 family (ChatGLM3-6B, the release's second LLM): configs, names and LoRA targets.

ChatGLM3 is a pre-norm decoder like LLaMA (RMSNorm, SwiGLU, untied output layer, causal attention)
and runs on the same modules (`llama.LlamaForCausalLM`, `vtimellm.VTimeLLM`): the same stacked
layers and scan, KV cache, attention kernels, sharding names, LoRA, loader and generation. What
differs is set by the architecture options of `LlamaConfig`:

  multi-query attention   32 query heads share 2 key/value groups (`num_kv_heads=2`)
  qkv_bias                bias on the query/key/value projection only
  partial_rotary_factor   rope on the first half of each head's 128 dims, the rest unrotated
  rope_interleaved        rope pairs dims (2i, 2i + 1), not (i, i + 64) as LLaMA
  fused_projections       one `qkv_proj` with columns [q | k | v] and one `gate_up_proj` [gate | up]

The projections are fused because ChatGLM's checkpoints are, and the release puts one LoRA on each
fused Linear: a LoRA on [D, q + k + v] is not three separate LoRAs (its A is shared).

HF transformers ships the same computation as `GlmForCausalLM` (GLM-4's model, which HF's conversion
of ChatGLM checkpoints targets); it is the parity reference of tests/test_model_chatglm.py.
Parameter names (ours hold every layer stacked in one array: `layers/` is `model/layers/`; HF's and
ChatGLM3's are per layer i):

  ours                          HF GlmForCausalLM                  ChatGLM3 (release)           release LoRA target
  model/embed_tokens            model.embed_tokens                 transformer.embedding.word_embeddings
  layers/input_layernorm        model.layers.i.input_layernorm     transformer.encoder.layers.i.input_layernorm
  layers/self_attn/qkv_proj     ...self_attn.{q,k,v}_proj (split)  ...self_attention.query_key_value  query_key_value
  layers/self_attn/o_proj       ...self_attn.o_proj                ...self_attention.dense            dense
  layers/post_attention_layernorm  ...post_attention_layernorm     ...post_attention_layernorm
  layers/mlp/gate_up_proj       ...mlp.gate_up_proj                ...mlp.dense_h_to_4h               dense_h_to_4h
  layers/mlp/down_proj          ...mlp.down_proj                   ...mlp.dense_4h_to_h               dense_4h_to_h
  model/norm                    model.norm                         transformer.encoder.final_layernorm
  lm_head                       lm_head                            transformer.output_layer           output_layer

Kernels are [in, out] (torch weights transposed); no permutation of q/k columns is needed, as HF
Glm and ChatGLM both rotate interleaved pairs.
"""

from __future__ import annotations

from typing import Any

from vtimellm_jax.models.llama import LlamaConfig

# The release's `find_all_linear_names` takes every nn.Linear but one named `lm_head`; ChatGLM3
# calls its output layer `output_layer`, so that one is targeted too. Release name -> ours.
RELEASE_LORA_TARGETS = {
    "query_key_value": "qkv_proj",
    "dense": "o_proj",
    "dense_h_to_4h": "gate_up_proj",
    "dense_4h_to_h": "down_proj",
    "output_layer": "lm_head",
}
LORA_TARGETS = tuple(RELEASE_LORA_TARGETS.values())

_FAMILY = dict(qkv_bias=True, partial_rotary_factor=0.5, rope_interleaved=True, fused_projections=True)


def chatglm3_6b(**overrides) -> LlamaConfig:
  """Returns ChatGLM3-6B: 28 layers, width 4096, 32 heads of 128 in 2 kv groups, FFN 13696, vocabulary 65024.

  Rope base 10000 (the release's modeling_chatglm.py has no `rope_ratio`); 8192 positions, the
  checkpoint's `seq_length` (its rope table's length).
  """
  base = dict(vocab_size=65024, hidden_size=4096, intermediate_size=13696, num_layers=28, num_heads=32,
              num_kv_heads=2, head_dim=128, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=8192)
  return LlamaConfig(**{**base, **_FAMILY, **overrides})


def tiny(**overrides) -> LlamaConfig:
  """Returns a tiny ChatGLM3-shaped config for tests: 2 layers, width 64, 4 heads of 16 in 2 kv groups."""
  base = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
              head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=2048)
  return LlamaConfig(**{**base, **_FAMILY, **overrides})


def to_hf_glm_dict(config: LlamaConfig) -> dict[str, Any]:
  """Returns the HF `GlmConfig` dict of the same architecture (how GLM checkpoints' config.json reads)."""
  if not config.rope_interleaved:
    raise ValueError("HF Glm rotates interleaved pairs; this config rotates halves (a LLaMA)")
  return {
      "architectures": ["GlmForCausalLM"], "model_type": "glm", "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers, "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_size, "rms_norm_eps": config.rms_norm_eps,
      "max_position_embeddings": config.max_position_embeddings, "attention_bias": config.qkv_bias,
      "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta,
                          "partial_rotary_factor": config.partial_rotary_factor},
      "hidden_act": "silu", "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 2, "bos_token_id": None,
  }
