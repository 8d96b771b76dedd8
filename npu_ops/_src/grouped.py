"""Grouped matmuls with `jax.lax.ragged_dot` semantics, exact for integers.

* `grouped_matmul`: `out[rows of g] = lhs[rows of g] @ rhs[g]`, rows
  outside every group are 0. The forward of every MoE op here.
* `tgmm`: `out[g] = lhs[rows of g]^T @ rhs[rows of g]`, the k-grouped form
  (contraction over the grouped rows): the weight gradient of grouped_matmul, and
  torch_npu's group_type=2. Empty groups give a zero matrix.

Both are a block function run by `npu_ops._src.row_blocks`, which keeps the work
proportional to the real tokens (see there); tgmm covers each group's first
rows with one batched dot where that is cheaper (see `xla_tgmm`). `grouped_matmul` carries
a custom VJP built from the two: dlhs = matmul(dy, rhs^T), drhs = tgmm(lhs, dy).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.interpreters import ad, batching, mlir

from npu_ops._src import backend
from npu_ops._src import groups as groups_lib
from npu_ops._src import manual_axes
from npu_ops._src import reference
from npu_ops._src import row_blocks
from npu_ops._src.row_blocks import GmmBlockSizes
from npu_ops._src.validation import (asarray, check_dtype, check_dtype_arg, check_int, check_rank,
                                     describe, fail, require)
from pallas_kernels import common as pallas_common
from pallas_kernels import epilogue
from pallas_kernels.common import TileSizes

_INT_OPERANDS = tuple(np.dtype(d) for d in (jnp.int8, jnp.int4))
_FLOAT_OPERANDS = tuple(np.dtype(d) for d in (jnp.float32, jnp.bfloat16, jnp.float16))


def _operand_dtype(lhs_dtype: Any, rhs_dtype: Any) -> np.dtype:
  """Compute dtype of the dot: int8 for int4/int8 operands, else the float promotion."""
  if np.dtype(lhs_dtype) in _INT_OPERANDS:
    return np.dtype(jnp.int8)
  return np.dtype(jnp.promote_types(lhs_dtype, rhs_dtype))


def _precision_rank(dtype: np.dtype) -> tuple[int, int, int]:
  """XLA's order of result types (`primitive_util::HigherPrecisionType`, as `lax.dot`
  follows it): exponent range, then mantissa, then width; integers below floats."""
  if jnp.issubdtype(dtype, jnp.floating):
    info = jnp.finfo(dtype)
    return info.maxexp, info.nmant, info.bits
  return -1, -1, jnp.iinfo(dtype).bits


def default_out_dtype(lhs_dtype: Any, rhs_dtype: Any) -> np.dtype:
  """int32 for an integer pair (exact; ragged_dot gives int8), else `ragged_dot`'s: the
  operand type of higher precision (XLA's rule: bfloat16 for float16 x bfloat16, the float
  type for a float x integer pair)."""
  a, b = np.dtype(lhs_dtype), np.dtype(rhs_dtype)
  if a in _INT_OPERANDS and b in _INT_OPERANDS:
    return np.dtype(jnp.int32)
  return max(a, b, key=_precision_rank)


def _check_operands(lhs: Any, rhs: Any, preferred_element_type: Any) -> np.dtype:
  """Operand dtypes (int8 / int4, float32 / bfloat16 / float16, mixed as ragged_dot takes
  them) -> the output dtype."""
  check_dtype("lhs", lhs, _INT_OPERANDS + _FLOAT_OPERANDS)
  check_dtype("rhs", rhs, _INT_OPERANDS + _FLOAT_OPERANDS)
  int_pair = np.dtype(lhs.dtype) in _INT_OPERANDS and np.dtype(rhs.dtype) in _INT_OPERANDS
  out_dtype = (default_out_dtype(lhs.dtype, rhs.dtype) if preferred_element_type is None
               else check_dtype_arg("preferred_element_type", preferred_element_type))
  if int_pair and out_dtype not in (np.dtype(np.int32), np.dtype(np.float32)):
    fail("preferred_element_type", "int32 or float32 for integer operands", out_dtype.name,
         TypeError)
  if not int_pair and not jnp.issubdtype(out_dtype, jnp.floating):
    # An integer output of float products would be a silent truncation.
    fail("preferred_element_type", "a float dtype for float operands (integer outputs need "
         "int8/int4 operands)", out_dtype.name, TypeError)
  return out_dtype


def _float_pair(lhs: Any, rhs: Any) -> tuple[Any, Any]:
  """A float x integer pair with the integer operand in the float one's type (exact: int8
  and int4 values are floats of every width), as `lax.dot` multiplies it; else as given."""
  dtypes = [np.dtype(a.dtype) for a in (lhs, row_blocks.first(rhs))]
  if (dtypes[0] in _INT_OPERANDS) == (dtypes[1] in _INT_OPERANDS):
    return lhs, rhs
  to = next(d for d in dtypes if d not in _INT_OPERANDS)
  cast = lambda a: jnp.asarray(a).astype(to)
  return cast(lhs), tuple(map(cast, rhs)) if isinstance(rhs, tuple) else cast(rhs)


def _check_block_sizes(block_sizes: Any) -> None:
  if block_sizes is not None and not isinstance(block_sizes, GmmBlockSizes):
    fail("block_sizes", "None or an npu_ops.GmmBlockSizes", repr(block_sizes), TypeError)


def grouped_matmul(lhs: jax.Array, rhs: jax.Array, group_sizes: Any, precision: Any = None,
                   preferred_element_type: Any = None, group_offset: Any = None, *,
                   implementation: str | None = None,
                   block_sizes: GmmBlockSizes | None = None, interpret: bool = False,
                   tiles: TileSizes | None = None) -> jax.Array:
  """Grouped matmul with `jax.lax.ragged_dot` semantics: a drop-in for
  `ragged_dot(lhs, rhs, group_sizes, precision, preferred_element_type, group_offset)`
  (which refuses `group_offset` today). Works under jit, vmap, grad, jvp and higher
  orders (a bilinear primitive, see the end of this module). Where it differs from
  ragged_dot: an integer pair gives int32 by default (ragged_dot: int8, wrapping), a float
  operand with an integer `preferred_element_type` raises (ragged_dot truncates), and
  there is no `out_sharding`.

  Args:
    lhs: `[m, k]` int8 / int4, or float32 / bfloat16 / float16.
    rhs: `[g, k, n]` of the same kinds; or a list /
      tuple of g `[k, n]` arrays (one per group, the form torch_npu takes): the XLA
      path then reads each in place, where it copies `rhs[g]` out of a stacked array
      for every non-empty group (docs/performance.md, "Weights as a list of experts",
      has the speed-up). Keep weights in this form across calls (as model
      parameters, or prepared once with `list(w)`); listing a stacked array inside a
      jitted function copies it all. Lists differentiate in reverse mode (grad, vjp;
      the gradient of rhs is a tuple too), not in forward mode (jvp).
    group_sizes: rows per group, `len <= g`: Python ints (static: checked at
      trace time) or an int32/int64 array (dynamic: one compilation for all values).
      Invalid dynamic sizes are clamped (negative -> 0, total capped at m; see
      `npu_ops._src.groups`). With `group_offset`: all G groups of every shard.
    group_offset: expert parallelism (megablox semantics): rhs holds the g local
      experts, global groups `[group_offset, group_offset + g)`; rows of other groups
      give 0 (and zero gradients). A Python int or a scalar int array (traced: one
      compilation for every offset; out-of-range values are clamped to `[0, G - g]`).
      The Pallas kernels skip the other rows in their metadata and the XLA path (a list
      of weights too) in its loops' bounds, as does the weight gradient (tgmm): no row
      is copied.
      A float operand with an integer one (weight-only quantization, as ragged_dot
      takes it): the integer operand is converted to the float's dtype (exact), once
      per call (a pass over the weights when they are the integer operand).
    precision: as in `jax.lax.dot` (None, a `jax.lax.Precision` or its name, a pair,
      or a `jax.lax.DotAlgorithmPreset` / its name / a `DotAlgorithm`): how TPU and GPU
      multiply float operands (e.g. HIGHEST for full float32 products on the MXU, no
      TF32 on GPU); used by the forward and both VJP products. Integer operands are
      exact whatever it says; CPU computes float32 products in float32 anyway. The
      kernels take Precision values: a dot algorithm runs on XLA (named kernels raise).
    preferred_element_type: output dtype. Default: int32 for integer operands
      (exact accumulation; ragged_dot would return int8), else ragged_dot's: the
      operand type of higher precision (XLA's rule: bfloat16 for float16 x bfloat16).
      Float operands accumulate in float32.
    implementation: None, "xla", "reference", "pallas_tpu" or "pallas_gpu"
      (see `npu_ops._src.backend`; the kernels multiply int4 operands as int8, widened
      by XLA first).
    block_sizes: row blocks of the XLA path (default from the shapes).
    interpret: run a Pallas kernel in interpret mode.
    tiles: the kernels' tile sizes (default from the shapes).

  Returns:
    `[m, n]` of `preferred_element_type`; rows outside every group are 0.
  """
  check_rank("lhs", lhs, 2)
  rhs = _check_experts(rhs)
  first = row_blocks.first(rhs)
  out_dtype = _check_operands(lhs, first, preferred_element_type)
  lhs, rhs = _float_pair(lhs, rhs)
  first = row_blocks.first(rhs)
  m, k = lhs.shape
  g, k_rhs = row_blocks.num_groups_of(rhs), first.shape[-2]
  require(k_rhs == k, "rhs", f"[g, k={k}, n] to match lhs {describe(lhs)}", describe(first))
  _check_block_sizes(block_sizes)
  precision = canonical_precision(precision)
  backend.resolve(implementation, pallas_common.Problem(
      "gmm", m, k, first.shape[-1], g, np.dtype(lhs.dtype).name, np.dtype(out_dtype).name,
      dot_algorithm=is_dot_algorithm(precision)), interpret=interpret, tiles=tiles)
  run = dict(out_dtype=out_dtype, implementation=implementation, block_sizes=block_sizes,
             interpret=interpret, tiles=tiles, precision=precision)
  product = experts_matmul if isinstance(rhs, tuple) else differentiable_matmul
  if group_offset is None:
    return product(lhs, rhs, groups_lib.ends_from_sizes(group_sizes, m, g), **run)
  ends = groups_lib.ends_from_sizes(group_sizes, m, max(g, groups_lib.num_listed(group_sizes)))
  local, shift = groups_lib.local_groups(ends, group_offset, g)
  return product(lhs, rhs, local, start=shift, **run)  # no path moves the rows


def _check_experts(rhs: Any) -> row_blocks.Experts:
  """rhs `[g, k, n]`, or a list / tuple of g `[k, n]` arrays (-> a tuple)."""
  if not isinstance(rhs, (list, tuple)):
    check_rank("rhs", rhs, 3)
    # else group_sizes would be blamed ("between 1 and 0 entries") for a weight of no experts
    require(rhs.shape[0] >= 1, "rhs", "[g, k, n] with at least one group (g >= 1)",
            describe(rhs))
    return rhs
  require(len(rhs) >= 1, "rhs", "a non-empty list of [k, n] arrays", "[]")
  for i, r in enumerate(rhs):
    check_rank(f"rhs[{i}]", r, 2)
    require(r.shape == rhs[0].shape and r.dtype == rhs[0].dtype, f"rhs[{i}]",
            f"the shape and dtype of rhs[0] {describe(rhs[0])}", describe(r))
  return tuple(asarray(r) for r in rhs)


class Run(NamedTuple):
  """How a grouped matmul runs (hashable: a parameter of the primitives below)."""
  implementation: str | None = None
  block_sizes: GmmBlockSizes | None = None
  interpret: bool = False
  tiles: TileSizes | None = None
  precision: Any = None  # canonical_precision's form


def canonical_precision(precision: Any) -> Any:
  """`precision` as `lax.dot` takes it -> a hashable canonical form: None, a
  `lax.Precision` or a pair of them, a `lax.DotAlgorithmPreset` or a `lax.DotAlgorithm`."""
  if precision is None or isinstance(precision, (lax.DotAlgorithm, lax.DotAlgorithmPreset)):
    return precision
  if isinstance(precision, str) and precision in lax.DotAlgorithmPreset.__members__:
    return lax.DotAlgorithmPreset[precision]
  try:
    if isinstance(precision, (tuple, list)) and len(precision) == 2:
      return tuple(lax.Precision(p) for p in precision)
    if isinstance(precision, (str, lax.Precision)):
      return lax.Precision(precision)
  except (ValueError, KeyError):
    pass
  fail("precision", "None, a jax.lax.Precision or its name ('default', 'high', 'highest'), "
       "a pair of them, or a jax.lax.DotAlgorithmPreset (or its name) or DotAlgorithm",
       repr(precision))


def is_dot_algorithm(precision: Any) -> bool:
  """A canonical precision that names a dot algorithm (the kernels take lax.Precision)."""
  return isinstance(precision, (lax.DotAlgorithm, lax.DotAlgorithmPreset))


def matmul(lhs: jax.Array, rhs: jax.Array, ends: groups_lib.GroupEnds, *, out_dtype: Any,
        implementation: str | None = None, block_sizes: GmmBlockSizes | None = None,
        interpret: bool = False, tiles: TileSizes | None = None,
        transpose_rhs: bool = False, precision: Any = None, start: Any = None) -> jax.Array:
  """Grouped matmul on the canonical form (validated operands, group ends).

  `lhs [m, k]`, `rhs [g, k, n]` (`[g, n, k]`, used as its transpose, with
  `transpose_rhs`: the VJP's `dy @ rhs^T`, which the kernels read in place) or a tuple
  of g such matrices (`row_blocks.Experts`: the XLA path reads them in place; the
  others stack them), `ends` static tuple or int32 array of length `<= g`, counted
  from row `start` (an int32 scalar: group_offset's local groups; None: row 0; rows
  outside the groups give 0). Integer operands (int8 or int4) are multiplied as int8.
  """
  m, k = lhs.shape
  first = row_blocks.first(rhs)
  n = first.shape[-2 if transpose_rhs else -1]
  e = len(rhs) if isinstance(rhs, tuple) else rhs.shape[0]
  problem = pallas_common.Problem("gmm", m, k, n, e, np.dtype(lhs.dtype).name,
                                  np.dtype(out_dtype).name, transposed=transpose_rhs,
                                  dot_algorithm=is_dot_algorithm(precision))
  lhs, rhs, acc_dtype, impl = _prepare(lhs, rhs, out_dtype, implementation, problem)
  symbolic = is_symbolic(m) or is_symbolic(k) or is_symbolic(n)
  if transpose_rhs or symbolic:
    rhs = row_blocks.stacked(rhs)  # the XLA path copies a transposed rhs anyway (below)
  if symbolic:
    check_static_dims(implementation, m=m, k=k, n=n)
    rhs = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs

    @groups_lib.rows_from(start)
    def ragged(lhs, _):
      return lax.ragged_dot(lhs, rhs, _all_sizes(ends, rhs.shape[0]), precision=precision,
                            preferred_element_type=acc_dtype).astype(out_dtype)
    return ragged(lhs, None, start)

  op = Matmul(problem, interpret, ends if isinstance(ends, tuple) else None,
              np.dtype(out_dtype), acc_dtype, block_sizes, precision,
              transpose_rhs=transpose_rhs)
  return backend.run(op, impl, (lhs, rhs, jnp.asarray(ends, jnp.int32), start), tiles)


@dataclasses.dataclass(frozen=True)
class _Product(backend.GroupedOp):
  """What both grouped products take (`args`: lhs, rhs, the int32 ends, the start row or
  None): the output dtype, the accumulator's, the XLA path's blocks, the dot precision."""
  out_dtype: np.dtype
  acc_dtype: np.dtype
  block_sizes: GmmBlockSizes | None
  precision: Any


@dataclasses.dataclass(frozen=True)
class Matmul(_Product):
  """The grouped matmul on its implementations (`backend.GroupedOp`), as `matmul` says."""
  transpose_rhs: bool

  def kernel(self, module, tiles, lhs, rhs, ends, start):
    return module.gmm(lhs, row_blocks.stacked(rhs), self.ends_from_row0(ends, start),
                      start=start, out_dtype=self.out_dtype, tiles=tiles,
                      interpret=self.interpret, transpose_rhs=self.transpose_rhs,
                      precision=self.precision)

  def xla(self, lhs, rhs, ends, start):
    # XLA:CPU runs a dot against a transposed operand no faster than it copies the
    # transpose: one copy per call, not one per row block.
    return xla_matmul(lhs, self._untransposed(rhs), ends=self.ends(ends), start=start,
                   acc_dtype=self.acc_dtype, block_sizes=self.block_sizes,
                   precision=self.precision).astype(self.out_dtype)

  def reference(self, lhs, rhs, ends, start):  # the plain form: rows moved to row 0 and back
    rhs = row_blocks.stacked(self._untransposed(rhs))
    return groups_lib.rows_from(start)(lambda lhs: reference.grouped_matmul(
        lhs, rhs, self.ends(ends), out_dtype=self.out_dtype, precision=self.precision)
    )(lhs, start)

  def _untransposed(self, rhs):
    return jnp.swapaxes(rhs, 1, 2) if self.transpose_rhs else rhs


def dequantized_matmul(lhs: jax.Array, rhs: jax.Array, ends: groups_lib.GroupEnds,
                       col_scale: jax.Array, row_scale: jax.Array, *, out_dtype: Any,
                       implementation: str | None = None,
                       block_sizes: GmmBlockSizes | None = None, interpret: bool = False,
                       tiles: TileSizes | None = None) -> jax.Array:
  """int8 grouped matmul dequantized as A8W8 is (semantics B.1.3): row r of group g is
  `(float32(lhs[r] @ rhs[g]) * col_scale[g]) * row_scale[r]`, rows outside the groups 0,
  in `out_dtype` (a float type). `lhs [m, k]`, `rhs [g, k, n]` int8, `ends` as in `matmul`,
  `col_scale` float32 `[g, n]`, `row_scale` float32 `[m]`. The kernels dequantize in their
  epilogue, so no int32 product is written; not differentiable (integer products)."""
  m, k = lhs.shape
  e, _, n = rhs.shape
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  if is_symbolic(m) or is_symbolic(k) or is_symbolic(n):  # ragged_dot, then the dequant
    acc = matmul(lhs, rhs, ends, out_dtype=jnp.int32, implementation=implementation)
    return _dequantize(acc, ends, f32(col_scale), f32(row_scale), np.dtype(out_dtype))
  problem = pallas_common.Problem("gmm", m, k, n, e, np.dtype(lhs.dtype).name,
                                  np.dtype(out_dtype).name)
  impl = backend.resolve(implementation, problem, interpret=interpret, tiles=tiles)
  op = DequantizedMatmul(problem, interpret, ends if isinstance(ends, tuple) else None,
                         np.dtype(out_dtype), np.dtype(jnp.int32), block_sizes, None)
  return backend.run(op, impl, (lhs, rhs, jnp.asarray(ends, jnp.int32), None, f32(col_scale),
                                f32(row_scale)), tiles)


@dataclasses.dataclass(frozen=True)
class DequantizedMatmul(_Product):
  """`dequantized_matmul` on its implementations (`backend.GroupedOp`)."""
  no_derivative = "dequantized_matmul: integer products have no derivative"

  def kernel(self, module, tiles, lhs, rhs, ends, start, col_scale, row_scale):
    return module.gmm(lhs, rhs, self.ends_from_row0(ends, start), start=start,
                      out_dtype=self.out_dtype, tiles=tiles, interpret=self.interpret,
                      scales=(col_scale, row_scale))

  def xla(self, lhs, rhs, ends, start, col_scale, row_scale):
    acc = xla_matmul(lhs, rhs, ends=self.ends(ends), start=start, acc_dtype=self.acc_dtype,
                     block_sizes=self.block_sizes)
    return _dequantize(acc, self.ends(ends), col_scale, row_scale, self.out_dtype)

  def reference(self, lhs, rhs, ends, start, col_scale, row_scale):
    acc = reference.grouped_matmul(lhs, rhs, self.ends(ends), out_dtype=self.acc_dtype)
    return _dequantize(acc, self.ends(ends), col_scale, row_scale, self.out_dtype)


def _dequantize(acc, ends, col_scale, row_scale, out_dtype):
  """`dequantized_matmul`'s epilogue after an int32 product (XLA, the reference)."""
  gid = groups_lib.row_group_ids(ends, acc.shape[0])
  inside = gid < (len(ends) if isinstance(ends, tuple) else ends.shape[0])
  v = epilogue.dequant_a8w8(acc, groups_lib.per_row(col_scale, gid), row_scale[:, None])
  return jnp.where(inside[:, None], v, 0).astype(out_dtype)


# --- symbolic m (jax.export shape polymorphism) ---------------------------------------------
# Row blocks and kernel grids are planned from m, so a symbolic m lowers to XLA's own
# `ragged_dot` (native on TPU; same semantics: rows past the groups give 0).


def is_symbolic(dim: Any) -> bool:
  """A `jax.export` symbolic dimension rather than a Python int."""
  return not isinstance(dim, (int, np.integer))


def check_static_m(m: Any, implementation: str | None) -> None:
  """A Pallas kernel asked for by name needs a concrete m: say so, naming it."""
  check_static_dims(implementation, m=m)


def check_static_dims(implementation: str | None, **dims: Any) -> None:
  """Symbolic dims (jax.export) run on `ragged_dot` (the XLA path): a Pallas kernel asked
  for by name sizes its grid and tiles from them, so say which dim must be concrete."""
  named = ", ".join(f"{name}={d}" for name, d in dims.items() if is_symbolic(d))
  if named and implementation in backend.KERNELS:
    fail("implementation", f"None or 'xla' for symbolic {named} ({implementation!r} sizes its "
         "grid and tiles from them: export with concrete dims to get the kernel)",
         repr(implementation))


def _all_sizes(ends: groups_lib.GroupEnds, num_groups: int) -> jax.Array:
  """int32 `[num_groups]` group sizes: groups past len(ends) are empty."""
  sizes = jnp.asarray(groups_lib.group_sizes(ends), jnp.int32)
  return jnp.concatenate([sizes, jnp.zeros((num_groups - sizes.shape[0],), jnp.int32)])


def _prepare(lhs, rhs, out_dtype, implementation, problem):
  """Operands in their compute dtype, the accumulator dtype, and the implementation."""
  impl = backend.resolve(implementation, problem)
  first = row_blocks.first(rhs)
  compute = _operand_dtype(lhs.dtype, first.dtype)
  cast = lambda a: asarray(a, compute)
  lhs, rhs = cast(lhs), tuple(map(cast, rhs)) if isinstance(rhs, tuple) else cast(rhs)
  # Floats accumulate in float32 (semantics B.4.3), then round once to out_dtype.
  out_dtype = np.dtype(out_dtype)
  acc_dtype = np.dtype(jnp.float32) if jnp.issubdtype(out_dtype, jnp.floating) else out_dtype
  return lhs, rhs, acc_dtype, impl


@row_blocks.jit_by_ends("acc_dtype", "block_sizes", "precision")
def xla_matmul(lhs, rhs, *, ends, acc_dtype, block_sizes, precision=None, start=None):
  """The XLA path (row-block loops; operands in their compute dtype): `ends` counted from
  row `start` (None: 0); other rows give 0."""
  m, n = lhs.shape[0], row_blocks.first(rhs).shape[-1]
  # Rows are sliced in loops: they travel as uint16 when bf16 (see loop_storage). The
  # weights stay bf16: a group's weight is sliced once, inside the traversal's per-group
  # cond, which XLA does not hoist; a uint16 weight would be bitcast (copied) per block.
  lhs, lhs_view = row_blocks.loop_storage(lhs)

  def block_fn(out, w_g, r0, bl, mask):
    y = row_blocks.group_dot(lhs_view(lax.dynamic_slice_in_dim(lhs, r0, bl)), w_g,
                             precision=precision, preferred_element_type=acc_dtype)
    return row_blocks.write_rows(out, y, r0, mask)

  out = manual_axes.varying_as(jnp.zeros((m, n), acc_dtype), lhs, rhs, ends, start)
  return row_blocks.traverse(ends, m, out,
                             group_ctx=functools.partial(row_blocks.group_operand, rhs),
                             block_fn=block_fn, block_sizes=block_sizes,
                             start=0 if start is None else start, row_macs=lhs.shape[1] * n)


def tgmm(lhs: jax.Array, rhs: jax.Array, group_sizes: Any, *, num_groups: int | None = None,
         precision: Any = None, preferred_element_type: Any = None, group_offset: Any = None,
         implementation: str | None = None,
         block_sizes: GmmBlockSizes | None = None, interpret: bool = False,
         tiles: TileSizes | None = None) -> jax.Array:
  """k-grouped matmul: `out[g] = lhs[rows of g]^T @ rhs[rows of g]`.

  The weight gradient of `grouped_matmul` (`tgmm(x, dy, sizes)` = dW), and the
  k-axis grouping of torch_npu's grouped matmul (groups split the contraction).

  Args:
    lhs: `[m, k]`; rhs: `[m, n]` (dtypes as in `grouped_matmul`).
    group_sizes: rows per group (static ints or a dynamic array, as in
      `grouped_matmul`).
    num_groups: `g`, the number of output matrices (default len(group_sizes)).
    group_offset: as in `grouped_matmul`: the output holds the `num_groups` local groups
      `[group_offset, group_offset + num_groups)` of the G in `group_sizes` (num_groups
      is then required).
    precision, preferred_element_type, implementation, interpret, tiles: as in
      `grouped_matmul`.
    block_sizes: row blocks of the XLA path's accumulation (default 2048-row
      blocks: each block costs a pass over its group's `[k, n]` output; a
      group's last rows take one masked block of >= 32 rows).

  Returns:
    `[g, k, n]`; groups without rows (empty, or past len(group_sizes)) give 0.
  """
  check_rank("lhs", lhs, 2)
  check_rank("rhs", rhs, 2)
  out_dtype = _check_operands(lhs, rhs, preferred_element_type)
  lhs, rhs = _float_pair(lhs, rhs)
  m, k = lhs.shape
  require(rhs.shape[0] == m, "rhs", f"[m={m}, n] to match lhs {describe(lhs)}", describe(rhs))
  listed = groups_lib.num_listed(group_sizes)
  if group_offset is not None and num_groups is None:
    fail("num_groups", "the number of local groups with group_offset", None, TypeError)
  num_groups = listed if num_groups is None else check_int("num_groups", num_groups, minimum=1)
  _check_block_sizes(block_sizes)
  precision = canonical_precision(precision)
  backend.resolve(implementation, pallas_common.Problem(  # a named kernel's gap: at trace time
      "tgmm", m, k, rhs.shape[-1], num_groups, np.dtype(lhs.dtype).name,
      np.dtype(out_dtype).name, dot_algorithm=is_dot_algorithm(precision)),
      interpret=interpret, tiles=tiles)
  run = dict(num_groups=num_groups, out_dtype=out_dtype, implementation=implementation,
             block_sizes=block_sizes, interpret=interpret, tiles=tiles, precision=precision)
  if group_offset is None:
    return differentiable_tgmm(lhs, rhs, groups_lib.ends_from_sizes(group_sizes, m, num_groups),
                               **run)
  ends = groups_lib.ends_from_sizes(group_sizes, m, max(num_groups, listed))
  local, shift = groups_lib.local_groups(ends, group_offset, num_groups)
  return differentiable_tgmm(lhs, rhs, local, start=shift, **run)


def tgmm_ends(lhs: jax.Array, rhs: jax.Array, ends: groups_lib.GroupEnds, *, num_groups: int,
              out_dtype: Any, implementation: str | None = None,
              block_sizes: GmmBlockSizes | None = None, interpret: bool = False,
              tiles: TileSizes | None = None, precision: Any = None,
              start: Any = None) -> jax.Array:
  """`tgmm` on the canonical form (validated operands, group ends counted from row
  `start`, as in `matmul`: the kernels and the XLA path read the local rows where they are;
  the reference and a symbolic m take them moved to row 0)."""
  m, k = lhs.shape
  problem = pallas_common.Problem("tgmm", m, k, rhs.shape[-1], num_groups,
                                  np.dtype(lhs.dtype).name, np.dtype(out_dtype).name,
                                  dot_algorithm=is_dot_algorithm(precision))
  lhs, rhs, acc_dtype, impl = _prepare(lhs, rhs, out_dtype, implementation, problem)
  if is_symbolic(m) or is_symbolic(k) or is_symbolic(rhs.shape[-1]):
    check_static_dims(implementation, m=m, k=k, n=rhs.shape[-1])
    dims = lax.RaggedDotDimensionNumbers(dot_dimension_numbers=(([0], [0]), ([], [])),
                                         lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return lax.ragged_dot_general(_to_row0(lhs, start), _to_row0(rhs, start),
                                  _all_sizes(ends, num_groups), dims, precision=precision,
                                  preferred_element_type=acc_dtype).astype(out_dtype)

  op = TransposedMatmul(problem, interpret, ends if isinstance(ends, tuple) else None,
                        np.dtype(out_dtype), acc_dtype, block_sizes, precision,
                        num_groups=num_groups)
  return backend.run(op, impl, (lhs, rhs, jnp.asarray(ends, jnp.int32), start), tiles)


@dataclasses.dataclass(frozen=True)
class TransposedMatmul(_Product):
  """tgmm on its implementations (`backend.GroupedOp`), as `tgmm_ends` says."""
  num_groups: int

  def kernel(self, module, tiles, lhs, rhs, ends, start):
    return module.tgmm(lhs, rhs, self.ends_from_row0(ends, start), start=start,
                       num_groups=self.num_groups, out_dtype=self.out_dtype, tiles=tiles,
                       interpret=self.interpret, precision=self.precision)

  def xla(self, lhs, rhs, ends, start):
    return xla_tgmm(lhs, rhs, ends=self.ends(ends), start=start, num_groups=self.num_groups,
                    acc_dtype=self.acc_dtype, block_sizes=self.block_sizes,
                    precision=self.precision).astype(self.out_dtype)

  def reference(self, lhs, rhs, ends, start):  # the plain form: rows moved to row 0
    return reference.tgmm(_to_row0(lhs, start), _to_row0(rhs, start), self.ends(ends),
                          num_groups=self.num_groups, out_dtype=self.out_dtype,
                          precision=self.precision)


def _to_row0(rows: jax.Array, start: Any) -> jax.Array:
  return rows if start is None else groups_lib.shift_rows(rows, -start)


# What one pass over a group's `[k, n]` output matrix (a block's write, or read-add-write)
# costs, in rows of contraction (docs/performance.md, "How the CPU path stays fast"). Both
# sides scale with k * n, so one figure serves every shape.
_PASS_ROWS = 40


def tgmm_plan(sizes: Any, windows: tuple[int, ...], block: int) -> Any:
  """Index of the cheapest way to cover `sizes` (numpy: an int; jnp: traced).

  `0..len(windows)-1`: one batched dot over each group's first `windows[i]` rows, then
  the block loop over the rows past them; `len(windows)`: the block loop over every row.
  Costs are rows of contraction (computed, zeros included) plus `_PASS_ROWS` per block
  (each block passes over its group's output matrix). The batched dot writes each output
  matrix once; the block loop's first write comes on top of zeroing the output, which
  the batched dot's own first write replaces, so it is not counted on either side.
  """
  xp = np if isinstance(sizes, np.ndarray) else jnp
  groups = sizes.shape[0]
  costs = [groups * w + xp.sum(xp.maximum(sizes - w, 0))
           + _PASS_ROWS * xp.sum(row_blocks.block_calls(xp.maximum(sizes - w, 0), block))
           for w in windows]
  costs.append(xp.sum(sizes) + _PASS_ROWS * xp.sum(row_blocks.block_calls(sizes, block)))
  return xp.argmin(xp.stack(costs))


@row_blocks.jit_by_ends("num_groups", "acc_dtype", "block_sizes", "precision")
def xla_tgmm(lhs, rhs, *, ends, num_groups, acc_dtype, block_sizes, precision=None, start=None):
  """Per group, `lhs[rows]^T @ rhs[rows]`, accumulated in float32 / int32 (`ends` counted
  from row `start`, None: 0).

  Output-bound when groups hold few rows: every block of the row-block traversal
  passes over its group's `[k, n]` output matrix (an in-loop update that costs
  ~40 rows of contraction), and the loop's output starts as zeros. One batched dot
  over every group's first `w` rows (zeros past its size) instead writes each
  output matrix once, and only rows past a window take blocks. `tgmm_plan` picks,
  from the sizes (a `lax.switch` for dynamic ones), the cheapest of: windows of
  m / groups rows, of twice that (skewed groups: fewer groups overflow), or the
  traversal of every row (few, long groups). Windows are a copy of the rows: they
  are offered only while they take under a quarter of the output's memory.
  """
  m, k = lhs.shape
  n = rhs.shape[-1]
  static = isinstance(ends, tuple)
  lhs, lhs_view = row_blocks.loop_storage(lhs)
  rhs, rhs_view = row_blocks.loop_storage(rhs)
  contract_rows = (((0,), (0,)), ((), ()))

  def block_fn(out, g, r0, bl, mask, overwrite=False):
    x = lhs_view(lax.dynamic_slice_in_dim(lhs, r0, bl))
    y = rhs_view(lax.dynamic_slice_in_dim(rhs, r0, bl))
    if mask is not None:  # rows of other groups contribute nothing (not even inf * 0)
      x = jnp.where(mask[:, None], x, jnp.zeros((), x.dtype))
      y = jnp.where(mask[:, None], y, jnp.zeros((), y.dtype))
    y = lax.dot_general(x, y, contract_rows, precision=precision,
                        preferred_element_type=acc_dtype)
    if not (overwrite and mask is not None):
      y = lax.dynamic_index_in_dim(out, g, 0, False) + y
    return lax.dynamic_update_index_in_dim(out, y, g, 0)

  operands = (lhs, rhs, ends, start)  # what every output matrix's type follows (shard_map)
  zeros = lambda groups: manual_axes.varying_as(jnp.zeros((groups, k, n), acc_dtype), *operands)
  groups = len(ends) if static else ends.shape[0]
  sizes_np = np.diff(np.asarray((0,) + ends)) if static else None
  ends = jnp.asarray(ends, jnp.int32)
  starts, sizes = groups_lib.group_starts(ends), groups_lib.group_sizes(ends)
  starts = starts if start is None else starts + start
  # min 32, not 128: a group's remainder is one block now (row_blocks.remainder_blocks), and
  # 128-row blocks for groups of a few rows cost tgmm 17-30% on skewed lists (m <= 4096).
  block_sizes = block_sizes or GmmBlockSizes(block_m=2048, min_block_m=32)
  accumulate = functools.partial(row_blocks.traverse_segments, m=m, group_ctx=lambda g: g,
                                 block_fn=block_fn, block_sizes=block_sizes, row_macs=k * n)

  def window_dot(window):
    out = lax.dot_general(
        lhs_view(row_blocks.group_windows(lhs, starts, sizes, window)),
        rhs_view(row_blocks.group_windows(rhs, starts, sizes, window)),
        (((1,), (1,)), ((0,), (0,))), precision=precision, preferred_element_type=acc_dtype)
    if num_groups > groups:  # groups past len(ends) have no rows
      out = jnp.concatenate([out, zeros(num_groups - groups)])
    return out

  def windowed(i):
    # One traversal of the rows past the window, whichever window: its blocks compiled once.
    if isinstance(i, int) or len(windows) == 1:
      window = windows[i if isinstance(i, int) else 0]
      out = window_dot(window)
    else:
      out = lax.switch(i, [functools.partial(window_dot, w) for w in windows])
      window = jnp.asarray(windows, jnp.int32)[i]
    return accumulate(starts + window, jnp.maximum(sizes - window, 0), carry=out)

  def rowwise():
    # A group's masked block runs first (see row_blocks): it writes its matrix instead of
    # adding to the zeros, which saves a read of the output matrix per group.
    return accumulate(starts, sizes, carry=zeros(num_groups),
                      block_fn=functools.partial(block_fn, overwrite=True))

  if m == 0 or groups == 0:
    return zeros(num_groups)
  base = -(-m // groups)
  out_bytes = num_groups * k * n * np.dtype(acc_dtype).itemsize
  windows = tuple(w for w in (base, 2 * base)
                  if w <= m and 4 * groups * w * (k + n) * lhs.dtype.itemsize <= out_bytes)
  block = row_blocks.block_rows(m, block_sizes)[0]
  if static:
    plan = int(tgmm_plan(sizes_np, windows, block))
    return windowed(plan) if plan < len(windows) else rowwise()
  if not windows:
    return rowwise()
  plan = tgmm_plan(sizes, windows, block)
  return lax.cond(plan < len(windows), lambda: windowed(jnp.minimum(plan, len(windows) - 1)),
                  rowwise)


# --- differentiation -----------------------------------------------------------------------
# gmm and tgmm are bilinear. Each is a primitive whose JVP is the sum of two calls of itself,
# a tangent in place of one operand, and whose transpose with respect to either operand is
# a call of the other (or of itself): so jvp, vjp, jacfwd / jacrev and every higher order
# work, and every product runs on the fast implementations (the kernels included). The
# group ends are an operand without tangents; static ends travel as a parameter instead.

_matmul_p = jex_core.Primitive("npu_ops_grouped_matmul")
_tgmm_p = jex_core.Primitive("npu_ops_tgmm")


def differentiable_matmul(lhs: jax.Array, rhs: jax.Array, ends: groups_lib.GroupEnds, *,
                       out_dtype: Any, transpose_rhs: bool = False, start: Any = None,
                       **run: Any) -> jax.Array:
  """`matmul` under every JAX transform: d lhs = matmul(dy, rhs^T), d rhs = tgmm(lhs, dy),
  over the same groups (from row `start`, as in `matmul`). `run`: the fields of `Run`."""
  return _bind(_matmul_p, lhs, rhs, ends, start, out_dtype=np.dtype(out_dtype),
               transpose_rhs=transpose_rhs, run=Run(**run))


def differentiable_tgmm(lhs: jax.Array, rhs: jax.Array, ends: groups_lib.GroupEnds, *,
                        num_groups: int, out_dtype: Any, start: Any = None,
                        **run: Any) -> jax.Array:
  """`tgmm_ends` under every JAX transform: `out[g] = lhs[rows]^T @ rhs[rows]` gives
  `d lhs[rows] = rhs[rows] @ dy[g]^T` and `d rhs[rows] = lhs[rows] @ dy[g]`, two grouped
  matmuls over the same row groups (from row `start`; rows outside every group get 0). `run`: as
  above."""
  return _bind(_tgmm_p, lhs, rhs, ends, start, num_groups=num_groups,
               out_dtype=np.dtype(out_dtype), run=Run(**run))


def experts_matmul(lhs: jax.Array, rhs: tuple[jax.Array, ...], ends: groups_lib.GroupEnds, *,
                out_dtype: Any, start: Any = None, **run: Any) -> jax.Array:
  """`matmul` of per-group weights (a tuple of `[k, n]`): read in place by the XLA path.
  Reverse-mode derivatives by a custom VJP: d lhs = matmul(dy, stacked rhs^T) (a transposed
  rhs is copied anyway), d rhs = tgmm(lhs, dy) split per group. Groups from row `start`,
  as in `matmul`. `run`: as above."""
  run = Run(**run)
  if np.dtype(lhs.dtype) in _INT_OPERANDS:  # nothing to differentiate
    return matmul(lhs, rhs, ends, out_dtype=out_dtype, start=start, **run._asdict())
  static, array, start = _ends_operands(ends, start)
  return _experts_matmul(static, np.dtype(out_dtype), run, lhs, rhs, array, start)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _experts_matmul(static, out_dtype, run, lhs, rhs, ends, start):
  return matmul(lhs, rhs, ends if static is None else static, out_dtype=out_dtype,
             start=_start(start), **run._asdict())


def _experts_matmul_fwd(static, out_dtype, run, lhs, rhs, ends, start):
  return _experts_matmul(static, out_dtype, run, lhs, rhs, ends, start), (lhs, rhs, ends, start)


def _experts_matmul_bwd(static, out_dtype, run, residuals, ct):
  lhs, rhs, ends, start = residuals
  ends, start = (ends if static is None else static), _start(start)
  dlhs = differentiable_matmul(ct, jnp.stack(rhs), ends, out_dtype=lhs.dtype, transpose_rhs=True,
                            start=start, **run._asdict())
  drhs = differentiable_tgmm(lhs, ct, ends, num_groups=len(rhs), out_dtype=rhs[0].dtype,
                             start=start, **run._asdict())
  return dlhs, tuple(drhs[g] for g in range(len(rhs))), None, None


_experts_matmul.defvjp(_experts_matmul_fwd, _experts_matmul_bwd)


def _bind(prim, lhs, rhs, ends, start, **params):
  """Binds a primitive: the ends an operand (a size-0 placeholder when static: then a
  parameter), the start an int32 scalar operand (size 0 when absent: row 0)."""
  static, array, start = _ends_operands(ends, start)
  # Inside jax.shard_map the operands share one type, varying over every axis any of them
  # varies over (as lax's own primitives get them): the casts transpose to the psums that
  # a replicated operand's gradient needs.
  operands = manual_axes.varying_as((lhs, rhs, array, start), lhs, rhs, array, start)
  return prim.bind(*operands, static_ends=static, **params)


def _ends_operands(ends, start):
  """(static ends or None, int32 ends array, int32 start): size-0 placeholders for static
  ends and an absent start, NumPy ones (jnp.zeros compiled two programs in an eager call)."""
  static = ends if isinstance(ends, tuple) else None
  array = np.zeros((0,), np.int32) if static is not None else jnp.asarray(ends, jnp.int32)
  start = np.zeros((0,), np.int32) if start is None else jnp.asarray(start, jnp.int32)
  return static, array, start


def _start(start):
  return None if start.shape == (0,) else start


def _matmul_impl(lhs, rhs, ends, start, *, static_ends, out_dtype, transpose_rhs, run):
  return matmul(lhs, rhs, ends if static_ends is None else static_ends, out_dtype=out_dtype,
             transpose_rhs=transpose_rhs, start=_start(start), **run._asdict())


def _tgmm_impl(lhs, rhs, ends, start, *, static_ends, num_groups, out_dtype, run):
  return tgmm_ends(lhs, rhs, ends if static_ends is None else static_ends,
                   num_groups=num_groups, out_dtype=out_dtype, start=_start(start),
                   **run._asdict())


def _matmul_abstract(lhs, rhs, ends, start, *, transpose_rhs, out_dtype, **_):
  return manual_axes.shaped_array((lhs.shape[0], rhs.shape[1 if transpose_rhs else 2]),
                                  out_dtype, manual_axes.union(lhs))


def _tgmm_abstract(lhs, rhs, ends, start, *, num_groups, out_dtype, **_):
  return manual_axes.shaped_array((num_groups, lhs.shape[1], rhs.shape[1]), out_dtype,
                                  manual_axes.union(lhs))


def _bilinear_jvp(prim):
  def jvp(primals, tangents, **params):
    lhs, rhs, ends, start = primals
    dlhs, drhs, _, _ = tangents
    out = prim.bind(lhs, rhs, ends, start, **params)
    terms = [prim.bind(d, rhs, ends, start, **params) for d in (dlhs,) if type(d) is not ad.Zero]
    terms += [prim.bind(lhs, d, ends, start, **params) for d in (drhs,) if type(d) is not ad.Zero]
    if not terms:
      return out, ad.Zero(jax.core.get_aval(out).to_tangent_aval())
    return out, functools.reduce(jnp.add, terms)
  return jvp


def _zero_cotangents(lhs, rhs):
  return [ad.Zero(a.aval) if ad.is_undefined_primal(a) else None for a in (lhs, rhs)] + [None,
                                                                                          None]


def _matmul_transpose(ct, lhs, rhs, ends, start, *, static_ends, out_dtype, transpose_rhs, run):
  if type(ct) is ad.Zero:
    return _zero_cotangents(lhs, rhs)
  common = dict(static_ends=static_ends, run=run)
  dlhs = drhs = None
  if ad.is_undefined_primal(lhs):  # [m, k] = [m, n] @ rhs[g]^T: rows outside every group 0
    dlhs = _matmul_p.bind(ct, rhs, ends, start, out_dtype=lhs.aval.dtype,
                       transpose_rhs=not transpose_rhs, **common)
  if ad.is_undefined_primal(rhs):  # per group, lhs[rows]^T @ ct[rows] (stored transposed)
    a, b = (ct, lhs) if transpose_rhs else (lhs, ct)
    drhs = _tgmm_p.bind(a, b, ends, start, num_groups=rhs.aval.shape[0],
                        out_dtype=rhs.aval.dtype, **common)
  return [dlhs, drhs, None, None]


def _tgmm_transpose(ct, lhs, rhs, ends, start, *, static_ends, num_groups, out_dtype, run):
  if type(ct) is ad.Zero:
    return _zero_cotangents(lhs, rhs)
  common = dict(static_ends=static_ends, run=run)
  dlhs = drhs = None
  if ad.is_undefined_primal(lhs):  # [m, k] rows: rhs[rows] @ ct[g]^T
    dlhs = _matmul_p.bind(rhs, ct, ends, start, out_dtype=lhs.aval.dtype, transpose_rhs=True,
                       **common)
  if ad.is_undefined_primal(rhs):  # [m, n] rows: lhs[rows] @ ct[g]
    drhs = _matmul_p.bind(lhs, ct, ends, start, out_dtype=rhs.aval.dtype, transpose_rhs=False,
                       **common)
  return [dlhs, drhs, None, None]


# vmap with one batched operand and shared ends folds the batch into one call: matmul's lhs
# into its rows (row r becomes B consecutive rows, so the ends scale by B), any other
# operand into a column dimension (batch outer). Anything else maps over the batch.

def _merge(a, axis: int, pos: int):
  """Moves batch axis `axis` to `pos` and merges it with the dimension after it."""
  a = jnp.moveaxis(a, axis, pos)
  return a.reshape(a.shape[:pos] + (-1,) + a.shape[pos + 2:])


def _matmul_batch(args, dims, *, static_ends, out_dtype, transpose_rhs, run):
  (lhs, rhs, ends, start), (dl, dr, de, ds) = args, dims
  params = dict(out_dtype=out_dtype, transpose_rhs=transpose_rhs, run=run)
  if de is None and ds is None and dr is None:  # lhs batched
    b = lhs.shape[dl]
    rows = jnp.moveaxis(lhs, dl, 1)
    rows = rows.reshape(-1, rows.shape[-1])
    static = None if static_ends is None else tuple(e * b for e in static_ends)
    out = _matmul_p.bind(rows, rhs, ends if static is not None else ends * b, start * b,
                      static_ends=static, **params)
    return out.reshape(-1, b, out.shape[-1]), 1
  if de is None and ds is None and dl is None:  # rhs batched: columns [B * n]
    out = _matmul_p.bind(lhs, _merge(rhs, dr, 1 if transpose_rhs else 2), ends, start,
                      static_ends=static_ends, **params)
    return out.reshape(out.shape[0], rhs.shape[dr], -1), 1
  return _map_batch(_matmul_p, args, dims, static_ends=static_ends, **params)


def _tgmm_batch(args, dims, *, static_ends, num_groups, out_dtype, run):
  (lhs, rhs, ends, start), (dl, dr, de, ds) = args, dims
  params = dict(static_ends=static_ends, num_groups=num_groups, out_dtype=out_dtype, run=run)
  if de is None and ds is None and (dl is None) != (dr is None):  # [m, B * k] or [m, B * n]
    if dl is not None:
      out = _tgmm_p.bind(_merge(lhs, dl, 1), rhs, ends, start, **params)
      return out.reshape(num_groups, lhs.shape[dl], -1, out.shape[-1]), 1
    out = _tgmm_p.bind(lhs, _merge(rhs, dr, 1), ends, start, **params)
    return out.reshape(num_groups, out.shape[1], rhs.shape[dr], -1), 2
  return _map_batch(_tgmm_p, args, dims, **params)


def _map_batch(prim, args, dims, **params):
  """One primitive call per batch element, in a `lax.map` (each stays differentiable)."""
  moved = [None if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]

  def one(sliced):
    it = iter(sliced)
    return prim.bind(*[a if m is None else next(it) for a, m in zip(args, moved)], **params)
  return lax.map(one, [m for m in moved if m is not None]), 0


@functools.cache
def _compiled_bind(prim: Any, params: tuple[tuple[str, Any], ...]) -> Callable[..., Any]:
  return jax.jit(lambda *args: prim.bind(*args, **dict(params)))


def _compiled_impl(prim: Any) -> Callable[..., Any]:
  """An eager bind runs the primitive as one compiled program per set of parameters (as
  JAX's own primitives do), not its implementation op by op: that compiled a program for
  each small op outside the XLA path's jitted loop."""
  return lambda *args, **params: _compiled_bind(prim, tuple(sorted(params.items())))(*args)


for _prim, _impl, _abstract, _transpose, _batch in (
    (_matmul_p, _matmul_impl, _matmul_abstract, _matmul_transpose, _matmul_batch),
    (_tgmm_p, _tgmm_impl, _tgmm_abstract, _tgmm_transpose, _tgmm_batch)):
  _prim.def_impl(_compiled_impl(_prim))
  _prim.expansion = _impl  # what it lowers to (npu_ops.perf follows it)
  _prim.def_abstract_eval(_abstract)
  mlir.register_lowering(_prim, mlir.lower_fun(_impl, multiple_results=False))
  ad.primitive_jvps[_prim] = _bilinear_jvp(_prim)
  ad.primitive_transposes[_prim] = _transpose
  batching.primitive_batchers[_prim] = _batch
