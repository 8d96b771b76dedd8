"""fp8 per-token and MX output quantization, MX inputs (semantics A.3 item 6, B.1.6), against
the NumPy goldens of numpy_reference (written from the formulas, bit for bit)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import npu_ops
from npu_ops._src import quant
import numpy_reference as ref
from helpers import SCALE_ULPS, assert_scale_close, counts_to_list
from implementations import IMPLEMENTATIONS, impls, kernels_for, kernels_without

F32 = np.float32
FP8 = ["float8_e4m3fn", "float8_e5m2"]
MX = FP8 + ["float4_e2m1fn"]
RNG = np.random.default_rng(20)


@pytest.fixture(autouse=True)
def _same_data_in_any_order():
  """Each test draws from a fresh generator: its data does not depend on which tests
  ran before it in the same worker."""
  global RNG
  RNG = np.random.default_rng(20)


def bits(a):
  """Raw bytes of codes (NaN codes compare equal, signed zeros apart)."""
  a = np.asarray(a)
  return a.view(np.uint8) if a.dtype.itemsize == 1 else a


def assert_same_bits(got, want):
  """Equal bits, except that any NaN equals any NaN (fp8 NaN bit patterns are not
  specified: XLA writes e5m2 NaN as 0x7F, ml_dtypes as 0x7E)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape,
                                                               want.dtype, want.shape)
  both_nan = np.isnan(got.astype(F32)) & np.isnan(want.astype(F32)) if got.dtype.kind == "V" or \
      jnp.issubdtype(got.dtype, jnp.floating) else False
  diff = (bits(got) != bits(want)) & ~both_nan
  assert not diff.any(), f"{diff.sum()} of {diff.size} differ, first at {np.argwhere(diff)[:3]}"


def assert_fused_close(got, want, mode, max_ulps=SCALE_ULPS):
  """The fused op's outputs against a golden computed from the same C, as README claims
  them: every fp8 / fp4 / int8 code and every MX scale byte equal (bit for bit), per-token
  float32 scales within helpers.SCALE_ULPS (amax / qmax correctly rounded on both sides;
  the amax can differ only through SwiGLU's exp, NumPy's in the golden, XLA's in the op)."""
  q, s = got
  want_q, want_s = want
  q, want_q = np.asarray(q), np.asarray(want_q)
  assert q.dtype == want_q.dtype and q.shape == want_q.shape
  assert_same_bits(q, want_q)
  if mode == 2:
    e8m0_bytes = lambda a: np.asarray(a).view(np.uint8)  # e8m0 or uint8 -> bytes
    s, want_s = e8m0_bytes(s), e8m0_bytes(want_s)
    assert s.shape == want_s.shape
    np.testing.assert_array_equal(s, want_s)
  else:
    assert np.asarray(s).dtype == want_s.dtype
    assert_scale_close(s, want_s, max_ulps)


def spread_rows(rows, d):
  """Rows with magnitudes from 1e-3 to 1e4, some with one outlier, plus edge rows."""
  s = RNG.standard_normal((rows, d)) * 10.0 ** RNG.uniform(-3, 4, (rows, 1))
  s[::3, 0] *= 50.0  # outliers: the rest of the row lands on the small codes
  s[1] = 0.0  # amax 0: codes 0, scale 0
  return s.astype(F32)


# --- the quantizers on their own -------------------------------------------------------------

@pytest.mark.parametrize("out", FP8)
def test_quantize_per_token_fp8(out, compiler):
  s = spread_rows(24, 77)
  # tiny rows: max / amax overflows float32, and (amax below max * 2**-126) subnormal scales
  # (normal numbers: XLA:CPU reads subnormal inputs as 0)
  top = np.array([-37.5, -37, -36, -35, -34, -33])[:, None]
  tiny = RNG.choice([-1, 1], (6, 77)) * 10.0 ** RNG.uniform(-37.9, top, (6, 77))
  s = np.concatenate([s, tiny.astype(F32)])
  s[2, :4] = [448.0, -464.0, 3e38, -1e-3]  # a huge amax
  spec = npu_ops.DynamicQuant(getattr(jnp, out))
  q, scale = jax.jit(npu_ops.quantize_per_token, static_argnums=1)(s, spec)
  want_q, want_s = ref.per_token(s, out)
  assert_same_bits(q, want_q)
  assert_same_bits(scale, want_s)
  assert np.any(want_s[-6:] < np.finfo(F32).tiny)  # some scales are subnormal
  assert np.all(np.abs(np.asarray(q, F32)) <= ref.QMAX[out]) and not np.any(np.isnan(
      np.asarray(q, F32)))


def mx_rows(d):
  """Rows exercising every MX branch: random spreads, an inf and a NaN block, an all-zero and
  an all-subnormal block, signed zeros, blocks whose maximum saturates the element type."""
  s = spread_rows(12, d)
  b = min(d, 32)  # the first block
  s[3, 5 % d] = np.inf
  s[4, 40 % d] = np.nan
  s[5, :b] = 0.0
  s[5, 3] = -0.0
  s[6, :b] = (RNG.standard_normal(b) * 1e-39).astype(F32)  # bf16 subnormals: E = 0
  s[7, :b] = 1.0
  s[7, 6] = 1.9375 * 2.0 ** 8  # e4m3: 496 after scaling -> saturates at 448
  s[8, :] *= 10.0 ** RNG.uniform(-30, 30, d)  # blocks spanning far more than the type
  return s.astype(F32)


