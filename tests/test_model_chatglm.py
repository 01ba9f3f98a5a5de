"""The ChatGLM3 family equals HF's GlmForCausalLM (fp32), its fused LoRA equals peft's, generation equals HF's."""

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
from flax import nnx

from hf_reference import (assert_cached_decode_matches_forward, assert_forward_matches_hf, fuse_glm_qkv, glm_arrays,
                          hf_forward, hf_glm, hf_greedy, jax_from_hf_glm, random_batch, rel_err)
from vtimellm_jax.inference import generate as gen
from vtimellm_jax.models import chatglm, families, load, lora
from vtimellm_jax.models.llama import LlamaForCausalLM
from vtimellm_jax.models.vtimellm import VTimeLLM
from vtimellm_jax.training import step as step_lib

# The sizes of the brief: MQA with 2 kv groups, rope on half of each 16-dim head.
CONFIG = chatglm.tiny(vocab_size=128, num_layers=3)
RANK, ALPHA = 4, 8.0


@pytest.mark.parametrize("fused", [True, False])  # ChatGLM's storage, and the same options with separate q/k/v
def test_hidden_states_and_logits_match_hf_glm(fused):
  config = CONFIG.replace(fused_projections=fused)
  hf = hf_glm(config)
  ours = jax_from_hf_glm(hf, config)
  ids, mask = random_batch(config.vocab_size, 3, 16, [16, 11, 5])
  assert_forward_matches_hf(ours, hf, ids, mask, config.num_layers)


@pytest.mark.parametrize("change", [dict(rope_interleaved=False), dict(partial_rotary_factor=1.0)])
def test_each_rope_option_is_what_makes_the_match(change):
  # The same weights with LLaMA's rope layout or rope on every dim no longer equal HF Glm.
  hf = hf_glm(CONFIG)
  ours = load.sharded_model(lambda: LlamaForCausalLM(CONFIG.replace(**change), nnx.Rngs(0)),
                            sources=[load.ArraySource(glm_arrays(hf, CONFIG))], may_initialise=lambda path: False)
  ids, mask = random_batch(CONFIG.vocab_size, 1, 12, [12])
  assert rel_err(ours(jnp.asarray(ids)), hf_forward(hf, ids, mask).logits.numpy(), mask.astype(bool)) > 1e-3


def test_kv_cache_decode_matches_full_forward():
  ours = jax_from_hf_glm(hf_glm(CONFIG), CONFIG)
  assert ours.init_cache(2, 16).k.shape == (3, 2, 2, 16, 16)  # [L, B, K, S, H]: only the 2 kv groups are cached
  assert_cached_decode_matches_forward(ours, CONFIG.vocab_size, "exact")
  assert_cached_decode_matches_forward(ours, CONFIG.vocab_size, "shared")


def test_presets_and_release_targets():
  c = chatglm.chatglm3_6b()
  assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_size) == (4096, 28, 32, 2, 128)
  assert (c.intermediate_size, c.vocab_size, c.rotary_dim, c.rope_theta) == (13696, 65024, 64, 10000.0)
  assert families.preset("chatglm3_6b") == c and families.preset("chatglm3_tiny").fused_projections
  assert set(chatglm.RELEASE_LORA_TARGETS) == {"query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h",
                                               "output_layer"}
  with pytest.raises(ValueError, match="not a LLaMA"):
    c.to_hf_dict()
  shapes = nnx.eval_shape(lambda: LlamaForCausalLM(c, nnx.Rngs(0)))
  attn = shapes.model.layers.self_attn
  assert attn.qkv_proj.kernel.shape == (28, 4096, (32 + 2 * 2) * 128) and attn.qkv_proj.bias.shape == (28, 4608)
  assert attn.o_proj.bias is None and shapes.model.layers.mlp.gate_up_proj.kernel.shape == (28, 4096, 2 * 13696)
  # 6.24B parameters, ChatGLM3-6B's count.
  assert sum(x.size for x in jax.tree.leaves(nnx.state(shapes, nnx.Param))) == 6_243_584_000


def _fused_peft_reference(hf):
  """Returns the HF Glm model rewired as ChatGLM (one `query_key_value` Linear per layer) with peft LoRA on
  the release's targets, B factors random."""
  fuse_glm_qkv(hf, CONFIG)
  # Ours -> the torch module names standing for the release's query_key_value, dense, dense_h_to_4h, ...
  names = {"qkv_proj": "query_key_value", "o_proj": "o_proj", "gate_up_proj": "gate_up_proj",
           "down_proj": "down_proj", "lm_head": "lm_head"}
  model = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                                  target_modules=[names[t] for t in chatglm.LORA_TARGETS]))
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.copy_(0.05 * torch.randn_like(p))
  return model.eval(), names


