"""Every implementation of the grouped ops, for the core tests (tokamax test_base style).

`impls(case)` lists the implementations whose backend declares `case` (`backend.BACKENDS`:
XLA and the reference take every case, a kernel what its module's `supports` says;
`kernels_for` the kernels among them, `kernels_without` those that must refuse it); a core test takes `impl` and calls the op with `**IMPLEMENTATIONS[impl]`.
The cases: float and integer gmm / tgmm, the fused op's A8W8 / A8W4 / A4W4, its fp8 (same
problems) and MX outputs, MX inputs (fp8, transposed, fp4); weight lists and group_offset
take the same cases (test_expert_lists, test_group_offset). A new implementation is added
here once and every core test runs on it.
"""

import os

import pytest

import npu_ops
from npu_ops._src import backend
from pallas_kernels.common import Problem

# Small kernel tiles: the test shapes then span several row tiles (tiles shared by two
# groups, revisited) and partial k / column tiles.
TILES = npu_ops.TileSizes(block_m=32, block_k=128, block_n=128)

# On an accelerator (conftest: NPU_OPS_TEST_DEVICE) its own kernel runs natively.
NATIVE = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(os.environ.get("NPU_OPS_TEST_DEVICE", ""))
IMPLEMENTATIONS = {
    "xla": dict(implementation="xla"),
    "reference": dict(implementation="reference"),
    **{k: dict(implementation=k, interpret=k != NATIVE, tiles=TILES) for k in backend.KERNELS},
}
assert set(IMPLEMENTATIONS) == set(backend.BACKENDS), "a new backend: add how to call it"

KERNELS = backend.KERNELS
# Each case as the backends judge it: an implementation runs the case when its backend's
# `supports` says so, so a backend that gains or loses a case gains or loses its tests
# here, and a new backend inherits them all.
PROBLEMS = {
    "gmm_float": Problem("gmm", 64, 128, 128, 4, "float32"),
    "gmm_int": Problem("gmm", 64, 128, 128, 4, "int8"),
    "fused_A8W8": Problem("fused", 64, 128, 128, 4, "int8"),
    "fused_A8W4": Problem("fused", 64, 256, 128, 4, "int8", scale_groups=2),
    "fused_A4W4": Problem("fused", 64, 128, 128, 4, "int4", a4w4=True),
    "fused_A8W8_mx_out": Problem("fused", 64, 128, 128, 4, "int8", mx_out=True),
    "fused_mx_fp8": Problem("fused_mx", 64, 128, 128, 4, "float8_e4m3fn"),
    "fused_mx_fp8_transposed": Problem("fused_mx", 64, 128, 128, 4, "float8_e4m3fn",
                                       transposed=True),
    "fused_mx_fp4": Problem("fused_mx", 64, 128, 128, 4, "float4_e2m1fn", fp4=True),
}


def impls(case: str) -> list[str]:
  """Every implementation whose backend declares `case` (`npu_ops._src.backend.BACKENDS`)."""
  return [name for name, b in backend.BACKENDS.items() if b.supports(PROBLEMS[case]) is None]


def kernels_for(case: str) -> list[str]:
  """The kernels that declare `case`."""
  return [k for k in impls(case) if k in KERNELS]


def kernels_without(case: str) -> list[str]:
  """The kernels that do not: asked for by name, they raise NotImplementedError."""
  return [k for k in KERNELS if k not in kernels_for(case)]
