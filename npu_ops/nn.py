"""Flax nnx modules (needs the `nn` extra: `pip install npu_ops[nn]`)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from npu_ops.quant_matmul import npu_quant_matmul


class QuantParam(nnx.Variable):
  """A quantized-model constant (int8 weights, scales): loaded, not trained."""


class LinearA8W8Quant(nnx.Module):
  """torch_npu.contrib.module.LinearA8W8Quant as a Flax nnx module (SPEC B.2.2).

  `y = npu_quant_matmul(x, weight.T, scale, offset=offset, pertoken_scale=...,
  bias=bias, output_dtype=output_dtype)`. torch_npu first converts a float32
  scale (and offset) with `npu_trans_quant_param`; `npu_quant_matmul` applies the
  same FP19 truncation and s9 offset rounding to a float32 scale in exactly
  those cases, so the module passes the float32 scale and stays jit-friendly
  (int64 words would need x64).

  Attributes (torch_npu's names):
    weight: int8 `(out_features, in_features)`.
    scale: float32 `(out_features,)`.
    offset: float32 `(out_features,)` if enabled.
    bias: int32 `(out_features,)` if enabled.
    pertoken_scale: float32, set by the caller before use if enabled (per token:
      `(m,)` for inputs of m rows, as torch_npu uses it).

  Example::

    layer = LinearA8W8Quant(64, 32, rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(layer, x_int8)   # int8 [..., 32]
  """

  def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
               offset: bool = False, pertoken_scale: bool = False, output_dtype: Any = None,
               rngs: nnx.Rngs):
    self.in_features, self.out_features = in_features, out_features
    self.output_dtype = None if output_dtype is None else np.dtype(output_dtype)
    key = rngs.params()
    self.weight = QuantParam(jax.random.randint(key, (out_features, in_features), -128, 128,
                                                jnp.int32).astype(jnp.int8))
    self.scale = QuantParam(jnp.full((out_features,), 1.0 / (in_features * 64), jnp.float32))
    self.offset = QuantParam(jnp.zeros((out_features,), jnp.float32)) if offset else None
    self.bias = QuantParam(jnp.zeros((out_features,), jnp.int32)) if bias else None
    self.pertoken_scale = QuantParam(jnp.ones((1,), jnp.float32)) if pertoken_scale else None

  def __call__(self, x: jax.Array) -> jax.Array:
    value = lambda v: None if v is None else v[...]
    return npu_quant_matmul(x, self.weight[...].T, self.scale[...],
                            offset=value(self.offset), pertoken_scale=value(self.pertoken_scale),
                            bias=value(self.bias), output_dtype=self.output_dtype)
