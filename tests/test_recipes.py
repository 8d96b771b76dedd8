"""The MoE layer's quantization recipes (`npu_ops.recipes`) against NumPy written from the
formulas: activation and weight codes, the dequantized grouped product, and the layer's QAT
and deployed forms."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from npu_ops import recipes

import numpy_reference as ref

nnx = pytest.importorskip("flax.nnx")
from npu_ops.nn import MoEMLP  # noqa: E402

NAMES = sorted(recipes.RECIPES)
F32 = np.float32
ML = {"int8": "int8", "int4": "int4", "fp8": "float8_e4m3fn", "mxfp4": "float4_e2m1fn"}
QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}


def _activations(rng, m=24, k=64):
  x = rng.normal(size=(m, k)).astype(F32)
  x[3] = 0.0                      # a row of zeros: codes and scale 0
  x[5] *= 1e-30                   # a tiny row
  x[7, :5] = [40.0, -40.0, 0.5, -0.5, 1.5]  # a large value in one block
  return x


def _weights(rng, e=3, k=64, n=48):
  w = rng.normal(size=(e, k, n)).astype(F32)
  w[1, :, 5] = 0.0                # a zero column: scale 1, codes 0
  return w


def _dequantized_activation(r, codes, scale):
  codes = np.asarray(codes).astype(F32)
  if r.activations == "mxfp4":
    per = ref.e8m0_value(np.asarray(jax.lax.bitcast_convert_type(scale, jnp.uint8)))
    return codes.astype(np.float64) * np.repeat(per, 32, axis=-1)[:, :codes.shape[1]]
  return codes.astype(np.float64) * np.asarray(scale, np.float64)[:, None]


@pytest.mark.parametrize("name", NAMES)
def test_activation_codes_match_the_formulas(name):
  """Per token: scale amax / qmax, codes RNE(x * qmax / amax) (int8, int4, fp8); MX fp4:
  blocks of 32 with e8m0 scales. The fake quantizer's values are codes x scale."""
  r = recipes.get(name)
  x = _activations(np.random.default_rng(0))
  codes, scale = r.quantize_activation(jnp.asarray(x))
  if r.activations == "mxfp4":
    want_codes, want_bytes = ref.mx_quant(x, "float4_e2m1fn")
    np.testing.assert_array_equal(np.asarray(jax.lax.bitcast_convert_type(scale, jnp.uint8)),
                                  want_bytes)
  else:
    want_codes, want_scale = ref.per_token(x, ML[r.activations])
    np.testing.assert_array_equal(np.asarray(scale), want_scale)
  np.testing.assert_array_equal(np.asarray(codes).astype(F32), want_codes.astype(F32))
  if r.activations in ("int8", "int4"):
    assert np.abs(np.asarray(codes)).max() <= QMAX[r.activations]
  fake = np.asarray(r.fake_activation(jnp.asarray(x)), np.float64)
  np.testing.assert_allclose(fake, _dequantized_activation(r, codes, scale), rtol=1e-7, atol=0)


