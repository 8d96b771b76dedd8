"""Issue 32 items 1-10: every bad input ends as the documented result (checked against NumPy
or the semantics) or a clear error naming the argument, raised at trace time where static.

Shapes are tiny and the error cases share one table (most raise before anything compiles).
"""

import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import export

import helpers
import npu_ops
import numpy_reference as ref
from npu_ops import moe
from npu_ops._src import qat

F16X, F16W = np.ones((16, 8), np.float16), np.ones((4, 8, 8), np.float16)


def _rng_ints(shape, lo=-4, hi=5, seed=0):
  return np.random.default_rng(seed).integers(lo, hi, shape)


# --- 1: (index, size) pairs with an unknown expert --------------------------------------------

@pytest.mark.parametrize("pairs", [np.array([[0, 4], [7, 4]]), jnp.array([[0, 4], [-1, 4]])])
def test_known_pairs_with_an_unknown_expert_raise(pairs):
  with pytest.raises(ValueError, match=r"group_list: expected expert indices in \[0, 4\)"):
    npu_ops.npu_grouped_matmul(F16X, F16W, group_list=pairs, group_list_type=2, split_item=2)


def test_traced_pairs_with_an_unknown_expert_are_empty():
  """Documented (README: invalid traced group lists): such a pair's rows belong to no group."""
  x = _rng_ints((16, 8)).astype(np.float16)
  w = _rng_ints((4, 8, 8), seed=1).astype(np.float16)
  f = jax.jit(lambda gl: npu_ops.npu_grouped_matmul(x, w, group_list=gl, group_list_type=2,
                                                    split_item=2)[0])
  got = np.asarray(f(jnp.array([[2, 4], [7, 4], [1, 3]], jnp.int32)), np.float64)
  want = np.zeros((16, 8))
  want[0:4] = x[0:4].astype(np.float64) @ w[2]
  want[4:7] = x[4:7].astype(np.float64) @ w[1]  # the empty pair takes no rows
  np.testing.assert_array_equal(got, want)


# --- 2: unsigned group sizes ------------------------------------------------------------------

def test_unsigned_traced_group_sizes_saturate():
  x, w = np.ones((16, 8), np.float32), np.ones((4, 8, 3), np.float32)
  f = jax.jit(lambda g: npu_ops.grouped_matmul(x, w, g))
  # 2**32 - 1 rows asked for group 0: all 16 (a cast to int32 would read -1: none)
  np.testing.assert_array_equal(f(jnp.array([2**32 - 1, 0, 0, 0], jnp.uint32)),
                                np.full((16, 3), 8.0))
  got = f(jnp.array([3, 250, 0, 0], jnp.uint8))  # the total is capped at m
  np.testing.assert_array_equal(got, np.full((16, 3), 8.0))
  with pytest.raises(ValueError, match=r"group_sizes: expected a total number of rows <= m=16"):
    npu_ops.grouped_matmul(x, w, np.array([2**32 - 1, 0, 0, 0], np.uint32))  # known: checked


def test_int64_traced_group_sizes_saturate_with_x64():
  """With x64 on, a traced int64 list reaches the ops as int64: values past int32 are
  clamped (all rows, or none), not wrapped (2**32 + 3 read as 3), and checkify reports
  them, as for the other integer types."""
  from jax.experimental import checkify  # noqa: PLC0415
  x, w = np.ones((16, 8), np.float32), np.ones((2, 8, 3), np.float32)
  with jax.enable_x64(True):
    f = jax.jit(lambda g: npu_ops.grouped_matmul(x, w, g))
    np.testing.assert_array_equal(f(jnp.array([2**32 + 3, 0], jnp.int64)), np.full((16, 3), 8.0))
    # a negative size counts as 0 (wrapped, it read as 3: seven rows instead of four)
    np.testing.assert_array_equal(f(jnp.array([-(2**32) + 3, 4], jnp.int64)),
                                  np.repeat([8.0, 0.0], [4, 12])[:, None] * np.ones(3))
    with npu_ops.debug_checks():
      err, _ = checkify.checkify(f)(jnp.array([2**32 + 3, 0], jnp.int64))
    assert "group_sizes" in err.get()


