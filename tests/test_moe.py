"""Routing helpers and the Flax MoE layer (float, qat, int8) against a token-by-token NumPy MoE."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from npu_ops import moe
from npu_ops.nn import MoEMLP

import numpy_reference as ref

D, FF, E = 16, 24, 4


def tokens(seed, shape=(3, 10)):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(*shape, D)).astype(np.float32))


def test_routing_against_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(12, 5)).astype(np.float32)
  weights, experts = moe.top_k_routing(jnp.asarray(logits), 2)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  want_e = np.argsort(-probs, axis=-1, kind="stable")[:, :2]
  np.testing.assert_array_equal(experts, want_e)
  want_w = np.take_along_axis(probs, want_e, -1)
  np.testing.assert_allclose(weights, want_w / want_w.sum(-1, keepdims=True), rtol=1e-6)

  routing = moe.dispatch(experts, 5)
  np.testing.assert_array_equal(routing.group_sizes, np.bincount(want_e.ravel(), minlength=5))
  flat = want_e.ravel()
  order = np.argsort(flat, kind="stable")
  np.testing.assert_array_equal(routing.token_index, order // 2)
  sorted_experts = flat[order]
  assert (np.diff(sorted_experts) >= 0).all()
  y_sorted = rng.normal(size=(24, 3)).astype(np.float32)
  want = np.zeros((12, 3))
  for row, pair in enumerate(order):
    want[pair // 2] += np.asarray(weights).ravel()[pair] * y_sorted[row]
  np.testing.assert_allclose(moe.combine(jnp.asarray(y_sorted), routing, weights), want,
                             rtol=1e-5, atol=1e-6)


def test_traced_wide_ids_outside_the_experts_are_in_no_group():
  """int64 ids (x64 on) and uint32 ones beyond the int32 range are invalid, not wrapped
  into a real expert: no group counts them and they sort last, reading num_experts."""
  with jax.enable_x64(True):
    for experts in (np.array([[0, 2], [2**32 + 1, 1], [1, -2**32 + 2]], np.int64),
                    np.array([[0, 2], [2**32 + 1, 1], [1, 2**64 - 1]], np.uint64),
                    np.array([[0, 2], [2**31 + 1, 1], [1, 2**32 - 1]], np.uint32)):
      valid = (experts >= 0) & (experts < 3)
      want_expert = np.sort(np.where(valid, experts, 3).ravel(), kind="stable")
      routing = jax.jit(lambda a: moe.dispatch(a, 3))(jnp.asarray(experts))
      np.testing.assert_array_equal(routing.group_sizes,
                                    np.bincount(experts[valid].ravel(), minlength=3))
      np.testing.assert_array_equal(routing.expert, want_expert)


def test_combine_keeps_float32_gates_and_a_users_gmm_gives_float32():
  """The gates are not rounded to a bfloat16 y's type (0.5004 * 1 - 0.4996 * 1 = 0.0008,
  not 0: both gates round to 0.5 in bfloat16); moe_mlp's output is float32 whatever the
  float mode's gmm returns."""
  routing = moe.dispatch(jnp.array([[0, 1]], jnp.int32), 2)
  gates = np.array([[0.5004, 0.4996]], np.float32)
  got = moe.combine(jnp.array([[1.0], [-1.0]], jnp.bfloat16), routing, jnp.asarray(gates))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, [[gates[0, 0] - gates[0, 1]]], rtol=1e-6)
  rng = np.random.default_rng(3)
  bf = lambda shape: jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
  weights = moe.MoEWeights(bf((D, E)), bf((E, D, 2 * FF)), bf((E, FF, D)), None, None)
  gmm = lambda lhs, rhs, sizes: jax.lax.ragged_dot(lhs.astype(jnp.bfloat16), rhs, sizes)
  assert moe.moe_mlp(tokens(4)[0], weights, top_k=2, gmm=gmm).y.dtype == jnp.float32


