"""Every implementation of the grouped ops, for the core tests (tokamax test_base style).

`impls(case)` lists, as pytest params, the implementations that have `case`; a core test
takes `impl` and calls the op with `**IMPLEMENTATIONS[impl]`. A new implementation is
added here once and every core test runs on it.
"""

import os

import pytest

import npu_ops

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
# Which implementations have which case (the kernels: float gmm/tgmm, fused A8W8/A8W4).
CASES = {
    "gmm_float": tuple(IMPLEMENTATIONS),
    "gmm_int": ("xla", "reference"),
    "fused_A8W8": tuple(IMPLEMENTATIONS),
    "fused_A8W4": tuple(IMPLEMENTATIONS),
    "fused_A4W4": ("xla", "reference"),
}


def impls(case: str) -> list[str]:
  return list(CASES[case])
