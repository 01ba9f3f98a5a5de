"""Reference PyTorch models for parity tests: HF LLaMA and Glm (ChatGLM) built with random weights, in fp32."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch
import transformers

from vtimellm_jax.convert import llama as llama_convert
from vtimellm_jax.models import chatglm, load
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


def hf_glm(config: LlamaConfig, seed: int = 0) -> transformers.GlmForCausalLM:
  """Returns an HF GlmForCausalLM (ChatGLM's architecture) of `config` with random weights, biases and norms."""
  torch.manual_seed(seed)
  hf_dict = {k: v for k, v in chatglm.to_hf_glm_dict(config).items() if k not in ("architectures", "model_type")}
  model = transformers.GlmForCausalLM(transformers.GlmConfig(**hf_dict, attn_implementation="eager"))
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn_like(p))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))  # HF initialises biases to 0
  return model.eval()


def glm_arrays(hf_model, config: LlamaConfig) -> dict[tuple[str, ...], np.ndarray]:
  """Returns our {path: array} of an HF Glm model: kernels transposed, layers stacked, q/k/v fused if ours are."""
  sd = state_dict_numpy(hf_model)
  layer = lambda name: np.stack([sd[f"model.layers.{i}.{name}"] for i in range(config.num_layers)])  # noqa: E731
  kernel = lambda name: layer(name + ".weight").transpose(0, 2, 1)  # noqa: E731
  attn = ("model", "layers", "self_attn")
  out = {
      ("model", "embed_tokens"): sd["model.embed_tokens.weight"],
      ("model", "norm", "weight"): sd["model.norm.weight"],
      ("lm_head", "kernel"): sd["lm_head.weight"].T,
      ("model", "layers", "input_layernorm", "weight"): layer("input_layernorm.weight"),
      ("model", "layers", "post_attention_layernorm", "weight"): layer("post_attention_layernorm.weight"),
      (*attn, "o_proj", "kernel"): kernel("self_attn.o_proj"),
      ("model", "layers", "mlp", "down_proj", "kernel"): kernel("mlp.down_proj"),
  }
  qkv = ("q_proj", "k_proj", "v_proj")
  if config.fused_projections:
    out[(*attn, "qkv_proj", "kernel")] = np.concatenate([kernel(f"self_attn.{p}") for p in qkv], axis=-1)
    if config.qkv_bias:
      out[(*attn, "qkv_proj", "bias")] = np.concatenate([layer(f"self_attn.{p}.bias") for p in qkv], axis=-1)
    out[("model", "layers", "mlp", "gate_up_proj", "kernel")] = kernel("mlp.gate_up_proj")
  else:
    for p in qkv:
      out[(*attn, p, "kernel")] = kernel(f"self_attn.{p}")
      if config.qkv_bias:
        out[(*attn, p, "bias")] = layer(f"self_attn.{p}.bias")
    gate, up = np.split(kernel("mlp.gate_up_proj"), 2, axis=-1)
    out[("model", "layers", "mlp", "gate_proj", "kernel")] = gate
    out[("model", "layers", "mlp", "up_proj", "kernel")] = up
  return out


def jax_from_hf_glm(hf_model, config: LlamaConfig, model_cls=LlamaForCausalLM, seed: int = 0):
  """Returns our model (ChatGLM options) holding an HF Glm model's weights; every name and shape checked."""
  from flax import nnx

  arrays = load.ArraySource(glm_arrays(hf_model, config), name="hf glm")
  return load.sharded_model(lambda: model_cls(config, nnx.Rngs(seed)), sources=[arrays],
                            may_initialise=lambda path: model_cls is not LlamaForCausalLM)


def rel_err(a, b, mask) -> float:
  """Returns max |a - b| / max |b| over the positions `mask` selects."""
  a, b = np.asarray(a)[mask], np.asarray(b)[mask]
  return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-6))


def hf_forward(hf, ids, mask, **kwargs):
  """Runs an HF causal LM on numpy ids and attention mask without gradients."""
  with torch.no_grad():
    return hf(torch.tensor(ids), attention_mask=torch.tensor(mask), **kwargs)


