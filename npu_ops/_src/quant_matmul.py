"""A8W8 / A4W4 quantized matmul: `npu_quant_matmul`, `npu_trans_quant_param` (semantics B.2).

`acc = x1 @ x2` is exact int32; it is dequantized with a per-tensor or
per-channel scale (float32, bfloat16, or the int64 "fixpipe" word of
`npu_trans_quant_param`), optionally a per-token scale, an int32 bias (added
before scaling) or a float bias (added after), and cast to int8 (requant),
float16, bfloat16 or int32.

Fixpipe words (semantics B.0.4 item 1, B.2.3): bits 0..31 hold the float32 scale with
its low 13 mantissa bits cleared (1 sign, 8 exponent, 10 mantissa bits: "FP19"),
bit 46 is set, bits 37..45 hold a signed 9-bit offset.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from npu_ops._src import layouts
from npu_ops._src.validation import (asarray, check_array, check_dtype, check_dtype_arg,
                                     check_int_option, check_known_finite, describe, fail, require)

FP19_MASK = 0xFFFFE000
_WORD_FLAG = 1 << 46
_OFFSET_SHIFT = 37
_KEEP_SCALE_AND_FLAG = 0x4000FFFFFFFF
_MAX_LAST_DIM = 65535
_OUTPUT_DTYPES = tuple(np.dtype(d) for d in (jnp.int8, jnp.float16, jnp.bfloat16, jnp.int32))
_FLOAT_BIAS = tuple(np.dtype(d) for d in (jnp.bfloat16, jnp.float16, jnp.float32))


# --- npu_trans_quant_param ---------------------------------------------------------

def npu_trans_quant_param(scale: Any, offset: Any = None, round_mode: int = 0):
  """float32 scale (and offset) -> int64 fixpipe words, exactly as torch_npu.

  Args:
    scale: float32 `(n,)`, `(1,)`, `(1, n)`, `(g,)`, `(g, 1)` or `(g, n)`.
    offset: optional float32, broadcast against scale (a length-1 side
      broadcasts); rounded half-to-even and clipped to [-256, 255].
    round_mode: 0 truncates the scale to 10 mantissa bits; 1 rounds it to
      nearest-even on the bit pattern (with carry into the exponent; zero and
      subnormal exponents flush to +-0; inf/nan pass through).

  Returns:
    int64 words, a NumPy array when `jax_enable_x64` is off (JAX has no int64
    then), else a jax array. With x64 off the inputs must be concrete (not
    traced); inside `jit`, pass the float32 scale to `npu_quant_matmul` instead,
    which applies the same truncation.
  """
  round_mode = check_int_option("round_mode", round_mode, (0, 1))
  check_array("scale", scale)
  require(jnp.issubdtype(scale.dtype, jnp.floating), "scale", "a float32 array",
          describe(scale), TypeError)
  require(1 <= scale.ndim <= 2, "scale", "rank 1 or 2", describe(scale))
  if offset is not None:
    check_array("offset", offset)
    require(jnp.issubdtype(offset.dtype, jnp.floating), "offset", "a float32 array",
            describe(offset), TypeError)
    try:
      shape = np.broadcast_shapes(scale.shape, offset.shape)
    except ValueError:
      fail("offset", f"a shape that broadcasts with scale {describe(scale)}", describe(offset))
    check_known_finite("offset", offset, _FINITE_OFFSET)
  if jax.config.jax_enable_x64:
    xp, scale, offset = jnp, jnp.asarray(scale), None if offset is None else jnp.asarray(offset)
  else:
    if isinstance(scale, jax.core.Tracer) or isinstance(offset, jax.core.Tracer):
      fail("scale", "a concrete array when jax_enable_x64 is off (int64 words are NumPy "
           "arrays then); inside jit pass the float32 scale to npu_quant_matmul", "a tracer",
           TypeError)
    xp, scale, offset = np, np.asarray(scale), None if offset is None else np.asarray(offset)
  bits = _float32_bits(xp, scale)
  f19 = _fp19(xp, bits, round_mode)
  words = f19.astype(xp.int64) | _WORD_FLAG
  if offset is not None:
    o = xp.clip(xp.round(offset.astype(xp.float32)), -256, 255).astype(xp.int64)
    words = xp.broadcast_to(words, shape)
    words = (words & _KEEP_SCALE_AND_FLAG) | ((xp.broadcast_to(o, shape) & 0x1FF) << _OFFSET_SHIFT)
  return words


def _float32_bits(xp, scale):
  f = scale.astype(xp.float32)
  if xp is np:
    return f.view(np.uint32).astype(np.uint64)
  return lax.bitcast_convert_type(f, jnp.uint32).astype(jnp.uint64)


def _fp19(xp, bits, round_mode):
  """uint64 holding float32 bits -> the FP19 pattern (low 13 mantissa bits zero)."""
  if round_mode == 0:
    return bits & FP19_MASK
  exponent = (bits >> 23) & 0xFF
  keep = bits >> 13
  round_up = (((bits >> 12) & 1) == 1) & (((bits & 0xFFF) != 0) | ((keep & 1) == 1))
  rounded = (keep + round_up.astype(keep.dtype)) << 13  # a mantissa carry bumps the exponent
  flushed = bits & 0x80000000  # zero / subnormal exponent -> signed zero
  out = xp.where(exponent == 0, flushed, rounded)
  return xp.where(exponent == 0xFF, bits & FP19_MASK, out) & 0xFFFFFFFF


def decode_quant_param(words: Any, name: str = "words") -> tuple[jax.Array, jax.Array]:
  """int64 fixpipe words -> (float32 scale, int32 offset in [-256, 255]).

  `scale = bitcast_f32(uint32(word) & 0xFFFFE000)`, `offset = signed 9-bit field
  at bit 37` (semantics A.2). NumPy words decode on the host (x64 may be off).
  """
  check_dtype(name, words, (np.int64, np.uint64))
  if isinstance(words, np.ndarray):
    w = words.astype(np.uint64)
    scale = (w & np.uint64(FP19_MASK)).astype(np.uint32).view(np.float32)
    off = ((w >> np.uint64(_OFFSET_SHIFT)) & np.uint64(0x1FF)).astype(np.int32)
    return asarray(scale), asarray(np.where(off >= 256, off - 512, off))
  w = words.astype(jnp.uint64)
  scale = lax.bitcast_convert_type((w & FP19_MASK).astype(jnp.uint32), jnp.float32)
  off = ((w >> _OFFSET_SHIFT) & 0x1FF).astype(jnp.int32)
  return scale, jnp.where(off >= 256, off - 512, off)


def fp19(scale: jax.Array) -> jax.Array:
  """float32 -> float32 with the low 13 mantissa bits cleared (round_mode 0 of the words)."""
  bits = lax.bitcast_convert_type(scale.astype(jnp.float32), jnp.uint32)
  return lax.bitcast_convert_type(bits & jnp.uint32(FP19_MASK), jnp.float32)


def requant_int8(v: jax.Array, offset: jax.Array | None = None) -> jax.Array:
  """Fixpipe requant (semantics B.2.1): RNE, clip to s9, + s9 offset, clip to int8."""
  t = jnp.clip(jnp.round(v), -256, 255)
  if offset is not None:
    t = t + jnp.clip(jnp.round(offset), -256, 255)
  return jnp.clip(t, -128, 127).astype(jnp.int8)


# --- npu_quant_matmul ----------------------------------------------------------------

def npu_quant_matmul(x1: Any, x2: Any, scale: Any, *, offset: Any = None,
                     pertoken_scale: Any = None, bias: Any = None,
                     output_dtype: Any = None) -> jax.Array:
  """torch_npu.npu_quant_matmul: `y = dequant(int32(x1 @ x2))` (semantics B.2.1).

  Args:
    x1: int8 `[..., m, k]`, int32 words `[..., m, k/8]` (int4) or native int4
      `[..., m, k]`; 2-6 dims.
    x2: `[..., k, n]` of x1's dtype (int32 words: `[..., k, n/8]`, or torch_npu's
      transposed pack `[..., k/8, n]`: `(n, k)` packed, then transposed); batch dims
      broadcast against x1's numpy-style. ND only: 2-6 dims leave a FRACTAL_NZ
      weight indistinguishable from a batched one, so cast NZ back first
      (`npu_format_cast(x2, 2, shape=(k, n))`).
    scale: `(1,)` or `(n,)`: float32, bfloat16, or int64 words from
      `npu_trans_quant_param` (NumPy arrays work with x64 off; inside `jit`
      close over them rather than passing them as arguments, which JAX would
      narrow to int32).
    offset: float32 `(1,)` / `(n,)`, int8 output only (added after the s9 clip).
    pertoken_scale: float32 `(m,)`, float16/bfloat16 output only.
    bias: `(n,)` or `(batch, 1, n)` (3-D output only). int32: added to the
      accumulator before scaling; bfloat16/float16/float32: added after
      (float outputs, no offset).
    output_dtype: None (= int8), int8, float16, bfloat16 or int32.

  A float32 scale is truncated to FP19 (and offset rounded to s9) wherever
  torch_npu routes it through `npu_trans_quant_param`: no per-token scale and an
  int8 or float16 output. bfloat16 outputs and per-token scales use it as is.

  Returns:
    `[*broadcast(batch), m, n]` of output_dtype.
  """
  out_dtype = check_output_dtype(output_dtype)
  a, b = _quant_operands(x1, x2)
  batch = jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])  # symbolic dims too (jax.export)
  m, n = a.shape[-2], b.shape[-1]

  deq_scale, word_offset = _scale(scale, n, out_dtype, pertoken_scale is not None)
  if offset is not None:
    require(out_dtype == np.int8, "offset", "None unless output_dtype is int8", describe(offset))
    _check_vector("offset", offset, n, (np.float32,))
    check_known_finite("offset", offset, _FINITE_OFFSET)
    word_offset = jnp.asarray(offset, jnp.float32)
  if pertoken_scale is not None:
    require(out_dtype in (np.dtype(jnp.float16), np.dtype(jnp.bfloat16)), "pertoken_scale",
            "None unless output_dtype is float16 or bfloat16", describe(pertoken_scale))
    check_dtype("pertoken_scale", pertoken_scale, (np.float32,))
    require(tuple(pertoken_scale.shape) == (m,), "pertoken_scale", f"shape (m={m},)",
            describe(pertoken_scale))
  if bias is not None:
    check_dtype("bias", bias, (np.int32,) + _FLOAT_BIAS)
    out_rank = max(a.ndim, b.ndim)
    ok = tuple(bias.shape) == (n,) or (out_rank == 3 and bias.ndim == 3 and
                                      tuple(bias.shape[1:]) == (1, n) and
                                      bias.shape[0] in (1, batch[0]))
    require(ok, "bias", f"shape (n={n},) or (batch, 1, n) for a 3-D output", describe(bias))
    if np.dtype(bias.dtype) != np.int32:
      require(out_dtype in _FLOAT_BIAS and word_offset is None, "bias",
              "int32 unless the output is float16/bfloat16 without offset", describe(bias),
              TypeError)
  return _quant_matmul(a, b, deq_scale, word_offset, pertoken_scale, bias, out_dtype=out_dtype)


_FINITE_OFFSET = "finite values (an offset is rounded to an integer in [-256, 255])"


def check_output_dtype(output_dtype: Any) -> np.dtype:
  """`output_dtype` (None: int8) as a NumPy dtype, one npu_quant_matmul can produce."""
  if output_dtype is None:
    return np.dtype(jnp.int8)
  out_dtype = check_dtype_arg("output_dtype", output_dtype)
  require(out_dtype in _OUTPUT_DTYPES, "output_dtype", "int8, float16, bfloat16 or int32",
          out_dtype.name, TypeError)
  return out_dtype


def _quant_operands(x1: Any, x2: Any) -> tuple[jax.Array, jax.Array]:
  for name, x in (("x1", x1), ("x2", x2)):
    check_dtype(name, x, (np.int8, np.int32, jnp.int4))
    require(2 <= x.ndim <= 6, name, "2 to 6 dims", describe(x))
    require(x.shape[-1] <= _MAX_LAST_DIM, name, f"a last dim <= {_MAX_LAST_DIM}", describe(x))
  require(x1.dtype == x2.dtype, "x2", f"the dtype of x1 ({np.dtype(x1.dtype).name}; int8 pairs "
          "with int8, int32-packed int4 with int32, native int4 with int4)", describe(x2),
          TypeError)
  a, b = asarray(x1), asarray(x2)
  if np.dtype(a.dtype) == np.int32:  # int4 words, 8 per int32 along the last dim
    a = layouts.unpack_int4(a)
    b = (layouts.unpack_transposed_int4pack(b)
         if layouts.is_transposed_int4pack(b, a.shape[-1]) else layouts.unpack_int4(b))
  a, b = a.astype(jnp.int8), b.astype(jnp.int8)  # native int4: the same values as int8
  k = a.shape[-1]
  if b.shape[-2] != k and _looks_nz(x2, k):
    fail("x2", f"an ND weight [..., k={k}, n] (a FRACTAL_NZ one cannot be told from a "
         "batched ND weight here: cast it back first, npu_format_cast(x2, 2, shape=(k, n)))",
         describe(x2))
  require(b.shape[-2] == k, "x2", f"[..., k={k}, n] to match x1 {describe(x1)}", describe(x2))
  try:
    jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2])
  except ValueError:
    fail("x2", f"batch dims that broadcast with x1's {list(a.shape[:-2])}",
         list(b.shape[:-2]))
  return a, b


def _looks_nz(x2: Any, k: int) -> bool:
  """Whether x2 has the storage shape of an NZ `[k, n]` weight (B.5: `[..., ceil(k/16), 16, C0]`)."""
  return (x2.ndim >= 4 and x2.shape[-3] == -(-k // layouts.NZ_ROWS) and
          x2.shape[-2] == layouts.NZ_ROWS and x2.shape[-1] == layouts.nz_c0(x2.dtype))


def _check_vector(name: str, v: Any, n: int, dtypes) -> None:
  check_dtype(name, v, dtypes)
  require(tuple(v.shape) in ((1,), (n,)), name, f"shape (1,) or (n={n},)", describe(v))


def _scale(scale: Any, n: int, out_dtype: np.dtype, pertoken: bool):
  """-> (float32 dequant scale, offset from the words or None)."""
  _check_vector("scale", scale, n, (np.float32, jnp.bfloat16, np.int64, np.uint64))
  if np.dtype(scale.dtype) in (np.dtype(np.int64), np.dtype(np.uint64)):
    s, o = decode_quant_param(scale, "scale")
    return s, (o.astype(jnp.float32) if out_dtype == np.int8 else None)
  s = asarray(scale, jnp.float32)
  through_trans_quant_param = (np.dtype(scale.dtype) == np.float32 and not pertoken and
                               out_dtype in (np.dtype(jnp.int8), np.dtype(jnp.float16)))
  return (fp19(s) if through_trans_quant_param else s), None


@functools.partial(jax.jit, static_argnames=("out_dtype",))
def _quant_matmul(a, b, scale, offset, pertoken, bias, *, out_dtype):
  acc = jnp.matmul(a, b, preferred_element_type=jnp.int32)
  if bias is not None and bias.dtype == jnp.int32:
    acc = acc + bias
  if out_dtype == np.int32:
    return acc
  v = acc.astype(jnp.float32) * scale
  if out_dtype == np.int8:
    return requant_int8(v, offset)
  if pertoken is not None:
    v = v * pertoken[:, None]
  if bias is not None and bias.dtype != jnp.int32:
    v = v + bias.astype(jnp.float32)
  return v.astype(out_dtype)
