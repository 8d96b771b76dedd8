"""Traversals of the rows of ragged groups, shared by every grouped op.

An op supplies `block_fn(carry, ctx, r0, bl, mask) -> carry`: compute rows
`[r0, r0 + bl)` of one group (`ctx = group_ctx(g)`, e.g. the group's weight) and
fold them into `carry` (write output rows, accumulate a gradient). `bl` is a
static size; `mask` is None when every row of the block belongs to the group,
else a bool `[bl]` marking the rows that do (the block loop below runs that
block first in its group, so an accumulating `block_fn` may overwrite there).
One block loop runs it, for dynamic ends (int32 array; one compilation serves all
values) and static ends (Python ints, constant bounds) alike: a loop over groups.
Each group is cut into `size // block_m` full blocks (a loop with a dynamic trip
count) and one masked block for the remaining `< block_m` rows (run first): the
smallest of a ladder of static sizes (`remainder_blocks`: powers of two from
`min_block_m` to 8, then four per octave up to `block_m`; one per octave for weights under
`DENSE_LADDER_ROW_MACS` multiply-adds a row) that holds them, chosen by a `lax.cond` per
size (one `lax.switch` over the sizes ran slower). Only that block reaches outside its
group (its mask drops those rows), so the work is the useful work plus under a quarter of
the remainder (under all of it for small weights; and under `min_block_m` rows) per
group, in at most `size // block_m + 1` dot calls, and a group's context (its
weight) is sliced once. Rows outside every group are computed only where a
remainder block spills over them, and masked. `traverse_segments` runs the same loop
over any row segments (tgmm uses it for the rows past each group's window, see
`group_windows`). (`npu_ops._src.reference` is the plain jnp form, for checking.)

Block sizes follow the expected tokens per group (`tuning_config[0]` of the
torch_npu ops, else m / groups): 512-row blocks run int8 dots at dense speed on
CPU, and `min_block_m` bounds the waste for groups of a few tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from npu_ops._src import groups as groups_lib
from npu_ops._src import manual_axes
from npu_ops._src.validation import fail

BlockFn = Callable[[Any, Any, Any, int, Any], Any]
# Per-group operands (weights): a stacked `[g, ...]` array, or a tuple of g arrays (the
# per-expert list torch_npu takes), which the traversal reads without copying.
Experts = Any  # jax.Array | tuple[jax.Array, ...]


def group_operand(w: Experts, g: Any) -> Any:
  """Group g's operand for `group_dot`, taken once per group (in `group_ctx`).

  A stacked array gives `w[g]`: XLA:CPU copies the slice (a dot takes whole buffers;
  docs/performance.md, "Weights as a list of experts", has the cost). A tuple gives `(g, w)`, and `group_dot` picks the array with a `lax.switch`:
  each branch dots one whole argument, no copy.
  """
  return (g, w) if isinstance(w, tuple) else w[g]


def group_dot(x: jax.Array, wg: Any, **dot_kw: Any) -> jax.Array:
  """`x @ w[g]` (`lax.dot` keywords) for `wg = group_operand(w, g)`."""
  if not isinstance(wg, tuple):
    return lax.dot(x, wg, **dot_kw)
  g, ws = wg
  return lax.switch(g, [functools.partial(lambda w, a: lax.dot(a, w, **dot_kw), w) for w in ws],
                    x)


def stacked(w: Experts) -> jax.Array:
  """A per-group operand as one `[g, ...]` array (for the kernels and the reference)."""
  return jnp.stack(w) if isinstance(w, tuple) else w


def first(w: Experts) -> jax.Array:
  """Group 0's operand of a stacked array or list (what shapes and dtypes are read from)."""
  return w[0] if isinstance(w, tuple) else w


def num_groups_of(w: Experts) -> int:
  return len(w) if isinstance(w, tuple) else w.shape[0]


def pow2_floor(v: int) -> int:
  return 1 << (max(int(v), 1).bit_length() - 1)


