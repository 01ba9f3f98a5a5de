"""Ahead-of-time compilation of the train step for a target topology, without its hardware or data.

`vtimellm-jax train --config configs/stage2.py:7b --workdir w --dry-run --topology v5e-16` compiles
the exact step `train` runs (same TrainState, shardings and jit) from abstract shapes
(ShapeDtypeStructs) for one sequence length, and prints what one device would hold. TPU targets come
from `jax.experimental.topologies.get_topology_desc` and need libtpu installed (it compiles on a
CPU-only host); GPU presets use the machine's own GPUs, or on a host without them the CUDA plugin's
compile-only devices (the `cuda` extra, JAX_PLATFORMS=cpu; see gpu_targets.py); `cpu-N` targets use
N host-platform devices. No weights or data files are read: the model's shapes come from its preset.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from vtimellm_jax import sharding
from vtimellm_jax.data import records, templates
from vtimellm_jax.errors import UserError
from vtimellm_jax.models import llama
from vtimellm_jax.training import config_files, gpu_targets, trainer

topologies = config_files.bundled("topologies")


@dataclasses.dataclass(frozen=True)
class MemoryReport:
  """What one device holds while running the compiled step (bytes)."""
  topology: str
  text_length: int
  micro_batch: int
  accumulation: int
  arguments: int
  outputs: int
  temporaries: int
  aliased: int  # donated arguments reused as outputs, counted once
  hbm_gib: float
  # Set when the compiler itself refused the step for lack of memory (TPU compilers do): its
  # message; `temporaries` is then what it said they need and `outputs` is unknown (0).
  compiler_refusal: str = ""

  @property
  def total(self) -> int:
    return self.arguments + self.outputs + self.temporaries - self.aliased

  @property
  def fits(self) -> bool | None:
    """Returns whether the step fits the device's memory (None when the target has no HBM size)."""
    if self.compiler_refusal:
      return False
    return None if not self.hbm_gib else self.total <= self.hbm_gib * 2**30

  def line(self) -> str:
    """Returns the one-line summary the dry run prints."""
    verdict = "" if self.fits is None else (f" of {self.hbm_gib:g} GiB HBM: " + ("fits" if self.fits else "DOES NOT FIT"))
    if self.compiler_refusal:
      return (f"{self.topology}: DOES NOT FIT {self.hbm_gib:g} GiB HBM: at least {_size(self.total)} per device "
              f"(arguments {_size(self.arguments)}, temporaries {_size(self.temporaries)}; the compiler: "
              f"{self.compiler_refusal}; micro-batch {self.micro_batch} x accumulation {self.accumulation}, "
              f"text length {self.text_length})")
    return (f"{self.topology}: per device {_size(self.total)}{verdict} (arguments {_size(self.arguments)}, "
            f"outputs {_size(self.outputs)}, temporaries {_size(self.temporaries)}, aliased {_size(self.aliased)}; "
            f"micro-batch {self.micro_batch} x accumulation {self.accumulation}, text length {self.text_length})")


def _size(num_bytes: int) -> str:
  return f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"


def _per_device_bytes(tree) -> int:
  """Returns the bytes one device holds of a tree of sharded ShapeDtypeStructs (its largest shard)."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    if not hasattr(leaf, "shape") or not hasattr(leaf, "dtype"):
      continue
    shape = leaf.sharding.shard_shape(leaf.shape) if getattr(leaf, "sharding", None) is not None else leaf.shape
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      continue  # the step's random key: a few bytes
    total += math.prod(shape) * jnp.dtype(leaf.dtype).itemsize
  return total


def _refusal_report(message: str, args, topology, text_length: int, micro_batch: int, accum: int) -> MemoryReport:
  """Returns the report of a step the compiler refused for memory; arguments counted from their shards."""
  needed = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", message)
  scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  temporaries = int(float(needed.group(1)) * scale[needed.group(2)]) if needed else 0
  first_line = message.strip().splitlines()[0]
  first_line = first_line.split("RESOURCE_EXHAUSTED:", 1)[-1].strip()
  return MemoryReport(topology.name, text_length, micro_batch, accum, _per_device_bytes(args), 0, temporaries, 0,
                      topology.hbm_gib, compiler_refusal=first_line)


def resolve(name: str) -> topologies.Topology:
  """Returns the preset `name` (see configs/topologies.py); UserError naming the known ones."""
  try:
    return topologies.get(name)
  except ValueError as e:
    raise UserError(str(e)) from None


def target_devices(topology: topologies.Topology) -> list:
  """Returns the (possibly compile-only) devices of `topology`; UserError if this host cannot target it."""
  if topology.platform == "tpu":
    from jax.experimental import topologies as jax_topologies  # pylint: disable=g-import-not-at-top
    # chips_per_host_bounds only decides how devices map to processes; memory per device is the same.
    host_bounds = (2, 4, 1) if topology.hosts == 1 and topology.devices == 8 else (2, 2, 1)
    try:
      description = jax_topologies.get_topology_desc(
          topology_name=topology.tpu_topology, platform="tpu", chip_config_name=topology.chip_config,
          chips_per_host_bounds=host_bounds, num_slices=1)
    except Exception as e:  # libtpu missing or unable to describe the slice: jax raises several types
      hint = ("another process on this host holds libtpu (one TPU compile at a time per host; wait for it)"
              if "lockfile" in str(e) else "compiling for a TPU without one needs libtpu: pip install -e '.[tpu]'")
      raise UserError(f"cannot describe TPU topology {topology.name} ({topology.tpu_topology}): {e}. {hint}") from e
    return list(description.devices)
  if topology.platform == "gpu":
    local = [d for d in jax.devices() if d.platform == "gpu"]
    return local[:topology.devices] if len(local) >= topology.devices else _compile_only_gpus(topology)
  if topology.platform == "cpu" and "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    try:  # a fresh process (the CLI) can still choose its CPU device count
      jax.config.update("jax_num_cpu_devices", topology.devices)
    except RuntimeError:
      pass  # backends already started: use what there is
  available = jax.devices(topology.platform) if topology.platform in {d.platform for d in jax.devices()} else []
  if len(available) < topology.devices:
    raise UserError(f"topology {topology.name} needs {topology.devices} {topology.platform} devices, this process "
                    f"has {len(available)}: set XLA_FLAGS=--xla_force_host_platform_device_count={topology.devices} "
                    "before starting")
  return available[:topology.devices]


def _compile_only_gpus(topology: topologies.Topology) -> list:
  """Returns compile-only devices of a GPU preset from the CUDA plugin, for a host without those GPUs."""
  from jax.experimental import topologies as jax_topologies  # pylint: disable=g-import-not-at-top
  try:
    # The plugin's layout string: slices x hosts per slice x GPUs per host.
    description = jax_topologies.get_topology_desc(
        platform="cuda", target_config=gpu_targets.target_config(topology.gpu),
        topology=f"1x{topology.hosts}x{topology.devices // topology.hosts}")
  except Exception as e:  # plugin missing, or a CUDA client already started: jax raises several types
    raise UserError(
        f"cannot compile for {topology.name} on this host: {e}. Without those GPUs the compile needs the CUDA "
        "plugin (pip install -e '.[cuda]') and JAX_PLATFORMS=cpu, so that JAX starts no CUDA client; or run the "
        "dry run on the GPU machine itself") from e
  return list(description.devices)


def abstract_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Returns a copy of `config` that builds the model from its preset's shapes and loads nothing."""
  c = ml_collections.ConfigDict(config.to_dict())
  # Loads do not change shapes (a merged LoRA folds into the base), so shapes need no files.
  c.model.base = ""
  c.load.adapter = ""
  c.load.merge_lora = ""
  return c