def test_int64_traced_group_offset_is_clamped_with_x64():
  """A traced int64 group_offset past int32's range is clamped to [0, G - g], not wrapped
  (2**32 read as 0, -(2**32) + 1 as 1): rows of the local groups [off, off + g) are x's
  row sums, the others 0."""
  x, w = np.arange(48, dtype=np.float32).reshape(12, 4) % 5, np.ones((2, 4, 3), np.float32)
  sizes = [3, 4, 5]

  def want(off):
    lo, hi = sum(sizes[:off]), sum(sizes[:off + 2])
    out = np.zeros((12, 3), np.float32)
    out[lo:hi] = x[lo:hi].sum(1, keepdims=True)
    return out
  with jax.enable_x64(True):
    f = jax.jit(lambda s, off: npu_ops.grouped_matmul(x, w, s, group_offset=off))
    s = jnp.asarray(sizes, jnp.int64)
    np.testing.assert_array_equal(f(s, jnp.int64(2**32)), want(1))
    np.testing.assert_array_equal(f(s, jnp.int64(-(2**32) + 1)), want(0))


# --- 3: the expert-parallel int8 layer on zero tokens ------------------------------------------

def test_payload_bytes_of_zero_rows():
  """What failed (ZeroDivisionError): the int8 layer's codes and scales travel as bytes."""
  from npu_ops._src import expert_parallel as ep  # noqa: PLC0415
  for rows in (0, 3):
    codes = jnp.asarray(_rng_ints((rows, 5)), jnp.int8)
    scale = jnp.linspace(0.5, 2.0, rows, dtype=jnp.float32)
    packed, unpack = ep._as_bytes([codes, scale])
    assert packed.shape == (rows, 5 + 4) and packed.dtype == jnp.uint8
    got_codes, got_scale = unpack(packed)
    np.testing.assert_array_equal(got_codes, codes)
    np.testing.assert_array_equal(got_scale, scale)


@pytest.mark.slow  # compiles the expert-parallel int8 layer (~15 s on 2 cores)
def test_expert_parallel_int8_layer_on_zero_tokens():
  from flax import nnx  # noqa: PLC0415
  from npu_ops.nn import MoEMLP  # noqa: PLC0415
  mesh = jax.make_mesh((1,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))
  layer = MoEMLP(8, 16, 4, mesh=mesh, expert_axis="expert", rngs=nnx.Rngs(0)).convert("int8")
  y = nnx.jit(lambda m, x: m(x))(layer, np.zeros((0, 8), np.float32))
  assert y.shape == (0, 8) and y.dtype == jnp.float32


# --- 5: subnormal inputs ----------------------------------------------------------------------
# The quantizers read a user's subnormal values from their bits (XLA:CPU and TPU arithmetic
# reads them as 0). The fused op's epilogue goes without: its values come out of that
# arithmetic already flushed, and the bit reads cost it 11-21% of its CPU time at m=4096,
# e=16 (71% at m=512, e=8; measured 2026-12-04).
SUBNORMAL_ROWS = np.array([[2e-38, 1.1e-38, 0.0, -5e-39],     # one normal value, subnormals
                           [1e-39, -3e-40, 1e-45, 0.0],       # all subnormal
                           [0.0, 0.0, 0.0, 0.0]], np.float32)


@pytest.mark.parametrize("out", ["int8", "float8_e4m3fn", "float8_e5m2"])
def test_per_token_quantization_reads_subnormals_exactly(out, compiler):
  # NumPy keeps subnormals (no flush to zero): the reference is the formula itself
  want_q, want_scale = ref.per_token(SUBNORMAL_ROWS, out)
  spec = npu_ops.DynamicQuant(getattr(jnp, out))
  q, scale = npu_ops.quantize_per_token(SUBNORMAL_ROWS, spec)
  np.testing.assert_array_equal(np.asarray(q).astype(np.float32), want_q.astype(np.float32))
  np.testing.assert_array_equal(np.asarray(scale).view(np.int32), want_scale.view(np.int32))
  if out == "int8":  # the row: 127 * 1.1 / 2 = 69.85 -> 70
    assert np.asarray(q)[0, :3].tolist() == [127, 70, 0]
    assert (np.asarray(q)[1] != 0).sum() == 2  # 1e-45 / 1e-39 * 127 rounds to 0


def test_fake_quant_sees_the_codes_of_subnormal_inputs(compiler):
  """QAT's codes are quantize_per_token's (the product q * scale is what the CPU flushes)."""
  want_q, _ = ref.per_token(SUBNORMAL_ROWS)
  amax = np.abs(SUBNORMAL_ROWS).max(-1, keepdims=True)
  np.testing.assert_array_equal(qat.quantize(SUBNORMAL_ROWS, amax / np.float32(127)), want_q)


