"""Pallas kernels (TPU Mosaic, GPU) for npu_ops' fused hot path.

Internal API for npu_ops only: kernel bodies and pallas_call wrappers, no AD.
The kernels land with the Pallas issue; until then `implementation="pallas_tpu"`
or `"pallas_gpu"` raise NotImplementedError and the XLA path serves every backend.
"""
