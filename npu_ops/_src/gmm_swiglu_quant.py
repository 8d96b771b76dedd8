"""`npu_grouped_matmul_swiglu_quant_v2` (and v1): grouped int matmul, dequant,
SwiGLU and dynamic per-token int8 quantization, with torch_npu semantics.

Per group `i` (rows `[start_i, end_i)` of x, expert weight `W_i`), semantics B.1:

  A8W8: C = (int32(x @ W_i) * w_scale[i]) * x_scale[r]
  A8W4: C = x_scale[r] * (sum_g s[i,g] * ((x - 8)_g @ W_i,g) + A[i])
        (the kernel's hi/lo nibble split: 16 * x_hi + x_lo = x - 8, exact in int32)
  A4W4: C = (int32(x @ W_i) * x_scale[r]) * w_scale[i]
  S = silu(C[:, :n/2]) * C[:, n/2:]            (A4W4: S *= smooth_scale[i])
  Q, Q_scale = per-row int8 quantization of S  (semantics A.3 item 3)

Rows at or beyond sum(group_list) give Q = 0 and Q_scale = 0 (semantics A.3 item 1).
The whole chain runs in the row-block loop of `npu_ops._src.row_blocks.traverse_staged`: each
row block's int8 dot (exact int32) is dequantized, SwiGLU'd and quantized right after it
is computed, so no `[m, n]` intermediate exists and the epilogue costs a few percent of the
matmul. With few rows per group (< 64 expected, or < 128 where the int32 product stays in
cache; `_epilogue_after`), the epilogue's fixed cost per block would dominate: there the
grouped matmul writes the int32 `[m, n]` product and the epilogue runs once over all rows
(same arithmetic, same bits). `implementation="reference"` runs `npu_ops._src.reference`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from npu_ops._src import backend
from npu_ops._src import gmm as gmm_lib
from npu_ops._src import groups as groups_lib
from npu_ops._src import layouts
from npu_ops._src import operands
from npu_ops._src import quant as quant_lib
from npu_ops._src import reference
from npu_ops._src import row_blocks
from npu_ops._src.validation import (check_array, check_dtype_arg, check_int_option, check_rank,
                                 check_scale_groups, describe, fail, require)
from npu_ops._src.operands import A4W4, A8W4, A8W8, QArray
from npu_ops._src.scales import float32_from_scale_words
from pallas_kernels import common as pallas_common
from pallas_kernels import epilogue
from pallas_kernels.common import TileSizes

_FLOAT_SCALES = tuple(np.dtype(d) for d in (jnp.float32, jnp.float16, jnp.bfloat16))
# dequant_dtype: aclnn 0 and torch's float32 code 6 both mean a float32 intermediate.
_DEQUANT_FP32 = (0, 6)
MAX_EXPERTS = 1024  # torch_npu's limit on e for this op


def npu_grouped_matmul_swiglu_quant_v2(
    x: Any, weight: Any, weight_scale: Any, x_scale: Any, group_list: Any, *,
    smooth_scale: Any = None, weight_assist_matrix: Any = None, bias: Any = None,
    dequant_mode: int = 0, dequant_dtype: Any = 0, quant_mode: int = 0, quant_dtype: Any = 0,
    group_list_type: int = 0, tuning_config: Sequence[int] | None = None,
    group_offset: Any = None, implementation: str | None = None, interpret: bool = False,
    tiles: TileSizes | None = None) -> tuple[jax.Array, jax.Array]:
  """Fused grouped matmul + dequant + SwiGLU + per-token int8 quant (torch_npu v2).

  Scenarios are told apart by dtypes (semantics B.1.2):

  * A8W8: x int8 `[m, k]`; weight int8 `[e, k, n]` (ND) or
    `[e, n/32, k/16, 16, 32]` (FRACTAL_NZ); weight_scale float32/16 `[e, n]`.
  * A8W4: x int8; weight int4 as int32 words `[e, k, n/8]` / NZ
    `[e, n/64, k/16, 16, 8]`, or jnp.int4 `[e, k, n]` / NZ `[e, n/64, k/16, 16, 64]`;
    weight_scale `[e, n]` (dequant_mode 0, per channel) or `[e, G, n]`
    (dequant_mode 1, G groups of k/G rows of k): int64/uint64 words with the
    float32 bits in the low word (NumPy arrays are fine with x64 off), int32 low
    words, or float32; weight_assist_matrix float32 `[e, n]` (default: the
    canonical `weight_assist_matrix(weight, weight_scale)`).
  * A4W4: x int4 (int32 words `[m, k/8]` or jnp.int4 `[m, k]`); weight int4 as
    above; weight_scale `[e, n]` (words or float); smooth_scale float32 `[e, n/2]`
    or `[e]` (default 1).

  weight, weight_scale and weight_assist_matrix may also be lists (a list of one
  stacked array, or one array per expert). A list of per-expert ND int8 / jnp.int4
  `[k, n]` weights is read in place by the XLA path, which copies each non-empty expert's
  weight out of a stacked array on every call: the fastest form on CPU (prepare it once,
  e.g. `list(w)` outside the jitted function; see docs/performance.md, "How the CPU path stays fast").
  The logical n is `weight_scale.shape[-1]`, k is taken from x.

  Args:
    x, weight, weight_scale: see above.
    x_scale: float32 `[m]`, per-token dequant scale of x.
    group_list: `[E]` with E <= e: Python ints (static) or an int32/int64 array
      (dynamic; one compilation for all values). cumsum (group_list_type 0) or
      counts (1). Invalid dynamic values are clamped (see `npu_ops._src.groups`).
    smooth_scale, weight_assist_matrix: see the scenarios.
    bias: reserved by torch_npu; must be None.
    dequant_mode: 0 per-channel weight scale, 1 per-group (A8W4 only).
    dequant_dtype: 0 (or 6, torch float32): float32 intermediate.
    quant_mode: 0 per token, 2 MX (blocks of 32 with e8m0 scales; semantics B.1.6).
    quant_dtype: 0 or 1 (int8), 23 / 24 (float8_e5m2 / float8_e4m3fn) or 45 (fp4, MX only;
      packed two a byte), or the dtype itself; per token takes int8 and fp8, MX fp8 and fp4.
    group_list_type: 0 cumsum, 1 count.
    group_offset: expert parallelism (a JAX extension, megablox semantics): weight holds
      the e local experts, global groups `[group_offset, group_offset + e)` of the G in
      group_list; rows of other groups are 0 in both outputs. A Python int or a scalar int
      array (traced: clamped to `[0, G - e]`); see `npu_ops.grouped_matmul`.
    tuning_config: `[expected tokens per expert, ...]`; a performance hint that
      sizes the row blocks of the XLA path and the kernels' row tiles (no
      numerical effect).
    implementation: None, "xla", "reference", "pallas_tpu" or "pallas_gpu"
      (`npu_ops._src.backend`; the kernels do A8W8, other scenarios fall back to XLA
      under None).
    interpret: run a Pallas kernel in interpret mode.
    tiles: the kernels' `TileSizes` (default: the kernel backend's `default_tiles`; on
      TPU the `npu_ops.perf` model's choice for the chip, `pallas_kernels.tpu_tiles`).

  Returns:
    (output `[m, n/2]` codes of quant_dtype (fp4: uint8 `[m, n/4]`), output_scale: float32
    `[m]` per token, or float8_e8m0fnu `[m, ceil(n/128), 2]` for MX). Rows at or beyond the
    group total are 0 in both.
  """
  spec = quant_lib.DynamicQuant.from_torch_npu(quant_dtype, quant_mode)
  dequant_mode = check_int_option("dequant_mode", dequant_mode, (0, 1, MX_INPUTS))
  if isinstance(dequant_dtype, (int, np.integer)) and not isinstance(dequant_dtype, bool):
    require(dequant_dtype in _DEQUANT_FP32, "dequant_dtype",
            "0 (float32; the only intermediate type of A2/A3)", dequant_dtype)
  else:
    require(check_dtype_arg("dequant_dtype", dequant_dtype) == np.float32, "dequant_dtype",
            "0 or float32", repr(dequant_dtype))
  if bias is not None:
    fail("bias", "None (reserved by torch_npu for this op)", describe(bias))
  tokens = expected_tokens(tuning_config)
  backend.check(implementation, interpret, tiles)
  if dequant_mode == MX_INPUTS:
    for name, value in (("smooth_scale", smooth_scale),
                        ("weight_assist_matrix", weight_assist_matrix)):
      if value is not None:
        fail(name, "None with MX inputs (dequant_mode=2)", describe(value))
    return _torch_npu_outputs(*_mx_inputs(
        x, weight, weight_scale, x_scale, group_list, group_list_type=group_list_type,
        group_offset=group_offset, spec=spec, implementation=implementation,
        interpret=interpret, tiles=tiles), spec)

  lhs = operands.canonical_lhs(x)
  m, k = lhs.values.shape
  weight_scale = operands.stack_tensor_list(weight_scale, "weight_scale", expert_rank=(1, 2))
  check_rank("weight_scale", weight_scale, (2, 3))
  n = weight_scale.shape[-1]
  require(n % 2 == 0, "weight_scale", "an even n (last dim; SwiGLU halves it)",
          describe(weight_scale))
  words = np.dtype(x.dtype) == np.int32  # an int32 x is int4 words, a common surprise
  w = operands.canonical_weight(
      weight, k=k, n=n, k_from=("k = 8 * x.shape[1]: an int32 x holds 8 int4 values a word "
                                "(A4W4)") if words else "k from x", keep_list=True)
  e = row_blocks.num_groups_of(w.values)
  require(e <= MAX_EXPERTS, "weight", f"at most {MAX_EXPERTS} experts (semantics B.1.2)",
          describe(weight))
  scenario = operands.scenario(lhs, w)
  if scenario is None:
    fail("weight", "int4 weights (int32 words or jnp.int4) for an int4 x", describe(weight),
         TypeError)

  # weight_scale -> float32 [e, G, n]
  if scenario == A8W8:
    require(np.dtype(weight_scale.dtype) in _FLOAT_SCALES, "weight_scale",
            "float32/float16/bfloat16 for A8W8", describe(weight_scale), TypeError)
  if dequant_mode == 1:
    require(scenario == A8W4, "dequant_mode", "0 unless the weight is int4 with an int8 x "
            "(per-group dequant is A8W4 only)", dequant_mode)
  k_groups = check_scale_groups("weight_scale", weight_scale, e=e, n=n, k=k,
                                ranks=(3,) if dequant_mode == 1 else (2,))
  scale = float32_from_scale_words(weight_scale, "weight_scale").reshape(e, k_groups, n)

  check_array("x_scale", x_scale)
  require(np.dtype(x_scale.dtype) in _FLOAT_SCALES, "x_scale", "a float32 array",
          describe(x_scale), TypeError)
  require(tuple(x_scale.shape) == (m,), "x_scale", f"shape [m={m}]", describe(x_scale))

  assist = None
  if weight_assist_matrix is not None:
    require(scenario == A8W4, "weight_assist_matrix", "None unless A8W4 (int8 x, int4 weight)",
            describe(weight_assist_matrix))
    assist = operands.stack_tensor_list(weight_assist_matrix, "weight_assist_matrix",
                                        expert_rank=1)
    require(np.dtype(assist.dtype) in _FLOAT_SCALES, "weight_assist_matrix", "float32",
            describe(assist), TypeError)
    require(tuple(assist.shape) == (e, n), "weight_assist_matrix", f"shape [e={e}, n={n}]",
            describe(assist))
  elif scenario == A8W4:
    assist = canonical_assist(row_blocks.stacked(w.values), scale)

  smooth = None
  if smooth_scale is not None:
    require(scenario == A4W4, "smooth_scale", "None unless A4W4 (int4 x and weight)",
            describe(smooth_scale))
    check_array("smooth_scale", smooth_scale)
    require(np.dtype(smooth_scale.dtype) in _FLOAT_SCALES, "smooth_scale", "float32",
            describe(smooth_scale), TypeError)
    require(tuple(smooth_scale.shape) in ((e, n // 2), (e,)), "smooth_scale",
            f"shape [e={e}, n/2={n // 2}] or [e={e}]", describe(smooth_scale))
    smooth = jnp.asarray(smooth_scale, jnp.float32).reshape(
        e, smooth_scale.shape[1] if smooth_scale.ndim == 2 else 1)

  run = dict(assist=assist, smooth=smooth, spec=spec, expected_tokens=tokens,
             implementation=implementation, interpret=interpret, tiles=tiles)
  xq, wq = QArray.of(lhs, jnp.asarray(x_scale, jnp.float32)), QArray.of(w, scale)
  if group_offset is None:
    ends = groups_lib.group_ends(group_list, group_list_type=group_list_type, m=m, num_groups=e)
    return _torch_npu_outputs(*fused_canonical(xq, wq, ends, **run), spec)
  ends = groups_lib.group_ends(group_list, group_list_type=group_list_type, m=m,
                               num_groups=max(e, groups_lib.num_listed(group_list)))
  local, shift = groups_lib.local_groups(ends, group_offset, e)
  return _torch_npu_outputs(*fused_canonical(xq, wq, local, shift=shift, **run), spec)


def fused_canonical(x: QArray, w: QArray, ends: groups_lib.GroupEnds, *,
                    assist: jax.Array | None = None, smooth: jax.Array | None = None,
                    spec: quant_lib.DynamicQuant = quant_lib.INT8_PER_TOKEN,
                    expected_tokens: int | None = None, implementation: str | None = None,
                    interpret: bool = False, tiles: TileSizes | None = None,
                    shift: Any = None) -> tuple[jax.Array, jax.Array]:
  """The fused op on canonical operands, on the implementation asked for (`npu_ops._src.backend`):
  a Pallas kernel (A8W8 / A8W4 with int8 output), the XLA row-block path, or
  `npu_ops._src.reference`.

  Args:
    x: tokens, int8 values `[m, k]` with their scale `[m]`.
    w: expert weights, int8 or jnp.int4 values `[e, k, n]` with their scale `[e, G, n]`.
    ends: group ends (`npu_ops._src.groups`), counted from row `shift`.
    shift: the first row of group 0 (group_offset's local groups: `groups.local_groups`);
      rows outside the groups give 0. The kernels skip the other rows in their metadata;
      the XLA paths move the groups' rows to row 0 and back.
    assist: A8W4's `[e, n]` assist matrix; smooth: A4W4's `[e, n/2]` or `[e, 1]`.
    spec: the output quantization.
  """
  scenario = operands.scenario(x, w)
  m, k = x.values.shape
  e, n = row_blocks.num_groups_of(w.values), w.scale.shape[-1]
  mx_out = spec.mode == quant_lib.MX
  problem = pallas_common.Problem("fused", m, k, n, e, np.dtype(x.values.dtype).name,
                                  scale_groups=w.scale.shape[1], a4w4=scenario == A4W4,
                                  mx_out=mx_out, expected_tokens=expected_tokens)
  impl = backend.resolve(implementation, problem, interpret=interpret, tiles=tiles)
  if gmm_lib.is_symbolic(m):  # export with a symbolic m: ragged_dot, then the epilogue
    gmm_lib.check_static_m(m, implementation)
    impl, block_sizes, after = "xla", None, True
  else:
    block_sizes = row_blocks.GmmBlockSizes.for_problem(m, len(ends), expected_tokens)
    after = _epilogue_after(m, k, n, e, expected_tokens, scenario)


  def kernel(module, tiles, x, w, ends_array, assist, smooth, start):
    del smooth  # A4W4 only, which the kernels do not take
    return module.gmm_swiglu_quant(x.values, row_blocks.stacked(w.values), w.scale, x.scale,
                                   ends_array if start is None else ends_array + start,
                                   start=start, assist=assist, tiles=tiles, out_dtype=spec.dtype,
                                   qmax=spec.qmax, mx_out=mx_out, interpret=interpret)

  @groups_lib.rows_from(shift)
  def xla(x, w, ends_array, assist, smooth):
    ends_ = ends if isinstance(ends, tuple) else ends_array
    if impl == "reference":
      w = QArray(row_blocks.stacked(w.values), w.scale, w.bits)
      return reference.swiglu_quant(x, w, ends_, assist=assist, smooth=smooth, spec=spec)
    return _fused(x.values, w.values, w.scale, x.scale, assist, smooth, ends=ends_,
                  scenario=scenario, spec=spec, block_sizes=block_sizes, after=after)

  start = None if shift is None else jnp.asarray(shift, jnp.int32)
  return backend.run(impl, (x, w, jnp.asarray(ends, jnp.int32), assist, smooth, start),
                     problem, kernel=kernel, xla=xla, interpret=interpret, tiles=tiles)


def npu_grouped_matmul_swiglu_quant(
    x: Any, weight: Any, group_list: Any, weight_scale: Any, x_scale: Any, *,
    bias: Any = None, offset: Any = None, group_offset: Any = None,
    implementation: str | None = None,
    interpret: bool = False, tiles: TileSizes | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """torch_npu v1: A8W8 or A8W4 with a cumsum group_list.

  In v1 the A8W4 assist matrix travels in the `bias` slot, and the dequant mode
  follows the rank of weight_scale (`[e, n]` per channel, `[e, G, n]` per group).
  group_offset, implementation, interpret, tiles: as in v2.

  Returns:
    (output int8 `[m, n/2]`, output_scale float32 `[m]`, output_offset float32
    `[]` (unused by torch_npu, always 0)).
  """
  # v1's own argument names in its messages (v2 would name dequant_mode, the assist matrix).
  if offset is not None:
    fail("offset", "None (reserved by torch_npu)", describe(offset))
  check_array("x", x)
  require(np.dtype(x.dtype) == np.int8, "x", "int8 [m, k] (v1 is A8W8 or A8W4; A4W4 is v2 only)",
          describe(x), TypeError)
  w = operands.stack_tensor_list(weight, "weight", expert_rank=(2, 4))
  int8_weight = np.dtype(w.dtype) == np.int8
  ws = operands.stack_tensor_list(weight_scale, "weight_scale", expert_rank=(1, 2))
  check_rank("weight_scale", ws, (2, 3))
  require(not (int8_weight and ws.ndim == 3), "weight_scale", "[e, n] for an int8 weight "
          "(per-group [e, G, n] scales are A8W4's: int4 weights)", describe(ws))
  if bias is not None:
    require(not int8_weight, "bias",
            "None for an int8 weight (in v1, bias carries the A8W4 assist matrix)", describe(bias))
    bias = operands.stack_tensor_list(bias, "bias", expert_rank=1)
    e, n = ws.shape[0], ws.shape[-1]
    require(np.dtype(bias.dtype) in _FLOAT_SCALES and tuple(bias.shape) == (e, n), "bias",
            f"the A8W4 assist matrix, float32 [e={e}, n={n}]", describe(bias))
  out, out_scale = npu_grouped_matmul_swiglu_quant_v2(
      x, weight, ws, x_scale, group_list, weight_assist_matrix=bias,
      dequant_mode=1 if ws.ndim == 3 else 0, group_list_type=0, group_offset=group_offset,
      implementation=implementation, interpret=interpret, tiles=tiles)
  return out, out_scale, jnp.zeros((), jnp.float32)


def weight_assist_matrix(weight: Any, weight_scale: Any, *, k: int | None = None) -> jax.Array:
  """Canonical A8W4 assist matrix `A[i, c] = 8 * sum_k W[i, k, c] * s[i, k // gs, c]`.

  Args:
    weight: int4 weight in any form `npu_grouped_matmul_swiglu_quant_v2` takes.
    weight_scale: `[e, n]` or `[e, G, n]` scale words or float32.
    k: logical k; needed only for FRACTAL_NZ weights (padded), else from weight.

  Returns:
    float32 `[e, n]` (per-group column sums are exact int32, then scaled and
    summed over groups in float32).
  """
  weight_scale = operands.stack_tensor_list(weight_scale, "weight_scale", expert_rank=(1, 2))
  check_rank("weight_scale", weight_scale, (2, 3))
  n = weight_scale.shape[-1]
  stacked = operands.stack_tensor_list(weight, "weight", expert_rank=(2, 4))
  if k is None:
    require(stacked.ndim == 3, "k", "the logical k for a FRACTAL_NZ weight", None, TypeError)
    k = stacked.shape[1]
  if stacked.ndim == 3:  # an ND weight says e and n: a scale that disagrees is to blame
    words = np.dtype(stacked.dtype) == np.int32
    check_scale_groups("weight_scale", weight_scale, e=stacked.shape[0],
                       n=stacked.shape[2] * (layouts.INT4_PER_INT32 if words else 1), k=k)
  w = operands.canonical_weight(weight, k=k, n=n, k_from="k given or from the ND weight")
  require(w.bits == operands.INT4, "weight", "int4 (int32 words or jnp.int4)", describe(weight),
          TypeError)
  scale = float32_from_scale_words(weight_scale, "weight_scale").reshape(
      w.values.shape[0], weight_scale.shape[1] if weight_scale.ndim == 3 else 1, n)
  return canonical_assist(w.values, scale)


@jax.jit
def canonical_assist(w: jax.Array, scale: jax.Array) -> jax.Array:
  # 8 * colsum is exact, so this is 8 * sum_k W * s bit for bit
  return jnp.sum(epilogue.colsum8(w, scale.shape[1]).astype(jnp.float32) * scale, axis=1)


def expected_tokens(tuning_config: Any) -> int | None:
  if tuning_config is None:
    return None
  if not isinstance(tuning_config, (list, tuple)) or not all(
      isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in tuning_config):
    fail("tuning_config", "None or a list of ints ([expected tokens per expert, ...])",
         repr(tuning_config), TypeError)
  if not tuning_config:
    return None
  require(tuning_config[0] >= 0, "tuning_config[0]", "a non-negative expected token count",
          tuning_config[0])
  return int(tuning_config[0]) or None


# Below this many expected rows per group, the epilogue runs once over all rows after
# the grouped matmul: per row block it is a few XLA ops whose fixed cost outweighs a
# block of 8-32 rows (measured at m=512, k=2048, n=2816: per-block 18.3 ms, after
# 15.6 ms, the matmul alone 15.5 ms, e=16); from 64 rows per group on, the int32
# [m, n] round trip costs more than the per-block ops save (m=4096, e=64: 110 vs 102),
# unless that product stays in the caches: up to 12 MiB (m=1024 at n=2816) the epilogue
# after the matmul also won below 128 rows (VNNI host, two runs, 64-96 rows a group:
# m=512 4-32% faster, m=1024 3-11%; m=2048-4096 -6% to +15%, so not there).
_EPILOGUE_AFTER_BELOW_ROWS = 64
_EPILOGUE_AFTER_SMALL_PRODUCT = (128, 12 << 20)  # (rows per group, int32 product bytes)


def _epilogue_after(m: int, k: int, n: int, e: int, expected: int | None, scenario: str
                    ) -> bool:
  """Whether the XLA path runs the epilogue after the matmul instead of per row block."""
  if scenario == A8W4:  # dequant needs each k-group's partial sums
    return False
  expected = expected or -(-m // max(e, 1))
  acc_bytes = 4 * m * n  # the int32 accumulator it adds
  io_bytes = m * k + e * k * n + m * n // 2 + 4 * (m + e * n + m)
  rows, small = _EPILOGUE_AFTER_SMALL_PRODUCT
  few = expected < _EPILOGUE_AFTER_BELOW_ROWS or (expected < rows and acc_bytes <= small)
  return few and 4 * acc_bytes <= io_bytes


def _dequant(acc: jax.Array, w_scale: jax.Array, x_scale: jax.Array, scenario: str
             ) -> jax.Array:
  """C of A8W8 / A4W4 (module doc) from the int32 product, in the documented order (docs/semantics.md)."""
  return (epilogue.dequant_a8w8 if scenario == A8W8 else epilogue.dequant_a4w4)(
      acc, w_scale, x_scale)


def _swiglu_quant(c: jax.Array, smooth: jax.Array | None, spec: quant_lib.DynamicQuant):
  """(codes as `epilogue.code_storage`, scale `[rows, 1]` per token or e8m0 bytes
  `[rows, blocks]` for MX); `_squeeze_per_token` makes them the op's."""
  if c.shape[-1] == 0:
    cols, scale_dtype = epilogue.output_scale_shape(spec, 0)
    return (jnp.zeros(c.shape, epilogue.code_storage(spec.dtype)),
            jnp.zeros(c.shape[:-1] + cols, scale_dtype))
  s = quant_lib.swiglu(c)
  return epilogue.quantize_output(s if smooth is None else s * smooth, spec, as_bits=True)


@row_blocks.jit_by_ends("scenario", "spec", "block_sizes", "after")
def _fused(x, w, scale, x_scale, assist, smooth, *, ends, scenario, spec, block_sizes,
           after=False):
  """The fused op on canonical operands: the epilogue runs on each row block, or
  once after the grouped matmul (`after`, see `_epilogue_after`)."""
  m, k = x.shape
  e, n_groups, n = scale.shape
  # int4 weights: XLA:CPU dots take int8 operands. A tuple of per-expert weights is read in
  # place (row_blocks.group_operand); A8W4 slices k groups out of each: stacked.
  w = row_blocks.stacked(w) if scenario == A8W4 else w
  w = tuple(a.astype(jnp.int8) for a in w) if isinstance(w, tuple) else w.astype(jnp.int8)
  gs = k // n_groups
  colsum8 = None
  if scenario == A8W4:  # 8 * column sums per k-group: the "- 8" of (x - 8) @ W, in int32
    colsum8 = epilogue.colsum8(w, n_groups)
  if after:
    gid = groups_lib.row_group_ids(ends, m)
    inside = gid < len(ends)  # rows past the groups: 0 in both outputs
    per_row = lambda a: None if a is None else groups_lib.per_row(a, gid)
    grouped = lambda xs, ws: gmm_lib.gmm(xs, ws, ends, out_dtype=jnp.int32, implementation="xla",
                                         block_sizes=block_sizes)
    if scenario == A8W4:
      c = sum(epilogue.close_k_group(
          grouped(x[:, g * gs:(g + 1) * gs], w[:, g * gs:(g + 1) * gs]),
          per_row(colsum8[:, g]), per_row(scale[:, g])) for g in range(n_groups))
      c = epilogue.finish_a8w4(c, per_row(assist), x_scale[:, None])
    else:
      c = _dequant(grouped(x, w), per_row(scale[:, 0]), x_scale[:, None], scenario)
    q, q_scale = _swiglu_quant(c, per_row(smooth), spec)
    keep = lambda a: jnp.where(inside[:, None], a, jnp.zeros((), a.dtype))
    return _squeeze_per_token(keep(q), keep(q_scale), spec)

  def group_ctx(g):
    # per-column operands as [..., 1, cols]: every broadcast against a row block spelled out
    row = lambda a: None if a is None else a[g][..., None, :]
    return row_blocks.group_operand(w, g), row(scale), row(assist), row(colsum8), row(smooth)

  def dot_fn(ctx, r0, bl):
    """The block's int32 product (A8W8, A4W4) or A8W4's float32 sum over k groups."""
    w_g, s_g, _, colsum8_g, _ = ctx
    xb = lax.dynamic_slice_in_dim(x, r0, bl)
    if scenario != A8W4:
      return row_blocks.group_dot(xb, w_g, preferred_element_type=jnp.int32)
    dot = lambda a, b: lax.dot(a, b, preferred_element_type=jnp.int32)
    return sum(epilogue.close_k_group(dot(xb[:, g * gs:(g + 1) * gs], w_g[g * gs:(g + 1) * gs]),
                                       colsum8_g[g], s_g[g]) for g in range(n_groups))

  per_token = spec.mode == quant_lib.PER_TOKEN

  def finish_fn(outs, ctx, r0, acc, valid):
    _, s_g, a_g, _, smooth_g = ctx
    xs = lax.dynamic_slice_in_dim(x_scale, r0, acc.shape[0])[:, None]
    c = (epilogue.finish_a8w4(acc, a_g, xs) if scenario == A8W4
         else _dequant(acc, s_g[0], xs, scenario))
    s = quant_lib.swiglu(c)
    s = s if smooth_g is None else s * smooth_g
    if per_token:  # the scale (amax / qmax, correctly rounded) is computed once, after
      amax = jnp.max(jnp.abs(s), axis=-1, keepdims=True)
      q = epilogue.codes_for_amax(s, amax, qmax=spec.qmax, dtype=spec.dtype,
                                   fp8_as_bits=True)
      q_scale = amax
    else:
      q, q_scale = epilogue.quantize_output(s, spec, as_bits=True)
    return (row_blocks.write_rows(outs[0], q, r0, valid),
            row_blocks.write_rows(outs[1], q_scale, r0, valid))

  cols, scale_dtype = epilogue.output_scale_shape(spec, n // 2)
  init = (jnp.zeros((m, n // 2), epilogue.code_storage(spec.dtype)),
          jnp.zeros((m,) + cols, scale_dtype))
  if n == 0:
    return _squeeze_per_token(*init, spec)
  q, q_scale = row_blocks.traverse_staged(
      ends, m, init, row=jax.ShapeDtypeStruct((n,), jnp.float32 if scenario == A8W4 else jnp.int32),
      group_ctx=group_ctx, dot_fn=dot_fn, finish_fn=finish_fn, block_sizes=block_sizes)
  if per_token:
    q_scale = epilogue.scale_for_amax(q_scale, spec.qmax)
  return _squeeze_per_token(q, q_scale, spec)


def _squeeze_per_token(q, q_scale, spec):
  """`_swiglu_quant`'s results as the op gives them."""
  q = epilogue.codes_from_bits(q, spec.dtype)
  return q, q_scale[:, 0] if spec.mode == quant_lib.PER_TOKEN else q_scale


# --- MX inputs (dequant_mode 2, semantics B.1.6) and torch_npu's output layouts ----------------

MX_INPUTS = 2
_MX_ELEMENTS = tuple(np.dtype(t) for t in (jnp.float8_e4m3fn, jnp.float8_e5m2,
                                           jnp.float4_e2m1fn))
_E8M0 = tuple(np.dtype(t) for t in (jnp.float8_e8m0fnu, jnp.uint8))


def _mx_operand(name: str, a: Any, rank: int) -> jax.Array:
  check_rank(name, a, rank)
  require(np.dtype(a.dtype) in _MX_ELEMENTS, name, "float8_e4m3fn, float8_e5m2 or "
          "float4_e2m1fn values (MX inputs, dequant_mode=2)", describe(a), TypeError)
  return jnp.asarray(a)


def _mx_scale(name: str, a: Any, shape: tuple[int, ...], layout: str) -> jax.Array:
  """The uint8 bytes of e8m0 scales given as float8_e8m0fnu or uint8."""
  check_array(name, a)
  require(np.dtype(a.dtype) in _E8M0, name, "float8_e8m0fnu or uint8 (e8m0 bytes)",
          describe(a), TypeError)
  require(tuple(a.shape) == shape, name, f"shape {list(shape)} ({layout})", describe(a))
  return quant_lib.e8m0_bytes(name, a)


def _per_element(scale: jax.Array, k: int, axis: int) -> jax.Array:
  """Block scales with `ceil(k/64)` at `axis` and the pair as the last dim -> one per
  element of k at `axis`: element kk takes `scale[..., kk // 64, ..., (kk // 32) % 2]`."""
  pairs = jnp.moveaxis(scale, -1, axis + 1)
  flat = pairs.reshape(pairs.shape[:axis] + (-1,) + pairs.shape[axis + 2:])
  return lax.slice_in_dim(jnp.repeat(flat, epilogue.MX_BLOCK, axis=axis), 0, k, axis=axis)


def _mx_inputs(x, weight, weight_scale, x_scale, group_list, *, group_list_type, group_offset,
               spec, implementation, interpret=False, tiles=None):
  """The fused op on fp8 / fp4 inputs with e8m0 block scales.

  XLA path: each operand times its scales (exact powers of two), one float32 grouped
  matmul, SwiGLU, then `spec`. GPU kernel (`pallas_kernels.gpu.gmm_swiglu_quant_mx`; fp8
  operands, ND weight): per block of 32 along k, the block's dot times both scales, summed
  over blocks in order (B.1.6's formula). Within a block the hardware's accumulation order
  is not specified; both sum exact float32 products in float32. Operand values scaled below
  2**-126 flush to 0 on XLA:CPU, as in every float op there.
  """
  xv = _mx_operand("x", x, 2)
  m, k = xv.shape
  kb = -(-k // 64)
  wv = _mx_operand("weight", operands.stack_tensor_list(weight, "weight", expert_rank=(2,)), 3)
  ws = operands.stack_tensor_list(weight_scale, "weight_scale", expert_rank=(3,))
  check_rank("weight_scale", ws, 4)
  e = wv.shape[0]
  # ND [e, k, n] with scales [e, kb, n, 2], or transposed [e, n, k] with [e, n, kb, 2]
  transposed = wv.shape[1] != k or (wv.shape[2] == k and ws.shape[1:3] == (wv.shape[1], kb))
  n = wv.shape[1] if transposed else wv.shape[2]
  require(wv.shape[2 if transposed else 1] == k, "weight",
          f"[e, k={k}, n] or its transpose [e, n, k={k}] (k from x)", describe(wv))
  require(n % 2 == 0, "weight", "an even n (SwiGLU halves it)", describe(wv))
  if spec.dtype == np.dtype(jnp.float4_e2m1fn):
    require(n % 4 == 0, "weight", "n a multiple of 4 for packed fp4 output (two codes a byte)",
            describe(wv))
  w_shape, layout = (((e, n, kb, 2), "[e, n, ceil(k/64), 2] for a transposed weight")
                     if transposed else ((e, kb, n, 2), "[e, ceil(k/64), n, 2]"))
  w_bytes = _mx_scale("weight_scale", ws, w_shape, layout)
  x_bytes = _mx_scale("x_scale", x_scale, (m, kb, 2), "[m, ceil(k/64), 2]")
  fp4 = np.dtype(jnp.float4_e2m1fn)
  problem = pallas_common.Problem(
      "fused_mx", m, k, n, e, np.dtype(xv.dtype).name, mx_out=spec.mode == quant_lib.MX,
      transposed=transposed, fp4=fp4 in (np.dtype(xv.dtype), np.dtype(wv.dtype)))
  impl = backend.resolve(implementation, problem, interpret=interpret, tiles=tiles)
  num_groups = e if group_offset is None else max(e, groups_lib.num_listed(group_list))
  ends = groups_lib.group_ends(group_list, group_list_type=group_list_type, m=m,
                               num_groups=num_groups)
  shift = None
  if group_offset is not None:
    ends, shift = groups_lib.local_groups(ends, group_offset, e)

  @groups_lib.rows_from(shift)
  def xla(rows, wv, w_bytes, ends_array):
    xv, x_bytes = rows
    scaled = lambda v, b, axis: v.astype(jnp.float32) * _per_element(
        epilogue.e8m0_to_float32(b), k, axis)
    wf = scaled(wv, w_bytes, 2 if transposed else 1)
    c = gmm_lib.gmm(scaled(xv, x_bytes, 1), jnp.swapaxes(wf, 1, 2) if transposed else wf,
                    ends if isinstance(ends, tuple) else ends_array, out_dtype=jnp.float32,
                    implementation="reference" if impl == "reference" else "xla",
                    precision=lax.Precision.HIGHEST)
    # rows past the groups: c = 0 -> codes and scales 0
    return _squeeze_per_token(*_swiglu_quant(c, None, spec), spec)

  def kernel(module, tiles, rows, wv, w_bytes, ends_array, start):
    xv, x_bytes = rows
    return module.gmm_swiglu_quant_mx(
        xv, wv, x_bytes, w_bytes, ends_array if start is None else ends_array + start,
        start=start, tiles=tiles, out_dtype=spec.dtype, qmax=spec.qmax,
        mx_out=spec.mode == quant_lib.MX, interpret=interpret)

  start = None if shift is None else jnp.asarray(shift, jnp.int32)
  return backend.run(impl, ((xv, x_bytes), wv, w_bytes, jnp.asarray(ends, jnp.int32), start),
                     problem, kernel=kernel, xla=xla, interpret=interpret, tiles=tiles)


def _torch_npu_outputs(q: jax.Array, q_scale: jax.Array, spec: quant_lib.DynamicQuant):
  """torch_npu's output forms: per token as computed; MX scales `[m, ceil(d/64), 2]` e8m0
  (pairs of blocks, the last one 0 when the block count is odd), fp4 codes packed two a
  byte (uint8 `[m, d/2]`, the first of each pair in the low nibble)."""
  if spec.mode == quant_lib.PER_TOKEN:
    return q, q_scale
  m, blocks = q_scale.shape
  pairs = jnp.pad(q_scale, ((0, 0), (0, blocks % 2))).reshape(m, -(-blocks // 2), 2)
  out_scale = lax.bitcast_convert_type(pairs, jnp.float8_e8m0fnu)
  if spec.dtype == np.dtype(jnp.float4_e2m1fn):
    nibbles = lax.bitcast_convert_type(q, jnp.uint4).astype(jnp.uint8)
    q = nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
  return q, out_scale