@dataclasses.dataclass(frozen=True)
class GmmBlockSizes:
  """Row-block sizes of the dynamic XLA traversal.

  Attributes:
    block_m: rows of a full block (a power of two).
    min_block_m: the smallest block (a power of two <= block_m); a group
      computes fewer than `max(min_block_m, rest / 4 + 8)` rows it does not own
      (`rest`: its rows past the full blocks), `max(min_block_m, rest)` where a row's
      product (k x n) is under 2^20 multiply-adds: see `remainder_blocks`.
  """
  block_m: int = 512
  min_block_m: int = 16

  def __post_init__(self):
    for name in ("block_m", "min_block_m"):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 or v & (v - 1):
        fail(f"GmmBlockSizes.{name}", "a positive power of two (an int)", repr(v))
      object.__setattr__(self, name, int(v))  # NumPy ints too, hashed as the int
    if self.min_block_m > self.block_m:
      fail("min_block_m", f"<= block_m={self.block_m}", self.min_block_m)

  @classmethod
  def for_problem(cls, m: int, num_groups: int, expected_tokens: int | None = None
                  ) -> "GmmBlockSizes":
    """Heuristic from the expected tokens per group (default m / num_groups)."""
    if not isinstance(m, (int, np.integer)) and not expected_tokens:
      return cls()  # a symbolic m (jax.export) runs on ragged_dot: the blocks go unused
    expected = expected_tokens if expected_tokens else -(-m // max(num_groups, 1))
    # 512-row blocks run int8 dots at dense-dot speed on CPU; min_block_m 32 suits
    # hundreds of tokens per group, and with a few per group blocks down to 2 rows (not
    # 1: a 1-row dot costs what a 2-row one does, twice) waste least (docs/performance.md,
    # "How the CPU path stays fast").
    min_block = int(np.clip(pow2_floor(max(expected, 1) // 8), 2, 32))
    return cls(block_m=512, min_block_m=min_block)


def jit_by_ends(*static_argnames: str):
  """`jax.jit` whose keyword `ends` is static when a tuple, traced when an array.

  Static ends are compile-time constants; dynamic ends compile once for all values.
  """
  def decorate(f):
    jitted_static = jax.jit(f, static_argnames=("ends",) + static_argnames)
    jitted_dynamic = jax.jit(f, static_argnames=static_argnames)

    @functools.wraps(f)
    def call(*args, ends, **kw):
      if isinstance(ends, tuple):
        return jitted_static(*args, ends=ends, **kw)
      return jitted_dynamic(*args, ends=jnp.asarray(ends, jnp.int32), **kw)
    return call
  return decorate


def traverse(ends: groups_lib.GroupEnds, m: int, carry: Any, *,
             group_ctx: Callable[[Any], Any], block_fn: BlockFn,
             block_sizes: GmmBlockSizes | None = None, start: Any = 0,
             row_macs: int | None = None) -> Any:
  """Runs `block_fn` over the rows `[0, m)` of every group (see the module doc); `ends`
  are counted from row `start` (group_offset's local groups: no row moves); `row_macs`
  (a row's multiply-adds, k x n; None: large) sets the remainder ladder
  (`remainder_blocks`)."""
  # Static ends take the same loop, with constant bounds: XLA:CPU runs one exact dot per
  # group (unrolled, concatenated or batched) slower than this loop once groups hold
  # ~64 rows (docs/performance.md, "How the CPU path stays fast").
  ends = jnp.asarray(ends, jnp.int32)
  return traverse_segments(groups_lib.group_starts(ends) + start, groups_lib.group_sizes(ends),
                           m, carry,
                           group_ctx=group_ctx, block_fn=block_fn,
                           block_sizes=block_sizes or GmmBlockSizes.for_problem(m, ends.shape[0]),
                           row_macs=row_macs)


def traverse_segments(starts: jax.Array, sizes: jax.Array, m: int, carry: Any, *,
                      group_ctx: Callable[[Any], Any], block_fn: BlockFn,
                      block_sizes: GmmBlockSizes, row_macs: int | None = None) -> Any:
  """The block loop over rows `[starts[g], starts[g] + sizes[g])` of each group `g`.

  Segments lie inside `[0, m)`; they need not be contiguous or cover all rows.
  """
  if m == 0:  # no rows, no blocks
    return carry
  block, min_block = block_rows(m, block_sizes)
  ladder = remainder_blocks(block, min_block, row_macs)

  def group_body(g, carry):
    # Empty groups are skipped whole: not even their context (a weight copy) is made.
    return lax.cond(sizes[g] > 0, functools.partial(run_group, g), lambda c: c, carry)

  def run_group(g, carry):
    ctx, start, size = group_ctx(g), starts[g], sizes[g]
    n_full = size // block
    first = start + n_full * block
    rest = size - n_full * block  # in [0, block): one masked block, the smallest that fits

    def remainder(c, bl):
      r0 = jnp.minimum(first, m - bl)  # kept inside [0, m); the mask drops the extra rows
      r = r0 + jnp.arange(bl)
      return block_fn(c, ctx, r0, bl, (r >= first) & (r < start + size))

    # The remainder runs first: a group's only masked block is also its first block.
    below = 0
    for bl in ladder:
      carry = lax.cond((rest > below) & (rest <= bl), functools.partial(remainder, bl=bl),
                       lambda c: c, carry)
      below = bl
    return lax.fori_loop(0, n_full, lambda i, c: block_fn(c, ctx, start + i * block, block,
                                                          None), carry)

  return lax.fori_loop(0, starts.shape[0], group_body, carry)


# Rows per call of a staged traversal's epilogue on a remainder (`traverse_staged`): its
# window is whole chunks, so a group finishes under this many rows it does not own.
EPILOGUE_ROWS = 64

StagedFinish = Callable[[Any, Any, Any, jax.Array, jax.Array], Any]


def traverse_staged(ends: groups_lib.GroupEnds, m: int, carry: Any, *, row: jax.ShapeDtypeStruct,
                    group_ctx: Callable[[Any], Any],
                    dot_fn: Callable[[Any, Any, int], jax.Array], finish_fn: StagedFinish,
                    block_sizes: GmmBlockSizes | None = None, start: Any = 0,
                    row_macs: int | None = None) -> Any:
  """`traverse` for ops whose blocks end in a per-row epilogue, with that epilogue
  compiled twice instead of once per block size.

  `dot_fn(ctx, r0, bl) -> [bl, ...]` computes rows `[r0, r0 + bl)` of a group's product
  (the blocks of `traverse`: one call per block size of the remainder ladder, up to 22
  sizes for 512-row blocks), and `finish_fn(carry, ctx, r0, rows, valid) -> carry` folds
  rows `[r0, r0 + len(rows))` of it into carry; `valid` (bool) marks the rows of the
  group, None when all are. A full block is finished whole; a group's remainder lands
  in a staging buffer of one block (rows of shape and dtype `row`) and is finished in
  chunks of `EPILOGUE_ROWS` rows. `finish_fn` thus appears twice in the program, where
  `traverse`'s `block_fn` appears once per block size: the fused op's epilogue (a few
  hundred ops) compiled 22 times made its compile 3-4x slower (docs/performance.md, "Compile time").
  `ends` are counted from row `start` and `row_macs` sets the ladder, as in `traverse`.
  """
  ends = jnp.asarray(ends, jnp.int32)
  if m == 0:
    return carry
  starts, sizes = groups_lib.group_starts(ends) + start, groups_lib.group_sizes(ends)
  block, min_block = block_rows(m, block_sizes or GmmBlockSizes.for_problem(m, ends.shape[0]))
  chunk = min(EPILOGUE_ROWS, block)  # both powers of two: chunk divides block
  ladder = remainder_blocks(block, min_block, row_macs)
  staging = manual_axes.varying_as(jnp.zeros((block,) + tuple(row.shape), row.dtype), carry)

  def finish_chunks(carry, staging, ctx, w0, chunks, start, end):
    """finish_fn over `chunks` chunks of staging, output rows from w0 on. staging travels
    in the loop's carry, which XLA updates in place (a closed-over one it copies)."""
    def finish(c, state):
      carry, staging = state
      r0 = w0 + c * chunk
      r = r0 + jnp.arange(chunk, dtype=jnp.int32)
      carry = finish_fn(carry, ctx, r0, lax.dynamic_slice_in_dim(staging, c * chunk, chunk),
                        (r >= start) & (r < end))
      return carry, staging
    return lax.fori_loop(0, chunks, finish, (carry, staging))

  def run_group(g, state):
    carry, staging = state
    ctx, start, size = group_ctx(g), starts[g], sizes[g]
    end = start + size
    n_full = size // block
    first = start + n_full * block
    rest = size - n_full * block

    def rest_rows(staging, bl):
      # The dot's rows [r0, r0 + bl) in a window [w0, w0 + span) of whole chunks inside
      # [0, m); span = bl rounded up to chunks (<= block, as chunk divides block).
      span = -(-bl // chunk) * chunk
      r0, w0 = jnp.minimum(first, m - bl), jnp.minimum(first, m - span)
      rows = dot_fn(ctx, r0, bl).astype(staging.dtype)
      return (lax.dynamic_update_slice_in_dim(staging, rows, r0 - w0, axis=0), w0,
              jnp.int32(span // chunk))

    # The remainder runs first: its window may reach back over the group's full-block rows
    # (garbage there, in `valid` rows), which the full blocks then overwrite. Its rows go to
    # the staging buffer carried by the loops (updated in place); a full block's product
    # is a buffer of its own. (One call site for both would make them one buffer: XLA
    # then copied a whole block per block.)
    out = (staging, first, jnp.int32(0))
    below = 0
    for bl in ladder:
      out = lax.cond((rest > below) & (rest <= bl), lambda o, bl=bl: rest_rows(o[0], bl),
                     lambda o: o, out)
      below = bl
    staging, w0, chunks = out
    carry, staging = finish_chunks(carry, staging, ctx, w0, chunks, start, end)

    def full(i, carry):
      r0 = start + i * block
      return finish_fn(carry, ctx, r0, dot_fn(ctx, r0, block), None)
    return lax.fori_loop(0, n_full, full, carry), staging

  def group_body(g, state):
    return lax.cond(sizes[g] > 0, functools.partial(run_group, g), lambda s: s, state)

  return lax.fori_loop(0, ends.shape[0], group_body, (carry, staging))[0]


def block_rows(m: int, block_sizes: GmmBlockSizes) -> tuple[int, int]:
  """(full block, smallest block) that the block loop uses over `m > 0` rows."""
  min_block = min(block_sizes.min_block_m, pow2_floor(m))
  # A block spanning all m rows makes XLA's CPU loop an order of magnitude slower: keep
  # blocks strictly smaller than m.
  return max(min_block, min(block_sizes.block_m, pow2_floor(max(m - 1, 1)))), min_block


def block_calls(rows: Any, block: int) -> Any:
  """Blocks (dot calls) the block loop runs for groups of `rows` rows (numpy or jnp)."""
  return -(-rows // block)  # ceil, in the integer dtype (strict promotion safe)


# A row's multiply-adds (k x n) from which the remainder ladder takes four sizes per octave;
# below, one (docs/performance.md, "Compile time": same run time, a third of the compile).
DENSE_LADDER_ROW_MACS = 1 << 20


def remainder_blocks(block: int, min_block: int, row_macs: int | None = None
                     ) -> tuple[int, ...]:
  """Sizes of the masked block that covers a group's last `< block` rows, ascending.

  Every int8 dot call on CPU costs some rows of work on top of its rows
  (docs/performance.md): XLA:CPU runs it through YNNPACK, which packs the
  `[k, n]` weight on every call, or for a few rows reads it unpacked at about half
  the speed per row. So the remainder takes one call, not a binary expansion of
  up to log2(block) calls: the powers of two from `min_block` to 8, then four
  sizes per octave up to `block` (multiples of 8) keep the rows it computes
  outside its group under a quarter of the remainder (+ 8, and under
  `min_block`). Below 8 rows one size per octave does: a ladder of 2..7 as well ran
  no faster, and each size is one more branch to compile. Where a row's product is
  small (`row_macs`, k x n, under `DENSE_LADDER_ROW_MACS`; None counts as large) the
  rows a coarser ladder wastes cost less than the branches cost to compile: one size
  per octave there (under all of the remainder wasted, and under `min_block`).
  """
  per_octave = 1 if row_macs is not None and row_macs < DENSE_LADDER_ROW_MACS else 4
  round8 = lambda v: v if v < 8 else -(-v // 8) * 8
  return tuple(sorted({round8(b + b * i // per_octave)
                       for b in (1 << j for j in range(block.bit_length()))
                       if b >= min_block for i in range(per_octave if b >= 8 else 1)
                       if b + b * i // per_octave <= block}))


def loop_storage(a: jax.Array) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
  """(a as it should travel through a loop, the view back to a's dtype).

  For arrays sliced by rows inside the traversal's loops. bfloat16 travels as
  uint16: XLA:CPU's float normalization upcasts a bf16 array that is sliced inside
  a loop, and hoists the cast, converting the whole array to float32 on every
  call (docs/performance.md has the cost). A group context sliced in
  `group_ctx` needs no such storage (it runs inside the per-group `lax.cond`,
  which XLA does not hoist from), and should not get it: the view back to bf16 is
  a copy, made once per block where the context is used.
  """
  if a.dtype == jnp.bfloat16:
    return (lax.bitcast_convert_type(a, jnp.uint16),
            lambda b: lax.bitcast_convert_type(b, jnp.bfloat16))
  return a, lambda b: b


def write_rows(out: jax.Array, rows: jax.Array, r0: Any, mask: jax.Array | None) -> jax.Array:
  """`out[r0 : r0 + len(rows)] = rows`, keeping the old value where `mask` is False."""
  if mask is not None:
    old = lax.dynamic_slice_in_dim(out, r0, rows.shape[0])
    rows = jnp.where(mask.reshape(mask.shape + (1,) * (rows.ndim - 1)), rows, old)
  return lax.dynamic_update_slice_in_dim(out, rows, r0, axis=0)


def group_windows(a: jax.Array, starts: jax.Array, sizes: jax.Array, rows: int) -> jax.Array:
  """`[g, rows, ...]`: the first `rows` rows of each group of `a`, zero past its size."""
  r = jnp.arange(rows, dtype=jnp.int32)[None, :]  # ranks spelled out (rank_promotion=raise)
  idx = jnp.minimum(starts[:, None] + r, a.shape[0] - 1)
  valid = (r < sizes[:, None]).reshape(sizes.shape + (rows,) + (1,) * (a.ndim - 1))
  return jnp.where(valid, a[idx], jnp.zeros((), a.dtype))