@pytest.mark.parametrize("out", MX)
@pytest.mark.parametrize("d", [64, 80, 7])  # k groups of 64, a short last block, one block
def test_quantize_mx(out, d, compiler):
  s = mx_rows(d)
  codes, scales = jax.jit(npu_ops.quantize_mx, static_argnums=1)(s, getattr(jnp, out))
  want_codes, want_bytes = ref.mx_quant(s, out)
  assert_same_bits(codes, want_codes)
  assert scales.dtype == jnp.float8_e8m0fnu
  assert_same_bits(jax.lax.bitcast_convert_type(scales, jnp.uint8), want_bytes)
  # back to values: codes * 2**(byte - 127), NaN blocks NaN
  back = np.asarray(npu_ops.dequantize_mx(codes, scales))
  want = want_codes.astype(np.float64) * np.repeat(ref.e8m0_value(want_bytes), 32, axis=1)[:, :d]
  finite = np.isfinite(want) & (np.abs(want) >= np.finfo(F32).tiny)  # XLA:CPU flushes below
  np.testing.assert_array_equal(back[finite], want[finite].astype(F32))
  assert np.all(np.isnan(back[np.isnan(want)]))


def test_mx_branches_are_covered():
  s = mx_rows(64)
  codes, scales = ref.mx_quant(s, "float8_e4m3fn")
  assert scales[3, 0] == 255 and scales[4, 1] == 255 and scales[5, 0] == 0 and scales[6, 0] == 0
  assert bits(codes)[5, 3] == 0x80  # -0 * 0 keeps its sign
  # E = 127 + 8 (of 496): scale 2**(8 - 8) = 1, 496 saturates at 448 (not NaN)
  assert scales[7, 0] == 127 and float(codes[7, 6]) == 448.0 and float(codes[7, 0]) == 1.0


def test_quantizer_errors():
  s = jnp.ones((2, 64), jnp.float32)
  with pytest.raises(ValueError, match="dtype: expected one of float8_e4m3fn"):
    npu_ops.quantize_mx(s, jnp.int8)
  with pytest.raises(ValueError, match="spec: expected a per-token DynamicQuant"):
    npu_ops.quantize_per_token(s, npu_ops.DynamicQuant(jnp.float8_e4m3fn, 2))
  with pytest.raises(ValueError, match="DynamicQuant.dtype"):
    npu_ops.DynamicQuant(jnp.float4_e2m1fn, 0)
  with pytest.raises(ValueError, match="scales: expected shape"):
    npu_ops.dequantize_mx(s.astype(jnp.float8_e4m3fn), jnp.ones((2, 3), jnp.uint8))
  with pytest.raises(TypeError, match="scales: expected float8_e8m0fnu or uint8"):
    npu_ops.dequantize_mx(s.astype(jnp.float8_e4m3fn), jnp.ones((2, 2), jnp.float32))


# --- the fused op: int8 / int4 inputs, fp8 and MX outputs ---------------------------------------

def int_case(seed, scenario, m, k, n, e):
  from test_swiglu_quant import make_case  # noqa: PLC0415 (one case builder for the op)
  return make_case(seed, scenario, m, k, n, e)


def golden_out(out, mode):
  return ("mx", out) if mode == 2 else out


@pytest.mark.parametrize("out,mode,dynamic", [
    ("float8_e4m3fn", 0, False), ("float8_e5m2", 0, True), ("float8_e5m2", 2, False),
    ("float4_e2m1fn", 2, True)])
def test_fused_a8w8_outputs(out, mode, dynamic):
  counts = [9, 0, 30, 12]  # 51 of 56 rows, an empty group
  x, w, ws, xs = int_case(3, "A8W8", 56, 64, 200, 4)  # n/2 = 100: blocks of 32 and 64 ragged
  gl = jnp.asarray(counts) if dynamic else counts
  q, s = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w, ws, xs, gl, group_list_type=1, quant_mode=mode, quant_dtype=getattr(jnp, out))
  want = ref.swiglu_quant(x, w, ws, xs, ref.group_bounds(counts, 1), scenario="A8W8",
                         out=golden_out(out, mode))
  if mode == 2:
    assert s.dtype == jnp.float8_e8m0fnu and s.shape == (56, 2, 2)
  assert_fused_close((q, s), want, mode)


@pytest.mark.parametrize("scenario,out,mode", [("A8W4", "float8_e4m3fn", 0),
                                               ("A4W4", "float4_e2m1fn", 2)])
def test_fused_int4_outputs(scenario, out, mode):
  """A8W4's golden is B.1.4's literal hi/lo-nibble sum, which rounds differently from the
  exact int32 `x @ W - 8 * colsum` the op computes: C differs by an ulp in some rows."""
  from helpers import int4_array  # noqa: PLC0415
  counts = [20, 0, 17]
  x, w, ws, xs = int_case(4, scenario, 40, 64, 128, 3)
  x_in = int4_array(x) if scenario == "A4W4" else x
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x_in, int4_array(w), ws, xs, jnp.asarray(counts), group_list_type=1, quant_mode=mode,
      quant_dtype=getattr(jnp, out))
  assist = ref.canonical_assist(w, ws) if scenario == "A8W4" else None
  want = ref.swiglu_quant(x, w, ws, xs, ref.group_bounds(counts, 1), scenario=scenario,
                          assist=assist, out=golden_out(out, mode))
  # codes all equal; A8W4's C an ulp apart (above), through SwiGLU: scale measured 4 ulps
  assert_fused_close(got, want, mode, max_ulps=6 if scenario == "A8W4" else SCALE_ULPS)


def test_fused_outputs_on_the_reference_implementation():
  counts = [10, 20]
  x, w, ws, xs = int_case(5, "A8W8", 32, 64, 128, 2)
  for out, mode in (("float8_e4m3fn", 2),):  # per token: the int8 reference code path
    kw = dict(group_list_type=1, quant_mode=mode, quant_dtype=getattr(jnp, out))
    fast = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws, xs, counts, **kw)
    slow = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws, xs, counts,
                                                      implementation="reference", **kw)
    for a, b in zip(fast, slow):
      assert_same_bits(a, b)


# --- MX inputs (dequant_mode=2) -------------------------------------------------------------------

def mx_values(shape, dtype):
  """Element values whose block sums are exact in float32 in any order: magnitudes in
  [0.5, 4) (fp8: a 2**-4 grid at worst), so every product is a multiple of 2**-8 below 16."""
  v = RNG.uniform(0.5, 4, shape) * RNG.choice([-1, 1], shape)
  v[RNG.random(shape) < 0.1] = 0
  return v.astype(getattr(ml_dtypes, dtype))


