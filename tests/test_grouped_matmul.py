"""npu_ops.grouped_matmul against a NumPy grouped matmul (ragged_dot semantics)."""

import re

import jax
import jax.test_util
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import npu_ops
import numpy_reference as ref

BLOCKS = [None, npu_ops.GmmBlockSizes(block_m=8, min_block_m=2),
          pytest.param(npu_ops.GmmBlockSizes(block_m=32, min_block_m=32), marks=pytest.mark.slow),
          pytest.param(npu_ops.GmmBlockSizes(1, 1), marks=pytest.mark.slow)]


def operands(seed, m, k, n, g, dtype):
  rng = np.random.default_rng(seed)
  if dtype == np.int8:
    return (rng.integers(-128, 128, (m, k)).astype(np.int8),
            rng.integers(-128, 128, (g, k, n)).astype(np.int8))
  return (rng.normal(size=(m, k)).astype(dtype), rng.normal(size=(g, k, n)).astype(dtype))


@pytest.mark.parametrize("sizes", [[10, 0, 37, 53], [0, 0, 0, 100], [100, 0, 0, 0], [3, 4, 5, 6],
                                   [0, 0, 0, 0], [1, 1, 97, 1]])
@pytest.mark.parametrize("block_sizes", BLOCKS, ids=str)
def test_int8_exact(sizes, block_sizes):
  x, w = operands(0, 100, 48, 24, 4, np.int8)
  want = ref.grouped_matmul(x, w, ref.group_bounds(sizes, 1))
  for gs in (sizes, jnp.asarray(sizes)):
    got = npu_ops.grouped_matmul(x, w, gs, block_sizes=block_sizes)
    assert got.dtype == jnp.int32
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype,out,tol", [(np.float32, None, 1e-5),
                                           (ml_dtypes.bfloat16, jnp.float32, 1e-5),
                                           (ml_dtypes.bfloat16, None, 1e-2),
                                           (np.float16, None, 2e-3)])
def test_float(dtype, out, tol):
  """Float operands accumulate in float32; the tolerance is one rounding of the out dtype."""
  sizes = [7, 0, 20, 3]
  x, w = operands(1, 40, 64, 16, 4, dtype)
  want = ref.grouped_matmul(x, w, ref.group_bounds(sizes, 1), out_dtype=np.float64)
  for gs in (sizes, jnp.asarray(sizes)):
    got = npu_ops.grouped_matmul(x, w, gs, preferred_element_type=out)
    assert got.dtype == (out or dtype)
    scale = np.abs(want).max()
    np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol * scale, rtol=tol)


def test_matches_ragged_dot():
  x, w = operands(2, 64, 32, 16, 5, np.float32)
  sizes = jnp.asarray([10, 0, 20, 14, 10])
  a = npu_ops.grouped_matmul(x, w, sizes)
  c = jax.lax.ragged_dot(jnp.asarray(x), jnp.asarray(w), sizes)
  np.testing.assert_allclose(a, c, rtol=1e-5, atol=1e-4)


def test_int4_operands():
  rng = np.random.default_rng(3)
  x = rng.integers(-8, 8, (30, 16)).astype(np.int8)
  w = rng.integers(-8, 8, (2, 16, 8)).astype(np.int8)
  got = npu_ops.grouped_matmul(x.astype(ml_dtypes.int4), w.astype(ml_dtypes.int4), [12, 18])
  np.testing.assert_array_equal(got, ref.grouped_matmul(x, w, [(0, 12), (12, 30)]))


def test_jit_one_trace_and_vmap():
  x, w = operands(4, 32, 16, 8, 3, np.int8)
  traces = []

  @jax.jit
  def f(x, gs):
    traces.append(1)
    return npu_ops.grouped_matmul(x, w, gs)

  for sizes in ([10, 10, 12], [0, 32, 0], [5, 0, 1]):
    np.testing.assert_array_equal(f(x, jnp.asarray(sizes)),
                                  ref.grouped_matmul(x, w, ref.group_bounds(sizes, 1)))
  assert len(traces) == 1
  xs = np.stack([x, x[::-1]])
  gss = jnp.asarray([[10, 10, 12], [0, 30, 2]])
  got = jax.vmap(lambda a, b: npu_ops.grouped_matmul(a, w, b))(xs, gss)
  for i in range(2):
    np.testing.assert_array_equal(got[i], ref.grouped_matmul(
        xs[i], w, ref.group_bounds(np.asarray(gss[i]), 1)))


