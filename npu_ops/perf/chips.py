"""Accelerator constants from the vendors' public specifications (per JAX device).

Peaks are dense (no sparsity), per JAX device: a TPU7x chip is two devices (one per
TensorCore), so its figures here are half the chip's; a v5p device drives both of its
TensorCores (megacore), which a Pallas kernel uses only along grid axes marked "parallel".
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator as a JAX device sees it.

  Attributes:
    name: our short name ("v5e", "h200", ...).
    peak_flops: dense multiply-add rates, FLOP/s (2 per MAC), by operand dtype name.
    hbm_bandwidth: bytes/s of device memory.
    cores: TensorCores one device drives (TPU; 1 on GPUs).
    vmem_bytes: a TensorCore's VMEM (TPU) or an SM's shared memory (GPU).
    device_kinds: `jax.Device.device_kind` strings that name this chip.
    vpu_rate: vector element operations per second of one TensorCore (8 x 128 lanes, four vector ALU
      slots a cycle, at the chip's clock; an estimate: no vendor publishes it).
    mxu_rows: the fewest left-operand rows a TPU product streams at full rate: fewer take
      as long as this many (the MXU holds a tile of the right operand and streams the
      left's rows through it). 128 on every TPU: TPU7x's measured 128-row tiles
      (tokamax's data) run at its 256-wide MXU's full rate per FLOP; no measured entry
      has fewer rows.
    mxu_width: the side of a TPU MXU's systolic array: a product's contraction and column
      counts are padded up to multiples of it (128 on v5e and v5p; 256 on v6e, per its
      architecture page, and on TPU7x, taken as v6e's: its page does not say).
  """
  name: str
  peak_flops: dict[str, float]
  hbm_bandwidth: float
  cores: int = 1
  vmem_bytes: int = 0
  device_kinds: tuple[str, ...] = ()
  vpu_rate: float = 0.0
  mxu_rows: int = 1
  mxu_width: int = 1

  def peak(self, dtype) -> float:
    """The dense rate for operands of `dtype` (float32 counts as bfloat16 passes on TPU)."""
    import numpy as np  # noqa: PLC0415
    name = np.dtype(dtype).name
    if name in self.peak_flops:
      return self.peak_flops[name]
    if name in ("int4", "float8_e4m3fn", "float8_e5m2") and "int8" in self.peak_flops:
      return self.peak_flops["int8"]
    return self.peak_flops["bfloat16"]


T = 1e12
_VPU = 8 * 128 * 4  # vector elements a cycle: 8 sublanes x 128 lanes x 4 ALU slots (estimate)
CHIPS: dict[str, Chip] = {c.name: c for c in (
    # Cloud TPU system architecture pages (per chip; v5e, v6e: one TensorCore a chip).
    Chip("v5e", {"bfloat16": 197 * T, "int8": 394 * T}, 819e9, 1, 128 * 2**20,
         ("TPU v5 lite", "TPU v5e"), _VPU * 1.5e9, 128, 128),
    Chip("v6e", {"bfloat16": 918 * T, "int8": 1836 * T}, 1640e9, 1, 128 * 2**20,
         ("TPU v6 lite", "TPU v6e"), _VPU * 1.75e9, 128, 256),
    Chip("v5p", {"bfloat16": 459 * T, "int8": 918 * T}, 2765e9, 2, 95 * 2**20, ("TPU v5",), _VPU * 1.75e9,
         128, 128),
    # Ironwood: 4614 fp8 TFLOP/s, 7.37 TB/s per chip of two TensorCores (two JAX devices).
    Chip("tpu7x", {"bfloat16": 2307 / 2 * T, "float8_e4m3fn": 4614 / 2 * T,
                   "int8": 4614 / 2 * T}, 7.37e12 / 2, 1, 64 * 2**20, ("TPU7x",), _VPU * 1.9e9,
         128, 256),
    # NVIDIA datasheets (SXM, dense).
    Chip("a100", {"bfloat16": 312 * T, "float32": 19.5 * T, "int8": 624 * T}, 2.039e12, 1,
         164 * 2**10, ("NVIDIA A100-SXM4-80GB", "NVIDIA A100-SXM4-40GB", "NVIDIA A100 80GB PCIe")),
    Chip("h100", {"bfloat16": 989 * T, "float32": 67 * T, "int8": 1979 * T,
                  "float8_e4m3fn": 1979 * T}, 3.35e12, 1, 228 * 2**10,
         ("NVIDIA H100 80GB HBM3", "NVIDIA H100")),
    Chip("h200", {"bfloat16": 989 * T, "float32": 67 * T, "int8": 1979 * T,
                  "float8_e4m3fn": 1979 * T}, 4.8e12, 1, 228 * 2**10,
         ("NVIDIA H200", "NVIDIA H200 NVL")),
    Chip("b200", {"bfloat16": 2250 * T, "float32": 75 * T, "int8": 4500 * T,
                  "float8_e4m3fn": 4500 * T}, 8e12, 1, 228 * 2**10, ("NVIDIA B200",)),
)}


TPUS: tuple[str, ...] = tuple(name for name, c in CHIPS.items() if c.vpu_rate)


def chip_of_device(device) -> Chip | None:
  """The `Chip` a JAX device is, from its `device_kind` (None when unknown)."""
  kind = getattr(device, "device_kind", "")
  for chip in CHIPS.values():
    if kind in chip.device_kinds:
      return chip
  return None


def get(chip: str | Chip) -> Chip:
  """A chip by name (`CHIPS`), or the Chip itself."""
  if isinstance(chip, Chip):
    return chip
  if chip not in CHIPS:
    raise ValueError(f"chip: expected one of {sorted(CHIPS)}, got {chip!r}")
  return CHIPS[chip]