def test_mx_codes_of_subnormal_values_next_to_a_normal_one(compiler):
  s = np.zeros((1, 32), np.float32)
  s[0, :3] = [2.0 ** -120, 1e-39, -3e-40]
  codes, scales = npu_ops.quantize_mx(s)
  # E = 7 -> scale byte max(7, 8) - 8 = 0 (2**-127); codes v * 2**127 of the bfloat16 values
  assert int(np.asarray(scales).view(np.uint8)[0, 0]) == 0
  want = (s.astype(ml_dtypes.bfloat16).astype(np.float64) * 2.0 ** 127).astype(
      np.float32).astype(ml_dtypes.float8_e4m3fn)
  np.testing.assert_array_equal(np.asarray(codes).astype(np.float32), want.astype(np.float32))
  assert np.asarray(codes).astype(np.float32)[0, 1] == 0.171875


# --- 6: one-expert weight lists ---------------------------------------------------------------

def test_one_expert_lists_equal_the_formula():
  x = _rng_ints((4, 32)).astype(np.int8)
  w = _rng_ints((1, 32, 16), seed=1).astype(np.int8)
  ws = np.linspace(0.01, 0.02, 16, dtype=np.float32)[None]
  xs = np.full(4, 0.1, np.float32)
  want_q, want_s = ref.swiglu_quant(x, w, ws, xs, [(0, 4)], scenario="A8W8")
  for q, s in (npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, list(w), list(ws), xs, [4]),
               npu_ops.npu_grouped_matmul_swiglu_quant(x, list(w), [4], list(ws), xs)[:2]):
    # the tolerances of docs/semantics.md (XLA's exp in SwiGLU is not NumPy's to the ulp)
    helpers.assert_int8_equal(q, want_q)
    helpers.assert_scale_close(s, want_s)


# --- 7: jax.export with symbolic dims ---------------------------------------------------------

S = jax.ShapeDtypeStruct


def _export(f, *specs):
  """f exported, serialized and read back (what a user ships)."""
  return export.deserialize(export.export(jax.jit(f))(*specs).serialize())


def test_flax_modules_check_their_options_first():
  """A flag is a bool, not a truthy string; MoEMLP's mesh options are checked before Flax
  stores them (an array among them failed inside Flax: "static attribute 'parallel'")."""
  from flax import nnx  # noqa: PLC0415
  from npu_ops import nn  # noqa: PLC0415
  with pytest.raises(TypeError, match="bias: expected a bool, got 'no'"):
    nn.LinearA8W8Quant(8, 4, bias="no", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="capacity_factor: expected None without a mesh"):
    nn.MoEMLP(8, 4, 4, capacity_factor=np.ones(2), rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match="mode: expected one of"):
    nn.MoEMLP(8, 4, 4, mode=np.zeros(2), rngs=nnx.Rngs(0))


def test_block_sizes_take_numpy_ints():
  """NumPy ints are ints (`TileSizes` took them; `GmmBlockSizes` said 256 was no power of
  two), and become Python ints: the same static argument, one compilation."""
  got = npu_ops.GmmBlockSizes(np.int64(256), np.int32(8))
  assert got == npu_ops.GmmBlockSizes(256, 8) and type(got.block_m) is int
  assert hash(got) == hash(npu_ops.GmmBlockSizes(256, 8))


def test_exports_with_dynamic_group_lists_serialize_and_run():
  """Every op over a traced group list serializes (with the ops' checkify checks on, the
  program kept a checkify effect that jax.export cannot serialize); `dispatch`'s output
  too. The artifacts run at two token counts and give what the ops give (integers bit for
  bit; floats to float32 rounding: the symbolic program sums in another order)."""
  (m,) = export.symbolic_shape("m")
  rng = np.random.default_rng(5)
  x8, w8 = _rng_ints((6, 32)).astype(np.int8), _rng_ints((2, 32, 16), seed=1).astype(np.int8)
  ws, xf = np.full((2, 16), 1e-2, np.float32), rng.normal(size=(6, 32)).astype(np.float32)
  fns = {
      "v2": (lambda x, g: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
          x, w8, ws, jnp.ones(x.shape[0], jnp.float32), g, group_list_type=1),
          S((m, 32), jnp.int8), x8),
      "grouped_matmul": (lambda x, g: npu_ops.grouped_matmul(x, w8.astype(np.float32), g),
                         S((m, 32), jnp.float32), xf),
      "tgmm": (lambda x, g: npu_ops.tgmm(x, x, g), S((m, 32), jnp.float32), xf),
      "dispatch": (lambda e, g: npu_ops.dispatch(e + 0 * g[0], 2), S((m, 2), jnp.int32),
                   np.array([[0, 1], [1, 0], [1, 1], [0, 0], [1, 0], [0, 1]], np.int32)),
  }
  for name, (f, spec, arg) in fns.items():
    exp = _export(f, spec, S((2,), jnp.int32))
    for rows, g in ((6, [2, 4]), (4, [3, 1])):
      g = np.array(g, np.int32)
      for got, want in zip(jax.tree.leaves(exp.call(arg[:rows], g)),
                           jax.tree.leaves(jax.jit(f)(arg[:rows], g))):
        want = np.asarray(want)
        tol = 1e-5 * np.abs(want).max() if want.dtype.kind == "f" else 0
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=tol, err_msg=name)


