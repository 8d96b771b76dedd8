"""Static mistakes raise ValueError/TypeError at trace time, naming the argument."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import npu_ops
import numpy_reference as ref

M, K, N, E = 16, 32, 16, 2
X = np.ones((M, K), np.int8)
W = np.ones((E, K, N), np.int8)
WS = np.ones((E, N), np.float32)
XS = np.ones((M,), np.float32)
GL = [8, 16]
W4 = ref.pack_int4(np.ones((E, K, N), np.int8))
FX, FW = X.astype(jnp.float8_e4m3fn), W.astype(jnp.float8_e4m3fn)  # MX inputs
FWS, FXS = np.full((E, 1, N, 2), 127, np.uint8), np.full((M, 1, 2), 127, np.uint8)

op = npu_ops.npu_grouped_matmul_swiglu_quant_v2

CASES = {
    "x rank": (lambda: op(X[None], W, WS, XS, GL), ValueError, "x: expected rank 2"),
    "x dtype": (lambda: op(X.astype(np.float32), W, WS, XS, GL), TypeError, "x: expected dtype"),
    "weight rank": (lambda: op(X, W[0], WS, XS, GL), ValueError, "weight: expected rank 3"),
    "k mismatch": (lambda: op(X, W[:, :16], WS, XS, GL), ValueError, r"weight: expected ND \[e, k=32"),
    "odd n": (lambda: op(X, W[..., :15], WS[:, :15], XS, GL), ValueError, "weight_scale: expected an even n"),
    "n mismatch": (lambda: op(X, W, WS[:, :8], XS, GL), ValueError, "weight: expected ND"),
    # n/2 = 9 fp4 codes do not pack two a byte (the packing failed inside JAX)
    "fp4 n / 2 odd": (lambda: op(X, np.ones((E, K, 18), np.int8), np.ones((E, 18), np.float32), XS, GL, quant_mode=2, quant_dtype=45), ValueError, "weight_scale: expected n a multiple of 4 for packed fp4"),
    "nz shape": (lambda: op(X, np.zeros((E, 1, 2, 16, 16), np.int8), WS, XS, GL), ValueError, "FRACTAL_NZ"),
    "weight dtype": (lambda: op(X, W.astype(np.int16), WS, XS, GL), TypeError, "weight: expected dtype"),
    "int4 x int8 w": (lambda: op(ref.pack_int4(X), W, WS, XS, GL), TypeError, "weight"),
    "weight_scale shape": (lambda: op(X, W, WS[:1], XS, GL), ValueError, r"weight_scale: expected \[e=2"),
    "weight_scale dtype": (lambda: op(X, W, WS.astype(np.int32), XS, GL), TypeError, "weight_scale"),
    "x_scale shape": (lambda: op(X, W, WS, XS[:3], GL), ValueError, r"x_scale: expected shape \[m=16\]"),
    "x_scale dtype": (lambda: op(X, W, WS, XS.astype(np.int32), GL), TypeError, "x_scale"),
    "group_list too long": (lambda: op(X, W, WS, XS, [1, 2, 3]), ValueError, "group_list"),
    "group_list dtype": (lambda: op(X, W, WS, XS, jnp.ones(2)), TypeError, "group_list"),
    "static total > m": (lambda: op(X, W, WS, XS, [8, 17]), ValueError, "group_list"),
    "dequant_mode": (lambda: op(X, W, WS, XS, GL, dequant_mode=3), ValueError, "dequant_mode"),
    "dequant_mode 1 for A8W8": (lambda: op(X, W, WS, XS, GL, dequant_mode=1), ValueError, "dequant_mode"),
    "per-group k": (lambda: op(X, W4, np.ones((E, 3, N), np.float32), XS, GL, dequant_mode=1), ValueError, "weight_scale"),
    "dequant_dtype": (lambda: op(X, W, WS, XS, GL, dequant_dtype=1), ValueError, "dequant_dtype"),
    "quant_mode": (lambda: op(X, W, WS, XS, GL, quant_mode=1), ValueError, "quant_mode"),
    "quant_mode MX with int8": (lambda: op(X, W, WS, XS, GL, quant_mode=2), ValueError, "quant_dtype: expected one of float8_e4m3fn"),
    "quant_dtype": (lambda: op(X, W, WS, XS, GL, quant_dtype=7), ValueError, "quant_dtype"),
    "quant_dtype fp4 per token": (lambda: op(X, W, WS, XS, GL, quant_dtype=45), ValueError, "quant_dtype: expected one of int8"),
    "quant_dtype float16": (lambda: op(X, W, WS, XS, GL, quant_dtype=jnp.float16, quant_mode=2), ValueError, "quant_dtype"),
    # MX inputs (dequant_mode=2)
    "MX x int8": (lambda: op(X, FW, FWS, FXS, GL, dequant_mode=2), TypeError, "x: expected float8_e4m3fn"),
    "MX weight int8": (lambda: op(FX, W, FWS, FXS, GL, dequant_mode=2), TypeError, "weight: expected float8"),
    "MX k mismatch": (lambda: op(FX[:, :8], FW, FWS, FXS, GL, dequant_mode=2), ValueError, "weight: expected"),
    "MX weight_scale shape": (lambda: op(FX, FW, FWS[:, :, :8], FXS, GL, dequant_mode=2), ValueError, r"weight_scale: expected shape \[2, 1, 16, 2\]"),
    "MX weight_scale dtype": (lambda: op(FX, FW, FWS.astype(np.float32), FXS, GL, dequant_mode=2), TypeError, "weight_scale: expected float8_e8m0fnu or uint8"),
    "MX x_scale shape": (lambda: op(FX, FW, FWS, FXS[:3], GL, dequant_mode=2), ValueError, r"x_scale: expected shape \[16, 1, 2\]"),
    "MX smooth": (lambda: op(FX, FW, FWS, FXS, GL, dequant_mode=2, smooth_scale=np.ones(E, np.float32)), ValueError, "smooth_scale"),
    "MX fp4 output n": (lambda: op(FX, FW[..., :6], FWS[:, :, :6], FXS, GL, dequant_mode=2, quant_mode=2, quant_dtype=jnp.float4_e2m1fn), ValueError, "n a multiple of 4"),
    "group_list_type": (lambda: op(X, W, WS, XS, GL, group_list_type=2), ValueError, "group_list_type"),
    "bias": (lambda: op(X, W, WS, XS, GL, bias=np.zeros((E, N), np.int32)), ValueError, "bias"),
    "smooth on A8W8": (lambda: op(X, W, WS, XS, GL, smooth_scale=np.ones(E, np.float32)), ValueError, "smooth_scale"),
    "assist on A8W8": (lambda: op(X, W, WS, XS, GL, weight_assist_matrix=WS), ValueError, "weight_assist_matrix"),
    "assist shape": (lambda: op(X, W4, WS, XS, GL, weight_assist_matrix=WS[:, :4]), ValueError, "weight_assist_matrix"),
    "smooth shape": (lambda: op(ref.pack_int4(X), W4, WS, XS, GL, smooth_scale=np.ones((E, 3), np.float32)), ValueError, "smooth_scale"),
    "tuning_config": (lambda: op(X, W, WS, XS, GL, tuning_config=5), TypeError, "tuning_config"),
    "implementation": (lambda: op(X, W, WS, XS, GL, implementation="gpu"), ValueError, "implementation"),
    "weight list shapes": (lambda: op(X, [W[0], W[1, :, :8]], WS, XS, GL), ValueError, r"weight\[1\]"),
    "not an array": (lambda: op(X.tolist(), W, WS, XS, GL), TypeError, "x: expected an array"),
    "v1 bias on A8W8": (lambda: npu_ops.npu_grouped_matmul_swiglu_quant(X, W, GL, WS, XS, bias=WS), ValueError, "bias"),
    "v1 offset": (lambda: npu_ops.npu_grouped_matmul_swiglu_quant(X, W, GL, WS, XS, offset=XS), ValueError, "offset"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name):
  fn, exc, match = CASES[name]
  with pytest.raises(exc, match=match):
    fn()


def test_errors_raise_at_trace_time_under_jit():
  with pytest.raises(ValueError, match="x_scale"):
    jax.jit(lambda gl: op(X, W, WS, XS[:3], gl)).lower(jnp.asarray(GL))
