"""`npu_grouped_matmul_swiglu_quant_v2` (and v1), with torch_npu semantics: this module
decodes torch_npu's arguments (dtype and mode codes, int32 words and NZ weights, scale
words, group-list types, group_offset, output layouts) into canonical operands for the core
ops `fused.fused` (integer inputs) and `fused_mx.fused_mx` (MX inputs), whose docs give
the formulas (semantics B.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from npu_ops._src import backend
from npu_ops._src import fused as fused_lib
from npu_ops._src import fused_mx as fused_mx_lib
from npu_ops._src import groups as groups_lib
from npu_ops._src import layouts
from npu_ops._src import operands
from npu_ops._src import quant as quant_lib
from npu_ops._src import row_blocks
from npu_ops._src.operands import A4W4, A8W4, A8W8, QArray
from npu_ops._src.scales import float32_from_scale_words
from npu_ops._src.validation import (asarray, check_array, check_dtype_arg, check_int,
                                     check_int_option, check_rank, check_scale_groups, describe,
                                     fail, require)
from pallas_kernels.common import TileSizes

_FLOAT_SCALES = tuple(np.dtype(d) for d in (jnp.float32, jnp.float16, jnp.bfloat16))
# dequant_dtype: aclnn 0 and torch's float32 code 6 both mean a float32 intermediate.
_DEQUANT_FP32 = (0, 6)
MAX_EXPERTS = groups_lib.MAX_GROUPS  # torch_npu caps e (B.1.2) as it caps a group list (B.0.1)
MX_INPUTS = 2  # dequant_mode of MX inputs
_MX_ELEMENTS = tuple(np.dtype(t) for t in (jnp.float8_e4m3fn, jnp.float8_e5m2,
                                           jnp.float4_e2m1fn))
_E8M0 = tuple(np.dtype(t) for t in (jnp.float8_e8m0fnu, jnp.uint8))


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
  * MX inputs (dequant_mode 2, semantics B.1.6): x float8_e4m3fn / float8_e5m2 /
    float4_e2m1fn `[m, k]` (fp4 also packed two a byte: uint8 `[m, k/2]`, the first of
    each pair in the low nibble); weight of the same family `[e, k, n]`, transposed
    `[e, n, k]` or FRACTAL_NZ `[e, n/32, k/16, 16, 32]`; e8m0 scales (float8_e8m0fnu or
    uint8) x_scale `[m, ceil(k/64), 2]`, weight_scale `[e, ceil(k/64), n, 2]` (transposed:
    `[e, n, ceil(k/64), 2]`).

  weight, weight_scale and weight_assist_matrix may also be lists (a list of one
  stacked array, or one array per expert). A list of per-expert ND int8 / jnp.int4
  `[k, n]` weights is read in place by the XLA path, which copies each non-empty expert's
  weight out of a stacked array on every call: the fastest form on CPU (prepare it once,
  e.g. `list(w)` outside the jitted function; see docs/performance.md, "How the CPU path stays fast").
  The logical n is `weight_scale.shape[-1]`, k is taken from x.

  Args:
    x, weight, weight_scale: see above.
    x_scale: float32 `[m]`, per-token dequant scale of x (MX inputs: see above).
    group_list: `[E]` with E <= e: Python ints (static) or an int32/int64 array
      (dynamic; one compilation for all values). cumsum (group_list_type 0) or
      counts (1). Invalid dynamic values are clamped (see `npu_ops._src.groups`).
    smooth_scale, weight_assist_matrix: see the scenarios.
    bias: reserved by torch_npu; must be None.
    dequant_mode: 0 per-channel weight scale, 1 per-group (A8W4 only), 2 MX inputs.
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
      (`npu_ops._src.backend`; the kernels do A8W8, A8W4, A4W4 and MX inputs with an ND
      weight (fp8; fp4 on TPU), with per-token or MX output; under None other cases take
      the XLA path: README,
      "Where each mode runs").
    interpret: run a Pallas kernel in interpret mode.
    tiles: the kernels' `TileSizes` (default: the kernel backend's `default_tiles`; on
      TPU the `npu_ops.perf` model's choice for the chip, `pallas_kernels.tpu_tiles`).

  Returns:
    (output `[m, n/2]` codes of quant_dtype (fp4: uint8 `[m, n/4]`), output_scale: float32
    `[m]` per token, or float8_e8m0fnu `[m, ceil(n/128), 2]` for MX). Rows at or beyond the
    group total are 0 in both. No derivative (jvp / grad raise TypeError): train with
    `fake_quant_gmm_swiglu_quant`, the same forward in float.
  """
  spec = quant_lib.DynamicQuant.from_torch_npu(quant_dtype, quant_mode)
  dequant_mode = _dequant_mode(dequant_mode, dequant_dtype, bias)
  run = dict(spec=spec, implementation=implementation, interpret=interpret, tiles=tiles)
  tokens = expected_tokens(tuning_config)
  backend.check(implementation, interpret, tiles)
  if dequant_mode == MX_INPUTS:
    for name, value in (("smooth_scale", smooth_scale),
                        ("weight_assist_matrix", weight_assist_matrix)):
      if value is not None:
        fail(name, "None with MX inputs (dequant_mode=2)", describe(value))
    xv, xs, wv, ws, transposed = _mx_operands(x, weight, weight_scale, x_scale, spec)
    ends, shift = _groups(group_list, group_list_type, group_offset, m=xv.shape[0],
                          e=wv.shape[0])
    return _torch_npu_outputs(*fused_mx_lib.fused_mx(
        xv, xs, wv, ws, ends, transposed=transposed, shift=shift, **run), spec)

  xq, wq, scenario = _int_operands(x, weight, weight_scale, x_scale, dequant_mode, spec)
  (m, _), (e, _, n) = xq.values.shape, wq.scale.shape
  assist = _assist(weight_assist_matrix, scenario, wq, e=e, n=n)
  smooth = _smooth(smooth_scale, scenario, e=e, n=n)
  ends, shift = _groups(group_list, group_list_type, group_offset, m=m, e=e)
  return _torch_npu_outputs(*fused_lib.fused(
      xq, wq, ends, shift=shift, assist=assist, smooth=smooth, expected_tokens=tokens, **run),
      spec)


