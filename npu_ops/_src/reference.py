"""The grouped ops as plain jnp: docs/semantics.md written as whole-array expressions.

`implementation="reference"` runs these. No row blocks, no kernels, no block function
shared with the fast paths: every group's product for every row (`einsum`), then each
row keeps its own group's (`g` times the work and a `[g, m, n]` temporary: for
checking and small shapes). The epilogue pieces (dequant order, SwiGLU, per-token
quant) are `pallas_kernels.epilogue`'s, the one home of that math.

Operands are canonical (`npu_ops._src.operands`): `ends` are group ends (a tuple of ints or
an int32 array, `npu_ops._src.groups`), integer operands int8 (int4 values widened).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from npu_ops._src import groups as groups_lib
from npu_ops._src import operands
from npu_ops._src import quant as quant_lib
from npu_ops._src.operands import QArray
from pallas_kernels import epilogue


def _row_groups(ends: groups_lib.GroupEnds, m: int) -> tuple[jax.Array, jax.Array]:
  """(group of each row, clipped to a valid index; whether the row is in a group)."""
  gid = groups_lib.row_group_ids(ends, m)
  return jnp.minimum(gid, len(ends) - 1), gid < len(ends)


def _acc_dtype(out_dtype: Any) -> np.dtype:
  out_dtype = np.dtype(out_dtype)
  return np.dtype(jnp.float32) if jnp.issubdtype(out_dtype, jnp.floating) else out_dtype


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, ends: groups_lib.GroupEnds, *,
                   out_dtype: Any, precision: Any = None) -> jax.Array:
  """`out[r] = lhs[r] @ rhs[group of r]`, 0 for rows in no group. `lhs [m, k]`,
  `rhs [g, k, n]` -> `[m, n]` of out_dtype (accumulated in float32 / int32)."""
  m = lhs.shape[0]
  if m == 0 or len(ends) == 0:
    return jnp.zeros((m, rhs.shape[-1]), out_dtype)
  gid, inside = _row_groups(ends, m)
  every = jnp.einsum("mk,gkn->gmn", lhs, rhs[:len(ends)], precision=precision,
                     preferred_element_type=_acc_dtype(out_dtype))
  own = jnp.take_along_axis(every, gid[None, :, None], axis=0)[0]
  return jnp.where(inside[:, None], own, jnp.zeros((), own.dtype)).astype(out_dtype)


def tgmm(lhs: jax.Array, rhs: jax.Array, ends: groups_lib.GroupEnds, *, num_groups: int,
         out_dtype: Any, precision: Any = None) -> jax.Array:
  """`out[g] = lhs[rows of g]^T @ rhs[rows of g]`: `[m, k]`, `[m, n]` -> `[num_groups, k, n]`;
  groups without rows give 0."""
  m = lhs.shape[0]
  gid = groups_lib.row_group_ids(ends, m)  # len(ends) for rows in no group
  groups = jnp.arange(num_groups, dtype=gid.dtype)[:, None]
  member = (gid[None, :] == groups) & (groups < len(ends))  # [g, m]
  # Zero the other rows' values, of both operands, rather than multiplying by 0 (inf * 0
  # would be NaN: a row of one group would spoil every other).
  pick = lambda a: jnp.where(member[:, :, None], a[None], jnp.zeros((), a.dtype))
  return jnp.einsum("gmk,gmn->gkn", pick(lhs), pick(rhs), precision=precision,
                    preferred_element_type=_acc_dtype(out_dtype)).astype(out_dtype)


def swiglu_quant(x: QArray, w: QArray, ends: groups_lib.GroupEnds, *,
                 assist: jax.Array | None = None, smooth: jax.Array | None = None,
                 spec: Any = None) -> tuple[jax.Array, jax.Array]:
  """The fused op (semantics B.1.3-B.1.5) on canonical operands (`operands.QArray`).

  `x`: int8 values `[m, k]` (int4 ones widened), scale `[m]`; `w`: int8 / int4 values
  `[e, k, n]`, scale `[e, G, n]` (G k groups); `assist [e, n]` (A8W4), `smooth [e, n/2 or 1]`
  (A4W4); `spec` a `quant.DynamicQuant` (default int8 per token). Returns (codes `[m, n/2]`,
  scales: float32 `[m]` per token, e8m0 bytes uint8 `[m, ceil(n/64)]` for MX), 0 for rows
  in no group.
  """
  spec = spec or quant_lib.INT8_PER_TOKEN
  scenario = operands.scenario(x, w)
  xv, wv = x.values, w.values.astype(jnp.int8)
  m, k = xv.shape
  n_groups = w.scale.shape[1]
  gs = k // n_groups
  gid, inside = _row_groups(ends, m)
  per_row = lambda a: a[gid]  # a per-expert operand, row by row
  x_scale = x.scale[:, None]
  int_gmm = lambda xs, ws: grouped_matmul(xs, ws, ends, out_dtype=jnp.int32)
  if scenario == operands.A8W4:  # (x - 8) @ W per k group, as x @ W - 8 * colsum in int32
    colsum8 = epilogue.colsum8(wv, n_groups)
    c = sum(epilogue.close_k_group(
        int_gmm(xv[:, g * gs:(g + 1) * gs], wv[:, g * gs:(g + 1) * gs]),
        per_row(colsum8[:, g]), per_row(w.scale[:, g])) for g in range(n_groups))
    c = epilogue.finish_a8w4(c, per_row(assist), x_scale)
  elif scenario == operands.A8W8:
    c = epilogue.dequant_a8w8(int_gmm(xv, wv), per_row(w.scale[:, 0]), x_scale)
  else:
    c = epilogue.dequant_a4w4(int_gmm(xv, wv), per_row(w.scale[:, 0]), x_scale)
  half = c.shape[-1] // 2
  s = epilogue.swiglu_halves(c[:, :half], c[:, half:])
  if smooth is not None:
    s = s * per_row(smooth)
  if half == 0:
    cols, scale_dtype = epilogue.output_scale_shape(spec, 0)
    q, q_scale = jnp.zeros((m, 0), spec.dtype), jnp.zeros((m,) + cols, scale_dtype)
  else:
    q, q_scale = epilogue.quantize_output(s, spec)
  q_scale = jnp.where(inside[:, None], q_scale, jnp.zeros((), q_scale.dtype))
  return (jnp.where(inside[:, None], q, jnp.zeros((), q.dtype)),
          q_scale[:, 0] if spec.mode == 0 else q_scale)