@pytest.mark.parametrize("implementation", ["xla", "reference"])
@pytest.mark.parametrize("dynamic", [False, True])
def test_grad_against_numpy(implementation, dynamic):
  """custom VJP: dlhs = dy @ W_g^T per row, dW_g = x_g^T @ dy_g; zero outside groups."""
  sizes = [5, 0, 7, 2]  # 14 of 16 rows grouped, one empty group
  x, w = operands(5, 16, 8, 4, 4, np.float32)
  dy = np.random.default_rng(6).normal(size=(16, 4)).astype(np.float32)
  gs = jnp.asarray(sizes) if dynamic else sizes
  f = lambda a, b: jnp.sum(npu_ops.grouped_matmul(a, b, gs, implementation=implementation) * dy)
  gx, gw = jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)
  want_gx = np.zeros_like(x)
  for g, (s, e) in enumerate(ref.group_bounds(sizes, 1)):
    want_gx[s:e] = dy[s:e] @ w[g].T
  np.testing.assert_allclose(gx, want_gx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, tgmm_ref(x, dy, sizes, 4, acc=np.float64), rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(gw[1])) and not np.any(np.asarray(gx[14:]))


@pytest.mark.parametrize("implementation", [None, "reference"])
def test_inside_shard_map_with_its_type_check(implementation):
  """Inside `jax.shard_map` (check_vma, its default) over sharded tokens: the forward, dx
  and dw (replicated weights: summed over the devices, as JAX does for its own dots), tgmm
  with a psum, and the fused ops, as NumPy computes them (the loops started from invariant
  zeros and the ops' results were typed invariant: every grouped op failed there)."""
  from jax.sharding import AxisType, PartitionSpec as P  # noqa: PLC0415
  mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
  sizes = [5, 0, 7, 2]
  x, w = operands(5, 16, 8, 4, 4, np.float32)
  dy = np.random.default_rng(6).normal(size=(16, 4)).astype(np.float32)
  gs = jnp.asarray(sizes)
  rows = P("data", None)

  def local(x):
    f = lambda a, b: jnp.sum(npu_ops.grouped_matmul(a, b, gs, implementation=implementation) * dy)
    gx, gw = jax.grad(f, argnums=(0, 1))(x, jnp.asarray(w))
    t = jax.lax.psum(npu_ops.tgmm(x, dy, gs, implementation=implementation), "data")
    return npu_ops.grouped_matmul(x, w, gs, implementation=implementation), gx, gw, t
  y, gx, gw, t = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=rows,
                                       out_specs=(rows, rows, P(), P())))(x)
  want_y = ref.grouped_matmul(x, w, ref.group_bounds(sizes, 1), np.float64)
  want_gx = np.zeros_like(x)
  for g, (s, e) in enumerate(ref.group_bounds(sizes, 1)):
    want_gx[s:e] = dy[s:e] @ w[g].T
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, want_gx, rtol=1e-5, atol=1e-5)
  for got in (gw, t):
    np.testing.assert_allclose(got, tgmm_ref(x, dy, sizes, 4, acc=np.float64), rtol=1e-5,
                               atol=1e-5)
  # the fused op and its training form, forward and gradient
  x8 = np.random.default_rng(7).integers(-128, 128, (16, 8)).astype(np.int8)
  w8 = np.random.default_rng(8).integers(-128, 128, (4, 8, 4)).astype(np.int8)
  ws, xs = np.full((4, 4), 1e-3, np.float32), np.full(16, 0.5, np.float32)
  fused = lambda a: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      a, w8, ws, xs, gs, group_list_type=1, implementation=implementation)
  q, qs = jax.jit(jax.shard_map(fused, mesh=mesh, in_specs=rows, out_specs=(rows, P("data"))))(x8)
  want_q, want_s = ref.swiglu_quant(x8, w8, ws, xs, ref.group_bounds(sizes, 1), scenario="A8W8")
  np.testing.assert_array_equal(q, want_q)
  np.testing.assert_allclose(qs, want_s, rtol=2e-6)
  wsc = npu_ops.weight_scale_from_amax(jnp.asarray(w))
  qat = lambda a: npu_ops.fake_quant_gmm_swiglu_quant(a, w, wsc, gs, group_list_type=1,
                                                      implementation=implementation)
  got = jax.jit(jax.shard_map(lambda a: (qat(a), jax.grad(lambda a: qat(a).sum())(a)),
                              mesh=mesh, in_specs=rows, out_specs=(rows, rows)))(x)
  want = jax.jit(lambda a: (qat(a), jax.grad(lambda a: qat(a).sum())(a)))(x)
  for a, b in zip(got, want):  # the same program on one device: the same numbers
    np.testing.assert_array_equal(a, b)


def test_grad_check_grads_and_vmap():
  x, w = operands(7, 12, 6, 4, 3, np.float32)
  sizes = jnp.asarray([4, 0, 8])
  f = lambda a, b: npu_ops.grouped_matmul(a, b, sizes)
  # f is bilinear, so central differences are exact up to rounding even with a large eps.
  jax.test_util.check_grads(f, (x, w), order=1, modes=["rev"], eps=0.1, atol=1e-3, rtol=1e-3)
  xs = np.stack([x, 2 * x])
  g = jax.vmap(jax.grad(lambda a: jnp.sum(f(a, w) ** 2)))(xs)
  np.testing.assert_allclose(g[1], 2 * g[0], rtol=1e-4, atol=1e-4)  # d(f^2)/da is linear in a


