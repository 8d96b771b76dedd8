"""The TPU kernels' group metadata, computed on the TensorCore's scalar unit.

`common.row_visits` and `common.visit_metadata` as jnp (the GPU kernels') give the visits of
a kernel's grid through ~40 small integer ops, which XLA compiles for a TPU as long as it
compiles a whole `jax.lax.ragged_dot` program; here each is one Pallas kernel without a
grid, its operands and results in SMEM, that lays the visits out in scalar loops, a third
of that compile (docs/performance.md, "Compile time"), with the weight runs of the kernels
that copy their weights by hand; a v5p's two TensorCores are dealt the visits by one more
(`two_cores`). The values are `common`'s, bit for bit, and NumPy's from the definitions
(`tests/test_pallas.py`). Every write is guarded by its array's bound, so a kernel writes
nothing past it whatever `ends` holds.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common

_SMEM = pl.BlockSpec(memory_space=pltpu.SMEM)
ROW_VISITS, TGMM_VISITS, TWO_CORES = "npu_row_visits", "npu_tgmm_visits", "npu_two_core_visits"
KERNEL_NAMES = (ROW_VISITS, TGMM_VISITS, TWO_CORES)  # kernels that only compute metadata


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


def _lay_out_steps(tile, count, bound: int, m_tiles: int, first_ref, steps_ref, core=0
                   ) -> None:
  """Writes `common.TileSteps` of the `count` visits whose row tiles `tile(t)` gives (of
  `bound`): core `core`'s, at `first_ref[core * (m_tiles + 1):]` and `steps_ref[core]`."""
  base = core * (m_tiles + 1)

  def step(t, s):  # a step starts at visit 0 and where the row tile changes
    new = (t < count) & ((t == 0) | (tile(t) != tile(jnp.maximum(t - 1, 0))))

    @pl.when(new & (s < m_tiles))
    def _():
      first_ref[base + s] = t
    return s + new.astype(jnp.int32)
  steps = jnp.minimum(lax.fori_loop(0, bound, step, 0), m_tiles)
  steps_ref[core] = steps

  def close(s, carry):  # past the last step: the visit count
    first_ref[base + s] = count
    return carry
  lax.fori_loop(steps, m_tiles + 1, close, 0)


def row_visits(ends: jax.Array, m: int, block_m: int, start: jax.Array | None = None, *,
               interpret: bool = False
               ) -> tuple[common.RowVisits, common.WeightRuns, common.TileSteps]:
  """`common.row_visits(ends, m, block_m, start)` (one core), its weight runs
  (`common.WeightRuns`: a run starts at visit 0 and where the expert changes) and a step
  per row tile (`common.TileSteps`): one scalar kernel."""
  num_groups = ends.shape[0]
  m_tiles = common.cdiv(m, block_m)
  bound = common.per_core(m, block_m, num_groups)

  def kernel(start_ref, ends_ref, group_ref, tile_ref, count_ref, weight_ref, read_ref,
             bounds_ref, run_ref, expert_ref, first_ref, steps_ref):
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
    _lay_out_steps(lambda t: tile_ref[t], count, bound, m_tiles, first_ref, steps_ref)

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
  sizes = (bound, bound, 1, bound, bound, num_groups + 2, bound, bound, m_tiles + 1, 1)
  out = pl.pallas_call(
      kernel, out_shape=[common.result((s,), jnp.int32, head, ends) for s in sizes],
      in_specs=[_SMEM, _SMEM], out_specs=[_SMEM] * len(sizes), interpret=interpret,
      name=ROW_VISITS)(head.astype(jnp.int32), ends.astype(jnp.int32))
  return common.RowVisits(*out[:6]), common.WeightRuns(*out[6:8]), common.TileSteps(*out[8:])


