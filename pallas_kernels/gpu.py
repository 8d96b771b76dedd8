"""GPU (Pallas Triton backend) kernels: the fused A8W8 / A8W4 op and the float gmm / tgmm.

The grouped matmuls run one program per (visit, column tile), a visit being a row
tile and one group with rows in it (`common.visit_metadata`, megablox's technique):
each program reads one expert's weight tile and writes its group's rows, so a few
tokens over many experts (decode) use the whole GPU as prefill does. Operands are
read in place: blocks are powers of two (Triton's rule), and the edges of m, k and
n are masked loads (`other=0`) and masked stores, so no wrapper pads or copies
anything per call. The bodies use `pltr.load` / `pltr.store`, `jnp` math and
`lax.fori_loop`, which is what a move to Mosaic GPU needs too (Pallas' Triton
backend is deprecated upstream from JAX 0.11; the per-tile math and metadata carry
over, the data movement becomes TMA copies into shared memory).

The fused op quantizes a row over all n/2 SwiGLU columns, which one program does not
see: the kernel writes the float32 SwiGLU values, and the XLA path's quantizer
writes the codes from them (a float32 scratch written once and read back: extra
traffic small next to the weights, e * k * n bytes, unless tokens per expert are in
the thousands). The first version (one program per row tile
walking every column tile and group, codes in a second phase after a barrier) ran
far below the roofline on an H200 (docs/accelerators.md has the measurements).

Registers (ptxas, `python -m npu_ops.tools.aot`): two `[64, 128]` int32 accumulators,
a float32 tile and (A8W4) two float32 k-group sums need 8 warps and 64-deep k
blocks to stay within 255 registers per thread without spilling on sm_80.

Each visit reads its expert's weight tile, so an expert whose tokens span several
row tiles is read once per tile unless L2 serves the repeats: at a few hundred tokens
per expert the kernel moves a few times the weights' bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

try:  # deprecated upstream from JAX 0.11: a JAX without it runs the XLA path on GPUs
  from jax.experimental.pallas import triton as pltr
except ImportError:  # pragma: no cover (JAX 0.10.2 has it)
  pltr = None

from pallas_kernels import common
from pallas_kernels import epilogue
from pallas_kernels.common import TileSizes

FUSED_MAX_BLOCK_M = 128  # rows per tile by default: the registers (see the module doc)

# 8 warps and 64 x 64 x 128 blocks: no register spills on sm_80 or sm_90a at the AOT table's
# shapes (ptxas, `python -m npu_ops.tools.aot`); 4 warps, or 128-deep k blocks, spilled up to
# ~1.9 KB (float32 gmm on sm_90a, the fused A8W4 kernel on sm_80). A sweep of odd shapes
# (docs/accelerators.md) found 16 bytes at some float gmm shapes and ~0.5 KB for the MX-input
# kernel on sm_80 with one 128-wide column tile (255 registers; sm_90a: 188).
_PARAMS = pltr.CompilerParams(num_warps=8, num_stages=2) if pltr else None
# The fused kernel takes int4 weights as jnp.int4 or int8 values: int32 words are unpacked
# before it (by XLA).
READS_INT4_WORDS = False
NO_TRITON = "any case: this JAX has no Pallas Triton backend (deprecated from JAX 0.11)"


def supports(p: common.Problem) -> str | None:
  """Why these kernels cannot run problem `p` (None: they can). Beyond what neither
  backend does (`common.shared_gap`): MX inputs only as fp8 ND weights; nothing on a JAX
  without Pallas' Triton backend."""
  if pltr is None:
    return NO_TRITON
  if p.op == "fused_mx" and (p.transposed or p.fp4):
    return "MX inputs as fp4 or with a transposed weight (the GPU kernel reads fp8 ND weights)"
  return common.shared_gap(p)


def default_tiles(p: common.Problem) -> TileSizes:
  """Rows per tile from the expected tokens per group, up to 128 (`gpu_tiles` caps them)."""
  return TileSizes.for_problem(p.m, p.k, p.n, p.groups, p.expected_tokens,
                               max_block_m=FUSED_MAX_BLOCK_M)


