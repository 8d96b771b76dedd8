"""Quant-aware training: fake quantizers with STE / LSQ gradients (semantics A.4).

A fake quantizer maps a float `x` to `q * scale` with integer codes
`q = clip(round_half_even(x * (1 / scale)), -qmax, qmax)`: symmetric, qmax = 127
(int8) or 7 (int4), and the same multiply-by-reciprocal rounding as the forward
ops (`quantize_per_token` multiplies by `127 / amax`). Gradients:

* x: straight-through estimator, `g` where `-qmax <= x / scale <= qmax`, 0 where
  the code is clipped.
* scale (LSQ, Esser et al. 2020): `g * (q - x / scale)` inside the range, `g * q`
  where clipped, summed over the elements sharing a scale and multiplied by
  `grad_scale` (LSQ suggests `1 / sqrt(elements_per_scale * qmax)`).

These are the exact derivatives of the "STE-defined function"
`scale * clip(x / scale + r, -qmax, qmax)` with the rounding residual
`r = round(x / scale) - x / scale` held constant, which is how the tests check
them with `jax.test_util.check_grads`.

The dynamic per-token quantizer (`dynamic_fake_quant`) uses `scale = amax / qmax`
of each row; its gradient is the same rule, with the scale's cotangent carried on
through `amax` to the row's largest element(s). A row of zeros gives zeros.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from npu_ops._src import backend
from npu_ops._src import fused as fused_lib
from npu_ops._src import gmm_swiglu_quant as torch_npu_fused
from npu_ops._src import grouped as grouped_lib
from npu_ops._src import groups as groups_lib
from npu_ops._src import operands
from npu_ops._src import quant as quant_lib
from npu_ops._src import row_blocks
from npu_ops._src.validation import (check_array, check_dtype_arg, check_known_finite, check_rank,
                                     check_scale_groups, describe, fail, require)
from pallas_kernels import epilogue

_QMAX = {8: 127.0, 4: 7.0}
_FP8 = tuple(np.dtype(t) for t in (jnp.float8_e4m3fn, jnp.float8_e5m2))


def qmax_for(bits: int, name: str = "bits") -> float:
  """Largest code of the symmetric `bits`-bit grid (8 -> 127, 4 -> 7)."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
    fail(name, "the Python int 8 or 4", repr(bits), TypeError)
  if bits not in _QMAX:
    fail(name, "8 or 4", repr(bits))
  return _QMAX[bits]


def _check_grad_scale(grad_scale: Any) -> None:
  if grad_scale is not None and (isinstance(grad_scale, bool) or
                                 not isinstance(grad_scale, (int, float, np.number))):
    fail("grad_scale", "None or a Python float (LSQ's gradient factor)", repr(grad_scale),
         TypeError)


def _check_float(name: str, a: Any) -> None:
  check_array(name, a)
  if not jnp.issubdtype(a.dtype, jnp.floating):
    fail(name, "a float array", describe(a), TypeError)


def _reciprocal(scale: jax.Array, numerator: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """`numerator / scale` as `(lift, inv)` (`epilogue.lifted_reciprocal`): no overflow for
  tiny scales, and codes 0 where scale <= 0 (never NaN or inf); subnormal values count."""
  return epilogue.lifted_reciprocal(scale, numerator, exact_subnormals=True)


def _ratio(x: jax.Array, recip: tuple[jax.Array, jax.Array]) -> jax.Array:
  lift, inv = recip
  return epilogue.times_lift(x, lift) * inv


def _grid(bits: int, dtype: Any) -> tuple[float, np.dtype | None]:
  """(largest code, fp8 type or None for the integer grid of `bits`)."""
  qmax = qmax_for(bits)  # checked with an fp8 dtype too, which leaves it unused
  if dtype is None:
    return qmax, None
  kind = check_dtype_arg("dtype", dtype)
  require(kind in _FP8, "dtype", "None (integer codes of `bits`), float8_e4m3fn or float8_e5m2",
          kind.name)
  return float(ml_dtypes.finfo(kind).max), kind


def _codes(x: jax.Array, recip: tuple[jax.Array, jax.Array], qmax: float,
           grid: np.dtype | None = None) -> jax.Array:
  """`x / scale` clipped to [-qmax, qmax] and rounded half to even: to an integer, or to
  the fp8 grid (as float32 values)."""
  v = jnp.clip(_ratio(x, recip), -qmax, qmax)
  return jnp.round(v) if grid is None else v.astype(grid).astype(jnp.float32)


def _sum_to_shape(t: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """Sums a broadcast cotangent back to the operand's shape."""
  lead = t.ndim - len(shape)
  axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape)
                                    if d == 1 and t.shape[lead + i] != 1)
  return jnp.sum(t, axis=axes, keepdims=True).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _lsq(x, scale, inv, qmax, grad_scale, grid=None, clips=True):
  """`codes(x / scale) * scale`; inv is `_reciprocal(scale)` (or of amax, qmax): rounding only.

  clips=False where no x lies outside `qmax * scale` by construction (the dynamic scale
  `amax / qmax`): `x * inv` of the largest |x| may round a hair above qmax, which is no clip.
  """
  return (_codes(x, inv, qmax, grid) * scale).astype(x.dtype)