def test_errors():
  x, w = operands(6, 8, 4, 4, 2, np.int8)
  with pytest.raises(ValueError, match="lhs: expected rank 2"):
    npu_ops.grouped_matmul(x[None], w, [4, 4])
  with pytest.raises(ValueError, match="rhs"):
    npu_ops.grouped_matmul(x, w[:, :3], [4, 4])
  with pytest.raises(TypeError, match="rhs"):
    npu_ops.grouped_matmul(x, w.astype(np.complex64), [4, 4])
  with pytest.raises(ValueError, match="group_sizes"):
    npu_ops.grouped_matmul(x, w, [4, 4, 0])
  with pytest.raises(ValueError, match="implementation"):
    npu_ops.grouped_matmul(x, w, [4, 4], implementation="cuda")
  with pytest.raises(NotImplementedError, match="pallas_tpu") as info:
    npu_ops.grouped_matmul(x.astype(np.float16), w.astype(np.float16), [4, 4],
                           implementation="pallas_tpu")
  assert "or 'pallas_gpu'" in str(info.value)  # suggested: the GPU kernel takes float16
  with pytest.raises(ValueError, match="block_m"):
    npu_ops.GmmBlockSizes(block_m=24)


def draw_group_sizes(data, m, g):
  """g group sizes (empty groups likely) whose total is at most m."""
  sizes = data.draw(st.lists(st.integers(0, m), min_size=g, max_size=g))
  total = sum(sizes)
  return [s * m // total for s in sizes] if total > m else sizes


@given(m=st.integers(1, 70), g=st.integers(1, 5), data=st.data(),
       bm=st.sampled_from([1, 4, 16, 64]), seed=st.integers(0, 1000))
def test_property_dynamic_int8(m, g, data, bm, seed):
  sizes = draw_group_sizes(data, m, g)
  x, w = operands(seed, m, 16, 8, g, np.int8)
  block = npu_ops.GmmBlockSizes(block_m=bm, min_block_m=max(1, bm // 4))
  got = npu_ops.grouped_matmul(x, w, jnp.asarray(sizes), block_sizes=block)
  np.testing.assert_array_equal(got, ref.grouped_matmul(x, w, ref.group_bounds(sizes, 1)))


def tgmm_ref(lhs, rhs, sizes, num_groups, acc=np.int64):
  out = np.zeros((num_groups, lhs.shape[1], rhs.shape[1]), acc)
  for g, (s, e) in enumerate(ref.group_bounds(sizes, 1)):
    out[g] = lhs[s:e].astype(acc).T @ rhs[s:e].astype(acc)
  return out


# Near-uniform sizes take tgmm's batched windows of 25 rows (+ overflow rows, + rows outside
# every group); [0, 0, 0, 100] and [0, 0, 0, 0] the traversal (see `tgmm_plan`). k = n = 64:
# windows of 25 rows take under a quarter of the output's bytes, as the path needs.
@pytest.mark.parametrize("sizes", [[10, 0, 37, 53], [0, 0, 0, 100], [3, 4, 5, 6], [0, 0, 0, 0],
                                   [30, 25, 20, 25], [25, 25, 25, 24]])
@pytest.mark.parametrize("block_sizes", BLOCKS, ids=str)
def test_tgmm_int8_exact(sizes, block_sizes):
  rng = np.random.default_rng(7)
  x = rng.integers(-128, 128, (100, 64)).astype(np.int8)
  dy = rng.integers(-128, 128, (100, 64)).astype(np.int8)
  want = tgmm_ref(x, dy, sizes, 5)
  for gs in (sizes, jnp.asarray(sizes)):
    for impl in ("xla", "reference"):
      got = npu_ops.tgmm(x, dy, gs, num_groups=5, block_sizes=block_sizes, implementation=impl)
      assert got.dtype == jnp.int32 and got.shape == (5, 64, 64)
      np.testing.assert_array_equal(got, want)


# m = 100, 4 groups: windows of 25 and 50 rows; blocks of 64 rows (block_rows(100)), 40 rows
# per block. Costs by hand (rows + 40 per block): [25]*4: 100 | 200 | 100+160;
# [46, 46, 4, 4]: 100+42+80 | 200 | 260; [0, 0, 0, 100]: 100+75+80 | 200+50+40 | 100+80.
@pytest.mark.parametrize("sizes,plan", [([25, 25, 25, 25], 0), ([46, 46, 4, 4], 1),
                                        ([0, 0, 0, 100], 2)])
def test_tgmm_takes_the_cheapest_cover(sizes, plan):
  """Windows of m / groups rows, of twice that, or the traversal: each exact."""
  from npu_ops._src import grouped as grouped_lib
  assert grouped_lib.tgmm_plan(np.asarray(sizes), (25, 50), 64) == plan
  assert int(jax.jit(grouped_lib.tgmm_plan, static_argnums=(1, 2))(
      jnp.asarray(sizes, jnp.int32), (25, 50), 64)) == plan
  rng = np.random.default_rng(3)
  x = rng.integers(-128, 128, (100, 128)).astype(np.int8)  # k = n = 128: both windows fit
  dy = rng.integers(-128, 128, (100, 128)).astype(np.int8)
  want = tgmm_ref(x, dy, sizes, 5)
  for gs in (sizes, jnp.asarray(sizes)):
    np.testing.assert_array_equal(npu_ops.tgmm(x, dy, gs, num_groups=5), want)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (ml_dtypes.bfloat16, 1e-2)])
@pytest.mark.parametrize("sizes", [[7, 0, 20, 3], [12, 10, 8, 10]])  # traversal, windows
def test_tgmm_float_is_the_weight_gradient(dtype, tol, sizes):
  """tgmm(x, dy) is d/dW of sum(grouped_matmul(x, W) * dy)."""
  x, w = operands(8, 40, 96, 96, 4, dtype)  # k = n = 96: windows fit (see above)
  dy = np.random.default_rng(9).normal(size=(40, 96)).astype(dtype)
  want = tgmm_ref(x, dy, sizes, 4, acc=np.float64)
  got = npu_ops.tgmm(x, dy, jnp.asarray(sizes))
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=tol * np.abs(want).max())
  grad = jax.grad(lambda w: jnp.sum(npu_ops.grouped_matmul(
      jnp.asarray(x, jnp.float32), w, sizes, implementation="reference") * dy.astype(np.float32))
  )(jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(grad, want, atol=tol * np.abs(want).max())


@given(m=st.integers(1, 70), g=st.integers(1, 5), data=st.data(),
       bm=st.sampled_from([1, 4, 16, 64]), seed=st.integers(0, 1000))
def test_property_tgmm_dynamic(m, g, data, bm, seed):
  sizes = draw_group_sizes(data, m, g)
  rng = np.random.default_rng(seed)
  x = rng.integers(-128, 128, (m, 8)).astype(np.int8)
  dy = rng.integers(-128, 128, (m, 4)).astype(np.int8)
  block = npu_ops.GmmBlockSizes(block_m=bm, min_block_m=max(1, bm // 4))
  got = npu_ops.tgmm(x, dy, jnp.asarray(sizes), block_sizes=block)
  np.testing.assert_array_equal(got, tgmm_ref(x, dy, sizes, g))


@pytest.mark.parametrize("static", [True, False])
def test_no_rows(static):
  """m = 0: gmm gives [0, n], tgmm gives zero matrices (no block is run)."""
  sizes = [0, 0] if static else jnp.asarray([0, 0], jnp.int32)
  x = np.zeros((0, 16), np.float32)
  w = np.ones((2, 16, 8), np.float32)
  assert npu_ops.grouped_matmul(x, w, sizes).shape == (0, 8)
  got = npu_ops.tgmm(x, np.zeros((0, 8), np.float32), sizes, num_groups=3)
  np.testing.assert_array_equal(got, np.zeros((3, 16, 8), np.float32))


@pytest.mark.parametrize("row_macs", [None, 1 << 20, (1 << 20) - 1, 64])
@pytest.mark.parametrize("block,min_block", [(b, mb) for b in (1, 2, 8, 16, 512, 2048)
                                             for mb in (1, 8, 32, 128) if mb <= b])
def test_remainder_blocks_cover_every_remainder_tightly(block, min_block, row_macs):
  """One masked block covers a group's last rows: the smallest ladder size that fits
  computes under a quarter (+ 8 rows, + min_block) more rows than it needs where a row
  costs 2^20 multiply-adds or more (or the cost is not given), else under the rows it
  needs (+ min_block), with one size per octave."""
  sizes = npu_ops._src.row_blocks.remainder_blocks(block, min_block, row_macs)
  assert list(sizes) == sorted(set(sizes)) and sizes[0] == min_block and sizes[-1] == block
  dense = row_macs is None or row_macs >= 1 << 20
  if not dense:
    assert all(s & (s - 1) == 0 for s in sizes), sizes  # powers of two: one per octave
  for rest in range(1, block + 1):
    fit = min(s for s in sizes if s >= rest)
    assert fit - rest < max(min_block, rest // 4 + 8 if dense else rest), (rest, fit)


@pytest.mark.parametrize("dynamic", [False, True])
def test_large_weights_take_the_dense_ladder_exactly(dynamic):
  """k x n = 2^20: the remainder ladder of four sizes per octave (the tests' other shapes
  take one per octave); int8 products, exact, remainders of many sizes, an empty group."""
  sizes = [1, 37, 0, 130, 90]
  rng = np.random.default_rng(11)
  x = rng.integers(-128, 128, (sum(sizes), 1024), dtype=np.int8)
  w = rng.integers(-128, 128, (len(sizes), 1024, 1024), dtype=np.int8)
  gs = jnp.asarray(sizes) if dynamic else sizes
  got = npu_ops.grouped_matmul(x, w, gs, block_sizes=npu_ops.GmmBlockSizes(128, 2))
  want = ref.grouped_matmul(x, w, ref.group_bounds(sizes, 1), out_dtype=np.int64)
  np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("block_sizes", BLOCKS[:3], ids=str)
def test_non_finite_rows_stay_in_their_group(dynamic, block_sizes):
  """Masked blocks reach into other groups' rows and past the groups: inf / NaN there
  must not reach another group's result (gmm rows, tgmm matrices)."""
  sizes = [7, 0, 20, 3]  # rows 30..39 belong to no group
  x, w = operands(3, 40, 16, 8, 4, np.float32)
  dy = np.random.default_rng(4).normal(size=(40, 8)).astype(np.float32)
  x[30:], dy[30:] = np.nan, np.inf  # outside every group
  x[2, 5] = np.inf  # inside group 0: only group 0's results may be non-finite
  gs = jnp.asarray(sizes) if dynamic else sizes
  with np.errstate(invalid="ignore", over="ignore"):
    want_y = ref.grouped_matmul(x, w, ref.group_bounds(sizes, 1), out_dtype=np.float64)
    want_dw = tgmm_ref(x, dy, sizes, 4, acc=np.float64)
  y = npu_ops.grouped_matmul(x, w, gs, block_sizes=block_sizes)
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  assert np.isfinite(np.asarray(y)[3:]).all()
  dw = npu_ops.tgmm(x, dy, gs, block_sizes=block_sizes)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-4)
  assert np.isfinite(np.asarray(dw)[1:]).all()


def test_reference_keeps_non_finite_rows_in_their_group():
  """The reference path too: an inf in one group's rows (or in no group's) of either
  operand of tgmm, and so of the weight gradient, leaves the other groups finite."""
  x, dy = np.ones((9, 2), np.float32), np.ones((9, 3), np.float32)
  dy[4], x[8] = np.inf, np.inf  # row 4: group 1; row 8: no group
  want = np.stack([np.full((2, 3), 3.0), np.full((2, 3), np.inf), np.zeros((2, 3))])
  with np.errstate(invalid="ignore"):
    for impl in ("xla", "reference"):
      np.testing.assert_array_equal(npu_ops.tgmm(x, dy, [3, 3, 0], implementation=impl), want)
      f = lambda w: jnp.vdot(npu_ops.grouped_matmul(x[:6], w, [3, 3], implementation=impl),
                             dy[:6])
      gw = jax.grad(f)(np.ones((2, 2, 3), np.float32))
      np.testing.assert_array_equal(gw[0], np.full((2, 3), 3.0))


@pytest.mark.parametrize("precision", ["highest", jax.lax.Precision.HIGH,
                                       ("highest", jax.lax.Precision.DEFAULT)])
def test_precision_reaches_every_product(precision):
  """As ragged_dot's: the forward and both VJP products carry it (XLA path and kernel)."""
  x, w = operands(4, 40, 16, 8, 3, np.float32)
  sizes = jnp.asarray([10, 0, 30])
  want = ref.grouped_matmul(x, w, ref.group_bounds([10, 0, 30], 1), out_dtype=np.float64)
  pair = precision if isinstance(precision, tuple) else (precision, precision)
  names = sorted(jax.lax.Precision(p).name for p in pair)
  for impl in ("xla", "pallas_tpu") if precision == "highest" else ("xla",):
    f = lambda x, w: npu_ops.grouped_matmul(x, w, sizes, precision=precision,
                                            implementation=impl, interpret=impl != "xla")
    np.testing.assert_allclose(f(x, w), want, rtol=1e-5, atol=1e-5)
    if impl == "xla":
      text = jax.jit(jax.value_and_grad(lambda x, w: f(x, w).sum(), (0, 1))).lower(x, w).as_text()
      # forward, dlhs and the weight gradient: every dot_general carries the pair
      dots = [line for line in text.splitlines() if "dot_general" in line]
      got = [sorted(re.search(r"precision = \[(\w+), (\w+)\]", d).groups()) for d in dots]
      assert len(dots) >= 3 and all(g == names for g in got), got


# --- a drop-in for ragged_dot: its positional arguments, result dtypes and precisions ---------

def test_signature_starts_as_ragged_dots():
  """The six arguments ragged_dot takes positionally, in its order."""
  import inspect  # noqa: PLC0415
  ours = list(inspect.signature(npu_ops.grouped_matmul).parameters)[:6]
  theirs = list(inspect.signature(jax.lax.ragged_dot).parameters)[:6]
  assert ours == theirs == ["lhs", "rhs", "group_sizes", "precision", "preferred_element_type",
                            "group_offset"]
  x, w = operands(9, 12, 8, 4, 2, np.float32)
  got = npu_ops.grouped_matmul(x, w, jnp.asarray([5, 4]), "highest", jnp.bfloat16)
  assert got.dtype == jnp.bfloat16
  want = ref.grouped_matmul(x, w, ref.group_bounds([5, 4], 1), out_dtype=np.float64)
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2 ** -8, atol=2 ** -8)


FLOATS = [np.float32, ml_dtypes.bfloat16, np.float16]


@pytest.mark.parametrize("lhs_dtype", FLOATS + [np.int8, ml_dtypes.int4])
@pytest.mark.parametrize("rhs_dtype", FLOATS + [np.int8])
def test_dtypes_as_ragged_dot(lhs_dtype, rhs_dtype):
  """Every operand pair ragged_dot takes: its result dtype (int32, not its int8, for an
  integer pair), and the products of the values as given, accumulated in float32 and
  rounded once (bound: k float32 roundings of the sum of |products|, and one rounding
  of the result type)."""
  rng = np.random.default_rng(10)
  ints = lambda d, shape: rng.integers(-8 if d == ml_dtypes.int4 else -128,
                                       8 if d == ml_dtypes.int4 else 128, shape).astype(d)
  make = lambda d, shape: (rng.normal(size=shape).astype(d) if d in FLOATS else ints(d, shape))
  x, w = make(lhs_dtype, (20, 16)), make(rhs_dtype, (3, 16, 8))
  sizes = [6, 0, 11]
  got = npu_ops.grouped_matmul(x, w, jnp.asarray(sizes))
  int_pair = lhs_dtype not in FLOATS and rhs_dtype not in FLOATS
  theirs = jax.lax.ragged_dot(jnp.asarray(x), jnp.asarray(w), jnp.asarray(sizes)).dtype
  assert got.dtype == (np.int32 if int_pair else theirs), (got.dtype, theirs)
  want = ref.grouped_matmul(x.astype(np.float64), w.astype(np.float64),
                            ref.group_bounds(sizes, 1), out_dtype=np.float64)
  if int_pair:
    np.testing.assert_array_equal(got, want.astype(np.int32))
    return
  magnitude = ref.grouped_matmul(np.abs(x.astype(np.float64)), np.abs(w.astype(np.float64)),
                                 ref.group_bounds(sizes, 1), out_dtype=np.float64)
  bound = 16 * 2.0 ** -24 * magnitude + float(jnp.finfo(got.dtype).eps) * np.abs(want)
  assert (np.abs(np.asarray(got, np.float64) - want) <= bound).all()


@pytest.mark.parametrize("dynamic", [False, True])
def test_float_activations_integer_weights_differentiate(dynamic):
  """bf16 x int8 (weight-only quantization): the lhs gradient is dy @ w^T per group, exact
  integers in the weight; the weight, an integer, has none to give."""
  x, _ = operands(12, 24, 16, 8, 3, np.float32)
  _, wi = operands(12, 24, 16, 8, 3, np.int8)
  x = x.astype(ml_dtypes.bfloat16)
  dy = np.random.default_rng(13).normal(size=(24, 8)).astype(np.float32)
  sizes = [9, 3, 10]
  gs = jnp.asarray(sizes) if dynamic else sizes
  f = lambda a: jnp.vdot(npu_ops.grouped_matmul(a, wi, gs, preferred_element_type=jnp.float32),
                         dy)
  gx = jax.jit(jax.grad(f))(x)
  want = np.zeros((24, 16))
  for g, (s, e) in enumerate(ref.group_bounds(sizes, 1)):
    want[s:e] = dy[s:e].astype(np.float64) @ wi[g].T.astype(np.float64)
  assert gx.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(gx, np.float64), want, rtol=2 ** -8,
                             atol=2 ** -8 * np.abs(want).max())


@pytest.mark.parametrize("preset", ["F32_F32_F32", jax.lax.DotAlgorithmPreset.BF16_BF16_F32_X3])
def test_dot_algorithm_presets(preset):
  """A DotAlgorithmPreset (or its name), as ragged_dot takes it: every product of the XLA
  path carries it (forward, both gradients); the kernels, which take Precision values,
  decline it by name and leave it to XLA under implementation=None."""
  x, w = operands(14, 30, 16, 8, 3, np.float32)
  sizes = jnp.asarray([10, 0, 18])
  want = ref.grouped_matmul(x, w, ref.group_bounds([10, 0, 18], 1), out_dtype=np.float64)
  f = lambda x, w: npu_ops.grouped_matmul(x, w, sizes, preset)
  np.testing.assert_allclose(f(x, w), want, rtol=1e-5, atol=1e-5)
  text = jax.jit(jax.value_and_grad(lambda x, w: f(x, w).sum(), (0, 1))).lower(x, w).as_text()
  dots = [line for line in text.splitlines() if "dot_general" in line]
  name = jax.lax.DotAlgorithmPreset[preset] if isinstance(preset, str) else preset
  lhs_type = {"F32_F32_F32": "f32", "BF16_BF16_F32_X3": "bf16"}[name.name]
  assert len(dots) >= 3 and all(f"lhs_precision_type = {lhs_type}" in d for d in dots), dots
  with pytest.raises(NotImplementedError, match="dot algorithm"):
    npu_ops.grouped_matmul(x, w, sizes, preset, implementation="pallas_tpu", interpret=True)
  with pytest.raises(NotImplementedError, match="dot algorithm"):
    npu_ops.tgmm(x, x, sizes, precision=preset, implementation="pallas_gpu", interpret=True)


def test_precision_is_validated():
  x, w = operands(4, 8, 16, 8, 2, np.float32)
  for bad in ("fast", 3, ("high",)):
    with pytest.raises(ValueError, match="precision"):
      npu_ops.grouped_matmul(x, w, [4, 4], precision=bad)


# --- every transform: gmm and tgmm are bilinear primitives (jvp rule + transposes) ---------

AD_SIZES = [5, 0, 11]  # 20 rows: 4 past the total


def ad_operands():
  rng = np.random.default_rng(11)
  f = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return f(20, 6), f(3, 6, 4), f(20, 6), f(3, 6, 4)


def close(got, want):
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=1e-4,
                             atol=1e-4 * max(1.0, np.abs(want).max()))


