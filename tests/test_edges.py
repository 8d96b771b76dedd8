"""Edges a JAX user hits: symbolic shapes, empty sizes, tiny values, concrete group
lists, and argument errors that name the argument (issue 18, items 5-11)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import npu_ops
import numpy_reference as ref
from helpers import assert_int8_equal, assert_scale_close

fused = npu_ops.npu_grouped_matmul_swiglu_quant_v2
RNG = np.random.default_rng(18)


@pytest.fixture(autouse=True)
def _same_data_in_any_order():
  """Each test draws from a fresh generator: its data does not depend on the test order."""
  global RNG
  RNG = np.random.default_rng(18)


# --- symbolic m (jax.export shape polymorphism) ---------------------------------------------

def _export_and_call(f, args, specs):
  """Exports `f` with symbolic dims `specs` and runs the artifact on `args`."""
  exported = export.export(jax.jit(f))(*export.symbolic_args_specs(args, specs))
  return exported, exported.call(*args)


def test_export_symbolic_m_gmm_tgmm_and_gradients():
  m, k, n, g = 13, 8, 16, 4
  x = RNG.standard_normal((m, k), np.float32)
  w = RNG.standard_normal((g, k, n), np.float32)
  dy = RNG.standard_normal((m, n), np.float32)
  sizes = np.array([3, 0, 4, 2], np.int32)  # total 9 < m: rows 9.. are in no group
  bounds = ref.group_bounds(sizes, 1)
  want = ref.grouped_matmul(x, w, bounds, np.float64)

  exported, got = _export_and_call(npu_ops.grouped_matmul, (x, w, sizes),
                                   ["m, k", "_, k, n", "_"])
  assert str(exported.out_avals[0].shape) == "(m, n)"
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  _, got = _export_and_call(npu_ops.tgmm, (x, dy, sizes), ["m, k", "m, n", "_"])
  want_t = np.stack([x[s:e].T.astype(np.float64) @ dy[s:e] for s, e in bounds])
  np.testing.assert_allclose(got, want_t, rtol=1e-5, atol=1e-5)

  # gradients: dx = dy @ w[g]^T per row, dw = tgmm(x, dy)
  loss = lambda a, b, c, d: jnp.sum(npu_ops.grouped_matmul(a, b, c) * d)
  _, (dx, dw) = _export_and_call(jax.grad(loss, argnums=(0, 1)), (x, w, sizes, dy),
                                 ["m, k", "_, k, n", "_", "m, n"])
  want_dx = ref.grouped_matmul(dy, np.swapaxes(w, 1, 2), bounds, np.float64)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, want_t, rtol=1e-5, atol=1e-5)

  # a batch dim and a static list, symbolic too
  _, got = _export_and_call(jax.vmap(lambda a, b: npu_ops.grouped_matmul(a, b, [3, 0, 4, 2]),
                                     in_axes=(0, None)),
                            (np.stack([x, 2 * x]), w), ["b, m, k", "_, k, n"])
  np.testing.assert_allclose(got[1], 2 * want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scenario", ["A8W8", "A8W4"])
def test_export_symbolic_m_fused_op_bit_exact(scenario):
  m, k, n, e = 12, 32, 16, 3
  x = RNG.integers(-128, 128, (m, k)).astype(np.int8)
  x_scale = RNG.uniform(0.01, 0.02, m).astype(np.float32)
  counts = np.array([5, 0, 4], np.int32)
  if scenario == "A8W8":
    w = RNG.integers(-128, 128, (e, k, n)).astype(np.int8)
    w_scale = RNG.uniform(1e-3, 2e-3, (e, n)).astype(np.float32)
    want_q, want_s = ref.swiglu_quant(x, w, w_scale, x_scale, ref.group_bounds(counts, 1),
                                      scenario="A8W8")
    weight = w
  else:
    w = RNG.integers(-8, 8, (e, k, n)).astype(np.int8)
    w_scale = RNG.uniform(1e-3, 2e-3, (e, 2, n)).astype(np.float32)
    assist = ref.canonical_assist(w, w_scale)
    want_q, want_s = ref.swiglu_quant(x, w, w_scale, x_scale, ref.group_bounds(counts, 1),
                                      scenario="A8W4", assist=assist)
    weight = jnp.asarray(w, jnp.int4)
  f = lambda a, s, gl: fused(a, weight, w_scale, s, gl, group_list_type=1,
                             dequant_mode=1 if scenario == "A8W4" else 0)
  exported, (q, q_scale) = _export_and_call(f, (x, x_scale, counts), ["m, _", "m", "_"])
  assert str(exported.out_avals[0].shape) == "(m, 8)"
  # codes exact; scales within helpers.SCALE_ULPS (XLA's exp vs NumPy's)
  assert_int8_equal(q, want_q)
  assert_scale_close(q_scale, want_s)


def test_symbolic_m_with_a_named_kernel_says_why():
  x, w = np.ones((8, 4), np.float32), np.ones((2, 4, 8), np.float32)
  specs = export.symbolic_args_specs((x, w, np.array([4, 4], np.int32)), ["m, k", "_, k, n", "_"])
  with pytest.raises(ValueError, match="implementation: .*symbolic m"):
    export.export(jax.jit(lambda a, b, c: npu_ops.grouped_matmul(
        a, b, c, implementation="pallas_tpu")))(*specs)


# --- empty sizes --------------------------------------------------------------------------

def test_fused_op_with_n_zero():
  x = np.ones((6, 32), np.int8)
  q, s = fused(x, np.ones((2, 32, 0), np.int8), np.ones((2, 0), np.float32),
               np.ones(6, np.float32), np.array([2, 6]))
  assert q.shape == (6, 0) and q.dtype == jnp.int8
  np.testing.assert_array_equal(s, np.zeros(6, np.float32))


@pytest.mark.parametrize("mode", ["float", "qat", "int8"])
def test_moe_layer_with_zero_tokens(mode):
  nnx = pytest.importorskip("flax.nnx")
  from npu_ops import nn
  layer = nn.MoEMLP(8, 8, 4, top_k=2, mode=mode, rngs=nnx.Rngs(0))
  x = jnp.zeros((0, 8), jnp.float32)
  assert layer(x).shape == (0, 8)
  if mode != "int8":
    assert jax.grad(lambda v: layer(v).sum())(x).shape == (0, 8)


def test_quantize_per_token_empty_row():
  q, s = npu_ops.quantize_per_token(jnp.zeros((3, 0), jnp.float32))
  assert q.shape == (3, 0) and s.shape == (3,) and not np.any(np.asarray(s))


# --- tiny values --------------------------------------------------------------------------

def test_quantize_per_token_tiny_rows(compiler):
  # amax below ~3.7e-37: 127 / amax overflows float32; below ~1.5e-36 the scale is subnormal
  s = np.array([[1e-37, 0, -5e-38, 2.5e-38, 1.2e-38],
                [1e-36, 5e-37, 0, -3e-37, 2e-36],
                [4e-38, 3e-38, -2e-38, 1.5e-38, 0],
                [3.0, 1.0, 0, 0, -2.0]], np.float32)
  # random tiny rows of normal numbers (XLA:CPU treats subnormal inputs as 0)
  tiny = RNG.choice([-1, 1], (8, 5)) * 10.0 ** RNG.uniform(-37.9, -36, (8, 5))
  s = np.concatenate([s, tiny.astype(np.float32)])
  want_q, want_s = ref.per_token_int8(s)
  q, scale = jax.jit(npu_ops.quantize_per_token)(s)
  np.testing.assert_array_equal(q, want_q)
  np.testing.assert_array_equal(scale, want_s)  # subnormal scales exact, not flushed to 0
  assert np.all(want_s[[0, 2]] > 0) and np.all(want_s[[0, 2]] < np.finfo(np.float32).tiny)
  # the row: -5e-38 / 1e-37 is exactly 0.5, so -63.5 rounds half to even (-64)
  np.testing.assert_array_equal(q[0], [127, 0, -64, 32, 15])
  # dequantized (in float64: XLA:CPU arithmetic flushes subnormals) within one step
  deq = np.asarray(q, np.float64) * np.asarray(scale, np.float64)[:, None]
  # (half a step from rounding, plus the subnormal scale's own rounding)
  assert np.all(np.abs(deq - s) <= np.asarray(scale, np.float64)[:, None])


def test_fake_quant_tiny_scales_never_nan(compiler):
  x = jnp.array([0.0, 1e-40, 1e-30, 1.0, -1.0], jnp.float32)
  for scale in (1e-45, 1e-40, 1e-38, 1e-30):
    y = npu_ops.fake_quant(x, jnp.float32(scale))
    g = jax.grad(lambda v, s: npu_ops.fake_quant(v, s).sum(), argnums=(0, 1))(x, jnp.float32(scale))
    assert np.all(np.isfinite(y)) and all(np.all(np.isfinite(t)) for t in g), scale
  # a tiny but normal scale: exact codes
  q = npu_ops._src.qat.quantize(jnp.array([0.0, 1e-37, 2e-36, 1.0], jnp.float32), jnp.float32(2e-38))
  np.testing.assert_array_equal(q, [0, 5, 100, 127])
  assert np.all(np.isfinite(npu_ops.dynamic_fake_quant(jnp.array([[1e-37, 0, -5e-38]]))))


# --- concrete group lists are validated like static ones ------------------------------------

def test_concrete_counts_passed_as_cumsum_raise():
  x, w = np.ones((64, 32), np.int8), np.ones((4, 32, 16), np.int8)
  ws, xs = np.ones((4, 16), np.float32), np.ones(64, np.float32)
  counts = [10, 0, 30, 16]
  for gl in (np.array(counts), jnp.array(counts)):
    with pytest.raises(ValueError, match="group_list: .*group_list_type=1"):
      fused(x, w, ws, xs, gl)
  q, _ = fused(x, w, ws, xs, jnp.array(counts), group_list_type=1)  # what was meant
  # traced: clamped as documented (semantics A.3 item 7), no error
  q_jit, _ = jax.jit(lambda gl: fused(x, w, ws, xs, gl))(jnp.array(counts))
  assert not np.array_equal(q, q_jit)
  with pytest.raises(ValueError, match="group_sizes"):
    npu_ops.grouped_matmul(np.ones((4, 8), np.float32), np.ones((2, 8, 8), np.float32),
                           np.array([3, 2]))


# --- errors that name the argument ------------------------------------------------------------

X, W = np.ones((16, 32), np.int8), np.ones((2, 32, 16), np.int8)
WS, XS, GL = np.ones((2, 16), np.float32), np.ones(16, np.float32), [8, 16]
XF, WF = np.ones((8, 8), np.float32), np.ones((2, 8, 4), np.float32)
SIZES = np.array([4, 4], np.int32)


def _nn():
  nnx = pytest.importorskip("flax.nnx")
  from npu_ops import nn
  return nn, nnx.Rngs(0)


CASES = {
    "float operands, int output": (lambda: npu_ops.grouped_matmul(
        XF, WF, SIZES, preferred_element_type=jnp.int32), TypeError, "preferred_element_type"),
    "complex operands": (lambda: npu_ops.grouped_matmul(
        XF.astype(np.complex64), WF.astype(np.complex64), SIZES), TypeError, "lhs"),
    "bool operands": (lambda: npu_ops.grouped_matmul(XF > 0, WF > 0, SIZES), TypeError, "lhs"),
    "preferred_element_type foo": (lambda: npu_ops.grouped_matmul(
        XF, WF, SIZES, preferred_element_type="foo"), TypeError, "preferred_element_type"),
    "dequant_dtype garbage": (lambda: fused(X, W, WS, XS, GL, dequant_dtype="garbage"),
                              TypeError, "dequant_dtype"),
    "dequant_dtype object": (lambda: fused(X, W, WS, XS, GL, dequant_dtype=object()),
                             TypeError, "dequant_dtype"),
    "dequant_dtype True": (lambda: fused(X, W, WS, XS, GL, dequant_dtype=True),
                           TypeError, "dequant_dtype"),
    "quant_dtype float32": (lambda: fused(X, W, WS, XS, GL, quant_dtype=jnp.float32),
                            ValueError, "quant_dtype: expected one of int8"),
    "quant_dtype None": (lambda: fused(X, W, WS, XS, GL, quant_dtype=None), TypeError,
                         "quant_dtype"),
    "v1 per-group scale on int8": (lambda: npu_ops.npu_grouped_matmul_swiglu_quant(
        X, W, GL, np.ones((2, 2, 16), np.float32), XS), ValueError, "weight_scale"),
    "v1 assist shape": (lambda: npu_ops.npu_grouped_matmul_swiglu_quant(
        X, jnp.asarray(W, jnp.int4), GL, WS, XS, bias=np.ones((2, 18), np.float32)),
        ValueError, "bias"),
    "v1 int4 x": (lambda: npu_ops.npu_grouped_matmul_swiglu_quant(
        jnp.asarray(X, jnp.int4), jnp.asarray(W, jnp.int4), GL, WS, XS), TypeError, "x"),
    "int32 x is int4 words": (lambda: fused(X.astype(np.int32), W, WS, XS, GL), ValueError,
                              "int32 x holds 8 int4"),
    "1025 experts": (lambda: fused(X, np.ones((1025, 32, 16), np.int8),
                                   np.ones((1025, 16), np.float32), XS, GL), ValueError,
                     "at most 1024"),
    "1025 groups": (lambda: npu_ops.npu_grouped_matmul(
        [XF], [np.ones((1025, 8, 4), np.float32)], group_list=[0] * 1025, group_list_type=1,
        group_type=0), ValueError, "at most 1024"),
    "num_groups 0": (lambda: npu_ops.tgmm(XF, XF, SIZES, num_groups=0), ValueError,
                     "num_groups"),
    "num_groups 2.5": (lambda: npu_ops.tgmm(XF, XF, SIZES, num_groups=2.5), TypeError,
                       "num_groups"),
    "num_groups str": (lambda: npu_ops.tgmm(XF, XF, SIZES, num_groups="4"), TypeError,
                       "num_groups"),
    "num_groups bool": (lambda: npu_ops.tgmm(XF, XF, SIZES, num_groups=True), TypeError,
                        "num_groups"),
    "num_groups traced": (lambda: jax.jit(lambda g: npu_ops.tgmm(XF, XF, SIZES, num_groups=g))(2),
                          TypeError, "num_groups: .*cannot be traced"),
    "group_sizes 0-d": (lambda: npu_ops.grouped_matmul(XF, WF, np.int32(8)), ValueError,
                        "group_sizes"),
    "block_sizes str": (lambda: npu_ops.grouped_matmul(XF, WF, SIZES, block_sizes="x"),
                        TypeError, "block_sizes"),
    "format_cast shape str": (lambda: npu_ops.npu_format_cast(
        np.ones((2, 32, 64), np.int8), 2, shape=(2, "a", 70)), TypeError, "shape"),
    "format_cast shape int": (lambda: npu_ops.npu_format_cast(
        np.ones((2, 32, 64), np.int8), 2, shape=70), TypeError, "shape"),
    "format_cast 29.0": (lambda: npu_ops.npu_format_cast(np.ones((2, 32, 64), np.int8), 29.0),
                         TypeError, "acl_format"),
    "swiglu complex": (lambda: npu_ops.swiglu(XF.astype(np.complex64)), TypeError, "c"),
    "swiglu int": (lambda: npu_ops.swiglu(X), TypeError, "c: expected a float array"),
    "quantize_per_token list": (lambda: npu_ops.quantize_per_token([[1.0, 2.0]]), TypeError,
                                "s: expected an array"),
    "quantize_per_token None": (lambda: npu_ops.quantize_per_token(None), TypeError, "s"),
    "quantize_per_token 0-d": (lambda: npu_ops.quantize_per_token(jnp.float32(1)), ValueError,
                               "s: expected rank >= 1"),
    "quantize_per_token int": (lambda: npu_ops.quantize_per_token(X), TypeError, "s"),
    "quantize_per_token spec": (lambda: npu_ops.quantize_per_token(XF, "int8"), TypeError,
                                "spec"),
    "fake_quant bits 8.0": (lambda: npu_ops.fake_quant(XF, jnp.float32(0.1), bits=8.0),
                            TypeError, "bits"),
    "fake_quant grad_scale str": (lambda: npu_ops.fake_quant(XF, jnp.float32(0.1),
                                                             grad_scale="x"),
                                  TypeError, "grad_scale"),
    "kernel on CPU without interpret": (lambda: npu_ops.grouped_matmul(
        XF, WF, SIZES, implementation="pallas_tpu"), ValueError, "interpret=True"),
    "kernel on CPU without interpret, jit": (lambda: jax.jit(lambda a: npu_ops.grouped_matmul(
        a, WF, SIZES, implementation="pallas_gpu"))(XF), ValueError, "interpret=True"),
}

NN_CASES = {
    "MoEMLP top_k 1.5": (lambda nn, r: nn.MoEMLP(8, 8, 4, top_k=1.5, rngs=r), TypeError, "top_k"),
    "MoEMLP top_k True": (lambda nn, r: nn.MoEMLP(8, 8, 4, top_k=True, rngs=r), TypeError,
                          "top_k"),
    "MoEMLP gmm 5": (lambda nn, r: nn.MoEMLP(8, 8, 4, gmm=5, rngs=r), TypeError, "gmm"),
    "MoEMLP d_model 0": (lambda nn, r: nn.MoEMLP(0, 8, 4, rngs=r), ValueError, "d_model"),
    "MoEMLP d_ff -1": (lambda nn, r: nn.MoEMLP(8, -1, 4, rngs=r), ValueError, "d_ff"),
    "MoEMLP weight_bits 3": (lambda nn, r: nn.MoEMLP(8, 8, 4, weight_bits=3, rngs=r), ValueError,
                             "weight_bits"),
    "MoEMLP x list": (lambda nn, r: nn.MoEMLP(8, 8, 4, rngs=r)([[1.0] * 8]), TypeError, "x"),
    "Linear in_features 0": (lambda nn, r: nn.LinearA8W8Quant(0, 8, rngs=r), ValueError,
                             "in_features"),
    "Linear output_dtype foo": (lambda nn, r: nn.LinearA8W8Quant(8, 8, output_dtype="foo", rngs=r),
                                TypeError, "output_dtype"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_errors_name_the_argument(name):
  fn, exc, pattern = CASES[name]
  with pytest.raises(exc, match=pattern):
    fn()


@pytest.mark.parametrize("name", list(NN_CASES))
def test_module_errors_name_the_argument(name):
  nn, rngs = _nn()
  fn, exc, pattern = NN_CASES[name]
  with pytest.raises(exc, match=pattern):
    fn(nn, rngs)
