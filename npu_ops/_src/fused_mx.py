"""The fused op on MX inputs (semantics B.1.6): fp8 / fp4 tokens and expert weights with
e8m0 scales per block of 32 along k, on canonical operands (`gmm_swiglu_quant` decodes
torch_npu's arguments for it).

XLA path: each operand times its scales (exact powers of two), one float32 grouped matmul,
SwiGLU, then the output quantization. TPU kernel (`pallas_kernels.tpu.gmm_swiglu_quant_mx`;
fp8 or fp4 operands, ND weight): the same, each operand dequantized in VMEM. GPU kernel
(`pallas_kernels.gpu.gmm_swiglu_quant_mx`; fp8 operands, ND weight): per block of 32 along
k, the block's dot times both scales, summed over blocks in order (B.1.6's formula). Within
a block the hardware's accumulation order is not specified; all sum exact float32 products
in float32. Operand values scaled below 2**-126 flush to 0 on XLA:CPU (and on a TPU), as
in every float op there.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from npu_ops._src import backend
from npu_ops._src import fused as fused_lib
from npu_ops._src import grouped as grouped_lib
from npu_ops._src import groups as groups_lib
from npu_ops._src import quant as quant_lib
from pallas_kernels import common as pallas_common
from pallas_kernels import epilogue
from pallas_kernels.common import TileSizes


def fused_mx(x: jax.Array, x_scale: jax.Array, w: jax.Array, w_scale: jax.Array,
             ends: groups_lib.GroupEnds, *, transposed: bool,
             spec: quant_lib.DynamicQuant, shift: Any = None,
             implementation: str | None = None, interpret: bool = False,
             tiles: TileSizes | None = None) -> tuple[jax.Array, jax.Array]:
  """The fused op on MX inputs, on the implementation asked for (`backend`).

  Args:
    x: float8_e4m3fn / float8_e5m2 / float4_e2m1fn `[m, k]`; x_scale: its e8m0 bytes
      (uint8) `[m, ceil(k/64), 2]` (block b of 32 at `[b // 2, b % 2]`).
    w: expert weights of those dtypes `[e, k, n]`, or `[e, n, k]` when `transposed`;
      w_scale: e8m0 bytes `[e, ceil(k/64), n, 2]` (`[e, n, ceil(k/64), 2]` transposed).
    ends: group ends (`groups`), counted from row `shift` (as in `fused.fused`).
    spec: the output quantization.

  Returns:
    (codes as `epilogue.code_storage`, scales: float32 `[m]` per token or e8m0 bytes
    `[m, ceil(n/2 / 32)]` for MX), rows past the groups 0 in both.
  """
  m, k = x.shape
  e = w.shape[0]
  n = w.shape[1] if transposed else w.shape[2]
  fp4 = np.dtype(jnp.float4_e2m1fn)
  problem = pallas_common.Problem(
      "fused_mx", m, k, n, e, np.dtype(x.dtype).name, mx_out=spec.mode == quant_lib.MX,
      transposed=transposed, fp4=fp4 in (np.dtype(x.dtype), np.dtype(w.dtype)))
  impl = backend.resolve(implementation, problem, interpret=interpret, tiles=tiles)
  if m == 0 or n == 0:  # nothing to compute (the block scales' reshapes need a size)
    cols, scale_dtype = epilogue.output_scale_shape(spec, n // 2)
    return fused_lib.squeeze_per_token(jnp.zeros((m, n // 2), epilogue.code_storage(spec.dtype)),
                                       jnp.zeros((m,) + cols, scale_dtype), spec)
  op = FusedMX(problem, interpret, ends if isinstance(ends, tuple) else None, spec, transposed)
  start = None if shift is None else jnp.asarray(shift, jnp.int32)
  return backend.run(op, impl, ((x, x_scale), w, w_scale, jnp.asarray(ends, jnp.int32), start),
                     tiles)


@dataclasses.dataclass(frozen=True)
class FusedMX(backend.GroupedOp):
  """The fused op on MX inputs on its implementations (`backend.GroupedOp`; `args`: the
  pair (x, x_scale), w, w_scale, the int32 ends, the start row or None), as `fused_mx`
  describes it."""
  no_derivative: ClassVar[str] = fused_lib.NO_DERIVATIVE
  spec: quant_lib.DynamicQuant
  transposed: bool

  def kernel(self, module, tiles, rows, w, w_scale, ends, start):
    x, x_scale = rows
    return module.gmm_swiglu_quant_mx(
        x, w, x_scale, w_scale, self.ends_from_row0(ends, start), start=start,
        tiles=tiles, out_dtype=self.spec.dtype, qmax=self.spec.qmax,
        mx_out=self.spec.mode == quant_lib.MX, interpret=self.interpret)

  def xla(self, rows, w, w_scale, ends, start):
    return self._scaled_gmm(rows, w, w_scale, ends, start, "xla")

  def reference(self, rows, w, w_scale, ends, start):
    return self._scaled_gmm(rows, w, w_scale, ends, start, "reference")

  def _scaled_gmm(self, rows, w, w_scale, ends, start, implementation):
    """Each operand times its scales, `grouped.matmul`'s float32 product on `implementation`, then
    the epilogue."""
    x, x_scale = rows
    k = x.shape[1]
    scaled = lambda v, b, axis: v.astype(jnp.float32) * _per_element(
        epilogue.e8m0_to_float32(b), k, axis)
    wf = scaled(w, w_scale, 2 if self.transposed else 1)
    c = grouped_lib.matmul(scaled(x, x_scale, 1),
                           jnp.swapaxes(wf, 1, 2) if self.transposed else wf, self.ends(ends),
                           out_dtype=jnp.float32, implementation=implementation,
                           precision=lax.Precision.HIGHEST, start=start)
    # rows outside the groups: c = 0 -> codes and scales 0
    return fused_lib.squeeze_per_token(*fused_lib.swiglu_quant(c, None, self.spec), self.spec)


def _per_element(scale: jax.Array, k: int, axis: int) -> jax.Array:
  """Block scales with `ceil(k/64)` at `axis` and the pair as the last dim -> one per
  element of k at `axis`: element kk takes `scale[..., kk // 64, ..., (kk // 32) % 2]`."""
  pairs = jnp.moveaxis(scale, -1, axis + 1)
  flat = pairs.reshape(pairs.shape[:axis] + (-1,) + pairs.shape[axis + 2:])
  return lax.slice_in_dim(jnp.repeat(flat, epilogue.MX_BLOCK, axis=axis), 0, k, axis=axis)