@pytest.mark.parametrize("implementation,dynamic", [("xla", False), ("xla", True),
                                                    ("pallas_tpu", True)])
def test_jvp_jacfwd_and_second_order(implementation, dynamic):
  x, w, dx, dw = ad_operands()
  sizes = jnp.asarray(AD_SIZES) if dynamic else AD_SIZES
  bounds = ref.group_bounds(AD_SIZES, 1)
  f = lambda x, w: npu_ops.grouped_matmul(x, w, sizes, implementation=implementation,
                                          interpret=implementation != "xla")
  gmm64 = lambda a, b: ref.grouped_matmul(np.asarray(a), np.asarray(b), bounds, np.float64)
  out, tangent = jax.jvp(f, (x, w), (dx, dw))
  close(out, gmm64(x, w))
  close(tangent, gmm64(dx, w) + gmm64(x, dw))  # bilinear
  if implementation == "xla":  # (vmapped jvp and vjp: the kernels run them the same way)
    np.testing.assert_allclose(jax.jacfwd(f)(x, w), jax.jacrev(f)(x, w), rtol=1e-5, atol=1e-5)
  # d/dx sum(d/dx sum(f^2)) = 2 W_g W_g^T 1 for each row of group g, 0 outside every group
  hess = jax.grad(lambda x: jnp.sum(jax.grad(lambda x: jnp.sum(f(x, w) ** 2))(x)))(x)
  want = np.zeros((20, 6))
  for g, (s, e) in enumerate(bounds):
    wg = np.asarray(w[g], np.float64)
    want[s:e] = 2 * wg @ wg.T @ np.ones(6)
  close(hess, want)


