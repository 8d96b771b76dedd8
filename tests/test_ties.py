"""Exact ties for every rounding of the fused op's output (issue 34, item 2): rows built so
that the quantized value lands exactly on a half step, through every implementation.

The inputs make every float step exact: x rows are one-hot (acc = one weight row), the act
half is 64 * 0.5 = 32 (sigmoid(32) is 1.0 in float32, so silu(32) = 32 exactly), one gate
column sets the row's amax, and the other gate columns are odd integers times 0.5:
  int8:  gate max 127 -> amax = 32 * 127, scale = 32, codes g / 2 for odd g: all ties;
  fp8 e4m3 (per token and MX): gate max 14 -> amax = 448, scale 1 (MX: 2**0), values 16 g;
         for odd 17 <= |g| <= 27 these are halfway between e4m3's steps of 32.
Round half to even is checked against the NumPy golden and against np.rint / ml_dtypes by
hand, so a half-up rounding (floor(v + 0.5)) fails here on every implementation."""

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import npu_ops
import numpy_reference as ref
from implementations import IMPLEMENTATIONS, impls

F32 = np.float32
M, K, N, E = 64, 160, 300, 2  # n/2 = 150: several kernel column tiles, a short MX block
COUNTS = [40, 24]


def tie_case(out: str, seed: int = 34):
  rng = np.random.default_rng(seed)
  h = N // 2
  gmax, glim = (127, 127) if out == "int8" else (14, 27)
  x = np.zeros((M, K), np.int8)
  x[np.arange(M), np.arange(M) % 8] = 1  # row r: acc = w[group, r % 8]
  w = np.zeros((E, K, N), np.int8)
  w[:, :, :h] = 64
  odd = 2 * rng.integers(-(glim // 2) - 1, glim // 2 + 1, (E, K, h - 1)) + 1
  if out != "int8":  # mostly on e4m3's halfway points (|g| >= 17), a few below
    odd = np.where(rng.random(odd.shape) < 0.8, np.sign(odd) * (17 + np.abs(odd) % 12 // 2 * 2),
                   odd)
  w[:, :, h + 1:] = np.clip(odd, -glim, glim)
  w[:, :, h] = gmax
  w_scale = np.full((E, N), 0.5, F32)
  w_scale[:, h] = 1.0
  x_scale = np.ones(M, F32)
  return x, w, w_scale, x_scale


OUTS = {"int8": dict(), "fp8": dict(quant_mode=0, quant_dtype=jnp.float8_e4m3fn),
        "mx": dict(quant_mode=2, quant_dtype=jnp.float8_e4m3fn)}
GOLDEN_OUT = {"int8": "int8", "fp8": "float8_e4m3fn", "mx": ("mx", "float8_e4m3fn")}


@pytest.mark.parametrize("out,impl", [(o, i) for o in OUTS for i in impls("fused_A8W8")
                                      if (o, i) != ("mx", "pallas_tpu")])  # no TPU MX output
def test_ties_round_half_to_even(out, impl):
  x, w, w_scale, x_scale = tie_case("int8" if out == "int8" else "fp8")
  op = lambda: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w, w_scale, x_scale, np.asarray(COUNTS, np.int32), group_list_type=1,
      **OUTS[out], **IMPLEMENTATIONS[impl])
  q, s = op()
  want_q, want_s = ref.swiglu_quant(x, w, w_scale, x_scale, ref.group_bounds(COUNTS, 1),
                                    scenario="A8W8", out=GOLDEN_OUT[out])
  sw = ref.swiglu(x.astype(np.int64) @ w[0] * w_scale[0])  # group 0's rows, by hand
  if out == "int8":
    v = sw[:40] / F32(32)
    assert np.all(sw[:40, 0] == 32 * 127) and np.mean(v[:, 1:] % 1 == 0.5) == 1  # all ties
    np.testing.assert_array_equal(want_q[:40], np.rint(v).astype(np.int8))  # half to even
    np.testing.assert_array_equal(np.asarray(want_s)[:M], np.full(M, 32, F32))
  else:
    assert np.all(np.abs(sw[:40]).max(1) == 448)
    ties = np.isin(np.abs(sw[:40, 1:]), 16 * np.arange(17, 28, 2))
    assert ties.mean() > 0.5
    even = sw[:40].astype(ml_dtypes.float8_e4m3fn)  # ml_dtypes: round half to even
    if out == "fp8":
      np.testing.assert_array_equal(np.asarray(want_q)[:40].view(np.uint8), even.view(np.uint8))
  assert np.asarray(q).dtype == np.asarray(want_q).dtype
  np.testing.assert_array_equal(np.asarray(q).view(np.uint8), np.asarray(want_q).view(np.uint8))
  np.testing.assert_array_equal(np.asarray(s).view(np.uint8), np.asarray(want_s).view(np.uint8))


def test_per_token_scale_is_amax_over_127_correctly_rounded():
  """`scale = amax / 127` correctly rounded (README), bit for bit with NumPy's IEEE division,
  on rows whose amax spans 1e-30..1e30 (normal and subnormal scales); a product by the
  rounded reciprocal `amax * (1 / 127)` is an ulp off in a few % of these rows."""
  rng = np.random.default_rng(127)
  rows = rng.standard_normal((4096, 8)).astype(F32) * (10.0 ** rng.uniform(-30, 30, (4096, 1))
                                                      ).astype(F32)
  q, s = npu_ops.quantize_per_token(jnp.asarray(rows))
  amax = np.abs(rows).max(1)
  np.testing.assert_array_equal(np.asarray(s).view(np.uint32), (amax / F32(127)).view(np.uint32))
  want_q, want_s = ref.per_token_int8(rows)
  np.testing.assert_array_equal(q, want_q)
