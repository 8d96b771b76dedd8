"""Mixture-of-experts MLP, functionally: routing, the experts, expert parallelism.

The grouped ops want the rows of each expert contiguous. `dispatch` sorts the
`T * k` (token, slot) pairs by expert (stably, so the order inside an expert is
token order) and returns the counts as a dynamic group list: one compilation
serves every routing. `combine` undoes the sort with a gather (not a scatter)
and sums each token's k expert outputs with its gate weights. `expert_mlp` runs
the experts on sorted rows (float, qat or int8); `moe_mlp` is the whole layer,
on one device or with its experts sharded over a mesh axis (expert parallelism:
each device routes its own tokens, sends each row to its expert's owner and gets
the result back; see `npu_ops._src.expert_parallel`).
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from npu_ops._src import backend
from npu_ops._src import expert_parallel as ep
from npu_ops._src import groups
from npu_ops._src import grouped as grouped_lib
from npu_ops._src import layouts
from npu_ops._src import operands
from npu_ops._src import qat
from npu_ops._src import quant
from npu_ops import recipes
from npu_ops._src.validation import (asarray, check_array, check_choice, check_float_array,
                                     check_int, check_rank, describe, fail, require)
from npu_ops._src.grouped import grouped_matmul
from npu_ops._src.gmm_swiglu_quant import npu_grouped_matmul_swiglu_quant_v2

MODES = ("float", "qat", "int8")


class Dispatch(NamedTuple):
  """Where each (token, slot) pair went. All int32; `T` tokens, `k` slots, `e` experts.

  Attributes:
    token_index: `[T*k]` token of each sorted row (gather x with it).
    unsort: `[T*k]` sorted row of each flat (token, slot) pair.
    group_sizes: `[e]` rows per expert, in sorted order (a count group list).
    expert: `[T*k]` expert of each sorted row.
  """
  token_index: jax.Array
  unsort: jax.Array
  group_sizes: jax.Array
  expert: jax.Array


class MoEWeights(NamedTuple):
  """The weights of an MoE SwiGLU MLP (a pytree). `d` = d_model, `f` = d_ff.

  Attributes:
    router: float `[d, e]`.
    w_gate_up: `[e, d, 2f]`: float (modes float, qat) or int8 codes (int8; int4
      values in int8 for weight_bits=4).
    w_down: `[e, f, d]`: float, or int8 codes (int8).
    gate_up_scale: float32 `[e, 2f]` per-channel weight scales (qat, int8), else None.
    down_scale: float32 `[e, d]` (qat, int8), else None.
  """
  router: jax.Array
  w_gate_up: jax.Array
  w_down: jax.Array
  gate_up_scale: jax.Array | None = None
  down_scale: jax.Array | None = None


class MoEOutput(NamedTuple):
  """`y`: float32 `[..., d]`; `dropped`: int32 scalar, (token, slot) pairs dropped
  for capacity (always 0 without a `capacity_factor`)."""
  y: jax.Array
  dropped: jax.Array


# So that a jax.export artifact whose inputs or outputs hold them can be serialized.
for _t in (Dispatch, MoEWeights, MoEOutput):
  jax.export.register_namedtuple_serialization(_t, serialized_name=f"npu_ops.moe.{_t.__name__}")


def top_k_routing(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Softmax gate, top-k experts per token, weights renormalized to sum to 1.

  Args:
    logits: float `[T, e]`.
    k: experts per token, `1 <= k <= e`.

  Returns:
    (weights float32 `[T, k]`, experts int32 `[T, k]`). Gradients flow to the
    logits through the weights.
  """
  check_rank("logits", logits, 2)
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    fail("logits", "float router logits [T, e]", describe(logits), TypeError)
  e = logits.shape[1]
  k = check_int("k", k, minimum=1)
  require(k <= e, "k", f"an int in [1, e={e}]", k)
  return _top_k_gates(logits, k)


