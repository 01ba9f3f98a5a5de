"""Each accelerator's own limits (dense bf16 FLOP/s, memory bandwidth), and a rate as a fraction of them.

One table for every device figure: the trainer's MFU, and the `peak_fraction` / `hbm_fraction` beside the
raw rates of the benchmarks (`vtimellm_jax/bench/`). Figures are the vendors' data sheets, dense (no
sparsity). A device matches the longest key its `device_kind` contains, lower-cased ("NVIDIA H100 80GB
HBM3" is the SXM part, "NVIDIA H100 PCIe" the PCIe one); an unknown kind (a CPU) has no limits, so no
fraction is reported rather than a wrong one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable


@dataclasses.dataclass(frozen=True)
class DevicePeaks:
  """One device's limits: dense bf16 matmul TFLOP/s and HBM bandwidth in TB/s (1e12 bytes/s)."""

  bf16_tflops: float
  hbm_tb_per_s: float


_PEAKS = {
    "h100": DevicePeaks(989.4, 3.35),  # SXM
    "h100 pcie": DevicePeaks(756.0, 2.0),
    "h100 nvl": DevicePeaks(835.0, 3.9),
    "h200": DevicePeaks(989.4, 4.8),
    "a100": DevicePeaks(312.0, 1.555),  # 40 GB
    "a100-sxm4-80gb": DevicePeaks(312.0, 2.039),
    "a100 80gb pcie": DevicePeaks(312.0, 1.935),
    "l4": DevicePeaks(121.0, 0.3),
    "l40s": DevicePeaks(362.0, 0.864),
    "rtx 4090": DevicePeaks(165.0, 1.008),
    "tpu v4": DevicePeaks(275.0, 1.2),
    "tpu v5 lite": DevicePeaks(197.0, 0.819),  # v5e
    "tpu v5e": DevicePeaks(197.0, 0.819),
    "tpu v5": DevicePeaks(459.0, 2.765),  # v5p
    "tpu v5p": DevicePeaks(459.0, 2.765),
    "tpu v6 lite": DevicePeaks(918.0, 1.64),  # v6e
    "tpu v6e": DevicePeaks(918.0, 1.64),
}
_LONGEST_FIRST = sorted(_PEAKS, key=len, reverse=True)


def peaks(device) -> DevicePeaks | None:
  """Returns the limits of a device (anything with a `device_kind`), None for an unknown kind."""
  kind = str(getattr(device, "device_kind", "")).lower()
  return next((_PEAKS[key] for key in _LONGEST_FIRST if key in kind), None)


def peak_tflops(devices: Iterable) -> float:
  """Returns the summed dense bf16 TFLOP/s of `devices`; 0 when any kind is unknown (e.g. CPU)."""
  total = 0.0
  for device in devices:
    limits = peaks(device)
    if limits is None:
      return 0.0
    total += limits.bf16_tflops
  return total


def fractions(device, *, flops_per_s: float | None = None, bytes_per_s: float | None = None) -> dict:
  """Returns {"peak_fraction": FLOP/s over the bf16 peak, "hbm_fraction": bytes/s over HBM bandwidth}.

  Only the keys whose rate is given and whose device kind is known, each rounded to 3 places: the
  JSON lines of a benchmark carry them beside the raw rate.
  """
  limits = peaks(device)
  if limits is None:
    return {}
  out = {}
  if flops_per_s is not None:
    out["peak_fraction"] = round(flops_per_s / (limits.bf16_tflops * 1e12), 3)
  if bytes_per_s is not None:
    out["hbm_fraction"] = round(bytes_per_s / (limits.hbm_tb_per_s * 1e12), 3)
  return out