def mx_case(m, k, n, e, x_dtype, w_dtype):
  kb = -(-k // 64)
  x, w = mx_values((m, k), x_dtype), mx_values((e, k, n), w_dtype)
  # scales 2**-1 .. 2**1: with k <= 96 every partial sum stays within float32's 24 bits
  x_scale = RNG.integers(126, 129, (m, kb, 2)).astype(np.uint8)
  w_scale = RNG.integers(126, 129, (e, kb, n, 2)).astype(np.uint8)
  return x, w, x_scale, w_scale


@pytest.mark.parametrize("x_dtype,w_dtype,out,mode", [
    ("float8_e4m3fn", "float8_e4m3fn", "float8_e4m3fn", 2),
    ("float8_e5m2", "float8_e4m3fn", "float8_e5m2", 0),
    ("float4_e2m1fn", "float4_e2m1fn", "float4_e2m1fn", 2),
    ("float8_e4m3fn", "float8_e4m3fn", "int8", 0)])
def test_mx_inputs(x_dtype, w_dtype, out, mode):
  counts = [7, 0, 25, 12]  # 44 of 48 rows
  m, k, n, e = 48, 80, 128, 4  # k: two pairs of blocks, the last block 16 wide
  x, w, xs, ws = mx_case(m, k, n, e, x_dtype, w_dtype)
  bounds = ref.group_bounds(counts, 1)
  c = ref.mx_grouped_matmul(x, w, xs, ws, bounds)
  want_q, want_s = ref.quantize_out(ref.swiglu(c), golden_out(out, mode))
  e8m0 = lambda a: jax.lax.bitcast_convert_type(jnp.asarray(a), jnp.float8_e8m0fnu)
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w, e8m0(ws), e8m0(xs), jnp.asarray(counts_to_list(counts, 0)), dequant_mode=2,
      quant_mode=mode, quant_dtype=getattr(jnp, out))
  assert_fused_close(got, (want_q, want_s), mode)


def test_mx_inputs_under_grad_say_what_to_differentiate():
  """A gradient through the MX-input op (w.r.t. x before its fp8 cast) raises the fused op's
  TypeError, not a JAX-internal error."""
  m, k, n, e = 16, 64, 64, 2
  x, w, xs, ws = mx_case(m, k, n, e, "float8_e4m3fn", "float8_e4m3fn")
  op = lambda xf: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      xf.astype(jnp.float8_e4m3fn), w, ws, xs, [8, 8], group_list_type=1, dequant_mode=2)
  with pytest.raises(TypeError, match="has no derivative.*fake_quant_gmm_swiglu_quant"):
    jax.grad(lambda xf: op(xf)[1].sum())(jnp.asarray(x, jnp.float32))


def test_mx_inputs_transposed_weight_lists_and_one_compilation():
  counts = [12, 20, 0]
  m, k, n, e = 40, 64, 64, 3
  x, w, xs, ws = mx_case(m, k, n, e, "float8_e4m3fn", "float8_e4m3fn")
  kw = dict(group_list_type=1, dequant_mode=2, quant_mode=2, quant_dtype=jnp.float8_e4m3fn)
  want = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws, xs, counts, **kw)
  w_t, ws_t = np.swapaxes(w, 1, 2), np.swapaxes(ws, 1, 2)  # [e, n, k], [e, n, kb, 2]
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, [w_t], [ws_t], xs, counts, **kw)
  for a, b in zip(got, want):
    assert_same_bits(a, b)
  traces = []

  @jax.jit
  def op(gl):
    traces.append(1)
    return npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws, xs, gl, **kw)

  for c in (counts, [0, 40, 0], [5, 5, 5]):
    want = ref.quantize_out(
        ref.swiglu(ref.mx_grouped_matmul(x, w, xs, ws, ref.group_bounds(c, 1))),
        ("mx", "float8_e4m3fn"))
    assert_fused_close(op(jnp.asarray(c)), want, 2)
  assert len(traces) == 1


def test_mx_inputs_nz_fp8_weight_and_packed_fp4_x():
  """B.1.6's other input forms: a FRACTAL_NZ fp8 weight `[e, n/32, k/16, 16, 32]` (B.5's
  layout, built here in NumPy; logical n from weight_scale) and fp4 x packed two a byte
  (uint8 `[m, k/2]`, the first of each pair in the low nibble, as the fp4 output)."""
  counts = [9, 0, 14]
  m, k, n, e = 24, 96, 64, 3  # k: not a multiple of 64 (NZ pads it to 112 rows, 7 fractals)
  kw = dict(group_list_type=1, dequant_mode=2, quant_mode=2, quant_dtype=jnp.float8_e4m3fn)
  x, w, xs, ws = mx_case(m, k, n, e, "float8_e4m3fn", "float8_e4m3fn")
  want = ref.quantize_out(ref.swiglu(ref.mx_grouped_matmul(x, w, xs, ws, ref.group_bounds(
      counts, 1))), ("mx", "float8_e4m3fn"))
  nz = np.stack([ref.nd_to_nz(np.asarray(w[i]).view(np.uint8), 32) for i in range(e)]).view(
      np.asarray(w).dtype)
  assert nz.shape == (e, 2, 6, 16, 32)
  assert_fused_close(npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, nz, ws, xs, counts, **kw),
                     want, 2)
  x4, w4, xs4, ws4 = mx_case(m, k, n, e, "float4_e2m1fn", "float4_e2m1fn")
  codes = np.asarray(x4).view(np.uint8) & 0xF  # [m, k] (ml_dtypes: one code a byte)
  packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
  want = ref.quantize_out(ref.swiglu(ref.mx_grouped_matmul(x4, w4, xs4, ws4, ref.group_bounds(
      counts, 1))), ("mx", "float8_e4m3fn"))
  assert_fused_close(npu_ops.npu_grouped_matmul_swiglu_quant_v2(packed, w4, ws4, xs4, counts,
                                                                **kw), want, 2)
  with pytest.raises(ValueError, match="^weight: expected FRACTAL_NZ storage"):
    npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, nz[:, :1], ws, xs, counts, **kw)


