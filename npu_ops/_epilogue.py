"""The epilogue math of every grouped op: one home, pure jnp, imports nothing of ours.

The XLA path (`gmm_swiglu_quant`, `_gmm_scenarios`) and both Pallas kernels
(`pallas_kernels.tpu`, `.gpu`) call these same functions on whole arrays or on
tiles, so a kernel and the XLA path round at the same points and give the same
bits. Shapes below are those of one row block: `acc [bm, bn]` (int32 partial
products), per-column scales `[1, bn]` (or `[bn]`), per-row scales `[bm, 1]`.

Terminology: a *k group* is the `k / G` contraction rows that one A8W4/A4W4
weight scale covers (`scale [e, G, n]`); an *expert group* is the rows of x
routed to one expert. "Block" is what a kernel moves into fast memory.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

INT8_QMAX = 127.0


def silu(x: jax.Array) -> jax.Array:
  """`x / (1 + exp(-x))` in the dtype of x (the kernels' form, beta = 1)."""
  return x / (1 + jnp.exp(-x))


def swiglu_halves(act: jax.Array, gate: jax.Array) -> jax.Array:
  """`silu(act) * gate`: torch_npu's SwiGLU on the two halves of a row (semantics B.0.5)."""
  return silu(act) * gate


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


def lifted_reciprocal(d: jax.Array, numerator: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """`(lift, inv)` with `(v * lift) * inv` the float32 value of `v * (numerator / d)` as if
  float32 had no exponent limit: `lift` is 2**64 where `0 < d < 2**-64`, else 1, and
  `inv = numerator / (d * lift)`; inv is 0 where d <= 0 (codes 0, never NaN or inf)."""
  positive = d > 0
  lift = jnp.where(positive & (d < _TINY), _LIFT, 1.0).astype(d.dtype)
  inv = jnp.where(positive, numerator / jnp.where(positive, d * lift, 1), 0)
  return lift, inv


def codes_for_amax(s: jax.Array, amax: jax.Array, *, qmax: float = INT8_QMAX,
                   dtype=jnp.int8,
                   round_fn: Callable[[jax.Array], jax.Array] = jnp.round) -> jax.Array:
  """Per-token codes given each row's amax (`[..., 1]`, float32):
  `clip(round_half_even(s * (qmax / amax)), -qmax, qmax)`, 0 where amax = 0 (semantics A.3
  item 3), without overflow for tiny amax (`lifted_reciprocal`). Kernels that see a row in
  pieces compute amax first, then call this (with `round_fn=round_half_even_small` where
  `round` does not lower)."""
  lift, inv = lifted_reciprocal(amax, qmax)
  return round_fn(jnp.clip((s * lift) * inv, -qmax, qmax)).astype(dtype)


def scale_for_amax(amax: jax.Array, qmax: float = INT8_QMAX) -> jax.Array:
  """`amax / qmax` in float32, correctly rounded also where it is subnormal (amax below
  `qmax * 2**-126`), which XLA:CPU and TPU arithmetic would flush to 0: there the
  subnormal's bits are built with integer ops (qmax odd: no ties)."""
  bits = jax.lax.bitcast_convert_type(amax, jnp.int32)
  exp = bits >> 23  # amax >= 0
  mant = jnp.where(exp > 0, (bits & 0x7FFFFF) | 0x800000, bits & 0x7FFFFF)
  # amax / 2**-149, an integer < 2**30 in the subnormal case (exp <= 7).
  units = mant << jnp.clip(exp - 1, 0, 6)
  qi = int(qmax)
  q = jnp.floor(units.astype(jnp.float32) / qmax + 0.5).astype(jnp.int32)  # off by <= 1
  r2 = 2 * (units - q * qi)
  q = q + (r2 > qi).astype(jnp.int32) - (r2 < -qi).astype(jnp.int32)
  subnormal = jax.lax.bitcast_convert_type(q, jnp.float32)
  return jnp.where(amax < qmax * 2.0 ** -126, subnormal, amax / qmax)


def quantize_rows(s: jax.Array, *, qmax: float = INT8_QMAX, dtype=jnp.int8,
                  round_fn: Callable[[jax.Array], jax.Array] = jnp.round
                  ) -> tuple[jax.Array, jax.Array]:
  """Dynamic per-token quantization of float32 `s [..., d]` over its last axis:
  (codes `[..., d]`, scale `amax / qmax` `[..., 1]`)."""
  amax = jnp.max(jnp.abs(s), axis=-1, keepdims=True)
  return (codes_for_amax(s, amax, qmax=qmax, dtype=dtype, round_fn=round_fn),
          scale_for_amax(amax, qmax))


def round_half_even_small(v: jax.Array) -> jax.Array:
  """Round half to even of float32 `|v| < 2**22` from `floor` alone, for backends
  without a `round` lowering (Pallas Triton): `floor(v + 0.5)`, minus 1 on an
  exact tie that landed on an odd number. Every step is exact in that range."""
  f = jnp.floor(v + 0.5)
  odd_tie = (f - v == 0.5) & (f - 2 * jnp.floor(f * 0.5) != 0)
  return f - odd_tie.astype(v.dtype)
