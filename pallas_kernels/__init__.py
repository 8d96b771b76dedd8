"""Pallas kernels for npu_ops' hot path: internal API, no AD (npu_ops wires it).

* `epilogue`: the dequant / SwiGLU / quantization math of every grouped op, which the
  kernels and npu_ops' XLA path share (pure jnp; this package imports nothing of npu_ops).
* `common`: tile sizes (`TileSizes`) and group metadata.
* `tpu`: Mosaic kernels (scalar-prefetch group metadata): the fused
  grouped matmul + dequant + SwiGLU + per-token quant (A8W8, A8W4), `gmm`, `tgmm`;
  `tpu_visits` computes their metadata on the scalar unit, `tpu_tiles` their tiles.
* `gpu`: the same three on Pallas' Triton backend.

Select them through an op's `implementation="pallas_tpu" | "pallas_gpu"`
(`interpret=True` runs them anywhere, e.g. on CPU for tests); `None` picks them
on TPU / GPU. See `npu_ops._src.backend`.
"""