def _lora_setup():
  hf = hf_glm(CONFIG)
  ours = jax_from_hf_glm(hf, CONFIG)  # base weights read before peft rewrites the model
  peft_model, names = _fused_peft_reference(hf)
  count = lora.attach_lora(ours, lora.LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.0, targets=chatglm.LORA_TARGETS),
                           nnx.Rngs(3))
  assert count == CONFIG.num_layers * 4 + 1  # four projections per layer, and the output layer
  state = {k: v.detach().numpy() for k, v in peft_model.state_dict().items()}
  copied = 0
  for path, layer in lora.lora_layers(ours, chatglm.LORA_TARGETS):
    name = names[path[-1]]
    if layer.stack_shape:
      prefixes = [f"base_model.model.model.layers.{i}.{path[-2]}.{name}" for i in range(layer.stack_shape[0])]
      layer.lora_a[...] = jnp.asarray(np.stack([state[p + ".lora_A.default.weight"].T for p in prefixes]))
      layer.lora_b[...] = jnp.asarray(np.stack([state[p + ".lora_B.default.weight"].T for p in prefixes]))
    else:
      layer.lora_a[...] = jnp.asarray(state[f"base_model.model.{name}.lora_A.default.weight"].T)
      layer.lora_b[...] = jnp.asarray(state[f"base_model.model.{name}.lora_B.default.weight"].T)
    copied += 1
  assert copied == len(chatglm.LORA_TARGETS)
  return peft_model, ours


def test_fused_lora_on_the_release_targets_matches_peft():
  peft_model, ours = _lora_setup()
  ids, mask = random_batch(CONFIG.vocab_size, 2, 12, [12, 8])
  labels = np.where(mask == 1, ids, -100)
  labels[:, :3] = -100
  with torch.no_grad():
    ref = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
    base = peft_model.get_base_model()
    with peft_model.disable_adapter():
      without = base(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  valid = mask.astype(bool)
  assert rel_err(ref.logits.numpy(), without, valid) > 1e-2  # the LoRA changes the output noticeably
  logits = ours(jnp.asarray(ids), jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(logits)[valid], ref.logits.numpy()[valid], rtol=1e-4, atol=1e-4)
  total, count = step_lib.nll_sum(logits, jnp.asarray(labels))
  np.testing.assert_allclose(float(total / count), float(ref.loss), rtol=1e-5)
  # Merged (ours, and peft's merge_and_unload) equals unmerged.
  qkv = ours.model.layers.self_attn.qkv_proj
  by_hand = np.asarray(qkv.kernel[...]) + (ALPHA / RANK) * np.asarray(qkv.lora_a[...]) @ np.asarray(qkv.lora_b[...])
  assert lora.merge_lora(ours) == CONFIG.num_layers * 4 + 1
  np.testing.assert_allclose(np.asarray(qkv.kernel[...]), by_hand, rtol=1e-6, atol=1e-7)
  merged_ref = peft_model.merge_and_unload()
  with torch.no_grad():
    merged_logits = merged_ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))[valid], merged_logits[valid],
                             rtol=1e-4, atol=1e-4)


def test_llama_targets_are_refused_on_a_chatglm_model():
  model = LlamaForCausalLM(chatglm.tiny(num_layers=1), nnx.Rngs(0))
  with pytest.raises(ValueError, match="q_proj"):
    lora.attach_lora(model, lora.LoraConfig(rank=2, alpha=4.0, dropout=0.0), nnx.Rngs(1))


def test_saved_chatglm_vtimellm_with_lora_loads_whole(tmp_path):
  config = chatglm.tiny(num_layers=1)
  model = VTimeLLM(config, nnx.Rngs(0))
  lora.attach_lora(model, lora.LoraConfig(rank=4, alpha=16.0, dropout=0.0, targets=chatglm.LORA_TARGETS), nnx.Rngs(1))
  for _, layer in lora.lora_layers(model):
    layer.lora_b[...] = jnp.full_like(layer.lora_b[...], 0.01)
  load.save_model(model, tmp_path / "m")
  loaded = load.load_model(tmp_path / "m")
  assert isinstance(loaded, VTimeLLM) and loaded.config == config
  assert loaded.lm_head.has_lora and loaded.model.layers.mlp.gate_up_proj.has_lora
  assert not loaded.mm_projector.has_lora  # the adapter is no LoRA target
  ids = jnp.array([[1, -200, 5, 6]])
  feats = jnp.ones((1, 2, 768))
  np.testing.assert_array_equal(np.asarray(loaded(ids, jnp.ones_like(ids), feats)[0]),
                                np.asarray(model(ids, jnp.ones_like(ids), feats)[0]))


def test_greedy_generation_equals_hf_generate():
  hf = hf_glm(CONFIG, seed=3)
  ours = jax_from_hf_glm(hf, CONFIG)
  rng = np.random.RandomState(0)
  prompts = [rng.randint(3, CONFIG.vocab_size, n).tolist() for n in (9, 3, 6)]
  greedy = gen.GenerationConfig(max_new_tokens=8, temperature=0, eos_id=-1)
  rows = gen.generate_from_ids(ours, prompts, greedy).rows()
  for prompt, row in zip(prompts, rows):
    assert row == hf_greedy(hf, prompt, 8, eos_id=-1)
  # The right-padded batch equals each prompt alone.
  assert [gen.generate_from_ids(ours, [p], greedy).rows()[0] for p in prompts] == rows