def test_mx_inputs_group_offset():
  counts = [6, 10, 8, 9]  # 4 global groups; this shard holds experts 1 and 2
  m, k, n = 40, 64, 64
  x, w, xs, ws = mx_case(m, k, n, 4, "float8_e4m3fn", "float8_e4m3fn")
  kw = dict(group_list_type=1, dequant_mode=2, quant_mode=2, quant_dtype=jnp.float8_e5m2)
  full = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws, xs, counts, **kw)
  local = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w[1:3], ws[1:3], xs, jnp.asarray(counts),
                                                     group_offset=jnp.int32(1), **kw)
  rows = slice(6, 24)
  for a, b in zip(local, full):
    assert_same_bits(np.asarray(a)[rows], np.asarray(b)[rows])
    assert not np.any(bits(np.asarray(a)[:6])) and not np.any(bits(np.asarray(a)[24:]))


# --- the kernels (interpret mode): each kernel that declares the case ---------------------------

@pytest.mark.parametrize("impl,scenario,out", [
    (i, s, o) for s, o in (("A8W8", "float8_e4m3fn"), ("A8W4", "float8_e5m2"),
                           ("A4W4", "float8_e4m3fn"))
    for i in kernels_for(f"fused_{s}")])
def test_kernels_fp8_per_token(impl, scenario, out):
  from helpers import int4_array  # noqa: PLC0415
  counts = [30, 0, 41]  # 71 of 80 rows
  x, w, ws, xs = int_case(6, scenario, 80, 128, 256, 3)
  w_in = w if scenario == "A8W8" else int4_array(w)
  x_in = ref.pack_int4(x) if scenario == "A4W4" else x  # A4W4's tokens as torch_npu's words
  op = lambda **kw: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x_in, w_in, ws, xs, jnp.asarray(counts), group_list_type=1, quant_dtype=getattr(jnp, out),
      **kw)
  got = op(**IMPLEMENTATIONS[impl])
  assert got[0].dtype == getattr(jnp, out)
  assert_fused_close(got, op(implementation="xla"), 0)  # one epilogue function
  assist = ref.canonical_assist(w, ws) if scenario == "A8W4" else None
  assert_fused_close(got, ref.swiglu_quant(x, w, ws, xs, ref.group_bounds(counts, 1),
                                           scenario=scenario, assist=assist, out=out), 0)


@pytest.mark.parametrize("impl", impls("fused_A8W8"))
@pytest.mark.parametrize("out", FP8)
def test_fp8_per_token_row_with_inf_gives_nan_codes(impl, out, compiler):
  """A row whose SwiGLU holds inf: amax = inf, so `s * (qmax / amax)` is NaN there and 0
  elsewhere, cast to the type's NaN and 0; the scale is inf. Every implementation gives
  the cast's bits (quantize_per_token's) except a NaN's sign and payload, which `inf * 0`
  and the conversion leave to the compiler (x86's default NaN is negative; XLA:CPU at its
  default optimization level gave e5m2's 0x7F where ml_dtypes casts to 0xFE)."""
  x = np.ones((4, 32), np.int8)
  w = np.ones((1, 32, 8), np.int8)
  ws = np.full((1, 8), 1e-2, F32)
  ws[0, 5] = np.inf                                          # gate column 1 of row 0..3: S = inf
  q, scale = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w, ws, np.ones(4, F32), [4], quant_dtype=getattr(jnp, out), **IMPLEMENTATIONS[impl])
  s = ref.swiglu((x.astype(np.int64) @ w[0].astype(np.int64)).astype(F32) * ws[0])
  with np.errstate(invalid="ignore"):
    want = np.clip(s * (F32(ref.QMAX[out]) / np.abs(s).max(1, keepdims=True)),
                   -ref.QMAX[out], ref.QMAX[out]).astype(getattr(ml_dtypes, out))
  assert np.isnan(want.astype(F32)[:, 1]).all()
  q2, _ = npu_ops.quantize_per_token(s, npu_ops.DynamicQuant(getattr(jnp, out)))
  for codes in (q, q2):
    assert np.isnan(np.asarray(codes, F32)[:, 1]).all()
    np.testing.assert_array_equal(np.asarray(codes)[:, [0, 2, 3]].view(np.uint8),
                                  want[:, [0, 2, 3]].view(np.uint8))
  assert np.isinf(scale).all()


@pytest.mark.parametrize("out", MX)
def test_float8_bits_equal_the_cast(out, compiler):
  """The GPU kernels' integer-only fp8 / fp4 encoding and decoding (no fp8 conversion before
  sm_89) against ml_dtypes: every value between and on the codes, ties, subnormals, signed
  zeros; every finite code back."""
  from pallas_kernels import epilogue  # noqa: PLC0415
  t = getattr(ml_dtypes, out)
  grid = np.arange(256, dtype=np.uint8).view(t).astype(F32)
  grid = np.unique(grid[np.isfinite(grid)])
  mids = (grid[1:] + grid[:-1]) / 2  # exact ties
  v = np.concatenate([grid, mids, np.nextafter(mids, 0), np.nextafter(mids, np.inf),
                      np.float32([-0.0, 1e-30, -3e-38]),
                      RNG.uniform(-1, 1, 20000).astype(F32) * grid[-1]]).astype(F32)
  v = np.clip(v, grid[0], grid[-1])
  if out != "float4_e2m1fn":  # a NaN (either sign) casts to the type's NaN of that sign
    v = np.concatenate([v, np.uint32([0x7FC00000, 0xFFC00000, 0x7F800001]).view(F32)])
  got = jax.jit(lambda a: epilogue.float8_bits(a, t))(v)
  np.testing.assert_array_equal(np.asarray(got), v.astype(t).view(np.uint8))
  # and back: every code's value, NaN codes NaN and e5m2's infinities signed (the GPU
  # kernel for MX inputs read e4m3fn's NaN as +-480)
  codes = np.arange(16 if out == "float4_e2m1fn" else 256, dtype=np.uint8)
  values = codes.view(t).astype(F32)
  back = np.asarray(jax.jit(lambda b: epilogue.float8_value(b, t))(codes))
  np.testing.assert_array_equal(np.isnan(back), np.isnan(values))
  ok = ~np.isnan(values)
  np.testing.assert_array_equal(back[ok], values[ok])
  np.testing.assert_array_equal(np.signbit(back[ok]), np.signbit(values[ok]))


