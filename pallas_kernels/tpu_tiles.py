"""Default tiles of the TPU kernels per chip generation, chosen by the `npu_ops.perf` model.

`TABLE` is generated, not written: `python -m npu_ops.perf tune --write` runs the model
over a candidate set of tiles at each shape of `npu_ops.perf.tune.POINTS`, on each chip,
and writes the best here (a test regenerates some entries and compares). A problem takes
the entry nearest to it in (log k, log n, log rows per group); the kernel then fits the
tiles to its own dimensions and VMEM (`tpu.default_tiles`).

The chip is the one the program is lowered for: `npu_ops._src.backend` sets `CHIP` from the
lowering's devices (a TPU, or the compile-only devices of an AOT compile), and the model
sets it to the chip it predicts; run eagerly on a TPU, its devices say; elsewhere
(`jax.export`, interpret mode) `DEFAULT_CHIP`.
"""

from __future__ import annotations

import contextvars
import math

import jax

CHIP: contextvars.ContextVar[str | None] = contextvars.ContextVar("npu_ops_tpu_chip", default=None)
DEFAULT_CHIP = "v5e"
# `jax.Device.device_kind` -> our chip names (`npu_ops.perf.chips` has their constants)
DEVICE_KINDS = {"TPU v5 lite": "v5e", "TPU v5e": "v5e", "TPU v6 lite": "v6e", "TPU v6e": "v6e",
                "TPU v5": "v5p", "TPU v5p": "v5p", "TPU7x": "tpu7x"}


# TensorCores one JAX device drives (megacore): a kernel's "parallel" grid axis is split
# between them
CORES = {"v5p": 2}


def cores(chip: str) -> int:
  return CORES.get(chip, 1)


# The side of the chip's MXU systolic arrays: a product whose contraction is narrower takes
# it as long as one this wide (`npu_ops.perf.chips.Chip.mxu_width`)
MXU_WIDTH = {"v6e": 256, "tpu7x": 256}


def mxu_width(chip: str) -> int:
  return MXU_WIDTH.get(chip, 128)


def chip_of_kind(device_kind: str) -> str | None:
  return DEVICE_KINDS.get(device_kind)


def current_chip() -> str:
  """The chip being lowered for, else a TPU's own devices when run eagerly on one, else
  `DEFAULT_CHIP`."""
  chip = CHIP.get()
  if chip is None and jax.default_backend() == "tpu":
    chip = chip_of_kind(jax.devices()[0].device_kind)
  return chip or DEFAULT_CHIP


