"""group_offset (expert parallelism, megablox semantics): rhs holds the local experts, the
group list all G groups; rows of other groups give 0. Checked against NumPy and against
the identity expert parallelism rests on: the shards' outputs sum to the full op's."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import npu_ops
import numpy_reference as ref
from helpers import assert_int8_equal, assert_scale_close
from implementations import IMPLEMENTATIONS, impls

M, K, N, G, LOCAL = 96, 128, 128, 6, 2
SIZES = np.array([12, 0, 25, 30, 0, 20], np.int32)  # total 87 < M: rows past it are no group's
BOUNDS = ref.group_bounds(SIZES, 1)
RNG = np.random.default_rng(19)


@pytest.fixture(autouse=True)
def _same_data_in_any_order():
  """Each test draws from a fresh generator: its data does not depend on the test order."""
  global RNG
  RNG = np.random.default_rng(19)


def _offsets():
  return range(0, G - LOCAL + 1, LOCAL)  # the shards of G experts, LOCAL each


@pytest.mark.parametrize("kind,impl", [("float", i) for i in impls("gmm_float")]
                         + [("int8", i) for i in impls("gmm_int")])
def test_grouped_matmul_shards(kind, impl):
  """Each shard's rows from its own experts, 0 elsewhere; the shards sum to the whole
  product (int8: exact int32)."""
  if kind == "int8":
    x = RNG.integers(-128, 128, (M, K)).astype(np.int8)
    w = RNG.integers(-128, 128, (G, K, N)).astype(np.int8)
    full = ref.grouped_matmul(x, w, BOUNDS)
    check = np.testing.assert_array_equal
  else:
    x = RNG.normal(size=(M, K)).astype(np.float32)
    w = RNG.normal(size=(G, K, N)).astype(np.float32)
    full = ref.grouped_matmul(x, w, BOUNDS, np.float64)
    check = functools.partial(np.testing.assert_allclose, rtol=1e-4,
                              atol=1e-4 * np.abs(full).max())
  op = jax.jit(lambda off, ws: npu_ops.grouped_matmul(x, ws, jnp.asarray(SIZES), group_offset=off,
                                                      **IMPLEMENTATIONS[impl]))
  total = 0
  for off in _offsets():
    got = op(off, w[off:off + LOCAL])  # a traced offset: one compilation for every shard
    want = np.zeros_like(full)
    for g in range(off, off + LOCAL):
      lo, hi = BOUNDS[g]
      want[lo:hi] = full[lo:hi]
    check(got, want)
    total = total + np.asarray(got, full.dtype)
  check(total, full)


def test_static_and_dynamic_forms_agree_and_gradients_stay_local():
  x = RNG.normal(size=(M, K)).astype(np.float32)
  w = RNG.normal(size=(LOCAL, K, N)).astype(np.float32)
  dy = RNG.normal(size=(M, N)).astype(np.float32)
  off = 2
  forms = [(list(map(int, SIZES)), off), (jnp.asarray(SIZES), off),
           (jnp.asarray(SIZES), jnp.int32(off))]
  outs = [npu_ops.grouped_matmul(x, w, s, group_offset=o) for s, o in forms]
  for o in outs[1:]:
    np.testing.assert_array_equal(o, outs[0])
  dx, dw = jax.grad(lambda a, b: jnp.vdot(npu_ops.grouped_matmul(
      a, b, jnp.asarray(SIZES), group_offset=jnp.int32(off)), dy), argnums=(0, 1))(x, w)
  local = [BOUNDS[g] for g in range(off, off + LOCAL)]
  mine = np.zeros(M, bool)
  for lo, hi in local:
    mine[lo:hi] = True
  assert not np.any(np.asarray(dx)[~mine])  # rows of other shards' groups: zero gradient
  want_dw = np.stack([x[lo:hi].T.astype(np.float64) @ dy[lo:hi] for lo, hi in local])
  np.testing.assert_allclose(dw, want_dw, rtol=1e-4, atol=1e-4 * np.abs(want_dw).max())
  # tgmm with the same offset is that weight gradient
  t = npu_ops.tgmm(x, dy, jnp.asarray(SIZES), num_groups=LOCAL, group_offset=jnp.int32(off))
  np.testing.assert_allclose(t, want_dw, rtol=1e-4, atol=1e-4 * np.abs(want_dw).max())
  # and vmap over shards (offset and weights batched) sums to the full product
  w_all = RNG.normal(size=(G, K, N)).astype(np.float32)
  offs = jnp.asarray(list(_offsets()), jnp.int32)
  shards = jax.vmap(lambda o, ws: npu_ops.grouped_matmul(x, ws, jnp.asarray(SIZES),
                                                         group_offset=o))(
      offs, w_all.reshape(-1, LOCAL, K, N))
  full = ref.grouped_matmul(x, w_all, BOUNDS, np.float64)
  np.testing.assert_allclose(shards.sum(0), full, rtol=1e-4, atol=1e-4 * np.abs(full).max())


def _expert_weights(scenario, experts):
  """(values int8 [experts, 256, N], scales, the weight as the op takes it, A8W4's assist)."""
  if scenario == "A8W8":
    w = RNG.integers(-128, 128, (experts, 256, N)).astype(np.int8)
    w_scale = (RNG.uniform(0.5, 1.5, (experts, N)) / 2e4).astype(np.float32)
    return w, w_scale, w, None
  w = RNG.integers(-8, 8, (experts, 256, N)).astype(np.int8)
  w_scale = (RNG.uniform(0.5, 1.5, (experts, 2, N)) / 1e3).astype(np.float32)
  return w, w_scale, jnp.asarray(w, jnp.int4), ref.canonical_assist(w, w_scale)


# The kernels' fused op with offsets runs in the slow set (their gmm above is in the default).
@pytest.mark.parametrize("scenario,impl", [
    pytest.param("A8W8", i, marks=[pytest.mark.slow] if i.startswith("pallas") else [])
    for i in impls("fused_A8W8")] + [("A8W4", "xla")])
def test_fused_op_shards_bit_exact(scenario, impl):
  x = RNG.integers(-128, 128, (M, 256)).astype(np.int8)
  w, w_scale, weight, assist = _expert_weights(scenario, G)
  x_scale = RNG.uniform(0.5, 1.5, M).astype(np.float32)
  want_q, want_s = ref.swiglu_quant(x, w, w_scale, x_scale, BOUNDS, scenario=scenario,
                                    assist=assist)
  cumsum = jnp.asarray(np.cumsum(SIZES), jnp.int32)
  op = jax.jit(lambda off, ws, ss: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, ws, ss, x_scale, cumsum, group_offset=off, dequant_mode=1 if scenario == "A8W4" else 0,
      **IMPLEMENTATIONS[impl]))
  full = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, weight, w_scale, x_scale, cumsum, dequant_mode=1 if scenario == "A8W4" else 0,
      **IMPLEMENTATIONS[impl])
  q_sum, s_sum = 0, 0
  for off in _offsets():
    q, s = op(off, weight[off:off + LOCAL], w_scale[off:off + LOCAL])
    q_sum, s_sum = q_sum + np.asarray(q, np.int32), s_sum + np.asarray(s)
  # each row is computed by its own expert's shard alone, with the same arithmetic
  np.testing.assert_array_equal(q_sum, full[0])
  np.testing.assert_array_equal(s_sum, full[1])
  assert_int8_equal(q_sum, want_q)
  assert_scale_close(s_sum, want_s)


