"""Descriptions of the GPUs the presets name, so a host without them can compile for them.

`--dry-run --topology 8xH100` on a machine with no H100 compiles through the CUDA plugin's
compile-only client (installed by the `cuda` extra; JAX must not start a CUDA client, hence
JAX_PLATFORMS=cpu), which takes the target as an XLA `GpuTargetConfigProto` in text form. The
figures are the H100 SXM5's (132 SMs, 80 GB HBM3, 50 MB L2, 3.35 TB/s), as XLA's own GPU specs
record them, with the CUDA 12.8 / cuDNN 9.7 that the target is assumed to run.
"""

from __future__ import annotations

# GpuDeviceInfoProto fields, per GPU name used in configs/topologies.py.
DEVICES: dict[str, dict] = {
    "h100": {
        "description": "NVIDIA H100 80GB HBM3",
        "compute_capability": (9, 0),
        "info": {
            "threads_per_block_limit": 1024, "threads_per_warp": 32, "shared_memory_per_block": 49152,
            "shared_memory_per_core": 233472, "threads_per_core_limit": 2048, "core_count": 132,
            "fpus_per_core": 128, "block_dim_limit_x": 2147483647, "block_dim_limit_y": 65535,
            "block_dim_limit_z": 65535, "memory_bandwidth": 3352320000000, "l2_cache_size": 52428800,
            "clock_rate_ghz": 1.98, "device_memory_size": 84929347584, "shared_memory_per_block_optin": 232448,
            "registers_per_core_limit": 65536, "registers_per_block_limit": 65536,
        },
    },
}
CUDA_VERSION = (12, 8, 0)
CUDNN_VERSION = (9, 7)


def target_config(gpu: str) -> str:
  """Returns the `GpuTargetConfigProto` text of `gpu` (a key of DEVICES)."""
  if gpu not in DEVICES:
    raise ValueError(f"no target description for GPU {gpu!r}; known: {sorted(DEVICES)}")
  device = DEVICES[gpu]
  major, minor = device["compute_capability"]
  info = "\n".join(f"  {key}: {value}" for key, value in device["info"].items())
  return (f"gpu_device_info {{\n{info}\n  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
          f"platform_name: \"CUDA\"\n"
          f"runtime_version {{ major: {CUDA_VERSION[0]} minor: {CUDA_VERSION[1]} patch: {CUDA_VERSION[2]} }}\n"
          f"dnn_version_info {{ major: {CUDNN_VERSION[0]} minor: {CUDNN_VERSION[1]} }}\n"
          f"device_description_str: \"{device['description']}\"\n")
