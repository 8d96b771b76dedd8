"""group_list canonicalization: every torch_npu form becomes group *ends*.

Canonical form (semantics A.2, B.0.1): `ends`, the exclusive end row of each group,
non-decreasing, in `[0, m]`. Group `i` owns rows `[ends[i-1], ends[i])` with
`ends[-1] := 0`; rows at or beyond `ends[-1]` (the total) belong to no group.

* static:  `ends` is a tuple of Python ints (group_list given as a Python
  sequence). Shapes and work are known at trace time; invalid values raise
  `ValueError` at once.
* dynamic: `ends` is an int32 `jax.Array` (group_list given as a jax/numpy
  array). One compilation serves every value. Values known when the op is called
  (NumPy arrays, jax.Arrays in eager calls) are checked like a static list and raise
  `ValueError`; traced invalid values are clamped, never read out of bounds
  (semantics A.3 item 7):

    cumsum (type 0): ends[i] = min(m, max(0, max_{j<=i} group_list[j]))
                     (a decrease makes an empty group; the total is capped at m)
    count  (type 1): ends[i] = min(m, sum_{j<=i} max(0, group_list[j]))
                     (negative counts are empty groups; the total is capped at m)

  The same conditions are reported through `jax.experimental.checkify` when the
  caller enables it (`checkify.checkify(f)` traced under `npu_ops.debug_checks()`); see
  `check_group_list`.

(index, size) pairs (type 2, npu_grouped_matmul) name an expert per segment:
`group_segments` turns them into the ends of the segments (as counts) plus the
expert of each, and the op gathers each segment's weight.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Union

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import checkify

from npu_ops._src.validation import (asarray, check_dim, check_int, check_int_option, debug_check,
                                     describe, fail, is_integer_dtype, require)

GroupEnds = Union[tuple[int, ...], jax.Array]

CUMSUM, COUNT, PAIRS = 0, 1, 2
MAX_GROUPS = 1024  # torch_npu's limit on a group list (semantics B.0.1)


def is_static(group_list: Any) -> bool:
  """Python sequences of ints are static; arrays (jax or numpy) are dynamic."""
  return isinstance(group_list, (list, tuple))


def is_concrete(group_list: Any) -> bool:
  """Values known at trace time: NumPy arrays and jax.Arrays outside a trace."""
  return isinstance(group_list, np.ndarray) or (
      isinstance(group_list, jax.Array) and not isinstance(group_list, jax.core.Tracer))


def group_ends(group_list: Any, *, group_list_type: int, m: int, num_groups: int,
               name: str = "group_list") -> GroupEnds:
  """Converts a torch_npu group_list into canonical group ends.

  Args:
    group_list: Python sequence of ints (static) or a 1-D integer jax/numpy array
      (dynamic) of length `<= num_groups`.
    group_list_type: 0 (cumsum) or 1 (count).
    m: number of rows the groups index.
    num_groups: number of experts available (weight.shape[0]).
    name: argument name used in error messages.

  Returns:
    A tuple of ints (static) or an int32 array (dynamic) of length len(group_list).
  """
  group_list_type = check_int_option("group_list_type", group_list_type, (CUMSUM, COUNT))
  m = check_dim("m", m)
  num_groups = check_int("num_groups", num_groups, minimum=1)
  if is_static(group_list):
    values = list(group_list)
    for v in values:
      if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        fail(name, "a sequence of Python ints or an integer array", repr(group_list), TypeError)
    require(1 <= len(values) <= num_groups, name,
            f"between 1 and {num_groups} (number of experts) entries", len(values))
    if isinstance(m, (int, np.integer)):
      return _static_ends([int(v) for v in values], group_list_type, m, name)
    # A symbolic m (jax.export): the total is only known at run time, so the list is
    # treated as a dynamic one (clamped to m).
    group_list = np.asarray(values, np.int64)

  if not (hasattr(group_list, "shape") and hasattr(group_list, "dtype")):
    fail(name, "a sequence of Python ints or an integer array", describe(group_list), TypeError)
  require(is_integer_dtype(group_list.dtype), name, "an integer dtype",
          describe(group_list), TypeError)
  require(group_list.ndim == 1, name, "a 1-D array", describe(group_list))
  require(1 <= group_list.shape[0] <= num_groups, name,
          f"between 1 and {num_groups} (number of experts) entries", describe(group_list))
  concrete_m = isinstance(m, (int, np.integer))
  if is_concrete(group_list) and concrete_m:
    # Known values (eager calls, NumPy arrays) are checked like a static list: a counts
    # list passed as the cumsum default must not be clamped into a silent wrong answer.
    _static_ends(np.asarray(group_list).tolist(), group_list_type, m, name)
  top = m + 1 if concrete_m else np.iinfo(np.int32).max
  if isinstance(group_list, np.ndarray):
    group_list = _as_int32(group_list, top)
  # One compiled program for an eager call's checks and ends (op by op: a dozen compiles,
  # most of a small grouped matmul's first call); a symbolic m (jax.export) is no jit key.
  ends = _checked_ends_program if concrete_m else _checked_ends
  return ends(group_list, group_list_type, m, top, name)


def _checked_ends(group_list: Any, group_list_type: int, m: int, top: int,
                  name: str) -> jax.Array:
  gl = _as_int32(group_list, top)
  debug_check(_group_list_ok(gl, group_list_type, m),
              f"{name} is invalid for m={m} (negative count, decreasing cumsum, or total "
              "above m); values were clamped")
  return _dynamic_ends(gl, group_list_type, m)


_checked_ends_program = jax.jit(_checked_ends, static_argnums=(1, 2, 3, 4))


def _as_int32(group_list: Any, top: int) -> jax.Array:
  """Integer values as int32 with every invalid value kept invalid and every valid one
  intact: values above `top` (an int beyond any valid value) become `top`, negative ones
  -1. A plain cast would wrap int64 (JAX narrows it, x64 off) and unsigned values
  >= 2**31 (uint32 2**32-1 would read as -1, an empty group instead of "all rows")."""
  if isinstance(group_list, np.ndarray):
    if np.issubdtype(group_list.dtype, np.unsignedinteger):
      return asarray(np.minimum(group_list, np.uint64(top)).astype(np.int32))
    return asarray(np.clip(group_list, -1, top).astype(np.int32))
  gl = jnp.asarray(group_list)
  if jnp.issubdtype(gl.dtype, jnp.unsignedinteger) and gl.dtype.itemsize >= 4:
    gl = jnp.minimum(gl, jnp.asarray(top, gl.dtype))
  elif gl.dtype.itemsize > 4:  # a traced int64 (x64 on)
    gl = jnp.clip(gl, -1, top)
  return gl.astype(jnp.int32)


def _static_ends(values: list[int], group_list_type: int, m: int, name: str) -> tuple[int, ...]:
  if group_list_type == COUNT:
    require(all(v >= 0 for v in values), name, "non-negative counts", values)
    ends = np.cumsum(values).tolist()
  else:
    require(all(v >= 0 for v in values), name, "non-negative cumulative sums", values)
    require(all(b >= a for a, b in zip(values, values[1:])), name,
            "a non-decreasing cumsum (group_list_type=0; counts are group_list_type=1 where "
            "the op takes it: v2, not v1)",
            values)
    ends = values
  require(ends[-1] <= m, name, f"a total number of rows <= m={m}", ends[-1])
  return tuple(int(e) for e in ends)


def _dynamic_ends(gl: jax.Array, group_list_type: int, m: int) -> jax.Array:
  if group_list_type == COUNT:
    sizes = jnp.clip(gl, 0, m)
    if isinstance(m, (int, np.integer)) and sizes.shape[0] * (m + 1) < 2**31:  # no overflow
      return jnp.minimum(jnp.cumsum(sizes, dtype=jnp.int32), m)
    # Saturating prefix sum, min(a + b, m) written as min(a, m - b) + b: for a, b in
    # [0, m] no intermediate passes m (a + b itself overflowed for m > 2**30). An
    # associative scan: on TPU ~60 small fusions for 16 groups, where cumsum is one op.
    return lax.associative_scan(lambda a, b: jnp.minimum(a, m - b) + b, sizes)
  return lax.cummax(jnp.clip(gl, 0, m))


def _group_list_ok(gl: jax.Array, group_list_type: int, m: int) -> jax.Array:
  gl = gl.astype(jnp.int32)
  if group_list_type == COUNT:
    # Compare in float32 so an overflowing int32 sum cannot hide a large total.
    total = jnp.sum(gl.astype(jnp.float32))
    return jnp.all(gl >= 0) & (total <= m)
  return jnp.all(gl >= 0) & jnp.all(gl[1:] >= gl[:-1]) & (gl[-1] <= m)


def check_group_list(group_list: Any, m: int, group_list_type: int = CUMSUM) -> None:
  """checkify-compatible validation of a (possibly traced) group_list.

  Use inside a function wrapped with `jax.experimental.checkify.checkify`:

    err, out = checkify.checkify(lambda gl: (npu_ops.check_group_list(gl, m), f(gl))[1])(gl)
    err.throw()

  Under `npu_ops.debug_checks()` the ops emit these checks themselves
  (`checkify.debug_check`), so `checkify.checkify(op)` reports an invalid group_list
  without this call.
  """
  group_list_type = check_int_option("group_list_type", group_list_type, (CUMSUM, COUNT))
  m = check_dim("m", m)
  gl = group_list if hasattr(group_list, "shape") else np.asarray(group_list)
  require(gl.ndim == 1 and is_integer_dtype(gl.dtype), "group_list",
          "a 1-D integer array or a sequence of ints", describe(gl), TypeError)
  gl = jnp.asarray(gl, jnp.int32)
  checkify.check(_group_list_ok(gl, group_list_type, m),
                 f"group_list is invalid for m={m} (negative count, decreasing cumsum, "
                 "or total above m)")


def group_segments(group_list: Any, *, m: int, num_groups: int, name: str = "group_list"
                   ) -> tuple[GroupEnds, Any]:
  """(index, size) pairs (group_list_type 2, semantics B.0.1) -> (ends, experts).

  Row `r` of `group_list [R, 2]` is `[expert_r, size_r]`: the next `size_r` rows
  (in listed order) use expert `expert_r`. The segments are canonical groups of
  their own, so the result is the ends of the R segments (counts, as type 1)
  and the expert of each: a tuple of ints (static) or an int32 array (dynamic).
  Traced rows with an expert outside `[0, num_groups)` become empty segments
  of expert 0 (reported under checkify with `debug_checks`); known ones (Python lists, NumPy arrays,
  jax.Arrays outside a trace) raise `ValueError`.
  """
  if is_static(group_list):
    rows = [list(r) if isinstance(r, (list, tuple)) else r for r in group_list]
    require(all(isinstance(r, list) and len(r) == 2 for r in rows), name,
            "(index, size) pairs [[expert, size], ...] for group_list_type=2", repr(group_list))
    require(len(rows) >= 1, name, "at least one pair", repr(group_list))
    for r in rows:
      for v in r:
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
          fail(name, "pairs of Python ints", repr(group_list), TypeError)
    experts = tuple(int(r[0]) for r in rows)
    require(all(0 <= e < num_groups for e in experts), name,
            f"expert indices in [0, {num_groups})", list(experts))
    ends = group_ends([int(r[1]) for r in rows], group_list_type=COUNT, m=m,
                      num_groups=num_groups, name=name)
    return ends, experts
  if not (hasattr(group_list, "shape") and hasattr(group_list, "dtype")):
    fail(name, "pairs as Python ints or an integer array [R, 2]", describe(group_list), TypeError)
  require(is_integer_dtype(group_list.dtype), name, "an integer dtype",
          describe(group_list), TypeError)
  require(group_list.ndim == 2 and group_list.shape[1] == 2, name,
          "(index, size) pairs of shape [R, 2] for group_list_type=2", describe(group_list))
  if is_concrete(group_list):
    # Known experts are checked like a static list's: an unknown expert must not become
    # a silently empty segment (its rows would read 0). Traced ones are clamped (below).
    known_experts = np.asarray(group_list)[:, 0].tolist()
    require(all(0 <= e < num_groups for e in known_experts), name,
            f"expert indices in [0, {num_groups})", known_experts)
  top = (m if isinstance(m, (int, np.integer)) else np.iinfo(np.int32).max - 1)
  gl = _as_int32(group_list, max(top, num_groups) + 1)
  experts, sizes = gl[:, 0], gl[:, 1]
  known = (experts >= 0) & (experts < num_groups)
  debug_check(jnp.all(known), f"{name}: expert index outside [0, {num_groups}); those "
              "pairs were made empty")
  ends = group_ends(jnp.where(known, sizes, 0), group_list_type=COUNT, m=m,
                    num_groups=num_groups, name=name)
  return ends, jnp.where(known, experts, 0)


def group_starts(ends: GroupEnds) -> GroupEnds:
  if isinstance(ends, tuple):
    return (0,) + ends[:-1]
  return jnp.concatenate([jnp.zeros((1,), ends.dtype), ends[:-1]])


def group_sizes(ends: GroupEnds) -> GroupEnds:
  if isinstance(ends, tuple):
    return tuple(b - a for a, b in zip(group_starts(ends), ends))
  return ends - group_starts(ends)


def ends_from_sizes(sizes: Any, m: int, num_groups: int, name: str = "group_sizes") -> GroupEnds:
  """`ragged_dot`-style group sizes (counts) to canonical ends."""
  return group_ends(sizes, group_list_type=COUNT, m=m, num_groups=num_groups, name=name)


def num_listed(group_list: Any) -> int:
  """How many groups a static list or a 1-D array names (0 for anything else: the
  canonicalization then says what was wrong)."""
  if is_static(group_list):
    return len(group_list)
  shape = getattr(group_list, "shape", ())
  return int(shape[0]) if len(shape) == 1 else 0


def local_groups(ends: GroupEnds, group_offset: Any, num_local: int, *,
                 names: tuple[str, str] = ("group_sizes", "rhs")) -> tuple[GroupEnds, Any]:
  """megablox's `group_offset`: of the groups in `ends` (all G of them), the `num_local`
  from `group_offset` on, as `(local ends, shift)`: the local groups' ends counted from
  `shift`, the first row of local group 0. Rows of other groups belong to no local group.

  `group_offset`: a Python int (checked: `0 <= offset <= G - num_local`) or a scalar int
  array (traced values are clamped into that range, and reported under checkify with
  `debug_checks`).
  Static ends with a static offset stay static. `names`: the caller's names of the group
  list and of the local experts' weights, for its errors.
  """
  total = len(ends)
  list_name, experts_name = names
  if isinstance(group_offset, bool) or not (
      isinstance(group_offset, (int, np.integer)) or
      (hasattr(group_offset, "dtype") and is_integer_dtype(group_offset.dtype)
       and getattr(group_offset, "ndim", None) == 0)):
    fail("group_offset", "None, a Python int or a scalar integer array",
         describe(group_offset) if hasattr(group_offset, "dtype") else repr(group_offset),
         TypeError)
  require(num_local <= total, list_name, f"at least {num_local} groups (one per local "
          f"expert in {experts_name}) with group_offset", f"{total} groups")
  top = total - num_local
  if isinstance(group_offset, (int, np.integer)):
    require(0 <= group_offset <= top, "group_offset", f"an int in [0, {top}] (groups "
            f"{total} - local experts {num_local})", group_offset)
    off = int(group_offset)
    if isinstance(ends, tuple):
      shift = ends[off - 1] if off else 0
      return tuple(e - shift for e in ends[off:off + num_local]), shift
  else:
    if is_concrete(group_offset):  # known values are checked, as group lists are
      require(0 <= int(group_offset) <= top, "group_offset", f"an int in [0, {top}] (groups "
              f"{total} - local experts {num_local})", int(group_offset))
    debug_check((group_offset >= 0) & (group_offset <= top),
                f"group_offset outside [0, {top}]; it was clamped")
    # clipped before narrowing: a traced int64 (x64 on) must not wrap
    off = jnp.clip(jnp.asarray(group_offset), 0, top).astype(jnp.int32)
  ends = jnp.asarray(ends, jnp.int32)
  shift = jnp.where(off > 0, ends[jnp.maximum(off - 1, 0)], 0)
  return lax.dynamic_slice_in_dim(ends, off, num_local) - shift, shift


def shift_rows(a: jax.Array, shift: Any) -> jax.Array:
  """`a` with row `r` moved to `r + shift` (cyclically): local groups to row 0 and back."""
  if isinstance(shift, (int, np.integer)) and shift == 0:
    return a
  return jnp.roll(a, shift, axis=0)


def rows_from(shift: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
  """An XLA path taking groups that start at row 0, made to take them from row `shift`
  (the last argument: the traced start, or None): its row operands (the first) move to
  row 0 and its row outputs back. A static shift is used as such (a static roll)."""
  def wrap(fn):
    def moved(rows, *rest):
      *rest, start = rest
      if shift is None:
        return fn(rows, *rest)
      s = shift if isinstance(shift, (int, np.integer)) else start
      back = lambda a: shift_rows(a, s)
      out = fn(jax.tree.map(lambda a: shift_rows(a, -s), rows), *rest)
      return jax.tree.map(back, out)
    return moved
  return wrap


def row_group_ids(ends: GroupEnds, m: int, start: Any = None) -> jax.Array:
  """int32 [m]: the group of each row, `len(ends)` for rows outside every group (`ends`
  counted from row `start`; None: 0)."""
  if isinstance(ends, tuple) and start is None:
    return jnp.asarray(np.searchsorted(np.asarray(ends, np.int64), np.arange(m), side="right"),
                       jnp.int32)
  return _row_group_ids(jnp.asarray(ends, jnp.int32), m, 0 if start is None else start)


@functools.partial(jax.jit, static_argnums=1)  # one program (eager calls: not one per op)
def _row_group_ids(ends: jax.Array, m: int, start: Any) -> jax.Array:
  rows = jnp.arange(m, dtype=jnp.int32) - start
  gid = jnp.searchsorted(ends, rows, side="right").astype(jnp.int32)
  return jnp.where(rows < 0, ends.shape[0], gid)


def per_row(values: jax.Array, gid: jax.Array) -> jax.Array:
  """Per-group `[g, ...]` -> per-row `[m, ...]` by `row_group_ids`. Rows outside
  every group read the last group's values: callers zero those rows."""
  return jnp.take(values, jnp.minimum(gid, values.shape[0] - 1), axis=0)