def test_export_grouped_matmul_and_tgmm_with_symbolic_k_and_n():
  k, n = export.symbolic_shape("k, n")
  sizes = S((2,), jnp.int32)
  gmm = _export(lambda x, w, g: npu_ops.grouped_matmul(x, w, g), S((8, k), jnp.float32),
                S((2, k, n), jnp.float32), sizes)
  tgmm = _export(lambda x, y, g: npu_ops.tgmm(x, y, g), S((8, k), jnp.float32),
                 S((8, n), jnp.float32), sizes)
  x, w = _rng_ints((8, 5)).astype(np.float32), _rng_ints((2, 5, 3), seed=1).astype(np.float32)
  y = _rng_ints((8, 3), seed=2).astype(np.float32)
  g = np.array([3, 5], np.int32)
  np.testing.assert_array_equal(gmm.call(x, w, g), ref.grouped_matmul(x, w, [(0, 3), (3, 8)],
                                                                       np.float32))
  want = np.stack([x[:3].T @ y[:3], x[3:].T @ y[3:]])
  np.testing.assert_array_equal(tgmm.call(x, y, g), want)
  with pytest.raises(ValueError, match="implementation: expected None or 'xla' for symbolic "
                     "k=k, n=n"):
    _export(lambda x, w, g: npu_ops.grouped_matmul(x, w, g, implementation="pallas_tpu"),
            S((8, k), jnp.float32), S((2, k, n), jnp.float32), sizes)


def test_export_moe_mlp_with_symbolic_tokens():
  (m,) = export.symbolic_shape("m")
  rng = np.random.default_rng(3)
  w = moe.MoEWeights(rng.normal(size=(8, 4)).astype(np.float32),
                     (rng.normal(size=(4, 8, 12)) / 3).astype(np.float32),
                     (rng.normal(size=(4, 6, 8)) / 3).astype(np.float32))
  exp = _export(lambda x: moe.moe_mlp(x, w, top_k=2).y, S((m, 8), jnp.float32))
  x = rng.normal(size=(5, 8)).astype(np.float32)
  np.testing.assert_allclose(exp.call(x), ref.moe_mlp(x, *w[:3], 2), rtol=1e-5, atol=1e-5)
  # int8: the fused op, then the dequantized int8 product (ragged_dot for a symbolic m)
  w8 = moe.MoEWeights(w.router, rng.integers(-128, 128, (4, 8, 12)).astype(np.int8),
                      rng.integers(-128, 128, (4, 6, 8)).astype(np.int8),
                      rng.uniform(1e-3, 2e-3, (4, 12)).astype(np.float32),
                      rng.uniform(1e-3, 2e-3, (4, 8)).astype(np.float32))
  int8 = lambda x: moe.moe_mlp(x, w8, top_k=2, mode="int8").y
  np.testing.assert_array_equal(_export(int8, S((m, 8), jnp.float32)).call(x), jax.jit(int8)(x))
  # under a mesh the count must be known: the artifact crashed the process when called
  mesh = jax.make_mesh((1,), ("expert",))
  with pytest.raises(ValueError, match="x: expected a known token count under a mesh"):
    _export(lambda x: moe.moe_mlp(x, w, top_k=2, mesh=mesh, expert_axis="expert").y,
            S((m, 8), jnp.float32))


def test_export_fake_quant_gmm_swiglu_quant_with_symbolic_m():
  (m,) = export.symbolic_shape("m")
  rng = np.random.default_rng(4)
  w = rng.normal(size=(2, 16, 8)).astype(np.float32)
  ws = qat.weight_scale_from_amax(jnp.asarray(w))
  f = lambda x, g: npu_ops.fake_quant_gmm_swiglu_quant(x, w, ws, g, group_list_type=1)
  grad = lambda x, g: jax.grad(lambda x: jnp.sum(f(x, g) ** 2))(x)
  x, g = rng.normal(size=(6, 16)).astype(np.float32), np.array([2, 4], np.int32)
  # the exported program computes what the concrete one does: the forward bit for bit (the
  # integer op), the gradient to float32 rounding (ragged_dot sums in another order)
  for fn, rtol in ((f, 0), (grad, 1e-5)):
    exp = _export(fn, S((m, 16), jnp.float32), S((2,), jnp.int32))
    np.testing.assert_allclose(exp.call(x, g), jax.jit(fn)(x, g), rtol=rtol, atol=0)


