"""SwiGLU and dynamic per-token quantization (semantics B.0.5, B.0.6, A.3 items 2-4).

Quantization is described as data: `DynamicQuant` says what the output is
quantized to and over which granularity, so new formats (fp8, MX) extend the
descriptor instead of adding a flag per format to every op.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from npu_ops._src.validation import (asarray, check_array, check_bool, check_dtype_arg,
                                     check_float_array, describe, fail, require)
from pallas_kernels import epilogue
from pallas_kernels.epilogue import silu

PER_TOKEN, MX = 0, 2
_INT8 = np.dtype(np.int8)
_FP8 = tuple(np.dtype(t) for t in (jnp.float8_e4m3fn, jnp.float8_e5m2))
_FP4 = np.dtype(jnp.float4_e2m1fn)
_DTYPES = {PER_TOKEN: (_INT8,) + _FP8, MX: _FP8 + (_FP4,)}
MX_DTYPES = _DTYPES[MX]
# torch_npu's quant_dtype codes: 0 (doc default) and 1 (torch.int8, meta default) mean int8;
# torch ScalarType codes for the rest (semantics B.1.7), float4_e2m1fn_x2 (45) is packed fp4.
_TORCH_CODES = {0: _INT8, 1: _INT8, 23: _FP8[1], 24: _FP8[0], 45: _FP4}
_MODE_NAMES = {PER_TOKEN: "per-token", MX: "MX"}


def _dtype_names(dtypes) -> str:
  return ", ".join(d.name for d in dtypes)


@dataclasses.dataclass(frozen=True)
class DynamicQuant:
  """How the fused op quantizes its output (semantics A.3 item 6, B.0.6, B.1.6).

  Attributes:
    dtype: element type of the codes: int8, float8_e4m3fn or float8_e5m2 per token;
      float8_e4m3fn, float8_e5m2 or float4_e2m1fn for MX.
    mode: 0 = per-token (one float32 scale `amax / max` per row over the last axis);
      2 = MX (one e8m0 scale per block of 32 along the last axis, values rounded to
      bfloat16 first).
  """
  dtype: Any = _INT8
  mode: int = PER_TOKEN

  def __post_init__(self):
    if self.mode not in _DTYPES:
      fail("DynamicQuant.mode", "0 (per-token) or 2 (MX)", repr(self.mode))
    dtype = check_dtype_arg("DynamicQuant.dtype", self.dtype)
    if dtype not in _DTYPES[self.mode]:
      fail("DynamicQuant.dtype", f"one of {_dtype_names(_DTYPES[self.mode])} for "
           f"{_MODE_NAMES[self.mode]} quantization", dtype.name)
    object.__setattr__(self, "dtype", dtype)  # one spelling: equal specs hash equal

  @property
  def qmax(self) -> float:
    """The largest code: 127, or the float type's largest finite value (448, 57344, 6)."""
    return 127.0 if self.dtype == _INT8 else float(ml_dtypes.finfo(self.dtype).max)

  @classmethod
  def from_torch_npu(cls, quant_dtype: Any, quant_mode: Any) -> "DynamicQuant":
    """Reads torch_npu's `quant_dtype` (a code or a dtype) and `quant_mode` (0 or 2)."""
    if isinstance(quant_mode, bool) or not isinstance(quant_mode, (int, np.integer)):
      fail("quant_mode", "a Python int (0 = per-token, 2 = MX)", repr(quant_mode), TypeError)
    if quant_mode not in _DTYPES:
      fail("quant_mode", "0 (per-token dynamic quantization) or 2 (MX)", quant_mode)
    codes = ", ".join(f"{c} ({d.name})" for c, d in _TORCH_CODES.items())
    if isinstance(quant_dtype, (int, np.integer)) and not isinstance(quant_dtype, bool):
      if quant_dtype not in _TORCH_CODES:
        fail("quant_dtype", f"one of the codes {codes}, or a dtype", quant_dtype)
      dtype = _TORCH_CODES[quant_dtype]
    elif quant_dtype is None or isinstance(quant_dtype, bool):
      fail("quant_dtype", f"one of the codes {codes}, or a dtype", repr(quant_dtype), TypeError)
    else:
      dtype = check_dtype_arg("quant_dtype", quant_dtype)
    allowed = _DTYPES[quant_mode]
    require(dtype in allowed, "quant_dtype",
            f"one of {_dtype_names(allowed)} with quant_mode={quant_mode}", dtype.name)
    return cls(dtype=dtype, mode=quant_mode)


INT8_PER_TOKEN = DynamicQuant()


