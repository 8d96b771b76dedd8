"""Every implementation of the grouped ops, for the core tests (tokamax test_base style).

`impls(case)` lists the implementations that have `case` (from what each kernel backend
declares it supports); a core test
takes `impl` and calls the op with `**IMPLEMENTATIONS[impl]`. A new implementation is
added here once and every core test runs on it.
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
    **{k: dict(implementation=k, interpret=k != NATIVE, tiles=TILES)
       for k in ("pallas_tpu", "pallas_gpu")},
}

KERNELS = ("pallas_tpu", "pallas_gpu")
# Each case as the kernel backends judge it: a kernel runs the case when its module's
# `supports` says so (XLA and the reference run every case), so a kernel that gains
# or loses a case gains or loses its tests here, and a new backend inherits them all.
PROBLEMS = {
    "gmm_float": Problem("gmm", 64, 128, 128, 4, "float32"),
    "gmm_int": Problem("gmm", 64, 128, 128, 4, "int8"),
    "fused_A8W8": Problem("fused", 64, 128, 128, 4, "int8"),
    "fused_A8W4": Problem("fused", 64, 256, 128, 4, "int8", scale_groups=2),
    "fused_A4W4": Problem("fused", 64, 128, 128, 4, "int4", a4w4=True),
}


def impls(case: str) -> list[str]:
  return ["xla", "reference"] + [k for k in KERNELS
                                 if backend.kernels(k).supports(PROBLEMS[case]) is None]