# --- 8, 9, 10: errors naming the argument -----------------------------------------------------

_C, _S = npu_ops.quantize_mx(np.ones((2, 32), np.float32))
_W = moe.MoEWeights(np.ones((8, 4), np.float32), np.ones((4, 8, 32), np.float32),
                    np.ones((4, 16, 8), np.float32), np.ones((4, 32), np.float32),
                    np.ones((4, 8), np.float32))
_W_INT8 = _W._replace(w_gate_up=np.ones((4, 8, 32), np.int8), w_down=np.ones((4, 16, 8), np.int8))
_TOKENS = np.ones((4, 8), np.float32)
_X8, _W8 = np.ones((16, 32), np.int8), np.ones((2, 32, 16), np.int8)
_WS8, _XS8 = np.ones((2, 16), np.float32), np.ones(16, np.float32)
_ROUTING = moe.dispatch(np.array([[0, 1], [1, 0]]), 2)


def _mesh():
  return jax.make_mesh((1,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,))


def _moe_layer(**kw):
  from flax import nnx  # noqa: PLC0415
  from npu_ops.nn import MoEMLP  # noqa: PLC0415
  return MoEMLP(8, 16, 4, rngs=nnx.Rngs(0), **kw)


def _linear(**kw):
  from flax import nnx  # noqa: PLC0415
  from npu_ops.nn import LinearA8W8Quant  # noqa: PLC0415
  return LinearA8W8Quant(32, 16, rngs=nnx.Rngs(0), **kw)


