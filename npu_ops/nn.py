"""Flax nnx modules (needs the `nn` extra: `pip install npu_ops[nn]`)."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

try:
  from flax import nnx
except ImportError as e:  # flax is an extra: say which
  raise ImportError("npu_ops.nn needs Flax: pip install 'npu_ops[nn]' (or flax>=0.12)") from e

from npu_ops._src.validation import (check_bool, check_choice, check_float_array, check_int, fail,
                                     require)
from npu_ops import moe
from npu_ops._src import qat
from npu_ops import recipes
from npu_ops._src.quant_matmul import check_output_dtype, npu_quant_matmul


class QuantParam(nnx.Variable):
  """A quantized-model constant (int8 weights, scales): loaded, not trained."""


class LinearA8W8Quant(nnx.Module):
  """torch_npu.contrib.module.LinearA8W8Quant as a Flax nnx module (semantics B.2.2).

  `y = npu_quant_matmul(x, weight^T, scale, offset=offset, pertoken_scale=...,
  bias=bias, output_dtype=output_dtype)`. torch_npu first converts a float32
  scale (and offset) with `npu_trans_quant_param`; `npu_quant_matmul` applies the
  same FP19 truncation and s9 offset rounding to a float32 scale in exactly
  those cases, so the module passes the float32 scale and stays jit-friendly
  (int64 words would need x64).

  Attributes (torch_npu's names):
    weight: int8 `(out_features, in_features)`, or `(batch, out_features, in_features)`
      (2-6 dims; the last two are transposed, the batch broadcast against x's).
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
    bias, offset, pertoken_scale = (check_bool(n, v) for n, v in (
        ("bias", bias), ("offset", offset), ("pertoken_scale", pertoken_scale)))
    self.in_features = check_int("in_features", in_features, minimum=1)
    self.out_features = check_int("out_features", out_features, minimum=1)
    # npu_quant_matmul's rules, checked now rather than at the first call
    out = check_output_dtype(output_dtype)
    self.output_dtype = None if output_dtype is None else out
    if offset:
      require(out == np.int8, "offset", "False unless output_dtype is int8 (None)", offset)
    if pertoken_scale:
      require(out in (np.dtype(jnp.float16), np.dtype(jnp.bfloat16)), "pertoken_scale",
              "False unless output_dtype is float16 or bfloat16", pertoken_scale)
    key = rngs.params()
    self.weight = QuantParam(jax.random.randint(key, (out_features, in_features), -128, 128,
                                                jnp.int32).astype(jnp.int8))
    self.scale = QuantParam(jnp.full((out_features,), 1.0 / (in_features * 64), jnp.float32))
    self.offset = QuantParam(jnp.zeros((out_features,), jnp.float32)) if offset else None
    self.bias = QuantParam(jnp.zeros((out_features,), jnp.int32)) if bias else None
    self.pertoken_scale = QuantParam(jnp.ones((1,), jnp.float32)) if pertoken_scale else None

  def __call__(self, x: jax.Array) -> jax.Array:
    value = lambda v: None if v is None else v[...]
    return npu_quant_matmul(x, jnp.swapaxes(self.weight[...], -1, -2), self.scale[...],
                            offset=value(self.offset), pertoken_scale=value(self.pertoken_scale),
                            bias=value(self.bias), output_dtype=self.output_dtype)


@functools.partial(jax.jit, static_argnames=("mode", "recipe", "bits"))
def _stored_weights(w_gate_up, w_down, gate_up_scale, down_scale, *, mode, recipe, bits
                    ) -> dict[str, jax.Array]:
  """What a "qat" or "int8" layer stores, from float weights (and scales, None: from the
  weights' amax): qat the weights and log-scales (none for MX), int8 the codes and scales.
  One program: op by op, the scale and code math compiled a program each (seconds)."""
  if recipe is not None:
    r = recipes.get(recipe)
    if gate_up_scale is None:
      gate_up_scale, down_scale = r.initial_weight_scale(w_gate_up), r.initial_weight_scale(w_down)
    if mode == "qat":
      logs = dict(gate_up_log_scale=jnp.log(gate_up_scale),
                  down_log_scale=jnp.log(down_scale)) if r.learned_scales else {}
      return dict(w_gate_up=w_gate_up, w_down=w_down, **logs)
    (codes_gu, scale_gu), (codes_d, scale_d) = (r.quantize_weight(w_gate_up, gate_up_scale),
                                                r.quantize_weight(w_down, down_scale))
    return dict(w_gate_up=codes_gu, w_down=codes_d, gate_up_scale=scale_gu, down_scale=scale_d)
  if gate_up_scale is None:
    gate_up_scale = qat.weight_scale_from_amax(w_gate_up, bits=bits)
    down_scale = qat.weight_scale_from_amax(w_down, bits=bits)
  if mode == "qat":
    return dict(w_gate_up=w_gate_up, w_down=w_down, gate_up_log_scale=jnp.log(gate_up_scale),
                down_log_scale=jnp.log(down_scale))
  return dict(w_gate_up=qat.quantize_weight(w_gate_up, gate_up_scale, bits=bits),
              w_down=qat.quantize_weight(w_down, down_scale, bits=bits),
              gate_up_scale=gate_up_scale, down_scale=down_scale)


class MoEMLP(nnx.Module):
  """A mixture-of-experts SwiGLU MLP on the package's grouped ops.

  Route (softmax, top-k, renormalized), sort tokens by expert (a dynamic count
  group list: one compilation for every routing), gate/up grouped matmul +
  SwiGLU, down grouped matmul, un-sort and combine. `x [..., d_model]` ->
  `[..., d_model]` float32.

  Modes:
    * "float": `grouped_matmul` (custom VJP: fast forward and backward), or the
      `gmm(lhs, rhs, group_sizes)` given (for instance
      `lambda *a: jax.lax.ragged_dot(*a)`, which qwix's QtProvider intercepts).
    * "qat": quant-aware training. Gate/up runs `fake_quant_gmm_swiglu_quant`
      (its forward is the integer fused op, bit for bit), the down projection a
      float grouped matmul on the quantized activations and fake-quantized
      weights. Per-channel weight scales are learned (LSQ gradients) as
      log-scales: Adam's steps are then relative (a step of lr on a raw scale
      of 1e-3 would wipe it out), and the scale stays positive.
    * "int8": inference. `npu_grouped_matmul_swiglu_quant_v2` on int8 (or int4)
      weight codes, then an exact int8 grouped matmul dequantized per channel
      and per token.
  `convert("qat" | "int8")` makes the next mode: float -> qat starts the scales
  at `amax / qmax`; float -> int8 is post-training quantization; qat -> int8
  keeps the learned scales. The router always stays float.

  Recipes: `recipe="w8a8" | "w4a8" | "w4a4" | "fp8" | "mxfp4"` (`npu_ops.recipes`) sets
  the formats of the expert weights and of the activations entering both grouped
  matmuls, in place of `weight_bits`: mode "qat" runs the recipe's fake quantizers
  (learned log-scales per channel, or per group of 32 rows for "w4a8"; MX's block
  scales are not learned, so an "mxfp4" layer has no scale parameters), mode "int8" its
  codes (int8 / int4 values in int8, float8_e4m3fn or float4_e2m1fn, with their scales:
  `recipes.Recipe.quantize_weight`), the fused op for "w8a8".

  Attributes:
    router: Param float32 `[d_model, e]`.
    w_gate_up: Param `[e, d_model, 2 * d_ff]` (float, qat); QuantParam int8
      codes (int8).
    w_down: Param `[e, d_ff, d_model]` (float, qat); QuantParam int8 codes (int8).
    gate_up_log_scale, down_log_scale: Param, log of the per-channel scales
      `[e, 2 * d_ff]`, `[e, d_model]` (qat; a recipe's `scale_shape`, none for MX).
    gate_up_scale, down_scale: QuantParam, the scales themselves (int8).
  `weight_scales()` returns the scales in both modes.

  Expert parallelism: `mesh` and `expert_axis` (a mesh axis of D devices) shard the
  experts over that axis (the expert weights and scales are placed so) and the
  tokens over it (and over `data_axis`); rows travel to their expert's device and
  back (`npu_ops.moe.moe_mlp`, which documents `capacity_factor` and `exchange`).
  Layers built under `nnx.vmap` (stacked for `nnx.scan`) keep the experts' placement:
  each device holds its experts of every layer.
  With a `capacity_factor`, the (token, slot) pairs dropped are sown as
  `nnx.Intermediate` `dropped` (read them with `nnx.pop(layer, nnx.Intermediate)`).

  Example::

    mesh = jax.make_mesh((8,), ("expert",))
    layer = MoEMLP(1024, 1408, 64, mesh=mesh, expert_axis="expert", rngs=nnx.Rngs(0))
    y = nnx.jit(lambda m, x: m(x))(layer, x)   # x [tokens, 1024], tokens % 8 == 0
  """

  MODES = ("float", "qat", "int8")

  def __init__(self, d_model: int, d_ff: int, num_experts: int, *, top_k: int = 2,
               mode: str = "float", weight_bits: int = 8, recipe: str | None = None,
               gmm: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
               mesh: jax.sharding.Mesh | None = None, expert_axis: str | None = None,
               data_axis: str | None = None, capacity_factor: float | None = None,
               exchange: str | None = None, rngs: nnx.Rngs):
    check_choice("mode", mode, self.MODES)
    for name, value in (("d_model", d_model), ("d_ff", d_ff), ("num_experts", num_experts)):
      check_int(name, value, minimum=1)
    top_k = check_int("top_k", top_k, minimum=1)
    require(top_k <= num_experts, "top_k", f"an int in [1, num_experts={num_experts}]", top_k)
    if gmm is not None and not callable(gmm):
      fail("gmm", "None or a callable gmm(lhs, rhs, group_sizes)", repr(gmm), TypeError)
    qat.qmax_for(weight_bits, "weight_bits")
    if recipe is not None:
      recipes.get(recipe)
      require(weight_bits == 8, "weight_bits", "8 (the default) with a recipe, which sets the "
              "weights' format", weight_bits)
      for name, k in (("d_model", d_model), ("d_ff", d_ff)):  # k of either projection
        require(k % (recipes.get(recipe).weight_group or 1) == 0
                and (recipes.get(recipe).weights != "mxfp4" or k % 32 == 0), name,
                f"a multiple of the recipe {recipe!r}'s weight blocks", k)
    self.d_model, self.d_ff, self.num_experts = d_model, d_ff, num_experts
    self.top_k, self.mode, self.weight_bits = top_k, mode, weight_bits
    self.recipe = recipe
    self.gmm = gmm
    parallel = dict(mesh=mesh, expert_axis=expert_axis, data_axis=data_axis,
                    capacity_factor=capacity_factor, exchange=exchange)
    # fail now, not at the first call (nor in Flax, storing an array among them)
    if mesh is not None:
      moe.check_expert_parallel(num_experts, **parallel)
    else:
      moe.check_no_parallel_options(**parallel)
    self.parallel = parallel
    normal = lambda shape, fan_in: jax.random.normal(rngs.params(), shape) * fan_in ** -0.5
    self.router = nnx.Param(self._placed(normal((d_model, num_experts), d_model), None))
    w_gate_up = normal((num_experts, d_model, 2 * d_ff), d_model)
    w_down = normal((num_experts, d_ff, d_model), d_ff)
    self._set_expert_weights(w_gate_up, w_down)

  def _set_expert_weights(self, w_gate_up, w_down, gate_up_scale=None, down_scale=None):
    """Stores float weights in the form `self.mode` keeps them."""
    axis = self.parallel["expert_axis"]  # each device keeps its own experts
    w_gate_up, w_down, gate_up_scale, down_scale = (
        self._placed(a, axis) for a in (w_gate_up, w_down, gate_up_scale, down_scale))
    if self.mode == "float":
      self.w_gate_up, self.w_down = nnx.Param(w_gate_up), nnx.Param(w_down)
      return
    param = nnx.Param if self.mode == "qat" else QuantParam
    stored = _stored_weights(w_gate_up, w_down, gate_up_scale, down_scale, mode=self.mode,
                             recipe=self.recipe, bits=self.weight_bits)
    for name, value in stored.items():
      setattr(self, name, param(value))

  def _placed(self, a, axis):
    """`a` sharded over `axis` (its first dim; None: replicated) on the layer's mesh.
    Traced (built under `nnx.vmap`: layers stacked for `nnx.scan`), by a sharding
    constraint (`reshard` on a mesh of Explicit axes), whose batching keeps the spec on the
    experts' axis and the stacked one unsharded (`device_put` put it on the stacked axis)."""
    mesh = self.parallel["mesh"]
    if mesh is None or a is None:
      return a
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))
    if not isinstance(a, jax.core.Tracer):
      return jax.device_put(a, sharding)
    explicit = jax.sharding.AxisType.Explicit in mesh.axis_types
    return (jax.sharding.reshard if explicit else jax.lax.with_sharding_constraint)(a, sharding)

  def convert(self, mode: str) -> "MoEMLP":
    """A new layer in `mode` ("qat" or "int8") from this float or qat layer."""
    allowed = {"float": ("qat", "int8"), "qat": ("int8",)}.get(self.mode, ())
    check_choice("mode", mode, allowed, f"one of {allowed} (what a {self.mode!r} layer "
                 "converts to)")
    new = MoEMLP(self.d_model, self.d_ff, self.num_experts, top_k=self.top_k, mode=mode,
                 weight_bits=self.weight_bits, recipe=self.recipe, **self.parallel,
                 rngs=nnx.Rngs(0))
    new.router = nnx.Param(self.router[...])  # already placed
    new._set_expert_weights(self.w_gate_up[...], self.w_down[...], *(self.weight_scales() or ()))
    return new

  def weight_scales(self) -> tuple[jax.Array, jax.Array] | None:
    """Weight scales (gate/up `[e, 2 * d_ff]`, down `[e, d_model]` per channel; a recipe's
    `scale_shape`), or None for a float layer and an "mxfp4" qat layer."""
    if self.mode == "qat":
      if not hasattr(self, "gate_up_log_scale"):  # MX: block scales are not parameters
        return None
      return jnp.exp(self.gate_up_log_scale[...]), jnp.exp(self.down_log_scale[...])
    if self.mode == "int8":
      return self.gate_up_scale[...], self.down_scale[...]
    return None

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x [..., d_model]` -> float32 `[..., d_model]` (`npu_ops.moe.moe_mlp`)."""
    check_float_array("x", x)
    if x.ndim < 1 or x.shape[-1] != self.d_model:
      raise ValueError(f"x: expected [..., d_model={self.d_model}], got shape {x.shape}")
    scales = self.weight_scales() or (None, None)
    weights = moe.MoEWeights(self.router[...], self.w_gate_up[...], self.w_down[...], *scales)
    out = moe.moe_mlp(x, weights, top_k=self.top_k, mode=self.mode,
                      weight_bits=self.weight_bits, recipe=self.recipe, gmm=self.gmm,
                      **self.parallel)
    if self.parallel["capacity_factor"] is not None:
      self.sow(nnx.Intermediate, "dropped", out.dropped)
    return out.y
