"""npu_grouped_matmul against the NumPy goldens of semantics B.4 (numpy_reference.py)."""

import pathlib
import re

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import npu_ops
import numpy_reference as ref
from helpers import counts_to_list, encode_int4_weight, encode_int8_weight, int4_array
from implementations import IMPLEMENTATIONS, impls
from npu_ops._src import gmm_scenarios as gmm_scenarios

F32, F16, BF16 = np.float32, np.float16, ml_dtypes.bfloat16
ROOT = pathlib.Path(__file__).resolve().parents[1]
# float outputs: one rounding of a float32-accumulated value to the output type (2 ulp slack,
# relative to the output's scale since rows are sums of k products).
RTOL = {np.dtype(F32): 1e-5, np.dtype(F16): 2e-3, np.dtype(BF16): 1.6e-2}

GROUPINGS = {  # counts over m = 24 rows, E = 4 experts
    "empty_first": [0, 10, 6, 8],
    "empty_middle": [9, 0, 0, 15],
    "empty_last": [14, 10, 0, 0],
    "tail_rows": [3, 5, 0, 7],  # sum 15 < m: rows 15.. are 0
}


def assert_float_close(got, want):
  """Elementwise: within 1 ulp of the output dtype at the golden's value (the output's own
  rounding: 2**-23 float32, 2**-10 float16, 2**-7 bfloat16; the golden rounds at the same
  points, so a different float32 order can move a value across one output rounding), plus
  float32 noise of the float32 intermediates: 2**-20 of the largest value (k <= 64 terms
  summed in float32, each within 2**-24 relative). Not a share of the row maximum alone:
  that hid act_type 2 vs 4 and missing intermediate roundings (issue 34)."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.shape)
  g, w = got.astype(np.float64), want.astype(np.float64)
  scale = max(np.abs(w).max(initial=0), 1.0)
  eps = float(np.finfo(want.dtype).eps) if want.dtype != BF16 else 2.0**-7
  np.testing.assert_allclose(g, w, rtol=eps, atol=2.0**-20 * scale)


def floats(rng, shape, dtype):
  return rng.normal(size=shape).astype(dtype)


def segs_of(counts):
  return ref.segments(counts, 1)


# --- float: m-axis grouping ----------------------------------------------------------------------

def encode_float_weight(w, form):
  if form == "nd":
    return w
  if form == "nz":
    return np.asarray(npu_ops.npu_format_cast(w, 29))
  if form == "list_e":
    return list(w)
  return [np.asarray(npu_ops.npu_format_cast(wi, 29)) for wi in w]  # list_e_nz


FORMS = ["nd", "nz", "list_e", "list_e_nz"]


@pytest.mark.parametrize("dtype", [F16, BF16, F32], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("grouping", list(GROUPINGS))
def test_float_m_grouping(dtype, grouping):
  rng = np.random.default_rng(len(grouping))
  counts = GROUPINGS[grouping]
  form = FORMS[list(GROUPINGS).index(grouping)]
  x, w = floats(rng, (24, 20), dtype), floats(rng, (4, 20, 24), dtype)  # k, n: NZ padding
  # NZ storage pads n; bias (or a scale) gives the logical n, as in torch_npu
  bias = floats(rng, (4, 24), F16 if dtype == F16 else F32) if form != "nd" else None
  gl = counts_to_list(counts, 0)
  (got,) = npu_ops.npu_grouped_matmul(x, encode_float_weight(w, form), bias=bias, group_list=gl,
                                      split_item=2)
  assert_float_close(got, ref.gmm_float(x, w, segs_of(counts), bias))


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("scenario", ["float", "A8W8"])
def test_cumsum_count_pairs_agree(scenario, dynamic):
  """semantics B.0.1 example, scaled down: cumsum == count == (index, size) pairs."""
  rng = np.random.default_rng(3)
  counts = [3, 0, 5, 0, 0, 5, 0, 0, 0]
  cumsum = list(np.cumsum(counts))
  pairs = [[0, 3], [2, 5], [5, 5], [1, 0], [3, 0], [4, 0], [6, 0], [7, 0], [8, 0]]
  if scenario == "float":
    x, w, kw = floats(rng, (16, 8), F32), floats(rng, (9, 8, 8), F32), {}
  else:
    x = rng.integers(-128, 128, (16, 8)).astype(np.int8)
    w = rng.integers(-128, 128, (9, 8, 8)).astype(np.int8)
    kw = dict(scale=np.ones((9, 8), F32), output_dtype=jnp.int32)
  conv = (lambda v: jnp.asarray(v)) if dynamic else (lambda v: v)
  outs = [npu_ops.npu_grouped_matmul(x, w, group_list=conv(gl), group_list_type=t, split_item=2,
                                     **kw)[0]
          for t, gl in ((0, cumsum), (1, counts), (2, pairs))]
  want = (ref.gmm_float(x, w, ref.segments(pairs, 2)) if scenario == "float" else
          ref.gmm_a8w8(x, w, ref.segments(pairs, 2), None, out="int32"))
  for got in outs:
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dynamic", [False, True])
def test_pairs_in_any_expert_order(dynamic):
  rng = np.random.default_rng(4)
  x, w = floats(rng, (20, 8), F32), floats(rng, (3, 8, 16), F32)
  pairs = [[2, 4], [0, 7], [2, 3]]  # expert 2 twice, out of order, no expert 1; rows 14.. are 0
  gl = jnp.asarray(pairs) if dynamic else pairs
  (got,) = npu_ops.npu_grouped_matmul(x, w, group_list=gl, group_list_type=2, split_item=3)
  assert_float_close(got, ref.gmm_float(x, w, ref.segments(pairs, 2)))


def test_split_items_m_grouping():
  rng = np.random.default_rng(5)
  xs = [floats(rng, (5, 8), F32), floats(rng, (7, 8), F32)]
  w = floats(rng, (2, 8, 4), F32)
  want = ref.gmm_float(np.concatenate(xs), w, segs_of([5, 7]))
  # multi x, no group_list: the groups are the x's
  per_x = npu_ops.npu_grouped_matmul(xs, list(w), split_item=0, group_type=0)
  assert [o.shape for o in per_x] == [(5, 4), (7, 4)]
  assert_float_close(np.concatenate(per_x), want)
  per_group = npu_ops.npu_grouped_matmul(np.concatenate(xs), w, group_list=[3, 12],
                                         split_item=1)
  assert [o.shape for o in per_group] == [(3, 4), (9, 4)]
  assert_float_close(np.concatenate(per_group),
                     ref.gmm_float(np.concatenate(xs), w, segs_of([3, 9])))
  (one,) = npu_ops.npu_grouped_matmul(xs, w, group_list=[5, 12], split_item=2, group_type=0)
  assert_float_close(one, want)


def test_float_gradients_flow():
  rng = np.random.default_rng(6)
  x, w = floats(rng, (12, 8), F32), floats(rng, (3, 8, 4), F32)
  counts = [4, 0, 6]
  g = floats(rng, (12, 4), F32)

  def loss(x, w, gl):
    return jnp.sum(npu_ops.npu_grouped_matmul(x, w, group_list=gl, group_list_type=1,
                                              split_item=2)[0] * g)
  dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w, jnp.asarray(counts))
  want_dx, want_dw = np.zeros_like(x), np.zeros_like(w)
  for i, s, e in segs_of(counts):
    want_dx[s:e] = g[s:e] @ w[i].T
    want_dw[i] = x[s:e].T @ g[s:e]
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)


# --- float: k-axis grouping and independent lists ----------------------------------------------

@pytest.mark.parametrize("dtype,grouping", [(F16, "empty_first"), (BF16, "empty_middle"),
                                            (F32, "empty_last")])
def test_k_grouping(dtype, grouping):
  rng = np.random.default_rng(7)
  counts = GROUPINGS[grouping]  # over k = 24
  # k = 24 pads in NZ; n = 16 does not (an NZ weight without bias or scale has the padded n)
  x, w = floats(rng, (6, 24), dtype), floats(rng, (24, 16), dtype)
  bounds = ref.group_bounds(counts, 1)
  want = ref.gmm_k_grouped(x, w, bounds)
  (stacked,) = npu_ops.npu_grouped_matmul(x, w, group_list=counts_to_list(counts, 0),
                                          group_type=2, split_item=3)
  assert stacked.shape == (4, 6, 16)
  assert_float_close(stacked, want)
  listed = npu_ops.npu_grouped_matmul(x, npu_ops.npu_format_cast(w, 29),
                                      group_list=jnp.asarray(counts), group_list_type=1,
                                      group_type=2, split_item=0)
  assert len(listed) == 4
  assert_float_close(np.stack(listed), want)


def test_k_grouping_weight_list_gives_the_groups():
  rng = np.random.default_rng(8)
  x = floats(rng, (5, 12), F32)
  ws = [floats(rng, (4, 6), F32), floats(rng, (8, 6), F32)]
  got = npu_ops.npu_grouped_matmul(x, ws, group_type=2, split_item=0)
  assert_float_close(np.stack(got), ref.gmm_k_grouped(x, np.concatenate(ws), [(0, 4), (4, 12)]))


def test_independent_list():
  rng = np.random.default_rng(9)
  xs = [floats(rng, (2, 3, 8), F32), floats(rng, (5, 12), F32)]
  ws = [floats(rng, (8, 6), F32), npu_ops.npu_format_cast(floats(rng, (12, 6), F32), 29)]
  bias = [floats(rng, (6,), F32), floats(rng, (6,), F32)]
  outs = npu_ops.npu_grouped_matmul(xs, ws, bias=bias)
  assert [o.shape for o in outs] == [(2, 3, 6), (5, 6)]
  w1 = np.asarray(npu_ops.npu_format_cast(ws[1], 2, shape=(12, 6)))
  assert_float_close(outs[0], (xs[0] @ ws[0] + bias[0]).astype(F32))
  assert_float_close(outs[1], (xs[1] @ w1 + bias[1]).astype(F32))
  (cat,) = npu_ops.npu_grouped_matmul(xs, ws, bias=bias, split_item=2)
  assert_float_close(cat, np.concatenate([np.asarray(outs[0]).reshape(6, 6), outs[1]]))


# --- quant: int8 x int8 ------------------------------------------------------------------------

def a8w8_case(seed, m=24, k=32, n=16, e=4):
  rng = np.random.default_rng(seed)
  x = rng.integers(-128, 128, (m, k)).astype(np.int8)
  w = rng.integers(-128, 128, (e, k, n)).astype(np.int8)
  return rng, x, w


@pytest.mark.parametrize("out,bias_kind,pts", [
    ("int8", None, False), ("int8", "int32", False), ("int32", "int32", False),
    ("float16", "int32", True), ("float16", "float32", False), ("bfloat16", "bfloat16", True),
    ("bfloat16", None, False)])
def test_a8w8(out, bias_kind, pts):
  rng, x, w = a8w8_case(10)
  counts = GROUPINGS["empty_middle" if pts else "tail_rows"]
  segs = segs_of(counts)
  raw = rng.uniform(1e-4, 3e-4, (4, 16)).astype(F32)
  if out == "int8":  # int64 words with an s9 offset; NumPy int64 with x64 off
    offset = rng.integers(-20, 20, (4, 16)).astype(F32)
    scale = npu_ops.npu_trans_quant_param(raw, offset)
    eff, eff_off = ref.fp19(raw), np.rint(offset)
  else:
    scale = raw.astype(BF16) if out == "bfloat16" else raw
    eff, eff_off = np.asarray(scale, F32), None
  bias = None
  if bias_kind == "int32":
    bias = rng.integers(-5000, 5000, (4, 16)).astype(np.int32)
  elif bias_kind:
    bias = rng.normal(size=(4, 16)).astype({"float32": F32, "bfloat16": BF16}[bias_kind])
  p = rng.uniform(0.5, 1.5, 24).astype(F32) if pts else None
  form = "nz" if pts else "list_e"
  (got,) = npu_ops.npu_grouped_matmul(
      x, encode_int8_weight(w, form), scale=scale if form == "nz" else list(scale), bias=bias,
      per_token_scale=p, group_list=counts_to_list(counts, 0), split_item=2,
      output_dtype=getattr(jnp, out))
  want = ref.gmm_a8w8(x, w, segs, eff, offset=eff_off, pts=p, bias=bias, out=out)
  if out in ("int8", "int32"):
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
  else:
    assert_float_close(got, want)


@pytest.mark.parametrize("impl", impls("gmm_int"))
def test_a8w8_products_on_every_implementation(impl):
  """The quantized products run on the int8 kernels too: int32 out exact, bfloat16 out
  (per-channel and per-token dequant after the product) as the NumPy golden says."""
  rng, x, w = a8w8_case(15, m=40, k=160, n=144)
  counts = [10, 0, 21, 5]
  scale = rng.uniform(1e-4, 3e-4, (4, 144)).astype(F32)
  p = rng.uniform(0.5, 1.5, 40).astype(F32)
  for out, pts in (("int32", None), ("bfloat16", p)):
    (got,) = npu_ops.npu_grouped_matmul(
        x, w, scale=scale, per_token_scale=pts, group_list=counts,
        group_list_type=1, split_item=2, output_dtype=getattr(jnp, out), **IMPLEMENTATIONS[impl])
    want = ref.gmm_a8w8(x, w, segs_of(counts), scale, pts=pts, out=out)
    if out == "int32":
      np.testing.assert_array_equal(got, want)
    else:
      assert_float_close(got, want)


def test_a8w8_default_output_follows_scale():
  _, x, w = a8w8_case(11)
  gl = [6, 12, 18, 24]
  kinds = {np.int64: jnp.int8, BF16: jnp.bfloat16, F32: jnp.float16}
  for sdt, out in kinds.items():
    s = (npu_ops.npu_trans_quant_param(np.full((4, 16), 1e-3, F32)) if sdt is np.int64 else
         np.full((4, 16), 1e-3, sdt))
    assert npu_ops.npu_grouped_matmul(x, w, scale=s, group_list=gl, split_item=2)[0].dtype == out


@pytest.mark.parametrize("act_type", [1, 2, 4, 5])
def test_activations_after_dequant(act_type):
  rng, x, w = a8w8_case(12)
  counts = GROUPINGS["empty_first"]
  scale = rng.uniform(1e-4, 3e-4, (4, 16)).astype(F32)
  bias = rng.normal(size=(4, 16)).astype(F32)
  p = rng.uniform(0.5, 1.5, 24).astype(F32)
  (got,) = npu_ops.npu_grouped_matmul(x, w, scale=scale, bias=bias, per_token_scale=p,
                                      group_list=counts, group_list_type=1, act_type=act_type,
                                      split_item=2, output_dtype=jnp.float16)
  want = ref.gmm_a8w8(x, w, segs_of(counts), scale, pts=p, bias=bias, out="float16",
                      act_type=act_type)
  assert_float_close(got, want)


# --- quant: int4 x int4, and the A8W4 pseudo-quant -------------------------------------------------

@pytest.mark.parametrize("groups,form,out", [(1, "words_nd", "float16"), (2, "words_nz", "bfloat16"),
                                             (4, "int4_nd", "float16"), (1, "int4_nz", "bfloat16")])
def test_a4w4(groups, form, out):
  rng = np.random.default_rng(13)
  m, k, n, e = 20, 64, 16, 3
  x = rng.integers(-8, 8, (m, k))
  w = rng.integers(-8, 8, (e, k, n)).astype(np.int8)
  scale = rng.uniform(0.01, 0.03, (e, groups, n) if groups > 1 else (e, n)).astype(F32)
  counts = [4, 0, 12]
  p = rng.uniform(0.5, 1.5, m).astype(F32) if groups != 4 else None
  xin = ref.pack_int4(x) if form.startswith("words") else int4_array(x)
  (got,) = npu_ops.npu_grouped_matmul(xin, encode_int4_weight(w, form),
                                      scale=ref.float32_to_word(scale), per_token_scale=p,
                                      group_list=counts, group_list_type=1, split_item=2,
                                      output_dtype=getattr(jnp, out), act_type=1 if p is not None
                                      else 0)
  want = ref.gmm_grouped_scale(x, w, segs_of(counts), scale.reshape(e, -1, n), pts=p, out=out,
                               act_type=1 if p is not None else 0)
  assert_float_close(got, want)


@pytest.mark.parametrize("form,out", [("words_nd", "bfloat16"), ("words_nz", "float16"),
                                      ("int4_nz", "bfloat16")])
def test_a8w4_pseudo_quant(form, out):
  rng = np.random.default_rng(14)
  m, k, n, e, gs = 16, 512, 16, 3, 256
  x = rng.integers(-128, 128, (m, k)).astype(np.int8)
  w = rng.integers(-8, 8, (e, k, n)).astype(np.int8)
  scale = rng.uniform(0.001, 0.003, (e, k // gs, n)).astype(F32)
  bias = ref.canonical_assist(w, scale)  # the offline 8 * sum_k W * scale
  p = rng.uniform(0.5, 1.5, m).astype(F32)
  counts = [5, 0, 9]
  # group_list_type 0 is ignored: the A8W4 kernel reads counts (semantics B.0.1)
  (got,) = npu_ops.npu_grouped_matmul(x, encode_int4_weight(w, form),
                                      scale=ref.float32_to_word(scale), bias=bias,
                                      per_token_scale=p, group_list=counts, group_list_type=0,
                                      split_item=2, output_dtype=getattr(jnp, out),
                                      quant_group_size=gs)
  want = ref.gmm_grouped_scale(x, w, segs_of(counts), scale, pts=p, bias=bias, out=out,
                               a8w4=True)
  assert_float_close(got, want)


# --- anti-quant (weight-only) --------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F16, BF16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("wq,groups,form", [("int8", 1, "nz"), ("int4", 1, "words_nd"),
                                            ("int4", 4, "words_nz"), ("int4", 2, "int4_nz")])
def test_antiquant(dtype, wq, groups, form):
  rng = np.random.default_rng(15)
  m, k, n, e = 20, 64, 16, 3
  x = floats(rng, (m, k), dtype)
  lo = -8 if wq == "int4" else -128
  w = rng.integers(lo, -lo, (e, k, n)).astype(np.int8)
  shape = (e, groups, n) if groups > 1 else (e, n)
  scale = rng.uniform(0.005, 0.02, shape).astype(dtype)
  offset = rng.normal(size=shape).astype(dtype) if form != "words_nd" else None
  bias = floats(rng, (e, n), F16 if dtype == F16 else F32)
  counts = [6, 0, 10]
  wenc = encode_int8_weight(w, form) if wq == "int8" else encode_int4_weight(w, form)
  act_type = 2 if groups == 4 else 0
  (got,) = npu_ops.npu_grouped_matmul(x, wenc, antiquant_scale=scale, antiquant_offset=offset,
                                      bias=bias, group_list=counts, group_list_type=1,
                                      split_item=2, act_type=act_type)
  r = lambda v: None if v is None else v.reshape(e, -1, n)
  want = ref.gmm_antiquant(x, w, segs_of(counts), r(scale), r(offset), bias, act_type)
  assert_float_close(got, want)


def test_antiquant_one_expert_lists():
  """B.4.3: with a weight list, per-group scales come as a list of `[G, n]`: for one
  expert a list of one `[G, n]` (not read as a stacked `[E, n]`, which needs E = 1 rows)."""
  rng = np.random.default_rng(16)
  m, k, n = 8, 64, 16
  x = floats(rng, (m, k), F16)
  w = rng.integers(-8, 8, (1, k, n)).astype(np.int8)
  scale = rng.uniform(0.005, 0.02, (4, n)).astype(F16)
  (got,) = npu_ops.npu_grouped_matmul([x], [jnp.asarray(w[0], jnp.int4)], antiquant_scale=[scale],
                                      group_list=[m], split_item=3)
  want = ref.gmm_antiquant(x, w, segs_of([m]), scale[None], None, None, 0)
  assert_float_close(got, want)


# --- NZ storage with padding, for every dtype the op takes ---------------------------------------

@pytest.mark.parametrize("dtype", [F16, BF16, F32, np.int8, ml_dtypes.int4, np.int32],
                         ids=lambda d: np.dtype(d).name)
def test_nz_round_trip_with_padding(dtype):
  rng = np.random.default_rng(16)
  shape = (2, 20, 72)  # k = 20, n = 72: neither a multiple of the fractal
  if np.dtype(dtype).kind == "f" or np.dtype(dtype) == np.dtype(BF16):
    a = floats(rng, shape, dtype)
  else:
    a = rng.integers(-8, 8, shape).astype(np.int8).astype(dtype)
  nz = npu_ops.npu_format_cast(a, 29)
  want = ref.nd_to_nz(np.asarray(a), ref.c0_of(dtype))
  assert nz.dtype == a.dtype and nz.shape == want.shape
  np.testing.assert_array_equal(np.asarray(nz).astype(F32), want.astype(F32))  # zero padded
  back = npu_ops.npu_format_cast(nz, 2, shape=shape)
  np.testing.assert_array_equal(np.asarray(back).astype(F32), np.asarray(a).astype(F32))


# --- dynamic group lists: one compilation ----------------------------------------------------------

def test_one_compilation_for_three_dynamic_group_lists():
  rng, x, w = a8w8_case(17)
  xf, wf, wk = floats(rng, (24, 8), F32), floats(rng, (4, 8, 8), F32), floats(rng, (24, 8), F32)
  scale, p = np.full((4, 16), 2e-4, F32), np.ones(24, F32)
  traces = []

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(gl):
    traces.append(1)
    q = npu_ops.npu_grouped_matmul(x, w, scale=scale, per_token_scale=p, group_list=gl,
                                   group_list_type=1, split_item=2, output_dtype=jnp.bfloat16)
    fl = npu_ops.npu_grouped_matmul(xf, wf, group_list=gl, group_list_type=1, split_item=2)
    k = npu_ops.npu_grouped_matmul(xf.T, wk, group_list=gl, group_list_type=1, group_type=2,
                                   split_item=2)
    return q[0], fl[0], k[0]

  for counts in ([6, 6, 6, 6], [0, 24, 0, 0], [3, 0, 5, 0]):
    q, fl, k = f(jnp.asarray(counts, jnp.int32))
    segs = segs_of(counts)
    assert_float_close(q, ref.gmm_a8w8(x, w, segs, scale, pts=p, out="bfloat16"))
    assert_float_close(fl, ref.gmm_float(xf, wf, segs))
    assert_float_close(k, ref.gmm_k_grouped(xf.T, wk, ref.group_bounds(counts, 1)))
  assert len(traces) == 1


# --- bad input -------------------------------------------------------------------------------------

def test_bad_input_names_the_argument():
  rng = np.random.default_rng(18)
  x, w = floats(rng, (8, 16), F32), floats(rng, (2, 16, 8), F32)
  op = npu_ops.npu_grouped_matmul
  cases = [
      (ValueError, "weight", lambda: op([x, x], [w[0]])),                       # list lengths
      (ValueError, "weight", lambda: op(x, floats(rng, (2, 12, 8), F32), group_list=[4, 8])),  # k
      (ValueError, "weight", lambda: op(x, floats(rng, (2, 1, 16, 8), F32), group_list=[4, 8])),
      (ValueError, "group_list", lambda: op(x, w, group_list=[2, 4, 8])),       # longer than E
      (ValueError, "group_list", lambda: op(x, w, group_list=jnp.asarray([2, 4, 8]))),
      (TypeError, "weight", lambda: op(x, w.astype(np.int8), group_list=[4, 8])),  # fp32 x int8 w
      (TypeError, "weight", lambda: op(x.astype(np.int8), w.astype(F16), group_list=[4, 8])),
      (TypeError, "weight", lambda: op(x, w.astype(F16), group_list=[4, 8])),
      (ValueError, "split_item", lambda: op(x, w, group_list=[4, 8], split_item=4)),
      (ValueError, "split_item", lambda: op(x, w, group_list=jnp.asarray([4, 8]), split_item=1)),
      (ValueError, "group_type", lambda: op(x, w, group_list=[4, 8], group_type=1)),
      (ValueError, "act_type", lambda: op(x, w, group_list=[4, 8], act_type=3)),
      (ValueError, "act_type", lambda: op(x, w, group_list=[4, 8], act_type=1)),  # float: none
      (ValueError, "offset", lambda: op(x, w, group_list=[4, 8], offset=np.ones((2, 8), F32))),
      (ValueError, "scale", lambda: op(x.astype(np.int8), w.astype(np.int8), group_list=[4, 8])),
      (ValueError, "group_list", lambda: op([x], [w[0]], group_list=[8], group_type=-1)),
      (ValueError, "group_list", lambda: op(x, w, group_list=[[0, 4], [5, 4]], group_list_type=2)),
      (TypeError, "bias", lambda: op(x.astype(F16), w.astype(F16), group_list=[4, 8],
                                     bias=np.ones((2, 8), F32))),
      (TypeError, "output_dtype", lambda: op(x, w, group_list=[4, 8], output_dtype=jnp.int8)),
  ]
  for exc, name, call in cases:
    with pytest.raises(exc, match=name):
      call()


def test_a8w4_asymmetric_is_planned():
  rng = np.random.default_rng(19)
  x = rng.integers(-128, 128, (4, 256)).astype(np.int8)
  w = ref.pack_int4(rng.integers(-8, 8, (1, 256, 8)))
  with pytest.raises(NotImplementedError, match="offset"):
    npu_ops.npu_grouped_matmul(x, w, scale=np.ones((1, 1, 8), F32), offset=np.ones((1, 1, 8), F32),
                               bias=np.zeros((1, 8), F32), per_token_scale=np.ones(4, F32),
                               group_list=[4], group_list_type=1)


# --- the README table: rendered from SUPPORTED, and every cell runs (or raises) ------------------

_DT = {"fp16": F16, "bf16": BF16, "fp32": F32, "int8": np.int8, "int4": ml_dtypes.int4,
       "int32": np.int32}


def test_readme_table_is_rendered_from_supported():
  text = (ROOT / "README.md").read_text()
  block = re.search(r"<!-- npu_grouped_matmul table -->\n(.*?)\n<!-- end -->", text, re.S)
  assert block, "README lacks the npu_grouped_matmul table markers"
  assert block.group(1).strip() == gmm_scenarios.supported_table_markdown().strip()


def _cell_call(row, column, out):
  """A tiny call of scenario `row` with the x / weight dtypes of `column`."""
  xd, wd = (_DT[s.strip()] for s in column.split("/"))
  m, k, n, e = 4, 256, 8, 2
  rng = np.random.default_rng(20)
  values = lambda shape, dt: (rng.integers(-8, 8, shape).astype(np.int8).astype(dt)
                              if np.dtype(dt).kind in "iu" or np.dtype(dt) == np.dtype(ml_dtypes.int4)
                              else floats(rng, shape, dt))
  x, w = values((m, k), xd), values((e, k, n), wd)
  kw = dict(group_list=[1, 3], group_list_type=1, split_item=2,
            output_dtype=None if out is None else _DT[out])
  if row.startswith("no quant, k-axis"):
    kw.update(group_type=2, group_list=[100, 156])
    w = w[0]
  elif row.startswith("no quant, independent"):
    kw = dict(output_dtype=kw["output_dtype"])
    x, w = [x], [w[0]]
  elif row.startswith("quant: scale"):
    scale = (npu_ops.npu_trans_quant_param(np.full((e, n), 1e-3, F32)) if out == "int8" else
             np.full((e, n), 1e-3, BF16 if out == "bf16" else F32))
    kw.update(scale=scale, bias=np.ones((e, n), np.int32))
    if "per_token" in row:
      kw.update(per_token_scale=np.ones(m, F32))
  elif row.startswith("quant A4W4"):
    kw.update(scale=ref.float32_to_word(np.full((e, 2, n), 1e-2, F32)))
  elif row.startswith("anti-quant"):
    groups = 4 if "per group" in row else 1
    kw.update(antiquant_scale=np.full((e, groups, n) if groups > 1 else (e, n), 0.01, xd))
  elif row.startswith("pseudo-quant A8W4"):
    kw.update(scale=ref.float32_to_word(np.full((e, 1, n), 1e-3, F32)),
              bias=np.zeros((e, n), F32), per_token_scale=np.ones(m, F32), quant_group_size=256)
  return lambda: npu_ops.npu_grouped_matmul(x, w, **kw)


@pytest.mark.parametrize("row", list(gmm_scenarios.SUPPORTED))
def test_every_table_cell_runs_or_raises(row):
  for column in gmm_scenarios.COLUMNS:
    outs = gmm_scenarios.SUPPORTED[row].get(column)
    if outs is None:
      with pytest.raises((TypeError, ValueError)):
        _cell_call(row, column, None)()
      continue
    for out in outs:
      (y, *_) = _cell_call(row, column, out)()
      assert y.dtype == np.dtype(_DT[out]), (row, column, out)
      assert np.all(np.isfinite(np.asarray(y).astype(F32)))


def test_k_grouping_gradients_flow():
  """group_type 2 is differentiable: dx and dW are grouped matmuls over the k-groups."""
  rng = np.random.default_rng(21)
  x, w = floats(rng, (5, 12), F32), floats(rng, (12, 4), F32)
  counts = [3, 0, 7]  # k rows 10, 11 are in no group
  g = floats(rng, (3, 5, 4), F32)

  def loss(x, w, gl):
    return jnp.sum(npu_ops.npu_grouped_matmul(x, w, group_list=gl, group_list_type=1,
                                              group_type=2, split_item=2)[0] * g)
  dx, dw = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w, jnp.asarray(counts))
  want_dx, want_dw = np.zeros_like(x), np.zeros_like(w)
  for i, (s, e) in enumerate(ref.group_bounds(counts, 1)):
    want_dx[:, s:e] = g[i] @ w[s:e].T
    want_dw[s:e] = x[:, s:e].T @ g[i]
  np.testing.assert_allclose(dx, want_dx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, want_dw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("group_type", [0, 2])
def test_reference_implementation_and_tuning_hint_agree(group_type):
  rng, x, w = a8w8_case(22)
  xf, wf = floats(rng, (24, 24), F32), floats(rng, (4, 24, 8), F32)
  gl = jnp.asarray([5, 0, 11, 3])
  if group_type == 0:
    call = lambda **kw: npu_ops.npu_grouped_matmul(
        x, w, scale=np.full((4, 16), 1e-3, F32), per_token_scale=np.ones(24, F32),
        bias=np.ones((4, 16), np.int32), group_list=gl, group_list_type=1, act_type=5,
        split_item=2, **kw)[0]
  else:
    call = lambda **kw: npu_ops.npu_grouped_matmul(xf, wf[0], group_list=gl, group_list_type=1,
                                                   group_type=2, split_item=2, **kw)[0]
  base = call()
  for kw in (dict(implementation="reference"), dict(tuning_config=[1]),
             dict(tuning_config=[64, 0])):
    # float sums may associate differently per row-block size
    np.testing.assert_allclose(np.asarray(call(**kw), F32), np.asarray(base, F32), atol=1e-5)


def test_fp8_operands_are_planned():
  x = jnp.zeros((4, 32), jnp.float8_e4m3fn)
  with pytest.raises(NotImplementedError, match="fp8"):
    npu_ops.npu_grouped_matmul(x, jnp.zeros((1, 32, 8), jnp.float8_e4m3fn), group_list=[4])


def test_invalid_dynamic_pairs_are_emptied_and_reported():
  """An expert index outside [0, E) makes its pair empty (semantics A.3 item 7), reported by checkify."""
  from jax.experimental import checkify
  rng = np.random.default_rng(23)
  x, w = floats(rng, (10, 8), F32), floats(rng, (3, 8, 4), F32)
  f = lambda gl: npu_ops.npu_grouped_matmul(x, w, group_list=gl, group_list_type=2,
                                            split_item=2)[0]
  got = jax.jit(f)(jnp.asarray([[1, 3], [7, 4], [0, 2]]))
  assert_float_close(got, ref.gmm_float(x, w, [(1, 0, 3), (0, 3, 5)]))
  # traced (jit): reported under checkify; known values raise (test_bad_inputs, issue 32)
  with npu_ops.debug_checks():
    err, _ = checkify.checkify(jax.jit(f))(jnp.asarray([[1, 3], [7, 4], [0, 2]]))
    assert err.get() and "expert index" in err.get()
    err, _ = checkify.checkify(jax.jit(f))(jnp.asarray([[1, 3], [2, 4], [0, 2]]))
  assert err.get() is None


def test_float_paths_vmap():
  """semantics A.2: the float paths work under jax.vmap (m-axis and k-axis grouping)."""
  rng = np.random.default_rng(24)
  x, w = floats(rng, (3, 12, 8), F32), floats(rng, (2, 8, 4), F32)
  gl = jnp.asarray([5, 3])  # k = 8 rows of w[0] for group_type=2
  m_axis = jax.vmap(lambda x, gl: npu_ops.npu_grouped_matmul(
      x, w, group_list=gl, group_list_type=1, split_item=2)[0], in_axes=(0, None))(x, gl)
  k_axis = jax.vmap(lambda x, gl: npu_ops.npu_grouped_matmul(
      x, w[0], group_list=gl, group_list_type=1, group_type=2, split_item=2)[0],
      in_axes=(0, None))(x, gl)
  for b in range(3):
    assert_float_close(m_axis[b], ref.gmm_float(x[b], w, segs_of([5, 3])))
    assert_float_close(k_axis[b], ref.gmm_k_grouped(x[b], w[0], ref.group_bounds([5, 3], 1)))