def visit_metadata(ends: jax.Array, num_groups: int, m_tiles: int, block_m: int,
                   start: jax.Array | None = None, *, interpret: bool = False
                   ) -> tuple[jax.Array, ...]:
  """tgmm's visits: `common.visit_metadata(ends_all, m_tiles, block_m, visit_empty=True,
  first=start)` where `ends_all` is `ends` followed by empty groups up to `num_groups`;
  the groups' bounds `[start, ends_all...]` (group g's rows are [bounds[g],
  bounds[g + 1])); and a step per row tile the visits touch (`common.TileSteps`).
  Returns (group_ids, m_tile_ids, num_visits [1], bounds, first [m_tiles + 1],
  num_steps [1])."""
  groups = ends.shape[0]
  bound = m_tiles + num_groups - 1

  def kernel(start_ref, ends_ref, group_ref, tile_ref, count_ref, bounds_ref, first_ref,
             steps_ref):
    bounds_ref[0] = start_ref[0]

    def copy_end(g, carry):
      bounds_ref[g + 1] = ends_ref[jnp.minimum(g, groups - 1)]
      return carry
    lax.fori_loop(0, num_groups, copy_end, 0)
    span = lambda g: (bounds_ref[g], bounds_ref[g + 1])
    count = _lay_out(span, num_groups, m_tiles, block_m, bound, group_ref, tile_ref,
                     visit_empty=True)
    count_ref[0] = count
    _lay_out_steps(lambda t: tile_ref[t], count, bound, m_tiles, first_ref, steps_ref)

  head = jnp.zeros((1,), jnp.int32) if start is None else jnp.reshape(start, (1,))
  sizes = (bound, bound, 1, num_groups + 1, m_tiles + 1, 1)
  return tuple(pl.pallas_call(
      kernel, out_shape=[common.result((s,), jnp.int32, head, ends) for s in sizes],
      in_specs=[_SMEM, _SMEM], out_specs=[_SMEM] * len(sizes), interpret=interpret,
      name=TGMM_VISITS)(head.astype(jnp.int32), ends.astype(jnp.int32)))