# --- QAT: fake fp8 and MX quantization --------------------------------------------------------

@pytest.mark.parametrize("out", FP8)
def test_fake_quant_fp8_forward_and_lsq_vjp(out):
  x = (RNG.standard_normal((16, 40)) * 3).astype(F32)
  # some |x / scale| beyond the largest code: saturated
  scale = (RNG.uniform(0.002, 0.02, (16, 1)) * 448 / ref.QMAX[out]).astype(F32)
  g = RNG.standard_normal((16, 40)).astype(F32)
  y, vjp = jax.vjp(lambda x, s: npu_ops.fake_quant(x, s, dtype=getattr(jnp, out)), x, scale)
  dx, ds = vjp(g)
  want_y, want_dx, want_ds = ref.lsq(x, scale, g, ref.QMAX[out], grid=out)
  np.testing.assert_array_equal(y, want_y)
  np.testing.assert_array_equal(dx, want_dx)
  # a sum of 40 terms |g (q - v)| <= |g| qmax: float32 rounding of each partial sum
  np.testing.assert_allclose(ds, want_ds, rtol=1e-5,
                             atol=40 * np.abs(g).max() * ref.QMAX[out] * 2.0 ** -23)
  assert 0 < np.mean(want_dx == 0) < 1  # both branches ran
  codes = qat_quantize(x, scale, out)
  assert codes.dtype == getattr(jnp, out)
  np.testing.assert_array_equal(np.asarray(codes, F32) * scale, want_y)


def qat_quantize(x, scale, out):
  return npu_ops.quantize(jnp.asarray(x), jnp.asarray(scale), dtype=getattr(jnp, out))


@pytest.mark.parametrize("out", FP8)
def test_dynamic_fake_quant_fp8(out):
  x = spread_rows(10, 50)
  g = RNG.standard_normal(x.shape).astype(F32)
  y, vjp = jax.vjp(lambda x: npu_ops.dynamic_fake_quant(x, dtype=getattr(jnp, out)), x)
  (dx,) = vjp(g)
  q, s = npu_ops.quantize_per_token(x, npu_ops.DynamicQuant(getattr(jnp, out)))
  np.testing.assert_array_equal(y, np.asarray(q, F32) * np.asarray(s)[:, None])  # the op's numbers
  want_y, want_dx = ref.dynamic_lsq(x, g, ref.QMAX[out], grid=out)
  np.testing.assert_array_equal(y, want_y)
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("out", MX)
def test_fake_quant_mx(out):
  x = mx_rows(64)
  x[8] = x[9]  # finite rows for the gradient check (row 8 spans 60 decades)
  g = RNG.standard_normal(x.shape).astype(F32)
  y, vjp = jax.vjp(lambda x: npu_ops.fake_quant_mx(x, getattr(jnp, out)), x)
  (dx,) = vjp(g)
  want_y, want_dx = ref.mx_ste(x, g, out)
  # XLA:CPU flushes subnormal products to zero: there (and only there) 0 is accepted too
  subnormal = (want_y != 0) & (np.abs(want_y) < np.finfo(F32).tiny)
  keep = ~subnormal & ~np.isnan(want_y)
  assert keep.sum() > x.size // 2
  np.testing.assert_array_equal(np.asarray(y)[keep], want_y[keep])
  assert np.all((np.asarray(y)[subnormal] == 0) | (np.asarray(y)[subnormal] == want_y[subnormal]))
  assert np.all(np.isnan(np.asarray(y)[np.isnan(want_y)]))
  np.testing.assert_array_equal(dx, want_dx)
  # 1.9375 * 2**E scales to 1.9375 * 2**emax, above every type's largest value: saturated
  assert want_dx[7, 6] == 0 and np.all(want_dx[7, 7:32] == g[7, 7:32])
  with pytest.raises(ValueError, match="dtype"):
    npu_ops.fake_quant_mx(x, jnp.int8)


@pytest.mark.parametrize("out", MX)
def test_mx_blocks_at_either_end_of_the_range(out, compiler):
  """Scale byte 0 is 2**-127, a float32 subnormal, which XLA:CPU reads as 0 as an operand:
  such a block still dequantizes to its normal values, and its gradient is straight
  through. Float16 blocks at the top of its range (65408-65504 round to bfloat16 65536
  first) fake-quantize to float16's largest value, not inf."""
  top = float(jnp.finfo(getattr(jnp, out)).max) * 2.0**-127  # the largest |x| of byte 0
  tiny = (np.linspace(0.05, 0.99, 32) * top).astype(F32)[None]
  codes, scales = npu_ops.quantize_mx(tiny, getattr(jnp, out))
  assert not np.asarray(scales).view(np.uint8).any()  # the case is the one named
  want_y, want_dx = ref.mx_ste(tiny, np.ones_like(tiny), out)
  normal = np.abs(want_y) >= np.finfo(F32).tiny     # smaller ones flush to 0 (as above)
  assert normal.sum() > 16
  for got in (npu_ops.dequantize_mx(codes, scales), npu_ops.fake_quant_mx(tiny, getattr(jnp, out))):
    np.testing.assert_array_equal(np.asarray(got)[normal], want_y[normal])
  (dx,) = jax.vjp(lambda x: npu_ops.fake_quant_mx(x, getattr(jnp, out)), tiny)[1](np.ones_like(tiny))
  np.testing.assert_array_equal(dx, want_dx)
  assert want_dx.all()

  top = np.linspace(65408, 65504, 32).astype(np.float16)[None]
  g = np.ones_like(top)
  y, vjp = jax.vjp(lambda x: npu_ops.fake_quant_mx(x, getattr(jnp, out)), top)
  want_y, want_dx = ref.mx_ste(top, g, out)
  np.testing.assert_array_equal(np.asarray(y, F32), np.minimum(want_y, 65504))
  np.testing.assert_array_equal(vjp(g)[0], want_dx)


