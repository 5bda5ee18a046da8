"""Hardware peaks and the arithmetic of model FLOP utilisation (MFU).

MFU = achieved model FLOP/s per device / the device's peak. Model FLOPs are counted
analytically (`imagen_jax.summarize.train_flops_per_image`: forward + backward of the
U-Net, no rematerialisation, text encoder excluded), so a run that recomputes
activations or spends time outside the U-Net scores lower, as it should.

Peaks are the vendors' dense (no structured sparsity) matrix-unit figures. On NVIDIA
GPUs, float32 matmuls in JAX default to TF32 tensor cores, so "float32" there is the TF32
peak; TPUs run float32 matmuls as bf16 passes at the default precision, so both dtypes
use the bf16 peak. CPUs have no entry: pass a peak (`--peak_tflops`) or use the
measured matmul rate (`measured_matmul_tflops`), which benchmarks label as such.
"""
from __future__ import annotations

import dataclasses
import resource
import time
from typing import Optional

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Peak:
  name: str
  bfloat16_tflops: float
  float32_tflops: float
  source: str


# Matched against `device.device_kind` (lower case, first match wins: more specific first).
PEAKS = (
    Peak("TPU v4", 275, 275, "cloud.google.com/tpu/docs/v4 (275 TFLOP/s bf16 per chip)"),
    Peak("TPU v5 lite", 197, 197, "cloud.google.com/tpu/docs/v5e (197 TFLOP/s bf16 per chip)"),
    Peak("TPU v5p", 459, 459, "cloud.google.com/tpu/docs/v5p (459 TFLOP/s bf16 per chip)"),
    Peak("TPU v6 lite", 918, 918, "cloud.google.com/tpu/docs/v6e (918 TFLOP/s bf16 per chip)"),
    Peak("A100", 312, 156, "NVIDIA A100 datasheet (bf16 312, TF32 156 TFLOP/s dense)"),
    Peak("H100 PCIe", 756, 378, "NVIDIA H100 datasheet, PCIe (bf16 756, TF32 378 dense)"),
    Peak("H100", 989, 495, "NVIDIA H100 datasheet, SXM (bf16 989, TF32 495 TFLOP/s dense)"),
    Peak("H200", 989, 495, "NVIDIA H200 datasheet, SXM (bf16 989, TF32 495 TFLOP/s dense)"),
)

_KIND_ALIASES = {"tpu v5e": "tpu v5 lite", "tpu v6e": "tpu v6 lite"}


def find_peak(device_kind: str) -> Optional[Peak]:
  """The table's entry for a `device.device_kind` string, or None (e.g. CPUs)."""
  kind = device_kind.lower()
  for alias, name in _KIND_ALIASES.items():
    kind = kind.replace(alias, name)
  for peak in PEAKS:
    if peak.name.lower() in kind:
      return peak
  return None


def peak_tflops(device_kind: str, dtype: str) -> Optional[float]:
  peak = find_peak(device_kind)
  if peak is None:
    return None
  return peak.bfloat16_tflops if dtype in ("bfloat16", "bf16") else peak.float32_tflops


def mfu(flops_per_item: float, items_per_s_per_device: float, peak_tflops_per_device: float):
  """Model FLOP utilisation in [0, 1]."""
  return flops_per_item * items_per_s_per_device / (peak_tflops_per_device * 1e12)


def measured_matmul_tflops(dtype: str = "float32", n: int = 1024, repeats: int = 5) -> float:
  """Rate of one n x n x n matmul on the default device (median of `repeats`): the
  achievable peak on a machine the table doesn't know (a CPU)."""
  x = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  f = jax.jit(lambda a: a @ a)
  f(x).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(x).block_until_ready()
    times.append(time.perf_counter() - t0)
  times.sort()
  return 2 * n ** 3 / times[len(times) // 2] / 1e12


def peak_for(device: jax.Device, dtype: str, override: float = 0.0,
             log=None) -> tuple[float, str]:
  """(peak TFLOP/s per device, where the figure comes from) for MFU: `override` if
  non-zero (a --peak_tflops flag), else the table's entry for the device, else (a CPU)
  the measured 1024^3 matmul rate of this machine, labelled as such."""
  if override:
    return float(override), "--peak_tflops"
  peak = find_peak(device.device_kind)
  if peak is not None:
    return peak_tflops(device.device_kind, dtype), peak.source
  rate = measured_matmul_tflops("float32" if dtype == "float32" else "bfloat16")
  if log is not None:
    log(f"no peak for {device.device_kind!r}: using the measured 1024^3 matmul rate")
  source = f"measured {dtype} 1024^3 matmul on this {device.platform} (not a datasheet peak)"
  shared = len(jax.local_devices(backend=device.platform))
  if device.platform == "cpu" and shared > 1:
    # Simulated CPU devices share the host's cores (and the matmul used all of them).
    rate /= shared
    source += f", divided among its {shared} CPU devices"
  return rate, source


def peak_memory(device: Optional[jax.Device] = None) -> tuple[Optional[int], str]:
  """(bytes, what): the device allocator's peak where it reports one (GPU, TPU), else
  the process's peak resident set (CPU: parameters, activations and Python alike)."""
  device = device or jax.local_devices()[0]
  stats = None
  try:
    stats = device.memory_stats()
  except Exception:  # noqa: BLE001  backends without allocator stats raise or return None
    stats = None
  if stats and "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host peak RSS (process)"
