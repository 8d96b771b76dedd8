"""torch_npu operand forms -> the canonical internal form (semantics A.2).

Canonical: ND arrays (`x [m, k]`, `weight [e, k, n]`) of int8, or of int4 values:
an int4 `x` as int8 values, an int4 weight as `jnp.int4` (4 bits a value, so a
kernel reads it in place); TensorLists are stacked along a leading expert axis.
Backends only ever see this form.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from npu_ops._src import layouts
from npu_ops._src.validation import asarray, check_array, check_dtype, describe, fail, require

INT8, INT4 = "int8", "int4"
_WEIGHT_DTYPES = tuple(np.dtype(d) for d in (jnp.int8, jnp.int32, jnp.int4))
_VALUE_DTYPES = tuple(np.dtype(d) for d in (jnp.int8, jnp.int4))  # weights read as they are
# The quantized scenarios, named by (x bits, weight bits) (semantics B.1.2, B.4.3).
A8W8, A8W4, A4W4 = "A8W8", "A8W4", "A4W4"
_SCENARIOS = {(INT8, INT8): A8W8, (INT8, INT4): A8W4, (INT4, INT4): A4W4}


def tensor_list(value: Any, name: str, *, expert_rank: int | tuple[int, ...]) -> Any:
  """A torch TensorList, checked: an array (returned as is), a list of one array (already
  stacked: that array; but one of a per-expert rank that no stacked array has, e.g. the
  `[k, n]` of `list(w)` for a one-expert `w`, is one expert), or a tuple of per-expert
  arrays of rank `expert_rank` with equal shapes and dtypes (not stacked: see
  `stack_tensor_list`). A one-element list of a rank both forms have (a rank-2 scale) is
  taken as stacked."""
  if not isinstance(value, (list, tuple)):
    check_array(name, value)
    return value
  require(len(value) >= 1, name, "a non-empty list of arrays", "[]")
  for i, v in enumerate(value):
    check_array(f"{name}[{i}]", v)
  ranks = (expert_rank,) if isinstance(expert_rank, int) else expert_rank
  if len(value) == 1:
    only = value[0]
    if only.ndim in ranks and only.ndim - 1 not in ranks:  # no stacked form has this rank
      return (asarray(only),)
    return only
  first = value[0]
  for i, v in enumerate(value):
    require(v.ndim in ranks and v.shape == first.shape and v.dtype == first.dtype,
            f"{name}[{i}]", f"per-expert arrays of rank {ranks} with equal shapes and dtypes "
            f"(like {name}[0] {describe(first)})", describe(v))
  return tuple(asarray(v) for v in value)


def stack_tensor_list(value: Any, name: str, *, expert_rank: int | tuple[int, ...]) -> Any:
  """A torch TensorList as one array with a leading expert axis (see `tensor_list`)."""
  value = tensor_list(value, name, expert_rank=expert_rank)
  return jnp.stack(value) if isinstance(value, tuple) else value


def weight_scales(value: Any, *, weight: Any, name: str = "weight_scale") -> Any:
  """Weight scales (a TensorList: `[e, n]` / `[e, G, n]`, or per expert `[n]` / `[G, n]`) as
  one array. A one-element list of a rank-2 array is one expert's per-group `[G, n]` where
  its first dim is not the weight's expert count, else stacked `[e, n]` (for one expert,
  `[1, n]` holds the same values either way)."""
  if isinstance(value, (list, tuple)) and len(value) == 1 and np.ndim(value[0]) == 2:
    experts = tensor_list(weight, "weight", expert_rank=(2, 4))
    experts = len(experts) if isinstance(experts, tuple) else experts.shape[0]
    if value[0].shape[0] != experts:
      check_array(f"{name}[0]", value[0])
      return jnp.asarray(value[0])[None]
  return stack_tensor_list(value, name, expert_rank=(1, 2))


class IntOperand(NamedTuple):
  values: jax.Array  # int8, or int4 values in [-8, 7] (int8 for x, jnp.int4 for weights)
  bits: str          # INT8 or INT4


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QArray:
  """A quantized operand as data (qwix's QArray): integer codes and the scale that
  dequantizes them, as every backend of the fused op takes them.

  Attributes:
    values: int8 codes; int4 ones (in [-8, 7]) as int8 for tokens, `jnp.int4` for weights
      (or still packed in int32 words `[e, k, n/8]`: `canonical_weight`'s `keep_words`).
    scale: float32, per token `[m]` for tokens; per k group and channel `[e, G, n]` for
      weights (G = 1: per channel; each k group is k / G rows of k).
    bits: INT8 or INT4 (static).
  """
  values: jax.Array
  scale: jax.Array
  bits: str = dataclasses.field(metadata=dict(static=True))

  @classmethod
  def of(cls, operand: IntOperand, scale: jax.Array) -> "QArray":
    return cls(operand.values, scale, operand.bits)


def scenario(x: QArray | IntOperand, w: QArray | IntOperand) -> str | None:
  """A8W8, A8W4 or A4W4 from the operands' bits (None: no such scenario)."""
  return _SCENARIOS.get((x.bits, w.bits))


def canonical_lhs(x: Any, name: str = "x", keep_words: bool = False) -> IntOperand:
  """`x`: int8 `[m, k]`, int32 words `[m, k/8]` (int4) or jnp.int4 `[m, k]` -> int8
  values `[m, k]`; with `keep_words`, int32 words stay packed (for a kernel that unpacks
  them itself: `token_values` gives the values)."""
  check_dtype(name, x, _WEIGHT_DTYPES)
  require(x.ndim == 2, name, "rank 2 ([m, k], or [m, k/8] int32 words)", describe(x))
  dtype = np.dtype(x.dtype)
  if dtype == np.int8:
    return IntOperand(asarray(x), INT8)
  if dtype == np.int32:
    return IntOperand(asarray(x) if keep_words else layouts.unpack_int4(x), INT4)
  return IntOperand(asarray(x, jnp.int8), INT4)


def token_values(values: jax.Array) -> jax.Array:
  """Token values as `canonical_lhs` gives them without `keep_words` (int8 `[m, k]`)."""
  return layouts.unpack_int4(values) if is_words(values) else values


def canonical_weight(weight: Any, *, k: int, n: int, name: str = "weight",
                     k_from: str = "k from x", keep_list: bool = False,
                     keep_words: bool = False) -> IntOperand:
  """Integer weights in any torch_npu form -> int8 or jnp.int4 values `[e, k, n]`.

  Forms: an array or a TensorList (see `stack_tensor_list`) of
  * int8 ND `[e, k, n]` or NZ `[e, n/32, k/16, 16, 32]`;
  * int32 words (8 int4 each) ND `[e, k, n/8]` or NZ `[e, n/64, k/16, 16, 8]`;
  * jnp.int4 ND `[e, k, n]` or NZ `[e, n/64, k/16, 16, 64]`.
  NZ dims are ceilings (zero padded). The logical k comes from x and n from the
  scale, as torch_npu infers them. ND int8 and jnp.int4 weights pass through as
  they are; int32 words and NZ are converted on every call (prepare them once with
  `layouts.int4pack_to_native` / `npu_format_cast(w, FORMAT_ND)` to avoid that), except
  ND words with `keep_words` (below).
  `k_from` says where k came from in error messages. With `keep_list`, a list of
  per-expert ND int8 / jnp.int4 `[k, n]` arrays stays a tuple (`row_blocks.Experts`: the
  XLA path reads each in place instead of copying it out of a stacked array). With
  `keep_words`, int32 words stay packed (ND `[e, k, n/8]`, bits INT4) for a kernel that
  unpacks them itself; `unpacked` turns them into values for anything else.
  """
  weight = tensor_list(weight, name, expert_rank=(2, 4))
  if isinstance(weight, tuple):
    first = weight[0]
    if keep_list and first.ndim == 2 and np.dtype(first.dtype) in _VALUE_DTYPES:
      require(tuple(first.shape) == (k, n), f"{name}[0]",
              f"ND [k={k}, n={n}] ({k_from}, n from the scale)", describe(first))
      return IntOperand(weight, INT8 if np.dtype(first.dtype) == np.int8 else INT4)
    weight = jnp.stack(weight)
  check_dtype(name, weight, _WEIGHT_DTYPES)
  # else the group list would be blamed ("between 1 and 0 entries") for no experts
  require(weight.ndim < 1 or weight.shape[0] >= 1, name, "at least one expert (e >= 1)",
          describe(weight))
  dtype = np.dtype(weight.dtype)
  packed = dtype == np.int32
  if packed:
    require(n % layouts.INT4_PER_INT32 == 0, name,
            "a logical n (from the scale) that is a multiple of 8 for int32-packed int4", n)
  cols = n // layouts.INT4_PER_INT32 if packed else n
  if weight.ndim == 3:
    require(tuple(weight.shape[1:]) == (k, cols), name,
            f"ND [e, k={k}, {'n/8=' if packed else 'n='}{cols}] ({k_from}, n from the scale)",
            describe(weight))
    nd = asarray(weight)
  elif weight.ndim == 5:
    expected = layouts.nz_shape((weight.shape[0], k, cols), dtype)
    require(tuple(weight.shape) == expected, name,
            f"FRACTAL_NZ storage {list(expected)} for a logical weight [e, {k}, {n}] ({k_from})",
            describe(weight))
    nd = layouts.from_nz(weight, k, cols)
  else:
    fail(name, "rank 3 (ND [e, k, n]) or rank 5 (FRACTAL_NZ), or a list of per-expert "
         "rank-2/4 arrays", describe(weight))
  if packed:
    return IntOperand(nd if keep_words else layouts.int4pack_to_native(nd), INT4)
  return IntOperand(nd, INT8 if dtype == np.int8 else INT4)


def is_words(values: Any) -> bool:
  """Whether weight or token values are int4 still packed in int32 words (`keep_words`)."""
  return not isinstance(values, tuple) and np.dtype(values.dtype) == np.int32


def unpacked(values: Any) -> Any:
  """Weight values as `canonical_weight` gives them without `keep_words`."""
  return layouts.int4pack_to_native(values) if is_words(values) else values