def gpu_tiles(tiles: TileSizes, precision=None) -> tuple[int, int, int]:
  """Caps tiles at what fits a streaming multiprocessor's registers and shared memory,
  in powers of two (Triton's rule). Exact float32 products (HIGHEST: no tensor cores,
  FMA tiles in registers) take 64 x 32 x 64 blocks, which do not spill on sm_80 or
  sm_90a (64 x 64 x 64 spilled 8 KB)."""
  bm, bk, bn = (common.pow2_floor(v) for v in (tiles.block_m, tiles.block_k, tiles.block_n))
  if precision == lax.Precision.HIGHEST:
    return min(bm, 64), 32, min(bn, 64)
  return min(bm, 64), min(bk, 64), min(bn, 128)


def _k_tile(k: int, groups: int, block_k: int) -> int:
  """The contraction tile: `block_k`, a divisor of the group size k / groups when the
  weight scale is per group of k rows (`common.shared_gap`: multiples of 128)."""
  bk = min(block_k, common.round_up(k, 128))
  if groups > 1:
    while (k // groups) % bk:
      bk //= 2
  return bk


def _span(start, size: int, limit: int):
  """`[size]` bool: which of `start .. start + size` are below `limit`."""
  return start + jnp.arange(size) < limit


def _load(ref, rows, cols, mask, other=0):
  return pltr.load(ref.at[rows, cols], mask=mask, other=other)


class _Tile(NamedTuple):
  """One SwiGLU column tile of one row tile: rows (a slice, and which exist), the act and
  gate columns (n/2 apart) and which exist."""
  rows: Any
  in_m: jax.Array
  cols_a: Any
  cols_g: Any
  in_n: jax.Array


def _fused_call(halves: Callable[..., tuple[jax.Array, jax.Array]], args: Sequence[jax.Array],
                ends: jax.Array, *, start: jax.Array | None, m: int, nh: int, tiles: TileSizes,
                out_dtype, qmax: float, mx_out: bool, interpret: bool, name: str,
                smooth: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """The frame of the fused kernels: one program per (visit, SwiGLU column tile), a visit
  being a row tile and one group with rows in it (megablox's metadata): so decode (a few
  rows over many experts) spreads over the GPU as prefill does, and each program reads one
  expert's weight tile. `halves(refs, g, tile)` is group g's (act, gate), float32
  `[bm, bn]`, from the kernel's operands `args` (as refs). Visits: `common.row_visits`
  (rows before `start` and past the last end are written 0). The kernel writes the SwiGLU
  values of its group's rows (times A4W4's `smooth`, float32 `[e, nh]` or `[e, 1]`, where
  given); the per-token (or MX) codes need whole rows, so the XLA
  path's own quantizer (`epilogue.quantize_rows` / `quantize_mx_rows`) writes them from
  that float32 scratch. Returns (codes `[m, nh]` of out_dtype, scales: float32 `[m]`
  per token, e8m0 bytes uint8 `[m, ceil(nh/32)]` for MX)."""
  scale_shape = (m, common.cdiv(nh, epilogue.MX_BLOCK)) if mx_out else (m,)
  scale_dtype = jnp.uint8 if mx_out else jnp.float32
  if m == 0:  # no rows, no grid
    return jnp.zeros((0, nh), out_dtype), jnp.zeros(scale_shape, scale_dtype)
  bm, _, bn = gpu_tiles(tiles)
  num_groups = ends.shape[0]
  v = common.row_visits(ends, m, bm, start)

  def kernel(gid_ref, mt_ref, nv_ref, ends_ref, *refs):
    *operands, s_ref = refs
    if smooth is not None:
      *operands, sm_ref = operands
    t, j = pl.program_id(0), pl.program_id(1)  # here: interpret mode has none inside conds
    g = gid_ref[t]
    real = common.RowVisits.is_real(g, num_groups)
    r0 = mt_ref[t] * bm
    c0 = j * bn
    tile = _Tile(pl.ds(r0, bm), _span(r0, bm, m), pl.ds(c0, bn), pl.ds(nh + c0, bn),
                 _span(c0, bn, nh))
    mask = (common.group_rows(ends_ref, g, r0, bm) & tile.in_m[:, None]) & tile.in_n[None, :]

    @pl.when((t < nv_ref[0]) & real)
    def _():
      s = epilogue.swiglu_halves(*halves(operands, g - 1, tile))  # expert g - 1
      if smooth is not None:
        per_column = smooth.shape[-1] > 1
        s = s * pltr.load(sm_ref.at[g - 1, tile.cols_a if per_column else pl.ds(0, 1)],
                          mask=tile.in_n if per_column else None, other=0)[None]
      pltr.store(s_ref.at[tile.rows, tile.cols_a], s, mask=mask)

    @pl.when((t < nv_ref[0]) & ~real)  # rows before `start` or past the last end: 0
    def _():
      pltr.store(s_ref.at[tile.rows, tile.cols_a], jnp.zeros((bm, bn), jnp.float32), mask=mask)

  s = pl.pallas_call(
      kernel, grid=(v.group.shape[0], common.cdiv(nh, bn)),
      out_shape=common.result((m, nh), jnp.float32, *v, *args),
      compiler_params=_PARAMS, interpret=interpret, name=name)(
          v.group, v.tile, v.count, v.bounds, *args,
          *(() if smooth is None else (smooth.astype(jnp.float32),)))
  # the XLA path's own quantizer (fp8 / fp4 codes as their bits), on whole rows
  if mx_out:
    q, qs = epilogue.quantize_mx_rows(s, out_dtype, as_bits=True)
  else:
    q, qs = epilogue.quantize_rows(s, qmax=qmax, dtype=out_dtype, as_bits=True)
    qs = qs[:, 0]
  return epilogue.codes_from_bits(q, out_dtype), qs


def gmm_swiglu_quant(x: jax.Array, w: jax.Array, w_scale: jax.Array, x_scale: jax.Array,
                     ends: jax.Array, *, start: jax.Array | None = None,
                     assist: jax.Array | None = None,
                     colsum8: jax.Array | None = None, a4w4: bool = False,
                     smooth: jax.Array | None = None, tiles: TileSizes,
                     out_dtype=jnp.int8, qmax: float = epilogue.INT8_QMAX,
                     mx_out: bool = False,
                     interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Fused op on canonical operands, A8W8, A8W4 (with `assist`) or A4W4 (`a4w4`: int8
  x holding int4 values); arguments and results as `pallas_kernels.tpu.gmm_swiglu_quant`,
  and `mx_out`: MX codes of out_dtype (fp4: one a byte) with e8m0 scale bytes uint8
  `[m, ceil(n/64)]` (`_fused_call`)."""
  if smooth is not None and not a4w4:
    raise ValueError("smooth: expected None unless a4w4 (A4W4's smooth scale)")
  m, k = x.shape
  n = w.shape[2]
  groups = w_scale.shape[1]
  a8w4 = assist is not None
  # Triton loads whole bytes: jnp.int4 weights are widened here, once per call.
  w = w.astype(jnp.int8)
  bm, _, bn = gpu_tiles(tiles)
  bk = _k_tile(k, groups, gpu_tiles(tiles)[1])
  k_tiles = common.cdiv(k, bk)
  k_per_group = k_tiles // groups
  if a8w4:
    extra = [epilogue.colsum8(w, groups) if colsum8 is None else colsum8,
             assist.astype(jnp.float32)]
  else:
    extra = [jnp.zeros((1, 1, 1), jnp.int32), jnp.zeros((1, 1), jnp.float32)]  # unused

  def halves(refs, g, t: _Tile):
    x_ref, w_ref, s_ref, xs_ref, cs_ref, a_ref = refs
    x_scale_col = pltr.load(xs_ref.at[t.rows], mask=t.in_m, other=0)[:, None]
    per_col = lambda ref, kg, cols: pltr.load(  # an array index: interpret mode needs one
        ref.at[g, jnp.asarray(kg, jnp.int32), cols], mask=t.in_n, other=0)[None]

    def k_step(kk, accs):
      k0 = kk * bk
      in_k = _span(k0, bk, k)
      xb = _load(x_ref, t.rows, pl.ds(k0, bk), t.in_m[:, None] & in_k[None, :])
      wmask = in_k[:, None] & t.in_n[None, :]
      dot = lambda cols: jnp.dot(xb, pltr.load(w_ref.at[g, pl.ds(k0, bk), cols], mask=wmask,
                                               other=0), preferred_element_type=jnp.int32)
      return accs[0] + dot(t.cols_a), accs[1] + dot(t.cols_g)

    zero = jnp.zeros((bm, bn), jnp.int32)
    if a8w4:  # close each k group in float32: s_g * ((x - 8)_g @ W_g)
      def k_group(kg, f):
        acc_a, acc_g = lax.fori_loop(kg * k_per_group, (kg + 1) * k_per_group, k_step,
                                     (zero, zero))
        close = lambda acc, cols: epilogue.close_k_group(
            acc, per_col(cs_ref, kg, cols), per_col(s_ref, kg, cols))
        return f[0] + close(acc_a, t.cols_a), f[1] + close(acc_g, t.cols_g)

      fzero = jnp.zeros((bm, bn), jnp.float32)
      f_a, f_g = lax.fori_loop(0, groups, k_group, (fzero, fzero))
      assist_of = lambda cols: pltr.load(a_ref.at[g, cols], mask=t.in_n, other=0)[None]
      return (epilogue.finish_a8w4(f_a, assist_of(t.cols_a), x_scale_col),
              epilogue.finish_a8w4(f_g, assist_of(t.cols_g), x_scale_col))
    acc_a, acc_g = lax.fori_loop(0, k_tiles, k_step, (zero, zero))
    dequant = epilogue.dequant_a4w4 if a4w4 else epilogue.dequant_a8w8
    return (dequant(acc_a, per_col(s_ref, 0, t.cols_a), x_scale_col),
            dequant(acc_g, per_col(s_ref, 0, t.cols_g), x_scale_col))

  return _fused_call(halves, [x, w, w_scale.astype(jnp.float32), x_scale, *extra], ends,
                     start=start, m=m, nh=n // 2, tiles=tiles, out_dtype=out_dtype, qmax=qmax,
                     mx_out=mx_out, interpret=interpret, name="npu_gmm_swiglu_quant",
                     smooth=smooth)


def gmm_swiglu_quant_mx(x: jax.Array, w: jax.Array, x_scale: jax.Array, w_scale: jax.Array,
                        ends: jax.Array, *, tiles: TileSizes, out_dtype, qmax: float, mx_out: bool,
                        start: jax.Array | None = None,
                        interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """The fused op on MX inputs (semantics B.1.6): per block of 32 along k, the dot of the
  block's fp8 values (decoded from their bits to float16: exact, and no fp8 conversion is
  needed, which Triton lacks before sm_89) times the x scale, times the weight scale,
  summed over blocks in float32 in order; SwiGLU; per-token or MX codes (`_fused_call`).

  Args:
    x: float8_e4m3fn / float8_e5m2 `[m, k]`; w: the same `[e, k, n]` (ND, read in place);
    x_scale: e8m0 bytes uint8 `[m, ceil(k/64), 2]`; w_scale: uint8 `[e, ceil(k/64), n, 2]`;
    ends: int32 group ends; out_dtype, qmax: the codes; mx_out: MX output (else per token).

  Returns:
    (codes `[m, n/2]` of out_dtype (fp4: one a byte), scales: float32 `[m]` per token, e8m0
    bytes uint8 `[m, ceil(n/64)]` for MX), rows past the last end 0.
  """
  m, k = x.shape
  n = w.shape[2]
  x_type, w_type = x.dtype, w.dtype
  blocks, kb = common.cdiv(k, epilogue.MX_BLOCK), epilogue.MX_BLOCK
  bm, _, bn = gpu_tiles(tiles)
  f16 = lambda b, t: epilogue.float8_value(b, t).astype(jnp.float16)  # exact
  bits = lambda a: lax.bitcast_convert_type(a, jnp.uint8)  # a view: no copy

  def halves(refs, g, t: _Tile):
    x_ref, w_ref, xs_ref, ws_ref = refs

    def k_block(b, accs):
      k0 = b * kb
      in_k = _span(k0, kb, k)
      # scales of block b at [..., b // 2, ..., b % 2], as bit ops (Triton lowers jnp's
      # floor-mod with a select it cannot type); arrays: interpret mode needs them
      pair, half = jnp.asarray(b & 1, jnp.int32), jnp.asarray(b >> 1, jnp.int32)
      xb = f16(_load(x_ref, t.rows, pl.ds(k0, kb), t.in_m[:, None] & in_k[None, :]), x_type)
      xs = epilogue.e8m0_to_float32(
          pltr.load(xs_ref.at[t.rows, half, pair], mask=t.in_m, other=127))[:, None]

      def part(cols):
        wb = f16(pltr.load(w_ref.at[g, pl.ds(k0, kb), cols],
                           mask=in_k[:, None] & t.in_n[None, :], other=0), w_type)
        ws = epilogue.e8m0_to_float32(
            pltr.load(ws_ref.at[g, half, cols, pair], mask=t.in_n, other=127))[None]
        return (jnp.dot(xb, wb, preferred_element_type=jnp.float32) * xs) * ws

      return accs[0] + part(t.cols_a), accs[1] + part(t.cols_g)

    zero = jnp.zeros((bm, bn), jnp.float32)
    return lax.fori_loop(0, blocks, k_block, (zero, zero))

  return _fused_call(halves, [bits(x), bits(w), x_scale, w_scale], ends, start=start, m=m,
                     nh=n // 2,
                     tiles=tiles, out_dtype=out_dtype, qmax=qmax, mx_out=mx_out,
                     interpret=interpret, name="npu_gmm_swiglu_quant_mx")


def gmm(lhs: jax.Array, rhs: jax.Array, ends: jax.Array, *, out_dtype, tiles: TileSizes,
        start: jax.Array | None = None, interpret: bool = False, transpose_rhs: bool = False,
        precision=None, scales: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """Grouped matmul `[m, k] x [e, k, n] -> [m, n]` (`rhs [e, n, k]` read as its
  transpose with `transpose_rhs`) of float or int8 operands, accumulated in float32 or int32
  (`common.accumulator`: exact for int8); rows before `start` and past the
  last end are 0; `scales` as in `pallas_kernels.tpu.gmm` (A8W8's dequant). Grid (visit,
  column tile): a
  visit is a row tile and one group with rows in it (`common.row_visits`); it writes that group's
  rows, so a tile shared by two groups is written by two programs, and a few rows over
  many experts still spread over the GPU."""
  m, k = lhs.shape
  n = rhs.shape[1 if transpose_rhs else 2]
  if m == 0:
    return jnp.zeros((0, n), out_dtype)
  precision = common.float32_precision(precision, lhs.dtype)
  bm, bk, bn = gpu_tiles(tiles, precision)
  k_tiles = common.cdiv(k, bk)
  num_groups = ends.shape[0]
  v = common.row_visits(ends, m, bm, start)
  scaled = scales is not None

  def kernel(gid_ref, mt_ref, nv_ref, ends_ref, x_ref, w_ref, *refs):
    cs_ref, rs_ref, o_ref = refs if scaled else (None, None, *refs)
    t, j = pl.program_id(0), pl.program_id(1)
    g = gid_ref[t]
    real = common.RowVisits.is_real(g, num_groups)
    e_ = jnp.maximum(g - 1, 0)  # the expert of a real visit
    r0 = mt_ref[t] * bm
    rows, cols = pl.ds(r0, bm), pl.ds(j * bn, bn)
    in_m, in_n = _span(r0, bm, m), _span(j * bn, bn, n)
    mask = (common.group_rows(ends_ref, g, r0, bm) & in_m[:, None]) & in_n[None, :]

    def k_step(kk, acc):
      in_k = _span(kk * bk, bk, k)
      ks = pl.ds(kk * bk, bk)
      xb = _load(x_ref, rows, ks, in_m[:, None] & in_k[None, :])
      if transpose_rhs:
        wb = pltr.load(w_ref.at[e_, cols, ks], mask=in_n[:, None] & in_k[None, :], other=0).T
      else:
        wb = pltr.load(w_ref.at[e_, ks, cols], mask=in_k[:, None] & in_n[None, :], other=0)
      return acc + jnp.dot(xb, wb, precision=precision, preferred_element_type=acc.dtype)

    @pl.when((t < nv_ref[0]) & real)
    def _():
      acc = lax.fori_loop(0, k_tiles, k_step, jnp.zeros((bm, bn), common.accumulator(lhs.dtype)))
      if scaled:
        col = pltr.load(cs_ref.at[e_, cols], mask=in_n, other=0)[None]
        row = pltr.load(rs_ref.at[rows], mask=in_m, other=0)[:, None]
        acc = epilogue.dequant_a8w8(acc, col, row)
      pltr.store(o_ref.at[rows, cols], acc.astype(o_ref.dtype), mask=mask)

    @pl.when((t < nv_ref[0]) & ~real)  # rows before `start` or past the last end: 0
    def _():
      pltr.store(o_ref.at[rows, cols], jnp.zeros((bm, bn), o_ref.dtype), mask=mask)

  return pl.pallas_call(
      kernel, grid=(v.group.shape[0], common.cdiv(n, bn)),
      out_shape=common.result((m, n), out_dtype, *v, lhs, rhs),
      compiler_params=_PARAMS, interpret=interpret, name="npu_gmm")(
          v.group, v.tile, v.count, v.bounds, lhs, rhs,
          *([] if scales is None else [a.astype(jnp.float32) for a in scales]))


def tgmm(lhs: jax.Array, rhs: jax.Array, ends: jax.Array, *, num_groups: int, out_dtype,
         tiles: TileSizes, start: jax.Array | None = None, interpret: bool = False,
         precision=None) -> jax.Array:
  """k-grouped matmul `out[g] = lhs[rows of g]^T @ rhs[rows of g]`: `[num_groups, k, n]`.
  Grid (group, k tile, column tile); each program loops over its group's row tiles
  (groups past len(ends) have none and write zeros). Group 0 starts at row `start` (an
  int32 scalar; None: 0)."""
  m, k = lhs.shape
  n = rhs.shape[-1]
  if m == 0:  # no rows: every group is empty
    return jnp.zeros((num_groups, k, n), out_dtype)
  precision = common.float32_precision(precision, lhs.dtype)
  bm, bk, bn = gpu_tiles(tiles, precision)
  groups = ends.shape[0]
  ends = jnp.concatenate([ends, jnp.broadcast_to(ends[-1:], (num_groups - groups,))])
  first = jnp.zeros((1,), jnp.int32) if start is None else jnp.reshape(start, (1,))
  bounds = jnp.concatenate([first.astype(jnp.int32), ends])  # g: [bounds[g], bounds[g + 1])

  def kernel(bounds_ref, x_ref, dy_ref, o_ref):
    g, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ks, cols = pl.ds(i * bk, bk), pl.ds(j * bn, bn)
    in_k, in_n = _span(i * bk, bk, k), _span(j * bn, bn, n)
    start, end = bounds_ref[g], bounds_ref[g + 1]

    def row_tile(r, acc):
      r0 = r * bm
      rows = common.group_rows(bounds_ref, g + 1, r0, bm)  # inside [0, m): ends <= m
      xb = _load(x_ref, pl.ds(r0, bm), ks, rows & in_k[None, :])
      dyb = _load(dy_ref, pl.ds(r0, bm), cols, rows & in_n[None, :])
      return acc + lax.dot_general(xb, dyb, (((0,), (0,)), ((), ())), precision=precision,
                                   preferred_element_type=acc.dtype)

    tiles_end = jnp.where(end > start, (end - 1) // bm + 1, start // bm)
    acc = lax.fori_loop(start // bm, tiles_end, row_tile,
                        jnp.zeros((bk, bn), common.accumulator(lhs.dtype)))
    pltr.store(o_ref.at[g, ks, cols], acc.astype(o_ref.dtype), mask=in_k[:, None] & in_n[None, :])

  return pl.pallas_call(
      kernel, grid=(num_groups, common.cdiv(k, bk), common.cdiv(n, bn)),
      out_shape=common.result((num_groups, k, n), out_dtype, bounds, lhs, rhs),
      compiler_params=_PARAMS, interpret=interpret, name="npu_tgmm")(bounds, lhs, rhs)
