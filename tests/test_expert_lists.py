"""Weights as a list of per-expert arrays (the torch_npu TensorList form), which the XLA path
reads in place (`row_blocks.group_operand`): every op against the NumPy goldens, for static
and dynamic group lists, with gradients (a tuple of per-expert gradients), vmap, group_offset
and the errors."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import npu_ops
import numpy_reference as ref
from helpers import SCALE_ULPS, assert_scale_close, int4_array
from implementations import IMPLEMENTATIONS, impls
from test_swiglu_quant import check, make_case

SIZES = [9, 0, 30, 14]  # an empty group, 53 of 60 rows grouped


def float_operands(seed, m, k, n, g, dtype=np.float32):
  rng = np.random.default_rng(seed)
  return rng.normal(size=(m, k)).astype(dtype), rng.normal(size=(g, k, n)).astype(dtype)


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("block_sizes", [None, npu_ops.GmmBlockSizes(block_m=8, min_block_m=2)],
                         ids=str)
def test_gmm_int8_list_exact(dynamic, block_sizes):
  rng = np.random.default_rng(0)
  x = rng.integers(-128, 128, (60, 40)).astype(np.int8)
  w = rng.integers(-128, 128, (4, 40, 24)).astype(np.int8)
  sizes = jnp.asarray(SIZES) if dynamic else SIZES
  got = npu_ops.grouped_matmul(x, list(w), sizes, block_sizes=block_sizes)
  assert got.dtype == jnp.int32
  np.testing.assert_array_equal(got, ref.grouped_matmul(x, w, ref.group_bounds(SIZES, 1)))


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (ml_dtypes.bfloat16, 1e-2)])
def test_gmm_float_list(dtype, tol):
  """float32 accumulation, one rounding to the output dtype."""
  x, w = float_operands(1, 60, 32, 16, 4, dtype)
  want = ref.grouped_matmul(x, w, ref.group_bounds(SIZES, 1), out_dtype=np.float64)
  got = jax.jit(npu_ops.grouped_matmul)(x, tuple(w), jnp.asarray(SIZES))
  assert got.dtype == dtype
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol,
                             atol=tol * np.abs(want).max())


@pytest.mark.parametrize("dynamic", [False, True])
def test_gmm_list_grad_against_numpy(dynamic):
  """d lhs = dy @ W_g^T per row, d W_g = x_g^T @ dy_g (a list, like rhs); 0 outside groups."""
  x, w = float_operands(2, 60, 8, 6, 4)
  dy = np.random.default_rng(3).normal(size=(60, 6)).astype(np.float32)
  sizes = jnp.asarray(SIZES) if dynamic else SIZES
  f = lambda a, b: jnp.sum(npu_ops.grouped_matmul(a, b, sizes) * dy)
  gx, gw = jax.jit(jax.grad(f, argnums=(0, 1)))(x, list(w))
  assert isinstance(gw, list) and len(gw) == 4
  want_gx = np.zeros_like(x, np.float64)
  for g, (s, e) in enumerate(ref.group_bounds(SIZES, 1)):
    want_gx[s:e] = dy[s:e].astype(np.float64) @ w[g].T.astype(np.float64)
    want_gw = x[s:e].T.astype(np.float64) @ dy[s:e].astype(np.float64)
    np.testing.assert_allclose(gw[g], want_gw, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, want_gx, rtol=1e-5, atol=1e-5)
  assert not np.any(np.asarray(gw[1])) and not np.any(np.asarray(gx[53:]))


def test_gmm_list_vmap_and_group_offset():
  x, w = float_operands(4, 60, 16, 8, 4)
  bounds = ref.group_bounds(SIZES, 1)
  want = ref.grouped_matmul(x, w, bounds, out_dtype=np.float64)
  xs = np.stack([x, -2 * x])
  got = jax.vmap(lambda a: npu_ops.grouped_matmul(a, list(w), jnp.asarray(SIZES)))(xs)
  np.testing.assert_allclose(got[0], want, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(got[1], -2 * want, rtol=1e-5, atol=1e-4)
  # experts 2 and 3 of 4 on this shard: rows of groups 0 and 1 give 0
  local = npu_ops.grouped_matmul(x, list(w[2:]), jnp.asarray(SIZES), group_offset=2)
  keep = np.zeros((60, 1))
  keep[bounds[2][0]:bounds[3][1]] = 1
  np.testing.assert_allclose(local, want * keep, rtol=1e-5, atol=1e-4)


def test_gmm_list_errors():
  x, w = float_operands(5, 8, 4, 4, 2)
  with pytest.raises(ValueError, match=r"rhs\[1\]: expected the shape and dtype of rhs\[0\]"):
    npu_ops.grouped_matmul(x, [w[0], w[1][:, :2]], [4, 4])
  with pytest.raises(ValueError, match=r"rhs\[0\]: expected rank 2"):
    npu_ops.grouped_matmul(x, [w, w], [4, 4])
  with pytest.raises(ValueError, match="rhs: expected a non-empty list"):
    npu_ops.grouped_matmul(x, [], [4, 4])
  with pytest.raises(ValueError, match=r"rhs: expected \[g, k=4, n\]"):
    npu_ops.grouped_matmul(x, [w[0][:3], w[1][:3]], [4, 4])
  with pytest.raises(TypeError, match="forward-mode"):  # lists differentiate in reverse mode
    jax.jvp(lambda a: npu_ops.grouped_matmul(a, list(w), [4, 4]), (x,), (x,))


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("tuning_config", [None, [4]])  # [4]: the epilogue after the matmul
def test_fused_a8w8_list(dynamic, tuning_config):
  x, w, ws, xs = make_case(6, "A8W8", 60, 64, 48, 4)
  gl = jnp.asarray(SIZES) if dynamic else SIZES
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, list(w), ws, xs, gl, group_list_type=1,
                                                   tuning_config=tuning_config)
  check(got, x, w, ws, xs, SIZES, "A8W8")


@pytest.mark.parametrize("impl", impls("fused_A8W8"))
def test_fused_list_with_an_offset_on_every_implementation(impl):
  """Weight lists and group_offset, on each implementation that declares the case: the
  local experts' rows equal the golden's, the rest 0."""
  x, w, ws, xs = make_case(10, "A8W8", 64, 128, 256, 4)
  counts = [9, 20, 0, 23]  # global groups; this shard holds experts 1 and 2
  q, s = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, list(w[1:3]), list(ws[1:3]), xs, jnp.asarray(counts), group_list_type=1,
      group_offset=jnp.int32(1), **IMPLEMENTATIONS[impl])
  want_q, want_s = ref.swiglu_quant(x, w, ws, xs, ref.group_bounds(counts, 1), scenario="A8W8")
  rows = slice(9, 29)
  np.testing.assert_array_equal(np.asarray(q)[rows], want_q[rows])
  assert_scale_close(np.asarray(s)[rows], want_s[rows], SCALE_ULPS)
  assert not np.asarray(q)[:9].any() and not np.asarray(q)[29:].any()


@pytest.mark.parametrize("impl", impls("gmm_float"))
def test_gmm_list_on_every_implementation(impl):
  x, w = float_operands(11, 64, 128, 128, 4)
  got = npu_ops.grouped_matmul(x, list(w), jnp.asarray(SIZES), precision="highest",
                               **IMPLEMENTATIONS[impl])
  want = ref.grouped_matmul(x, w, ref.group_bounds(SIZES, 1), out_dtype=np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_fused_int4_lists():
  """jnp.int4 per-expert weights: A8W4 (stacked inside, its k groups slice each weight) and
  A4W4."""
  counts = [10, 20, 0, 14]
  x, w, ws, xs = make_case(7, "A8W4", 44, 64, 32, 4, groups=2)
  assist = ref.canonical_assist(w, ws)
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, [int4_array(wi) for wi in w], ws, xs, counts, group_list_type=1, dequant_mode=1)
  check(got, x, w, ws, xs, counts, "A8W4", assist=assist)
  x, w, ws, xs = make_case(8, "A4W4", 44, 64, 32, 4)
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      int4_array(x), [int4_array(wi) for wi in w], ws, xs, jnp.asarray(counts),
      group_list_type=1)
  check(got, x, w, ws, xs, counts, "A4W4")


def test_one_expert_per_group_scales_as_a_list():
  """One expert's per-group scales `[G, n]` as a one-element list (torch_npu's TensorList of
  per-expert tensors) are that expert's, in v2, v1 and weight_assist_matrix: they were read
  as stacked `[e=G, n]` and refused."""
  counts = [30]
  x, w, ws, xs = make_case(9, "A8W4", 36, 64, 32, 1, groups=4)   # ws [1, 4, 32]
  w4, assist = [int4_array(w[0])], ref.canonical_assist(w, ws)
  # float32 sums of the 4 k groups' exact terms (the golden's: float64): G ulps of their sum
  terms = np.abs(8 * w.reshape(1, 4, 16, 32).sum(2) * ws).sum(1)
  np.testing.assert_allclose(npu_ops.weight_assist_matrix(w4, list(ws)), assist, rtol=0,
                             atol=4 * 2.0 ** -24 * terms.max())
  check(npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w4, list(ws), xs, counts,
                                                   group_list_type=1, dequant_mode=1),
        x, w, ws, xs, counts, "A8W4", assist=assist)
  check(npu_ops.npu_grouped_matmul_swiglu_quant(x, w4, counts, list(ws), xs)[:2],
        x, w, ws, xs, counts, "A8W4", assist=assist)


def test_fused_list_one_compilation_and_offset():
  x, w, ws, xs = make_case(9, "A8W8", 60, 32, 16, 4)
  traces = []

  @jax.jit
  def f(x, w, gl):
    traces.append(1)
    return npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws, xs, gl, group_list_type=1)

  for counts in ([10, 10, 12, 0], [0, 60, 0, 0], SIZES):
    check(f(x, list(w), jnp.asarray(counts)), x, w, ws, xs, counts, "A8W8")
  assert len(traces) == 1
  q, s = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, list(w[1:3]), ws[1:3], xs,
                                                    jnp.asarray(SIZES), group_list_type=1,
                                                    group_offset=1)
  want_q, want_s = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w[1:3], ws[1:3], xs, SIZES,
                                                              group_list_type=1, group_offset=1)
  np.testing.assert_array_equal(q, want_q)  # the stacked form is checked against NumPy
  np.testing.assert_array_equal(s, want_s)


def test_fused_list_errors():
  x, w, ws, xs = make_case(10, "A8W8", 8, 32, 16, 2)
  with pytest.raises(ValueError, match=r"weight\[1\]: expected per-expert arrays"):
    npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, [w[0], w[1][:, :8]], ws, xs, [4, 4],
                                               group_list_type=1)
  with pytest.raises(ValueError, match=r"weight\[0\]: expected ND \[k=32, n=16\]"):
    npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, [w[0][:16], w[1][:16]], ws, xs, [4, 4],
                                               group_list_type=1)
