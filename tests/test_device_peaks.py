"""The one table of device limits: matched by device kind, summed for the MFU, and rates as fractions."""

from types import SimpleNamespace

from vtimellm_jax import device_peaks

H100 = SimpleNamespace(device_kind="NVIDIA H100 80GB HBM3")
H200 = SimpleNamespace(device_kind="NVIDIA H200")
CPU = SimpleNamespace(device_kind="cpu")


def test_peak_tflops_by_device_kind():
  assert device_peaks.peak_tflops([H100, H100]) == 2 * 989.4
  assert device_peaks.peak_tflops([SimpleNamespace(device_kind="TPU v5 lite")]) == 197.0
  assert device_peaks.peak_tflops([H100, CPU]) == 0.0  # unknown: no MFU rather than a wrong one


def test_the_longest_matching_kind_wins():
  assert device_peaks.peaks(SimpleNamespace(device_kind="NVIDIA H100 PCIe")).hbm_tb_per_s == 2.0
  assert device_peaks.peaks(H100).hbm_tb_per_s == 3.35 and device_peaks.peaks(H200).hbm_tb_per_s == 4.8
  assert device_peaks.peaks(SimpleNamespace(device_kind="TPU v5")).bf16_tflops == 459.0
  assert device_peaks.peaks(SimpleNamespace(device_kind="NVIDIA L40S")).bf16_tflops == 362.0
  assert device_peaks.peaks(CPU) is None and device_peaks.peaks(object()) is None


def test_fractions_only_where_known():
  assert device_peaks.fractions(H200, flops_per_s=494.7e12, bytes_per_s=2.4e12) == {
      "peak_fraction": 0.5, "hbm_fraction": 0.5}
  assert device_peaks.fractions(H100, bytes_per_s=3.35e12) == {"hbm_fraction": 1.0}
  assert device_peaks.fractions(CPU, flops_per_s=1e12, bytes_per_s=1e9) == {}