@pytest.mark.parametrize("dynamic", [False, True])
def test_tgmm_grad_and_jvp(dynamic):
  x, _, dx, _ = ad_operands()
  y = x[:, :4] * 3 - 1
  sizes = jnp.asarray(AD_SIZES) if dynamic else AD_SIZES
  bounds = ref.group_bounds(AD_SIZES, 1)
  t = lambda x, y: npu_ops.tgmm(x, y, sizes)
  out = np.stack([np.asarray(x[s:e], np.float64).T @ np.asarray(y[s:e], np.float64)
                  for s, e in bounds])
  gx, gy = jax.grad(lambda x, y: jnp.sum(t(x, y) ** 2), (0, 1))(x, y)
  want_x, want_y = np.zeros((20, 6)), np.zeros((20, 4))
  for g, (s, e) in enumerate(bounds):  # dL/dX_g = 2 Y_g out_g^T, dL/dY_g = 2 X_g out_g
    want_x[s:e] = 2 * np.asarray(y[s:e], np.float64) @ out[g].T
    want_y[s:e] = 2 * np.asarray(x[s:e], np.float64) @ out[g]
  close(gx, want_x)
  close(gy, want_y)
  _, tangent = jax.jvp(t, (x, y), (dx, y))
  want_t = np.stack([np.asarray(dx[s:e], np.float64).T @ np.asarray(y[s:e], np.float64)
                     for s, e in bounds]) + out
  close(tangent, want_t)


