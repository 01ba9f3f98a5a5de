"""The answering layout (one module per layer, fused projections) computes what the stacked model does,
and its decode step reads the weights and the live part of the cache, in place."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpu_fixtures import needs_cuda_plugin
from hf_reference import assert_cached_decode_matches_forward, hf_glm, hf_llama, jax_from_hf, jax_from_hf_glm
from vtimellm_jax import sharding
from vtimellm_jax.inference import generate
from vtimellm_jax.models import answering, chatglm, llama, lora
from vtimellm_jax.models.kv_cache import CacheStep
from vtimellm_jax.models.llama import LlamaForCausalLM
from vtimellm_jax.models.vtimellm import VTimeLLM


def _stacked_arrays(model):
  return [var.get_value() for _, var in nnx.to_flat_state(nnx.state(model.model.layers))]


@pytest.mark.parametrize("family", ["llama", "llama_gqa", "chatglm3", "vtimellm"])
def test_layout_computes_what_the_stacked_model_computes(family):
  if family == "chatglm3":
    config = chatglm.tiny()
    model = jax_from_hf_glm(hf_glm(config), config)
  elif family == "vtimellm":
    config = llama.tiny()
    model = VTimeLLM(config, nnx.Rngs(0))
  else:
    config = llama.tiny(num_kv_heads=2 if family == "llama_gqa" else 4)
    model = jax_from_hf(hf_llama(config), config)
  rng = np.random.default_rng(0)
  ids = rng.integers(3, config.vocab_size, (2, 12))
  mask = jnp.asarray(np.arange(12)[None] < np.array([[12], [7]]), jnp.int32)
  if family == "vtimellm":  # a placeholder per row, four frames of features spliced in at it
    ids[:, 2] = -200
    features = jnp.asarray(rng.standard_normal((2, 4, model.feature_dim)), jnp.float32)
    forward = lambda: model(jnp.asarray(ids), mask, features)[0]  # noqa: E731
  else:
    forward = lambda: model(jnp.asarray(ids), mask)  # noqa: E731
  stacked_logits = np.asarray(forward())
  stacked = _stacked_arrays(model)

  assert answering.answering_layout(model) is model and answering.is_answering_layout(model)
  assert all(a.is_deleted() for a in stacked)  # freed as the layout was built
  assert len(model.model.layers) == config.num_layers
  names = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(nnx.state(model.model.layers[0]))}
  assert {"self_attn/qkv_proj/kernel", "mlp/gate_up_proj/kernel"} <= names and "self_attn/q_proj/kernel" not in names
  np.testing.assert_allclose(np.asarray(forward()), stacked_logits, rtol=1e-5, atol=1e-5)
  assert answering.answering_layout(model) is model  # a second call leaves it as it is


def test_layout_refuses_unmerged_lora():
  model = LlamaForCausalLM(llama.tiny(), nnx.Rngs(0))
  lora.attach_lora(model, lora.LoraConfig(rank=4), nnx.Rngs(1))
  with pytest.raises(ValueError, match="merged LoRA"):
    answering.answering_layout(model)
  lora.merge_lora(model)
  assert answering.is_answering_layout(answering.answering_layout(model))


@pytest.mark.parametrize("mode", ["exact", "shared"])
def test_cached_decode_in_the_layout_matches_the_full_forward(mode):
  config = llama.tiny(num_kv_heads=2)
  model = answering.answering_layout(jax_from_hf(hf_llama(config), config))
  cache = model.init_cache(2, 16)
  assert isinstance(cache.k, tuple) and cache.k[0].shape == (2, 2, 16, 16)  # one [B, K, S, H] buffer per layer
  assert_cached_decode_matches_forward(model, config.vocab_size, mode)


# A decode step of generate: B rows at prompt length T, reading `window` slots of an S-slot cache.
_B, _T = 4, 100


def _decode_step_fn(graphdef, window):
  def step_fn(state, cache, tokens, lengths, i):
    model = nnx.merge(graphdef, state)
    step = CacheStep(positions_bt=(lengths + i - 1)[:, None], window=window, slot=_T + i - 1,
                     prompt_lengths_b=lengths, prompt_len=_T)
    return generate.decode_step(model, cache, tokens, step)

  return step_fn


def _compiled_decode_step(model, cache_len: int, window: int, place=lambda x: x):
  graphdef, state = nnx.split(model)
  cache = jax.eval_shape(lambda: model.init_cache(_B, cache_len))
  ints = lambda shape: place(jax.ShapeDtypeStruct(shape, jnp.int32))  # noqa: E731
  return jax.jit(_decode_step_fn(graphdef, window), donate_argnums=1).lower(
      jax.tree.map(place, state), jax.tree.map(place, cache), ints((_B,)), ints((_B,)), ints(())).compile()


def _bytes_accessed(compiled) -> float:
  analysis = compiled.cost_analysis()
  return (analysis[0] if isinstance(analysis, list) else analysis)["bytes accessed"]


def test_decode_step_reads_the_weights_and_the_window_not_the_cache():
  config = llama.tiny(num_layers=4, hidden_size=256, intermediate_size=512, num_heads=4, num_kv_heads=4,
                            max_position_embeddings=8192)
  model = answering.answering_layout(LlamaForCausalLM(config, nnx.Rngs(0)))
  weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  kv_per_slot = 2 * config.num_layers * _B * config.num_kv_heads * config.head_size * 4  # k and v, float32
  read = {(s, w): _bytes_accessed(_compiled_decode_step(model, s, w)) for s, w in
          [(2048, 256), (4096, 256), (4096, 1024)]}
  # The cache's length does not enter the step's reads at all; the window does, about linearly.
  assert read[(4096, 256)] == pytest.approx(read[(2048, 256)], rel=1e-3)
  grown = read[(4096, 1024)] - read[(4096, 256)]
  assert kv_per_slot * 768 <= grown <= 4 * kv_per_slot * 768
  # Weights once, the window of keys and values a few times (XLA's CPU reductions read a copy of
  # the window: the copy's write and read count here; GPU steps read it in place, next test), and
  # far less than the 4096-slot cache.
  assert weights <= read[(4096, 256)] <= weights + 4 * kv_per_slot * 256
  assert read[(4096, 256)] < weights + kv_per_slot * 4096 / 4
  # The cache is updated in place: no copy of a layer's cache, and the temporaries hold no more
  # than the window.
  compiled = _compiled_decode_step(model, 4096, 256)
  copies = [line for line in compiled.as_text().splitlines()
            if re.search(r"\b(copy|transpose)\(", line) and ",4096," in line]
  assert not copies, copies[:3]
  assert compiled.memory_analysis().temp_size_in_bytes <= 1.1 * kv_per_slot * 256



def test_cpu_decode_step_multiplies_the_window_as_matmuls():
  # On a CPU both products with the cache window (logits, then values) are dots: XLA's CPU backend
  # runs the multiply-and-reduce form through a reduce fusion many times slower (models/kv_cache.py).
  config = llama.tiny(num_kv_heads=2)
  model = answering.answering_layout(LlamaForCausalLM(config, nnx.Rngs(0)))
  window, kv, group = 256, config.num_kv_heads, config.num_heads // config.num_kv_heads
  text = _compiled_decode_step(model, 1024, window).as_text()
  logits = re.findall(rf"= f32\[{_B},{kv},{group},{window}\]\S* dot\(", text)
  values = re.findall(rf"= f32\[{_B},{kv},{group},{config.head_size}\]\S* dot\(", text)
  assert len(logits) == len(values) == config.num_layers, (logits, values)
  assert not re.search(rf"= f32\[[\d,]*{window}\]\S* reduce\(", text)  # no logit comes from a reduction

@needs_cuda_plugin
def test_gpu_decode_loop_reads_weights_and_cache_in_place():
  # A stretch of generate's decode loop compiled for a compile-only H100 (the CUDA plugin): 7B
  # widths, two layers, 4 rows, a 512-slot window of a 1280-slot cache. Every matmul reads its
  # kernel where it lies, no kernel-, cache- or window-sized buffer is made or transposed (the
  # loop keeps the cache's stored layout), and the only cache-sized results are in-place writes.
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.training import gpu_targets  # pylint: disable=g-import-not-at-top

  device = topologies.get_topology_desc(platform="cuda", target_config=gpu_targets.target_config("h100"),
                                        topology="1x1x1").devices[0]
  on_device = jax.sharding.SingleDeviceSharding(device)
  place = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=on_device)  # noqa: E731
  config = llama.vicuna_7b(num_layers=2, dtype="bfloat16", param_dtype="bfloat16")
  model = nnx.eval_shape(lambda: answering.answering_layout(LlamaForCausalLM(config, nnx.Rngs(0))))
  graphdef, state = nnx.split(model)
  cache_len, new_tokens = 1280, 1024
  ints = lambda *shape: place(jax.ShapeDtypeStruct(shape, jnp.int32))  # noqa: E731
  floats = place(jax.ShapeDtypeStruct((), jnp.float32))
  sampling = (place(jax.eval_shape(lambda: jax.random.split(jax.random.key(0), _B))), floats, floats, ints(), ints(1))
  cache = jax.tree.map(place, jax.eval_shape(lambda: model.init_cache(_B, cache_len)))
  # Traced under the H100's mesh, so that the decode attention takes its GPU form, not this host's.
  with jax.sharding.use_abstract_mesh(sharding.single_device_mesh(device).abstract_mesh):
    compiled = generate._continue_jit.lower(  # pylint: disable=protected-access
        graphdef, jax.tree.map(place, state), cache,
        ints(_B, new_tokens), place(jax.ShapeDtypeStruct((_B,), jnp.bool_)), ints(), ints(), ints(), ints(_B),
        *sampling, window=512, greedy=True, nucleus=False, top_k=0).compile()
  text = compiled.as_text()
  # A copy of one kernel (4096 x 4096), of one layer's cache (4 x 32 x 1280 x 128) or of one window
  # (4 x 32 x 512 x 128) would each take 16 MiB or more of temporaries; the loop needs a few.
  assert compiled.memory_analysis().temp_size_in_bytes < 16 * 2**20
  assert not re.search(r"= bf16\[[\d,]+\]\S* (copy|transpose)\(", text)
  writes = [line for line in text.splitlines() if re.match(r"\s*%\S*dynamic_update_slice_fusion\S* = bf16\[", line)]
  assert len(writes) == 2 * 2  # k and v of each layer, in place