def assert_within_one_step(got, want, share_exact=0.98):
  """Equal up to float rounding, except where an activation code moved by one step."""
  diff, top = np.abs(np.asarray(got) - want), np.abs(want).max()
  assert np.mean(diff <= 1e-5 * top) >= share_exact
  assert diff.max() <= 2e-2 * top


def expert_arrays(layer):
  return np.asarray(layer.router[...]), np.asarray(layer.w_gate_up[...]), np.asarray(
      layer.w_down[...])


def quantized_expert(layer):
  """NumPy expert of the qat/int8 layers: int8 fused op semantics, then the down projection."""
  bits = layer.weight_bits
  qmax = {8: 127, 4: 7}[bits]
  s_gu, s_d = map(np.asarray, layer.weight_scales())
  if layer.mode == "int8":
    wq_gu = np.asarray(layer.w_gate_up[...]).astype(np.int64)
    wq_d = np.asarray(layer.w_down[...]).astype(np.int64)
  else:
    codes = lambda w, s: np.clip(np.rint(w * (np.float32(1) / s[:, None, :])), -qmax, qmax)
    wq_gu = codes(np.asarray(layer.w_gate_up[...]), s_gu).astype(np.int64)
    wq_d = codes(np.asarray(layer.w_down[...]), s_d).astype(np.int64)

  def expert_fn(row, i):
    xq, xs = ref.per_token_int8(row.astype(np.float32))
    c = ((xq.astype(np.int64) @ wq_gu[i]).astype(np.float32) * s_gu[i]) * xs[:, None]
    hq, hs = ref.per_token_int8(ref.swiglu(c))
    return (hq.astype(np.int64) @ wq_d[i]).astype(np.float64) * s_d[i] * hs[:, None]

  return expert_fn


def test_float_forward_against_numpy():
  layer = MoEMLP(D, FF, E, top_k=2, rngs=nnx.Rngs(0))
  x = tokens(1)
  got = layer(x)
  assert got.shape == x.shape and got.dtype == jnp.float32
  want = ref.moe_mlp(np.asarray(x).reshape(-1, D), *expert_arrays(layer), 2)
  np.testing.assert_allclose(np.asarray(got).reshape(-1, D), want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", ["qat", "int8"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_forward_against_numpy(mode, bits):
  float_layer = MoEMLP(D, FF, E, top_k=2, weight_bits=bits, rngs=nnx.Rngs(1))
  layer = float_layer.convert(mode)
  x = tokens(2)
  got = np.asarray(layer(x)).reshape(-1, D)
  xf = np.asarray(x).reshape(-1, D)
  want = ref.moe_mlp(xf, np.asarray(layer.router[...]), None, None, 2, quantized_expert(layer))
  assert_within_one_step(got, want)


@pytest.mark.parametrize("bits", [8, 4])
def test_qat_to_int8_keeps_the_forward(bits):
  layer = MoEMLP(D, FF, E, top_k=2, mode="qat", weight_bits=bits, rngs=nnx.Rngs(2))
  layer.gate_up_log_scale[...] += np.log(0.9)  # learned scales, some clipping
  int8 = layer.convert("int8")
  assert int8.w_gate_up[...].dtype == jnp.int8 and int8.w_down[...].dtype == jnp.int8
  qmax = {8: 127, 4: 7}[bits]
  scale = np.exp(np.asarray(layer.gate_up_log_scale[...]))
  np.testing.assert_allclose(int8.gate_up_scale[...], scale, rtol=1e-6)
  codes = np.clip(np.rint(np.asarray(layer.w_gate_up[...]) *
                          (np.float32(1) / np.asarray(int8.gate_up_scale[...])[:, None, :])),
                  -qmax, qmax)
  np.testing.assert_array_equal(int8.w_gate_up[...], codes)
  x = tokens(3)
  assert_within_one_step(int8(x), np.asarray(layer(x)))


def test_ptq_equals_qat_at_initialization():
  layer = MoEMLP(D, FF, E, rngs=nnx.Rngs(3))
  x = tokens(4)
  # the same amax scales (through exp(log(s)) on the qat side: 1 ulp at most)
  assert_within_one_step(layer.convert("qat").convert("int8")(x),
                         np.asarray(layer.convert("int8")(x)))


@pytest.mark.parametrize("mode", ["float", "qat"])
def test_jit_training_step_lowers_the_loss(mode):
  layer = MoEMLP(D, FF, E, top_k=2, rngs=nnx.Rngs(4))
  layer = layer if mode == "float" else layer.convert("qat")
  x = tokens(5, (64,))
  target = jnp.tanh(x[:, ::-1])
  optimizer = nnx.Optimizer(layer, optax.adam(3e-3), wrt=nnx.Param)
  traces = []

  @nnx.jit
  def step(layer, optimizer, x, target):
    traces.append(1)
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(layer)
    optimizer.update(layer, grads)
    return loss, grads

  scale0 = None if mode == "float" else np.asarray(layer.gate_up_log_scale[...])
  losses = []
  for _ in range(25):
    loss, grads = step(layer, optimizer, x, target)
    losses.append(float(loss))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(nnx.state(grads)))
  assert losses[-1] < 0.7 * losses[0], losses
  assert len(traces) == 1  # routing changes every step, the compilation does not
  if mode == "qat":
    assert not np.array_equal(scale0, layer.gate_up_log_scale[...])  # scales are learned