ERRORS = {
    # 8: silently accepted before
    "dequantize_mx int dtype": (lambda: npu_ops.dequantize_mx(_C, _S, jnp.int8), TypeError,
                                "dtype: expected a float dtype"),
    "pack_int4 float": (lambda: npu_ops.pack_int4(np.full((1, 8), 1.7, np.float32)), TypeError,
                        "values: expected an integer array"),
    "pack_int4 out of range": (lambda: npu_ops.pack_int4(np.full((1, 8), 100, np.int8)),
                               ValueError, r"values: expected int4 values in \[-8, 7\], got 100"),
    "dispatch -1": (lambda: moe.dispatch(np.array([[0, -1]]), 2), ValueError,
                    r"experts: expected ids in \[0, num_experts=2\), got -1 at index \(0, 1\)"),
    "dispatch float ids": (lambda: moe.dispatch(np.array([[0.0, 1.0]]), 2), TypeError,
                           "experts: expected integer expert ids"),
    "fake_quant inf": (lambda: npu_ops.fake_quant(np.ones(4, np.float32), np.float32(np.inf)),
                       ValueError, "scale: expected finite step sizes, got inf"),
    "quant_group_size -1": (lambda: npu_ops.npu_grouped_matmul(
        F16X, F16W[:2], group_list=[8, 16], split_item=2, quant_group_size=-1), ValueError,
        "quant_group_size: expected 0, or the k-group size"),
    "quant_group_size on floats": (lambda: npu_ops.npu_grouped_matmul(
        F16X, F16W[:2], group_list=[8, 16], split_item=2, quant_group_size=4), ValueError,
        "quant_group_size: expected 0 on float inputs .* got 4"),
    # 9: unclear errors before
    "dequantize_mx rank 0": (lambda: npu_ops.dequantize_mx(np.float32(1), np.ones(1, np.uint8)),
                             ValueError, r"codes: expected rank >= 1"),
    "dynamic_fake_quant rank 0": (lambda: npu_ops.dynamic_fake_quant(np.float32(1)), ValueError,
                                  "x: expected rank >= 1"),
    "GmmBlockSizes 3": (lambda: npu_ops.GmmBlockSizes(np.int64(3)), ValueError,
                        r"GmmBlockSizes.block_m: expected a positive power of two .*, got np.int64\(3\)"),
    "GmmBlockSizes float": (lambda: npu_ops.GmmBlockSizes(256.0), ValueError,
                            "GmmBlockSizes.block_m: expected .*, got 256.0"),
    # found by a fuzz of every public callable (2026-12-06): arrays read as dtypes, options
    # tested with `in` before their type, flags read by truthiness, sizes not checked
    "output_dtype array": (lambda: npu_ops.npu_quant_matmul(
        _X8[:2], _W8[0], np.ones(16, np.float32), output_dtype=jnp.asarray(1)), TypeError,
        r"output_dtype: expected a dtype .*, got int32\[\]"),
    "implementation array": (lambda: npu_ops.grouped_matmul(
        np.ones((16, 8), np.float32), np.ones((2, 8, 4), np.float32), [8, 8],
        implementation=np.zeros(2)), TypeError, "implementation: expected None or one of"),
    "moe mode list": (lambda: moe.moe_mlp(_TOKENS, _W, top_k=2, mode=["float"]), TypeError,
                      "mode: expected one of"),
    "recipe list": (lambda: moe.moe_mlp(_TOKENS, _W, top_k=2, recipe=["w8a8"]), TypeError,
                    "recipe: expected one of"),
    "Recipe name": (lambda: npu_ops.recipes.Recipe(None, "int8", "int8"), TypeError,
                    "name: expected a str"),
    "activate_left str": (lambda: npu_ops.swiglu(np.ones((2, 4), np.float32),
                                                 activate_left="no"), TypeError,
                          "activate_left: expected a bool, got 'no'"),
    "debug_checks str": (lambda: npu_ops.debug_checks("no"), TypeError,
                         "enabled: expected a bool"),
    "group_ends m float": (lambda: npu_ops.group_ends([1, 3], group_list_type=0, m=4.5,
                                                      num_groups=2), TypeError,
                           "m: expected a Python int"),
    "group_ends num_groups 0": (lambda: npu_ops.group_ends([1, 3], group_list_type=0, m=4,
                                                           num_groups=0), ValueError,
                                "num_groups: expected an int >= 1"),
    "check_group_list floats": (lambda: npu_ops.check_group_list(np.array([1.5, 3.0]), 4),
                                TypeError, "group_list: expected a 1-D integer array"),
    "check_group_list scalar": (lambda: npu_ops.check_group_list(3, 4), TypeError,
                                "group_list: expected a 1-D integer array"),
    "from_nz rows bool": (lambda: npu_ops.from_nz(npu_ops.to_nz(np.ones((4, 32), np.int8)),
                                                  True, 32), TypeError,
                          "rows: expected a Python int"),
    "to_nz complex": (lambda: npu_ops.to_nz(np.ones((4, 32), np.complex64)), TypeError,
                      "x: expected dtype in"),
    "unpack_int4 None": (lambda: npu_ops.unpack_int4(None), TypeError,
                         "words: expected an array"),
    "decode_quant_param float": (lambda: npu_ops.decode_quant_param(np.zeros(4)), TypeError,
                                 "words: expected dtype"),
    "weight_assist_matrix k": (lambda: npu_ops.weight_assist_matrix(
        np.zeros((1, 8, 16), np.int32), np.ones((1, 128), np.float32), k="8"), TypeError,
        "k: expected a Python int"),
    "quantize scale shape": (lambda: npu_ops.quantize(np.ones((2, 8), np.float32),
                                                      np.ones(2, np.float32)), ValueError,
                             "scale: expected a shape broadcastable to x"),
    "fp8 recipe int weight": (lambda: npu_ops.recipes.get("fp8").fake_weight(
        np.ones((2, 8, 4), np.int16), np.ones((2, 4), np.float32)), TypeError,
        "weight: expected a float array"),
    "DynamicQuant bogus": (lambda: npu_ops.DynamicQuant("bogus"), TypeError,
                           "DynamicQuant.dtype: expected a dtype .*, got 'bogus'"),
    "DynamicQuant None": (lambda: npu_ops.DynamicQuant(None), TypeError,
                          "DynamicQuant.dtype: expected a dtype .*, got None"),
    "dequantize_mx bogus": (lambda: npu_ops.dequantize_mx(_C, _S, "bogus"), TypeError,
                            "dtype: expected a dtype .*, got 'bogus'"),
    "quantize_mx None": (lambda: npu_ops.quantize_mx(np.ones((2, 32), np.float32), None),
                         TypeError, "dtype: expected a dtype .*, got None"),
    "grouped_matmul no experts": (lambda: npu_ops.grouped_matmul(
        np.ones((16, 8), np.float32), np.ones((0, 8, 4), np.float32), [16]), ValueError,
        r"rhs: expected \[g, k, n\] with at least one group"),
    "v2 no experts": (lambda: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
        _X8, _W8[:0], _WS8[:0], _XS8, [16]), ValueError, "weight: expected at least one expert"),
    "npu_grouped_matmul no float experts": (lambda: npu_ops.npu_grouped_matmul(
        [np.ones((6, 8), np.float32)], [np.ones((0, 8, 4), np.float32)], group_list=[0],
        split_item=2), ValueError, "weight: expected at least one expert"),
    "moe float weights in int8 mode": (lambda: moe.moe_mlp(_TOKENS, _W, top_k=2, mode="int8"),
                                       TypeError, "weights.w_gate_up: expected int8 codes"),
    "moe int8 weights in float mode": (lambda: moe.moe_mlp(_TOKENS, _W_INT8, top_k=2),
                                       TypeError, "weights.w_gate_up: expected float16, "
                                       "bfloat16 or float32 weights"),
    # named an inner op's operand ("rhs"), or the other operand ("weight")
    "moe float64 weights": (lambda: moe.moe_mlp(_TOKENS, _W._replace(
        w_gate_up=np.asarray(_W.w_gate_up, np.float64)), top_k=2), TypeError,
        r"weights.w_gate_up: expected float16, bfloat16 or float32 weights .* got float64"),
    "npu_grouped_matmul float64 x": (lambda: npu_ops.npu_grouped_matmul(
        np.ones((4, 8)), np.ones((2, 8, 4)), group_list=[2, 4], split_item=2), TypeError,
        r"x: expected float16, bfloat16, float32, int8 or int4 .* got float64\[4, 8\]"),
    "capacity_factor inf": (lambda: moe.moe_mlp(
        _TOKENS, _W, top_k=2, mesh=_mesh(), expert_axis="expert", capacity_factor=math.inf),
        ValueError, "capacity_factor: expected None or a finite number > 0"),
    "assist scale shape": (lambda: npu_ops.weight_assist_matrix(
        npu_ops.pack_int4(np.ones((2, 32, 16), np.int8)), np.ones((4, 3), np.float32)),
        ValueError, r"weight_scale: expected \[e=2, n=16\]"),
    "combine weights shape": (lambda: moe.combine(np.ones((4, 8), np.float32), _ROUTING,
                                                  np.ones((3, 2), np.float32)), ValueError,
                              r"weights: expected \[T, k\] gates of the 4 routed"),
    # 10: checked at construction, not at the first call
    "MoEMLP capacity_factor without a mesh": (lambda: _moe_layer(capacity_factor=0.5),
                                              ValueError, "capacity_factor: expected None "
                                              "without a mesh"),
    "LinearA8W8Quant output_dtype": (lambda: _linear(output_dtype=jnp.float32), TypeError,
                                     "output_dtype: expected int8, float16, bfloat16 or int32"),
    "LinearA8W8Quant offset": (lambda: _linear(offset=True, output_dtype=jnp.bfloat16),
                               ValueError, "offset: expected False unless output_dtype is int8"),
    "LinearA8W8Quant pertoken_scale": (lambda: _linear(pertoken_scale=True), ValueError,
                                       "pertoken_scale: expected False unless output_dtype"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_names_the_argument(case):
  call, error, match = ERRORS[case]
  with pytest.raises(error, match=match):
    call()


@pytest.mark.parametrize("implementation", [None, "xla", "reference"])
def test_fused_op_under_grad_says_what_to_differentiate(implementation):
  """The fused op's outputs are codes and their scales: jvp / grad through it (here w.r.t.
  its float scales) raise a TypeError naming the QAT op to train with, on every
  implementation (they failed inside JAX: no differentiation rule for the platform
  choice, or reverse mode through the XLA path's while loop)."""
  rng = np.random.default_rng(0)
  x = rng.integers(-128, 128, (12, 16), dtype=np.int8)
  w = rng.integers(-128, 128, (3, 16, 8), dtype=np.int8)
  ws, xs = np.full((3, 8), 0.01, np.float32), np.full((12,), 0.01, np.float32)
  op = lambda ws, xs: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w, ws, xs, jnp.array([3, 8, 12]), implementation=implementation)
  with pytest.raises(TypeError, match="has no derivative.*fake_quant_gmm_swiglu_quant"):
    jax.grad(lambda ws: op(ws, xs)[1].sum())(ws)
  with pytest.raises(TypeError, match="has no derivative"):
    jax.jvp(lambda xs: op(ws, xs)[1], (xs,), (xs,))
  q, s = jax.jit(op)(ws, xs)  # the forward as before
  assert q.dtype == jnp.int8 and s.shape == (12,)