def assert_forward_matches_hf(ours, hf, ids, mask, num_layers: int) -> None:
  """Every hidden state and the logits of `ours` equal the HF model's (1e-4 relative, real positions),
  and padding does not leak: row 2 alone (its first 5 tokens) equals the same row in the batch."""
  ref = hf_forward(hf, ids, mask, output_hidden_states=True)
  logits, states = ours(jnp.asarray(ids), jnp.asarray(mask), return_hidden_states=True)
  valid = mask.astype(bool)
  assert len(states) == len(ref.hidden_states) == num_layers + 1
  for i, (a, b) in enumerate(zip(states, ref.hidden_states)):
    assert rel_err(a, b.numpy(), valid) < 1e-4, f"hidden state {i}"
  assert rel_err(logits, ref.logits.numpy(), valid) < 1e-4
  alone = ours(jnp.asarray(ids[2:3, :5]), jnp.asarray(mask[2:3, :5]))
  np.testing.assert_allclose(np.asarray(alone)[0], np.asarray(logits)[2, :5], rtol=1e-5, atol=1e-5)


def hf_greedy(hf, prompt, max_new_tokens: int, eos_id: int | list[int] = 2) -> list[int]:
  """Returns HF `generate`'s greedy continuation of one prompt, cut before `eos_id` (or any of a list)."""
  with torch.no_grad():
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id, pad_token_id=0)
  ids = out[0, len(prompt):].tolist()
  stops = set(eos_id) if isinstance(eos_id, list) else {eos_id}
  return next((ids[:i] for i, token in enumerate(ids) if token in stops), ids)


class QkvSlice(torch.nn.Module):
  """One of q, k, v: columns [start, stop) of the owner's fused `query_key_value` output."""

  def __init__(self, owner, start, stop):
    super().__init__()
    object.__setattr__(self, "owner", owner)  # looked up per call: peft replaces the fused Linear
    self.start, self.stop = start, stop

  def forward(self, x):
    return self.owner.query_key_value(x)[..., self.start:self.stop]


def fuse_glm_qkv(hf, config) -> None:
  """Rewires an HF Glm model as ChatGLM stores it: one `query_key_value` Linear per layer, q/k/v its slices."""
  n, k = config.num_heads * config.head_size, config.num_kv_heads * config.head_size
  for layer in hf.model.layers:
    attn = layer.self_attn
    fused = torch.nn.Linear(config.hidden_size, n + 2 * k, bias=True)
    with torch.no_grad():
      fused.weight.copy_(torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]))
      fused.bias.copy_(torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]))
    attn.query_key_value = fused
    attn.q_proj, attn.k_proj, attn.v_proj = (QkvSlice(attn, 0, n), QkvSlice(attn, n, n + k),
                                             QkvSlice(attn, n + k, n + 2 * k))


def assert_cached_decode_matches_forward(model, vocab: int, mode: str) -> None:
  """Prefill then decode one token at a time (generate's own steps) give the full forward's logits.

  The two rows' prompts have different lengths (4 and 6 of 6 positions). `mode` "exact": each row
  writes at its own position (as the server's slots do) and the step reads just the live slots;
  "whole": the same, reading the whole cache; "shared": every row writes its i-th token at slot
  6 + i, after the padded prompts (as `generate` does). A prefill into rows 1-2 of a 3-row cache
  writes what a prefill into rows 0-1 writes and leaves row 0 alone.
  """
  from vtimellm_jax.inference import generate  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.models.kv_cache import CacheStep  # pylint: disable=g-import-not-at-top

  ids, mask = random_batch(vocab, 2, 10, [10, 10])
  full = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  prompt = jnp.asarray(ids[:, :6])
  lengths = np.array([4, 6], np.int32)  # row 0's prompt is padded
  cache, logits = generate.prefill(model, model.model.embed(prompt), jnp.asarray(lengths), model.init_cache(2, 16))
  np.testing.assert_allclose(np.asarray(logits), full[[0, 1], [3, 5]], atol=1e-4)
  shifted, _ = generate.prefill(model, model.model.embed(prompt), jnp.asarray(lengths), model.init_cache(3, 16), row0=1)
  for ours, theirs in zip([*shifted.k, *shifted.v], [*cache.k, *cache.v]):  # one [B, K, S, H] per layer, either layout
    np.testing.assert_array_equal(np.asarray(ours[1:]), np.asarray(theirs))
    assert not np.asarray(ours[0]).any()
  for i in range(1, 5):
    positions = lengths + i - 1
    rope = jnp.asarray(positions)[:, None]
    if mode == "shared":
      step = CacheStep(positions_bt=rope, window=6 + i, slot=jnp.int32(6 + i - 1),
                       prompt_lengths_b=jnp.asarray(lengths), prompt_len=6)
    else:
      step = CacheStep(positions_bt=rope, window=int(positions.max()) + 1 if mode == "exact" else 16)
    cache, logits = generate.decode_step(model, cache, jnp.asarray(ids[[0, 1], positions]), step)
    np.testing.assert_allclose(np.asarray(logits), full[[0, 1], positions], atol=1e-4)
  assert cache.length == 16