def _lsq_fwd(x, scale, inv, qmax, grad_scale, grid=None, clips=True):
  return _lsq(x, scale, inv, qmax, grad_scale, grid, clips), (x, scale, inv)


def _lsq_bwd(qmax, grad_scale, grid, clips, residuals, g):
  x, scale, inv = residuals
  v = _ratio(x.astype(jnp.float32), inv)
  q = _codes(x.astype(jnp.float32), inv, qmax, grid)
  inside = jnp.abs(v) <= qmax if clips else jnp.ones(v.shape, bool)
  g32 = g.astype(jnp.float32)
  dx = jnp.where(inside, g32, 0).astype(x.dtype)
  dscale = _sum_to_shape(g32 * jnp.where(inside, q - v, q), scale.shape)
  if grad_scale is not None:
    dscale = dscale * grad_scale
  return dx, dscale.astype(scale.dtype), jax.tree.map(jnp.zeros_like, inv)


_lsq.defvjp(_lsq_fwd, _lsq_bwd)


def fake_quant(x: jax.Array, scale: jax.Array, *, bits: int = 8, dtype: Any = None,
               grad_scale: float | None = None) -> jax.Array:
  """Symmetric fake quantization with a learned step size (LSQ).

  Args:
    x: float array `[...]`.
    scale: positive float step size, broadcastable to `x` (per-tensor `[]` or a Python
      number, per-channel `[n]`, per-token `[m, 1]`, ...). A scale <= 0 gives codes 0. A known
      inf or NaN scale raises ValueError; a traced one gives NaN (`0 * inf`).
    bits: 8 (codes -127..127) or 4 (-7..7).
    dtype: None (the integer codes of `bits`), or float8_e4m3fn / float8_e5m2: codes on
      that fp8 grid (`x / scale` saturated at 448 / 57344, rounded half to even).
    grad_scale: optional factor on the scale gradient (LSQ's `g`).

  Returns:
    `q * scale` in the dtype of x, with the STE / LSQ gradients of the module
    docstring for x and scale.
  """
  qmax, grid = _grid(bits, dtype)
  _check_grad_scale(grad_scale)
  return _fake_quant(x, _step_size(x, scale), qmax, grad_scale, grid)


def _step_size(x: Any, scale: Any) -> jax.Array:
  """`scale` of `fake_quant` / `quantize` for x, checked (a Python number: per tensor)."""
  _check_float("x", x)
  if isinstance(scale, (int, float)) and not isinstance(scale, bool):
    scale = jnp.float32(scale)
  _check_float("scale", scale)
  try:
    broadcast = jnp.broadcast_shapes(scale.shape, x.shape)
  except ValueError:
    broadcast = None
  require(broadcast == tuple(x.shape), "scale", f"a shape broadcastable to x {describe(x)}",
          describe(scale))
  _check_known_scale("scale", scale)
  return scale


def _check_known_scale(name: str, scale: Any) -> None:
  check_known_finite(name, scale, "finite step sizes")  # q * inf would be NaN everywhere


