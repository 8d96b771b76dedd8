"""The fused grouped matmul + dequant + SwiGLU + dynamic quantization, on canonical operands
(`QArray`s and group ends): the core of `npu_grouped_matmul_swiglu_quant_v2`, whose
torch_npu arguments `gmm_swiglu_quant` decodes. MX inputs are `fused_mx`.

Per group `i` (rows `[start_i, end_i)` of x, expert weight `W_i`), semantics B.1:

  A8W8: C = (int32(x @ W_i) * w_scale[i]) * x_scale[r]
  A8W4: C = x_scale[r] * (sum_g s[i,g] * ((x - 8)_g @ W_i,g) + A[i])
        (the kernel's hi/lo nibble split: 16 * x_hi + x_lo = x - 8, exact in int32)
  A4W4: C = (int32(x @ W_i) * x_scale[r]) * w_scale[i]
  S = silu(C[:, :n/2]) * C[:, n/2:]            (A4W4: S *= smooth_scale[i])
  Q, Q_scale = per-row quantization of S       (semantics A.3 item 3; or MX, B.1.6)

Rows at or beyond the group total give Q = 0 and Q_scale = 0 (semantics A.3 item 1).
The XLA path runs the whole chain in the row-block loop of `row_blocks.traverse_staged`:
each row block's int8 dot (exact int32) is dequantized, SwiGLU'd and quantized right after
it is computed, so no `[m, n]` intermediate exists. With few rows per group
(`_epilogue_after`) the grouped matmul writes the int32 `[m, n]` product and the epilogue
runs once over all rows (same arithmetic, same bits).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from npu_ops._src import backend
from npu_ops._src import grouped as grouped_lib
from npu_ops._src import manual_axes
from npu_ops._src import groups as groups_lib
from npu_ops._src import operands
from npu_ops._src import quant as quant_lib
from npu_ops._src import reference
from npu_ops._src import row_blocks
from npu_ops._src.operands import A4W4, A8W4, A8W8, QArray
from pallas_kernels import common as pallas_common
from pallas_kernels import epilogue
from pallas_kernels.common import TileSizes


def fused(x: QArray, w: QArray, ends: groups_lib.GroupEnds, *,
                    assist: jax.Array | None = None, smooth: jax.Array | None = None,
                    spec: quant_lib.DynamicQuant = quant_lib.INT8_PER_TOKEN,
                    expected_tokens: int | None = None, implementation: str | None = None,
                    interpret: bool = False, tiles: TileSizes | None = None,
                    shift: Any = None) -> tuple[jax.Array, jax.Array]:
  """The fused op on canonical operands, on the implementation asked for (`backend`): a
  Pallas kernel (A8W8 / A8W4), the XLA row-block path (`_xla`), or `reference`.

  Args:
    x: tokens, int8 values `[m, k]` (A4W4: int4 values as int8, or in int32 words
      `[m, k/8]`) with their scale `[m]`.
    w: expert weights, int8 or jnp.int4 values `[e, k, n]` (or int4 in int32 words
      `[e, k, n/8]`, unpacked by the TPU kernel in VMEM, elsewhere first) with their scale
      `[e, G, n]`.
    ends: group ends (`npu_ops._src.groups`), counted from row `shift`.
    shift: the first row of group 0 (group_offset's local groups: `groups.local_groups`);
      rows outside the groups give 0. The kernels and the XLA path skip the other rows
      (in their metadata, in their loops' bounds); the reference moves the groups' rows to
      row 0 and back.
    assist: A8W4's `[e, n]` assist matrix; smooth: A4W4's `[e, n/2]` or `[e, 1]`.
    spec: the output quantization.
  """
  scenario = operands.scenario(x, w)
  m, k = x.values.shape[0], row_blocks.first(w.values).shape[-2]
  e, n = row_blocks.num_groups_of(w.values), w.scale.shape[-1]
  mx_out = spec.mode == quant_lib.MX
  x_dtype = "int4" if operands.is_words(x.values) else np.dtype(x.values.dtype).name
  problem = pallas_common.Problem("fused", m, k, n, e, x_dtype,
                                  scale_groups=w.scale.shape[1], a4w4=scenario == A4W4,
                                  mx_out=mx_out, expected_tokens=expected_tokens)
  impl = backend.resolve(implementation, problem, interpret=interpret, tiles=tiles)
  if grouped_lib.is_symbolic(m):  # export with a symbolic m: ragged_dot, then the epilogue
    grouped_lib.check_static_m(m, implementation)
    impl, block_sizes, after = "xla", None, True
  else:
    block_sizes = row_blocks.GmmBlockSizes.for_problem(m, len(ends), expected_tokens)
    after = _epilogue_after(m, k, n, e, expected_tokens, scenario)

  op = Fused(problem, interpret, ends if isinstance(ends, tuple) else None, scenario, spec,
             block_sizes, after)
  start = None if shift is None else jnp.asarray(shift, jnp.int32)
  return backend.run(op, impl, (x, w, jnp.asarray(ends, jnp.int32), assist, smooth, start),
                     tiles)


NO_DERIVATIVE = (
    "npu_grouped_matmul_swiglu_quant(_v2) has no derivative: its outputs are quantized codes "
    "and their scales. For quantization-aware training, npu_ops.fake_quant_gmm_swiglu_quant "
    "computes the same forward and differentiates (README, QAT)")


@dataclasses.dataclass(frozen=True)
class Fused(backend.GroupedOp):
  """The fused op on its implementations (`backend.GroupedOp`; `args`: x, w (`QArray`s),
  the int32 ends, assist, smooth, the start row or None), as `fused` describes it.

  Attributes:
    scenario: A8W8, A8W4 or A4W4. spec: the output quantization.
    block_sizes, after: the XLA path's row blocks, and whether its epilogue runs after
      the grouped matmul (`_epilogue_after`).
  """
  no_derivative: ClassVar[str] = NO_DERIVATIVE
  scenario: str
  spec: quant_lib.DynamicQuant
  block_sizes: row_blocks.GmmBlockSizes | None
  after: bool

  def kernel(self, module, tiles, x, w, ends, assist, smooth, start):
    values = row_blocks.stacked(w.values)
    if not module.READS_INT4_WORDS:
      values = operands.unpacked(values)
    tokens = x.values if module.READS_INT4_WORDS else operands.token_values(x.values)
    return module.gmm_swiglu_quant(
        tokens, values, w.scale, x.scale, self.ends_from_row0(ends, start),
        start=start, assist=assist, a4w4=self.scenario == A4W4, smooth=smooth, tiles=tiles,
        out_dtype=self.spec.dtype, qmax=self.spec.qmax,
        mx_out=self.spec.mode == quant_lib.MX, interpret=self.interpret)

  def xla(self, x, w, ends, assist, smooth, start):
    return _xla(operands.token_values(x.values), operands.unpacked(w.values), w.scale, x.scale, assist, smooth,
                ends=self.ends(ends), start=start, scenario=self.scenario, spec=self.spec,
                block_sizes=self.block_sizes, after=self.after)

  def reference(self, x, w, ends, assist, smooth, start):  # local rows moved to row 0, back
    w = QArray(row_blocks.stacked(operands.unpacked(w.values)), w.scale, w.bits)
    x = QArray(operands.token_values(x.values), x.scale, x.bits)
    return groups_lib.rows_from(start)(lambda x: reference.swiglu_quant(
        x, w, self.ends(ends), assist=assist, smooth=smooth, spec=self.spec))(x, start)


@jax.jit
def canonical_assist(w: jax.Array, scale: jax.Array) -> jax.Array:
  # 8 * colsum is exact, so this is 8 * sum_k W * s bit for bit
  return jnp.sum(epilogue.colsum8(w, scale.shape[1]).astype(jnp.float32) * scale, axis=1)



# Below this many expected rows per group, the epilogue runs once over all rows after
# the grouped matmul: per row block it is a few XLA ops whose fixed cost outweighs a
# block of a few rows; with more rows the int32 `[m, n]` round trip costs more than the
# per-block ops save, unless that product stays in the caches (then up to 127 rows a
# group). The measurements: docs/performance.md, "How the CPU path stays fast".
_EPILOGUE_AFTER_BELOW_ROWS = 64
_EPILOGUE_AFTER_SMALL_PRODUCT = (128, 12 << 20)  # (rows per group, int32 product bytes)


def _epilogue_after(m: int, k: int, n: int, e: int, expected: int | None, scenario: str
                    ) -> bool:
  """Whether the XLA path runs the epilogue after the matmul instead of per row block."""
  if scenario == A8W4:  # dequant needs each k-group's partial sums
    return False
  expected = expected or -(-m // max(e, 1))
  acc_bytes = 4 * m * n  # the int32 accumulator it adds
  io_bytes = m * k + e * k * n + m * n // 2 + 4 * (m + e * n + m)
  rows, small = _EPILOGUE_AFTER_SMALL_PRODUCT
  few = expected < _EPILOGUE_AFTER_BELOW_ROWS or (expected < rows and acc_bytes <= small)
  return few and 4 * acc_bytes <= io_bytes


def _dequant(acc: jax.Array, w_scale: jax.Array, x_scale: jax.Array, scenario: str
             ) -> jax.Array:
  """C of A8W8 / A4W4 (module doc) from the int32 product, in the documented order
  (docs/semantics.md)."""
  return (epilogue.dequant_a8w8 if scenario == A8W8 else epilogue.dequant_a4w4)(
      acc, w_scale, x_scale)


def swiglu_quant(c: jax.Array, smooth: jax.Array | None, spec: quant_lib.DynamicQuant):
  """(codes as `epilogue.code_storage`, scale `[rows, 1]` per token or e8m0 bytes
  `[rows, blocks]` for MX); `squeeze_per_token` makes them the op's."""
  if c.shape[-1] == 0:
    cols, scale_dtype = epilogue.output_scale_shape(spec, 0)
    return (jnp.zeros(c.shape, epilogue.code_storage(spec.dtype)),
            jnp.zeros(c.shape[:-1] + cols, scale_dtype))
  s = epilogue.swiglu(c)
  return epilogue.quantize_output(s if smooth is None else s * smooth, spec, as_bits=True)


@row_blocks.jit_by_ends("scenario", "spec", "block_sizes", "after")
def _xla(x, w, scale, x_scale, assist, smooth, *, ends, scenario, spec, block_sizes,
         after=False, start=None):
  """The XLA path: the epilogue runs on each row block, or once after the grouped matmul
  (`after`, see `_epilogue_after`). `ends` are counted from row `start` (None: 0): the
  local groups of group_offset, read where they are; other rows give 0."""
  m, k = x.shape
  e, n_groups, n = scale.shape
  # int4 weights: XLA:CPU dots take int8 operands. A tuple of per-expert weights is read in
  # place (row_blocks.group_operand); A8W4 slices k groups out of each: stacked.
  w = row_blocks.stacked(w) if scenario == A8W4 else w
  w = tuple(a.astype(jnp.int8) for a in w) if isinstance(w, tuple) else w.astype(jnp.int8)
  gs = k // n_groups
  colsum8 = None
  if scenario == A8W4:  # 8 * column sums per k-group: the "- 8" of (x - 8) @ W, in int32
    # of the int8 weights as they are: XLA:GPU fused the int4 -> int8 -> int32 converts
    # into a Triton reduction it then failed to compile
    colsum8 = epilogue.colsum8(jax.lax.optimization_barrier(w), n_groups)
  if after:
    gid = groups_lib.row_group_ids(ends, m, start)
    inside = gid < len(ends)  # rows outside the groups: 0 in both outputs
    per_row = lambda a: None if a is None else groups_lib.per_row(a, gid)
    grouped = lambda xs, ws: grouped_lib.matmul(xs, ws, ends, out_dtype=jnp.int32,
                                                implementation="xla", block_sizes=block_sizes,
                                                start=start)
    if scenario == A8W4:
      c = sum(epilogue.close_k_group(
          grouped(x[:, g * gs:(g + 1) * gs], w[:, g * gs:(g + 1) * gs]),
          per_row(colsum8[:, g]), per_row(scale[:, g])) for g in range(n_groups))
      c = epilogue.finish_a8w4(c, per_row(assist), x_scale[:, None])
    else:
      c = _dequant(grouped(x, w), per_row(scale[:, 0]), x_scale[:, None], scenario)
    q, q_scale = swiglu_quant(c, per_row(smooth), spec)
    keep = lambda a: jnp.where(inside[:, None], a, jnp.zeros((), a.dtype))
    return squeeze_per_token(keep(q), keep(q_scale), spec)

  def group_ctx(g):
    # per-column operands as [..., 1, cols]: every broadcast against a row block spelled out
    row = lambda a: None if a is None else a[g][..., None, :]
    return row_blocks.group_operand(w, g), row(scale), row(assist), row(colsum8), row(smooth)

  def dot_fn(ctx, r0, bl):
    """The block's int32 product (A8W8, A4W4) or A8W4's float32 sum over k groups."""
    w_g, s_g, _, colsum8_g, _ = ctx
    xb = lax.dynamic_slice_in_dim(x, r0, bl)
    if scenario != A8W4:
      return row_blocks.group_dot(xb, w_g, preferred_element_type=jnp.int32)
    dot = lambda a, b: lax.dot(a, b, preferred_element_type=jnp.int32)
    return sum(epilogue.close_k_group(dot(xb[:, g * gs:(g + 1) * gs], w_g[g * gs:(g + 1) * gs]),
                                       colsum8_g[g], s_g[g]) for g in range(n_groups))

  per_token = spec.mode == quant_lib.PER_TOKEN

  def finish_fn(outs, ctx, r0, acc, valid):
    _, s_g, a_g, _, smooth_g = ctx
    xs = lax.dynamic_slice_in_dim(x_scale, r0, acc.shape[0])[:, None]
    c = (epilogue.finish_a8w4(acc, a_g, xs) if scenario == A8W4
         else _dequant(acc, s_g[0], xs, scenario))
    s = epilogue.swiglu(c)
    s = s if smooth_g is None else s * smooth_g
    if per_token:  # the scale (amax / qmax, correctly rounded) is computed once, after
      amax = jnp.max(jnp.abs(s), axis=-1, keepdims=True)
      q = epilogue.codes_for_amax(s, amax, qmax=spec.qmax, dtype=spec.dtype,
                                   fp8_as_bits=True)
      q_scale = amax
    else:
      q, q_scale = epilogue.quantize_output(s, spec, as_bits=True)
    return (row_blocks.write_rows(outs[0], q, r0, valid),
            row_blocks.write_rows(outs[1], q_scale, r0, valid))

  cols, scale_dtype = epilogue.output_scale_shape(spec, n // 2)
  init = manual_axes.varying_as((jnp.zeros((m, n // 2), epilogue.code_storage(spec.dtype)),
                                jnp.zeros((m,) + cols, scale_dtype)),
                               x, w, scale, x_scale, assist, smooth, ends, start)
  if n == 0:
    return squeeze_per_token(*init, spec)
  q, q_scale = row_blocks.traverse_staged(
      ends, m, init, row=jax.ShapeDtypeStruct((n,), jnp.float32 if scenario == A8W4 else jnp.int32),
      group_ctx=group_ctx, dot_fn=dot_fn, finish_fn=finish_fn, block_sizes=block_sizes,
      start=0 if start is None else start, row_macs=k * n)
  if per_token:
    q_scale = epilogue.scale_for_amax(q_scale, spec.qmax)
  return squeeze_per_token(q, q_scale, spec)


def squeeze_per_token(q, q_scale, spec):
  """`swiglu_quant`'s results as the op gives them."""
  q = epilogue.codes_from_bits(q, spec.dtype)
  return q, q_scale[:, 0] if spec.mode == quant_lib.PER_TOKEN else q_scale
