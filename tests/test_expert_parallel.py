"""Expert parallelism on 8 simulated CPU devices: the sharded MoE layer equals the
one-device layer (int8 bit for bit), gradients included, against NumPy where it drops.

XLA's device count is fixed when jax starts, so the checks run in one spawned worker
process per test process, started with `--xla_force_host_platform_device_count=8`
(the rest of the suite keeps its single device). Each `check_*` below runs there;
its test sends it over and re-raises what it raises.
"""

import functools
import multiprocessing
import os
import traceback

import numpy as np
import pytest

import numpy_reference as ref

DEVICES, D, FF, E, K = 8, 16, 24, 16, 2  # 2 experts a device
TOKENS = 64                               # 8 a device


def _start_worker():
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={DEVICES}")
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # noqa: PLC0415 (first import: after the flag)
  assert jax.device_count() == DEVICES


@pytest.fixture(scope="module")
def on_devices():
  pool = multiprocessing.get_context("spawn").Pool(1, initializer=_start_worker)
  yield lambda check, *args: pool.apply(_traced, (check,) + args)
  pool.terminate()


def _traced(check, *args):
  """Runs `check` in the worker; its traceback travels in the message."""
  try:
    check(*args)
  except BaseException as e:  # noqa: BLE001 (re-raised with the worker's traceback)
    raise type(e)(traceback.format_exc()) from None


# --- what runs in the worker ------------------------------------------------------------------

def _routed_tokens(seed=0):
  """Tokens whose top-2 experts are chosen: with the router `8 * I`, feature j is
  expert j's logit. Device 0 (tokens 0-7) routes to its own experts 0, 1 only (it
  sends nothing to other devices); the others send 3/4 of their rows to experts 5, 6
  (device 2) and the rest to experts 2-9: experts 10-15 (devices 5-7) get nothing."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(TOKENS, D)).astype(np.float32) * 0.1
  for t in range(TOKENS):
    if t < TOKENS // DEVICES:
      a, b = 0, 1
    elif rng.random() < 0.75:
      a, b = 5, 6
    else:
      a, b = rng.choice(np.arange(2, 10), 2, replace=False)
    x[t, a] += 3.0
    x[t, b] += 2.5
  return x


def _weights(mode, bits=8, seed=1):
  import jax.numpy as jnp  # noqa: PLC0415
  from npu_ops import moe  # noqa: PLC0415
  from npu_ops._src import qat
  rng = np.random.default_rng(seed)
  router = np.eye(D, E, dtype=np.float32) * 8
  w_gu = (rng.normal(size=(E, D, 2 * FF)) / np.sqrt(D)).astype(np.float32)
  w_d = (rng.normal(size=(E, FF, D)) / np.sqrt(FF)).astype(np.float32)
  if mode == "float":
    return moe.MoEWeights(jnp.asarray(router), jnp.asarray(w_gu), jnp.asarray(w_d))
  s_gu = qat.weight_scale_from_amax(jnp.asarray(w_gu), bits=bits)
  s_d = qat.weight_scale_from_amax(jnp.asarray(w_d), bits=bits)
  if mode == "qat":
    return moe.MoEWeights(jnp.asarray(router), jnp.asarray(w_gu), jnp.asarray(w_d), s_gu, s_d)
  return moe.MoEWeights(jnp.asarray(router), qat.quantize_weight(jnp.asarray(w_gu), s_gu, bits=bits),
                        qat.quantize_weight(jnp.asarray(w_d), s_d, bits=bits), s_gu, s_d)


def _mesh(shape=(DEVICES,), names=("expert",)):
  import jax  # noqa: PLC0415
  from jax.sharding import AxisType  # noqa: PLC0415
  return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(shape))


@functools.cache  # one compilation per layer form and shape, across checks
def _layer(mode, bits=8, **parallel):
  import jax  # noqa: PLC0415
  from npu_ops import moe  # noqa: PLC0415
  return jax.jit(functools.partial(moe.moe_mlp, top_k=K, mode=mode, weight_bits=bits,
                                   **parallel))


def check_forward(bits):
  """int8: bit for bit, with the steered routing and with a random router (gates computed
  per device equal the global ones)."""
  x, w = _routed_tokens(), _weights("int8", bits)
  rng = np.random.default_rng(11)
  random_router = (rng.normal(size=(TOKENS, D)).astype(np.float32),
                   w._replace(router=rng.normal(size=(D, E)).astype(np.float32)))
  for x, w in ((x, w), random_router):
    want = _layer("int8", bits)(x, w)
    got = _layer("int8", bits, mesh=_mesh(), expert_axis="expert")(x, w)
    assert int(got.dropped) == 0
    np.testing.assert_array_equal(got.y, want.y)


def check_recipe_forward(recipe):
  """A recipe's deployed layer (`npu_ops.recipes`: its codes, quantized per device) equals
  the one-device layer bit for bit: each row's result depends on its row and expert only."""
  import jax  # noqa: PLC0415
  from npu_ops import moe, recipes  # noqa: PLC0415
  r = recipes.get(recipe)
  w = _weights("float")
  (gu, s_gu), (d, s_d) = (r.quantize_weight(a, r.initial_weight_scale(a))
                          for a in (w.w_gate_up, w.w_down))
  w = w._replace(w_gate_up=gu, w_down=d, gate_up_scale=s_gu, down_scale=s_d)
  x = _routed_tokens(5)
  layer = lambda **parallel: jax.jit(functools.partial(
      moe.moe_mlp, top_k=K, mode="int8", recipe=recipe, **parallel))(x, w)
  want, got = layer(), layer(mesh=_mesh(), expert_axis="expert")
  assert np.abs(np.asarray(want.y)).max() > 0
  np.testing.assert_array_equal(got.y, want.y)