# The quantizers below run as one compiled program each: called eagerly op by op, their
# first call compiled dozens of small programs (seconds; docs/performance.md).
@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _fake_quant(x, scale, qmax, grad_scale, grid):
  inv = jax.lax.stop_gradient(_reciprocal(scale.astype(jnp.float32)))
  return _lsq(x, scale, inv, qmax, grad_scale, grid)


def quantize(x: jax.Array, scale: jax.Array, *, bits: int = 8, dtype: Any = None) -> jax.Array:
  """The codes of `fake_quant`: `fake_quant(x, s) == quantize(x, s) * s`.

  Args:
    x, scale, bits, dtype: as in `fake_quant` (scale broadcastable to x; a Python number
      is a per-tensor scale).

  Returns:
    int8 codes of x's shape (in [-7, 7] for bits=4), or codes of the fp8 `dtype`.
  """
  qmax, grid = _grid(bits, dtype)
  return _quantize(x, _step_size(x, scale), qmax, grid)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _quantize(x, scale, qmax, grid):
  return _codes(x.astype(jnp.float32), _reciprocal(scale.astype(jnp.float32)),
                qmax, grid).astype(jnp.int8 if grid is None else grid)


def dynamic_fake_quant(x: jax.Array, *, bits: int = 8, dtype: Any = None) -> jax.Array:
  """Per-token dynamic fake quantization over the last axis.

  Forward: exactly `q * scale` of `npu_ops.quantize_per_token` (`scale = amax / qmax`,
  `q = round(x * (qmax / amax))`; with an fp8 `dtype`, float8_e4m3fn or float8_e5m2,
  `qmax` is 448 or 57344 and q lies on that grid), so a QAT model sees the numbers of the
  quantized ops. Backward: STE for x plus the LSQ scale rule carried through `amax`
  (module docstring). Rows of zeros give zeros. A row whose amax is within an ulp of
  float32's largest value gives +-inf there (`qmax * scale`, scale correctly rounded up,
  overflows), as `q * scale` of the quantized op does.
  """
  qmax, grid = _grid(bits, dtype)
  _check_float("x", x)
  require(x.ndim >= 1, "x", "rank >= 1 ([..., d]: quantized per row over the last axis)",
          describe(x))
  if x.shape[-1] == 0:  # nothing to quantize (as quantize_per_token: empty rows)
    return jnp.asarray(x)
  return _dynamic_fake_quant(x, qmax, grid)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _dynamic_fake_quant(x, qmax, grid):
  x32 = x.astype(jnp.float32)
  exact = jax.lax.stop_gradient(epilogue.row_amax(x32))  # quantize_per_token's amax:
  # subnormal values count (arithmetic on them may read them as 0)
  inv = jax.lax.stop_gradient(_reciprocal(exact, qmax))  # quantize_per_token's qmax / amax
  # amax's derivative, as jnp.max's (sign(x) / ties at the row's largest |x|), with the
  # largest found from the bits: a float comparison reads subnormal values as 0 (ties)
  top = ((epilogue.magnitude_bits(x32) == epilogue.magnitude_bits(exact)) &
         epilogue.exceeds_zero(exact))  # zero rows: no slope (|x|' = 0)
  sign = jnp.where(jnp.signbit(x32), -1.0, 1.0)
  slope = jax.lax.stop_gradient(jnp.where(top, sign, 0.0) /
                                jnp.maximum(jnp.sum(top, -1, keepdims=True), 1))
  amax = jnp.sum(slope * x32, axis=-1, keepdims=True)
  # quantize_per_token's scale bit for bit (correctly rounded, subnormal too), with the
  # derivative 1 / qmax of amax / qmax (the added term is 0 in the forward pass)
  scale = jax.lax.stop_gradient(epilogue.scale_for_amax(exact, qmax)) + (
      amax - jax.lax.stop_gradient(amax)) / qmax
  return _lsq(x, scale, inv, qmax, None, grid, False)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _fake_mx(x, dtype):
  codes, scales = quant_lib.quantize_mx(x, dtype)
  # saturated to x's type: float16 values within a bfloat16 step of 65504 round to 65536
  top = float(jnp.finfo(x.dtype).max)
  return jnp.clip(quant_lib.dequantize_mx(codes, scales), -top, top).astype(x.dtype)