@pytest.mark.parametrize("impl", kernels_for("fused_mx_fp8"))
@pytest.mark.parametrize("out,mode", [("float8_e4m3fn", 2), ("float4_e2m1fn", 2),
                                      ("float8_e5m2", 0), ("int8", 0)])
def test_kernel_mx_inputs(impl, out, mode):
  """The MX-input kernels (today the GPU's, `gmm_swiglu_quant_mx`) in interpret mode: B.1.6's
  per-block sum, the golden's order, so their C equals the golden's bit for bit here."""
  counts = [7, 0, 25, 12]
  m, k, n, e = 48, 80, 192, 4  # n/2 = 96: three MX blocks, an odd count
  x, w, xs, ws = mx_case(m, k, n, e, "float8_e4m3fn", "float8_e5m2")
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w, ws, xs, jnp.asarray(counts), group_list_type=1, dequant_mode=2, quant_mode=mode,
      quant_dtype=getattr(jnp, out), **IMPLEMENTATIONS[impl])
  c = ref.mx_grouped_matmul(x, w, xs, ws, ref.group_bounds(counts, 1))
  assert_fused_close(got, ref.quantize_out(ref.swiglu(c), golden_out(out, mode)), mode)


def compiled(fn, *args, fp4: bool = True):
  """`fn(*args)` through jit; with fp4 operands, compiled with XLA:CPU's fusion emitters (its
  default: the suite turns them off to compile faster, conftest.py), since the emitter
  before them cannot bitcast fp4 values to int4 (the TPU kernel reads fp4 weights as int4
  codes; in interpret mode XLA:CPU: "Invalid bitcast i8 to i4")."""
  lowered = jax.jit(fn).lower(*args)
  return lowered.compile({"xla_cpu_use_fusion_emitters": True} if fp4 else None)(*args)


def sparse_mx_case(m, k, n, e, nonzero=160, seed=0, dtype="float8_e4m3fn"):
  """`mx_case` with k past 96 kept exact in float32 in any order: each row of x holds
  `nonzero` values (products are multiples of 2**-10 below 64: sums of fewer than 256 of
  them stay within float32's 24 bits), the last columns among them."""
  x, w, xs, ws = mx_case(m, k, n, e, dtype, dtype)
  rng = np.random.default_rng(seed)
  keep = np.zeros((m, k), bool)
  for r in range(m):
    keep[r, rng.choice(k, nonzero - 8, replace=False)] = True
    keep[r, k - 8:] = True
  return np.where(keep, x, np.zeros((), x.dtype)), w, xs, ws


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float4_e2m1fn"])
@pytest.mark.parametrize("case", ["k_tiled", "k_tiled_tpu7x", "v5p_decode_offset"])
def test_tpu_kernel_mx_inputs(case, dtype, monkeypatch):
  """The TPU kernel's MX inputs (`tpu.gmm_swiglu_quant_mx`, interpret mode) where
  `test_kernel_mx_inputs` does not reach: weights too large to stay resident (k = 2128:
  two k tiles of 2048, the last 80 columns wide, its last block 16; the tile's weight
  scale rows and x columns past k hold garbage), and a v5p's two cores splitting decode
  visits with group_offset (48 local experts of 64); fp8 and fp4 operands (fp4 weights
  decoded in VMEM 64 rows at a time, k = 160: two whole pairs of blocks and a half; as
  codes through an int4 view, or as fp4 vectors on TPU7x).
  Codes and scales bit for bit against the golden and the XLA path."""
  from pallas_kernels import tpu, tpu_tiles  # noqa: PLC0415
  chip, offset = "tpu7x" if case.endswith("tpu7x") else "v5e", None
  if case.startswith("k_tiled"):
    monkeypatch.setattr(tpu, "_RESIDENT_WEIGHT_BYTES", 1024)
    m, k, n, e = 48, 2128, 128, 3
    counts = np.array([20, 0, 21])
    tiles, out, mode = npu_ops.TileSizes(32, 512, 128), "float8_e4m3fn", 2
    plan = tpu.fused_plan(m, k, n, 1, tiles, widened=True, mx_inputs=True)
    assert (plan.block_k, plan.k_tiles) == (2048, 2)
  else:
    chip, offset = "v5p", 8
    m, k, n, e = 40, 160, 256, 64
    rng = np.random.default_rng(5)
    counts = np.zeros(e, np.int64)
    counts[rng.choice(e, 25, replace=False)] = 1
    counts[3], counts[30] = 9, 6
    tiles, out, mode = npu_ops.TileSizes(32, 128, 128), "int8", 0
  x, w, xs, ws = sparse_mx_case(m, k, n, e, dtype=dtype)
  local = slice(offset or 0, (offset or 0) + 48 if offset else e)
  e8m0 = lambda a: jax.lax.bitcast_convert_type(jnp.asarray(a), jnp.float8_e8m0fnu)
  run = lambda **kw: compiled(
      lambda *a: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
          *a, group_list_type=1, group_offset=offset, dequant_mode=2, quant_mode=mode,
          quant_dtype=getattr(jnp, out), **kw),
      jnp.asarray(x), jnp.asarray(w[local]), e8m0(ws[local]), e8m0(xs), jnp.asarray(counts),
      fp4=dtype.startswith("float4"))
  token = tpu_tiles.CHIP.set(chip)
  try:
    got = run(implementation="pallas_tpu", interpret=True, tiles=tiles)
  finally:
    tpu_tiles.CHIP.reset(token)
  c = ref.mx_grouped_matmul(x, w[local], xs, ws[local], ref.group_bounds(counts, 1)[local])
  assert_fused_close(got, ref.quantize_out(ref.swiglu(c), golden_out(out, mode)), mode)
  assert_fused_close(got, run(implementation="xla"), mode, max_ulps=0)


