"""Grouped matmul: `out[rows of group g] = lhs[rows of group g] @ rhs[g]`.

The building block of every MoE op here, with `jax.lax.ragged_dot` semantics
(rows outside every group are 0) and exact int8 x int8 -> int32 accumulation.

How the XLA path keeps work proportional to real tokens
-------------------------------------------------------
`jax.lax.ragged_dot` on CPU expands to a dense masked product: `g` times the
useful work. Here:

* static group sizes (Python ints): one exact `lhs[s:e] @ rhs[g]` per group;
* dynamic group sizes (an array; one compilation for all values): a loop over
  groups. Each group is cut into *row blocks* of statically known sizes:
  `size // block_m` full blocks (a dynamic-trip-count loop), then one block of
  each power of two `block_m/2, ..., min_block_m` that the binary expansion of the
  remainder contains (a `lax.cond` each), then one masked `min_block_m` block for
  the last `size % min_block_m` rows. Every block but the last lies inside its
  group, so the wasted work is < `min_block_m` rows per group, and each group's
  weight is read once per block. Rows outside every group are never computed.

Block sizes (`GmmBlockSizes`) follow the expected tokens per expert
(`tuning_config[0]` of the torch_npu ops, else m / num_groups): large blocks keep
the dot efficient, a small `min_block_m` bounds the waste when experts get few
tokens.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from npu_ops import groups as groups_lib
from npu_ops._validation import check_dtype, check_rank, describe, fail, require

Implementation = Literal["xla", "reference"]
IMPLEMENTATIONS: tuple[str, ...] = ("xla", "reference")
PLANNED_IMPLEMENTATIONS: tuple[str, ...] = ("pallas_tpu", "pallas_gpu")

_INT_OPERANDS = tuple(np.dtype(d) for d in (jnp.int8, jnp.int4))
_FLOAT_OPERANDS = tuple(np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


def _pow2_floor(v: int) -> int:
  return 1 << (max(int(v), 1).bit_length() - 1)


@dataclasses.dataclass(frozen=True)
class GmmBlockSizes:
  """Row-block sizes of the dynamic XLA grouped matmul.

  Attributes:
    block_m: rows of a full block (a power of two).
    min_block_m: the smallest block (a power of two <= block_m); a group
      computes fewer than `min_block_m` rows it does not own.
  """
  block_m: int = 512
  min_block_m: int = 16

  def __post_init__(self):
    for name in ("block_m", "min_block_m"):
      v = getattr(self, name)
      if not isinstance(v, int) or v < 1 or v & (v - 1):
        fail(name, "a positive power of two", v)
    if self.min_block_m > self.block_m:
      fail("min_block_m", f"<= block_m={self.block_m}", self.min_block_m)

  @classmethod
  def for_problem(cls, m: int, num_groups: int, expected_tokens: int | None = None
                  ) -> "GmmBlockSizes":
    """Heuristic from the expected tokens per group (default m / num_groups)."""
    expected = expected_tokens if expected_tokens else -(-m // max(num_groups, 1))
    # The waste bound (min_block_m per group) stays a small fraction of a group,
    # while blocks of >= 8 rows keep the int8 dot efficient on CPU.
    # Measured on a 2-core AVX-512 CPU (int8, k=2048, n=2816): 512-row blocks run at
    # dense-dot speed; min_block_m 8 suits ~8-64 tokens per group, 32 suits >= 256.
    min_block = int(np.clip(_pow2_floor(max(expected, 1) // 8), 8, 32))
    return cls(block_m=512, min_block_m=min_block)


def resolve_implementation(implementation: str | None) -> str:
  if implementation is None:
    return "xla"
  if implementation in PLANNED_IMPLEMENTATIONS:
    raise NotImplementedError(f"implementation={implementation!r} is planned (Pallas kernels); "
                              f"available: {IMPLEMENTATIONS}")
  if implementation not in IMPLEMENTATIONS:
    fail("implementation", f"None or one of {IMPLEMENTATIONS}", repr(implementation))
  return implementation


def _operand_dtype(lhs_dtype: Any, rhs_dtype: Any) -> np.dtype:
  """Compute dtype of the dot: int8 for int4/int8 operands, else the float promotion."""
  if np.dtype(lhs_dtype) in _INT_OPERANDS:
    return np.dtype(jnp.int8)
  return np.dtype(jnp.promote_types(lhs_dtype, rhs_dtype))


def default_out_dtype(lhs_dtype: Any, rhs_dtype: Any) -> np.dtype:
  """int32 for integer operands (exact), else the promoted float type."""
  if np.dtype(lhs_dtype) in _INT_OPERANDS:
    return np.dtype(jnp.int32)
  return np.dtype(jnp.promote_types(lhs_dtype, rhs_dtype))


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: Any, *,
                   preferred_element_type: Any = None,
                   implementation: str | None = None,
                   block_sizes: GmmBlockSizes | None = None) -> jax.Array:
  """Grouped matmul with `jax.lax.ragged_dot` semantics.

  Args:
    lhs: `[m, k]` int8 / int4, or float32 / bfloat16 / float16.
    rhs: `[g, k, n]`, integer when lhs is integer, float when lhs is float.
    group_sizes: rows per group, `len <= g`: Python ints (static: exact per-group
      dots) or an int32/int64 array (dynamic: one compilation for all values).
      Invalid dynamic sizes are clamped (negative -> 0, total capped at m; see
      `npu_ops.groups`).
    preferred_element_type: output dtype. Default: int32 for integer operands
      (exact accumulation; ragged_dot would return int8), else the promoted
      input dtype. Float operands accumulate in float32.
    implementation: None (= "xla"), "xla" (fast path), or "reference"
      (dense masked jnp, `g` times the work; for checking).
    block_sizes: row blocks of the dynamic XLA path (default from the shapes).

  Returns:
    `[m, n]` of `preferred_element_type`; rows outside every group are 0.
  """
  check_rank("lhs", lhs, 2)
  check_rank("rhs", rhs, 3)
  check_dtype("lhs", lhs, _INT_OPERANDS + _FLOAT_OPERANDS)
  int_lhs = np.dtype(lhs.dtype) in _INT_OPERANDS
  check_dtype("rhs", rhs, _INT_OPERANDS if int_lhs else _FLOAT_OPERANDS)
  m, k = lhs.shape
  g, k_rhs, _ = rhs.shape
  require(k_rhs == k, "rhs", f"[g, k={k}, n] to match lhs {describe(lhs)}", describe(rhs))
  ends = groups_lib.ends_from_sizes(group_sizes, m, g)
  out_dtype = (default_out_dtype(lhs.dtype, rhs.dtype) if preferred_element_type is None
               else np.dtype(preferred_element_type))
  if int_lhs and not jnp.issubdtype(out_dtype, jnp.integer) and out_dtype != np.float32:
    fail("preferred_element_type", "int32 or float32 for integer operands", out_dtype.name,
         TypeError)
  return gmm(lhs, rhs, ends, out_dtype=out_dtype, implementation=implementation,
             block_sizes=block_sizes)


def gmm(lhs: jax.Array, rhs: jax.Array, ends: groups_lib.GroupEnds, *, out_dtype: Any,
        implementation: str | None = None, block_sizes: GmmBlockSizes | None = None
        ) -> jax.Array:
  """Grouped matmul on the canonical form (validated operands, group ends).

  `lhs [m, k]`, `rhs [g, k, n]`, `ends` static tuple or int32 array of length
  `<= g`. Integer operands (int8 or int4) are multiplied as int8.
  """
  implementation = resolve_implementation(implementation)
  compute = _operand_dtype(lhs.dtype, rhs.dtype)
  lhs, rhs = jnp.asarray(lhs).astype(compute), jnp.asarray(rhs).astype(compute)
  out_dtype = np.dtype(out_dtype)
  # Floats accumulate in float32 (SPEC B.4.3), then round once to out_dtype.
  acc_dtype = np.dtype(jnp.float32) if jnp.issubdtype(out_dtype, jnp.floating) else out_dtype
  if implementation == "reference":
    out = _gmm_reference(lhs, rhs, jnp.asarray(ends, jnp.int32), acc_dtype=acc_dtype)
  elif isinstance(ends, tuple):
    out = _gmm_static(lhs, rhs, ends=ends, acc_dtype=acc_dtype)
  else:
    m, g = lhs.shape[0], rhs.shape[0]
    block_sizes = block_sizes or GmmBlockSizes.for_problem(m, g)
    out = _gmm_dynamic(lhs, rhs, jnp.asarray(ends, jnp.int32), acc_dtype=acc_dtype,
                       block_sizes=block_sizes)
  return out.astype(out_dtype)


def _dot(a: jax.Array, b: jax.Array, acc_dtype: Any) -> jax.Array:
  return lax.dot(a, b, preferred_element_type=acc_dtype)


def gmm_reference(lhs: jax.Array, rhs: jax.Array, ends: groups_lib.GroupEnds, *,
                  acc_dtype: Any) -> jax.Array:
  """Dense masked grouped matmul: every row times every group's weight, then select."""
  m = lhs.shape[0]
  gid = groups_lib.row_group_ids(ends, m)
  out = jnp.zeros((m, rhs.shape[-1]), acc_dtype)
  for g in range(len(ends) if isinstance(ends, tuple) else ends.shape[0]):
    out = jnp.where((gid == g)[:, None], _dot(lhs, rhs[g], acc_dtype), out)
  return out