def check_forward_and_gradients(mode):
  """float, qat: outputs (float: and the NumPy layer) and the gradients of x and every
  weight equal the one-device layer's up to float32 rounding (rows summed in other
  blocks and orders)."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from npu_ops import moe  # noqa: PLC0415
  x, w = _routed_tokens(3), _weights(mode)
  g = np.random.default_rng(4).normal(size=x.shape).astype(np.float32)

  def run(**parallel):
    def loss(x, w):
      y = moe.moe_mlp(x, w, top_k=K, mode=mode, **parallel).y
      return jnp.vdot(y, g), y
    return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(x, w)
  want_grads, want_y = run()
  got_grads, got_y = run(mesh=_mesh(), expert_axis="expert")
  np.testing.assert_allclose(got_y, want_y, rtol=1e-5, atol=1e-6)
  if mode == "float":
    np.testing.assert_allclose(got_y, ref.moe_mlp(x, *w[:3], K), rtol=1e-4, atol=1e-5)
  for name, a, b in zip(("x",) + moe.MoEWeights._fields, jax.tree.leaves(got_grads),
                        jax.tree.leaves(want_grads)):
    top = float(np.abs(b).max())
    assert top > 0, name  # every argument has a gradient to compare
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * top, err_msg=name)


def check_capacity():
  x, w = _routed_tokens(), _weights("float")
  mesh = _mesh()
  got = _layer("float", mesh=mesh, expert_axis="expert", capacity_factor=1.0)(x, w)
  pairs = TOKENS // DEVICES * K
  capacity = int(np.ceil(1.0 * pairs / DEVICES))  # 2 rows per device pair
  kept = ref.capacity_kept(ref.top_k_experts(x, w.router, K), DEVICES, E // DEVICES, capacity)
  assert 0 < int(got.dropped) == int((~kept).sum())
  np.testing.assert_allclose(got.y, ref.moe_mlp(x, *w[:3], K, kept=kept), rtol=1e-4, atol=1e-5)
  # a factor large enough drops nothing
  big = _layer("float", mesh=mesh, expert_axis="expert", capacity_factor=DEVICES)(x, w)
  assert int(big.dropped) == 0
  np.testing.assert_allclose(big.y, ref.moe_mlp(x, *w[:3], K), rtol=1e-4, atol=1e-5)


def _emulated_ragged_all_to_all(a, out, input_offsets, send_sizes, output_offsets, recv_sizes,
                                *, axis_name):
  """`lax.ragged_all_to_all` as its docstring defines it, from all_gathers (XLA:CPU has
  no ragged-all-to-all): checks the offsets and sizes the exchange passes. A receive
  size that differs from the size sent fills the output with 77."""
  import jax.numpy as jnp  # noqa: PLC0415
  from jax import lax  # noqa: PLC0415
  me = lax.axis_index(axis_name)
  every = lambda v: lax.all_gather(v, axis_name)
  data, starts, sizes, at = every(a), every(input_offsets), every(send_sizes), every(output_offsets)
  rows = jnp.arange(out.shape[0])
  bad = jnp.zeros((), bool)
  for src in range(data.shape[0]):
    take = rows - at[src, me]
    inside = (take >= 0) & (take < sizes[src, me])
    picked = data[src][jnp.clip(starts[src, me] + take, 0, a.shape[0] - 1)]
    out = jnp.where(inside.reshape((-1,) + (1,) * (a.ndim - 1)), picked, out)
    bad |= sizes[src, me] != recv_sizes[src]
  return jnp.where(bad, jnp.full_like(out, 77), out)


def check_ragged_exchange(mode, capacity_factor):
  """The ragged exchange's offsets, run through an emulated ragged_all_to_all, give the
  padded exchange's result."""
  from npu_ops._src import expert_parallel  # noqa: PLC0415
  x, w = _routed_tokens(5), _weights(mode)
  run = lambda how: _layer(mode, mesh=_mesh(), expert_axis="expert", exchange=how,
                           capacity_factor=capacity_factor)(x, w)
  want = run("padded")
  real = expert_parallel.ragged_all_to_all
  expert_parallel.ragged_all_to_all = _emulated_ragged_all_to_all
  try:
    got = run("ragged")
  finally:
    expert_parallel.ragged_all_to_all = real
  np.testing.assert_array_equal(got.y, want.y)
  assert int(got.dropped) == int(want.dropped)


