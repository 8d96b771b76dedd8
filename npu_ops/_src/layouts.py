"""Storage layouts of torch_npu tensors: int4-in-int32 words and FRACTAL_NZ.

int4 words (semantics B.0.3): 8 consecutive int4 values along the last dim share one
int32, value `t` in bits `[4t, 4t+3]` (LSB first, two's complement nibbles).

FRACTAL_NZ (semantics B.5): an ND matrix `A[..., R, C]` is stored as
`NZ[..., C1, R1, 16, c0]` with `NZ[..., c1, r1, i, j] = A[..., 16*r1 + i, c0*c1 + j]`,
zero padded, `c0 = 32 bytes / itemsize` (int4: 64, int8: 32, 16-bit: 16,
32-bit: 8). An NZ array carries two more dims than its ND form; the logical
`(R, C)` must be supplied to convert back (torch keeps it in a storage descriptor).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from npu_ops._src.validation import (asarray, check_array, check_dtype, check_int, debug_check,
                                     describe, fail, require)

INT4_PER_INT32 = 8
NZ_ROWS = 16  # r0: rows of one fractal
FORMAT_ND, FORMAT_NZ = 2, 29

_INT4_TYPES = (np.dtype(jnp.int4), np.dtype(jnp.uint4))
NZ_DTYPES = tuple(np.dtype(d) for d in (
    jnp.int4, jnp.int8, jnp.uint8, jnp.float8_e4m3fn, jnp.float8_e5m2,
    jnp.float16, jnp.bfloat16, jnp.float32, jnp.int32))


def unpack_int4(words: jax.Array, name: str = "words") -> jax.Array:
  """int32 words `[..., c/8]` -> int8 values `[..., c]` in [-8, 7]."""
  check_array(name, words)
  words = jnp.asarray(words)
  check_dtype(name, words, (jnp.int32,))
  require(words.ndim >= 1, name, "int32 words [..., c/8] (at least 1 dim)", describe(words))
  # Shift nibble t to the top, then arithmetic-shift back: sign extension for free.
  up = jnp.asarray([28 - 4 * t for t in range(INT4_PER_INT32)], jnp.int32)
  vals = jnp.right_shift(jnp.left_shift(words[..., None], up), 28)  # arithmetic: int32
  return vals.reshape(*words.shape[:-1], words.shape[-1] * INT4_PER_INT32).astype(jnp.int8)


def is_transposed_int4pack(words: Any, k: int) -> bool:
  """Whether int32 words `[..., r, c]` are torch_npu's transposed int4 pack of a `(k, n)`
  weight: `(n, k)` packed to `(n, k/8)`, then `.transpose(-1, -2)`: `[..., k/8, n]`
  (semantics B.2.1, B.6). Its rows are k/8, never k (k > 0): the shape tells it from the
  ND pack `[..., k, n/8]`."""
  return (np.dtype(words.dtype) == np.int32 and words.ndim >= 2 and words.shape[-2] != k
          and words.shape[-2] * INT4_PER_INT32 == k)


def unpack_transposed_int4pack(words: Any) -> jax.Array:
  """int32 words `[..., k/8, n]` packed along k (`is_transposed_int4pack`) -> int8 values
  `[..., k, n]`."""
  return jnp.swapaxes(unpack_int4(jnp.swapaxes(jnp.asarray(words), -1, -2), "weight"), -1, -2)


def pack_int4(values: jax.Array) -> jax.Array:
  """Integer values `[..., c]` in [-8, 7], c % 8 == 0 -> int32 words `[..., c/8]`.

  Float values raise TypeError, known values outside [-8, 7] ValueError (a nibble
  cannot hold them); traced ones are packed modulo 16 (their low nibble), as the hardware
  packer does, and reported under checkify with `npu_ops.debug_checks()`.
  """
  check_array("values", values)
  if not jnp.issubdtype(values.dtype, jnp.integer):
    fail("values", "an integer array (int4 values in [-8, 7])", describe(values), TypeError)
  require(values.ndim >= 1, "values", "[..., c] (at least 1 dim)", describe(values))
  check_int4_range("values", values)
  return _pack_int4(values)


def check_int4_range(name: str, values: Any) -> None:
  """Known values outside [-8, 7] raise, naming the first; traced ones go to checkify
  (`validation.debug_check`)."""
  if not isinstance(values, jax.core.Tracer):
    w = np.asarray(values)
    bad = (w < -8) | (w > 7)
    if bad.any():
      fail(name, "int4 values in [-8, 7]", f"{int(w[bad].flat[0])} at index "
           f"{tuple(int(i) for i in np.argwhere(bad)[0])}")
  else:
    debug_check(jnp.all((values >= -8) & (values <= 7)),
                f"{name}: expected int4 values in [-8, 7]")


@jax.jit  # one program (eager calls: not one per op)
def _pack_int4(values: jax.Array) -> jax.Array:
  """`pack_int4` without its checks: each value's low nibble."""
  values = jnp.asarray(values)
  c = values.shape[-1]
  require(c % INT4_PER_INT32 == 0, "values", "a last dim that is a multiple of 8", describe(values))
  nib = (values.astype(jnp.int32) & 0xF).astype(jnp.uint32)
  nib = nib.reshape(*values.shape[:-1], c // INT4_PER_INT32, INT4_PER_INT32)
  shifts = jnp.asarray([4 * t for t in range(INT4_PER_INT32)], jnp.uint32)
  words = jnp.sum(jnp.left_shift(nib, shifts), axis=-1, dtype=jnp.uint32)  # disjoint bits: sum == or
  return lax.bitcast_convert_type(words, jnp.int32)


def nz_c0(dtype: Any) -> int:
  """Columns per fractal: 32 bytes of the element type (int4: 64)."""
  dtype = np.dtype(dtype)
  if dtype in _INT4_TYPES:
    return 64
  return 32 // dtype.itemsize


def nz_shape(shape: tuple[int, ...], dtype: Any) -> tuple[int, ...]:
  """Storage shape of the NZ form of an ND array of `shape` (rank >= 2)."""
  *batch, r, c = shape
  c0 = nz_c0(dtype)
  return (*batch, -(-c // c0), -(-r // NZ_ROWS), NZ_ROWS, c0)


def to_nz(a: jax.Array) -> jax.Array:
  """ND `[..., R, C]` -> FRACTAL_NZ `[..., ceil(C/c0), ceil(R/16), 16, c0]`."""
  check_dtype("x", a, NZ_DTYPES)
  a = asarray(a)
  require(a.ndim >= 2, "x", "rank >= 2 for an ND matrix", describe(a))
  return _to_nz(a)


@jax.jit  # one program (eager calls: not one per op)
def _to_nz(a: jax.Array) -> jax.Array:
  c0 = nz_c0(a.dtype)
  b, back = _as_bytes(a)  # int4 is laid out as int8 values, same positions
  *batch, r, c = b.shape
  r1, c1 = -(-r // NZ_ROWS), -(-c // c0)
  b = jnp.pad(b, [(0, 0)] * len(batch) + [(0, r1 * NZ_ROWS - r), (0, c1 * c0 - c)])
  b = b.reshape(*batch, r1, NZ_ROWS, c1, c0)
  nb = len(batch)
  return back(b.transpose(*range(nb), nb + 2, nb, nb + 1, nb + 3))


def from_nz(a: jax.Array, rows: int, cols: int) -> jax.Array:
  """FRACTAL_NZ `[..., C1, R1, 16, c0]` -> ND `[..., rows, cols]` (drops padding)."""
  rows, cols = check_int("rows", rows, minimum=0), check_int("cols", cols, minimum=0)
  check_array("x", a)
  a = asarray(a)
  require(a.ndim >= 4, "x", "an NZ array of rank >= 4", describe(a))
  c0 = nz_c0(a.dtype)
  *batch, c1, r1, r0, c0_got = a.shape
  require(r0 == NZ_ROWS and c0_got == c0, "x",
          f"NZ fractals of [16, {c0}] for {np.dtype(a.dtype).name}", describe(a))
  require(c1 == -(-cols // c0) and r1 == -(-rows // NZ_ROWS), "x",
          f"NZ storage [..., {-(-cols // c0)}, {-(-rows // NZ_ROWS)}, 16, {c0}] for a logical "
          f"({rows}, {cols}) matrix", describe(a))
  return _from_nz(a, rows, cols)


@functools.partial(jax.jit, static_argnums=(1, 2))  # one program, as `_to_nz`
def _from_nz(a: jax.Array, rows: int, cols: int) -> jax.Array:
  *batch, c1, r1, _, c0 = a.shape
  b, back = _as_bytes(a)
  nb = len(batch)
  b = b.transpose(*range(nb), nb + 1, nb + 2, nb, nb + 3)
  return back(b.reshape(*batch, r1 * NZ_ROWS, c1 * c0)[..., :rows, :cols])


def _as_bytes(a: jax.Array):
  """(a as a reshapeable array, the cast back): int4 moves as int8 values."""
  if np.dtype(a.dtype) in _INT4_TYPES:
    return a.astype(jnp.int8), lambda b: b.astype(a.dtype)
  return a, lambda b: b


def npu_format_cast(x: Any, acl_format: int, *, shape: tuple[int, ...] | None = None) -> jax.Array:
  """`torch_npu.npu_format_cast` for ND (2) <-> FRACTAL_NZ (29).

  Args:
    x: array of dtype int4, int8, uint8, fp8, float16, bfloat16, float32 or int32.
      For `acl_format=29` an ND array `[..., R, C]` (rank >= 2); for
      `acl_format=2` an NZ array `[..., C1, R1, 16, c0]`.
    acl_format: 29 (FRACTAL_NZ) or 2 (ND).
    shape: with `acl_format=2`, the logical ND shape (`[..., R, C]`) to restore;
      NZ storage pads R and C, so it cannot be inferred. Ignored for 29.

  Returns:
    29: the NZ storage array `[..., ceil(C/c0), ceil(R/16), 16, c0]`, zero padded.
    2: the ND array of `shape`.
  """
  check_array("x", x)
  check_dtype("x", x, NZ_DTYPES)
  if isinstance(acl_format, bool) or not isinstance(acl_format, (int, np.integer)):
    fail("acl_format", "the int 29 (FRACTAL_NZ) or 2 (ND)", repr(acl_format), TypeError)
  if acl_format not in (FORMAT_ND, FORMAT_NZ):
    fail("acl_format", "29 (FRACTAL_NZ) or 2 (ND)", repr(acl_format))
  if shape is not None and not (isinstance(shape, (tuple, list)) and all(
      isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d >= 0 for d in shape)):
    fail("shape", "a tuple of non-negative Python ints (the logical ND shape)", repr(shape),
         TypeError)
  if acl_format == FORMAT_NZ:
    return to_nz(x)
  if shape is None:
    fail("shape", "the logical ND shape (..., R, C) when converting NZ to ND", None, TypeError)
  shape = tuple(int(s) for s in shape)
  require(x.ndim >= 4, "x", "FRACTAL_NZ storage [..., C1, R1, 16, c0] (rank >= 4) for "
          "acl_format=2", describe(x))
  require(len(shape) >= 2 and len(shape) + 2 == x.ndim and tuple(x.shape[:-4]) == shape[:-2],
          "shape", f"a logical shape of rank {x.ndim - 2} matching the batch dims of x "
          f"{describe(x)}", shape)
  return from_nz(x, shape[-2], shape[-1])


def npu_convert_weight_to_int4pack(weight: Any, inner_k_tiles: int = 0) -> jax.Array:
  """torch_npu.npu_convert_weight_to_int4pack: int32 int4 values -> packed words.

  Args:
    weight: int32 `[..., c]` (a `(k, n)` or `(n, k)` matrix, 2-D or 3-D) with values in
      [-8, 7] and c a multiple of 8, or the FRACTAL_NZ storage of a `(k, n)` one
      (rank 4: `[n/8, ceil(k/16), 16, 8]`, `npu_format_cast(w, 29)`). Concrete arrays are
      range-checked (ValueError); traced ones are checked under `jax.experimental.checkify`
      with `npu_ops.debug_checks()`.
    inner_k_tiles: reserved by torch_npu (ignored).

  Returns:
    int32 `[..., c/8]`: 8 values per word along the last dim, value t in bits
    `[4t, 4t+3]` (semantics B.3). To feed a transposed weight, pack `(n, k)` and
    transpose the packed `(n, k/8)` result, as torch_npu documents. An NZ weight is
    packed as ND and laid out as NZ again: `[ceil(n/64), ceil(k/16), 16, 8]` (B.3; the
    rows padding k to 16 pack to zero words, which NZ pads with anyway).
  """
  del inner_k_tiles
  check_dtype("weight", weight, (jnp.int32,))
  require(weight.ndim >= 2, "weight", "rank >= 2", describe(weight))
  if weight.ndim == 4:  # rank tells NZ from ND (semantics A.2)
    c1, r1, r0, c0 = weight.shape
    require((r0, c0) == (NZ_ROWS, nz_c0(weight.dtype)), "weight", "rank 2-3 (ND) or the "
            f"FRACTAL_NZ storage [n/8, ceil(k/16), {NZ_ROWS}, {nz_c0(weight.dtype)}] of an int32 "
            "(k, n) weight (rank 4)", describe(weight))
    check_int4_range("weight", weight)
    return to_nz(_pack_int4(from_nz(weight, r1 * NZ_ROWS, c1 * c0)))
  require(weight.shape[-1] % INT4_PER_INT32 == 0, "weight",
          "a last dim that is a multiple of 8", describe(weight))
  check_int4_range("weight", weight)
  return _pack_int4(weight)


def npu_convert_int4pack_to_weight(packed: Any) -> jax.Array:
  """Inverse of `npu_convert_weight_to_int4pack`: int32 words `[..., c/8]` -> int32 `[..., c]`."""
  return unpack_int4(packed, "packed").astype(jnp.int32)


def int4pack_to_native(packed: Any) -> jax.Array:
  """int32 words `[..., c/8]` -> native `jnp.int4` `[..., c]`."""
  return unpack_int4(packed, "packed").astype(jnp.int4)


def native_to_int4pack(values: Any) -> jax.Array:
  """native `jnp.int4` `[..., c]` (c % 8 == 0) -> int32 words `[..., c/8]`."""
  check_dtype("values", values, (jnp.int4,))
  require(values.ndim >= 1, "values", "[..., c] (at least 1 dim)", describe(values))
  require(values.shape[-1] % INT4_PER_INT32 == 0, "values", "a last dim that is a multiple of 8",
          describe(values))
  return _pack_int4(jnp.asarray(values).astype(jnp.int8))  # int4: always in range
