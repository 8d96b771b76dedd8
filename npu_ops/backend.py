"""Which implementation runs a grouped op: XLA, the dense reference, or a Pallas kernel.

`implementation`:
  * None: the Pallas kernel of the default backend (TPU: "pallas_tpu", GPU:
    "pallas_gpu") where it has one for the case, else "xla". On CPU: "xla".
  * "xla": the row-block XLA path (`npu_ops.row_blocks`), fast on CPU.
  * "reference": every group over all rows, masked (dense jnp; for checking).
  * "pallas_tpu" / "pallas_gpu": always the kernel (so `jax.export(...,
    platforms=["tpu"])` from a CPU host holds the Mosaic custom call); a case the
    kernel cannot do raises NotImplementedError.
`interpret=True` runs a kernel's body in Pallas interpret mode on any backend;
`tiles` overrides the kernel's `TileSizes` (default: from the shapes and
`tuning_config[0]`).
"""

from __future__ import annotations

import types

import jax
import numpy as np

from npu_ops._validation import fail
from pallas_kernels.common import TileSizes

IMPLEMENTATIONS: tuple[str, ...] = ("xla", "reference", "pallas_tpu", "pallas_gpu")
KERNELS: tuple[str, ...] = ("pallas_tpu", "pallas_gpu")
_DEFAULT_KERNEL = {"tpu": "pallas_tpu", "gpu": "pallas_gpu", "cuda": "pallas_gpu",
                   "rocm": "pallas_gpu"}


def check(implementation: str | None, interpret: bool = False,
          tiles: TileSizes | None = None) -> None:
  """Trace-time validation of the three dispatch arguments."""
  if implementation is not None and implementation not in IMPLEMENTATIONS:
    fail("implementation", f"None or one of {IMPLEMENTATIONS}", repr(implementation))
  if not isinstance(interpret, (bool, np.bool_)):
    fail("interpret", "a bool", repr(interpret), TypeError)
  if tiles is not None and not isinstance(tiles, TileSizes):
    fail("tiles", "None or an npu_ops.TileSizes", repr(tiles), TypeError)


def resolve(implementation: str | None, *, unsupported: str | None = None,
            interpret: bool = False, tiles: TileSizes | None = None) -> str:
  """The implementation that runs.

  Args:
    implementation: as asked (see the module docstring).
    unsupported: why the kernels cannot do this case (None: they can).
    interpret, tiles: validated here.
  """
  check(implementation, interpret, tiles)
  if implementation is None:
    kernel = _DEFAULT_KERNEL.get(jax.default_backend())
    return kernel if kernel and unsupported is None else "xla"
  if implementation in KERNELS and unsupported is not None:
    raise NotImplementedError(f"implementation={implementation!r} has no kernel for "
                              f"{unsupported}; use None (falls back to XLA) or 'xla'")
  return implementation


def kernels(implementation: str) -> types.ModuleType:
  """The kernel module of a resolved Pallas implementation."""
  if implementation == "pallas_tpu":
    from pallas_kernels import tpu  # noqa: PLC0415 (only when asked: imports Mosaic)
    return tpu
  from pallas_kernels import gpu  # noqa: PLC0415 (only when asked: imports Triton)
  return gpu