def test_errors_and_clamping():
  x, w = np.ones((8, 4), np.float32), np.ones((2, 4, 4), np.float32)
  sizes = [2, 2, 2, 2]
  with pytest.raises(ValueError, match=r"group_offset: expected an int in \[0, 2\]"):
    npu_ops.grouped_matmul(x, w, sizes, group_offset=3)
  with pytest.raises(ValueError, match="group_offset"):
    npu_ops.grouped_matmul(x, w, jnp.asarray(sizes), group_offset=jnp.int32(-1))
  with pytest.raises(TypeError, match="group_offset"):
    npu_ops.grouped_matmul(x, w, sizes, group_offset=1.0)
  with pytest.raises(TypeError, match="num_groups"):
    npu_ops.tgmm(x, x, sizes, group_offset=0)
  with pytest.raises(ValueError, match="group_sizes: expected at least 2 groups"):
    npu_ops.grouped_matmul(x, w, [8], group_offset=0)
  with pytest.raises(ValueError, match=r"group_list: expected at least 2 groups \(one per "
                     r"local expert in weight\)"):  # v2 names torch_npu's arguments
    npu_ops.npu_grouped_matmul_swiglu_quant_v2(
        np.zeros((8, 4), np.int8), np.zeros((2, 4, 8), np.int8), np.ones((2, 8), np.float32),
        np.ones(8, np.float32), np.array([8]), group_list_type=1, group_offset=0)
  # traced: clamped to [0, G - local], reported under checkify
  f = lambda o: npu_ops.grouped_matmul(x, w, jnp.asarray(sizes), group_offset=o)
  np.testing.assert_array_equal(jax.jit(f)(7), f(2))
  with npu_ops.debug_checks():
    err, _ = jax.jit(checkify.checkify(f))(7)
  assert "group_offset" in err.get()


