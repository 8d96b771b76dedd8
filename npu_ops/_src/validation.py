"""Uniform argument checks for the public boundary, and arguments into JAX arrays.

Every message names the argument, what was expected and what came, so a user
can fix the call without reading our source. Only static facts (shapes, dtypes,
modes) are checked here; data-dependent checks live in `groups.check_group_list`, and
the ops' checks of traced values (`debug_check`) are emitted only under `debug_checks`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify


# Part of jit's cache key and of the tracing context: a function traced with the checks on
# is traced again with them off, and back.
_DEBUG_CHECKS = jax.make_user_context(default_value=False)


def debug_checks(enabled: bool = True):
  """Context manager: the ops check the traced values they clamp (group lists, pair
  experts, group_offset, int4 values) with `jax.experimental.checkify.debug_check`,
  reported when the call is `checkify.checkify`-ed:

    with npu_ops.debug_checks():
      err, out = checkify.checkify(jax.jit(op))(x, w, group_list)
    err.throw()

  Off by default: a check leaves a checkify effect in the traced program, which
  `jax.export` cannot serialize. `npu_ops.check_group_list` checks a group list
  explicitly, with or without this.
  """
  return _DEBUG_CHECKS(check_bool("enabled", enabled))


def debug_check(pred: Any, msg: str) -> None:
  """`checkify.debug_check(pred, msg)` where `debug_checks` is on at trace time."""
  if _DEBUG_CHECKS.value:
    checkify.debug_check(pred, msg)


def describe(a: Any) -> str:
  """`int8[4, 8]`-style description of an array-like, or its type name."""
  if hasattr(a, "shape") and hasattr(a, "dtype"):
    return f"{np.dtype(a.dtype).name}{list(a.shape)}"
  return type(a).__name__


def fail(name: str, expected: str, got: Any, exc: type[Exception] = ValueError):
  raise exc(f"{name}: expected {expected}, got {got}")


def require(cond: bool, name: str, expected: str, got: Any,
            exc: type[Exception] = ValueError) -> None:
  if not cond:
    fail(name, expected, got, exc)


def check_array(name: str, a: Any) -> None:
  """Rejects anything without a shape and dtype (lists, scalars, None)."""
  if not (hasattr(a, "shape") and hasattr(a, "dtype")):
    fail(name, "an array (jax.Array or numpy.ndarray)", describe(a), TypeError)


def asarray(a: Any, dtype: Any = None) -> jax.Array:
  """`jnp.asarray(a, dtype)`, compiling nothing for a NumPy array.

  In JAX 0.10, `jnp.asarray` of a NumPy array outside a trace runs `lax.stage`, or a
  conversion, as an eager primitive: a program compiled for each new shape and dtype, one
  per NumPy operand of an eager call (docs/performance.md, "Compile time"). A NumPy array
  is converted on the host instead, to the dtype JAX would give it (float64 and int64
  narrowed when x64 is off), and moved by `jax.device_put`; under a trace that is a
  constant, as `jnp.asarray` makes it. Anything else goes to `jnp.asarray`.
  """
  if isinstance(a, np.ndarray):
    return jax.device_put(np.asarray(a, jax.dtypes.canonicalize_dtype(
        a.dtype if dtype is None else dtype)))
  return jnp.asarray(a, dtype)


def check_known_finite(name: str, a: Any, expected: str) -> None:
  """A concrete float array's values are finite (traced ones cannot be checked here)."""
  if a is not None and not isinstance(a, jax.core.Tracer):
    v = np.asarray(a, np.float32)
    bad = v[~np.isfinite(v)]
    if bad.size:
      fail(name, expected, f"{bad.flat[0]} in {describe(a)}")


def check_rank(name: str, a: Any, ranks: int | Iterable[int]) -> None:
  check_array(name, a)
  ranks = (ranks,) if isinstance(ranks, int) else tuple(ranks)
  require(a.ndim in ranks, name,
          f"rank {' or '.join(map(str, ranks))}", f"rank {a.ndim} ({describe(a)})")


def check_dtype(name: str, a: Any, allowed: Sequence[Any]) -> None:
  check_array(name, a)
  allowed_dt = [np.dtype(d) for d in allowed]
  if np.dtype(a.dtype) not in allowed_dt:
    fail(name, f"dtype in {{{', '.join(d.name for d in allowed_dt)}}}",
         describe(a), TypeError)