def test_int8_layer_under_jit_and_its_variables():
  layer = MoEMLP(D, FF, E, rngs=nnx.Rngs(5)).convert("int8")
  x = tokens(6)
  np.testing.assert_array_equal(nnx.jit(lambda m, x: m(x))(layer, x), layer(x))
  params = nnx.state(layer, nnx.Param)
  assert set(params.keys()) == {"router"}  # int8 codes and scales are not trained


def test_bad_input():
  with pytest.raises(ValueError, match="mode"):
    MoEMLP(D, FF, E, mode="fp8", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="top_k"):
    MoEMLP(D, FF, E, top_k=5, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="bits"):
    MoEMLP(D, FF, E, weight_bits=2, rngs=nnx.Rngs(0))
  layer = MoEMLP(D, FF, E, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="d_model"):
    layer(jnp.ones((4, D + 1)))
  with pytest.raises(ValueError, match="mode"):
    layer.convert("int8").convert("qat")
  with pytest.raises(TypeError, match="logits"):
    moe.top_k_routing(jnp.ones((2, E), jnp.int32), 2)
  with pytest.raises(TypeError, match="y_sorted"):
    moe.combine([[1.0]], moe.dispatch(jnp.zeros((1, 1), jnp.int32), E), jnp.ones((1, 1)))
  w = moe.MoEWeights(jnp.ones((D, E)), jnp.ones((E, D, 2 * FF), jnp.int8),
                     jnp.ones((E, FF, D), jnp.int8), jnp.ones((E, 2 * FF)), jnp.ones((E, D)))
  for bad, name in ((w._replace(router=jnp.ones((D, E), jnp.int32)), "weights.router"),
                    (w._replace(down_scale=jnp.ones((E, D), jnp.int32)), "weights.down_scale"),
                    (w._replace(gate_up_scale=[[1.0] * 2 * FF] * E), "weights.gate_up_scale")):
    with pytest.raises(TypeError, match=name):
      moe.moe_mlp(jnp.ones((3, D)), bad, top_k=2, mode="int8")
  with pytest.raises(ValueError, match=r"weights.w_gate_up: expected int4 values in \[-8, 7\]"):
    moe.moe_mlp(jnp.ones((3, D)), w._replace(w_gate_up=jnp.full((E, D, 2 * FF), 9, jnp.int8)),
                top_k=2, mode="int8", weight_bits=4)
  mesh = jax.make_mesh((1,), ("ex",))
  moe.check_expert_parallel(E, mesh=mesh, expert_axis="ex", data_axis=None,
                            capacity_factor=np.float32(1.5), exchange=None)  # NumPy floats too