@pytest.mark.parametrize("impl", [i for i in impls("gmm_float") if i.startswith("pallas")])
def test_kernel_gradients_and_batched_rows_with_an_offset(impl):
  """The kernels take the offset in their metadata (no rows moved): the forward and the
  input gradient read the local rows in place, and so does the weight gradient (tgmm). The
  VJP, and vmap over a batch of lhs (rows merged into one call: ends and start scale by
  the batch), against the NumPy reference."""
  x = RNG.normal(size=(M, K)).astype(np.float32)
  w = RNG.normal(size=(LOCAL, K, N)).astype(np.float32)
  dy = RNG.normal(size=(M, N)).astype(np.float32)
  off = jnp.int32(2)

  local = [BOUNDS[g] for g in range(2, 2 + LOCAL)]
  x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
  want_dx = ref.grouped_matmul(dy64, np.swapaxes(w64, 1, 2), local, np.float64)  # 0 elsewhere
  want_dw = np.stack([x64[lo:hi].T @ dy64[lo:hi] for lo, hi in local])
  f = lambda a, b: jnp.vdot(npu_ops.grouped_matmul(
      a, b, jnp.asarray(SIZES), group_offset=off, precision="highest",
      **IMPLEMENTATIONS[impl]), dy)
  dx, dw = jax.grad(f, argnums=(0, 1))(x, w)
  for got, want in ((dx, want_dx), (dw, want_dw)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  batch = np.stack([x, -2 * x])
  got = jax.vmap(lambda a: npu_ops.grouped_matmul(
      a, w, jnp.asarray(SIZES), group_offset=off, precision="highest",
      **IMPLEMENTATIONS[impl]))(batch)
  for b in range(2):
    want = ref.grouped_matmul(batch[b].astype(np.float64), w64, local, np.float64)
    np.testing.assert_allclose(got[b], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_fused_op_static_list_and_offset_on_the_xla_path():
  """Static ends and a static offset (constant loop bounds) and their traced forms, on the
  XLA path's both epilogues (per block: A8W4; after the matmul: A8W8 at these sizes), each
  against the NumPy golden of the local groups (the other rows 0)."""
  x = RNG.integers(-128, 128, (M, 256)).astype(np.int8)
  x_scale = RNG.uniform(0.5, 1.5, M).astype(np.float32)
  cumsum = np.cumsum(SIZES)
  for scenario in ("A8W8", "A8W4"):
    w, w_scale, weight, assist = _expert_weights(scenario, LOCAL)
    want_q, want_s = ref.swiglu_quant(x, w, w_scale, x_scale, BOUNDS[2:2 + LOCAL],
                                      scenario=scenario, assist=assist)
    call = lambda gl, off: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
        x, weight, w_scale, x_scale, gl, group_offset=off,
        dequant_mode=int(scenario == "A8W4"), implementation="xla")
    for q, s in (call([int(c) for c in cumsum], 2),
                 jax.jit(call)(jnp.asarray(cumsum, jnp.int32), jnp.int32(2))):
      assert_int8_equal(q, want_q)
      assert_scale_close(s, want_s)


def test_weight_lists_with_an_offset():
  """A list of local experts' weights (read in place) with group_offset: the forward and
  both gradients against NumPy, as the stacked form gives them; tgmm's too."""
  x = RNG.normal(size=(M, K)).astype(np.float32)
  w = RNG.normal(size=(LOCAL, K, N)).astype(np.float32)
  dy = RNG.normal(size=(M, N)).astype(np.float32)
  off, sizes = 2, jnp.asarray(SIZES)
  local = [BOUNDS[g] for g in range(off, off + LOCAL)]
  want_y = np.zeros((M, N))
  want_dx = np.zeros((M, K))
  for (lo, hi), wg in zip(local, w.astype(np.float64)):
    want_y[lo:hi] = x[lo:hi] @ wg
    want_dx[lo:hi] = dy[lo:hi] @ wg.T
  want_dw = np.stack([x[lo:hi].T.astype(np.float64) @ dy[lo:hi] for lo, hi in local])
  loss = lambda a, b: jnp.vdot(npu_ops.grouped_matmul(a, b, sizes, group_offset=jnp.int32(off)),
                               dy)
  y = jax.jit(lambda a, b: npu_ops.grouped_matmul(a, b, sizes, group_offset=off))(x, list(w))
  dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, list(w))
  tol = lambda a: dict(rtol=1e-4, atol=1e-4 * np.abs(a).max())
  np.testing.assert_allclose(y, want_y, **tol(want_y))
  np.testing.assert_allclose(dx, want_dx, **tol(want_dx))
  np.testing.assert_allclose(np.stack(dw), want_dw, **tol(want_dw))
  t = npu_ops.tgmm(x, dy, sizes, num_groups=LOCAL, group_offset=off)
  np.testing.assert_allclose(t, want_dw, **tol(want_dw))
