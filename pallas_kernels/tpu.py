"""TPU (Mosaic) kernels: the fused A8W8 grouped matmul + SwiGLU + per-token quant,
and the float grouped matmuls `gmm` / `tgmm` used by the differentiation rules.

Group metadata travels by scalar prefetch (`common.visit_metadata`, megablox's
technique): the grid walks (row tile, group) visits, so a row tile shared by two
groups is visited twice, consecutively, with its output block resident in VMEM;
each visit writes only its group's rows. Row tiles outside every group are never
visited (the wrappers zero them). All grid axes are "arbitrary": consecutive
visits accumulate into the same output block.

Roofline of the fused kernel at the benchmark shape (m=4096, k=2048, n=2816,
e=16, int8): 2 * m * k * n = 47.2 GFLOP (row tiles shared by two groups add at
most e - 1 tile visits, 1.5% here); operands once: x 8.4 MB + every expert's
weights 92.3 MB + outputs 5.8 MB = 106 MB, about 445 FLOP/byte. A TPU v5e
(394 int8 TOP/s, 819 GB/s; ridge 481 FLOP/byte) would need 0.12 ms of MXU time
and 0.13 ms of HBM time on paper. The grid fetches an expert's weight tiles once
per row tile of its group: with 256 tokens per expert and block_m = 128 that
is twice (~200 MB), so expect HBM-bound ~0.25 ms unless block_m grows towards
the tokens per expert (`tuning_config[0]`; VMEM holds a [block_m, n/2] float32
row buffer). With few tokens per expert it is weight-streaming bound
(m=512, e=64: 5.9 GFLOP over 369 MB, 16 FLOP/byte).
"""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from npu_ops import operands, quant
from pallas_kernels import common
from pallas_kernels.common import TileSizes

_ARBITRARY = pltpu.CompilerParams(dimension_semantics=("arbitrary",) * 3)


def _first_visit_of_tile(mt_ref, t):
  return (t == 0) | (mt_ref[jnp.maximum(t - 1, 0)] != mt_ref[t])


