"""The answering layout: a decoder's layers held one module per layer, with fused projections.

Training keeps the layers stacked (`[L, ...]` arrays that one `lax.scan` runs). Answering reads
every weight once per generated token, and there the stacking costs bandwidth: XLA's GPU matmuls
cannot read one layer's slice of a stacked array where it lies, so they copy the slice first (a
dynamic-slice inside the scan, a slice when unrolled) and a decode step moves several times the
model's bytes. Held as one array per layer, every matmul reads its kernel in place, and the layers
run one after another with no loop on the device (no per-layer loop overhead).

The layout also fuses each layer's q/k/v into one `qkv_proj` (columns [q | k | v]) and gate/up into
one `gate_up_proj` ([gate | up]), as ChatGLM's checkpoints hold them: two matmuls where there were
five, one launch and one pass over the activations each.

`answering_layout` converts a loaded model in place, one stacked parameter (or one group of fused
ones) at a time, deleting each stacked array once its per-layer pieces exist: the peak is the
model plus one group. LoRA must be merged first (answering never trains).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from vtimellm_jax.models import lora
from vtimellm_jax.models.llama import LlamaDecoderLayer, LlamaForCausalLM

# Fused parameter path (inside one layer) -> the stacked paths whose columns it joins, in order.
_FUSED = {
    ("self_attn", "qkv_proj", "kernel"): (("self_attn", "q_proj", "kernel"), ("self_attn", "k_proj", "kernel"),
                                          ("self_attn", "v_proj", "kernel")),
    ("self_attn", "qkv_proj", "bias"): (("self_attn", "q_proj", "bias"), ("self_attn", "k_proj", "bias"),
                                        ("self_attn", "v_proj", "bias")),
    ("mlp", "gate_up_proj", "kernel"): (("mlp", "gate_proj", "kernel"), ("mlp", "up_proj", "kernel")),
}


def is_answering_layout(model: LlamaForCausalLM) -> bool:
  """Returns whether the model's layers are held one module per layer."""
  return isinstance(model.model.layers, nnx.List)


@functools.partial(jax.jit, static_argnums=0)
def _per_layer(num_layers: int, *stacked: jax.Array) -> list[jax.Array]:
  """Returns layer i's slice of each stacked array, joined along the last axis, for every i."""
  return [jnp.concatenate([a[i] for a in stacked], axis=-1) if len(stacked) > 1 else stacked[0][i]
          for i in range(num_layers)]


def answering_layout(model: LlamaForCausalLM) -> LlamaForCausalLM:
  """Converts `model` (a LlamaForCausalLM or VTimeLLM) to the answering layout in place; returns it.

  A model already in the layout is returned as it is. Raises ValueError if a layer holds LoRA
  factors (merge them first: `lora.merge_lora`).
  """
  if is_answering_layout(model):
    return model
  stacked = model.model.layers
  if any(True for _ in lora.lora_layers(stacked)):
    raise ValueError("the answering layout needs merged LoRA: merge the factors into the kernels first")
  config = model.model.config
  layer_config = config.replace(fused_projections=True)
  graphdef, template = nnx.split(nnx.eval_shape(lambda: LlamaDecoderLayer(layer_config, nnx.Rngs(0))))
  arrays = {path: var.get_value() for path, var in nnx.to_flat_state(nnx.state(stacked))}
  pieces: dict[tuple, list[jax.Array]] = {}
  for path, _ in nnx.to_flat_state(template):
    sources = _FUSED.get(path, (path,)) if not config.fused_projections else (path,)
    pieces[path] = _per_layer(config.num_layers, *(arrays[s] for s in sources))
    for source in sources:  # the stacked array is no longer needed: free it before the next group
      stacked_array = arrays.pop(source)
      if not isinstance(stacked_array, jax.core.Tracer):  # (under nnx.eval_shape there is nothing to free)
        stacked_array.delete()
  if arrays:
    raise ValueError(f"the answering layout left stacked variables unconverted: {sorted(arrays)}")
  layers = []
  for i in range(config.num_layers):
    flat = [(path, var.replace(pieces[path][i])) for path, var in nnx.to_flat_state(template)]
    layers.append(nnx.merge(graphdef, nnx.from_flat_state(flat)))
  model.model.layers = nnx.List(layers)
  return model