def compile_step(config: ml_collections.ConfigDict, topology_name: str = "", seq_len: int = 0,
                 num_features: int = records.NUM_FRAMES, log: Callable[[str], None] = print,
                 micro_batch: int = 0) -> MemoryReport:
  """Compiles the train step of `config` for `topology_name`; returns (and logs) its per-device memory.

  `topology_name` "" targets this process's devices with the config's own mesh.
  `seq_len` is the model's sequence length (0: config.data.max_length); a sample of `num_features`
  feature rows leaves `seq_len - num_features + 1` text tokens (the compiled bucket length).
  `micro_batch` > 0 replaces the topology preset's micro-batch.
  """
  if topology_name:
    topology = resolve(topology_name)
    topologies.apply(config, topology)
    config.micro_batch = micro_batch or config.micro_batch
    devices = target_devices(topology)
  else:  # this process's own devices, with the config's mesh
    devices = sharding.first_devices(config.mesh.devices)
    topology = topologies.Topology(f"{len(devices)}x{devices[0].device_kind}", devices[0].platform, len(devices), 1,
                                   0, config.mesh.data, config.mesh.fsdp, config.mesh.tensor, config.micro_batch)
  seq_len = seq_len or config.data.max_length
  text_length = templates.text_budget(seq_len, num_features)
  if text_length < 2:
    raise UserError(f"--seq-len {seq_len} leaves no text beside {num_features} feature rows")
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, devices)
  accum = trainer.accumulation_steps(config.global_batch, config.micro_batch, sharding.data_parallel_size(mesh))
  state = trainer.TrainState(abstract_config(config), mesh, config.model.vocab_size or None, total_steps=1, abstract=True)
  replicated = NamedSharding(mesh, P())
  step_index = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
  batch = trainer._abstract_batch(config.global_batch, text_length, num_features, accum, mesh)  # pylint: disable=protected-access
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    attention = llama.attention_impl(state.model_config)
  log(f"[{config.stage}] AOT for {topology.name}: mesh {dict(mesh.shape)} on {len(mesh.devices.flat)} "
      f"{mesh.devices.flat[0].device_kind} devices; {state.num_trainable:,} trainable / {state.num_frozen:,} frozen parameters; "
      f"attention {attention}, loss chunk {config.model.loss_chunk or 'off'}, "
      f"{state.model_config.num_layers} layers scanned, remat {state.model_config.remat}"
      f"{f', decoder projections {state.model_config.quant}' if state.model_config.quant else ''}")
  args = (state.trainable, state.opt_state, state.frozen, batch, step_index, key)
  try:
    compiled = state.jit_step().lower(*args).compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    report = _refusal_report(str(e), args, topology, text_length, config.micro_batch, accum)
    log(f"[{config.stage}] {report.line()}")
    return report
  analysis = compiled.memory_analysis()
  if analysis is None:
    raise UserError(f"the {topology.platform} compiler gives no memory analysis")
  report = MemoryReport(topology.name, text_length, config.micro_batch, accum, analysis.argument_size_in_bytes,
                        analysis.output_size_in_bytes, analysis.temp_size_in_bytes, analysis.alias_size_in_bytes,
                        topology.hbm_gib)
  log(f"[{config.stage}] {report.line()}")
  return report
