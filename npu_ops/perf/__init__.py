"""Performance of the kernels on TPUs, modeled; chip constants.

* `predict(fn, *args, chip=)`: a model of how Pallas' TPU pipeline runs the kernels of
  `fn` (`model`), validated against latencies measured on real chips (`validate`).
* `chips`: public peak rates, HBM bandwidth and cores of TPUs and GPUs.
* `cases`: the decode and prefill shapes the kernels are judged at.

`python -m npu_ops.perf validate | predict` prints the tables (docs/performance.md).
"""

from npu_ops.perf.model import KernelCost as KernelCost
from npu_ops.perf.model import Prediction as Prediction
from npu_ops.perf.model import predict as predict