def _fake_mx_fwd(x, dtype):
  codes, scales = quant_lib.quantize_mx(x, dtype)
  # the largest code times each block's scale (computed as dequantize_mx computes it)
  top = quant_lib.dequantize_mx(jnp.full(codes.shape, ml_dtypes.finfo(dtype).max, codes.dtype),
                                scales)
  return _fake_mx(x, dtype), jnp.abs(x.astype(jnp.float32)) <= top


def _fake_mx_bwd(dtype, inside, g):
  return (jnp.where(inside, g, jnp.zeros((), g.dtype)),)


_fake_mx.defvjp(_fake_mx_fwd, _fake_mx_bwd)
_fake_mx_program = jax.jit(_fake_mx, static_argnums=1)  # eager calls: one compile


def fake_quant_mx(x: jax.Array, dtype: Any = jnp.float8_e4m3fn) -> jax.Array:
  """MX fake quantization over the last axis (blocks of 32): `dequantize_mx(quantize_mx(x))`
  in the dtype of x, the numbers of an MX-quantized op (semantics B.1.6), saturated to the
  dtype's largest value (float16 values within a bfloat16 step of 65504 round to 65536).

  Backward: straight-through for x, 0 where the code saturated (`|x|` above the element
  type's largest value times the block scale) and in inf / NaN blocks. The block scale is
  a power of two set by the block's largest exponent, constant between powers of two: it
  carries no gradient (no LSQ rule applies).

  Args:
    x: float array `[..., d]`.
    dtype: float8_e4m3fn (default), float8_e5m2 or float4_e2m1fn.
  """
  _check_float("x", x)
  require(x.ndim >= 1, "x", "rank >= 1 ([..., d]: blocks of 32 along the last axis)",
          describe(x))
  kind = check_dtype_arg("dtype", dtype)
  require(kind in quant_lib.MX_DTYPES, "dtype", "float8_e4m3fn, float8_e5m2 or float4_e2m1fn",
          kind.name)
  return _fake_mx_program(x, kind)