def two_cores(one: common.RowVisits, m: int, block_m: int, *, by_visits: bool,
              mxu_rows: int = 128, interpret: bool = False
              ) -> tuple[common.RowVisits, common.WeightRuns, common.TileSteps, int,
                         jax.Array | None]:
  """One core's visits `one` (`row_visits`) dealt to a v5p's two TensorCores, with each
  core's weight runs and steps (`TileSteps` of 2 cores: core c's `first` at
  `c * (m_tiles + 1)`, its step count at `count[c]`); one scalar kernel.

  Prefill (`by_visits` False): core 0 takes row tiles `[0, cut)`, core 1 the rest, each
  its visits in row order, cut where their MXU work is most even: a visit passes its rows
  through the MXU `mxu_rows` at a time, one pass at least, so many small groups weigh
  more than their rows. Each core gets a row tile at least (`m` spans two or more), and
  a run of `common.per_core(m, block_m, G, 2)` visits, its last repeated. Decode
  (`by_visits`, fewer row tiles than groups): the visits are cut at the group start
  nearest the middle; a row tile can then hold rows of both cores' groups, so each core
  writes its own output and `row`, the first row of core 1's groups, says whose.

  Returns (visits `RowVisits` of 2 cores, `WeightRuns`, `TileSteps`, per_core, row: an
  int32 scalar, None for prefill)."""
  num_groups = one.bounds.shape[0] - 2
  m_tiles = common.cdiv(m, block_m)
  bound = one.group.shape[0]
  if by_visits:
    per = min(bound, common.cdiv(bound, 2) + m_tiles)
  else:
    if m_tiles < 2:
      raise ValueError(f"cores: expected 2 over 2 row tiles at least; got {m_tiles} tiles")
    per = common.per_core(m, block_m, num_groups, 2)

  def kernel(group_ref, tile_ref, count_ref, weight_ref, read_ref, bounds_ref,
             group2, tile2, count2, weight2, read2, run_ref, expert_ref, row_ref, first_ref,
             steps_ref, per_tile):
    n = count_ref[0]
    if by_visits:  # the first visit of a group nearest the middle, else none (count)
      def nearest(t, best):
        at, dist = best
        starts = (t > 0) & (t < n) & (group_ref[t] != group_ref[jnp.maximum(t - 1, 0)])
        d = jnp.where(starts, jnp.abs(2 * t - n), 4 * bound)
        closer = d < dist
        return jnp.where(closer, t, at), jnp.where(closer, d, dist)
      at, dist = lax.fori_loop(0, bound, nearest, (0, 4 * bound + 1))
      first = jnp.where(dist < 4 * bound, at, n)
      g1 = group_ref[jnp.minimum(first, bound - 1)]
      row_ref[0] = jnp.where(first < n, jnp.where(g1 > 0, bounds_ref[jnp.maximum(g1 - 1, 0)], 0),
                             bounds_ref[num_groups + 1])
    else:  # row tiles [0, cut) to core 0, where the MXU passes are most even
      def clear(i, carry):
        per_tile[i] = 0
        return carry
      lax.fori_loop(0, m_tiles, clear, 0)

      def count_passes(t, total):
        g, tl = group_ref[t], tile_ref[t]
        lo = jnp.maximum(jnp.where(g > 0, bounds_ref[jnp.maximum(g - 1, 0)], 0), tl * block_m)
        hi = jnp.minimum(bounds_ref[jnp.minimum(g, num_groups + 1)], (tl + 1) * block_m)
        passes = jnp.maximum(lax.div(jnp.maximum(hi - lo, 0) + mxu_rows - 1, mxu_rows), 1)
        passes = jnp.where((t < n) & (g >= 1) & (g <= num_groups), passes, 0)
        per_tile[tl] = per_tile[tl] + passes
        return total + passes
      total = lax.fori_loop(0, bound, count_passes, 0)

      def best_cut(c, state):
        done, cut, cost = state
        done = done + per_tile[c - 1]
        here = jnp.maximum(done, total - done)
        better = here < cost
        return done, jnp.where(better, c, cut), jnp.where(better, here, cost)
      _, cut, _ = lax.fori_loop(1, m_tiles, best_cut, (0, 1, jnp.iinfo(jnp.int32).max))
      first = lax.fori_loop(0, bound, lambda t, f: f + ((t < n) & (tile_ref[t] < cut)).astype(
          jnp.int32), 0)
      row_ref[0] = 0
    count2[0] = first
    count2[1] = n - first

    # each core's run of visits, padded by repeating its last, and its weight runs
    def per_core_visits(c, carry):
      start, size = jnp.where(c == 0, 0, first), count2[c]

      def copy(s, started):
        src = jnp.clip(start + jnp.minimum(s, jnp.maximum(size - 1, 0)), 0, bound - 1)
        i = c * per + s
        group2[i] = group_ref[src]
        tile2[i] = tile_ref[src]
        read2[i] = read_ref[src]
        w = weight_ref[src]
        weight2[i] = w
        expert_ref[i] = -1
        new = ((s == 0) | (w != weight2[jnp.maximum(i - 1, c * per)])) & (s < size)
        started = started + new.astype(jnp.int32)
        run_ref[i] = jnp.maximum(started - 1, 0)

        @pl.when(new)
        def _():
          expert_ref[c * per + started - 1] = w
        return started
      lax.fori_loop(0, per, copy, 0)
      _lay_out_steps(lambda t: tile2[c * per + t], size, per, m_tiles, first_ref, steps_ref,
                     c)
      return carry
    lax.fori_loop(0, 2, per_core_visits, 0)

  sizes = (2 * per, 2 * per, 2, 2 * per, 2 * per, 2 * per, 2 * per, 1, 2 * (m_tiles + 1), 2)
  operands = (one.group, one.tile, one.count, one.weight, one.read_tile, one.bounds)
  out = pl.pallas_call(
      kernel, out_shape=[common.result((s,), jnp.int32, *operands) for s in sizes],
      in_specs=[_SMEM] * len(operands), out_specs=[_SMEM] * len(sizes),
      scratch_shapes=[pltpu.SMEM((m_tiles,), jnp.int32)], interpret=interpret,
      name=TWO_CORES)(*operands)
  visits = common.RowVisits(*out[:5], one.bounds)
  return (visits, common.WeightRuns(out[5], out[6]), common.TileSteps(out[8], out[9]), per,
          out[7][0] if by_visits else None)
