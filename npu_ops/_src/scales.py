"""Scale operands: float arrays, or 64-bit words carrying float32 bits.

A8W4 / A4W4 scale words (semantics B.0.4 item 2) hold a plain float32 bit pattern in
their low 32 bits. JAX disables 64-bit types by default, so such words arrive as:

* a NumPy int64/uint64 array (decoded exactly on the host);
* a jax int64/uint64 array (only with `jax_enable_x64`);
* an int32/uint32 array: the low words. This is also what a NumPy int64 array
  becomes when passed as an argument of a jitted function with x64 off (JAX
  narrows it modulo 2**32), so the decode stays exact in that case too;
* a float array, taken as the scale itself.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from npu_ops._src.validation import asarray, check_array, describe, fail

_WORD64 = (np.dtype(np.int64), np.dtype(np.uint64))
_WORD32 = (np.dtype(np.int32), np.dtype(np.uint32))


def float32_from_scale_words(scale: Any, name: str) -> jax.Array:
  """Decodes float32 scales from words (low 32 bits) or casts a float array."""
  check_array(name, scale)
  dtype = np.dtype(scale.dtype)
  if dtype in _WORD64:
    if isinstance(scale, np.ndarray):
      low = (scale.astype(np.uint64) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
      return asarray(low.view(np.float32))
    low = (scale.astype(jnp.uint64) & jnp.uint64(0xFFFFFFFF)).astype(jnp.uint32)
    return lax.bitcast_convert_type(low, jnp.float32)
  if dtype in _WORD32:
    if isinstance(scale, np.ndarray):  # bits reinterpreted on the host: no program
      return asarray(scale.view(np.float32))
    return lax.bitcast_convert_type(scale, jnp.float32)
  if jnp.issubdtype(dtype, jnp.floating):
    return asarray(scale, jnp.float32)
  fail(name, "float scales or int64/uint64 (or int32 low-word) scale words", describe(scale),
       TypeError)
