"""GPU (Pallas Triton backend) kernels: the fused A8W8 op and the float gmm / tgmm.

One program per output tile; it walks the groups that have rows in its row tile
(`common.tile_group_ranges`, computed once per call) and keeps, per row, the
result of the row's own group. Every block is a power of two and every operand
is padded to whole tiles, so the bodies need no masked loads and stay portable:
they use only `ref[...]` reads and writes with `pl.ds` slices, `jnp` math,
`lax.fori_loop` and one barrier, which is what a move to Mosaic GPU needs too
(Pallas' Triton backend is deprecated upstream from JAX 0.11; Mosaic GPU, via
`plgpu.CompilerParams`, is the path forward: the per-tile math and metadata here
carry over, the data movement becomes TMA copies into shared memory).

The fused kernel quantizes a row over all n/2 SwiGLU columns, which one program
cannot hold in registers for a large n. It runs in two phases: it writes each
float32 SwiGLU tile to a scratch output while keeping the running row amax,
then (after a barrier) reads the tiles back and writes the int8 codes. The
scratch costs 4 bytes per output element of extra traffic, small next to the
weights (e * k * n bytes) unless tokens per expert are in the thousands.

Roofline at the benchmark shape (m=4096, k=2048, n=2816, e=16, int8): 47.2 GFLOP
over ~106 MB of operands plus 23 MB of scratch traffic, ~365 FLOP/byte. An H100
SXM (~1979 dense int8 TOP/s, 3.35 TB/s; ridge ~590 FLOP/byte) would be memory
bound at ~39 us if operands stream once; the kernel re-reads each weight tile
once per row tile of its group (256 tokens per expert / block_m 64 = 4 times),
so expect ~0.1-0.15 ms without L2 reuse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltr

from npu_ops import operands, quant
from pallas_kernels import common
from pallas_kernels.common import TileSizes

_PARAMS = pltr.CompilerParams(num_warps=4, num_stages=2)


def gpu_tiles(tiles: TileSizes) -> tuple[int, int, int]:
  """Caps tiles at what fits a streaming multiprocessor's shared memory."""
  return min(tiles.block_m, 64), min(tiles.block_k, 128), min(tiles.block_n, 128)




