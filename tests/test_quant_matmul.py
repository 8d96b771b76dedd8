"""npu_trans_quant_param, npu_quant_matmul, int4 packing, npu_weight_quant_batchmatmul and
LinearA8W8Quant against the NumPy references of semantics B.2, B.3, B.6."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import npu_ops
import numpy_reference as ref
from helpers import assert_int8_equal

F32 = np.float32
BF16 = ml_dtypes.bfloat16


def bits_to_f32(u):
  return np.array(u, np.uint32).view(F32)


# --- npu_trans_quant_param -------------------------------------------------------------

@pytest.mark.parametrize("round_mode", [0, 1])
def test_trans_quant_param_words(round_mode):
  rng = np.random.default_rng(0)
  special = [1.0, 1 + 2**-20, bits_to_f32(0x3F801000), bits_to_f32(0x3F803000),  # ties
             bits_to_f32(0x3F801001), bits_to_f32(0x3FFFF000),  # sticky; mantissa carry
             bits_to_f32(0x00001234), np.inf, -2.5e-3, 0.0]     # subnormal flush, inf
  scale = np.concatenate([np.asarray(special, F32), rng.normal(size=30).astype(F32)])
  got = npu_ops.npu_trans_quant_param(scale, round_mode=round_mode)
  assert isinstance(got, np.ndarray) and got.dtype == np.int64
  np.testing.assert_array_equal(got, ref.trans_quant_param(scale, round_mode=round_mode))


def test_trans_quant_param_visible_rounding():
  w0 = npu_ops.npu_trans_quant_param(np.asarray([1 + 2**-20], F32))
  assert w0[0] == (1 << 46) | 0x3F800000  # truncated to 1.0
  w1 = npu_ops.npu_trans_quant_param(np.asarray([bits_to_f32(0x3FFFF000)], F32), round_mode=1)
  assert w1[0] & 0xFFFFFFFF == 0x40000000  # carry into the exponent: 2.0


@pytest.mark.parametrize("scale_shape,offset_shape", [((5,), (5,)), ((1,), (5,)), ((5,), (1,)),
                                                      ((3, 5), (5,)), ((3, 1), (3, 1))])
def test_trans_quant_param_offset_broadcast(scale_shape, offset_shape):
  rng = np.random.default_rng(1)
  scale = rng.uniform(0.01, 2, scale_shape).astype(F32)
  offset = rng.uniform(-400, 400, offset_shape).astype(F32)
  offset.flat[0] = 2.5  # RNE tie -> 2
  got = npu_ops.npu_trans_quant_param(scale, offset)
  want = ref.trans_quant_param(scale, offset)
  np.testing.assert_array_equal(got, want)
  s, o = npu_ops.decode_quant_param(got)
  np.testing.assert_array_equal(s, np.broadcast_to(ref.fp19(scale), want.shape))
  np.testing.assert_array_equal(o, np.clip(np.rint(np.broadcast_to(offset, want.shape)), -256, 255))


def test_trans_quant_param_x64_and_tracing():
  scale = np.asarray([0.5, 3.3], F32)
  with jax.enable_x64(True):
    got = jax.jit(npu_ops.npu_trans_quant_param)(jnp.asarray(scale))
    assert got.dtype == jnp.int64
    np.testing.assert_array_equal(np.asarray(got), ref.trans_quant_param(scale))
  with pytest.raises(TypeError, match="scale"):
    jax.jit(npu_ops.npu_trans_quant_param)(jnp.asarray(scale))


# --- npu_quant_matmul ------------------------------------------------------------------

def ints(rng, shape, lo=-128, hi=128):
  return rng.integers(lo, hi, shape).astype(np.int8)


@pytest.mark.parametrize("case", ["plain", "int32_bias", "offset", "words", "words_offset"])
def test_quant_matmul_int8_output(case):
  rng = np.random.default_rng(2)
  x1, x2 = ints(rng, (6, 32)), ints(rng, (32, 24))
  scale = rng.uniform(1e-4, 2e-3, 24).astype(F32)
  kw, want_kw = {}, {}
  if case == "int32_bias":
    kw["bias"] = want_kw["bias"] = rng.integers(-5000, 5000, 24).astype(np.int32)
  if case in ("offset", "words_offset"):
    offset = rng.uniform(-300, 300, 24).astype(F32)
    want_kw["offset"] = offset
  if case == "offset":
    kw["offset"] = offset
  s_in = scale
  if case.startswith("words"):
    s_in = npu_ops.npu_trans_quant_param(scale, offset if case == "words_offset" else None)
  got = npu_ops.npu_quant_matmul(x1, x2, s_in, **kw)
  assert got.dtype == jnp.int8
  np.testing.assert_array_equal(got, ref.quant_matmul(x1, x2, ref.fp19(scale), **want_kw))


def test_requant_saturation_and_ties():
  np.testing.assert_array_equal(
      npu_ops._src.quant_matmul.requant_int8(jnp.asarray([-300.0, 2.5, 3.5, -2.5, 400.0]),
                                        jnp.asarray([200.0, 0, 0, 0, -200.0])),
      [-56, 2, 4, -2, 55])


def test_fp19_truncation_is_visible():
  """float32 scale + fp16 output goes through trans_quant_param (FP19); bf16 does not."""
  x1 = np.full((1, 1), 64, np.int8)
  x2 = np.full((1, 1), 64, np.int8)  # acc = 4096
  scale = np.asarray([(1 + 2**-10 - 2**-23) / 4096], F32)  # FP19 keeps 1.0 of the mantissa
  y16 = npu_ops.npu_quant_matmul(x1, x2, scale, output_dtype=jnp.float16)
  assert float(y16[0, 0]) == 1.0  # untruncated it would round to 1 + 2^-10
  np.testing.assert_array_equal(y16, ref.quant_matmul(x1, x2, ref.fp19(scale), out="float16"))
  y32 = npu_ops.npu_quant_matmul(x1, x2, scale, pertoken_scale=np.ones(1, F32),
                                 output_dtype=jnp.float16)
  assert float(y32[0, 0]) == 1 + 2**-10  # per-token path: the scale is used as is
  ybf = npu_ops.npu_quant_matmul(x1, x2, scale, output_dtype=jnp.bfloat16)
  np.testing.assert_array_equal(ybf, ref.quant_matmul(x1, x2, scale, out="bfloat16"))


@pytest.mark.parametrize("out", ["float16", "bfloat16"])
@pytest.mark.parametrize("bias", [None, "int32", "float32", "bfloat16"])
@pytest.mark.parametrize("pertoken", [False, True])
def test_quant_matmul_float_outputs(out, bias, pertoken):
  rng = np.random.default_rng(3)
  x1, x2 = ints(rng, (5, 40)), ints(rng, (40, 16))
  scale = rng.uniform(1e-4, 1e-3, 16).astype(F32)
  pt = rng.uniform(0.5, 2, 5).astype(F32) if pertoken else None
  b = {None: None, "int32": rng.integers(-900, 900, 16).astype(np.int32),
       "float32": rng.normal(size=16).astype(F32),
       "bfloat16": rng.normal(size=16).astype(BF16)}[bias]
  got = npu_ops.npu_quant_matmul(x1, x2, scale, pertoken_scale=pt, bias=b,
                                 output_dtype=jnp.dtype(out))
  truncated = out == "float16" and not pertoken
  want = ref.quant_matmul(x1, x2, ref.fp19(scale) if truncated else scale, pertoken=pt, bias=b,
                          out=out)
  assert got.dtype == want.dtype
  np.testing.assert_allclose(np.asarray(got, F32), want.astype(F32), rtol=1e-2 if out == "bfloat16" else 1e-3,
                             atol=1e-3)


def test_quant_matmul_int32_output_batch_broadcast_and_int4():
  rng = np.random.default_rng(4)
  x1, x2 = ints(rng, (2, 1, 4, 16)), ints(rng, (3, 16, 8))
  bias = rng.integers(-100, 100, (3, 1, 8)).astype(np.int32)
  got = npu_ops.npu_quant_matmul(x1, x2, np.ones(1, F32), output_dtype=jnp.int32)
  assert got.shape == (2, 3, 4, 8)
  np.testing.assert_array_equal(got, ref.quant_matmul(x1, x2, 1.0, out="int32"))
  got = npu_ops.npu_quant_matmul(x1[0], x2, np.ones(1, F32), bias=bias, output_dtype=jnp.int32)
  np.testing.assert_array_equal(got, ref.quant_matmul(x1[0], x2, 1.0, bias=bias, out="int32"))
  a, b = rng.integers(-8, 8, (4, 32)), rng.integers(-8, 8, (32, 16))
  scale = rng.uniform(1e-3, 1e-2, 16).astype(F32)
  got = npu_ops.npu_quant_matmul(ref.pack_int4(a), ref.pack_int4(b), scale)
  np.testing.assert_array_equal(got, ref.quant_matmul(a, b, ref.fp19(scale)))
  # torch_npu's transposed pack: (n, k) packed, then transposed: words [k/8, n]
  got = npu_ops.npu_quant_matmul(ref.pack_int4(a), ref.pack_int4(b.T).T, scale)
  np.testing.assert_array_equal(got, ref.quant_matmul(a, b, ref.fp19(scale)))


def test_quant_matmul_exports_with_symbolic_batch_and_rows():
  """jax.export with symbolic batch and row dims (the batch broadcast took only ints): the
  exported call equals the formula at a concrete size."""
  from jax import export  # noqa: PLC0415
  rng = np.random.default_rng(5)
  x2, scale = ints(rng, (16, 8)), rng.uniform(1e-3, 1e-2, 8).astype(F32)
  b, m = export.symbolic_shape("b, m")
  exp = export.export(jax.jit(lambda a: npu_ops.npu_quant_matmul(a, x2, scale)))(
      jax.ShapeDtypeStruct((b, m, 16), jnp.int8))
  x1 = ints(rng, (3, 5, 16))
  assert_int8_equal(exp.call(x1), ref.quant_matmul(x1, x2, ref.fp19(scale)))


def test_quant_matmul_native_int4():
  """A.2: int4 operands as native jnp.int4 arrays, the same values as the int32 words."""
  rng = np.random.default_rng(14)
  a, b = rng.integers(-8, 8, (2, 5, 32)), rng.integers(-8, 8, (32, 16))
  scale = rng.uniform(1e-2, 1e-1, 16).astype(F32)
  native = lambda v: jnp.asarray(v, jnp.int4)
  got = npu_ops.npu_quant_matmul(native(a), native(b), scale)
  np.testing.assert_array_equal(got, ref.quant_matmul(a, b, ref.fp19(scale)))
  got = npu_ops.npu_quant_matmul(native(a), native(b), scale, output_dtype=jnp.int32)
  np.testing.assert_array_equal(got, ref.quant_matmul(a, b, 1.0, out="int32"))
  with pytest.raises(TypeError, match="x2"):
    npu_ops.npu_quant_matmul(native(a), ref.pack_int4(b), scale)


@pytest.mark.parametrize("k", [16, 17, 40])
def test_quant_matmul_takes_nd_weights_and_says_so_for_nz(k):
  """x2 is ND (2-6 dims cannot tell a FRACTAL_NZ weight from a batched one): cast back
  with npu_format_cast(x2, 2, shape=(k, n)) it gives x1 @ x2; an NZ weight whose storage
  cannot be read as ND raises, saying how to cast it back."""
  rng = np.random.default_rng(15)
  x1, x2 = ints(rng, (4, k)), ints(rng, (k, 64))
  nz = npu_ops.npu_format_cast(x2, npu_ops.FORMAT_NZ)
  back = npu_ops.npu_format_cast(nz, 2, shape=(k, 64))
  got = npu_ops.npu_quant_matmul(x1, back, np.ones(1, F32), output_dtype=jnp.int32)
  np.testing.assert_array_equal(got, ref.quant_matmul(x1, x2, 1.0, out="int32"))
  if k != 16:  # k = 16: [2, 1, 16, 32] is also a batched [16, 32] weight
    with pytest.raises(ValueError, match=r"x2: .*npu_format_cast\(x2, 2"):
      npu_ops.npu_quant_matmul(x1, nz, np.ones(1, F32), output_dtype=jnp.int32)


def test_quant_matmul_under_jit_with_closed_over_words():
  rng = np.random.default_rng(5)
  x1, x2 = ints(rng, (3, 16)), ints(rng, (16, 8))
  words = npu_ops.npu_trans_quant_param(np.full(8, 0.01, F32), np.full(8, 3.0, F32))
  got = jax.jit(lambda a: npu_ops.npu_quant_matmul(a, x2, words))(x1)
  np.testing.assert_array_equal(got, ref.quant_matmul(x1, x2, ref.fp19(np.full(8, 0.01, F32)),
                                                      offset=np.full(8, 3.0, F32)))


QM_ERRORS = {
    "x1 rank": (lambda: npu_ops.npu_quant_matmul(np.ones(4, np.int8), np.ones((4, 2), np.int8), np.ones(1, F32)), ValueError, "x1"),
    "dtype mix": (lambda: npu_ops.npu_quant_matmul(np.ones((2, 8), np.int8), np.ones((8, 1), np.int32), np.ones(1, F32)), TypeError, "x2"),
    "k mismatch": (lambda: npu_ops.npu_quant_matmul(np.ones((2, 8), np.int8), np.ones((4, 2), np.int8), np.ones(1, F32)), ValueError, "x2"),
    "batch": (lambda: npu_ops.npu_quant_matmul(np.ones((2, 2, 8), np.int8), np.ones((3, 8, 2), np.int8), np.ones(1, F32)), ValueError, "batch"),
    "last dim": (lambda: npu_ops.npu_quant_matmul(np.ones((1, 65536), np.int8), np.ones((65536, 1), np.int8), np.ones(1, F32)), ValueError, "65535"),
    "scale shape": (lambda: npu_ops.npu_quant_matmul(np.ones((2, 8), np.int8), np.ones((8, 4), np.int8), np.ones(3, F32)), ValueError, "scale"),
    "scale dtype": (lambda: npu_ops.npu_quant_matmul(np.ones((2, 8), np.int8), np.ones((8, 4), np.int8), np.ones(4, np.float16)), TypeError, "scale"),
    "output": (lambda: npu_ops.npu_quant_matmul(np.ones((2, 8), np.int8), np.ones((8, 4), np.int8), np.ones(4, F32), output_dtype=jnp.float32), TypeError, "output_dtype"),
    "offset fp16": (lambda: npu_ops.npu_quant_matmul(np.ones((2, 8), np.int8), np.ones((8, 4), np.int8), np.ones(4, F32), offset=np.ones(4, F32), output_dtype=jnp.float16), ValueError, "offset"),
    "pertoken int8": (lambda: npu_ops.npu_quant_matmul(np.ones((2, 8), np.int8), np.ones((8, 4), np.int8), np.ones(4, F32), pertoken_scale=np.ones(2, F32)), ValueError, "pertoken_scale"),
    "pertoken shape": (lambda: npu_ops.npu_quant_matmul(np.ones((2, 8), np.int8), np.ones((8, 4), np.int8), np.ones(4, F32), pertoken_scale=np.ones(3, F32), output_dtype=jnp.bfloat16), ValueError, "pertoken_scale"),
    "bias shape": (lambda: npu_ops.npu_quant_matmul(np.ones((2, 8), np.int8), np.ones((8, 4), np.int8), np.ones(4, F32), bias=np.ones(3, np.int32)), ValueError, "bias"),
    "float bias int8": (lambda: npu_ops.npu_quant_matmul(np.ones((2, 8), np.int8), np.ones((8, 4), np.int8), np.ones(4, F32), bias=np.ones(4, F32)), TypeError, "bias"),
    "round_mode": (lambda: npu_ops.npu_trans_quant_param(np.ones(2, F32), round_mode=2), ValueError, "round_mode"),
    "tqp offset": (lambda: npu_ops.npu_trans_quant_param(np.ones(2, F32), np.ones(3, F32)), ValueError, "offset"),
}


@pytest.mark.parametrize("name", list(QM_ERRORS))
def test_quant_matmul_errors(name):
  fn, exc, match = QM_ERRORS[name]
  with pytest.raises(exc, match=match):
    fn()


# --- int4 packing -------------------------------------------------------------------

def test_int4pack_all_nibbles_and_round_trips():
  w = np.tile(np.arange(-8, 8, dtype=np.int32), (3, 2))  # (3, 32): every value
  packed = npu_ops.npu_convert_weight_to_int4pack(w)
  assert packed.dtype == jnp.int32 and packed.shape == (3, 4)
  np.testing.assert_array_equal(packed, ref.pack_int4(w))
  np.testing.assert_array_equal(npu_ops.npu_convert_int4pack_to_weight(packed), w)
  native = npu_ops.int4pack_to_native(packed)
  assert native.dtype == jnp.int4
  np.testing.assert_array_equal(native.astype(jnp.int32), w)
  np.testing.assert_array_equal(npu_ops.native_to_int4pack(native), packed)
  # transposed feed: pack (n, k) then transpose, as torch_npu documents
  np.testing.assert_array_equal(npu_ops.npu_convert_weight_to_int4pack(w).T, ref.pack_int4(w).T)


def test_int4pack_of_an_nz_weight_is_the_nz_of_the_packed_weight():
  """B.3, NZ input: the weight is cast back to ND, packed, and laid out as NZ again with
  C0 = 8 int32 (`nz[j//8, i//16, i%16, j%8] = packed[i, j]`): the seed's graph-mode flow
  (is_weight_nz, k = 17, n = 72), where it then feeds npu_weight_quant_batchmatmul."""
  rng = np.random.default_rng(18)
  k, n = 17, 72
  w = rng.integers(-8, 8, (k, n)).astype(np.int32)
  got = npu_ops.npu_convert_weight_to_int4pack(npu_ops.npu_format_cast(w, npu_ops.FORMAT_NZ))
  packed = ref.pack_int4(w)                                # (k, n/8)
  want = np.zeros((-(-(n // 8) // 8), -(-k // 16), 16, 8), np.int32)
  for i, j in np.ndindex(*packed.shape):
    want[j // 8, i // 16, i % 16, j % 8] = packed[i, j]
  np.testing.assert_array_equal(got, want)
  x = rng.normal(size=(3, k)).astype(np.float16)
  scale = rng.uniform(0.01, 0.05, n).astype(np.float16)
  np.testing.assert_array_equal(npu_ops.npu_weight_quant_batchmatmul(x, got, scale),
                                npu_ops.npu_weight_quant_batchmatmul(x, packed, scale))
  with pytest.raises(ValueError, match="weight"):
    npu_ops.npu_convert_weight_to_int4pack(np.zeros((2, 2, 16, 4), np.int32))


def test_int4pack_errors():
  with pytest.raises(ValueError, match=r"\[-8, 7\]"):
    npu_ops.npu_convert_weight_to_int4pack(np.full((2, 8), 8, np.int32))
  with pytest.raises(ValueError, match="multiple of 8"):
    npu_ops.npu_convert_weight_to_int4pack(np.zeros((2, 12), np.int32))
  with pytest.raises(TypeError, match="weight"):
    npu_ops.npu_convert_weight_to_int4pack(np.zeros((2, 8), np.int8))
  for unpack in (npu_ops.npu_convert_int4pack_to_weight, npu_ops.int4pack_to_native):
    with pytest.raises(ValueError, match="packed: expected int32 words"):
      unpack(np.array(5, np.int32))


# --- npu_weight_quant_batchmatmul ------------------------------------------------------

@pytest.mark.parametrize("xdt", [np.float16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("wform", ["int8", "int4_words", "int4_words_transposed", "int4_native"])
@pytest.mark.parametrize("with_offset", [False, True])
def test_weight_quant_batchmatmul(xdt, granularity, wform, with_offset):
  rng = np.random.default_rng(6)
  m, k, n, gs = 5, 80, 16, 32  # k = 80: the last group (rows 64..79) is partial
  x = rng.normal(size=(m, k)).astype(xdt)
  lo, hi = (-128, 128) if wform == "int8" else (-8, 8)
  w = rng.integers(lo, hi, (k, n))
  shape = {"tensor": (1,), "channel": (n,), "group": (3, n)}[granularity]
  scale = rng.uniform(0.01, 0.05, shape).astype(xdt)
  offset = rng.uniform(-3, 3, shape).astype(xdt) if with_offset else None
  w_in = {"int8": w.astype(np.int8), "int4_words": ref.pack_int4(w),
          # torch_npu's transposed pack: (n, k) packed, then transposed: words [k/8, n]
          "int4_words_transposed": ref.pack_int4(w.T).T,
          "int4_native": w.astype(np.int8).astype(ml_dtypes.int4)}[wform]
  rows = lambda v: None if v is None else (np.repeat(v, gs, axis=0)[:k] if granularity == "group"
                                           else v.reshape(1, -1))
  bias = rng.normal(size=n).astype(np.float16 if xdt == np.float16 else F32)
  got = npu_ops.npu_weight_quant_batchmatmul(
      x, w_in, scale, offset, bias=bias, antiquant_group_size=gs if granularity == "group" else 0)
  want = ref.weight_quant_matmul(x, w, rows(scale), rows(offset), bias)
  assert got.dtype == xdt
  tol = 2**-8 if xdt == np.float16 else 2**-6  # one or two roundings of the output dtype
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol,
                             atol=tol * np.abs(want).max())


@pytest.mark.parametrize("xdt", [np.float16, BF16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("with_offset", [False, True])
def test_weight_quant_batchmatmul_rounds_the_weight_where_the_golden_does(xdt, with_offset):
  """x diagonal with odd entries (3, 5, 7): out[i] = x_ii * W'[i] is exact in float32 and
  rounded once to x's dtype, so B.6's roundings of W' itself (after the offset, after the
  scale, to x's dtype) are compared bit for bit. (XLA keeps a bfloat16 product in float32
  unless told to round it: its excess-precision rule, on by default.)"""
  rng = np.random.default_rng(17)
  k, n = 64, 32
  x = np.diag(rng.choice([3, 5, 7, -3, -5], k)).astype(xdt)
  w = rng.integers(-128, 128, (k, n)).astype(np.int8)
  scale = rng.uniform(0.001, 0.05, (1, n)).astype(xdt)
  offset = rng.uniform(-3, 3, (1, n)).astype(xdt) if with_offset else None
  for run in (npu_ops.npu_weight_quant_batchmatmul, jax.jit(npu_ops.npu_weight_quant_batchmatmul)):
    got = run(x, w, scale[0], None if offset is None else offset[0])
    want = ref.weight_quant_matmul(x, w, scale, offset).astype(xdt)  # one term a row: exact
    np.testing.assert_array_equal(np.asarray(got, F32), want.astype(F32))


def test_weight_quant_batchmatmul_int8_output():
  rng = np.random.default_rng(7)
  x = rng.normal(size=(4, 64)).astype(np.float16)
  w = rng.integers(-128, 128, (64, 8)).astype(np.int8)
  scale = np.full((8,), 0.01, np.float16)
  qs, qo = rng.uniform(0.5, 2, 8).astype(F32), rng.uniform(-10, 10, 8).astype(F32)
  y = ref.weight_quant_matmul(x, w, scale.reshape(1, -1))
  want = ref.requant(y.astype(F32) * ref.fp19(qs), qo)
  for q_scale, q_offset in ((qs, qo), (npu_ops.npu_trans_quant_param(qs, qo), None)):
    got = npu_ops.npu_weight_quant_batchmatmul(x, w, scale, quant_scale=q_scale,
                                               quant_offset=q_offset)
    assert got.dtype == jnp.int8
    assert_int8_equal(got, want)


WQ_ERRORS = {
    "x dtype": (lambda: npu_ops.npu_weight_quant_batchmatmul(np.ones((2, 8), F32), np.ones((8, 4), np.int8), np.ones(1, F32)), TypeError, "x"),
    "scale dtype": (lambda: npu_ops.npu_weight_quant_batchmatmul(np.ones((2, 8), np.float16), np.ones((8, 4), np.int8), np.ones(1, F32)), TypeError, "antiquant_scale"),
    "scale shape": (lambda: npu_ops.npu_weight_quant_batchmatmul(np.ones((2, 8), np.float16), np.ones((8, 4), np.int8), np.ones(3, np.float16)), ValueError, "antiquant_scale"),
    "group size": (lambda: npu_ops.npu_weight_quant_batchmatmul(np.ones((2, 80), np.float16), np.ones((80, 4), np.int8), np.ones((3, 4), np.float16), antiquant_group_size=20), ValueError, "antiquant_group_size"),
    "group shape": (lambda: npu_ops.npu_weight_quant_batchmatmul(np.ones((2, 80), np.float16), np.ones((80, 4), np.int8), np.ones((2, 4), np.float16), antiquant_group_size=32), ValueError, "antiquant_scale"),
    "offset shape": (lambda: npu_ops.npu_weight_quant_batchmatmul(np.ones((2, 8), np.float16), np.ones((8, 4), np.int8), np.ones(4, np.float16), np.ones(1, np.float16)), ValueError, "antiquant_offset"),
    # the caller's array, not the op's internal [1, k, n] one
    "k mismatch": (lambda: npu_ops.npu_weight_quant_batchmatmul(np.ones((2, 8), np.float16), np.ones((6, 4), np.int8), np.ones(4, np.float16)), ValueError, r"weight: expected ND \[k=8, n\] \(k from x\), got int8\[6, 4\]"),
    "words k mismatch": (lambda: npu_ops.npu_weight_quant_batchmatmul(np.ones((2, 64), np.float16), np.ones((10, 4), np.int32), np.ones(32, np.float16)), ValueError, r"\[k=64, n/8\] .* or the transposed pack \[k/8=8, n\], got int32\[10, 4\]"),
    "nz storage": (lambda: npu_ops.npu_weight_quant_batchmatmul(np.ones((2, 64), np.float16), np.ones((1, 1, 16, 32), np.int8), np.ones(32, np.float16)), ValueError, r"FRACTAL_NZ storage \[1, 4, 16, 32\] .*got int8\[1, 1, 16, 32\]"),
    "nz quant_scale": (lambda: npu_ops.npu_weight_quant_batchmatmul(np.ones((2, 64), np.float16), npu_ops.npu_format_cast(np.ones((64, 32), np.int8), 29), np.ones(32, np.float16), quant_scale=np.ones(32, F32)), ValueError, "quant_scale: expected None for a FRACTAL_NZ weight"),
    "bias dtype": (lambda: npu_ops.npu_weight_quant_batchmatmul(np.ones((2, 8), BF16), np.ones((8, 4), np.int8), np.ones(4, BF16), bias=np.ones(4, BF16)), TypeError, "bias"),
    "quant_offset alone": (lambda: npu_ops.npu_weight_quant_batchmatmul(np.ones((2, 8), np.float16), np.ones((8, 4), np.int8), np.ones(4, np.float16), quant_offset=np.ones(4, F32)), ValueError, "quant_offset"),
}


@pytest.mark.parametrize("name", list(WQ_ERRORS))
def test_weight_quant_errors(name):
  fn, exc, match = WQ_ERRORS[name]
  with pytest.raises(exc, match=match):
    fn()


# --- LinearA8W8Quant ----------------------------------------------------------------------

@pytest.mark.parametrize("offset,bias,out", [(False, True, None), (True, True, None),
                                             (False, False, jnp.float16),
                                             (False, True, jnp.bfloat16)])
def test_linear_a8w8_quant_under_nnx_jit(offset, bias, out):
  from flax import nnx
  from npu_ops.nn import LinearA8W8Quant
  rng = np.random.default_rng(8)
  layer = LinearA8W8Quant(48, 24, bias=bias, offset=offset, output_dtype=out, rngs=nnx.Rngs(0))
  layer.scale[...] = jnp.asarray(rng.uniform(1e-4, 1e-3, 24).astype(F32))
  if offset:
    layer.offset[...] = jnp.asarray(rng.uniform(-20, 20, 24).astype(F32))
  if bias:
    layer.bias[...] = jnp.asarray(rng.integers(-500, 500, 24).astype(np.int32))
  assert layer.weight[...].shape == (24, 48) and layer.weight[...].dtype == jnp.int8
  x = ints(rng, (2, 7, 48))
  got = nnx.jit(lambda mod, x: mod(x))(layer, x)
  w_t = np.asarray(layer.weight[...]).T
  scale = np.asarray(layer.scale[...])
  out_name = {None: "int8", jnp.float16: "float16", jnp.bfloat16: "bfloat16"}[out]
  eff = ref.fp19(scale) if out_name != "bfloat16" else scale  # torch_npu: trans_quant_param
  want = ref.quant_matmul(x, w_t, eff, offset=np.asarray(layer.offset[...]) if offset else None,
                          bias=np.asarray(layer.bias[...]) if bias else None, out=out_name)
  assert got.dtype == want.dtype and got.shape == (2, 7, 24)
  np.testing.assert_allclose(np.asarray(got, F32), want.astype(F32), rtol=1e-2, atol=1e-2)


def test_linear_a8w8_quant_batched_weight():
  """B.2.2: weight (batch, n, k), 2-6 dims (the seed doc): x @ weight.transpose(-2, -1),
  the batch broadcast against x's."""
  from flax import nnx
  from npu_ops.nn import LinearA8W8Quant
  rng = np.random.default_rng(16)
  for batch, x_shape in (((3,), (3, 5, 8)), ((2, 1), (4, 5, 8)), ((2,), (2, 5, 8))):
    layer = LinearA8W8Quant(8, 2 if batch == (2,) else 6, bias=False,
                            output_dtype=jnp.int32, rngs=nnx.Rngs(0))
    n = layer.out_features
    w = ints(rng, (*batch, n, 8))
    layer.weight.set_value(jnp.asarray(w))  # a new shape
    x = ints(rng, x_shape)
    want = ref.quant_matmul(x, np.swapaxes(w, -1, -2), 1.0, out="int32")
    np.testing.assert_array_equal(layer(x), want)


def test_weight_quant_batchmatmul_nz_weight():
  rng = np.random.default_rng(9)
  x = rng.normal(size=(3, 40)).astype(np.float16)
  w = rng.integers(-128, 128, (40, 48)).astype(np.int8)  # k, n not multiples of the fractal
  scale = rng.uniform(0.01, 0.05, 48).astype(np.float16)
  got = npu_ops.npu_weight_quant_batchmatmul(x, ref.nd_to_nz(w, 32), scale)
  want = ref.weight_quant_matmul(x, w, scale.reshape(1, -1))
  np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=2**-8,
                             atol=2**-8 * np.abs(want).max())
  with pytest.raises(ValueError, match="antiquant_scale"):  # per-tensor scale cannot give n
    npu_ops.npu_weight_quant_batchmatmul(x, ref.nd_to_nz(w, 32), scale[:1])