def test_vmap_of_grad_and_grad_of_vmap():
  x, w, _, _ = ad_operands()
  sizes = jnp.asarray(AD_SIZES)
  f = lambda x, w: npu_ops.grouped_matmul(x, w, sizes)
  xs = jnp.stack([x, 2 * x])
  per = jax.vmap(jax.grad(lambda x, w: jnp.sum(f(x, w) ** 2), 1), in_axes=(0, None))(xs, w)
  for i in range(2):
    close(per[i], np.asarray(jax.grad(lambda w: jnp.sum(f(xs[i], w) ** 2))(w)))
  total = jax.grad(lambda w: jnp.sum(jax.vmap(f, in_axes=(0, None))(xs, w) ** 2))(w)
  close(total, np.asarray(per[0] + per[1], np.float64))


@pytest.mark.parametrize("dynamic", [False, True])
def test_strict_dtype_and_rank_promotion(dynamic):
  """As peers' suites run: no implicit promotion inside, under jit, grad, jvp and vmap."""
  x, w, _, _ = ad_operands()
  y = x[:, :4]
  xi, wi = operands(5, 20, 6, 4, 3, np.int8)
  sizes = jnp.asarray(AD_SIZES) if dynamic else AD_SIZES
  bounds = ref.group_bounds(AD_SIZES, 1)
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
    close(jax.jit(lambda x, w: npu_ops.grouped_matmul(x, w, sizes))(x, w),
          ref.grouped_matmul(np.asarray(x), np.asarray(w), bounds, np.float64))
    np.testing.assert_array_equal(npu_ops.grouped_matmul(xi, wi, sizes),
                                  ref.grouped_matmul(xi, wi, bounds))
    _, gw = jax.grad(lambda x, w: jnp.sum(npu_ops.grouped_matmul(x, w, sizes)), (0, 1))(x, w)
    close(gw, np.stack([np.asarray(x[s:e], np.float64).sum(0)[:, None] * np.ones(4)
                        for s, e in bounds]))
    close(npu_ops.tgmm(x, y, sizes), np.stack([np.asarray(x[s:e], np.float64).T
                                               @ np.asarray(y[s:e], np.float64)
                                               for s, e in bounds]))
    jax.jvp(lambda x: npu_ops.tgmm(x, y, sizes), (x,), (x,))
    jax.vmap(lambda x: npu_ops.grouped_matmul(x, w, sizes))(jnp.stack([x, x]))