def gmm_swiglu_quant(x: jax.Array, w: jax.Array, w_scale: jax.Array, x_scale: jax.Array,
                     ends: jax.Array, *, assist: jax.Array | None = None, tiles: TileSizes,
                     interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Fused op on canonical operands, A8W8 or (with `assist`) A8W4; arguments and
  results as `pallas_kernels.tpu.gmm_swiglu_quant`."""
  m, k = x.shape
  e, _, n = w.shape
  nh = n // 2
  groups = w_scale.shape[1]
  a8w4 = assist is not None
  bm, _, bn = gpu_tiles(tiles)
  bk = common.k_tile(k, groups, gpu_tiles(tiles)[1])
  xp = common.pad_2d(x, bm, bk)
  wp = common.pad_axis(common.pad_halves(w, bn), 1, bk)
  sp = common.pad_halves(w_scale.astype(jnp.float32), bn)  # [e, G, n]
  xsp = common.pad_axis(x_scale.astype(jnp.float32), 0, bm)
  mp, kp = xp.shape
  nhp = wp.shape[-1] // 2
  m_tiles, nh_tiles, k_tiles = mp // bm, nhp // bn, kp // bk
  k_per_group = k_tiles // groups
  first, stop = common.tile_group_ranges(ends, m_tiles, bm)
  if a8w4:
    colsum8 = operands.colsum8(w, groups)
    extra = [common.pad_halves(colsum8, bn), common.pad_halves(assist.astype(jnp.float32), bn)]
  else:
    extra = [jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.float32)]  # unused

  def kernel(first_ref, stop_ref, ends_ref, x_ref, w_ref, s_ref, xs_ref, cs_ref, a_ref,
             q_ref, qs_ref, scratch_ref):
    i = pl.program_id(0)  # read here: interpret mode has no program_id inside loops
    r0 = i * bm
    rows = pl.ds(r0, bm)
    x_scale_col = xs_ref[rows][:, None]

    def swiglu_tile(j, amax):
      cols_a, cols_g = pl.ds(j * bn, bn), pl.ds(nhp + j * bn, bn)

      def group(g, tile):
        def k_step(kk, accs):
          xb = x_ref[rows, pl.ds(kk * bk, bk)]
          dot = lambda cols: jnp.dot(xb, w_ref[g, pl.ds(kk * bk, bk), cols],
                                     preferred_element_type=jnp.int32)
          return accs[0] + dot(cols_a), accs[1] + dot(cols_g)

        zero = jnp.zeros((bm, bn), jnp.int32)
        if a8w4:  # close each k group in float32: s_g * ((x - 8)_g @ W_g)
          def k_group(kg, f):
            acc_a, acc_g = lax.fori_loop(kg * k_per_group, (kg + 1) * k_per_group, k_step,
                                         (zero, zero))
            close = lambda acc, cols: s_ref[g, kg, cols][None, :] * (
                acc - cs_ref[g, kg, cols][None, :]).astype(jnp.float32)
            return f[0] + close(acc_a, cols_a), f[1] + close(acc_g, cols_g)

          fzero = jnp.zeros((bm, bn), jnp.float32)
          f_a, f_g = lax.fori_loop(0, groups, k_group, (fzero, fzero))
          s = common.a8w4_swiglu(f_a, f_g, a_ref[g, cols_a][None, :], a_ref[g, cols_g][None, :],
                                 x_scale_col)
        else:
          acc_a, acc_g = lax.fori_loop(0, k_tiles, k_step, (zero, zero))
          s = common.dequant_swiglu(acc_a, acc_g, s_ref[g, 0, cols_a][None, :],
                                    s_ref[g, 0, cols_g][None, :], x_scale_col)
        return jnp.where(common.group_rows(ends_ref, g, r0, bm), s, tile)

      tile = lax.fori_loop(first_ref[i], stop_ref[i], group, jnp.zeros((bm, bn), jnp.float32))
      scratch_ref[rows, cols_a] = tile
      return jnp.maximum(amax, jnp.max(jnp.abs(tile), axis=1, keepdims=True))

    amax = lax.fori_loop(0, nh_tiles, swiglu_tile, jnp.zeros((bm, 1), jnp.float32))
    if not interpret:  # phase 2 reads tiles other threads wrote (interpret mode is sequential)
      pltr.debug_barrier()

    def quantize_tile(j, carry):
      cols = pl.ds(j * bn, bn)
      q_ref[rows, cols] = quant.codes_for_amax(scratch_ref[rows, cols], amax,
                                               round_fn=quant.round_half_even_small)
      return carry

    lax.fori_loop(0, nh_tiles, quantize_tile, 0)
    qs_ref[rows] = (amax / 127)[:, 0]  # rows of no group: amax = 0

  q, qs, _ = pl.pallas_call(
      kernel, grid=(m_tiles,),
      out_shape=[jax.ShapeDtypeStruct((mp, nhp), jnp.int8),
                 jax.ShapeDtypeStruct((mp,), jnp.float32),
                 jax.ShapeDtypeStruct((mp, nhp), jnp.float32)],
      compiler_params=_PARAMS, interpret=interpret,
      name="npu_gmm_swiglu_quant")(first, stop, ends, xp, wp, sp, xsp, *extra)
  return q[:m, :nh], qs[:m]


def gmm(lhs: jax.Array, rhs: jax.Array, ends: jax.Array, *, out_dtype, tiles: TileSizes,
        interpret: bool = False) -> jax.Array:
  """Float grouped matmul `[m, k] x [e, k, n] -> [m, n]`, float32 accumulation.
  Grid (row tile, column tile)."""
  m, k = lhs.shape
  n = rhs.shape[-1]
  bm, bk, bn = gpu_tiles(tiles)
  xp = common.pad_2d(lhs, bm, bk)
  wp = common.pad_axis(common.pad_axis(rhs, 1, bk), 2, bn)
  mp, kp = xp.shape
  k_tiles = kp // bk
  first, stop = common.tile_group_ranges(ends, mp // bm, bm)

  def kernel(first_ref, stop_ref, ends_ref, x_ref, w_ref, o_ref):
    i, j = pl.program_id(0), pl.program_id(1)
    rows, cols = pl.ds(i * bm, bm), pl.ds(j * bn, bn)

    def group(g, tile):
      def k_step(kk, acc):
        ks = pl.ds(kk * bk, bk)
        return acc + jnp.dot(x_ref[rows, ks], w_ref[g, ks, cols],
                             preferred_element_type=jnp.float32)

      acc = lax.fori_loop(0, k_tiles, k_step, jnp.zeros((bm, bn), jnp.float32))
      return jnp.where(common.group_rows(ends_ref, g, i * bm, bm), acc, tile)

    tile = lax.fori_loop(first_ref[i], stop_ref[i], group, jnp.zeros((bm, bn), jnp.float32))
    o_ref[rows, cols] = tile.astype(o_ref.dtype)

  out = pl.pallas_call(
      kernel, grid=(mp // bm, wp.shape[-1] // bn),
      out_shape=jax.ShapeDtypeStruct((mp, wp.shape[-1]), out_dtype),
      compiler_params=_PARAMS, interpret=interpret, name="npu_gmm")(first, stop, ends, xp, wp)
  return out[:m, :n]


def tgmm(lhs: jax.Array, rhs: jax.Array, ends: jax.Array, *, num_groups: int, out_dtype,
         tiles: TileSizes, interpret: bool = False) -> jax.Array:
  """k-grouped matmul `out[g] = lhs[rows of g]^T @ rhs[rows of g]`: `[g, k, n]`.
  Grid (group, k tile, column tile); each program loops over its group's row tiles."""
  m, k = lhs.shape
  n = rhs.shape[-1]
  bm, bk, bn = gpu_tiles(tiles)
  xp = common.pad_2d(lhs, bm, bk)
  dyp = common.pad_2d(rhs, bm, bn)
  kp, np_ = xp.shape[1], dyp.shape[1]
  groups = ends.shape[0]

  def kernel(ends_ref, x_ref, dy_ref, o_ref):
    g, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    ks, cols = pl.ds(i * bk, bk), pl.ds(j * bn, bn)
    start = jnp.where(g > 0, ends_ref[jnp.maximum(g - 1, 0)], 0)
    end = ends_ref[g]

    def row_tile(r, acc):
      r0 = r * bm
      xb = jnp.where(common.group_rows(ends_ref, g, r0, bm), x_ref[pl.ds(r0, bm), ks],
                     jnp.zeros((), x_ref.dtype))
      return acc + lax.dot_general(xb, dy_ref[pl.ds(r0, bm), cols], (((0,), (0,)), ((), ())),
                                   preferred_element_type=jnp.float32)

    tiles_end = jnp.where(end > start, (end - 1) // bm + 1, start // bm)
    acc = lax.fori_loop(start // bm, tiles_end, row_tile, jnp.zeros((bk, bn), jnp.float32))
    o_ref[g, ks, cols] = acc.astype(o_ref.dtype)

  out = pl.pallas_call(
      kernel, grid=(groups, kp // bk, np_ // bn),
      out_shape=jax.ShapeDtypeStruct((groups, kp, np_), out_dtype),
      compiler_params=_PARAMS, interpret=interpret, name="npu_tgmm")(ends, xp, dyp)
  return jnp.pad(out[:, :k, :n], ((0, num_groups - groups), (0, 0), (0, 0)))
