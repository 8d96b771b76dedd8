"""Quant-aware training rules (semantics A.4) against NumPy and jax.test_util.check_grads."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import npu_ops
from npu_ops._src import qat

import numpy_reference as ref
from helpers import assert_int8_equal, assert_scale_close

QMAX = {8: 127.0, 4: 7.0}


def ste_quant(x, scale, residual, qmax):
  """The STE-defined function: the rounding residual is a constant, the rest is smooth."""
  v = x / scale
  return scale * jnp.where(jnp.abs(v) <= qmax, v + residual, jnp.sign(v) * qmax)


def residual_at(x, scale):
  v = np.asarray(x, np.float32) * (np.float32(1) / np.asarray(scale, np.float32))
  return jnp.asarray(np.rint(v) - v)


def vjp_of(f, args, g):
  """f(*args) and its vjp with cotangent g, under one jit (op-by-op would compile each op)."""
  def run(args, g):
    out, pullback = jax.vjp(f, *args)
    return out, pullback(g)
  return jax.jit(run)(tuple(args), g)


# ----- fake_quant: LSQ --------------------------------------------------------------------

SCALE_LAYOUTS = {  # x [6, 10] with a scale per tensor / channel / token
    "tensor": (), "channel": (10,), "token": (6, 1)}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("layout", list(SCALE_LAYOUTS))
def test_fake_quant_forward_and_vjp_against_numpy(bits, layout):
  rng = np.random.default_rng(bits)
  x = rng.normal(size=(6, 10)).astype(np.float32) * 3
  # a scale that clips some values: the clipped branch of both rules is exercised
  scale = rng.uniform(0.5, 1.5, SCALE_LAYOUTS[layout]).astype(np.float32) * 4 / QMAX[bits]
  g = rng.normal(size=x.shape).astype(np.float32)
  y, (dx, ds) = vjp_of(functools.partial(qat.fake_quant, bits=bits), (x, scale), g)
  want_y, want_dx, want_ds = ref.lsq(x, scale, g, QMAX[bits])
  np.testing.assert_array_equal(np.asarray(y), want_y)
  np.testing.assert_array_equal(np.asarray(dx), want_dx)
  np.testing.assert_allclose(np.asarray(ds), want_ds, rtol=1e-5, atol=1e-5)
  codes = np.asarray(npu_ops.quantize(x, scale, bits=bits))  # the public name of the codes
  assert np.abs(codes).max() == QMAX[bits]  # some values are clipped
  np.testing.assert_array_equal(codes * scale, want_y)


def test_fake_quant_grad_scale_and_bfloat16():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(8, 4)).astype(np.float32)
  scale = np.full((4,), 0.02, np.float32)
  g = np.ones_like(x)
  _, (_, ds) = vjp_of(lambda x, s: qat.fake_quant(x, s, grad_scale=0.25), (x, scale), g)
  np.testing.assert_allclose(np.asarray(ds), 0.25 * ref.lsq(x, scale, g, 127.0)[2], rtol=1e-5)
  y = qat.fake_quant(jnp.asarray(x, jnp.bfloat16), jnp.asarray(scale))
  assert y.dtype == jnp.bfloat16
  xb = np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32)
  np.testing.assert_array_equal(np.asarray(y, np.float32),
                                np.asarray(jnp.asarray(ref.lsq(xb, scale, g, 127.0)[0],
                                                       jnp.bfloat16), np.float32))


@pytest.mark.parametrize("bits", [8, 4])
def test_fake_quant_rules_are_the_gradient_of_the_ste_function(bits):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(5, 7)).astype(np.float32) * 2)
  scale = jnp.asarray(rng.uniform(0.5, 1.5, (7,)).astype(np.float32) * 3 / QMAX[bits])
  r = residual_at(x, scale)
  ste = lambda x, s: ste_quant(x, s, r, QMAX[bits])
  check_grads(ste, (x, scale), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)
  g = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
  y, grads = vjp_of(functools.partial(qat.fake_quant, bits=bits), (x, scale), g)
  want_y, want_grads = vjp_of(ste, (x, scale), g)
  np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
  for got, want in zip(grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_zero_or_negative_scale_gives_zero_codes_not_nan():
  x = jnp.ones((2, 3))
  scale = jnp.array([0.0, -1.0, 0.5])
  y, (dx, ds) = vjp_of(qat.fake_quant, (x, scale), jnp.ones((2, 3)))
  np.testing.assert_array_equal(y, [[0, 0, 1], [0, 0, 1]])
  assert np.isfinite(dx).all() and np.isfinite(ds).all()


# ----- dynamic per-token fake quant --------------------------------------------------------

def test_dynamic_fake_quant_equals_quantize_per_token_bit_for_bit():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(33, 50)).astype(np.float32) * rng.uniform(0.01, 100, (33, 1))
  x[5] = 0  # all-zero row
  q, s = npu_ops.quantize_per_token(jnp.asarray(x))
  want_q, want_s = ref.per_token_int8(x)
  np.testing.assert_array_equal(q, want_q)
  # XLA:CPU turns amax / 127 into amax * (1/127): the scale may differ by 1 ulp
  assert_scale_close(s, want_s, max_ulps=1)
  got = np.asarray(qat.dynamic_fake_quant(jnp.asarray(x)))
  np.testing.assert_array_equal(got, np.asarray(q, np.float32) * np.asarray(s)[:, None])


@pytest.mark.parametrize("bits", [8, 4])
def test_dynamic_fake_quant_vjp_against_numpy(bits):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(9, 12)).astype(np.float32)
  x[2] = 0
  x[4, 3] = -np.abs(x[4]).max() * 2  # a negative amax
  g = rng.normal(size=x.shape).astype(np.float32)
  y, (dx,) = vjp_of(functools.partial(qat.dynamic_fake_quant, bits=bits), (x,), g)
  want_y, want_dx = ref.dynamic_lsq(x, g, QMAX[bits])
  np.testing.assert_allclose(np.asarray(y), want_y, rtol=2e-7, atol=0)  # scale: 1 ulp
  np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(dx)[2], g[2])  # zero row: identity, finite


@pytest.mark.parametrize("bits", [8, 4])
def test_dynamic_fake_quant_vjp_with_tied_maxima(bits):
  """Rows whose largest |x| appears twice (common in bfloat16 or quantized data), at
  values where `amax * fl(qmax / amax)` rounds above qmax: no element lies outside the
  range by construction, so each gets the straight-through g plus its share of the
  scale's term (ties share it, as JAX's max does)."""
  qmax = np.float32(QMAX[bits])
  rng = np.random.default_rng(16)
  a = rng.uniform(1, 2, 4096).astype(np.float32)
  a = a[a * (qmax / a) > qmax][:16]        # float32 arithmetic, as on device
  assert a.size == 16
  x = rng.uniform(-0.9, 0.9, (32, 8)).astype(np.float32) * np.concatenate([a, a])[:, None]
  x[:16, 0], x[:16, 1] = a, -a             # opposite signs
  x[16:, 0], x[16:, 1] = a, a              # the same sign
  g = rng.normal(size=x.shape).astype(np.float32)
  y, (dx,) = vjp_of(functools.partial(qat.dynamic_fake_quant, bits=bits), (x,), g)
  want_y, want_dx = ref.dynamic_lsq(x, g, qmax)
  np.testing.assert_allclose(np.asarray(y), want_y, rtol=2e-7, atol=0)
  np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-6)


def test_dynamic_fake_quant_vjp_of_subnormal_rows(compiler):
  """Rows whose largest |x| is subnormal (which XLA:CPU's arithmetic reads as 0): the
  scale's term still goes to that element alone (ties share it), with its sign; a zero
  row's x gets g alone. (The forward's products flush to 0, as documented.)"""
  x = np.zeros((5, 8), np.float32)
  x[0, :2] = [1e-40, -2e-41]
  x[1, :2] = [-1e-40, 2e-41]
  x[2, :3] = [3e-39, -3e-39, 1e-45]  # a tie of opposite signs
  x[3, :2] = [1e-38, 3e-38]          # normal: the rule as elsewhere
  g = np.random.default_rng(17).normal(size=x.shape).astype(np.float32)
  _, (dx,) = vjp_of(qat.dynamic_fake_quant, (x,), g)
  # ref.dynamic_lsq's float32 qmax / amax overflows here: the rule in float64
  x64, g64 = x.astype(np.float64), g.astype(np.float64)
  amax = np.abs(x64).max(1, keepdims=True)
  v = x64 * (127 / np.where(amax > 0, amax, 1))
  ties = (np.abs(x64) == amax) & (amax > 0)
  dscale = (g64 * (np.round(v) - v)).sum(1, keepdims=True)
  want_dx = g64 + ties * np.sign(x64) * dscale / 127 / np.maximum(ties.sum(1, keepdims=True), 1)
  np.testing.assert_allclose(np.asarray(dx), want_dx, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(dx)[4], g[4])


def test_weight_scale_from_amax_of_subnormal_columns(compiler):
  """amax / qmax correctly rounded for a column whose largest |w| is subnormal (it is no
  zero column); scale 1 where that is no positive float32: every weight 0, an amax / qmax
  that rounds to 0 (a scale of 0 zeroed the column for good: no step size to learn), NaN."""
  w = np.zeros((1, 4, 6), np.float32)
  w[0, :, 0] = [1e-40, -3e-40, 0, 2e-41]
  w[0, :, 1] = [0.5, -2.0, 1.0, 0.0]
  w[0, 1, 3] = -1e-45
  w[0, 2, 4] = np.nan
  w[0, 0, 5] = 1e-43  # / 127 rounds to the least subnormal
  scale = np.asarray(qat.weight_scale_from_amax(jnp.asarray(w)))
  amax = np.abs(w.astype(np.float64)).max(1)
  step = (amax / 127).astype(np.float32)
  with np.errstate(invalid="ignore"):
    want = np.where(step > 0, step, np.float32(1))
  assert list(want[0, 3:]) == [1, 1, 2.0 ** -149]
  np.testing.assert_array_equal(scale.view(np.int32), want.view(np.int32))
  assert 0 < scale[0, 0] < np.finfo(np.float32).tiny


def test_dynamic_fake_quant_rule_is_the_gradient_of_the_ste_function():
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.normal(size=(4, 16)).astype(np.float32))
  amax = np.abs(np.asarray(x)).max(-1, keepdims=True)
  r = residual_at(x, amax / 127)

  def ste(x):
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / 127
    return ste_quant(x, scale, r, 127.0)

  check_grads(ste, (x,), order=1, modes=["rev"], atol=2e-2, rtol=2e-2)
  g = jnp.asarray(rng.normal(size=x.shape).astype(np.float32))
  _, (got,) = vjp_of(qat.dynamic_fake_quant, (x,), g)
  _, (want,) = vjp_of(ste, (x,), g)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# ----- expert weights per channel / per group -----------------------------------------------

@pytest.mark.parametrize("bits,groups", [(8, 1), (4, 1), (4, 4)])
def test_fake_quant_weight_per_channel_and_group(bits, groups):
  rng = np.random.default_rng(6)
  e, k, n = 3, 16, 8
  w = rng.normal(size=(e, k, n)).astype(np.float32)
  scale = np.asarray(qat.weight_scale_from_amax(jnp.asarray(w), groups=groups, bits=bits))
  want_scale = np.abs(w.reshape(e, groups, k // groups, n)).max(2) / np.float32(QMAX[bits])
  np.testing.assert_allclose(scale.reshape(e, groups, n), want_scale, rtol=1e-6)
  g = rng.normal(size=w.shape).astype(np.float32)
  y, (dw, ds) = vjp_of(functools.partial(qat.fake_quant_weight, bits=bits), (w, scale), g)
  w4, s4 = w.reshape(e, groups, k // groups, n), scale.reshape(e, groups, 1, n)
  want_y, want_dw, want_ds = ref.lsq(w4, s4, g.reshape(w4.shape), QMAX[bits])
  np.testing.assert_array_equal(np.asarray(y), want_y.reshape(w.shape))
  np.testing.assert_array_equal(np.asarray(dw), want_dw.reshape(w.shape))
  np.testing.assert_allclose(np.asarray(ds), want_ds.reshape(scale.shape), rtol=1e-4, atol=1e-5)
  codes = np.asarray(qat.quantize_weight(jnp.asarray(w), jnp.asarray(scale), bits=bits))
  assert codes.dtype == np.int8 and np.abs(codes).max() <= QMAX[bits]
  np.testing.assert_array_equal((codes.reshape(w4.shape) * s4).reshape(w.shape), np.asarray(y))


# ----- the fused op's training form ---------------------------------------------------------

def fused_case(seed, m=40, k=32, n=16, e=4, counts=(9, 0, 14, 10), bits=8, groups=1):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(m, k)).astype(np.float32)
  w = (rng.normal(size=(e, k, n)) * 0.2).astype(np.float32)
  scale = np.asarray(qat.weight_scale_from_amax(jnp.asarray(w), groups=groups, bits=bits))
  scale = scale * rng.uniform(0.8, 1.0, scale.shape).astype(np.float32)  # clips some weights
  return x, w, scale, list(counts)


@pytest.mark.parametrize("bits,groups", [(8, 1), (4, 1), (4, 2)])
@pytest.mark.parametrize("dynamic", [False, True])
def test_fused_forward_is_the_integer_op_dequantized(bits, groups, dynamic):
  x, w, scale, counts = fused_case(7, bits=bits, groups=groups)
  gl = jnp.asarray(counts) if dynamic else counts
  got = np.asarray(qat.fake_quant_gmm_swiglu_quant(jnp.asarray(x), jnp.asarray(w),
                                                   jnp.asarray(scale), gl, group_list_type=1,
                                                   weight_bits=bits))
  # NumPy: quantize x per token and w with the scales, then the golden of docs/semantics.md of the int op
  xq, xs = ref.per_token_int8(x)
  s4 = scale.reshape(w.shape[0], groups, 1, w.shape[2])
  wq = ref.lsq(w.reshape(w.shape[0], groups, -1, w.shape[2]), s4, 0 * s4, QMAX[bits])[0] / s4
  wq = np.rint(wq).astype(np.int8).reshape(w.shape)
  bounds = ref.group_bounds(counts, 1)
  scenario = "A8W8" if bits == 8 else "A8W4"
  assist = ref.canonical_assist(wq, scale) if bits == 4 else None
  want_q, want_s = ref.swiglu_quant(xq, wq, scale, xs, bounds, scenario=scenario, assist=assist)
  got_q = np.rint(np.divide(got, want_s[:, None], out=np.zeros_like(got),
                            where=want_s[:, None] > 0))
  assert_int8_equal(got_q, want_q)
  # ... and bit for bit the package's integer op on the same codes, dequantized
  op_w = wq if bits == 8 else jnp.asarray(wq, jnp.int4)
  q, s = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      xq, op_w, scale, xs, gl, group_list_type=1, dequant_mode=0 if groups == 1 else 1)
  assert_scale_close(s, want_s)  # measured 3 ulps at A8W4 G=2 (helpers.SCALE_ULPS)
  np.testing.assert_array_equal(got, np.asarray(q, np.float32) * np.asarray(s)[:, None])


@pytest.mark.parametrize("bits,groups", [(8, 1), (4, 2)])
@pytest.mark.parametrize("dynamic", [False, True])
def test_fused_vjp_against_numpy(bits, groups, dynamic):
  x, w, scale, counts = fused_case(8, bits=bits, groups=groups)
  gl = jnp.asarray(counts) if dynamic else counts
  g = np.random.default_rng(9).normal(size=(x.shape[0], w.shape[2] // 2)).astype(np.float32)
  f = lambda x, w, s: qat.fake_quant_gmm_swiglu_quant(x, w, s, gl, group_list_type=1,
                                                      weight_bits=bits)
  _, (dx, dw, ds) = vjp_of(jax.jit(f), (x, w, scale), g)
  want = ref.qat_swiglu_quant_vjp(x, w, scale, ref.group_bounds(counts, 1), g, QMAX[bits])
  for name, got, want_v in zip(("dx", "dw", "dscale"), (dx, dw, ds), want):
    atol = 1e-4 * np.abs(want_v).max()
    np.testing.assert_allclose(np.asarray(got), want_v, rtol=1e-3, atol=atol, err_msg=name)
  total = sum(counts)
  assert not np.asarray(dx)[total:].any()   # rows outside every group
  assert not np.asarray(dw)[1].any() and not np.asarray(ds)[1].any()  # empty expert


@pytest.mark.parametrize("bits,groups", [(8, 1), (4, 2)])
def test_fused_vjp_of_non_finite_rows_outside_every_group(bits, groups):
  """Rows past the groups (padding, often uninitialised) holding NaN or inf: output 0 there
  and every gradient the NumPy one of the same rows zeroed (the backward's fake quantizers
  multiplied those rows' zero cotangent by their NaN: dx NaN)."""
  x, w, scale, counts = fused_case(8, bits=bits, groups=groups)
  total = sum(counts)  # 33 of 40 rows
  x_bad, x_zero = x.copy(), x.copy()
  x_bad[total], x_bad[total + 1, 3], x_bad[-1, 0] = np.nan, np.inf, -np.inf
  x_zero[total:] = 0
  g = np.random.default_rng(9).normal(size=(x.shape[0], w.shape[2] // 2)).astype(np.float32)
  f = lambda x, w, s: qat.fake_quant_gmm_swiglu_quant(x, w, s, jnp.asarray(counts),
                                                      group_list_type=1, weight_bits=bits)
  out, (dx, dw, ds) = vjp_of(f, (x_bad, w, scale), g)
  want = ref.qat_swiglu_quant_vjp(x_zero, w, scale, ref.group_bounds(counts, 1), g, QMAX[bits])
  assert not np.asarray(out)[total:].any() and not np.asarray(dx)[total:].any()
  for name, got, want_v in zip(("dx", "dw", "dscale"), (dx, dw, ds), want):
    atol = 1e-4 * np.abs(want_v).max()
    np.testing.assert_allclose(np.asarray(got), want_v, rtol=1e-3, atol=atol, err_msg=name)


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16])
def test_swiglu_gradient_where_exp_overflows(dtype):
  """silu(a) = a / (1 + exp(-a)) overflows exp below a = -88.7 (float32, bfloat16; float16:
  -11.1), where differentiating the quotient gives inf / inf. The vjp is silu'(a) * gate *
  g and silu(a) * g, as NumPy computes them in float64 from the formula."""
  a = np.array([-3e4, -200, -100, -89, -20, -12, -5, -0.5, 0, 0.5, 5, 12, 20, 89, 3e4])
  c = np.concatenate([a, np.linspace(-2, 2, a.size)])[None].astype(dtype)
  g = np.full((1, a.size), 0.75, dtype)
  _, (got,) = vjp_of(npu_ops.swiglu, (c,), g)
  c64, g64 = np.asarray(c, np.float64), np.asarray(g, np.float64)
  act, gate = c64[:, :a.size], c64[:, a.size:]
  with np.errstate(over="ignore"):
    want = np.concatenate([g64 * gate * ref.silu_grad(act), g64 * act / (1 + np.exp(-act))], 1)
  got = np.asarray(got, np.float64)
  assert np.isfinite(got).all(), got
  eps = float(jnp.finfo(dtype).eps)
  np.testing.assert_allclose(got, want, rtol=4 * eps, atol=4 * eps * np.abs(want).max())


@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16, np.float16])
def test_swiglu_second_and_third_derivatives(dtype, compiler):
  """Every order stays the formula's, finite: silu'' = s (1 - s) (2 + a (1 - 2 s)) (and its
  derivative), s = sigmoid(a), in float64, times a gate of 3, through reverse over reverse,
  forward over reverse and three reverse passes, out to the dtype's largest negative
  values (where autodiff of silu' multiplied a product of a and the gate, overflowed, by
  the sigmoid's vanishing derivative: 0 * inf)."""
  big = float(jnp.finfo(dtype).max) * 0.9
  a = np.array([-big, -3e4, -200, -20, -5, -0.5, 0, 0.5, 5, 20, 200, big]).astype(dtype)
  act = lambda f: jax.vmap(f)(jnp.asarray(a))
  d1 = jax.grad(lambda v: npu_ops.swiglu(jnp.stack([v, jnp.full((), 3, dtype)]))[0])
  d2, d2_fwd = act(jax.grad(d1)), act(jax.jacfwd(d1))
  d3 = act(jax.grad(jax.grad(d1)))
  x = np.asarray(a, np.float64)
  with np.errstate(over="ignore"):
    s = 1 / (1 + np.exp(-x))
  want2 = 3 * s * (1 - s) * (2 + x * (1 - 2 * s))
  want3 = 3 * s * (1 - s) * ((1 - 2 * s) * (2 + x * (1 - 2 * s)) + (1 - 2 * s)
                             - 2 * x * s * (1 - s))
  eps = float(jnp.finfo(dtype).eps)
  for got, want in ((d2, want2), (d2_fwd, want2), (d3, want3)):
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all(), got
    np.testing.assert_allclose(got, want, rtol=16 * eps, atol=16 * eps)