def lookup(chip: str, op: str, itemsize: int, k: int, n: int, tokens: int
           ) -> tuple[int, int, int] | None:
  """(block_m, block_k, block_n) from the entry nearest to (k, n, tokens per group), or
  None. The entry's k and column tiles carry over as counts: an entry that splits its k
  into c tiles splits this k into c too (whole k stays whole), likewise n."""
  rows = TABLE.get((chip, op, itemsize))
  if not rows:
    return None
  dist = lambda r: (abs(math.log2(r[0] / k)) + abs(math.log2(r[1] / n))
                    + abs(math.log2(r[2] / max(tokens, 1))))
  ek, en, _, bm, bk, bn = min(rows, key=dist)
  split = lambda size, entry_size, entry_tile: 128 * -(-size // (128 * -(-entry_size // entry_tile)))
  return bm, split(k, ek, bk), split(n, en, bn)


# (chip, op, operand itemsize) -> ((k, n, rows per group, block_m, block_k, block_n), ...)
TABLE: dict[tuple[str, str, int], tuple[tuple[int, int, int, int, int, int], ...]] = {('tpu7x', 'fused', 1): ((2048, 2816, 1, 64, 512, 256), (2048, 2816, 2, 64, 512, 256),
                         (2048, 2816, 512, 512, 512, 256), (2048, 2816, 256, 512, 512, 256)),
 ('tpu7x', 'gmm', 1): ((2048, 2816, 1, 64, 2048, 1408), (2048, 2816, 2, 32, 2048, 2816),
                       (2048, 2816, 512, 512, 2048, 2816), (2048, 2816, 256, 512, 2048, 2816)),
 ('tpu7x', 'gmm', 2): ((2048, 2816, 1, 64, 2048, 1408), (2048, 2816, 2, 32, 2048, 2816),
                       (2048, 2816, 512, 512, 2048, 2816), (2048, 2816, 256, 512, 2048, 2816),
                       (4096, 4096, 512, 512, 4096, 1024), (4096, 14336, 1024, 256, 4096, 2048),
                       (768, 2048, 1024, 512, 768, 2048), (1536, 4096, 1024, 512, 1536, 2048),
                       (2048, 768, 3072, 512, 2048, 768), (2048, 768, 1024, 512, 2048, 768),
                       (4096, 1536, 1024, 512, 4096, 1536), (256, 7168, 1024, 512, 256, 7168)),
 ('tpu7x', 'tgmm', 2): ((2048, 2816, 512, 512, 2048, 1408), (2048, 2816, 256, 512, 2048, 1408),
                        (2048, 768, 1024, 512, 2048, 768), (4096, 1536, 1024, 512, 4096, 768)),
 ('v5e', 'fused', 1): ((2048, 2816, 1, 64, 512, 256), (2048, 2816, 2, 64, 512, 256),
                       (2048, 2816, 512, 512, 512, 256), (2048, 2816, 256, 512, 512, 256)),
 ('v5e', 'gmm', 1): ((2048, 2816, 1, 64, 2048, 1408), (2048, 2816, 2, 32, 2048, 2816),
                     (2048, 2816, 512, 512, 2048, 2816), (2048, 2816, 256, 512, 2048, 2816)),
 ('v5e', 'gmm', 2): ((2048, 2816, 1, 64, 2048, 1408), (2048, 2816, 2, 32, 2048, 2816),
                     (2048, 2816, 512, 512, 2048, 2816), (2048, 2816, 256, 256, 2048, 2816),
                     (4096, 4096, 512, 256, 4096, 2048), (4096, 14336, 1024, 256, 4096, 2048),
                     (768, 2048, 1024, 512, 768, 2048), (1536, 4096, 1024, 512, 1536, 2048),
                     (2048, 768, 3072, 512, 2048, 768), (2048, 768, 1024, 512, 2048, 768),
                     (4096, 1536, 1024, 512, 4096, 1536), (256, 7168, 1024, 512, 256, 7168)),
 ('v5e', 'tgmm', 2): ((2048, 2816, 512, 512, 2048, 1408), (2048, 2816, 256, 512, 2048, 1408),
                      (2048, 768, 1024, 512, 2048, 768), (4096, 1536, 1024, 512, 4096, 768)),
 ('v5p', 'fused', 1): ((2048, 2816, 1, 64, 512, 256), (2048, 2816, 2, 32, 512, 256),
                       (2048, 2816, 512, 512, 512, 256), (2048, 2816, 256, 256, 512, 256)),
 ('v5p', 'gmm', 1): ((2048, 2816, 1, 32, 2048, 1408), (2048, 2816, 2, 64, 2048, 1408),
                     (2048, 2816, 512, 512, 2048, 1408), (2048, 2816, 256, 512, 2048, 1408)),
 ('v5p', 'gmm', 2): ((2048, 2816, 1, 32, 2048, 1408), (2048, 2816, 2, 32, 2048, 1408),
                     (2048, 2816, 512, 512, 2048, 1408), (2048, 2816, 256, 512, 2048, 1408),
                     (4096, 4096, 512, 256, 4096, 2048), (4096, 14336, 1024, 256, 4096, 1792),
                     (768, 2048, 1024, 512, 768, 1024), (1536, 4096, 1024, 512, 1536, 2048),
                     (2048, 768, 3072, 512, 2048, 384), (2048, 768, 1024, 512, 2048, 384),
                     (4096, 1536, 1024, 512, 4096, 768), (256, 7168, 1024, 512, 256, 3584)),
 ('v5p', 'tgmm', 2): ((2048, 2816, 512, 512, 2048, 1408), (2048, 2816, 256, 512, 2048, 1408),
                      (2048, 768, 1024, 512, 2048, 384), (4096, 1536, 1024, 512, 4096, 768)),
 ('v6e', 'fused', 1): ((2048, 2816, 1, 64, 512, 256), (2048, 2816, 2, 64, 512, 256),
                       (2048, 2816, 512, 512, 512, 256), (2048, 2816, 256, 512, 512, 256)),
 ('v6e', 'gmm', 1): ((2048, 2816, 1, 64, 2048, 1408), (2048, 2816, 2, 32, 2048, 2816),
                     (2048, 2816, 512, 512, 2048, 2816), (2048, 2816, 256, 256, 2048, 2816)),
 ('v6e', 'gmm', 2): ((2048, 2816, 1, 64, 2048, 1408), (2048, 2816, 2, 32, 2048, 2816),
                     (2048, 2816, 512, 512, 2048, 2816), (2048, 2816, 256, 512, 2048, 2816),
                     (4096, 4096, 512, 512, 4096, 1024), (4096, 14336, 1024, 256, 4096, 2048),
                     (768, 2048, 1024, 512, 768, 2048), (1536, 4096, 1024, 512, 1536, 2048),
                     (2048, 768, 3072, 512, 2048, 768), (2048, 768, 1024, 512, 2048, 768),
                     (4096, 1536, 1024, 512, 4096, 1536), (256, 7168, 1024, 256, 256, 7168)),
 ('v6e', 'tgmm', 2): ((2048, 2816, 512, 512, 2048, 1408), (2048, 2816, 256, 512, 2048, 1408),
                      (2048, 768, 1024, 512, 2048, 768), (4096, 1536, 1024, 512, 4096, 768))}