def test_tpu_kernel_mx_inputs_waits_for_the_weights_it_copies():
  """MX inputs through the fused kernel's hand-made weight copies, in the interpreter that
  performs a copy only when it is waited for and watches for races: each expert's fp8
  weights dequantized at its first visit, runs of one visit and of several, an empty
  group, rows past the total. Per-token codes against the golden. (fp4 weights take the
  same copies; that interpreter reads no bitcast view of a buffer, which their codes are
  read through, so they run in the default interpreter: `test_tpu_kernel_mx_inputs`.)"""
  dtype = "float8_e4m3fn"
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
  from helpers import ends_within  # noqa: PLC0415
  from pallas_kernels import tpu, tpu_tiles  # noqa: PLC0415
  counts = np.array([5, 60, 0, 70, 3, 50])
  m, k, n, e = 200, 160, 256, len(counts)
  x, w, xs, ws = sparse_mx_case(m, k, n, e, dtype=dtype)
  interpret = pltpu.InterpretParams(dma_execution_mode="on_wait", detect_races=True)
  token = tpu_tiles.CHIP.set("v5e")
  try:
    with ends_within(300):
      got = compiled(lambda *a: tpu.gmm_swiglu_quant_mx(
          *a, tiles=npu_ops.TileSizes(32, 128, 128), out_dtype=jnp.int8, qmax=127.0,
          mx_out=False, interpret=interpret), jnp.asarray(x), jnp.asarray(w), jnp.asarray(xs),
          jnp.asarray(ws), jnp.cumsum(jnp.asarray(counts, jnp.int32)),
          fp4=dtype.startswith("float4"))
  finally:
    tpu_tiles.CHIP.reset(token)
  assert tpu.fused_plan(m, k, n, 1, npu_ops.TileSizes(32, 128, 128), widened=True,
                        mx_inputs=True).resident
  c = ref.mx_grouped_matmul(x, w, xs, ws, ref.group_bounds(counts, 1))
  assert_fused_close(got, ref.quantize_out(ref.swiglu(c), "int8"), 0)


@pytest.mark.parametrize("impl", kernels_for("fused_mx_fp4"))
@pytest.mark.parametrize("chip", ["v5e", "tpu7x"])
@pytest.mark.parametrize("x_dtype,w_dtype,out,mode", [
    ("float4_e2m1fn", "float4_e2m1fn", "float4_e2m1fn", 2),
    ("float8_e4m3fn", "float4_e2m1fn", "int8", 0), ("float4_e2m1fn", "float8_e5m2", "float8_e5m2", 0)])
def test_kernel_mx_fp4_inputs(impl, chip, x_dtype, w_dtype, out, mode):
  """fp4 MX inputs on the kernels that declare them (the TPU's: fp4 weights decoded in VMEM
  64 rows at a time, fp4 tokens a whole tile at a step, from their codes on v5e, converted
  as fp4 vectors on TPU7x): k = 80 (a pair of blocks, then a half pair of 16 rows), bit
  for bit against the golden and the XLA path."""
  from pallas_kernels import tpu_tiles  # noqa: PLC0415
  if chip != "v5e" and impl != "pallas_tpu":
    pytest.skip("TPU chips")
  counts = [7, 0, 25, 12]
  m, k, n, e = 48, 80, 192, 4
  x, w, xs, ws = mx_case(m, k, n, e, x_dtype, w_dtype)
  run = lambda **kw: compiled(lambda *a: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      *a, group_list_type=1, dequant_mode=2, quant_mode=mode, quant_dtype=getattr(jnp, out),
      **kw), jnp.asarray(x), jnp.asarray(w), jnp.asarray(ws), jnp.asarray(xs),
      jnp.asarray(counts))
  token = tpu_tiles.CHIP.set(chip)
  try:
    got = run(**IMPLEMENTATIONS[impl])
  finally:
    tpu_tiles.CHIP.reset(token)
  c = ref.mx_grouped_matmul(x, w, xs, ws, ref.group_bounds(counts, 1))
  assert_fused_close(got, ref.quantize_out(ref.swiglu(c), golden_out(out, mode)), mode)
  assert_fused_close(got, run(implementation="xla"), mode, max_ulps=0)


@pytest.mark.parametrize("impl", kernels_for("fused_mx_fp8"))
def test_kernel_mx_inputs_nan_and_zero_scale_bytes(impl):
  """Scale bytes 0xFF (NaN) and 0 (2**-127, a float32 subnormal) on the kernels as on the
  XLA path, bit for bit: a NaN x scale makes its row's C NaN (scale NaN, codes 0), one in
  the pair's padding block past k (k = 80: block 3) changes nothing; a NaN weight scale
  makes its column NaN in its expert's rows; byte 0 multiplies to 0 (flushed, as
  XLA:CPU and the TPU flush the XLA path's products)."""
  counts = [7, 0, 25, 12]
  m, k, n, e = 48, 80, 128, 4
  x, w, xs, ws = mx_case(m, k, n, e, "float8_e4m3fn", "float8_e4m3fn")
  xs[2, 0, 1] = 0xFF   # row 2, block 1
  xs[5, 1, 1] = 0xFF   # row 5, block 3: padding
  xs[40] = 0           # row 40: every block 2**-127
  ws[2, 1, 7, 0] = 0xFF  # expert 2, block 2, column 7
  ws[3, 0, :, 1] = 0     # expert 3, block 1
  run = lambda **kw: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w, ws, xs, jnp.asarray(counts), group_list_type=1, dequant_mode=2,
      quant_dtype=jnp.int8, **kw)
  got_q, got_s = map(np.asarray, run(**IMPLEMENTATIONS[impl]))
  want_q, want_s = map(np.asarray, run(implementation="xla"))
  # row 2, and expert 2's rows (7-31: column 7 NaN), NaN; row 40's SwiGLU 0
  assert np.flatnonzero(np.isnan(want_s)).tolist() == [2, *range(7, 32)]
  assert want_s[40] == 0 and not want_q[40].any()
  np.testing.assert_array_equal(got_q, want_q)
  np.testing.assert_array_equal(got_s.view(np.uint32), want_s.view(np.uint32))


