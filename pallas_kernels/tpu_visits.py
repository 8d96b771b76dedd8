"""The TPU kernels' group metadata, computed on the TensorCore's scalar unit.

`common.row_visits` (+ `common.weight_runs`) and `common.visit_metadata` as jnp give the
visits of a kernel's grid through ~40 small integer ops, which XLA compiles for a TPU as
long as it compiles a whole `jax.lax.ragged_dot` program; here each is one Pallas kernel
without a grid, its operands and results in SMEM, that lays the visits out in scalar
loops, a third of that compile (docs/performance.md, "Compile time"). The values are
`common`'s, bit for bit (`tests/test_pallas.py`); the GPU kernels keep `common`'s. Every
write is guarded by its array's bound, so a kernel writes nothing past it whatever `ends`
holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common

_SMEM = pl.BlockSpec(memory_space=pltpu.SMEM)
ROW_VISITS, TGMM_VISITS = "npu_row_visits", "npu_tgmm_visits"
KERNEL_NAMES = (ROW_VISITS, TGMM_VISITS)  # kernels that only compute metadata


def _lay_out(span, spans, m_tiles: int, block_m: int, bound: int, group_ref, tile_ref, *,
             visit_empty: bool = False):
  """Writes the visits of the spans `span(i) = (lo, hi)` (rows [lo, hi), i < `spans`,
  in row order) into group_ref / tile_ref: one per row tile a span touches (an empty span
  none, or one with `visit_empty`), then the last visit repeated up to `bound`. Returns the
  visit count (at most `bound`: later visits are dropped). Without visits, every visit is
  the last span's first tile, as `common.visit_metadata` gives it."""
  def first_tile(lo):
    # lax.div truncates: on these non-negative operands it floors without jnp's sign
    # fix-up, which would ask the lowering's device for its TPU generation (AOT)
    return jnp.minimum(lax.div(jnp.maximum(lo, 0), block_m), m_tiles - 1)
  group_ref[0] = spans - 1
  tile_ref[0] = first_tile(span(spans - 1)[0])

  def per_span(i, t):
    lo, hi = span(i)
    first = first_tile(lo)
    last = lax.div(jnp.maximum(hi - 1, 0), block_m)
    n = jnp.where(hi > lo, last - first + 1, 1 if visit_empty else 0)

    def put(j, t):
      @pl.when(t < bound)
      def _():
        group_ref[t] = i
        tile_ref[t] = first + j
      return t + 1
    return lax.fori_loop(0, n, put, t)
  count = jnp.minimum(lax.fori_loop(0, spans, per_span, 0), bound)
  last = jnp.maximum(count - 1, 0)

  def pad(t, carry):
    group_ref[t] = group_ref[last]
    tile_ref[t] = tile_ref[last]
    return carry
  lax.fori_loop(jnp.maximum(count, 1), bound, pad, 0)
  return count


