"""The epilogue math of every grouped op: one home, pure jnp, imports nothing of ours.

The XLA path (`gmm_swiglu_quant`, `_gmm_scenarios`) and both Pallas kernels
(`pallas_kernels.tpu`, `.gpu`) call these same functions on whole arrays or on
tiles, so a kernel and the XLA path round at the same points and give the same
bits, except where a float32 sum's order differs: A8W4's k-group sums (per k tile in
the kernels), a few ulps of the scale apart (semantics B.7). Shapes below are those of one row block: `acc [bm, bn]` (int32 partial
products), per-column scales `[1, bn]` (or `[bn]`), per-row scales `[bm, 1]`.

Terminology: a *k group* is the `k / G` contraction rows that one A8W4/A4W4
weight scale covers (`scale [e, G, n]`); an *expert group* is the rows of x
routed to one expert. "Block" is what a kernel moves into fast memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

INT8_QMAX = 127.0


@jax.custom_jvp
def silu(x: jax.Array) -> jax.Array:
  """`x / (1 + exp(-x))` in the dtype of x (the kernels' form, beta = 1).

  Differentiable everywhere: `exp(-x)` overflows below x = -88.7 (float32, bfloat16; -11.1
  in float16), where the value is -0 but the quotient's derivative would be inf / inf;
  the derivative is `silu_grad` instead."""
  return x / (1 + jnp.exp(-x))


@jax.custom_jvp
def silu_grad(x: jax.Array) -> jax.Array:
  """silu's derivative, `s (1 + x (1 - s))` with `s = sigmoid(x)` (`lax.logistic`); its own
  derivatives are `silu_derivative`'s (autodiff of this form would multiply a product of x,
  overflowed, by the sigmoid's vanishing derivative: 0 * inf, NaN)."""
  s = jax.nn.sigmoid(x)
  return s * (1 + x * (1 - s))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def silu_derivative(order: int, x: jax.Array) -> jax.Array:
  """silu's derivative of `order` (>= 2) as `P(s) + (x s (1 - s)) R(s)`, `s = sigmoid(x)`
  (`_silu_polynomials`): s (1 - s) <= 1/4 multiplies x first, so every term is finite for
  every finite x, and so is every order (each one's derivative is the next)."""
  p, r = _silu_polynomials(order)
  s = jax.nn.sigmoid(x)
  horner = lambda coeffs: functools.reduce(lambda acc, c: acc * s + c, coeffs[::-1][1:],
                                           jnp.full_like(s, coeffs[-1]))
  return horner(p) + (x * (s * (1 - s))) * horner(r)


@functools.cache
def _silu_polynomials(order: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Coefficients (lowest degree first) of P and R in `silu_derivative`. With
  `u = s (1 - s)` (= ds/dx): order 1 is `s + x u`, and the derivative of `P + x u R` is
  `u (P' + R) + x u ((1 - 2 s) R + u R')` (P', R': derivatives in s)."""
  poly = np.polynomial.polynomial
  u = np.array([0.0, 1.0, -1.0])
  p, r = np.array([0.0, 1.0]), np.array([1.0])
  for _ in range(order - 1):
    p, r = (poly.polymul(u, poly.polyadd(poly.polyder(p), r)),
            poly.polyadd(poly.polymul([1.0, -2.0], r), poly.polymul(u, poly.polyder(r))))
  return tuple(p.tolist()), tuple(r.tolist())


@silu.defjvp
def _silu_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return silu(x), t * silu_grad(x)


@silu_grad.defjvp
def _silu_grad_jvp(primals, tangents):
  (x,), (t,) = primals, tangents
  return silu_grad(x), t * silu_derivative(2, x)


@silu_derivative.defjvp
def _silu_derivative_jvp(order, primals, tangents):
  (x,), (t,) = primals, tangents
  return silu_derivative(order, x), t * silu_derivative(order + 1, x)


def swiglu_halves(act: jax.Array, gate: jax.Array) -> jax.Array:
  """`silu(act) * gate`: torch_npu's SwiGLU on the two halves of a row (semantics B.0.5)."""
  return silu(act) * gate


def swiglu(c: jax.Array) -> jax.Array:
  """`[..., n] -> [..., n/2]`: silu of the first half times the second (n even)."""
  half = c.shape[-1] // 2
  return swiglu_halves(c[..., :half], c[..., half:])


def dequant_a8w8(acc: jax.Array, w_scale: jax.Array, x_scale: jax.Array) -> jax.Array:
  """A8W8 (semantics B.1.3): `(float32(acc) * w_scale) * x_scale`, in that order."""
  return (acc.astype(jnp.float32) * w_scale) * x_scale


def dequant_a4w4(acc: jax.Array, w_scale: jax.Array, x_scale: jax.Array) -> jax.Array:
  """A4W4 (semantics B.1.5): `(float32(acc) * x_scale) * w_scale`, in that order."""
  return (acc.astype(jnp.float32) * x_scale) * w_scale


def colsum8(w: jax.Array, groups: int = 1) -> jax.Array:
  """`8 * sum_k W` per k group, int32 `[..., groups, n]` of int4 values `w [..., k, n]`:
  the "- 8" of A8W4's `(x - 8) @ W = x @ W - 8 * colsum`, exact in int32."""
  gs = w.shape[-2] // groups
  # Slices, not a reshape to [..., groups, gs, n]: XLA:TPU relays out a reshaped int4
  # array through an int32 copy of it (8x the weight's bytes).
  return 8 * jnp.stack([jnp.sum(w[..., g * gs:(g + 1) * gs, :], axis=-2, dtype=jnp.int32)
                        for g in range(groups)], axis=-2)


def close_k_group(acc: jax.Array, colsum8_g: jax.Array, scale_g: jax.Array) -> jax.Array:
  """One A8W4 k group (semantics B.1.4): `scale_g * ((x - 8)_g @ W_g)` with the int32 part
  `acc - 8 * colsum` exact, converted to float32 once."""
  return scale_g * (acc - colsum8_g).astype(jnp.float32)


def finish_a8w4(k_group_sum: jax.Array, assist: jax.Array, x_scale: jax.Array) -> jax.Array:
  """A8W4: `(sum_g close_k_group(...) + assist) * x_scale`."""
  return (k_group_sum + assist) * x_scale


# Below 2**-64 a divisor is lifted by 2**64 first (exact: a power of two), so `qmax / amax`
# and `1 / scale` cannot overflow float32 (127 / amax does below amax ~ 3.7e-37).
_TINY, _LIFT = 2.0 ** -64, 2.0 ** 64


def lifted_reciprocal(d: jax.Array, numerator: float = 1.0, *,
                      exact_subnormals: bool = False) -> tuple[jax.Array, jax.Array]:
  """`(lift, inv)` with `(v * lift) * inv` the float32 value of `v * (numerator / d)` as if
  float32 had no exponent limit: `lift` is 2**64 where `0 < d < 2**-64`, else 1, and
  `inv = numerator / (d * lift)`; inv is 0 where d <= 0 (codes 0, never NaN or inf). With
  `exact_subnormals`, a subnormal d counts at its value (see `times_lift`)."""
  d = d.astype(jnp.float32)
  positive = d > 0
  if exact_subnormals:  # `d > 0` is false for a subnormal d where denormals read as zero
    bits = jax.lax.bitcast_convert_type(d, jnp.int32)
    positive = positive | ((bits > 0) & (bits < 0x800000))
  lift = jnp.where(positive & (d < _TINY), _LIFT, 1.0).astype(d.dtype)
  lifted = times_lift(d, lift) if exact_subnormals else d * lift
  inv = jnp.where(positive, numerator / jnp.where(positive, lifted, 1), 0)
  return lift, inv


def times_lift(v: jax.Array, lift: jax.Array) -> jax.Array:
  """float32 `v * lift` for a `lift` of 1 or 2**64 (`lifted_reciprocal`), exact also for a
  subnormal v, which XLA:CPU and TPU arithmetic reads as 0: lifted from its bits
  (`mantissa * 2**-149 * 2**64`: an int-to-float conversion and a product of normal
  numbers, both exact). With lift 1 a subnormal v may still read as 0; then
  `|v| / d < 2**-62` (d >= 2**-64), below half of every code's last step anyway. Not
  differentiable through the bits (callers differentiate around it)."""
  v = v.astype(jnp.float32)
  bits = jax.lax.bitcast_convert_type(v, jnp.int32)
  mant = (bits & 0x7FFFFF).astype(jnp.float32) * (2.0 ** -85)
  lifted_sub = jax.lax.stop_gradient(jnp.where(bits < 0, -mant, mant))
  subnormal = (bits & 0x7F800000) == 0
  return jnp.where(subnormal & (lift > 1), lifted_sub, v * lift)


def row_amax(s: jax.Array, axis: int = -1) -> jax.Array:
  """`max |s|` over `axis` (kept, size 1; float32), exact for subnormal values (which
  XLA:CPU and TPU compare as 0). A float max is exact unless a row's is 0 (all zero or all
  subnormal); only then is the largest magnitude read from the bits (non-negative floats
  order as their int32 bits do; XLA:CPU reduces int32 bits 9x slower than floats)."""
  s = s.astype(jnp.float32)
  amax = jnp.max(jnp.abs(s), axis=axis, keepdims=True)

  def from_bits():
    return jax.lax.bitcast_convert_type(jnp.max(magnitude_bits(s), axis=axis, keepdims=True),
                                        jnp.float32)

  return jax.lax.cond(jnp.any(amax == 0), from_bits, lambda: amax)


def magnitude_bits(s: jax.Array) -> jax.Array:
  """The int32 bits of float32 `|s|`: they order as the magnitudes do, subnormal ones too.
  Compare them with each other, not with 0 (see `exceeds_zero`)."""
  return jax.lax.bitcast_convert_type(s.astype(jnp.float32), jnp.int32) & 0x7FFFFFFF


def exceeds_zero(v: jax.Array) -> jax.Array:
  """`v > 0` for float32 v, true for a positive subnormal too: flushing arithmetic reads
  one as 0, and so can a test of its bits, `(bits & 0x7FFFFFFF) != 0`, which LLVM folds
  into the float `v != 0` (at XLA:CPU's default optimization level; measured). Lifted
  (`times_lift`), a subnormal is a normal number."""
  return times_lift(v, jnp.float32(_LIFT)) > 0


def codes_for_amax(s: jax.Array, amax: jax.Array, *, qmax: float = INT8_QMAX,
                   dtype=jnp.int8,
                   round_fn: Callable[[jax.Array], jax.Array] = jnp.round,
                   fp8_as_bits: bool = False, exact_subnormals: bool = False) -> jax.Array:
  """Per-token codes given each row's amax (`[..., 1]`, float32): `s * (qmax / amax)`
  clipped to [-qmax, qmax], then rounded half to even into `dtype` (int8: `round_fn`;
  fp8: the cast, whose saturation the clip is), 0 where amax = 0 (semantics A.3 item 3),
  without overflow for tiny amax (`lifted_reciprocal`). Kernels that see a row in
  pieces compute amax first, then call this (with `round_fn=round_half_even_small` where
  `round` does not lower, and `fp8_as_bits` for fp8 codes as uint8 `float8_bits`).
  `exact_subnormals`: subnormal `s` and amax count at their values (`times_lift`), where
  XLA:CPU and TPU arithmetic reads them as 0; the fused op's epilogue goes without (its
  values come out of that arithmetic, already flushed)."""
  lift, inv = lifted_reciprocal(amax, qmax, exact_subnormals=exact_subnormals)
  lifted = times_lift(s, lift) if exact_subnormals else s * lift
  v = jnp.clip(lifted * inv, -qmax, qmax)
  if jnp.issubdtype(dtype, jnp.floating):
    return float8_bits(v, dtype) if fp8_as_bits else v.astype(dtype)
  return round_fn(v).astype(dtype)


def float8_bits(v: jax.Array, dtype) -> jax.Array:
  """The bits of `v.astype(dtype)` as uint8 (an fp8 or fp4 type, the code in the low bits;
  float32 `v` within its finite range, or NaN for the 8-bit types: their NaN with v's sign),
  rounded half to even, from integer ops alone: Triton converts to float8_e4m3fn only
  from sm_89 on, so the GPU kernels write these bits (bitcast to the type outside)."""
  info = ml_dtypes.finfo(dtype)
  mant, bias, width = int(info.nmant), 1 - int(info.minexp), int(info.bits)
  bits = jax.lax.bitcast_convert_type(v, jnp.int32)
  sign = ((bits >> 31) & 1) << (width - 1)
  mag = bits & 0x7FFFFFFF
  drop = 23 - mant  # normal: round the float32 mantissa to `mant` bits, then rebias
  normal = ((mag + ((1 << (drop - 1)) - 1) + ((mag >> drop) & 1)) >> drop) - (
      (127 - bias) << mant)
  # subnormal (below 2**(1 - bias)): the count of 2**(1 - bias - mant) steps, rounded
  steps = jax.lax.bitcast_convert_type(mag, jnp.float32) * 2.0 ** (bias + mant - 1)
  sub = round_half_even_small(steps).astype(jnp.int32)
  code = jnp.where(mag < ((128 - bias) << 23), sub, normal)
  if width == 8:  # a row with inf gives NaN codes (its s * (qmax / inf)), as the cast does
    code = jnp.where(mag > 0x7F800000, int(np.array(np.nan, dtype).view(np.uint8)), code)
  return (code | sign).astype(jnp.uint8)


def float8_value(bits: jax.Array, dtype) -> jax.Array:
  """float32 values of fp8 / fp4 codes given as their bits (uint8, code in the low bits),
  from integer ops alone: the inverse of `float8_bits`, NaN codes NaN (float8_e4m3fn:
  exponent and mantissa all ones; float8_e5m2: the top exponent, which with a zero
  mantissa is +-inf)."""
  info = ml_dtypes.finfo(dtype)
  mant, bias, width = int(info.nmant), 1 - int(info.minexp), int(info.bits)
  b = bits.astype(jnp.int32)
  top = (1 << (width - 1 - mant)) - 1
  exp = (b >> mant) & top
  frac = b & ((1 << mant) - 1)
  normal = jax.lax.bitcast_convert_type(((exp - bias + 127) << 23) | (frac << (23 - mant)),
                                        jnp.float32)
  v = jnp.where(exp == 0, frac.astype(jnp.float32) * 2.0 ** (1 - bias - mant), normal)
  inf, nan = np.array([np.inf, np.nan], np.float32).astype(dtype).astype(np.float32)
  if np.isinf(inf):  # IEEE-like (e5m2): the top exponent holds inf and NaN
    v = jnp.where(exp == top, jnp.where(frac == 0, jnp.inf, jnp.nan), v)
  elif np.isnan(nan):  # "fn" (e4m3fn): one NaN, all ones; no inf (fp4: neither)
    v = jnp.where((exp == top) & (frac == (1 << mant) - 1), jnp.nan, v)
  return jnp.where(((b >> (width - 1)) & 1) == 1, -v, v)


def scale_for_amax(amax: jax.Array, qmax: float = INT8_QMAX) -> jax.Array:
  """`amax / qmax` in float32, correctly rounded also where it is subnormal (amax below
  `qmax * 2**-126`), which XLA:CPU and TPU arithmetic would flush to 0: there the
  subnormal's bits are an integer division rounded half to even, built from float
  estimates and integer corrections (no vector integer division: Mosaic has none).
  qmax is an integer `odd * 2**p` (127, 448, 57344)."""
  qi = int(qmax)
  p = (qi & -qi).bit_length() - 1
  odd = qi >> p
  bits = jax.lax.bitcast_convert_type(amax, jnp.int32)
  exp = bits >> 23  # amax >= 0
  mant = jnp.where(exp > 0, (bits & 0x7FFFFF) | 0x800000, bits & 0x7FFFFF)
  # amax / 2**-149 = mant * 2**(max(exp, 1) - 1); the quotient's units are 2**-149 too.
  # Where the result is subnormal, that shift minus p is at most log2(odd) <= 7.
  shift = jnp.maximum(exp, 1) - 1 - p
  num = mant << jnp.clip(shift, 0, 7)
  den = odd << jnp.clip(-shift, 0, 23)  # past 23 the quotient rounds to 0 either way
  q = jnp.floor(num.astype(jnp.float32) / den.astype(jnp.float32)).astype(jnp.int32)
  for _ in range(2):  # the float estimate is off by at most 1
    r = num - q * den
    q = q - (r < 0).astype(jnp.int32) + (r >= den).astype(jnp.int32)
  r = num - q * den
  q = q + ((r > den - r) | ((r == den - r) & (q % 2 == 1))).astype(jnp.int32)
  subnormal = jax.lax.bitcast_convert_type(q, jnp.float32)
  return jnp.where(amax < qmax * 2.0 ** -126, subnormal, _divide_by_small_int(amax, qi))


def _divide_by_small_int(a: jax.Array, d: int) -> jax.Array:
  """`a / d` correctly rounded for float32 `a >= 0` (result normal) and an integer
  `d = odd * 2**p` with odd < 2**12, without a division: compilers replace division by a
  constant with a product by its rounded reciprocal (XLA:CPU: an ulp off in 4% of rows for
  127, 53% for 448), and GPU and TPU divisions are approximate. The estimate
  `a * (1 / d)` (within an ulp) is moved to the neighbour whose residual `a - q * d`,
  computed exactly, is smallest (an exact tie cannot happen for odd > 1)."""
  if d & (d - 1) == 0:
    return a * (1.0 / d)  # a power of two: exact
  # small a: residuals would be subnormal (flushed on XLA:CPU and TPU); 2**64 is exact
  small = a < 2.0 ** -32
  a = a * jnp.where(small, 2.0 ** 64, 1.0).astype(a.dtype)
  q = a * (1.0 / d)

  def residual(q):
    # q = hi + lo with 12 significant bits each: hi * d and lo * d are exact, `a - hi * d`
    # is exact (Sterbenz), and so is the last difference (a small multiple of lo's ulp * 2**p)
    hi = jax.lax.bitcast_convert_type(
        jax.lax.bitcast_convert_type(q, jnp.int32) & ~0xFFF, jnp.float32)
    return jnp.abs((a - hi * d) - (q - hi) * d)

  step = lambda q, delta: jax.lax.bitcast_convert_type(
      jax.lax.bitcast_convert_type(q, jnp.int32) + delta, jnp.float32)
  for _ in range(2):  # each round moves at most one ulp
    down, up = step(q, -1), step(q, 1)
    r, r_down, r_up = residual(q), residual(down), residual(up)
    q = jnp.where(r_down < r, down, jnp.where(r_up < r, up, q))
  return q * jnp.where(small, 2.0 ** -64, 1.0).astype(q.dtype)


def quantize_rows(s: jax.Array, *, qmax: float = INT8_QMAX, dtype=jnp.int8,
                  round_fn: Callable[[jax.Array], jax.Array] = jnp.round,
                  as_bits: bool = False, exact_subnormals: bool = False
                  ) -> tuple[jax.Array, jax.Array]:
  """Dynamic per-token quantization of float32 `s [..., d]` over its last axis:
  (codes `[..., d]` (fp8 as their bits with `as_bits`), scale `amax / qmax` `[..., 1]`);
  `exact_subnormals` as in `codes_for_amax`."""
  amax = (row_amax(s) if exact_subnormals else jnp.max(jnp.abs(s), axis=-1, keepdims=True))
  return (codes_for_amax(s, amax, qmax=qmax, dtype=dtype, round_fn=round_fn,
                         fp8_as_bits=as_bits, exact_subnormals=exact_subnormals),
          scale_for_amax(amax, qmax))


def round_half_even_small(v: jax.Array) -> jax.Array:
  """Round half to even of float32 `|v| < 2**22` from `floor` alone, for backends
  without a `round` lowering (Pallas Triton): `floor(v + 0.5)`, minus 1 on an
  exact tie that landed on an odd number. Every step is exact in that range."""
  f = jnp.floor(v + 0.5)
  odd_tie = (f - v == 0.5) & (f - 2 * jnp.floor(f * 0.5) != 0)
  return f - odd_tie.astype(v.dtype)


# --- MX (OCP microscaling; semantics B.1.6) ------------------------------------------------

MX_BLOCK = 32
E8M0_NAN = 0xFF
# The element types' largest exponent (emax): a block's scale is 2**(floor(log2 amax) - emax).
MX_EMAX = {"float8_e4m3fn": 8, "float8_e5m2": 15, "float4_e2m1fn": 2}


def quantize_mx_blocks(s: jax.Array, dtype, *, as_bits: bool = False,
                       exact_subnormals: bool = False) -> tuple[jax.Array, jax.Array]:
  """MX quantization of blocks `s [..., blocks, 32]` (rounded to bfloat16 first), as the
  Ascend 950 epilogue does it (semantics B.1.6), with `E` the largest exponent field of the
  block's bfloat16 values:

  * E = 255 (an inf or NaN in the block): scale byte 0xFF (NaN); codes NaN (fp8) or 0 (fp4,
    which has no NaN).
  * E = 0 (all zero or subnormal): scale byte 0, codes `value * 0` (signed zeros).
  * else: scale byte `e = max(E, emax) - emax`, codes `value * 2**(127 - e)` cast to `dtype`
    rounding half to even and saturating at its largest finite value.

  Returns (codes `[..., blocks, 32]` of dtype, or their uint8 bits with `as_bits`
  (`float8_bits`), scale bytes uint8 `[..., blocks, 1]`). `exact_subnormals`: subnormal
  values next to a normal one are scaled from their bits (XLA:CPU and TPU arithmetic reads
  them as 0; the fused op's epilogue goes without, as in `codes_for_amax`).
  """
  v, fields = mx_fields(s)
  return mx_codes(v, jnp.max(fields, axis=-1, keepdims=True), dtype, as_bits=as_bits,
                  exact_subnormals=exact_subnormals)


def mx_fields(s: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(s rounded to bfloat16, as float32; its exponent fields, int32 0..255)."""
  v = s.astype(jnp.bfloat16).astype(jnp.float32)
  return v, (jax.lax.bitcast_convert_type(v, jnp.int32) >> 23) & 0xFF


def mx_codes(v: jax.Array, block_exp: jax.Array, dtype, *, as_bits: bool = False,
             exact_subnormals: bool = False) -> tuple[jax.Array, jax.Array]:
  """`quantize_mx_blocks`'s codes and scale bytes of the bfloat16-rounded values `v`
  (`mx_fields`) given their blocks' largest exponent field `block_exp` (any shape that
  broadcasts against v: one per block, or one per value)."""
  multiplier, nan_block, scale = mx_block_terms(block_exp, dtype)
  return mx_scaled_codes(v, multiplier, nan_block, dtype, as_bits=as_bits,
                         block_exp=block_exp if exact_subnormals else None), scale


def mx_block_terms(block_exp: jax.Array, dtype) -> tuple[jax.Array, jax.Array, jax.Array]:
  """A block's (multiplier `2**(127 - e)`, 0 where E = 0; whether it holds an inf or NaN;
  its scale byte, uint8) from its largest exponent field E (`quantize_mx_blocks`)."""
  emax = MX_EMAX[jnp.dtype(dtype).name]
  e = jnp.maximum(block_exp, emax) - emax
  # 2**(127 - e), a normal float32 for every e <= 255 - emax (emax >= 1)
  multiplier = jax.lax.bitcast_convert_type((254 - e) << 23, jnp.float32)
  multiplier = jnp.where(block_exp == 0, 0.0, multiplier)
  nan_block = block_exp == E8M0_NAN
  scale = jnp.where(nan_block, E8M0_NAN, jnp.where(block_exp == 0, 0, e))
  return multiplier, nan_block, scale.astype(jnp.uint8)


def mx_scaled_codes(v: jax.Array, multiplier: jax.Array, nan_block: jax.Array, dtype, *,
                    as_bits: bool = False, block_exp: jax.Array | None = None,
                    convert: bool = False) -> jax.Array:
  """The codes of `v` given its block's `mx_block_terms` (broadcast against v); with
  `block_exp`, subnormal values scaled from their bits (`quantize_mx_blocks`'s
  `exact_subnormals`). `convert`: an 8-bit type's bits (`as_bits`) from the conversion to
  it, for a compiler that has one (Mosaic), not from `float8_bits`' integer ops."""
  dtype = jnp.dtype(dtype)
  top = float(jnp.finfo(dtype).max)
  # value * 2**k of a bfloat16 is a bfloat16 (or far below the element type's grid)
  scaled = v * multiplier
  if block_exp is not None:  # mantissa * 2**-149 * 2**(127 - e) = mantissa * 2**(-22 - e),
    # exact (normal factors); past e = 104 it is below 2**-104, far below every code (bits 0)
    e = jnp.maximum(block_exp, MX_EMAX[dtype.name]) - MX_EMAX[dtype.name]
    vbits = jax.lax.bitcast_convert_type(v, jnp.int32)
    sub = ((vbits & 0x7F800000) == 0) & (block_exp > 0)
    sub_mag = (vbits & 0x7FFFFF).astype(jnp.float32) * jax.lax.bitcast_convert_type(
        jnp.maximum(105 - e, 0) << 23, jnp.float32)
    scaled = jnp.where(sub, jnp.where(vbits < 0, -sub_mag, sub_mag), scaled)
  codes = jnp.clip(scaled, -top, top)
  fp8 = jnp.finfo(dtype).bits == 8
  if as_bits:
    bits = (jax.lax.bitcast_convert_type(codes.astype(dtype), jnp.uint8) if convert and fp8
            else float8_bits(codes, dtype))
    return jnp.where(nan_block, 0x7F if fp8 else 0, bits)
  return jnp.where(nan_block, jnp.asarray(jnp.nan if fp8 else 0.0, dtype), codes.astype(dtype))


def quantize_mx_rows(s: jax.Array, dtype, *, as_bits: bool = False,
                     exact_subnormals: bool = False) -> tuple[jax.Array, jax.Array]:
  """`quantize_mx_blocks` along the last axis of `s [..., d]`, a last short block padded
  with zeros: (codes `[..., d]`, scale bytes uint8 `[..., ceil(d / 32)]`)."""
  d = s.shape[-1]
  blocks = -(-d // MX_BLOCK)
  padded = jnp.pad(s, [(0, 0)] * (s.ndim - 1) + [(0, blocks * MX_BLOCK - d)])
  codes, scale = quantize_mx_blocks(padded.reshape(*s.shape[:-1], blocks, MX_BLOCK), dtype,
                                    as_bits=as_bits, exact_subnormals=exact_subnormals)
  return codes.reshape(*s.shape[:-1], blocks * MX_BLOCK)[..., :d], scale[..., 0]


def quantize_output(s: jax.Array, spec, *, as_bits: bool = False
                    ) -> tuple[jax.Array, jax.Array]:
  """The fused op's output quantization of float32 `s [..., d]` as `spec` (a
  `quant.DynamicQuant`: `.mode`, `.dtype`, `.qmax`) says: per token (codes, float32 scale
  `[..., 1]`) or MX (codes, e8m0 scale bytes uint8 `[..., ceil(d / 32)]`). With `as_bits`,
  float codes come as their uint8 bits (`float8_bits`; `codes_from_bits` turns them back):
  XLA:CPU builds them faster than its fp8 / fp4 converts, and moves uint8 buffers
  through loops faster than fp8 ones."""
  if spec.mode == 2:
    return quantize_mx_rows(s, spec.dtype, as_bits=as_bits)
  return quantize_rows(s, qmax=spec.qmax, dtype=spec.dtype, as_bits=as_bits)


def code_storage(dtype) -> jnp.dtype:
  """The dtype `quantize_output(..., as_bits=True)` gives codes of `dtype` in."""
  return jnp.dtype(jnp.int8) if jnp.dtype(dtype) == jnp.int8 else jnp.dtype(jnp.uint8)


def codes_from_bits(q: jax.Array, dtype) -> jax.Array:
  """Codes of `dtype` from `code_storage` (int8 as it is; fp4: one code a byte)."""
  dtype = jnp.dtype(dtype)
  if q.dtype == dtype:
    return q
  if dtype == jnp.dtype(jnp.float4_e2m1fn):
    return jax.lax.bitcast_convert_type(q.astype(jnp.uint4), dtype)
  return jax.lax.bitcast_convert_type(q, dtype)


def output_scale_shape(spec, d: int) -> tuple[tuple[int, ...], jnp.dtype]:
  """(trailing shape, dtype) of `quantize_output`'s scale for rows of d values."""
  if spec.mode == 2:
    return (-(-d // MX_BLOCK),), jnp.dtype(jnp.uint8)
  return (1,), jnp.dtype(jnp.float32)


def e8m0_to_float32(scale_bytes: jax.Array) -> jax.Array:
  """`2**(b - 127)` of e8m0 bytes (uint8), NaN for 0xFF; byte 0 is 2**-127, a float32
  subnormal (built from bits, not arithmetic, which XLA:CPU flushes)."""
  b = scale_bytes.astype(jnp.int32)
  bits = jnp.where(b == 0, 0x00400000, b << 23)
  return jnp.where(b == E8M0_NAN, jnp.nan, jax.lax.bitcast_convert_type(bits, jnp.float32))