@pytest.mark.parametrize("impl", impls("fused_mx_fp8"))
def test_mx_inputs_read_nan_codes_as_nan(impl):
  """A NaN code (e4m3fn's all-ones) in x or the weights puts NaN in the C it meets: those
  rows' per-token scales are NaN on every implementation, as the golden's (the GPU kernel
  read the code as +-480 and gave finite codes), their codes 0; the other rows the golden's."""
  counts = [7, 0, 25, 12]
  m, k, n, e = 48, 80, 128, 4
  x, w, xs, ws = mx_case(m, k, n, e, "float8_e4m3fn", "float8_e4m3fn")
  x[3, 5] = np.nan   # row 3 (expert 0)
  w[3, 10, 20] = np.nan  # rows 32..43 (expert 3)
  got_q, got_s = map(np.asarray, npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w, ws, xs, jnp.asarray(counts), group_list_type=1, dequant_mode=2,
      quant_dtype=jnp.int8, **IMPLEMENTATIONS[impl]))
  with np.errstate(invalid="ignore"):
    c = ref.mx_grouped_matmul(x, w, xs, ws, ref.group_bounds(counts, 1))
    want_q, want_s = ref.quantize_out(ref.swiglu(c), "int8")
  bad = np.isnan(want_s)
  assert bad[3] and bad[32:44].all() and bad.sum() == 13
  np.testing.assert_array_equal(np.isnan(got_s), bad)
  assert not got_q[bad].any()
  assert_fused_close((got_q[~bad], got_s[~bad]), (want_q[~bad], want_s[~bad]), 0)


@pytest.mark.parametrize("impl", kernels_for("fused_A8W8_mx_out"))
@pytest.mark.parametrize("scenario,out,n", [
    ("A8W8", "float4_e2m1fn", 200), ("A8W8", "float8_e5m2", 512),
    ("A4W4", "float8_e4m3fn", 512), ("A4W4", "float4_e2m1fn", 200)])
def test_kernel_mx_output(impl, scenario, out, n):
  """MX output from the int8 kernels that declare it (interpret mode), bit for bit as on
  the XLA path and as the golden: the GPU kernel writes the SwiGLU values, which the XLA
  path's quantizer turns into codes and scale bytes; the TPU kernel quantizes the blocks
  itself where n/2 is a multiple of 128 (n = 512), else as the GPU's (n/2 = 100: a short
  last block). A4W4 with its tokens in int32 words and a smooth scale; a row of NaN blocks
  and a row of zero blocks."""
  from helpers import int4_array  # noqa: PLC0415
  counts = [30, 0, 41]
  x, w, ws, xs = int_case(7, scenario, 80, 128, n, 3)
  xs[[5, 40]] = [np.inf, 0.0]  # a row of inf / NaN blocks (scale 0xFF) and a row of zeros
  a4w4 = scenario == "A4W4"
  smooth = (np.random.default_rng(8).uniform(0.5, 2, (3, n // 2)).astype(np.float32)
            if a4w4 else None)
  op = lambda **kw: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      ref.pack_int4(x) if a4w4 else x, int4_array(w) if a4w4 else w, ws, xs, jnp.asarray(counts),
      group_list_type=1, smooth_scale=smooth, quant_mode=2, quant_dtype=getattr(jnp, out), **kw)
  got = op(**IMPLEMENTATIONS[impl])
  assert_fused_close(got, op(implementation="xla"), 2)
  with np.errstate(invalid="ignore", over="ignore"):  # the golden's SwiGLU of inf: NaN
    want = ref.swiglu_quant(x, w, ws, xs, ref.group_bounds(counts, 1), scenario=scenario,
                            smooth=smooth, out=("mx", out))
  assert_fused_close(got, want, 2)


@pytest.mark.parametrize("case,impl", [(c, k) for c in ("fused_A8W8_mx_out", "fused_mx_fp8",
                                                        "fused_mx_fp8_transposed", "fused_mx_fp4")
                                       for k in kernels_without(c)])
def test_a_kernel_asked_for_a_case_it_lacks_says_so(case, impl):
  """A kernel that does not declare a case, asked for by name, raises NotImplementedError
  with its reason (under None its platform runs the XLA path instead)."""
  e8m0 = lambda a: jax.lax.bitcast_convert_type(jnp.asarray(a), jnp.float8_e8m0fnu)
  if case == "fused_A8W8_mx_out":
    x, w, ws, xs = int_case(7, "A8W8", 16, 128, 128, 2)
    kw = dict(quant_mode=2, quant_dtype=jnp.float8_e4m3fn)
  else:
    dtype = "float4_e2m1fn" if case.endswith("fp4") else "float8_e4m3fn"
    x, w, xs, ws = mx_case(16, 64, 128, 2, dtype, dtype)
    xs, ws = e8m0(xs), e8m0(ws)
    if case.endswith("transposed"):  # one [e, n, k] weight in a list: torch_npu's transposed form
      w, ws = [np.swapaxes(w, 1, 2)], [np.swapaxes(ws, 1, 2)]
    kw = dict(dequant_mode=2, quant_mode=2, quant_dtype=jnp.float8_e4m3fn)
  reason = {"fused_A8W8_mx_out": "MX output", "fused_mx_fp4": "MX inputs"}.get(
      case, "MX inputs" if impl == "pallas_tpu" else "transposed")
  with pytest.raises(NotImplementedError, match=f"implementation='{impl}' has no kernel for .*{reason}"):
    npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws, xs, jnp.asarray([8, 8]),
                                               group_list_type=1, **kw,
                                               **IMPLEMENTATIONS[impl])