def check_data_axis():
  x, w = _routed_tokens(6), _weights("int8")
  want = _layer("int8")(x, w)
  mesh = _mesh((2, 4), ("data", "expert"))
  got = _layer("int8", mesh=mesh, expert_axis="expert", data_axis="data")(x, w)
  np.testing.assert_array_equal(got.y, want.y)


def check_explicit_mesh():
  """A mesh of Explicit axes (jax.make_mesh's default): the inputs are resharded."""
  import jax  # noqa: PLC0415
  x, w = _routed_tokens(7), _weights("float")
  want = _layer("float")(x, w)
  mesh = jax.make_mesh((DEVICES,), ("expert",))
  with jax.set_mesh(mesh):
    got = _layer("float", mesh=mesh, expert_axis="expert")(x.reshape(8, 8, D), w)
  np.testing.assert_allclose(got.y.reshape(TOKENS, D), want.y, rtol=1e-5, atol=1e-6)


def check_eager_grad_on_explicit_mesh():
  """Issue 32 item 4: eager `nnx.grad` of a layer on jax.make_mesh's default (Explicit) mesh,
  outside `jax.set_mesh`, equals the one-device layer's gradients."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from npu_ops import moe  # noqa: PLC0415
  from npu_ops.nn import MoEMLP  # noqa: PLC0415
  mesh = jax.make_mesh((2,), ("expert",), devices=jax.devices()[:2])
  layer = MoEMLP(8, 6, 4, mesh=mesh, expert_axis="expert", rngs=nnx.Rngs(0))
  x = np.random.default_rng(12).normal(size=(4, 8)).astype(np.float32)
  grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(layer)
  w = moe.MoEWeights(*(np.asarray(v[...]) for v in (layer.router, layer.w_gate_up,
                                                     layer.w_down)))
  want = jax.jit(jax.grad(lambda w: jnp.sum(moe.moe_mlp(x, w, top_k=K).y ** 2)))(w)
  for name in ("router", "w_gate_up", "w_down"):
    np.testing.assert_allclose(np.asarray(getattr(grads, name)[...]), getattr(want, name),
                               rtol=1e-5, atol=1e-6, err_msg=name)


def check_module():
  """MoEMLP(mesh=...): weights placed by expert, the loss of the NumPy layer, one
  compilation for every routing, convert keeps the mesh, dropped pairs sown."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415
  from npu_ops.nn import MoEMLP  # noqa: PLC0415
  mesh = _mesh()
  sharded = MoEMLP(D, FF, E, mesh=mesh, expert_axis="expert", rngs=nnx.Rngs(0))
  assert sharded.w_gate_up[...].sharding.spec == P("expert")
  # The same weights, on one device (the functional checks compare the two layers).
  plain = [np.asarray(v[...]) for v in (sharded.router, sharded.w_gate_up, sharded.w_down)]
  traces = []

  @nnx.jit
  def step(layer, x):
    traces.append(1)
    return nnx.value_and_grad(lambda m: jnp.mean(m(x) ** 2))(layer)
  for seed in (8, 9):  # two routings, one trace
    x = jnp.asarray(_routed_tokens(seed))
    loss, grads = step(sharded, x)
    np.testing.assert_allclose(loss, np.mean(ref.moe_mlp(x, *plain, K) ** 2), rtol=1e-4)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(nnx.state(grads)))
  assert len(traces) == 1
  int8 = sharded.convert("int8")
  assert int8.parallel["mesh"] is mesh and int8.w_down[...].sharding.spec == P("expert")
  capped = MoEMLP(D, FF, E, mesh=mesh, expert_axis="expert", capacity_factor=1.0,
                  rngs=nnx.Rngs(0))

  @nnx.jit
  def forward(layer, x):
    return layer(x), nnx.pop(layer, nnx.Intermediate)
  x = jnp.asarray(_routed_tokens(10))
  (y, sown) = forward(capped, x)
  assert int(jax.tree.leaves(sown)[0]) > 0 and y.shape == x.shape