def gmm_swiglu_quant(x: jax.Array, w: jax.Array, w_scale: jax.Array, x_scale: jax.Array,
                     ends: jax.Array, *, assist: jax.Array | None = None, tiles: TileSizes,
                     interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Fused op on canonical operands: A8W8, or A8W4 when `assist` is given.

  Args:
    x: int8 `[m, k]`; w: int8 values `[e, k, n]` (ND; int4 values for A8W4);
    w_scale: float32 `[e, G, n]` (G = 1 per channel; A8W4 may have G groups of
      k/G rows, a multiple of 128); x_scale: float32 `[m]`; ends: int32 `[E]`
      group row ends, E <= e; assist: A8W4's float32 `[e, n]` assist matrix.
    tiles: block sizes; interpret: run in Pallas interpret mode (any backend).

  Returns:
    (q int8 `[m, n/2]`, scale float32 `[m]`), rows past the last end 0.

  Grid (visit, column tile j of the n/2 SwiGLU outputs, k tile): each step
  multiplies the x tile by the matching column tiles of both halves of W (j and
  j + n/2), so the activation is computed in the kernel. A8W4 closes each k
  group in float32 (`s_g * (x_g @ W_g - 8 * colsum_g)`, exact in int32 before
  the scale), as the XLA path does. A row's amax spans all n/2 columns, so the
  SwiGLU tile lands in a `[block_m, n/2]` float32 VMEM row buffer, and the
  visit's last step quantizes the whole row block at once.
  """
  m, k = x.shape
  e, _, n = w.shape
  nh = n // 2
  groups = w_scale.shape[1]
  a8w4 = assist is not None
  bn = tiles.block_n
  bm = _fit_row_buffer(tiles.block_m, common.round_up(nh, bn))
  bk = common.k_tile(k, groups, tiles.block_k)
  xp = common.pad_2d(x, bm, bk)
  wp = common.pad_axis(common.pad_halves(w, bn), 1, bk)
  sp = common.pad_halves(w_scale.astype(jnp.float32), bn)[:, :, None, :]  # [e, G, 1, n]
  xsp = common.pad_axis(x_scale.astype(jnp.float32), 0, bm)[:, None]
  mp, kp = xp.shape
  nhp = wp.shape[-1] // 2
  m_tiles, nh_tiles, k_tiles = mp // bm, nhp // bn, kp // bk
  # The scale group of each k tile, as a table: integer division does not lower
  # for TPU without a TPU at hand. (groups > 1 only when k is a multiple of 128 * groups.)
  k_group = jnp.asarray(np.arange(k_tiles) // (k_tiles // groups), jnp.int32)
  gid, mt, nv = common.visit_metadata(ends, m_tiles, bm)
  extra = []
  if a8w4:
    extra = [common.pad_halves(operands.colsum8(w, groups), bn)[:, :, None, :],
             common.pad_halves(assist, bn)[:, None, :]]

  def kernel(gid_ref, mt_ref, nv_ref, ends_ref, kg_ref, x_ref, wa_ref, wg_ref, sa_ref, sg_ref,
             xs_ref, *refs):
    if a8w4:
      ca_ref, cg_ref, aa_ref, ag_ref, q_ref, qs_ref, acc_a, acc_g, f_a, f_g, s_rows = refs
    else:
      q_ref, qs_ref, acc_a, acc_g, s_rows = refs
    t, j, kk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    valid = t < nv_ref[0]
    group_starts = (kk == 0) | (kg_ref[jnp.maximum(kk - 1, 0)] != kg_ref[kk])
    group_ends = (kk == k_tiles - 1) | (kg_ref[jnp.minimum(kk + 1, k_tiles - 1)] != kg_ref[kk])

    @pl.when(valid & _first_visit_of_tile(mt_ref, t) & (j == 0) & (kk == 0))
    def _():
      q_ref[...] = jnp.zeros_like(q_ref)
      qs_ref[...] = jnp.zeros_like(qs_ref)

    @pl.when(valid & group_starts)
    def _():
      acc_a[...] = jnp.zeros_like(acc_a)
      acc_g[...] = jnp.zeros_like(acc_g)

    @pl.when(valid)
    def _():
      xb = x_ref[...]
      acc_a[...] += jnp.dot(xb, wa_ref[...], preferred_element_type=jnp.int32)
      acc_g[...] += jnp.dot(xb, wg_ref[...], preferred_element_type=jnp.int32)

    if a8w4:  # close a k group: s_g * ((x - 8)_g @ W_g), the int32 part exact
      @pl.when(valid & (kk == 0))
      def _():
        f_a[...] = jnp.zeros_like(f_a)
        f_g[...] = jnp.zeros_like(f_g)

      @pl.when(valid & group_ends)
      def _():
        f_a[...] += sa_ref[...] * (acc_a[...] - ca_ref[...]).astype(jnp.float32)
        f_g[...] += sg_ref[...] * (acc_g[...] - cg_ref[...]).astype(jnp.float32)

    @pl.when(valid & (kk == k_tiles - 1))
    def _():
      if a8w4:
        s = common.a8w4_swiglu(f_a[...], f_g[...], aa_ref[...], ag_ref[...], xs_ref[...])
      else:
        s = common.dequant_swiglu(acc_a[...], acc_g[...], sa_ref[...], sg_ref[...], xs_ref[...])
      s_rows[:, pl.ds(pl.multiple_of(j * bn, bn), bn)] = s

    @pl.when(valid & (kk == k_tiles - 1) & (j == nh_tiles - 1))
    def _():
      s = s_rows[...]
      amax = jnp.max(jnp.abs(s), axis=1, keepdims=True)
      rows = common.group_rows(ends_ref, gid_ref[t], mt_ref[t] * bm, bm)
      q_ref[...] = jnp.where(rows, quant.codes_for_amax(s, amax), q_ref[...])
      qs_ref[...] = jnp.where(rows, amax / 127, qs_ref[...])

  row = lambda t, j, kk, gid, mt, nv, ends, kg: (mt[t], 0)
  act = lambda t, j, kk, gid, mt, nv, ends, kg: (gid[t], kg[kk], 0, j)
  gate = lambda t, j, kk, gid, mt, nv, ends, kg: (gid[t], kg[kk], 0, j + nh_tiles)
  in_specs = [
      pl.BlockSpec((bm, bk), lambda t, j, kk, gid, mt, nv, ends, kg: (mt[t], kk)),
      pl.BlockSpec((None, bk, bn), lambda t, j, kk, gid, mt, nv, ends, kg: (gid[t], kk, j)),
      pl.BlockSpec((None, bk, bn),
                   lambda t, j, kk, gid, mt, nv, ends, kg: (gid[t], kk, j + nh_tiles)),
      pl.BlockSpec((None, None, 1, bn), act), pl.BlockSpec((None, None, 1, bn), gate),
      pl.BlockSpec((bm, 1), row)]
  scratch = [pltpu.VMEM((bm, bn), jnp.int32), pltpu.VMEM((bm, bn), jnp.int32)]
  if a8w4:
    in_specs += [pl.BlockSpec((None, None, 1, bn), act), pl.BlockSpec((None, None, 1, bn), gate),
                 pl.BlockSpec((None, 1, bn),
                              lambda t, j, kk, gid, mt, nv, ends, kg: (gid[t], 0, j)),
                 pl.BlockSpec((None, 1, bn),
                              lambda t, j, kk, gid, mt, nv, ends, kg: (gid[t], 0, j + nh_tiles))]
    scratch += [pltpu.VMEM((bm, bn), jnp.float32), pltpu.VMEM((bm, bn), jnp.float32)]
  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=5, grid=(gid.shape[0], nh_tiles, k_tiles), in_specs=in_specs,
      out_specs=[pl.BlockSpec((bm, nhp), row), pl.BlockSpec((bm, 1), row)],
      scratch_shapes=scratch + [pltpu.VMEM((bm, nhp), jnp.float32)])
  cost = pl.CostEstimate(flops=2 * m * k * n, transcendentals=m * nh,
                         bytes_accessed=x.size + w.size + 4 * w_scale.size + 5 * m + m * nh)
  args = [xp, wp, wp, sp, sp, xsp] + ([extra[0], extra[0], extra[1], extra[1]] if a8w4 else [])
  q, qs = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=[jax.ShapeDtypeStruct((mp, nhp), jnp.int8),
                 jax.ShapeDtypeStruct((mp, 1), jnp.float32)],
      compiler_params=_ARBITRARY, cost_estimate=cost, interpret=interpret,
      name="npu_gmm_swiglu_quant")(gid, mt, nv, ends, k_group, *args)
  return _zero_rows_past_total(q[:m, :nh], qs[:m, 0], ends)




# VMEM for the fused kernel's row buffer (float32) and its int8 output block (double
# buffered): 6 bytes per row and SwiGLU column. 8 MiB leaves room for the weight tiles
# within the 16 MiB default scoped VMEM of v4/v5e.
_ROW_BUFFER_BYTES = 8 * 2**20


def _fit_row_buffer(block_m: int, n_half: int) -> int:
  """Halves block_m (down to 32 rows) until the `[block_m, n/2]` buffers fit."""
  while block_m > 32 and block_m * n_half * 6 > _ROW_BUFFER_BYTES:
    block_m //= 2
  return block_m


def _zero_rows_past_total(q, qs, ends):
  """Rows past the last group end were never visited: make them 0 (SPEC A.3 item 1)."""
  inside = jnp.arange(q.shape[0]) < ends[-1]
  return jnp.where(inside[:, None], q, 0), jnp.where(inside, qs, 0)


def gmm(lhs: jax.Array, rhs: jax.Array, ends: jax.Array, *, out_dtype, tiles: TileSizes,
        interpret: bool = False) -> jax.Array:
  """Float grouped matmul `[m, k] x [e, k, n] -> [m, n]`, float32 accumulation.

  Grid (column tile, visit, k tile): column tiles outermost, so the visits of
  one row tile (one per group in it) are consecutive and share the resident
  output block.
  """
  m, k = lhs.shape
  n = rhs.shape[-1]
  bm, bn = tiles.block_m, tiles.block_n
  bk = min(tiles.block_k, common.round_up(k, 128))
  xp = common.pad_2d(lhs, bm, bk)
  wp = common.pad_axis(common.pad_axis(rhs, 1, bk), 2, bn)
  mp, kp = xp.shape
  n_tiles, k_tiles = wp.shape[-1] // bn, kp // bk
  gid, mt, nv = common.visit_metadata(ends, mp // bm, bm)

  def kernel(gid_ref, mt_ref, nv_ref, ends_ref, x_ref, w_ref, o_ref, acc):
    t, kk = pl.program_id(1), pl.program_id(2)
    valid = t < nv_ref[0]

    @pl.when(valid & _first_visit_of_tile(mt_ref, t) & (kk == 0))
    def _():
      o_ref[...] = jnp.zeros_like(o_ref)

    @pl.when(valid & (kk == 0))
    def _():
      acc[...] = jnp.zeros_like(acc)

    @pl.when(valid)
    def _():
      acc[...] += jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)

    @pl.when(valid & (kk == k_tiles - 1))
    def _():
      rows = common.group_rows(ends_ref, gid_ref[t], mt_ref[t] * bm, bm)
      o_ref[...] = jnp.where(rows, acc[...].astype(o_ref.dtype), o_ref[...])

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=(n_tiles, gid.shape[0], k_tiles),
      in_specs=[pl.BlockSpec((bm, bk), lambda j, t, kk, gid, mt, nv, ends: (mt[t], kk)),
                pl.BlockSpec((None, bk, bn), lambda j, t, kk, gid, mt, nv, ends: (gid[t], kk, j))],
      out_specs=pl.BlockSpec((bm, bn), lambda j, t, kk, gid, mt, nv, ends: (mt[t], j)),
      scratch_shapes=[pltpu.VMEM((bm, bn), jnp.float32)])
  isz = lhs.dtype.itemsize
  cost = pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                         bytes_accessed=isz * (lhs.size + rhs.size) + m * n * 4)
  out = pl.pallas_call(
      kernel, grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((mp, wp.shape[-1]), out_dtype),
      compiler_params=_ARBITRARY, cost_estimate=cost, interpret=interpret,
      name="npu_gmm")(gid, mt, nv, ends, xp, wp)[:m, :n]
  return jnp.where((jnp.arange(m) < ends[-1])[:, None], out, 0)


def tgmm(lhs: jax.Array, rhs: jax.Array, ends: jax.Array, *, num_groups: int, out_dtype,
         tiles: TileSizes, interpret: bool = False) -> jax.Array:
  """k-grouped matmul `out[g] = lhs[rows of g]^T @ rhs[rows of g]`: `[g, k, n]`.

  Grid (k tile, column tile, visit): the visits of one group are consecutive and
  accumulate into one float32 VMEM tile, written on the group's last visit.
  """
  m, k = lhs.shape
  n = rhs.shape[-1]
  bm, bn = tiles.block_m, tiles.block_n
  bk = min(tiles.block_k, common.round_up(k, 128))
  xp = common.pad_2d(lhs, bm, bk)
  dyp = common.pad_2d(rhs, bm, bn)
  kp, np_ = xp.shape[1], dyp.shape[1]
  gid, mt, nv = common.visit_metadata(ends, xp.shape[0] // bm, bm)

  def kernel(gid_ref, mt_ref, nv_ref, ends_ref, x_ref, dy_ref, o_ref, acc):
    t = pl.program_id(2)
    valid = t < nv_ref[0]
    g = gid_ref[t]

    @pl.when(valid & ((t == 0) | (gid_ref[jnp.maximum(t - 1, 0)] != g)))
    def _():
      acc[...] = jnp.zeros_like(acc)

    @pl.when(valid)
    def _():
      rows = common.group_rows(ends_ref, g, mt_ref[t] * bm, bm)
      xb = jnp.where(rows, x_ref[...], jnp.zeros((), x_ref.dtype))
      acc[...] += lax.dot_general(xb, dy_ref[...], (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)

    last = (t == nv_ref[0] - 1) | (gid_ref[jnp.minimum(t + 1, pl.num_programs(2) - 1)] != g)

    @pl.when(valid & last)
    def _():
      o_ref[...] = acc[...].astype(o_ref.dtype)

  grid_spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=4,
      grid=(kp // bk, np_ // bn, gid.shape[0]),
      in_specs=[pl.BlockSpec((bm, bk), lambda i, j, t, gid, mt, nv, ends: (mt[t], i)),
                pl.BlockSpec((bm, bn), lambda i, j, t, gid, mt, nv, ends: (mt[t], j))],
      out_specs=pl.BlockSpec((None, bk, bn), lambda i, j, t, gid, mt, nv, ends: (gid[t], i, j)),
      scratch_shapes=[pltpu.VMEM((bk, bn), jnp.float32)])
  isz = lhs.dtype.itemsize
  cost = pl.CostEstimate(flops=2 * m * k * n, transcendentals=0,
                         bytes_accessed=isz * (lhs.size + rhs.size) + 4 * num_groups * k * n)
  groups = ends.shape[0]
  out = pl.pallas_call(
      kernel, grid_spec=grid_spec,
      out_shape=jax.ShapeDtypeStruct((groups, kp, np_), out_dtype),
      compiler_params=_ARBITRARY, cost_estimate=cost, interpret=interpret,
      name="npu_tgmm")(gid, mt, nv, ends, xp, dyp)[:, :k, :n]
  # Groups without rows were never visited; groups past len(ends) have none.
  nonempty = ends > common.starts_of(ends)
  out = jnp.where(nonempty[:, None, None], out, 0)
  return jnp.pad(out, ((0, num_groups - groups), (0, 0), (0, 0)))