# torch_npu act_type codes (semantics B.4.2); 3 (GELU-erf) is not supported by torch_npu.
ACT_NONE, ACT_RELU, ACT_GELU_TANH, ACT_FAST_GELU, ACT_SILU = 0, 1, 2, 4, 5
ACT_TYPES = (ACT_NONE, ACT_RELU, ACT_GELU_TANH, ACT_FAST_GELU, ACT_SILU)


def activation(x: jax.Array, act_type: int) -> jax.Array:
  """torch_npu's grouped-matmul activation `act_type` on float32 `x` (semantics B.4.2)."""
  if act_type == ACT_NONE:
    return x
  if act_type == ACT_RELU:
    return jnp.maximum(x, 0)
  if act_type == ACT_GELU_TANH:
    return 0.5 * x * (1 + jnp.tanh(np.sqrt(2 / np.pi).astype(np.float32) * (x + 0.044715 * x**3)))
  if act_type == ACT_FAST_GELU:  # x * sigmoid(1.702 x), in the overflow-free form of the kernel
    ax = jnp.abs(x)
    return x / (1 + jnp.exp(-1.702 * ax)) * jnp.exp(0.851 * (x - ax))
  if act_type == ACT_SILU:
    return silu(x)
  fail("act_type", f"one of {list(ACT_TYPES)}", act_type)


def swiglu(c: jax.Array, *, activate_left: bool = True) -> jax.Array:
  """`silu(act) * gate` over the halves of the last axis: `[..., n] -> [..., n/2]`.

  torch_npu applies silu to the left (first) half and uses the right half as the
  gate (semantics B.0.5); `activate_left=False` swaps the roles.
  """
  check_float_array("c", c)
  require(c.ndim >= 1, "c", "rank >= 1 ([..., n])", describe(c))
  n = c.shape[-1]
  if n % 2:
    fail("c", "an even last dim", n)
  return _swiglu(c, check_bool("activate_left", activate_left))


