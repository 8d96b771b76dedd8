"""SwiGLU and dynamic per-token quantization (semantics B.0.5, B.0.6, A.3 items 2-4).

Quantization is described as data: `DynamicQuant` says what the output is
quantized to and over which granularity, so new formats (fp8, MX) extend the
descriptor instead of adding a flag per format to every op.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from npu_ops import _epilogue
from npu_ops._epilogue import silu
from npu_ops._validation import check_dtype_arg, check_float_array, describe, fail, require

# torch_npu codes for an int8 output: 0 (doc default) and 1 (torch.int8, meta default).
_INT8_CODES = (0, 1)
# torch ScalarType codes of the fp8 formats (planned; semantics A.3 item 6).
_FP8_CODES = {23: "float8_e5m2", 24: "float8_e4m3fn"}
PER_TOKEN = 0


@dataclasses.dataclass(frozen=True)
class DynamicQuant:
  """How the fused op quantizes its output.

  Attributes:
    dtype: element type of the quantized values (int8 today).
    mode: 0 = per-token (one scale per row over the last axis).
  """
  dtype: np.dtype = np.dtype(np.int8)
  mode: int = PER_TOKEN

  def __post_init__(self):
    if np.dtype(self.dtype) != np.dtype(np.int8):
      raise NotImplementedError(f"DynamicQuant: output dtype {np.dtype(self.dtype).name} is "
                                "planned (semantics A.3 item 6); int8 is implemented")
    if self.mode != PER_TOKEN:
      raise NotImplementedError(f"DynamicQuant: mode {self.mode} is planned; 0 (per-token) is "
                                "implemented")

  @property
  def qmax(self) -> float:
    return 127.0

  @classmethod
  def from_torch_npu(cls, quant_dtype: Any, quant_mode: Any) -> "DynamicQuant":
    """Reads torch_npu's `quant_dtype` / `quant_mode` arguments."""
    if isinstance(quant_mode, bool) or not isinstance(quant_mode, (int, np.integer)):
      fail("quant_mode", "a Python int (0 = per-token)", repr(quant_mode), TypeError)
    if quant_mode == 2:
      raise NotImplementedError("quant_mode=2 (MX, Ascend 950) is not implemented yet")
    if quant_mode != PER_TOKEN:
      fail("quant_mode", "0 (per-token dynamic quantization)", quant_mode)
    if isinstance(quant_dtype, (int, np.integer)) and not isinstance(quant_dtype, bool):
      if quant_dtype in _INT8_CODES:
        return cls()
      if quant_dtype in _FP8_CODES:
        raise NotImplementedError(f"quant_dtype={quant_dtype} ({_FP8_CODES[quant_dtype]}) is "
                                  "not implemented yet; int8 (0 or 1) is")
      fail("quant_dtype", "0 or 1 (int8), or a dtype", quant_dtype)
    if quant_dtype is None or isinstance(quant_dtype, bool):
      fail("quant_dtype", "0 or 1 (int8), or jnp.int8", repr(quant_dtype), TypeError)
    dtype = check_dtype_arg("quant_dtype", quant_dtype)
    if dtype.name in _FP8_CODES.values():
      raise NotImplementedError(f"quant_dtype={dtype.name} is not implemented yet; int8 is")
    if dtype != np.dtype(np.int8):
      fail("quant_dtype", "int8 (0, 1 or jnp.int8; fp8 outputs are planned)", dtype.name)
    return cls(dtype=dtype)


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
  left, right = c[..., : n // 2], c[..., n // 2:]
  act, gate = (left, right) if activate_left else (right, left)
  return _epilogue.swiglu_halves(act, gate)


def quantize_per_token(s: jax.Array, spec: DynamicQuant = INT8_PER_TOKEN
                       ) -> tuple[jax.Array, jax.Array]:
  """Dynamic symmetric quantization of each row of `s` (float32 `[..., d]`).

  `scale = amax / 127`, `q = round_half_even(s * (127 / amax))` in float32,
  clipped to [-127, 127] (semantics A.3 item 3). A row with amax = 0 gives q = 0 and
  scale = 0, never NaN. Tiny rows lose nothing to float32's exponent range: codes as if
  `127 / amax` could not overflow (it does below amax ~ 3.7e-37), and a subnormal scale
  (amax below ~1.5e-36) is returned exactly, though XLA:CPU and TPU arithmetic on it
  (e.g. `q * scale`) flushes it to 0.

  Returns:
    (q `[..., d]` of spec.dtype, scale float32 `[...]`).
  """
  check_float_array("s", s)
  require(s.ndim >= 1, "s", "rank >= 1 ([..., d])", describe(s))
  if not isinstance(spec, DynamicQuant):
    fail("spec", "an npu_ops.DynamicQuant", repr(spec), TypeError)
  if s.shape[-1] == 0:  # nothing to quantize: amax 0, scale 0
    return jnp.zeros(s.shape, spec.dtype), jnp.zeros(s.shape[:-1], jnp.float32)
  q, scale = _epilogue.quantize_rows(s.astype(jnp.float32), qmax=spec.qmax, dtype=spec.dtype)
  return q, scale[..., 0]