_gmm_reference = jax.jit(gmm_reference, static_argnames=("acc_dtype",))


@functools.partial(jax.jit, static_argnames=("ends", "acc_dtype"))
def _gmm_static(lhs, rhs, *, ends, acc_dtype):
  m, n = lhs.shape[0], rhs.shape[-1]
  pieces = [_dot(lhs[s:e], rhs[g], acc_dtype)
            for g, (s, e) in enumerate(zip(groups_lib.group_starts(ends), ends)) if e > s]
  if ends[-1] < m:
    pieces.append(jnp.zeros((m - ends[-1], n), acc_dtype))
  if not pieces:
    return jnp.zeros((m, n), acc_dtype)
  return jnp.concatenate(pieces) if len(pieces) > 1 else pieces[0]


@functools.partial(jax.jit, static_argnames=("acc_dtype", "block_sizes"))
def _gmm_dynamic(lhs, rhs, ends, *, acc_dtype, block_sizes: GmmBlockSizes):
  m, k = lhs.shape
  n = rhs.shape[-1]
  # Blocks never exceed the rows there are; tiny m is padded to one minimal block.
  min_block = min(block_sizes.min_block_m, _pow2_floor(m))
  rows = max(m, min_block)
  # A block spanning all rows makes XLA's CPU loop an order of magnitude slower
  # (measured); keep blocks strictly smaller than the row count.
  block = max(min_block, min(block_sizes.block_m, _pow2_floor(max(rows - 1, 1))))
  levels = []
  b = block // 2
  while b >= min_block:
    levels.append(b)
    b //= 2
  starts, sizes = groups_lib.group_starts(ends), groups_lib.group_sizes(ends)

  def write(out, r0, bl, wg):
    y = _dot(lax.dynamic_slice_in_dim(lhs, r0, bl), wg, acc_dtype)
    return lax.dynamic_update_slice_in_dim(out, y, r0, axis=0)

  def group_body(g, out):
    wg, start, size = rhs[g], starts[g], sizes[g]
    n_full = size // block
    out = lax.fori_loop(0, n_full, lambda i, o: write(o, start + i * block, block, wg), out)
    done = n_full * block
    for bl in levels:  # binary expansion of the remainder, largest block first
      take = size - done >= bl
      out = lax.cond(take, lambda o, r0=start + done, bl=bl: write(o, r0, bl, wg),
                     lambda o: o, out)
      done = done + jnp.where(take, bl, 0)
    rest = size - done  # < min_block rows: one masked block, start clamped inside [0, rows)

    def tail(o):
      r0 = start + done
      r0c = jnp.minimum(r0, rows - min_block)
      y = _dot(lax.dynamic_slice_in_dim(lhs, r0c, min_block), wg, acc_dtype)
      r = r0c + jnp.arange(min_block)
      keep = (r >= r0) & (r < r0 + rest)
      old = lax.dynamic_slice_in_dim(o, r0c, min_block)
      return lax.dynamic_update_slice_in_dim(o, jnp.where(keep[:, None], y, old), r0c, axis=0)

    return lax.cond(rest > 0, tail, lambda o: o, out)

  if rows > m:
    lhs = jnp.pad(lhs, ((0, rows - m), (0, 0)))
  out = lax.fori_loop(0, ends.shape[0], group_body, jnp.zeros((rows, n), acc_dtype))
  return out[:m]