@functools.partial(jax.jit, static_argnums=1)  # eager calls: one compile, not one per op
def _swiglu(c: jax.Array, activate_left: bool) -> jax.Array:
  if activate_left:
    return epilogue.swiglu(c)
  n = c.shape[-1]
  return epilogue.swiglu_halves(c[..., n // 2:], c[..., : n // 2])


def quantize_per_token(s: jax.Array, spec: DynamicQuant = INT8_PER_TOKEN
                       ) -> tuple[jax.Array, jax.Array]:
  """Dynamic symmetric quantization of each row of `s` (float32 `[..., d]`).

  With `max` the largest code of `spec.dtype` (int8: 127; float8_e4m3fn: 448;
  float8_e5m2: 57344): `scale = amax / max`, codes `s * (max / amax)` in float32,
  clipped to [-max, max] and rounded half to even (int8: to an integer; fp8: the cast,
  which saturates) (semantics A.3 items 3 and 6). A row with amax = 0 gives codes 0 and
  scale 0, never NaN. Tiny rows lose nothing to float32's exponent range: codes as if
  `max / amax` could not overflow, and a subnormal scale is returned exactly, though
  XLA:CPU and TPU arithmetic on it (e.g. `q * scale`) flushes it to 0. Subnormal inputs
  count at their value (read from their bits where that arithmetic reads them as 0).

  Returns:
    (q `[..., d]` of spec.dtype, scale float32 `[...]`).
  """
  check_float_array("s", s)
  require(s.ndim >= 1, "s", "rank >= 1 ([..., d])", describe(s))
  if not isinstance(spec, DynamicQuant):
    fail("spec", "an npu_ops.DynamicQuant", repr(spec), TypeError)
  require(spec.mode == PER_TOKEN, "spec", "a per-token DynamicQuant (mode 0; MX is "
          "npu_ops.quantize_mx)", repr(spec))
  if s.shape[-1] == 0:  # nothing to quantize: amax 0, scale 0
    return jnp.zeros(s.shape, spec.dtype), jnp.zeros(s.shape[:-1], jnp.float32)
  return _quantize_per_token(s, spec)


# One program: op by op, an eager call's first run compiled dozens (seconds)
@functools.partial(jax.jit, static_argnums=1)
def _quantize_per_token(s: jax.Array, spec: DynamicQuant) -> tuple[jax.Array, jax.Array]:
  q, scale = epilogue.quantize_rows(s.astype(jnp.float32), qmax=spec.qmax, dtype=spec.dtype,
                                    exact_subnormals=True)
  return q, scale[..., 0]


def quantize_mx(s: jax.Array, dtype: Any = jnp.float8_e4m3fn) -> tuple[jax.Array, jax.Array]:
  """MX quantization along the last axis, in blocks of 32 (semantics B.1.6).

  Each block's values are rounded to bfloat16; `E`, the largest exponent field among
  them, gives the block's e8m0 scale `2**(max(E, emax) - emax - 127)` (`emax` = 8 for
  float8_e4m3fn, 15 for float8_e5m2, 2 for float4_e2m1fn: OCP MX's
  `floor(log2 amax) - emax`), and codes `value / scale` cast rounding half to even and
  saturating. A block holding inf or NaN gets scale NaN (byte 0xFF) and NaN codes (fp4,
  having no NaN: 0), and so does one holding a finite value of 3.3961e38 or more (its
  bfloat16 rounding is inf); an all-zero (or all-subnormal) block scale byte 0 and zero
  codes.
  A last block shorter than 32 is quantized as if padded with zeros.

  Args:
    s: float array `[..., d]`.
    dtype: float8_e4m3fn (default), float8_e5m2 or float4_e2m1fn.

  Returns:
    (codes `[..., d]` of dtype, scales float8_e8m0fnu `[..., ceil(d / 32)]`);
    `dequantize_mx(codes, scales)` gives the values back.
  """
  check_float_array("s", s)
  require(s.ndim >= 1, "s", "rank >= 1 ([..., d])", describe(s))
  dtype = check_dtype_arg("dtype", dtype)
  require(dtype in _DTYPES[MX], "dtype", f"one of {_dtype_names(_DTYPES[MX])}", dtype.name)
  return _quantize_mx(s, dtype)


@functools.partial(jax.jit, static_argnums=1)  # eager calls: one compile, not one per op
def _quantize_mx(s: jax.Array, dtype: np.dtype) -> tuple[jax.Array, jax.Array]:
  codes, scale = epilogue.quantize_mx_rows(s, dtype, exact_subnormals=True)
  return codes, jax.lax.bitcast_convert_type(scale, jnp.float8_e8m0fnu)


def dequantize_mx(codes: jax.Array, scales: jax.Array, dtype: Any = jnp.float32) -> jax.Array:
  """`codes * scale` of each block of 32 along the last axis (the inverse of `quantize_mx`).

  Args:
    codes: fp8 / fp4 codes `[..., d]`.
    scales: e8m0 scales `[..., ceil(d / 32)]` (float8_e8m0fnu, or their uint8 bytes).
    dtype: float result type (computed in float32).
  """
  out = check_dtype_arg("dtype", dtype)
  require(jnp.issubdtype(out, jnp.floating), "dtype", "a float dtype (the values are "
          "codes * scale, not integers)", out.name, TypeError)
  check_float_array("codes", codes)
  require(codes.ndim >= 1, "codes", "rank >= 1 ([..., d])", describe(codes))
  check_array("scales", scales)
  d = codes.shape[-1]
  blocks = -(-d // epilogue.MX_BLOCK)
  require(tuple(scales.shape) == tuple(codes.shape[:-1]) + (blocks,), "scales",
          f"shape {list(codes.shape[:-1]) + [blocks]} (one per block of 32 of codes "
          f"{describe(codes)})", describe(scales))
  return _dequantize_mx(codes, scales, out)  # e8m0_bytes checks the scales' dtype


@functools.partial(jax.jit, static_argnums=2)  # eager calls: one compile, not one per op
def _dequantize_mx(codes: jax.Array, scales: jax.Array, out: np.dtype) -> jax.Array:
  b = jnp.repeat(e8m0_bytes("scales", scales), epilogue.MX_BLOCK,
                 axis=-1)[..., :codes.shape[-1]].astype(jnp.int32)
  v = codes.astype(jnp.float32)
  # byte 0 is 2**-127, a float32 subnormal, which XLA:CPU reads as 0 as an operand: the
  # same product as (v / 2) * 2**-126 (v / 2 is exact: codes are at least 2**-16)
  return (jnp.where(b == 0, v * 0.5, v) * epilogue.e8m0_to_float32(jnp.maximum(b, 1))).astype(out)


def e8m0_bytes(name: str, scales: jax.Array) -> jax.Array:
  """uint8 bytes of e8m0 scales given as float8_e8m0fnu or uint8."""
  kind = np.dtype(scales.dtype)
  if kind == np.dtype(jnp.float8_e8m0fnu):
    return jax.lax.bitcast_convert_type(scales, jnp.uint8)
  require(kind == np.dtype(np.uint8), name, "float8_e8m0fnu or uint8 (e8m0 bytes)",
          describe(scales), TypeError)
  return asarray(scales)