def _grouped_view(w: jax.Array, scale: jax.Array) -> tuple[jax.Array, jax.Array]:
  """`[e, k, n]` weight and `[e, n]` / `[e, G, n]` scale -> `[e*G, k/G, n]`, `[e*G, 1, n]`.

  Three dims on purpose: XLA:CPU reduced `[e, 1, k, n]` over k (the scale
  gradient) 25x slower than `[e, k, n]`.
  """
  check_rank("weight", w, 3)
  e, k, n = w.shape
  groups = check_scale_groups("weight_scale", scale, e=e, n=n, k=k)
  return w.reshape(e * groups, k // groups, n), scale.reshape(e * groups, 1, n)


def fake_quant_weight(weight: jax.Array, weight_scale: jax.Array, *, bits: int = 8,
                      grad_scale: float | None = None) -> jax.Array:
  """`fake_quant` of expert weights `[e, k, n]` per channel (`weight_scale [e, n]`)
  or per group of k rows (`[e, G, n]`, groups of k/G rows)."""
  _check_float("weight", weight)
  _check_float("weight_scale", weight_scale)
  _grid(bits, None)
  _check_grad_scale(grad_scale)
  _check_known_scale("weight_scale", weight_scale)
  return _fake_quant_weight(weight, weight_scale, bits, grad_scale)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _fake_quant_weight(weight, weight_scale, bits, grad_scale):
  w4, s4 = _grouped_view(weight, weight_scale)
  return fake_quant(w4, s4, bits=bits, grad_scale=grad_scale).reshape(weight.shape)


def quantize_weight(weight: jax.Array, weight_scale: jax.Array, *, bits: int = 8) -> jax.Array:
  """int8 codes `[e, k, n]` of `fake_quant_weight` (int4 values for bits=4)."""
  _check_float("weight", weight)
  _check_float("weight_scale", weight_scale)
  _check_known_scale("weight_scale", weight_scale)  # as fake_quant_weight, whose codes these are
  _grid(bits, None)
  return _quantize_weight(weight, weight_scale, bits)


@functools.partial(jax.jit, static_argnums=2)
def _quantize_weight(weight, weight_scale, bits):
  w4, s4 = _grouped_view(weight, weight_scale)
  return quantize(w4, s4, bits=bits).reshape(weight.shape)


def weight_scale_from_amax(weight: jax.Array, *, groups: int = 1, bits: int = 8) -> jax.Array:
  """Initial step sizes `amax / qmax` per channel (`[e, n]`, groups=1) or per
  group of k/groups rows (`[e, groups, n]`). Columns where that is not a positive
  float32 get scale 1: zero columns, those whose amax / qmax underflows (amax below
  ~1.8e-43 for qmax 127), and those holding NaN."""
  qmax = qmax_for(bits)
  _check_float("weight", weight)
  check_rank("weight", weight, 3)
  e, k, n = weight.shape
  require(k >= 1, "weight", "[e, k, n] with k >= 1 (the scale is a max over k)",
          describe(weight))
  if isinstance(groups, bool) or not isinstance(groups, (int, np.integer)) or groups < 1 \
      or k % groups:
    fail("groups", f"a positive int dividing k={k}", repr(groups))
  return _weight_scale_from_amax(weight, int(groups), qmax)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _weight_scale_from_amax(weight, groups, qmax):
  e, k, n = weight.shape
  amax = epilogue.row_amax(weight.reshape(e, groups, k // groups, n), axis=2)[:, :, 0]
  # correctly rounded (XLA's float32 division need not be); subnormal scales count, one
  # that rounds to 0 (or NaN) would be no step size
  scale = epilogue.scale_for_amax(amax, qmax)
  scale = jnp.where(epilogue.exceeds_zero(scale), scale, 1.0)
  return scale[:, 0] if groups == 1 else scale


def fake_quant_gmm_swiglu_quant(
    x: jax.Array, weight: jax.Array, weight_scale: jax.Array, group_list: Any, *,
    group_list_type: int = 0, weight_bits: int = 8, grad_scale: float | None = None,
    tuning_config: Any = None, implementation: str | None = None, interpret: bool = False,
    tiles: Any = None) -> jax.Array:
  """Training form of `npu_grouped_matmul_swiglu_quant_v2`: float in, float out.

  Forward: x is quantized per token (`quantize_per_token`), the weights per
  channel or per group with the learned `weight_scale` (`quantize_weight`), and
  the integer op runs on those codes (A8W8 for weight_bits=8, A8W4 with the
  canonical assist matrix for 4); the result is its output dequantized,
  `output * output_scale[:, None]`: bit for bit what the deployed int8 model
  computes.

  Backward (semantics A.4): the gradient of the float chain
  `dynamic_fake_quant(swiglu(grouped_matmul(dynamic_fake_quant(x),
  fake_quant_weight(weight, weight_scale))))`, i.e. STE for every rounding, LSQ
  for the weight scales and the per-token scales, and the fast grouped matmul's
  own VJP (gmm with transposed weights, tgmm). It recomputes that chain in the
  backward pass. Rows outside every group get zero output and zero gradient.

  Args:
    x: float `[m, k]` (float32 / bfloat16).
    weight: float `[e, k, n]` (n even; the left half of each output gets silu).
    weight_scale: positive float `[e, n]` (per channel) or `[e, G, n]` (per group
      of k/G rows; weight_bits=4 only, as in the integer op's dequant_mode 1).
    group_list: as in `npu_grouped_matmul_swiglu_quant_v2` (static ints or a
      dynamic array; cumsum or counts per `group_list_type`).
    weight_bits: 8 (A8W8) or 4 (A8W4: int4 weight codes -7..7).
    grad_scale: optional LSQ factor on the weight-scale gradient.
    tuning_config, implementation, interpret, tiles: as in the integer op (the
      A8W4 form has no kernel; under implementation=None it runs on XLA).

  Returns:
    float32 `[m, n/2]`.
  """
  qmax_for(weight_bits, "weight_bits")
  _check_grad_scale(grad_scale)
  _check_float("x", x)
  _check_float("weight", weight)
  _check_float("weight_scale", weight_scale)
  check_rank("x", x, 2)
  check_rank("weight", weight, 3)
  m, k = x.shape
  e, k_w, n = weight.shape
  require(k_w == k, "weight", f"[e, k={k}, n] to match x {describe(x)}", describe(weight))
  require(n % 2 == 0, "weight", "an even n (last dim; SwiGLU halves it)", describe(weight))
  check_scale_groups("weight_scale", weight_scale, e=e, n=n, k=k)
  _check_known_scale("weight_scale", weight_scale)
  if weight_scale.ndim == 3 and weight_scale.shape[1] > 1:
    require(weight_bits == 4, "weight_scale", "[e, n] for weight_bits=8 (per-group scales are "
            "the A8W4 path)", describe(weight_scale))
  backend.check(implementation, interpret, tiles)
  ends = groups_lib.group_ends(group_list, group_list_type=group_list_type, m=m, num_groups=e)
  expected_tokens = torch_npu_fused.expected_tokens(tuning_config)
  run = grouped_lib.Run(implementation, row_blocks.GmmBlockSizes.for_problem(
      m, len(ends), expected_tokens), interpret, tiles)
  static = isinstance(ends, tuple)
  return _qat_fused_program(x, weight, weight_scale, None if static else ends,
                            ends if static else None, weight_bits, grad_scale, expected_tokens,
                            run)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _qat_fused(x, weight, weight_scale, dynamic_ends, static_ends, bits, grad_scale,
               expected_tokens, run):
  ends = static_ends if dynamic_ends is None else dynamic_ends
  e, _, n = weight.shape
  xq, xs = quant_lib.quantize_per_token(x)
  wq = quantize_weight(weight, weight_scale, bits=bits)
  scale = weight_scale.astype(jnp.float32).reshape(
      e, weight_scale.shape[1] if weight_scale.ndim == 3 else 1, n)
  w_bits = operands.INT8 if bits == 8 else operands.INT4
  assist = fused_lib.canonical_assist(wq, scale) if w_bits == operands.INT4 else None
  q, q_scale = fused_lib.fused(
      operands.QArray(xq, xs, operands.INT8), operands.QArray(wq, scale, w_bits), ends,
      assist=assist, expected_tokens=expected_tokens, implementation=run.implementation,
      interpret=run.interpret, tiles=run.tiles)
  return q.astype(jnp.float32) * q_scale[:, None]


def _qat_fused_fwd(x, weight, weight_scale, dynamic_ends, static_ends, bits, grad_scale,
                   expected_tokens, run):
  out = _qat_fused(x, weight, weight_scale, dynamic_ends, static_ends, bits, grad_scale,
                   expected_tokens, run)
  return out, (x, weight, weight_scale, dynamic_ends)


def _qat_fused_bwd(static_ends, bits, grad_scale, expected_tokens, run, residuals, g):
  x, weight, weight_scale, dynamic_ends = residuals
  ends = static_ends if dynamic_ends is None else dynamic_ends

  # Rows outside every group (padding, often uninitialised) enter the chain as zeros: their
  # cotangent is 0, which the fake quantizers' rules would multiply by a NaN or inf of theirs.
  inside = groups_lib.row_group_ids(ends, x.shape[0]) < len(ends)

  def float_chain(x, weight, weight_scale):
    x_hat = dynamic_fake_quant(jnp.where(inside[:, None], x, 0))
    w_hat = fake_quant_weight(weight, weight_scale, bits=bits, grad_scale=grad_scale)
    c = grouped_lib.differentiable_matmul(x_hat, w_hat, ends, out_dtype=np.dtype(jnp.float32),
                                          **run._asdict())
    return dynamic_fake_quant(quant_lib.swiglu(c))

  _, vjp = jax.vjp(float_chain, x, weight, weight_scale)
  return (*vjp(g), None)


_qat_fused.defvjp(_qat_fused_fwd, _qat_fused_bwd)
# Eager calls: one program (op by op, the first call compiled for seconds).
_qat_fused_program = jax.jit(_qat_fused, static_argnums=(4, 5, 6, 7, 8))