def _dequant_mode(dequant_mode: Any, dequant_dtype: Any, bias: Any) -> int:
  dequant_mode = check_int_option("dequant_mode", dequant_mode, (0, 1, MX_INPUTS))
  if isinstance(dequant_dtype, (int, np.integer)) and not isinstance(dequant_dtype, bool):
    require(dequant_dtype in _DEQUANT_FP32, "dequant_dtype",
            "0 (float32; the only intermediate type of A2/A3)", dequant_dtype)
  else:
    require(check_dtype_arg("dequant_dtype", dequant_dtype) == np.float32, "dequant_dtype",
            "0 or float32", repr(dequant_dtype))
  if bias is not None:
    fail("bias", "None (reserved by torch_npu for this op)", describe(bias))
  return dequant_mode


def _int_operands(x: Any, weight: Any, weight_scale: Any, x_scale: Any, dequant_mode: int,
                  spec: quant_lib.DynamicQuant) -> tuple[QArray, QArray, str]:
  """x, weight and their scales as canonical `QArray`s (scales float32 `[m]` and
  `[e, G, n]`), and the scenario (A8W8, A8W4, A4W4)."""
  # int4 words, as torch_npu packs A4W4's tokens, stay packed: the TPU kernel unpacks them
  lhs = operands.canonical_lhs(x, keep_words=True)
  words = operands.is_words(lhs.values)  # an int32 x is int4 words, a common surprise
  m, k = lhs.values.shape[0], lhs.values.shape[1] * (8 if words else 1)
  weight_scale = operands.weight_scales(weight_scale, weight=weight)
  check_rank("weight_scale", weight_scale, (2, 3))
  n = weight_scale.shape[-1]
  _check_width(n, spec, "weight_scale", describe(weight_scale))
  w = operands.canonical_weight(
      weight, k=k, n=n, k_from=("k = 8 * x.shape[1]: an int32 x holds 8 int4 values a word "
                                "(A4W4)") if words else "k from x", keep_list=True,
      keep_words=True)  # the TPU kernel unpacks them itself (`fused.fused`)
  e = row_blocks.num_groups_of(w.values)
  require(e <= MAX_EXPERTS, "weight", f"at most {MAX_EXPERTS} experts (semantics B.1.2)",
          describe(weight))
  scenario = operands.scenario(lhs, w)
  if scenario is None:
    fail("weight", "int4 weights (int32 words or jnp.int4) for an int4 x", describe(weight),
         TypeError)
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
  return (QArray.of(lhs, jnp.asarray(x_scale, jnp.float32)), QArray.of(w, scale), scenario)