def test_traced_unknown_expert_ids_fall_past_the_groups():
  """Documented (`moe.dispatch`): counted in no group, sorted last, expert reads e."""
  ids = jnp.array([[0, -1], [1, 5], [1, 0]])
  r = jax.jit(lambda e: moe.dispatch(e, 2))(ids)
  np.testing.assert_array_equal(r.group_sizes, [2, 2])
  np.testing.assert_array_equal(r.expert, [0, 0, 1, 1, 2, 2])
  # pairs (flat index) by expert, stably: 0 -> 0, 5; 1 -> 2, 4; invalid last: 1, 3
  np.testing.assert_array_equal(r.token_index, np.array([0, 5, 2, 4, 1, 3]) // 2)


def test_empty_rows_and_numpy_top_k():
  assert npu_ops.dynamic_fake_quant(np.zeros((3, 0), np.float32)).shape == (3, 0)
  # top_k as a NumPy int: accepted by moe_mlp (traced only: no compile) as by MoEMLP, and
  # top_k_routing picks NumPy's top 2
  rng = np.random.default_rng(5)
  x = rng.normal(size=(3, 8)).astype(np.float32)
  y = jax.eval_shape(lambda x: moe.moe_mlp(x, _W, top_k=np.int64(2)).y, x)
  assert y.shape == (3, 8) and y.dtype == jnp.float32
  assert _moe_layer(top_k=np.int64(2)).top_k == 2
  logits = rng.normal(size=(3, 4)).astype(np.float32)
  _, experts = moe.top_k_routing(logits, np.int64(2))
  np.testing.assert_array_equal(experts, np.argsort(-logits, axis=-1, kind="stable")[:, :2])


# --- 2026-12-06: what a read of the API's claims found -------------------------------------------

@pytest.mark.parametrize("quant_mode,out", [(0, jnp.int8), (2, jnp.float8_e4m3fn)])
def test_mx_inputs_of_no_rows_or_columns(quant_mode, out):
  """The fused op on MX inputs with m = 0 or n = 0 gives empty outputs of the op's shapes
  (it raised ZeroDivisionError), as the integer scenarios do."""
  v2 = functools.partial(npu_ops.npu_grouped_matmul_swiglu_quant_v2, group_list_type=1,
                         dequant_mode=2, quant_mode=quant_mode, quant_dtype=out)
  w, ws = jnp.ones((3, 64, 64), jnp.float8_e4m3fn), jnp.full((3, 1, 64, 2), 127, jnp.uint8)
  q, s = v2(jnp.zeros((0, 64), jnp.float8_e4m3fn), w, ws, jnp.full((0, 1, 2), 127, jnp.uint8),
            [0, 0, 0])
  assert q.shape == (0, 32) and s.shape == ((0,) if quant_mode == 0 else (0, 1, 2))
  q, s = v2(jnp.ones((4, 64), jnp.float8_e4m3fn), w[:, :, :0], ws[:, :, :0],
            jnp.full((4, 1, 2), 127, jnp.uint8), [2, 2, 0])
  assert q.shape == (4, 0) and s.shape == ((4,) if quant_mode == 0 else (4, 0, 2))
  assert q.dtype == out


def test_named_errors_and_python_scales():
  from npu_ops import perf, recipes  # noqa: PLC0415
  spec = jax.ShapeDtypeStruct
  with pytest.raises(ValueError, match="^chip: expected a TPU"):  # it returned inf seconds
    perf.predict(npu_ops.grouped_matmul, spec((64, 128), jnp.bfloat16),
                 spec((2, 128, 128), jnp.bfloat16), np.array([32, 32], np.int32), chip="h100")
  with pytest.raises(ValueError, match="^weights: expected one of"):  # it ran as int8
    recipes.Recipe("bogus", "int3", "int8")
  with pytest.raises(ValueError, match="^values: expected"):  # IndexError
    npu_ops.pack_int4(np.int32(3))
  with pytest.raises(ValueError, match=r"^values: .*got int4\[3, 4\]"):  # named int8 before
    npu_ops.native_to_int4pack(jnp.zeros((3, 4), jnp.int4))
  gates, experts = moe.top_k_routing(jnp.ones((3, 4)), 2)
  with pytest.raises(TypeError, match="^routing: expected an npu_ops.moe.Dispatch"):
    moe.combine(jnp.ones((6, 8)), tuple(moe.dispatch(experts, 4)), gates)
  x = np.linspace(-1, 1, 8, dtype=np.float32).reshape(2, 4)
  want = np.clip(np.round(x / np.float32(0.05)), -127, 127) * np.float32(0.05)
  np.testing.assert_allclose(npu_ops.fake_quant(x, 0.05), want, rtol=1e-6)  # a Python float
  with pytest.raises(ValueError, match="counts are group_list_type=1 where the op takes it"):
    npu_ops.npu_grouped_matmul_swiglu_quant(  # v1 (cumsum only): no misleading advice
        np.ones((18, 64), np.int8), np.ones((3, 64, 32), np.int8), [5, 3, 10],
        np.full((3, 32), 1e-3, np.float32), np.ones(18, np.float32))
