"""What the TPU and GPU kernels share: tile sizes, group metadata, padding, and the
fused epilogue math.

Kernels see canonical, padded operands: `m`, `k` and `n` are multiples of the
tiles (the wrappers pad with zeros: zero rows belong to no group, zero k columns
add nothing to a dot, and zero n columns give SwiGLU outputs of 0, which leave a
row's amax unchanged), and groups are given by their row ends (int32, as
`npu_ops.groups` makes them).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from npu_ops import quant


def cdiv(a: int, b: int) -> int:
  return -(-a // b)


def round_up(a: int, b: int) -> int:
  return cdiv(a, b) * b


def _pow2_at_least(v: int) -> int:
  return 1 << max(0, int(v - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class TileSizes:
  """Tiles of the Pallas kernels (rows, contraction, columns).

  Powers of two (Triton's requirement) and at least 32 rows (int8 sublane tiling
  on TPU), 128 k and 128 columns (TPU lanes; 128 int8 k is 128 bytes).
  """
  block_m: int = 128
  block_k: int = 512
  block_n: int = 256

  def __post_init__(self):
    for name, minimum in (("block_m", 32), ("block_k", 128), ("block_n", 128)):
      v = getattr(self, name)
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum or v & (v - 1):
        raise ValueError(f"TileSizes.{name}: expected a power of two >= {minimum}, got {v!r}")

  @classmethod
  def for_problem(cls, m: int, k: int, n: int, num_groups: int,
                  expected_tokens: int | None = None) -> "TileSizes":
    """Rows per tile follow the expected tokens per expert (`tuning_config[0]`,
    default m / groups): a group of 40 tokens should not pay for 128-row tiles.
    The contraction and column tiles only shrink for small problems."""
    tokens = expected_tokens or max(1, m // max(1, num_groups))
    return cls(block_m=min(128, max(32, _pow2_at_least(tokens))),
               block_k=min(512, max(128, _pow2_at_least(k))),
               block_n=min(256, max(128, _pow2_at_least(n))))


def k_tile(k: int, groups: int, block_k: int) -> int:
  """The contraction tile: `block_k` (at most k rounded up to 128), and a divisor
  of the group size k / groups when the weight scale is per group of k rows
  (the wrappers only send groups of a multiple of 128 rows)."""
  bk = min(block_k, round_up(k, 128))
  if groups > 1:
    while (k // groups) % bk:
      bk //= 2
  return bk


def kernel_gap(k: int, groups: int) -> str | None:
  """Why the fused kernels cannot take a per-group scale layout (None: they can)."""
  if groups > 1 and (k % groups or (k // groups) % 128):
    return f"A8W4 scale groups of {k / groups:g} rows (the kernels need multiples of 128)"
  return None


def pad_axis(a: jax.Array, axis: int, multiple: int) -> jax.Array:
  """Zero-pads `axis` of `a` up to a multiple (no copy when already aligned)."""
  size = a.shape[axis]
  extra = round_up(size, multiple) - size
  if not extra:
    return a
  widths = [(0, 0)] * a.ndim
  widths[axis] = (0, extra)
  return jnp.pad(a, widths)


def pad_2d(a: jax.Array, rows: int, cols: int) -> jax.Array:
  """Zero-pads a matrix to whole `rows x cols` tiles."""
  return pad_axis(pad_axis(a, 0, rows), 1, cols)


def pad_halves(a: jax.Array, multiple: int) -> jax.Array:
  """Pads each half of the last axis to a multiple, so the SwiGLU act and gate
  column tiles sit at j and j + n_half_tiles; no copy when already aligned."""
  half = a.shape[-1] // 2
  if half % multiple == 0:
    return a
  pad = lambda h: pad_axis(h, a.ndim - 1, multiple)
  return jnp.concatenate([pad(a[..., :half]), pad(a[..., half:])], axis=-1)


def group_rows(ends_ref, g, r0, block_m: int) -> jax.Array:
  """`[block_m, 1]` bool: which rows `r0 .. r0 + block_m` belong to group g
  (ends_ref: the group ends, in a kernel's scalar memory or as a ref)."""
  start = jnp.where(g > 0, ends_ref[jnp.maximum(g - 1, 0)], 0)
  rows = r0 + jax.lax.broadcasted_iota(jnp.int32, (block_m, 1), 0)
  return (rows >= start) & (rows < ends_ref[g])


def starts_of(ends: jax.Array) -> jax.Array:
  return jnp.concatenate([jnp.zeros((1,), ends.dtype), ends[:-1]])


def visit_metadata(ends: jax.Array, m_tiles: int, block_m: int
                   ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """The (row tile, group) pairs a grid visits, in group order (megablox's
  `make_group_metadata` technique): a row tile is visited once per group that
  has rows in it, so tiles shared by two groups are visited twice, consecutively.

  Returns (group_ids int32 [T], m_tile_ids int32 [T], num_visits int32 [1]) with
  the static bound `T = m_tiles + len(ends) - 1`; visits past num_visits repeat
  the last real one (the kernels skip them; their blocks stay resident).
  """
  num_groups = ends.shape[0]
  starts = starts_of(ends)
  nonempty = ends > starts
  first = starts // block_m
  last = jnp.maximum(ends - 1, 0) // block_m
  tiles = jnp.where(nonempty, last - first + 1, 0)
  offsets = jnp.cumsum(tiles)
  num_visits = offsets[-1]
  bound = m_tiles + num_groups - 1
  t = jnp.minimum(jnp.arange(bound, dtype=jnp.int32), jnp.maximum(num_visits - 1, 0))
  group = jnp.searchsorted(offsets, t, side="right").astype(jnp.int32)
  group = jnp.minimum(group, num_groups - 1)
  m_tile = first[group] + t - (offsets[group] - tiles[group])
  return group, m_tile.astype(jnp.int32), num_visits.reshape(1).astype(jnp.int32)


def tile_group_ranges(ends: jax.Array, m_tiles: int, block_m: int
                      ) -> tuple[jax.Array, jax.Array]:
  """For each row tile, the first and one-past-last group with rows in it
  (int32 [m_tiles] each; first == last when no group touches the tile)."""
  starts = starts_of(ends)
  r0 = jnp.arange(m_tiles, dtype=ends.dtype) * block_m
  first = jnp.searchsorted(ends, r0, side="right")         # groups ending at or before r0: before
  stop = jnp.searchsorted(starts, r0 + block_m, side="left")  # groups starting in or after
  return first.astype(jnp.int32), jnp.maximum(stop, first).astype(jnp.int32)


# --- epilogue math, shared by the TPU and GPU fused kernels ----------------------------

def dequant_swiglu(acc_act: jax.Array, acc_gate: jax.Array, w_scale_act: jax.Array,
                   w_scale_gate: jax.Array, x_scale: jax.Array) -> jax.Array:
  """A8W8 (SPEC B.1.3): `C = (int32 acc * w_scale) * x_scale`, then silu(act) * gate,
  as npu_ops' XLA path computes it.

  acc_*: int32 `[bm, bn]`; w_scale_*: float32 `[1, bn]`; x_scale: float32 `[bm, 1]`.
  """
  act = (acc_act.astype(jnp.float32) * w_scale_act) * x_scale
  gate = (acc_gate.astype(jnp.float32) * w_scale_gate) * x_scale
  return quant.silu(act) * gate


def a8w4_swiglu(acc_act: jax.Array, acc_gate: jax.Array, assist_act: jax.Array,
                assist_gate: jax.Array, x_scale: jax.Array) -> jax.Array:
  """A8W4 (SPEC B.1.4): `C = (sum_g s_g * ((x - 8)_g @ W_g) + assist) * x_scale`, then
  silu(act) * gate. acc_*: the float32 group sums `[bm, bn]`; assist_*: `[1, bn]`."""
  act = (acc_act + assist_act) * x_scale
  gate = (acc_gate + assist_gate) * x_scale
  return quant.silu(act) * gate