def row_visits(ends: jax.Array, m: int, block_m: int, start: jax.Array | None = None, *,
               interpret: bool = False) -> tuple[common.RowVisits, common.WeightRuns]:
  """`common.row_visits(ends, m, block_m, start)` (one core) and its `common.weight_runs`:
  one scalar kernel."""
  num_groups = ends.shape[0]
  m_tiles = common.cdiv(m, block_m)
  bound = common.per_core(m, block_m, num_groups)

  def kernel(start_ref, ends_ref, group_ref, tile_ref, count_ref, weight_ref, read_ref,
             bounds_ref, run_ref, expert_ref):
    # bounds: [start, ends..., m]; span i (0: head, 1..G: the groups, G + 1: tail) ends at
    # bounds[i] and starts where the one before it ends
    bounds_ref[0] = start_ref[0]

    def copy_end(g, carry):
      bounds_ref[g + 1] = ends_ref[g]
      return carry
    lax.fori_loop(0, num_groups, copy_end, 0)
    bounds_ref[num_groups + 1] = m
    span = lambda i: (jnp.where(i > 0, bounds_ref[jnp.maximum(i - 1, 0)], 0), bounds_ref[i])
    count = _lay_out(span, num_groups + 2, m_tiles, block_m, bound, group_ref, tile_ref)
    count_ref[0] = count

    def real(t):
      g = group_ref[t]
      return (g >= 1) & (g <= num_groups) & (t < count)

    # weight and read_tile: those of the visit itself if real, else of the nearest real
    # visit before it, else of the first after it (weight_ref holds the former meanwhile)
    def forward(t, before):
      before = jnp.where(real(t), t, before)
      weight_ref[t] = before
      return before
    lax.fori_loop(0, bound, forward, -1)

    def backward(i, after):
      t = bound - 1 - i
      after = jnp.where(real(t), t, after)
      before = weight_ref[t]
      src = jnp.where(real(t), t, jnp.where(before >= 0, before, jnp.minimum(after, bound - 1)))
      weight_ref[t] = jnp.clip(group_ref[src] - 1, 0, max(num_groups - 1, 0))
      read_ref[t] = tile_ref[src]
      return after
    lax.fori_loop(0, bound, backward, bound)

    # runs of visits reading one expert: a run starts at visit 0 and where it changes
    def clear(r, carry):
      expert_ref[r] = -1
      return carry
    lax.fori_loop(0, bound, clear, 0)

    def runs(t, started):
      w = weight_ref[t]
      first = ((t == 0) | (w != weight_ref[jnp.maximum(t - 1, 0)])) & (t < count)
      started = started + first.astype(jnp.int32)
      run = jnp.maximum(started - 1, 0)
      run_ref[t] = run

      @pl.when(first)
      def _():
        expert_ref[run] = w
      return started
    lax.fori_loop(0, bound, runs, 0)

  head = jnp.zeros((1,), jnp.int32) if start is None else jnp.reshape(start, (1,))
  sizes = (bound, bound, 1, bound, bound, num_groups + 2, bound, bound)
  out = pl.pallas_call(
      kernel, out_shape=[common.result((s,), jnp.int32, head, ends) for s in sizes],
      in_specs=[_SMEM, _SMEM], out_specs=[_SMEM] * len(sizes), interpret=interpret,
      name=ROW_VISITS)(head.astype(jnp.int32), ends.astype(jnp.int32))
  return common.RowVisits(*out[:6]), common.WeightRuns(*out[6:])


def visit_metadata(ends: jax.Array, num_groups: int, m_tiles: int, block_m: int,
                   start: jax.Array | None = None, *, interpret: bool = False
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """tgmm's visits: `common.visit_metadata(ends_all, m_tiles, block_m, visit_empty=True,
  first=start)` where `ends_all` is `ends` followed by empty groups up to `num_groups`;
  and the groups' bounds `[start, ends_all...]` (group g's rows are [bounds[g],
  bounds[g + 1])). Returns (group_ids, m_tile_ids, num_visits [1], bounds)."""
  groups = ends.shape[0]
  bound = m_tiles + num_groups - 1

  def kernel(start_ref, ends_ref, group_ref, tile_ref, count_ref, bounds_ref):
    bounds_ref[0] = start_ref[0]

    def copy_end(g, carry):
      bounds_ref[g + 1] = ends_ref[jnp.minimum(g, groups - 1)]
      return carry
    lax.fori_loop(0, num_groups, copy_end, 0)
    span = lambda g: (bounds_ref[g], bounds_ref[g + 1])
    count_ref[0] = _lay_out(span, num_groups, m_tiles, block_m, bound, group_ref, tile_ref,
                            visit_empty=True)

  head = jnp.zeros((1,), jnp.int32) if start is None else jnp.reshape(start, (1,))
  sizes = (bound, bound, 1, num_groups + 1)
  group, tile, count, bounds = pl.pallas_call(
      kernel, out_shape=[common.result((s,), jnp.int32, head, ends) for s in sizes],
      in_specs=[_SMEM, _SMEM], out_specs=[_SMEM] * len(sizes), interpret=interpret,
      name=TGMM_VISITS)(head.astype(jnp.int32), ends.astype(jnp.int32))
  return group, tile, count, bounds