def test_fused_vjp_where_the_gate_saturates():
  """Products past -88.7 (silu's exp overflows): the training form's vjp stays the
  formula's, finite."""
  x, w, scale, counts = fused_case(14)
  w, scale = w * 100, scale * 100            # products of about +-100
  g = np.random.default_rng(15).normal(size=(x.shape[0], w.shape[2] // 2)).astype(np.float32)
  f = lambda x, w, s: qat.fake_quant_gmm_swiglu_quant(x, w, s, counts, group_list_type=1)
  _, got = vjp_of(f, (x, w, scale), g)
  want = ref.qat_swiglu_quant_vjp(x, w, scale, ref.group_bounds(counts, 1), g, QMAX[8])
  c = ref.grouped_matmul(x, w, ref.group_bounds(counts, 1), np.float64)
  assert (c[:, :w.shape[2] // 2] < -89).any()  # the case is the one named
  for name, got_v, want_v in zip(("dx", "dw", "dscale"), got, want):
    assert np.isfinite(np.asarray(got_v)).all(), name
    np.testing.assert_allclose(np.asarray(got_v), want_v, rtol=1e-3,
                               atol=1e-4 * np.abs(want_v).max(), err_msg=name)


@pytest.mark.slow  # float64 finite differences of the whole chain: ~15 s
def test_fused_vjp_is_the_gradient_of_the_ste_function():
  """check_grads on the chain with every rounding residual frozen, then ours == its vjp."""
  x, w, scale, counts = fused_case(10, m=24, counts=(6, 8, 0, 10))
  bounds = ref.group_bounds(counts, 1)

  def ste_chain(x, w, scale, residuals=None):
    """Returns the chain's output and its rounding residuals (computed where not given)."""
    used = []

    def quant(a, a_scale):
      v = a / a_scale
      r = jax.lax.stop_gradient(jnp.round(v) - v) if residuals is None else residuals[len(used)]
      used.append(r)
      return ste_quant(a, a_scale, r, 127.0)

    row_scale = lambda a: jnp.max(jnp.abs(a), axis=-1, keepdims=True) / 127
    x_hat = quant(x, row_scale(x))
    w_hat = quant(w, scale[:, None, :])
    c = jnp.concatenate([x_hat[lo:hi] @ w_hat[i] for i, (lo, hi) in enumerate(bounds)])
    s = npu_ops.swiglu(c)
    return quant(s, row_scale(s)), used

  with jax.enable_x64(True):  # finite differences of a deep chain need float64
    args64 = tuple(jnp.asarray(a, jnp.float64) for a in (x, w, scale))
    residuals64 = ste_chain(*args64)[1]
    check_grads(jax.jit(lambda *a: ste_chain(*a, residuals64)[0]), args64, order=1, modes=["rev"],
                atol=1e-3, rtol=1e-3, eps=1e-7)
  args = tuple(map(jnp.asarray, (x, w, scale)))
  residuals = ste_chain(*args)[1]
  g = jnp.asarray(np.random.default_rng(11).normal(size=(24, 8)).astype(np.float32))
  _, want = vjp_of(lambda *a: ste_chain(*a, residuals)[0], args, g)
  _, got = vjp_of(lambda x, w, s: qat.fake_quant_gmm_swiglu_quant(x, w, s, counts,
                                                                  group_list_type=1), args, g)
  for got_v, want_v in zip(got, want):
    np.testing.assert_allclose(got_v, want_v, rtol=1e-3, atol=1e-4 * np.abs(want_v).max())


def test_fused_one_compilation_for_dynamic_group_lists():
  x, w, scale, _ = fused_case(12)
  traces = []

  @jax.jit
  def step(gl):
    traces.append(1)
    f = lambda x, w, s: jnp.sum(qat.fake_quant_gmm_swiglu_quant(x, w, s, gl) ** 2)
    return jax.grad(f, argnums=(0, 1, 2))(x, w, scale)

  for counts in ([9, 0, 14, 10], [40, 0, 0, 0], [0, 0, 0, 5]):
    grads = step(jnp.asarray(np.cumsum(counts), jnp.int32))
    assert all(np.isfinite(np.asarray(a)).all() for a in grads)
  assert len(traces) == 1


def test_fused_vmap_over_a_batch():
  x, w, scale, counts = fused_case(13, m=16, counts=(4, 4, 0, 8))
  xb = jnp.stack([jnp.asarray(x), -jnp.asarray(x)])
  f = lambda x: qat.fake_quant_gmm_swiglu_quant(x, w, scale, jnp.asarray(counts),
                                                group_list_type=1)
  got = jax.vmap(f)(xb)
  chex.assert_trees_all_equal(got, jnp.stack([f(xb[0]), f(xb[1])]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(weight_bits=3), "bits"),
    (dict(scale_shape=(4, 2, 16)), "weight_scale"),    # per-group scale with 8 bits
    (dict(scale_shape=(4, 3, 16), weight_bits=4), "weight_scale"),  # 3 does not divide k
    (dict(scale_shape=(3, 16)), "weight_scale"),
    (dict(n=15), "weight"),
    (dict(k_w=16), "weight"),
])
def test_fused_bad_input(kwargs, match):
  kwargs = dict(kwargs)
  n, k_w = kwargs.pop("n", 16), kwargs.pop("k_w", 32)
  scale = jnp.ones(kwargs.pop("scale_shape", (4, n)))
  with pytest.raises(ValueError, match=match):
    qat.fake_quant_gmm_swiglu_quant(jnp.ones((8, 32)), jnp.ones((4, k_w, n)), scale, [8],
                                    **kwargs)


def test_quantizer_bad_input():
  with pytest.raises(TypeError, match="x"):
    qat.fake_quant(jnp.ones((2, 2), jnp.int8), jnp.ones(()))
  with pytest.raises(ValueError, match="scale"):
    qat.fake_quant(jnp.ones((2, 2)), jnp.ones((3,)))
  with pytest.raises(ValueError, match="bits"):
    qat.dynamic_fake_quant(jnp.ones((2, 2)), bits=2)
  with pytest.raises(ValueError, match="groups"):
    qat.weight_scale_from_amax(jnp.ones((2, 6, 4)), groups=4)
  with pytest.raises(ValueError, match="^x: expected rank >= 1"):
    qat.fake_quant_mx(jnp.float32(1.0))
  for fn in (qat.fake_quant, qat.quantize):  # bits is checked with an fp8 dtype too
    with pytest.raises(ValueError, match="bits"):
      fn(jnp.ones((2, 4)), jnp.ones(()), bits=3, dtype=jnp.float8_e4m3fn)
  with pytest.raises(ValueError, match="bits"):
    qat.dynamic_fake_quant(jnp.ones((2, 2)), bits=3, dtype=jnp.float8_e5m2)
  with pytest.raises(ValueError, match="^weight: expected .*k >= 1"):
    qat.weight_scale_from_amax(jnp.zeros((2, 0, 4)))
  with pytest.raises(ValueError, match="^weight_scale: expected finite"):
    qat.fake_quant_gmm_swiglu_quant(jnp.ones((8, 32)), jnp.ones((2, 32, 16)),
                                    jnp.full((2, 16), jnp.inf), [4, 4])