def is_integer_dtype(dtype: Any) -> bool:
  return jnp.issubdtype(dtype, jnp.integer)


def check_int_option(name: str, value: Any, allowed: Sequence[int]) -> int:
  """A static integer mode (dequant_mode, group_list_type, ...)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    fail(name, f"a Python int in {list(allowed)}", repr(value), TypeError)
  require(int(value) in allowed, name, f"one of {list(allowed)}", value)
  return int(value)


def check_scale_groups(name: str, scale: Any, *, e: int, n: int, k: int,
                       ranks: tuple[int, ...] = (2, 3), n_or_1: bool = False) -> int:
  """A weight scale per channel `[e, n]` or per k group `[e, G, n]` with G dividing k
  (semantics B.1.4, B.4.3); `n_or_1` also admits one value per expert (`[e, 1]`, `[e, G, 1]`).
  Returns G (1 per channel)."""
  check_array(name, scale)
  cols = (n, 1) if n_or_1 else (n,)
  groups = scale.shape[1] if scale.ndim == 3 else 1
  ok = (scale.ndim in ranks and scale.shape[0] == e and scale.shape[-1] in cols
        and groups >= 1 and k % groups == 0)
  shapes = " or ".join(
      {2: f"[e={e}, n={n}]" + (" or [e, 1]" if n_or_1 else ""),
       3: f"[e={e}, G, n={n}] with G dividing k={k}"}[r] for r in ranks)
  require(ok, name, shapes, describe(scale))
  return groups


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
  """A static Python int (not a bool, not a traced value) `>= minimum`."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    hint = " (it sets a shape, so it cannot be traced)" if hasattr(value, "aval") else ""
    fail(name, f"a Python int{hint}", repr(value), TypeError)
  if minimum is not None:
    require(value >= minimum, name, f"an int >= {minimum}", value)
  return int(value)


def check_dim(name: str, value: Any, *, minimum: int = 0) -> Any:
  """A static size: a Python int `>= minimum`, or a symbolic dimension (jax.export)."""
  return value if jax.export.is_symbolic_dim(value) else check_int(name, value,
                                                                     minimum=minimum)


def check_dtype_arg(name: str, value: Any) -> np.dtype:
  """A dtype argument (`jnp.int8`, `"float32"`, `np.dtype(...)`) as a NumPy dtype; bools and
  strings that name no dtype raise TypeError naming the argument. None raises too (NumPy
  would read it as float64): arguments where None means a default handle it first."""
  # an array is no dtype (np.dtype would read an array's own dtype: jnp.asarray(1) as int32)
  array = isinstance(value, (np.ndarray, np.generic, jax.Array))
  if value is None or isinstance(value, (bool, np.bool_)) or array:
    fail(name, "a dtype (e.g. jnp.float32)", describe(value) if array else repr(value),
         TypeError)
  try:
    return np.dtype(value)
  except TypeError:
    fail(name, "a dtype (e.g. jnp.float32)", repr(value), TypeError)


def check_bool(name: str, value: Any) -> bool:
  """A static flag: a Python (or NumPy) bool, not a truthy string, number or array."""
  if not isinstance(value, (bool, np.bool_)):
    fail(name, "a bool", describe(value) if hasattr(value, "shape") else repr(value),
         TypeError)
  return bool(value)


def check_choice(name: str, value: Any, allowed: Sequence[Any], expected: str | None = None
                 ) -> Any:
  """A static option from `allowed` (strings, None): anything else raises naming it
  (ValueError for another string, else TypeError), before an `in` test could compare an
  array elementwise or hash a list."""
  if not any(value is a or (isinstance(value, str) and value == a) for a in allowed):
    fail(name, expected or f"one of {list(allowed)}",
         describe(value) if hasattr(value, "shape") else repr(value),
         ValueError if isinstance(value, str) else TypeError)
  return value


def check_float_array(name: str, a: Any) -> None:
  """A real floating-point array (float16/bfloat16/float32/float64...)."""
  check_array(name, a)
  if not jnp.issubdtype(a.dtype, jnp.floating):
    fail(name, "a float array", describe(a), TypeError)