def check_stacked_layers(explicit):
  """Layers built under `nnx.vmap` (stacked for `nnx.scan`, Flax's pattern): each device
  holds its experts of every layer (the spec on the experts' axis, the layers' unsharded;
  `device_put` put it on the layers' axis: each device one layer's experts, or an error
  where the layer count does not divide over the devices), and the scan over them is the
  NumPy layers one after the other."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415
  from npu_ops.nn import MoEMLP  # noqa: PLC0415
  mesh = (jax.make_mesh((DEVICES,), ("expert",), axis_types=(jax.sharding.AxisType.Explicit,))
          if explicit else _mesh())

  @nnx.vmap(in_axes=0, out_axes=0)
  def stacked(key):
    return MoEMLP(D, FF, E, mesh=mesh, expert_axis="expert", rngs=nnx.Rngs(key))
  layers = stacked(jax.random.split(jax.random.key(0), 3))  # 3 layers over 8 devices
  w = layers.w_gate_up[...]
  assert w.shape == (3, E, D, 2 * FF) and tuple(w.sharding.spec)[:2] == (None, "expert")
  assert w.addressable_shards[0].data.shape == (3, E // DEVICES, D, 2 * FF)

  @nnx.jit
  def forward(layers, x):
    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def body(layer, x):
      return layer(x)
    return body(layers, x)
  x = _routed_tokens(11)
  want = x
  for i in range(3):
    want = ref.moe_mlp(want, *(np.asarray(v[...])[i] for v in
                               (layers.router, layers.w_gate_up, layers.w_down)), K)
  np.testing.assert_allclose(forward(layers, jnp.asarray(x)), want, rtol=2e-4, atol=1e-5)


def check_errors():
  import jax.numpy as jnp  # noqa: PLC0415
  from flax import nnx  # noqa: PLC0415
  from npu_ops import moe  # noqa: PLC0415
  from npu_ops.nn import MoEMLP  # noqa: PLC0415
  x, w = _routed_tokens(), _weights("float")
  mesh = _mesh()
  cases = [
      (dict(mesh="mesh", expert_axis="expert"), TypeError, "mesh: expected a jax.sharding.Mesh"),
      (dict(mesh=mesh, expert_axis="model"), ValueError, "expert_axis: expected an axis"),
      (dict(mesh=mesh, expert_axis="expert", data_axis="expert"), ValueError, "data_axis"),
      (dict(mesh=mesh, expert_axis="expert", exchange="nccl"), ValueError, "exchange"),
      (dict(mesh=mesh, expert_axis="expert", capacity_factor=0), ValueError, "capacity_factor"),
  ]
  for kw, error, match in cases:
    with pytest.raises(error, match=match):
      moe.moe_mlp(x, w, top_k=K, **kw)
  with pytest.raises(ValueError, match="num_experts: expected a multiple of the 8 devices"):
    moe.moe_mlp(x, moe.MoEWeights(w.router[:, :12], w.w_gate_up[:12], w.w_down[:12]), top_k=K,
                mesh=mesh, expert_axis="expert")
  with pytest.raises(ValueError, match="x: expected a token count divisible by the 8"):
    moe.moe_mlp(x[:60], w, top_k=K, mesh=mesh, expert_axis="expert")
  with pytest.raises(ValueError, match="expert_axis"):  # at construction, not at the call
    MoEMLP(D, FF, E, mesh=mesh, expert_axis="model", rngs=nnx.Rngs(0))
  del jnp


# --- the tests ---------------------------------------------------------------------------------

# The default run takes int8 forward, float gradients, the ragged offsets and the errors
# (each case compiles the layer twice, on 8 devices sharing the host's cores); the slow
# run the rest.
slow = pytest.mark.slow


@pytest.mark.parametrize("bits", [8, pytest.param(4, marks=slow)])
def test_int8_forward_equals_one_device_bit_for_bit(on_devices, bits):
  on_devices(check_forward, bits)


@pytest.mark.parametrize("recipe", ["w4a4", pytest.param("fp8", marks=slow)])
def test_recipe_forward_equals_one_device_bit_for_bit(on_devices, recipe):
  on_devices(check_recipe_forward, recipe)


@pytest.mark.parametrize("mode", ["float", pytest.param("qat", marks=slow)])
def test_forward_and_gradients_equal_one_device(on_devices, mode):
  on_devices(check_forward_and_gradients, mode)


@slow
def test_capacity_drops_the_latest_tokens(on_devices):
  on_devices(check_capacity)


@pytest.mark.parametrize("mode,capacity_factor", [("int8", None),
                                                   pytest.param("float", 1.0, marks=slow)])
def test_ragged_exchange_offsets(on_devices, mode, capacity_factor):
  on_devices(check_ragged_exchange, mode, capacity_factor)


@slow
def test_data_and_expert_axes(on_devices):
  on_devices(check_data_axis)


@slow
def test_explicit_mesh(on_devices):
  on_devices(check_explicit_mesh)


@slow  # eager: op by op on the simulated devices (~1 min on 2 cores)
def test_eager_grad_on_explicit_mesh(on_devices):
  on_devices(check_eager_grad_on_explicit_mesh)


@slow
def test_module(on_devices):
  on_devices(check_module)


@slow
@pytest.mark.parametrize("explicit", [False, True])
def test_stacked_layers(on_devices, explicit):
  on_devices(check_stacked_layers, explicit)


def test_errors(on_devices):
  on_devices(check_errors)


def test_parallel_options_need_a_mesh():
  import jax.numpy as jnp  # noqa: PLC0415
  from npu_ops import moe  # noqa: PLC0415
  w = moe.MoEWeights(jnp.ones((D, E)), jnp.ones((E, D, 2 * FF)), jnp.ones((E, FF, D)))
  for kw in (dict(expert_axis="expert"), dict(capacity_factor=1.0), dict(exchange="padded")):
    with pytest.raises(ValueError, match=f"{next(iter(kw))}: expected None without a mesh"):
      moe.moe_mlp(jnp.ones((4, D)), w, top_k=K, **kw)