def _check_width(n: int, spec: quant_lib.DynamicQuant, name: str, got: str) -> None:
  """n, the product's columns: even (SwiGLU halves it), a multiple of 4 for packed fp4
  output (two codes a byte)."""
  require(n % 2 == 0, name, "an even n (last dim; SwiGLU halves it)", got)
  if spec.dtype == np.dtype(jnp.float4_e2m1fn):
    require(n % 4 == 0, name, "n a multiple of 4 for packed fp4 output (two codes a byte)", got)


def _assist(weight_assist_matrix: Any, scenario: str, w: QArray, *, e: int, n: int
            ) -> jax.Array | None:
  """A8W4's assist matrix float32 `[e, n]` (computed from the weights when not given)."""
  if weight_assist_matrix is None:
    return (fused_lib.canonical_assist(operands.unpacked(row_blocks.stacked(w.values)), w.scale)
            if scenario == A8W4 else None)
  require(scenario == A8W4, "weight_assist_matrix", "None unless A8W4 (int8 x, int4 weight)",
          describe(weight_assist_matrix))
  assist = operands.stack_tensor_list(weight_assist_matrix, "weight_assist_matrix",
                                      expert_rank=1)
  require(np.dtype(assist.dtype) in _FLOAT_SCALES, "weight_assist_matrix", "float32",
          describe(assist), TypeError)
  require(tuple(assist.shape) == (e, n), "weight_assist_matrix", f"shape [e={e}, n={n}]",
          describe(assist))
  return jnp.asarray(assist)  # a NumPy one is indexed by traced group ids (the reference)


