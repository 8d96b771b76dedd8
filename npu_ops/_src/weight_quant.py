"""Weight-only quantized matmul (W8A16 / W4A16): `npu_weight_quant_batchmatmul` (semantics B.6).

`y = x @ ((W + antiquant_offset) * antiquant_scale) + bias`, with the rounding
points of the torch_npu golden: the dequantized weight is rounded to x's dtype
after the offset and after the scale, the product accumulates in float32, and
the result is rounded once to x's dtype (or requantized to int8).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from npu_ops._src import layouts, operands
from npu_ops._src.validation import asarray, check_array, check_dtype, describe, fail, require
from npu_ops._src.quant_matmul import decode_quant_param, fp19, requant_int8

_X_DTYPES = tuple(np.dtype(d) for d in (jnp.float16, jnp.bfloat16))
_MAX_DIM = 65535
_GROUP_MULTIPLE = 32


def npu_weight_quant_batchmatmul(x: Any, weight: Any, antiquant_scale: Any,
                                 antiquant_offset: Any = None, quant_scale: Any = None,
                                 quant_offset: Any = None, bias: Any = None,
                                 antiquant_group_size: int = 0) -> jax.Array:
  """torch_npu.npu_weight_quant_batchmatmul.

  Args:
    x: float16 / bfloat16 `[m, k]`.
    weight: int8 `[k, n]`, int4 as int32 words `[k, n/8]` (or torch_npu's transposed
      pack `[k/8, n]`: `(n, k)` packed, then transposed) or `jnp.int4` `[k, n]`, or
      their FRACTAL_NZ storage (4-D; n then comes from a per-channel or per-group
      scale).
    antiquant_scale: x's dtype; per tensor `(1,)` / `(1, 1)`, per channel
      `(n,)` / `(1, n)`, or per group `(ceil(k / gs), n)` with
      `gs = antiquant_group_size` (row kk uses group kk // gs; the last group may
      be partial).
    antiquant_offset: optional, the shape and dtype of antiquant_scale; added to
      the weight before scaling.
    quant_scale: optional int8 output: float32 `(1,)` / `(n,)` / `(1, n)` (used
      as FP19, like the fixpipe), or int64 words from `npu_trans_quant_param`; ND
      weights only.
    quant_offset: optional float32 like quant_scale (float quant_scale only).
    bias: `(n,)` / `(1, n)`: float16 for float16 x, float32 for bfloat16 x.
    antiquant_group_size: 0 (per tensor / channel) or a multiple of 32 in
      [32, k - 1].

  Returns:
    `[m, n]` of x's dtype, or int8 with quant_scale (the float32 result,
    requantized: RNE, s9 clip, + s9 offset, clip to int8; semantics B.6 marks the exact
    hardware rounding as uncertain).
  """
  check_dtype("x", x, _X_DTYPES)
  require(x.ndim == 2, "x", "rank 2 ([m, k])", describe(x))
  m, k = x.shape
  xdt = np.dtype(x.dtype)
  check_array("antiquant_scale", antiquant_scale)
  if np.dtype(antiquant_scale.dtype) in (np.dtype(np.int64), np.dtype(np.uint64)):
    raise NotImplementedError("antiquant_scale as int64 fixpipe words is not implemented; "
                              "pass it as float16/bfloat16")
  check_dtype("antiquant_scale", antiquant_scale, (xdt,))
  w = _weight(weight, k, antiquant_scale)
  n = w.shape[1]
  require(k <= _MAX_DIM and n <= _MAX_DIM, "weight", f"k and n <= {_MAX_DIM}", (k, n))
  gs = _group_size(antiquant_group_size, k)
  scale = _antiquant_operand("antiquant_scale", antiquant_scale, k, n, gs)
  offset = None
  if antiquant_offset is not None:
    check_dtype("antiquant_offset", antiquant_offset, (xdt,))
    require(tuple(antiquant_offset.shape) == tuple(antiquant_scale.shape), "antiquant_offset",
            f"the shape of antiquant_scale {list(antiquant_scale.shape)}",
            describe(antiquant_offset))
    offset = _antiquant_operand("antiquant_offset", antiquant_offset, k, n, gs)
  q_scale = q_offset = None
  if quant_scale is not None:
    require(np.ndim(weight) == 2, "quant_scale", "None for a FRACTAL_NZ weight (ND weights "
            "only, semantics B.6)", describe(quant_scale))
    q_scale, q_offset = _quant_scale(quant_scale, quant_offset, n)
  elif quant_offset is not None:
    fail("quant_offset", "None without quant_scale", describe(quant_offset))
  if bias is not None:
    want = np.dtype(jnp.float16) if xdt == np.float16 else np.dtype(np.float32)
    check_dtype("bias", bias, (want,))
    require(tuple(bias.shape) in ((n,), (1, n)), "bias", f"shape (n={n},) or (1, n)",
            describe(bias))
    bias = asarray(bias.reshape(n))
  return _wqbmm(asarray(x), w, scale, offset, bias, q_scale, q_offset)


def _weight(weight: Any, k: int, scale: Any) -> jax.Array:
  """Any accepted weight form -> int8 values [k, n]."""
  check_dtype("weight", weight, (np.int8, np.int32, jnp.int4))
  packed = np.dtype(weight.dtype) == np.int32
  cols = "n/8" if packed else "n"
  if weight.ndim == 2:
    if layouts.is_transposed_int4pack(weight, k):
      return layouts.unpack_transposed_int4pack(weight)
    transposed = f" or the transposed pack [k/8={k // 8}, n]" if packed and k % 8 == 0 else ""
    require(weight.shape[0] == k, "weight", f"ND [k={k}, {cols}] (k from x){transposed}",
            describe(weight))
    n = weight.shape[1] * (layouts.INT4_PER_INT32 if packed else 1)
  elif weight.ndim == 4:
    require(scale.ndim >= 1 and scale.shape[-1] > 1, "antiquant_scale",
            "a per-channel or per-group scale (it gives n) for a FRACTAL_NZ weight",
            describe(scale))
    n = scale.shape[-1]
    if packed:
      require(n % layouts.INT4_PER_INT32 == 0, "antiquant_scale",
              "a last dim n that is a multiple of 8 for an int32-packed int4 weight",
              describe(scale))
    expected = layouts.nz_shape((k, n // layouts.INT4_PER_INT32 if packed else n),
                                weight.dtype)
    require(tuple(weight.shape) == expected, "weight",
            f"FRACTAL_NZ storage {list(expected)} of a [k={k}, n={n}] weight (k from x, n "
            "from antiquant_scale)", describe(weight))
  else:
    fail("weight", "rank 2 (ND [k, n]) or rank 4 (FRACTAL_NZ)", describe(weight))
  return operands.canonical_weight(asarray(weight[None]), k=k, n=n).values[0].astype(jnp.int8)


def _group_size(gs: Any, k: int) -> int:
  if isinstance(gs, bool) or not isinstance(gs, (int, np.integer)):
    fail("antiquant_group_size", "an int", repr(gs), TypeError)
  require(gs == 0 or (gs % _GROUP_MULTIPLE == 0 and _GROUP_MULTIPLE <= gs < k),
          "antiquant_group_size", f"0 or a multiple of 32 in [32, k-1={k - 1}]", gs)
  return int(gs)


def _antiquant_operand(name: str, v: Any, k: int, n: int, gs: int) -> jax.Array:
  """scale / offset -> per-row values [k or 1, n or 1]."""
  v = asarray(v)
  if gs:
    groups = -(-k // gs)
    require(tuple(v.shape) == (groups, n), name,
            f"per-group shape (ceil(k/{gs})={groups}, n={n})", describe(v))
    return jnp.repeat(v, gs, axis=0)[:k]
  if v.size == 1 and v.ndim in (1, 2):
    return v.reshape(1, 1)
  require(tuple(v.shape) in ((n,), (1, n)), name,
          f"shape (1,) / (1, 1) per tensor or (n={n},) / (1, n) per channel", describe(v))
  return v.reshape(1, n)


def _quant_scale(quant_scale: Any, quant_offset: Any, n: int):
  check_dtype("quant_scale", quant_scale, (np.float32, np.int64, np.uint64))
  require(tuple(quant_scale.shape) in ((1,), (n,), (1, n)), "quant_scale",
          f"shape (1,), (n={n},) or (1, n)", describe(quant_scale))
  if np.dtype(quant_scale.dtype) != np.float32:
    if quant_offset is not None:
      fail("quant_offset", "None with int64 quant_scale words (they carry the offset)",
           describe(quant_offset))
    s, o = decode_quant_param(quant_scale, "quant_scale")
    return s.reshape(-1), o.reshape(-1).astype(jnp.float32)
  offset = None
  if quant_offset is not None:
    check_dtype("quant_offset", quant_offset, (np.float32,))
    require(tuple(quant_offset.shape) == tuple(quant_scale.shape), "quant_offset",
            f"the shape of quant_scale {list(quant_scale.shape)}", describe(quant_offset))
    offset = jnp.asarray(quant_offset).reshape(-1)
  return fp19(jnp.asarray(quant_scale)).reshape(-1), offset


def antiquant_weight(w: jax.Array, scale: jax.Array, offset: jax.Array | None, dtype: Any, *,
                     inter: Any = None) -> jax.Array:
  """`ANTIQUANT(W) = (W + offset) * scale` in `dtype`, with the golden's rounding points.

  Args:
    w: integer weight values (int8 holding int8 or int4 values), any shape.
    scale, offset: broadcastable to w (offset optional).
    dtype: result dtype (x's dtype).
    inter: the dtype rounded to after the offset and after the scale (default
      `dtype`, semantics B.6 and the float16 case of B.4.3); float32 rounds once at
      the end (the bfloat16 case of semantics B.4.3).
  """
  inter = dtype if inter is None else inter
  wf = w.astype(inter)  # exact: |W| <= 128
  if offset is not None:
    wf = _rounded(wf + offset.astype(inter), inter)
  return _rounded(wf * scale.astype(inter), dtype).astype(dtype)


def _rounded(v: jax.Array, dtype: Any) -> jax.Array:
  """v rounded to `dtype`'s precision (to nearest even). XLA may keep a bfloat16 or float16
  operation's result in float32 where the next one reads it as float32 (its excess-precision
  rule, on by default: XLA:CPU computes bfloat16 arithmetic in float32); `reduce_precision`
  is an operation it keeps."""
  info = jnp.finfo(dtype)
  return jax.lax.reduce_precision(v, exponent_bits=info.nexp, mantissa_bits=info.nmant)


@jax.jit
def _wqbmm(x, w, scale, offset, bias, q_scale, q_offset):
  inter = x.dtype
  wf = antiquant_weight(w, scale, offset, inter)
  out = jnp.dot(x.astype(jnp.float32), wf.astype(jnp.float32),
                precision=jax.lax.Precision.HIGHEST)
  if bias is not None:
    out = out + bias.astype(jnp.float32)
  if q_scale is not None:
    return requant_int8(out * q_scale, q_offset)
  return out.astype(inter)