def _weight_reference(r, w):
  """(codes as float32, per-element scale as float64 [e, k, n]) from the formulas."""
  e, k, n = w.shape
  if r.weights == "mxfp4":
    rows = np.swapaxes(w, 1, 2).reshape(e * n, k)
    codes, scale_bytes = ref.mx_quant(rows, "float4_e2m1fn")
    per = np.repeat(ref.e8m0_value(scale_bytes), 32, axis=-1)
    back = lambda a: np.swapaxes(a.reshape(e, n, k), 1, 2)
    return back(codes.astype(F32)), back(per)
  qmax = QMAX[r.weights]
  group = r.weight_group or k
  amax = np.abs(w.reshape(e, k // group, group, n)).max(axis=2)
  scale = np.where(amax > 0, (amax / F32(qmax)).astype(F32), F32(1))      # [e, G, n]
  per = np.repeat(scale, group, axis=1)                                  # [e, k, n]
  v = np.clip(w * (F32(1) / per), -qmax, qmax)
  codes = v.astype(ml_dtypes.float8_e4m3fn).astype(F32) if r.weights == "fp8" else np.rint(v)
  return codes, per.astype(np.float64)


@pytest.mark.parametrize("name", NAMES)
def test_weight_codes_match_the_formulas(name):
  """Scales amax / largest code per channel (per 32 rows of k for w4a8; a zero column 1),
  codes RNE(w * (1 / scale)) saturated; MX fp4 in blocks of 32 along k."""
  r = recipes.get(name)
  w = _weights(np.random.default_rng(1))
  scale = r.initial_weight_scale(jnp.asarray(w))
  codes, stored = r.quantize_weight(jnp.asarray(w), scale)
  assert np.dtype(codes.dtype) == r.code_dtype and codes.shape == w.shape
  assert stored.shape == r.scale_shape(*w.shape)
  want_codes, want_per = _weight_reference(r, w)
  np.testing.assert_array_equal(np.asarray(codes).astype(F32), want_codes)
  if r.weights != "mxfp4":
    group = r.weight_group or w.shape[1]
    got = np.asarray(scale).reshape(w.shape[0], -1, w.shape[2])
    np.testing.assert_array_equal(np.repeat(got, group, axis=1), want_per.astype(F32))
  fake = np.asarray(r.fake_weight(jnp.asarray(w), scale), np.float64)
  np.testing.assert_allclose(fake, want_codes * want_per, rtol=1e-7, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_codes_matmul_is_the_dequantized_grouped_product(name):
  """`codes_matmul` = sum over k of dequantized activation x dequantized weight, per row's
  expert (float64 reference); rows past the groups 0."""
  r = recipes.get(name)
  rng = np.random.default_rng(2)
  x, w = _activations(rng), _weights(rng)
  sizes = np.array([7, 0, 13])  # 20 of 24 rows
  expert = np.repeat([0, 2, 2], [7, 13, 4])
  xc, xs = r.quantize_activation(jnp.asarray(x))
  wc, ws = r.quantize_weight(jnp.asarray(w), r.initial_weight_scale(jnp.asarray(w)))
  got = np.asarray(r.codes_matmul(xc, xs, wc, ws, jnp.asarray(sizes, jnp.int32),
                                  jnp.asarray(expert, jnp.int32)))
  xd = _dequantized_activation(r, xc, xs)
  wcodes, wper = _weight_reference(r, w)
  wd = wcodes.astype(np.float64) * wper
  want = np.zeros((24, w.shape[2]))
  for lo, hi, g in ((0, 7, 0), (7, 20, 2)):
    want[lo:hi] = xd[lo:hi] @ wd[g]
  np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6 * np.abs(want).max())
  assert not got[20:].any()


@pytest.mark.parametrize("name", NAMES)
def test_the_deployed_layer_computes_what_qat_trained(name):
  """A layer's QAT forward and its `convert("int8")` agree to float rounding, and so does
  PTQ from the float layer (QAT keeps log-scales: exp(log(s)) may move s by an ulp). QAT
  has gradients for the weights and, except MX, the log-scales."""
  x = jnp.asarray(np.random.default_rng(3).normal(size=(40, 64)).astype(F32))
  layer = MoEMLP(64, 128, 4, top_k=2, recipe=name, rngs=nnx.Rngs(0))
  qat_layer = layer.convert("qat")
  deployed, ptq = qat_layer.convert("int8"), layer.convert("int8")
  call = nnx.jit(lambda m, x: m(x))  # one program per layer: 2x faster than eager op by op
  y_qat, y_dep = np.asarray(call(qat_layer, x)), np.asarray(call(deployed, x))
  np.testing.assert_allclose(y_dep, y_qat, rtol=0, atol=1e-5 * np.abs(y_qat).max())
  np.testing.assert_allclose(np.asarray(call(ptq, x)), y_dep, rtol=0,
                             atol=1e-5 * np.abs(y_dep).max())
  assert np.abs(y_qat - np.asarray(call(layer, x))).max() > 0  # quantization changes something
  grads = nnx.jit(nnx.grad(lambda m: jnp.sum(m(x) ** 2)))(qat_layer)
  assert np.abs(np.asarray(grads.w_gate_up[...])).max() > 0
  assert np.abs(np.asarray(grads.w_down[...])).max() > 0
  learned = recipes.get(name).learned_scales
  assert hasattr(qat_layer, "gate_up_log_scale") == learned
  if learned:
    g = np.asarray(grads.gate_up_log_scale[...])
    assert np.isfinite(g).all() and np.abs(g).max() > 0


def test_a_recipe_is_deployed_by_its_formats_not_its_name():
  """A user's Recipe named "w8a8" with int4 formats deploys its own codes (the layer took
  the fused int8 path by name: 0.45 off on outputs of about 3)."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(24, 64)).astype(F32))
  qat_layer = MoEMLP(64, 64, 4, top_k=2, recipe=recipes.Recipe("w8a8", "int4", "int4"),
                     rngs=nnx.Rngs(0)).convert("qat")
  y_qat = np.asarray(qat_layer(x))
  np.testing.assert_allclose(np.asarray(qat_layer.convert("int8")(x)), y_qat, rtol=0,
                             atol=1e-5 * np.abs(y_qat).max())


def test_activation_codes_of_subnormal_and_empty_rows_are_quantize_per_token():
  """`quantize_activation` reads subnormal values exactly, as `fake_activation` and
  `quantize_per_token` do (an all-subnormal row gave codes 0, scale 0), and takes rows of
  no values."""
  import npu_ops  # noqa: PLC0415
  tiny = np.float32(np.finfo(np.float32).smallest_subnormal)
  x = np.array([[-51, 0, -25, 102, -127, 127, 25, 76], [448, 1.375, 20, 0, 0, 0, 0, 0]],
               F32) * np.array([[1000 * tiny], [1]], F32)
  x[1, 1] = tiny * 3  # a subnormal beside a normal maximum
  for name, dtype in (("w8a8", jnp.int8), ("fp8", jnp.float8_e4m3fn)):
    codes, scale = recipes.get(name).quantize_activation(jnp.asarray(x))
    want_codes, want_scale = npu_ops.quantize_per_token(jnp.asarray(x), npu_ops.DynamicQuant(dtype))
    np.testing.assert_array_equal(np.asarray(codes, F32), np.asarray(want_codes, F32))
    np.testing.assert_array_equal(scale, want_scale)
    codes, scale = recipes.get(name).quantize_activation(jnp.zeros((3, 0)))
    assert codes.shape == (3, 0) and np.all(np.asarray(scale) == 0)


def test_recipe_errors_name_the_argument():
  # formats the deployment cannot pair, and scale groups a format does not take
  for kw, name in ((dict(weights="int8", activations="fp8"), "activations"),
                   (dict(weights="mxfp4", activations="int8"), "activations"),
                   (dict(weights="int8", activations="mxfp4"), "activations"),
                   (dict(weights="fp8", activations="fp8", weight_group=32), "weight_group"),
                   (dict(weights="mxfp4", activations="mxfp4", weight_group=16),
                    "weight_group")):
    with pytest.raises(ValueError, match=f"^{name}: expected"):
      recipes.Recipe("mine", **kw)
  fp8 = recipes.get("fp8")
  w = np.ones((2, 64, 4), F32)
  for call, match in ((lambda: fp8.initial_weight_scale(w[0]), "weight: expected rank 3"),
                      (lambda: fp8.initial_weight_scale(w[:, :0]), "weight: expected .* k >= 1"),
                      (lambda: fp8.quantize_weight(w, np.ones((2, 5), F32)),
                       r"weight_scale: expected float \[e=2, n=4\]"),
                      (lambda: fp8.fake_weight(w, np.ones(4, F32)), "weight_scale: expected")):
    with pytest.raises(ValueError, match=match):
      call()
  with pytest.raises(TypeError, match="weight_scale: expected an array"):
    fp8.quantize_weight(w, None)
  with pytest.raises(ValueError, match="recipe"):
    MoEMLP(64, 128, 4, recipe="w3a3", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="weight_bits"):
    MoEMLP(64, 128, 4, recipe="w4a8", weight_bits=4, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="d_ff"):
    MoEMLP(64, 48, 4, recipe="w4a8", rngs=nnx.Rngs(0))
  from npu_ops import moe  # noqa: PLC0415
  float_layer = MoEMLP(64, 128, 4, rngs=nnx.Rngs(0))
  weights = moe.MoEWeights(float_layer.router[...], float_layer.w_gate_up[...],
                           float_layer.w_down[...])
  with pytest.raises(ValueError, match="weight_bits"):
    moe.moe_mlp(jnp.ones((4, 64)), weights, top_k=2, recipe="w4a4", weight_bits=4)
  with pytest.raises(ValueError, match="weights.gate_up_scale"):  # qat needs the scales
    moe.moe_mlp(jnp.ones((4, 64)), weights, top_k=2, mode="qat", recipe="w4a8")
  layer = MoEMLP(64, 128, 4, recipe="fp8", rngs=nnx.Rngs(0)).convert("int8")
  layer.w_down = nnx.Param(layer.w_down[...].astype(jnp.int8))
  with pytest.raises(TypeError, match="weights.w_down.*float8_e4m3fn"):
    layer(jnp.ones((4, 64)))