def _smooth(smooth_scale: Any, scenario: str, *, e: int, n: int) -> jax.Array | None:
  """A4W4's smooth scale float32 `[e, n/2]` or `[e]`, as `[e, n/2]` or `[e, 1]`."""
  if smooth_scale is None:
    return None
  require(scenario == A4W4, "smooth_scale", "None unless A4W4 (int4 x and weight)",
          describe(smooth_scale))
  check_array("smooth_scale", smooth_scale)
  require(np.dtype(smooth_scale.dtype) in _FLOAT_SCALES, "smooth_scale", "float32",
          describe(smooth_scale), TypeError)
  require(tuple(smooth_scale.shape) in ((e, n // 2), (e,)), "smooth_scale",
          f"shape [e={e}, n/2={n // 2}] or [e={e}]", describe(smooth_scale))
  return jnp.asarray(smooth_scale, jnp.float32).reshape(
      e, smooth_scale.shape[1] if smooth_scale.ndim == 2 else 1)


def _groups(group_list: Any, group_list_type: int, group_offset: Any, *, m: int, e: int
            ) -> tuple[groups_lib.GroupEnds, Any]:
  """(group ends, the first row of group 0 or None): with group_offset, the e local groups
  of the G listed (`groups.local_groups`)."""
  if group_offset is None:
    return groups_lib.group_ends(group_list, group_list_type=group_list_type, m=m,
                                 num_groups=e), None
  ends = groups_lib.group_ends(group_list, group_list_type=group_list_type, m=m,
                               num_groups=max(e, groups_lib.num_listed(group_list)))
  return groups_lib.local_groups(ends, group_offset, e, names=("group_list", "weight"))


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
  ws = operands.weight_scales(weight_scale, weight=weight)
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
  weight_scale = operands.weight_scales(weight_scale, weight=weight)
  check_rank("weight_scale", weight_scale, (2, 3))
  n = weight_scale.shape[-1]
  stacked = operands.stack_tensor_list(weight, "weight", expert_rank=(2, 4))
  if k is not None:
    k = check_int("k", k, minimum=1)
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
  return fused_lib.canonical_assist(w.values, scale)


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


def _mx_operands(x: Any, weight: Any, weight_scale: Any, x_scale: Any,
                 spec: quant_lib.DynamicQuant) -> tuple[jax.Array, ...]:
  """MX inputs (dequant_mode 2) as `fused_mx.fused_mx` takes them: (x, its scale bytes,
  weight, its scale bytes, whether the weight is `[e, n, k]`)."""
  xv = _mx_x(x)
  m, k = xv.shape
  kb = -(-k // 64)
  ws = operands.stack_tensor_list(weight_scale, "weight_scale", expert_rank=(3,))
  check_rank("weight_scale", ws, 4)
  w = operands.stack_tensor_list(weight, "weight", expert_rank=(2, 4))
  if getattr(w, "ndim", 0) == 5:  # FRACTAL_NZ of [e, k, n]: n from the scale [e, kb, n, 2]
    _mx_operand("weight", w, 5)
    expected = layouts.nz_shape((w.shape[0], k, ws.shape[2]), w.dtype)
    require(tuple(w.shape) == expected, "weight", f"FRACTAL_NZ storage {list(expected)} for a "
            f"logical weight [e, k={k}, n={ws.shape[2]}] (k from x, n from weight_scale)",
            describe(w))
    w = layouts.from_nz(w, k, ws.shape[2])
  wv = _mx_operand("weight", w, 3)
  e = wv.shape[0]
  # ND [e, k, n] with scales [e, kb, n, 2], or transposed [e, n, k] with [e, n, kb, 2]
  transposed = wv.shape[1] != k or (wv.shape[2] == k and ws.shape[1:3] == (wv.shape[1], kb))
  n = wv.shape[1] if transposed else wv.shape[2]
  require(wv.shape[2 if transposed else 1] == k, "weight",
          f"[e, k={k}, n] or its transpose [e, n, k={k}] (k from x)", describe(wv))
  _check_width(n, spec, "weight", describe(wv))
  w_shape, layout = (((e, n, kb, 2), "[e, n, ceil(k/64), 2] for a transposed weight")
                     if transposed else ((e, kb, n, 2), "[e, ceil(k/64), n, 2]"))
  w_bytes = _mx_scale("weight_scale", ws, w_shape, layout)
  x_bytes = _mx_scale("x_scale", x_scale, (m, kb, 2), "[m, ceil(k/64), 2]")
  return xv, x_bytes, wv, w_bytes, transposed


# fp4 (e2m1) values of the 16 codes: packed x is decoded by table (XLA:CPU's elemental
# emitter cannot bitcast uint4 to float4_e2m1fn; docs/performance.md).
_FP4_VALUES = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6],
                       np.float32)


def _mx_x(x: Any) -> jax.Array:
  """MX x: fp8 / fp4 values `[m, k]`, or fp4 packed two a byte (uint8 `[m, k/2]`, the
  first of each pair in the low nibble, as the fp4 output is packed)."""
  if getattr(x, "dtype", None) != np.dtype(np.uint8):
    return _mx_operand("x", x, 2)
  check_rank("x", x, 2)
  b = jnp.asarray(x)
  nibbles = jnp.stack([b & 0xF, b >> 4], axis=-1).reshape(b.shape[0], -1)
  return jnp.asarray(_FP4_VALUES)[nibbles].astype(jnp.float4_e2m1fn)


def _mx_operand(name: str, a: Any, rank: int) -> jax.Array:
  check_rank(name, a, rank)
  require(np.dtype(a.dtype) in _MX_ELEMENTS, name, "float8_e4m3fn, float8_e5m2 or "
          "float4_e2m1fn values (MX inputs, dequant_mode=2)", describe(a), TypeError)
  return asarray(a)


def _mx_scale(name: str, a: Any, shape: tuple[int, ...], layout: str) -> jax.Array:
  """The uint8 bytes of e8m0 scales given as float8_e8m0fnu or uint8."""
  check_array(name, a)
  require(np.dtype(a.dtype) in _E8M0, name, "float8_e8m0fnu or uint8 (e8m0 bytes)",
          describe(a), TypeError)
  require(tuple(a.shape) == shape, name, f"shape {list(shape)} ({layout})", describe(a))
  return quant_lib.e8m0_bytes(name, a)


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
