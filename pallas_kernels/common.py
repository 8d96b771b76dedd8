"""What the TPU and GPU kernels share: tile sizes and group metadata. Imports no
other module (the epilogue math is `pallas_kernels.epilogue`).

Kernels see canonical operands, read in place (never padded per call): int8 or
float `x [m, k]`, weights `[e, k, n]`, and groups given by their row ends (int32,
as `npu_ops._src.groups` makes them). Edges of m, k and n that are not whole tiles
are masked inside the kernels.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def round_up(a: int, b: int) -> int:
  return cdiv(a, b) * b


def _pow2_at_least(v: int) -> int:
  return 1 << max(0, int(v - 1).bit_length())


def pow2_floor(v: int) -> int:
  return 1 << (int(v).bit_length() - 1)


@dataclasses.dataclass(frozen=True)
class TileSizes:
  """Tiles of the Pallas kernels (rows, contraction, columns): the one tile class of both
  kernel backends (`tiles=` of every op; the XLA path's row blocks are `GmmBlockSizes`).

  `block_m` a multiple of 32 (int8 sublane tiling on TPU), `block_k` and `block_n`
  multiples of 128 (TPU lanes). The TPU kernels take them as given; the GPU kernels
  cap them at what a streaming multiprocessor holds, in powers of two (Triton's rule:
  `gpu.gpu_tiles`).
  """
  block_m: int = 128
  block_k: int = 512
  block_n: int = 256

  def __post_init__(self):
    for name, quantum in (("block_m", 32), ("block_k", 128), ("block_n", 128)):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < quantum or v % quantum:
        raise ValueError(f"TileSizes.{name}: expected a positive multiple of {quantum}, got {v!r}")

  @classmethod
  def for_problem(cls, m: int, k: int, n: int, num_groups: int,
                  expected_tokens: int | None = None, max_block_m: int = 128
                  ) -> "TileSizes":
    """Rows per tile follow the expected tokens per expert (`tuning_config[0]`,
    default m / groups), up to `max_block_m`: a group of 40 tokens should not pay for
    128-row tiles. The contraction and column tiles only shrink for small problems."""
    return cls(block_m=min(max_block_m, max(32, _pow2_at_least(
                   tokens_per_group(m, num_groups, expected_tokens)))),
               block_k=min(512, max(128, _pow2_at_least(k))),
               block_n=min(256, max(128, _pow2_at_least(n))))


def tokens_per_group(m: int, num_groups: int, expected_tokens: int | None = None) -> int:
  """The rows a group is expected to hold: `expected_tokens`, else m / groups."""
  return expected_tokens or max(1, m // max(1, num_groups))


def varying(a) -> frozenset:
  """The manual mesh axes an array (or an abstract value) varies over inside `jax.shard_map`
  (jax 0.10: its `manual_axis_type`); none elsewhere."""
  if not hasattr(a, "dtype"):
    return frozenset()
  t = a if isinstance(a, jax.core.ShapedArray) else jax.typeof(a)
  mat = getattr(t, "manual_axis_type", None)
  return frozenset(getattr(mat, "varying", None) or getattr(t, "vma", None) or ())


def result(shape: tuple[int, ...], dtype, *operands) -> jax.ShapeDtypeStruct:
  """A kernel's result (a `pallas_call` out_shape), typed as varying over the manual mesh
  axes its `operands` vary over: inside `jax.shard_map` with its type check (`check_vma`,
  the default) Pallas refuses a result that does not say."""
  axes = frozenset().union(*map(varying, operands))
  mat = type(jax.core.ShapedArray((), dtype).manual_axis_type)(varying=axes)
  return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


# --- what a backend is asked: `Problem`, and what both kernel backends lack ------------------

OPS = ("gmm", "tgmm", "fused", "fused_mx")


@dataclasses.dataclass(frozen=True)
class Problem:
  """A grouped op as the kernel backends judge it: whether they take it (each backend's
  `supports(problem)`, None or the reason) and with which tiles (`default_tiles`).

  Attributes:
    op: "gmm" (`[m, k] x [e, k, n]`), "tgmm" (`[m, k]^T x [m, n] -> [e, k, n]`), "fused"
      (the fused op on int8 / int4 inputs) or "fused_mx" (on MX inputs).
    m, k, n, groups: rows, contraction, columns, experts (tgmm: output groups).
    dtype: the lhs operand's dtype name.
    out_dtype: gmm / tgmm: the output's dtype name (None: as `dtype`).
    scale_groups: fused: k groups of the weight scale (A8W4 per group; 1 per channel).
    a4w4: fused: int4 activations.
    mx_out: fused: MX output codes.
    transposed: gmm: the weight read as `[e, n, k]`; fused_mx: a transposed weight.
    fp4: fused_mx: fp4 inputs.
    expected_tokens: rows per group expected (`tuning_config[0]`), None for m / groups.
    dot_algorithm: gmm / tgmm: `precision` names a `lax.DotAlgorithm(Preset)`.
  """
  op: str
  m: int
  k: int
  n: int
  groups: int
  dtype: str
  out_dtype: str | None = None
  scale_groups: int = 1
  a4w4: bool = False
  mx_out: bool = False
  transposed: bool = False
  fp4: bool = False
  expected_tokens: int | None = None
  dot_algorithm: bool = False

  @property
  def tokens_per_group(self) -> int:
    return tokens_per_group(self.m, self.groups, self.expected_tokens)


# gmm / tgmm results the kernels write (int32: of integer operands, as `npu_ops` allows)
KERNEL_OUT_DTYPES = ("float32", "bfloat16", "float16", "int32")


def shared_gap(p: Problem) -> str | None:
  """What neither kernel backend does (None: both can, as far as this goes)."""
  if p.op in ("gmm", "tgmm") and p.out_dtype not in (None, *KERNEL_OUT_DTYPES):
    return (f"a {p.out_dtype} result (the kernels write float32, bfloat16, float16 or int32; "
            "fp8 conversions in Triton need sm_89 and fail for most fp8 types)")
  if p.dot_algorithm:
    return "a dot algorithm as precision (the kernels take a jax.lax.Precision)"
  if p.op == "fused":
    g = p.scale_groups
    if g > 1 and (p.k % g or (p.k // g) % 128):
      return f"A8W4 scale groups of {p.k / g:g} rows (the kernels need multiples of 128)"
  return None


def group_rows(ends_ref, g, r0, block_m: int) -> jax.Array:
  """`[block_m, 1]` bool: which rows `r0 .. r0 + block_m` belong to group g
  (ends_ref: the group ends, in a kernel's scalar memory or as a ref)."""
  start = jnp.where(g > 0, ends_ref[jnp.maximum(g - 1, 0)], 0)
  rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
  return (rows >= start) & (rows < ends_ref[g])


def starts_of(ends: jax.Array) -> jax.Array:
  return jnp.concatenate([jnp.zeros((1,), ends.dtype), ends[:-1]])


def visit_metadata(ends: jax.Array, m_tiles: int, block_m: int, *, visit_empty: bool = False,
                   rows: int | None = None, first: jax.Array | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The (row tile, group) pairs a grid visits, in row order (megablox's
  `make_group_metadata` technique): a row tile is visited once per group that
  has rows in it, so tiles shared by two groups are visited twice, consecutively.

  Args:
    ends: int32 `[G]` group ends (group 0 starts at row `first`, an int32 scalar, or 0);
      m_tiles, block_m: the row tiling (m_tiles >= 1).
    visit_empty: give every empty group one visit (tgmm writes its zero matrix).
    rows: the rows the groups cover at most (without visit_empty): each visit holds one
      of them at least, so there are no more visits than rows.

  Returns (group_ids, m_tile_ids, num_visits [1]), int32, with the static bound
  `T = min(m_tiles + G - 1, rows)`; visits past num_visits repeat the last real one (the
  kernels skip them, and their blocks stay resident). A grid step costs time even when
  skipped, so the bound matters where groups outnumber rows (decode over many experts).
  """
  num_groups = ends.shape[0]
  starts = starts_of(ends) if first is None else jnp.concatenate(
      [jnp.reshape(first, (1,)).astype(ends.dtype), ends[:-1]])
  nonempty = ends > starts
  first = jnp.minimum(starts // block_m, m_tiles - 1)
  last = jnp.maximum(ends - 1, 0) // block_m
  tiles = jnp.where(nonempty, last - first + 1, 1 if visit_empty else 0)
  offsets = jnp.cumsum(tiles)
  bound = m_tiles + num_groups - 1
  if rows is not None and not visit_empty:
    bound = max(1, min(bound, rows))
  num_visits = jnp.minimum(offsets[-1], bound)  # more only from invalid ends: no grid past it
  t = jnp.minimum(jnp.arange(bound, dtype=jnp.int32), jnp.maximum(num_visits - 1, 0))
  group = jnp.searchsorted(offsets, t, side="right", method="compare_all").astype(jnp.int32)
  group = jnp.minimum(group, num_groups - 1)
  m_tile = first[group] + t - (offsets[group] - tiles[group])
  return group, m_tile.astype(jnp.int32), num_visits.reshape(1).astype(jnp.int32)


class RowVisits(NamedTuple):
  """The visits of a grouped matmul's grid over `m` rows (`row_visits`), dealt to `cores`
  TensorCores, each a run of `per_core` visits; int32 arrays `[cores * per_core]` (core c's
  visit t at `c * per_core + t`) but `count`:

  * group: per visit, 0 for the head (rows before `start`), 1..G for the groups, G + 1
    for the tail (rows past the last end); a visit is real (it multiplies) when
    `1 <= group <= G` (`is_real`);
  * tile: the row tile it writes;
  * count `[cores]`: the visits each core runs (its later ones repeat its last: skipped);
  * weight: the expert whose weights it reads (`group - 1`); head and tail visits,
    which only write zeros, name the nearest real visit's, so they cost no copy;
  * read_tile: the row tile of x it reads: its own, or for head and tail visits the
    nearest real visit's (no copy of rows that no group owns);
  * bounds `[G + 2]`: `[start, ends..., m]`, the ends of head, groups and tail, for
    `group_rows(bounds, group, ...)`.
  """
  group: jax.Array
  tile: jax.Array
  count: jax.Array
  weight: jax.Array
  read_tile: jax.Array
  bounds: jax.Array

  @staticmethod
  def is_real(group, num_groups: int):
    return (group >= 1) & (group <= num_groups)


def row_visits(ends: jax.Array, m: int, block_m: int, start: jax.Array | None = None
               ) -> RowVisits:
  """The visits of the row-tiled kernels (gmm, the fused op): the groups of `ends` (row
  ends, int32 `[G]`), from row `start` (an int32 scalar, megablox's group_offset: the
  first row of group 0; None for 0) on, between a weightless head (rows before `start`)
  and tail (rows past the last end) whose visits write zeros: every output row is
  written once and no wrapper moves rows.

  (A v5p's two TensorCores: `tpu_visits.two_cores` deals these visits.)
  """
  num_groups = ends.shape[0]
  head = jnp.zeros((1,), jnp.int32) if start is None else jnp.reshape(start, (1,)).astype(jnp.int32)
  bounds = jnp.concatenate([head, ends.astype(jnp.int32), jnp.full((1,), m, jnp.int32)])
  m_tiles = cdiv(m, block_m)
  group, tile, count = visit_metadata(bounds, m_tiles, block_m, rows=m)
  t = jnp.arange(group.shape[0], dtype=jnp.int32)
  real = RowVisits.is_real(group, num_groups) & (t < count[0])
  before = lax.cummax(jnp.where(real, t, -1))                           # last real at or before
  after = lax.cummin(jnp.where(real, t, group.shape[0]), reverse=True)  # first at or after
  src = jnp.where(real, t, jnp.where(before >= 0, before,
                                     jnp.minimum(after, group.shape[0] - 1)))
  weight = jnp.clip(group[src] - 1, 0, max(num_groups - 1, 0)).astype(jnp.int32)
  return RowVisits(group, tile, count, weight, tile[src], bounds)


def per_core(m: int, block_m: int, num_groups: int, cores: int = 1) -> int:
  """The static bound of the visits one core runs (`row_visits`): the row tiles, plus
  one more visit per boundary between head, groups and tail; and no more than the rows
  (every visit holds one at least). With two cores either may take all but a tile (the
  cut follows the work); the grid runs only the visits there are (`tpu._steps`)."""
  span = cdiv(m, block_m) - (cores - 1)
  return max(1, min(span + num_groups + 1, span * block_m, m))


class WeightRuns(NamedTuple):
  """The runs of consecutive visits of one core that read the same expert's weights
  (`tpu_visits.row_visits`, `tpu_visits.two_cores`: what a kernel that copies each run's
  weights by hand into a ring of buffers needs), int32 `[cores * per_core]`, laid out as
  `RowVisits`:

  * run: per visit, the index of its run among the core's runs (a run starts at the
    core's first visit and where the expert changes; visits past the core's count
    repeat its last and stay in its run);
  * expert: per run (core c's run r at `c * per_core + r`), the run's expert; -1 past
    the core's last run.
  """
  run: jax.Array
  expert: jax.Array


class TileSteps(NamedTuple):
  """A grid of a step per row tile, whose step loops over that tile's visits (one core's
  visits, in row order: `tpu_visits.row_visits`, `tpu_visits.visit_metadata`), int32:

  * first `[m_tiles + 1]`: step s runs visits [first[s], first[s + 1]), all of row tile
    `tile[first[s]]`; a step starts at visit 0 and where the row tile changes; past the
    last step, the visit count;
  * count `[1]`: the steps.
  """
  first: jax.Array
  count: jax.Array


_PRECISION_ORDER = (lax.Precision.DEFAULT, lax.Precision.HIGH, lax.Precision.HIGHEST)


def accumulator(dtype) -> np.dtype:
  """The grouped matmuls' accumulator for operands of `dtype`: int32 for integers (exact:
  int8 products summed over k < 2^17), else float32."""
  return np.dtype(np.int32 if jnp.issubdtype(dtype, jnp.integer) else np.float32)


def float32_precision(precision, dtype, *, supported=_PRECISION_ORDER):
  """The one precision a kernel's float dots use: None for other operand dtypes (their
  products are exact in float32), else the strongest of `precision` (a `lax.Precision`
  or a pair), raised to the next one the compiler `supported` (Mosaic: no HIGH)."""
  if precision is None or np.dtype(dtype) != np.float32:
    return None
  pair = precision if isinstance(precision, tuple) else (precision,)
  rank = max(_PRECISION_ORDER.index(p) for p in pair)
  return next(p for p in _PRECISION_ORDER[rank:] if p in supported)
