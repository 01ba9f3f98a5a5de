"""Mesh presets per target topology: device count, mesh layout, micro-batch, and how to get one.

`vtimellm-jax train --topology v5e-16 ...` applies a preset's mesh and micro-batch to the stage
config; with `--dry-run` it compiles the step for that topology without the hardware (see
vtimellm_jax/training/aot.py). The launch scripts read a preset's gcloud accelerator type and
runtime through this file's command line, so this file imports only the standard library:

  python3 configs/topologies.py list
  python3 configs/topologies.py gcloud v5e-16   # -> "v5litepod-16 v2-alpha-tpuv5-lite 4"

Every preset shards the frozen base over all devices of a slice or node (FSDP on "embed") and
replicates across nodes: the base of a 7B model does not fit a v5e chip whole, and LoRA's
trainable state is small enough that data parallelism costs nothing. The micro-batch keeps the
global batch of 128 an exact multiple of micro_batch x data-parallel devices.
"""

from __future__ import annotations

import dataclasses
import re
import sys


@dataclasses.dataclass(frozen=True)
class Topology:
  """A target machine: `devices` accelerators over `hosts` processes, and the mesh to use on it."""
  name: str
  platform: str  # tpu | gpu | cpu
  devices: int
  hosts: int
  hbm_gib: float  # memory of one device; 0 when not meaningful (cpu)
  data: int  # mesh axes; data * fsdp * tensor == devices
  fsdp: int
  tensor: int = 1
  micro_batch: int = 8
  # TPU only: what `jax.experimental.topologies.get_topology_desc` and `gcloud` need.
  tpu_topology: str = ""  # e.g. "v5e:4x4"
  chip_config: str = "default"  # "megacore" for v4 / v5p (two TensorCores act as one device)
  accelerator_type: str = ""  # gcloud --accelerator-type
  runtime_version: str = ""  # gcloud --version / --runtime-version
  gpu: str = ""  # GPU only: the model, a key of vtimellm_jax/training/gpu_targets.py (compiling without one)

  @property
  def mesh(self) -> dict[str, int]:
    return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}


def _tpu(name: str, topology: str, chips: int, hbm_gib: float, accelerator_type: str, runtime: str,
         micro_batch: int, chip_config: str = "default", chips_per_host: int = 4) -> Topology:
  return Topology(name, "tpu", chips, max(1, chips // chips_per_host), hbm_gib, data=1, fsdp=chips,
                  micro_batch=micro_batch, tpu_topology=topology, chip_config=chip_config,
                  accelerator_type=accelerator_type, runtime_version=runtime)


PRESETS: dict[str, Topology] = {t.name: t for t in (
    # v4 and v5p name slices by TensorCores; one device is a chip (megacore) of 32 / 95 GiB HBM.
    # Micro-batches from AOT compiles of the 7B stage-2 step at 2048 positions (splash attention,
    # chunked loss, scanned layers; docs/launch.md): v4-32 at 8 holds 16.56 GiB of 32.
    _tpu("v4-8", "v4:2x2x1", 4, 32, "v4-8", "tpu-ubuntu2204-base", 8, "megacore"),
    _tpu("v4-32", "v4:2x2x4", 16, 32, "v4-32", "tpu-ubuntu2204-base", 8, "megacore"),
    _tpu("v5p-8", "v5:2x2x1", 4, 95, "v5p-8", "v2-alpha-tpuv5", 8, "megacore"),
    _tpu("v5p-64", "v5:2x4x4", 32, 95, "v5p-64", "v2-alpha-tpuv5", 4, "megacore"),
    # v5e and v6e name slices by chips; one chip of 16 / 32 GiB is one device. A 16 GiB v5e holds
    # the step at micro-batch 4 (11.25 GiB); 8 compiles to 15.02 GiB, too close to the chip's 16 for
    # a default. v6e-8 at 8 holds 19.90 GiB of 32.
    _tpu("v5e-16", "v5e:4x4", 16, 16, "v5litepod-16", "v2-alpha-tpuv5-lite", 4),
    _tpu("v5e-32", "v5e:4x8", 32, 16, "v5litepod-32", "v2-alpha-tpuv5-lite", 4),
    _tpu("v6e-8", "v6e:2x4", 8, 32, "v6e-8", "v2-alpha-tpuv6e", 8, chips_per_host=8),
    _tpu("v6e-16", "v6e:4x4", 16, 32, "v6e-16", "v2-alpha-tpuv6e", 8),
    # GPU nodes: one process per node over its 8 GPUs; FSDP inside a node, data parallel across.
    Topology("1xH100", "gpu", 1, 1, 80, data=1, fsdp=1, gpu="h100"),
    Topology("8xH100", "gpu", 8, 1, 80, data=1, fsdp=8, gpu="h100"),
    Topology("16xH100", "gpu", 16, 2, 80, data=2, fsdp=8, gpu="h100"),
)}

_CPU = re.compile(r"cpu-(\d+)$")


def get(name: str) -> Topology:
  """Returns the preset called `name`, or a virtual `cpu-N` topology (N host-platform devices)."""
  if name in PRESETS:
    return PRESETS[name]
  match = _CPU.match(name)
  if match and int(match.group(1)) > 0:
    n = int(match.group(1))
    return Topology(name, "cpu", n, 1, 0, data=1, fsdp=n, micro_batch=max(1, 16 // n))
  raise ValueError(f"unknown topology {name!r}; choose one of {', '.join(PRESETS)} or cpu-N")


def apply(config, topology: Topology) -> None:
  """Sets `config.mesh` and `config.micro_batch` (an ml_collections ConfigDict) for `topology`."""
  config.mesh.data, config.mesh.fsdp, config.mesh.tensor = topology.data, topology.fsdp, topology.tensor
  config.mesh.devices = 0
  config.micro_batch = topology.micro_batch


def _main(argv: list[str]) -> int:
  if len(argv) == 1 and argv[0] == "list":
    for t in PRESETS.values():
      print(f"{t.name:8s} {t.platform}  {t.devices:3d} devices on {t.hosts} host(s), {t.hbm_gib:g} GiB each, "
            f"mesh {t.mesh}, micro_batch {t.micro_batch}")
    return 0
  if len(argv) == 2 and argv[0] == "gcloud":
    try:
      t = get(argv[1])
    except ValueError as e:
      print(e, file=sys.stderr)
      return 2
    if t.platform != "tpu":
      print(f"{t.name} is not a Cloud TPU topology", file=sys.stderr)
      return 2
    print(t.accelerator_type, t.runtime_version, t.hosts)
    return 0
  print("usage: topologies.py list | gcloud NAME", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1:]))