@pytest.mark.parametrize("block_m,min_block_m", [(8, 2), (32, 4), (128, 16)])
@pytest.mark.parametrize("sizes", [[300, 0, 37, 1], [0, 2, 0, 411], [5, 130, 64, 65], [0, 0, 0, 0],
                                   [1, 1, 1, 447], [10, 0, 0, 440]])
def test_staged_traversal_finishes_every_row_once_with_its_group(block_m, min_block_m, sizes):
  """row_blocks.traverse_staged (the fused op's loop): each row of a group is finished with
  its group's context and its own product, rows of no group are never written; blocks of
  8-128 rows make full blocks, remainders, windows clamped at m and chunks of every kind."""
  m = 450
  rng = np.random.default_rng(7)
  x = rng.integers(-50, 50, (m, 3)).astype(np.int32)
  w = rng.integers(-50, 50, (len(sizes), 3, 5)).astype(np.int32)
  ends = np.minimum(np.cumsum(sizes), m).astype(np.int32)

  def dot_fn(ctx, r0, bl):
    return jax.lax.dynamic_slice_in_dim(jnp.asarray(x), r0, bl) @ ctx[0]

  def finish_fn(out, ctx, r0, rows, valid):  # row + 1000 * (group + 1), masked
    return npu_ops._src.row_blocks.write_rows(out, rows + 1000 * (ctx[1] + 1), r0, valid)

  out = jax.jit(lambda e: npu_ops._src.row_blocks.traverse_staged(
      e, m, jnp.full((m, 5), -7, jnp.int32), row=jax.ShapeDtypeStruct((5,), jnp.int32),
      group_ctx=lambda g: (jnp.asarray(w)[g], g), dot_fn=dot_fn, finish_fn=finish_fn,
      block_sizes=npu_ops.GmmBlockSizes(block_m, min_block_m)))(jnp.asarray(ends))
  want = np.full((m, 5), -7, np.int64)
  start = 0
  for g, end in enumerate(ends):
    want[start:end] = x[start:end].astype(np.int64) @ w[g] + 1000 * (g + 1)
    start = end
  np.testing.assert_array_equal(np.asarray(out), want)