# The MoE building blocks compute in one program each after their checks (called eagerly,
# op by op, routing and its sort compiled dozens of small programs on the first call).
@functools.partial(jax.jit, static_argnums=1)
def _top_k_gates(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  # The renormalized top-k of softmax(logits) is the softmax of the top-k logits (the
  # full denominator cancels). Its k-term sum is unrolled into elementwise adds: XLA:CPU
  # computes exp inside a reduction with other code than elementwise, which made the
  # gates depend on how many tokens a device holds (expert parallelism: last bits).
  top, experts = jax.lax.top_k(logits.astype(jnp.float32), k)
  z = jnp.exp(top - top[:, :1])
  total = functools.reduce(operator.add, [z[:, j:j + 1] for j in range(k)])
  return z / total, experts.astype(jnp.int32)


def dispatch(experts: jax.Array, num_experts: int) -> Dispatch:
  """Sorts the (token, slot) pairs of `experts [T, k]` (integer ids) by expert.

  Known ids outside `[0, num_experts)` raise ValueError; traced ones are counted in no
  group and sorted last (their `expert` reads `num_experts`), so their rows fall past
  the groups and the grouped ops give them 0.
  """
  check_rank("experts", experts, 2)
  if not jnp.issubdtype(experts.dtype, jnp.integer):
    fail("experts", "integer expert ids", describe(experts), TypeError)
  num_experts = check_int("num_experts", num_experts, minimum=1)
  if groups.is_concrete(experts):
    known = np.asarray(experts)
    bad = (known < 0) | (known >= num_experts)
    if bad.any():
      fail("experts", f"ids in [0, num_experts={num_experts})",
           f"{int(known[bad].flat[0])} at index {tuple(int(i) for i in np.argwhere(bad)[0])}")
  return _sort_pairs(experts, num_experts)


@functools.partial(jax.jit, static_argnums=1)
def _sort_pairs(experts: jax.Array, num_experts: int) -> Dispatch:
  t, k = experts.shape
  flat = groups._as_int32(experts.reshape(-1), num_experts)  # int64 ids clipped, not wrapped
  # bincount would count a negative id as expert 0: every invalid id becomes num_experts
  flat = jnp.where((flat >= 0) & (flat < num_experts), flat, num_experts)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  unsort = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=jnp.int32))
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return Dispatch(token_index=order // k, unsort=unsort, group_sizes=sizes, expert=flat[order])


def combine(y_sorted: jax.Array, routing: Dispatch, weights: jax.Array) -> jax.Array:
  """`out[t] = sum_j weights[t, j] * y[row of (t, j)]`: `[T*k, d]` -> `[T, d]`, in float32
  (the gates are not rounded to a narrower y's type)."""
  if not isinstance(routing, Dispatch):
    fail("routing", "an npu_ops.moe.Dispatch (from dispatch())", type(routing).__name__,
         TypeError)
  check_rank("weights", weights, 2)
  check_array("y_sorted", y_sorted)
  t, k = weights.shape
  pairs = routing.unsort.shape[0]
  # weights first: a y_sorted that matches the routing is not the one to blame
  require(t * k == pairs, "weights", f"[T, k] gates of the {pairs} routed (token, slot) "
          "pairs", describe(weights))
  require(y_sorted.ndim == 2 and y_sorted.shape[0] == t * k, "y_sorted",
          f"[T*k={t * k}, d]", describe(y_sorted))
  return _combine(y_sorted, routing.unsort, weights)


@jax.jit
def _combine(y_sorted: jax.Array, unsort: jax.Array, weights: jax.Array) -> jax.Array:
  t, k = weights.shape
  rows, gates = unsort.reshape(t, k), weights.astype(jnp.float32)
  # A sum over the slots, each a gathered row times its gate: one elementwise fusion with
  # the gathers (an einsum over k laid the `[T, k, d]` rows out with k second-minor).
  out = gates[:, :1] * y_sorted[rows[:, 0]].astype(jnp.float32)
  for j in range(1, k):
    out = out + gates[:, j:j + 1] * y_sorted[rows[:, j]].astype(jnp.float32)
  return out


def token_rows(tokens: jax.Array, mode: str, recipe: recipes.Recipe | None = None) -> Any:
  """What the experts read of each token: float32 rows (float, qat; a recipe's deployed
  mode, which quantizes them itself) or, for int8 (no recipe, or "w8a8"), the per-token
  int8 codes and scales (`operands.QArray`), quantized once per token (a quarter of the
  float bytes to move)."""
  if mode != "int8" or not _fused_path(recipe):
    return tokens
  codes, scale = quant.quantize_per_token(tokens)
  return operands.QArray(codes, scale, operands.INT8)


def _fused_path(recipe: recipes.Recipe | None) -> bool:
  """Whether the deployed experts run the fused op's int8 path (`weight_bits` 8 or 4 per
  channel, or a recipe of int8 weights per channel and int8 activations, as "w8a8"),
  rather than the recipe's codes (`recipes.Recipe`). By formats, not by name: a recipe
  named "w8a8" of other formats takes its own codes."""
  return recipe is None or (recipe.weights == recipe.activations == "int8"
                            and not recipe.weight_group)


def expert_mlp(rows: Any, expert: jax.Array, sizes: jax.Array, weights: MoEWeights, *,
               mode: str, weight_bits: int = 8,
               gmm: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
               expected_rows: int | None = None,
               recipe: recipes.Recipe | None = None) -> jax.Array:
  """The experts' SwiGLU MLP on rows sorted by expert: `[R, d]` -> float32 `[R, d]`.

  Args:
    rows: `token_rows(...)` of the sorted rows (`[R, d]` float32, or a QArray).
    expert: int32 `[R]` expert of each row (rows past the groups: any value).
    sizes: int32 `[e]` rows per expert (rows past their sum give 0).
    weights: the experts' weights (router unused).
    mode: "float", "qat" or "int8" (see `npu_ops.nn.MoEMLP`).
    weight_bits: 8 or 4 (qat, int8).
    gmm: float mode's grouped matmul `gmm(lhs, rhs, group_sizes)` (default
      `grouped_matmul`).
    expected_rows: rows per expert expected (the row blocks' size hint).
    recipe: a `recipes.Recipe` (qat, int8): its formats for weights and activations
      instead of `weight_bits` (qat: its fake quantizers on a float grouped matmul;
      int8: its codes, and the fused op for "w8a8").
  """
  # a symbolic row count (jax.export) gives no hint (its path is ragged_dot's, unblocked)
  concrete = isinstance(expected_rows, (int, np.integer))
  hint = [max(1, int(expected_rows))] if concrete and expected_rows else None
  if mode == "float":
    gmm = gmm or grouped_matmul
    y = gmm(quant.swiglu(gmm(rows, weights.w_gate_up, sizes)), weights.w_down, sizes)
    return y.astype(jnp.float32)  # a user's gmm may keep bfloat16
  if mode == "qat" and recipe is not None:
    r = recipe
    h = quant.swiglu(grouped_matmul(r.fake_activation(rows),
                                    r.fake_weight(weights.w_gate_up, weights.gate_up_scale), sizes))
    return grouped_matmul(r.fake_activation(h), r.fake_weight(weights.w_down, weights.down_scale),
                          sizes)
  if mode == "int8" and not _fused_path(recipe):
    r = recipe
    h = quant.swiglu(r.codes_matmul(*r.quantize_activation(rows), weights.w_gate_up,
                                    weights.gate_up_scale, sizes, expert))
    return r.codes_matmul(*r.quantize_activation(h), weights.w_down, weights.down_scale, sizes,
                          expert)
  if mode == "qat":
    h = qat.fake_quant_gmm_swiglu_quant(rows, weights.w_gate_up, weights.gate_up_scale, sizes,
                                        group_list_type=1, weight_bits=weight_bits,
                                        tuning_config=hint)
    return grouped_matmul(h, qat.fake_quant_weight(weights.w_down, weights.down_scale,
                                                   bits=weight_bits), sizes)
  w_gate_up = weights.w_gate_up
  if weight_bits == 4:  # int4 codes: the A8W4 scenario of the fused op
    w_gate_up = w_gate_up.astype(jnp.int4)
  hq, h_scale = npu_grouped_matmul_swiglu_quant_v2(
      rows.values, w_gate_up, weights.gate_up_scale, rows.scale, sizes, group_list_type=1,
      tuning_config=hint)
  # the exact int32 product dequantized per channel and per token (in the kernels' epilogue)
  ends = groups.ends_from_sizes(sizes, hq.shape[0], weights.w_down.shape[0])
  return grouped_lib.dequantized_matmul(hq, weights.w_down, ends, weights.down_scale, h_scale,
                                        out_dtype=jnp.float32)


def moe_mlp(x: jax.Array, weights: MoEWeights, *, top_k: int, mode: str = "float",
            weight_bits: int = 8, recipe: str | recipes.Recipe | None = None,
            gmm: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
            mesh: jax.sharding.Mesh | None = None, expert_axis: str | None = None,
            data_axis: str | None = None, capacity_factor: float | None = None,
            exchange: str | None = None) -> MoEOutput:
  """An MoE SwiGLU MLP layer: route, experts, combine. `x [..., d]` -> `[..., d]` float32.

  Route each token (softmax, top-k, renormalized) to `top_k` experts, run them
  (`expert_mlp`) and sum their outputs with the gate weights.

  Expert parallelism: with `mesh` and `expert_axis` (a mesh axis of D devices), the
  e experts are sharded over that axis (e/D consecutive experts a device: shard
  `weights` with `PartitionSpec(expert_axis)` on their expert dim, or let this
  function reshard them) and the tokens over it too (and over `data_axis`, if
  given; other mesh axes replicate the work). Each device routes its tokens, sends
  each (token, slot) row to the device owning its expert, runs its local experts
  on what it received (a dynamic group list: one compilation for every routing)
  and sends the results back, where they are combined. The result equals the
  one-device layer (int8: bit for bit given the same router logits; float32 rounding
  otherwise). The logits are a float32 matmul that XLA:CPU may round differently in the
  last bit with the number of tokens a device holds (seen with 1-2 tokens a device),
  which moves gates by ulps and can flip a route between logits tied within an ulp.
  Gradients flow through the exchange.

  Args:
    x: float `[..., d]`; under a mesh, the token count (product of the leading
      dims) must divide evenly over the token shards.
    weights: `MoEWeights` (scales required in modes qat and int8).
    top_k: experts per token.
    mode: "float", "qat" or "int8".
    weight_bits: 8 or 4 (qat, int8): int8 or int4 per-channel weights, int8 tokens.
    recipe: None, or a recipe of `npu_ops.recipes` ("w8a8", "w4a8", "w4a4", "fp8",
      "mxfp4"): the weights' and activations' formats instead (qat, int8; weights and
      scales in its layout, `recipes.Recipe.quantize_weight`).
    gmm: float mode's grouped matmul (default `grouped_matmul`).
    mesh, expert_axis, data_axis: see above (all None: one device).
    capacity_factor: None (default): no token is ever dropped (each device can
      receive every row routed on the axis). A finite float > 0: each device sends at
      most `ceil(capacity_factor * T_local * top_k / D)` rows to each device (the
      earliest tokens first); the rest contribute 0 and are counted in
      `MoEOutput.dropped` (GShard's capacity). Smaller buffers, less to send.
    exchange: "ragged" (`jax.lax.ragged_all_to_all`: only the routed rows move;
      TPU, GPU), "padded" (`all_to_all` of a `capacity` rows per device pair; any
      platform) or None: ragged on TPU/GPU meshes, padded on CPU (XLA:CPU has no
      ragged all-to-all).

  Returns:
    `MoEOutput(y, dropped)`.
  """
  check_float_array("x", x)
  check_choice("mode", mode, MODES)
  qat.qmax_for(weight_bits, "weight_bits")
  recipe = None if recipe is None else recipes.get(recipe)
  require(recipe is None or weight_bits == 8, "weight_bits",
          "8 (the default) with a recipe, which sets the weights' format", weight_bits)
  d, e = _check_weights(weights, mode, recipe)
  if mode == "int8" and weight_bits == 4:  # int4 codes held in int8: astype(int4) would wrap
    for name in ("w_gate_up", "w_down"):
      layouts.check_int4_range(f"weights.{name}", getattr(weights, name))
  if x.ndim < 1 or x.shape[-1] != d:
    fail("x", f"[..., d_model={d}]", describe(x))
  top_k = check_int("top_k", top_k, minimum=1)  # a NumPy int too, as MoEMLP takes it
  require(top_k <= e, "top_k", f"an int in [1, num_experts={e}]", top_k)
  if gmm is not None and not callable(gmm):
    fail("gmm", "None or a callable gmm(lhs, rhs, group_sizes)", repr(gmm), TypeError)
  tokens = asarray(x.reshape(-1, d), jnp.float32)  # NumPy x: gathered by traced ids
  config = dict(top_k=top_k, mode=mode, weight_bits=weight_bits, gmm=gmm, recipe=recipe)
  if mesh is None:
    check_no_parallel_options(expert_axis=expert_axis, data_axis=data_axis,
                              capacity_factor=capacity_factor, exchange=exchange)
    # an eager call: one compiled program, not its ops one by one (a user's gmm, which may
    # be a new function at every call, stays op by op: a program per call would recompile)
    eager = backend.untraced((tokens, weights)) and gmm is None
    run = _one_device_program if eager else _one_device
    y, dropped = run(tokens, weights, **config)
  else:
    y, dropped = _expert_parallel(tokens, weights, mesh=mesh, expert_axis=expert_axis,
                                  data_axis=data_axis, capacity_factor=capacity_factor,
                                  exchange=exchange, **config)
  return MoEOutput(y.reshape(x.shape[:-1] + (d,)), dropped)


def _one_device(tokens, weights, *, top_k, mode, weight_bits, gmm, recipe):
  e = weights.router.shape[1]
  gate, experts = top_k_routing(tokens @ weights.router, top_k)
  routing = dispatch(experts, e)
  rows = jax.tree.map(lambda a: a[routing.token_index], token_rows(tokens, mode, recipe))
  y = expert_mlp(rows, routing.expert, routing.group_sizes, weights, mode=mode,
                 weight_bits=weight_bits, gmm=gmm, expected_rows=routing.expert.shape[0] // e,
                 recipe=recipe)
  return combine(y, routing, gate), jnp.zeros((), jnp.int32)


_one_device_program = jax.jit(_one_device, static_argnames=(
    "top_k", "mode", "weight_bits", "gmm", "recipe"))


def _expert_parallel(tokens, weights, *, mesh, expert_axis, data_axis, capacity_factor,
                     exchange, top_k, mode, weight_bits, gmm, recipe):
  e = weights.router.shape[1]
  check_expert_parallel(e, mesh=mesh, expert_axis=expert_axis, data_axis=data_axis,
                        capacity_factor=capacity_factor, exchange=exchange)
  devices = mesh.shape[expert_axis]
  per_device = e // devices
  token_axes = (data_axis, expert_axis) if data_axis else (expert_axis,)
  shards = math.prod(mesh.shape[a] for a in token_axes)
  # a symbolic count (jax.export): the exported program crashed the process when called
  # (JAX 0.10.2's shape refinement through shard_map), so it is refused here
  require(isinstance(tokens.shape[0], (int, np.integer)), "x", "a known token count under "
          "a mesh (jax.export with a symbolic one: only without mesh=)",
          f"{tokens.shape[0]} tokens")
  require(tokens.shape[0] % shards == 0, "x", f"a token count divisible by the {shards} token "
          f"shards (mesh axes {token_axes})", f"{tokens.shape[0]} tokens")
  pairs = tokens.shape[0] // shards * top_k  # rows a device routes
  capacity = pairs if capacity_factor is None else min(
      pairs, max(1, math.ceil(capacity_factor * pairs / devices)))
  if exchange is None:
    exchange = ep.PADDED if mesh.devices.flat[0].platform == "cpu" else ep.RAGGED

  def local(tokens, weights):
    gate, experts = top_k_routing(tokens @ weights.router, top_k)
    if capacity < pairs:
      kept = ep.keep_within_capacity(experts, per_device, devices, capacity)
      experts = jnp.where(kept, experts, e)  # dropped pairs sort last, and are not sent
      dropped = jnp.sum(~kept, dtype=jnp.int32)
    else:
      dropped = jnp.zeros((), jnp.int32)
    routing = dispatch(experts, e + (capacity < pairs))
    plan = ep.plan(routing.group_sizes[:e], expert_axis, devices)
    rows = jax.tree.map(lambda a: a[routing.token_index], token_rows(tokens, mode, recipe))
    got = ep.to_owners(rows, plan, expert_axis, capacity, exchange)
    got_expert = ep.received_experts(plan, capacity)  # per_device past each source's rows
    order = jnp.argsort(got_expert, stable=True).astype(jnp.int32)
    back = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=jnp.int32))
    sizes = jnp.sum(plan.recv_counts, axis=0, dtype=jnp.int32)  # rows per local expert
    y = expert_mlp(jax.tree.map(lambda a: a[order], got), got_expert[order], sizes,
                   weights, mode=mode, weight_bits=weight_bits, gmm=gmm,
                   expected_rows=pairs * devices // e, recipe=recipe)
    y = ep.to_sources(y[back], plan, expert_axis, capacity, exchange, routing.token_index.shape[0])
    return combine(y, routing, gate), jax.lax.psum(dropped, token_axes)

  experts_spec = P(expert_axis)
  specs = MoEWeights(P(), experts_spec, experts_spec,
                     *(None if s is None else experts_spec
                       for s in (weights.gate_up_scale, weights.down_scale)))
  # An Explicit mesh axis types each array's sharding: move the inputs to the specs
  # (Auto axes: shard_map does that itself).
  explicit = any(t == jax.sharding.AxisType.Explicit for t in mesh.axis_types)
  place = lambda a, spec: jax.reshard(a, jax.sharding.NamedSharding(mesh, spec))
  if explicit:
    tokens = place(tokens, P(token_axes))
    weights = jax.tree.map(place, weights, specs)
  # check_vma=False: the grouped ops type their results for shard_map's check now
  # (`manual_axes`; the padded exchange passes it too), but the ragged exchange, which
  # only TPU and GPU run, has not been checked under it.
  y, dropped = jax.shard_map(local, mesh=mesh, in_specs=(P(token_axes), specs),
                             out_specs=(P(token_axes), P()), check_vma=False)(tokens, weights)
  if explicit and jax.sharding.get_abstract_mesh().empty:
    # Outside `jax.set_mesh`, results typed on an Explicit mesh break the caller's eager
    # `grad`: JAX builds the loss's cotangent on the loss's (mesh-typed) sharding with no
    # mesh to place it ("Length of device assignment 1 is not equal to the size of the
    # mesh"). Hand them back as an untyped input would get them: the same devices and
    # layout, on the mesh's Auto twin (device_put is differentiable).
    auto = mesh.update(axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
    y = jax.device_put(y, jax.sharding.NamedSharding(auto, P(token_axes)))
    dropped = jax.device_put(dropped, jax.sharding.NamedSharding(auto, P()))
  return y, dropped


def check_no_parallel_options(mesh: Any = None, **options: Any) -> None:
  """Without a mesh, the expert-parallel options must be None."""
  for name, value in options.items():
    if value is not None:
      fail(name, "None without a mesh (it configures expert parallelism: pass mesh=)",
           repr(value))


def check_expert_parallel(num_experts: int, *, mesh: Any, expert_axis: Any, data_axis: Any,
                          capacity_factor: Any, exchange: Any) -> None:
  """Raises unless the arguments describe an expert-parallel layout of `num_experts`."""
  if not isinstance(mesh, jax.sharding.Mesh):
    fail("mesh", "a jax.sharding.Mesh", repr(mesh), TypeError)
  names = tuple(mesh.axis_names)
  if expert_axis not in names:
    fail("expert_axis", f"an axis of the mesh {names}", repr(expert_axis))
  if data_axis is not None and (data_axis not in names or data_axis == expert_axis):
    fail("data_axis", f"None or an axis of the mesh {names} other than {expert_axis!r}",
         repr(data_axis))
  if exchange is not None and exchange not in ep.EXCHANGES:
    fail("exchange", f"None or one of {ep.EXCHANGES}", repr(exchange))
  if capacity_factor is not None and (
      isinstance(capacity_factor, (bool, np.bool_))
      or not isinstance(capacity_factor, (int, float, np.integer, np.floating))
      or not 0 < capacity_factor < math.inf):
    fail("capacity_factor", "None or a finite number > 0 (None: no limit)",
         repr(capacity_factor))
  devices = mesh.shape[expert_axis]
  require(num_experts % devices == 0, "num_experts", f"a multiple of the {devices} devices of "
          f"expert_axis={expert_axis!r}", num_experts)


_FLOAT_WEIGHTS = tuple(np.dtype(d) for d in (jnp.float16, jnp.bfloat16, jnp.float32))


def _check_weights(weights: MoEWeights, mode: str, recipe: recipes.Recipe | None = None
                   ) -> tuple[int, int]:
  """(d_model, num_experts) after checking the weights' shapes for `mode` (and `recipe`)."""
  if not isinstance(weights, MoEWeights):
    fail("weights", "an npu_ops.moe.MoEWeights", type(weights).__name__, TypeError)
  check_rank("weights.router", weights.router, 2)
  if not jnp.issubdtype(weights.router.dtype, jnp.floating):
    fail("weights.router", "float [d, e]", describe(weights.router), TypeError)
  d, e = weights.router.shape
  check_rank("weights.w_gate_up", weights.w_gate_up, 3)
  codes = np.dtype(np.int8) if recipe is None else recipe.code_dtype
  # the mode decides the weights' kind: name them here, not as the inner op's operand
  for name in ("w_gate_up", "w_down"):
    a = getattr(weights, name)
    check_array(f"weights.{name}", a)
    if mode == "int8" and np.dtype(a.dtype) != codes:
      fail(f"weights.{name}", f"{codes.name} codes in mode 'int8'"
           + ("" if recipe is None else f" with recipe {recipe.name!r}"), describe(a), TypeError)
    if mode != "int8" and np.dtype(a.dtype) not in _FLOAT_WEIGHTS:
      fail(f"weights.{name}", f"float16, bfloat16 or float32 weights in mode {mode!r}",
           describe(a), TypeError)
  f2 = weights.w_gate_up.shape[2]
  require(tuple(weights.w_gate_up.shape[:2]) == (e, d) and f2 % 2 == 0, "weights.w_gate_up",
          f"[e={e}, d={d}, 2 * d_ff]", describe(weights.w_gate_up))
  require(tuple(weights.w_down.shape) == (e, f2 // 2, d), "weights.w_down",
          f"[e={e}, d_ff={f2 // 2}, d={d}]", describe(weights.w_down))
  if mode != "float":
    for name, scale, k, n in (("gate_up_scale", weights.gate_up_scale, d, f2),
                              ("down_scale", weights.down_scale, f2 // 2, d)):
      if recipe is None:
        want = (e, n)
      elif mode == "qat" and not recipe.learned_scales:
        want = None
      else:
        want = recipe.scale_shape(e, k, n)
      if scale is not None:
        check_array(f"weights.{name}", scale)
        if not jnp.issubdtype(scale.dtype, jnp.floating):
          fail(f"weights.{name}", f"float step sizes in mode {mode!r}", describe(scale),
               TypeError)
      got = None if scale is None else tuple(scale.shape)
      expected = ("None" if want is None else f"float32 [e={e}, {n}]" if recipe is None
                  else f"{list(want)}")
      require(got == want, f"weights.{name}", f"{expected} in mode {mode!r}", describe(scale))
  return d, e
