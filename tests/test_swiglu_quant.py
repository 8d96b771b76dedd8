"""npu_grouped_matmul_swiglu_quant_v2 / v1 against the NumPy golden of semantics B.1."""


import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import npu_ops
from npu_ops._src import fused as fused_lib
import numpy_reference as ref
from implementations import IMPLEMENTATIONS, impls
from helpers import (SCALE_ULPS, assert_int8_equal, assert_scale_close, counts_to_list, encode_int4_weight,
                     encode_int8_weight, int4_array)

F32 = np.float32


def make_case(seed, scenario, m, k, n, e, *, groups=1, negative_scales=False):
  rng = np.random.default_rng(seed)
  lo, hi = (-8, 8) if scenario == "A4W4" else (-128, 128)
  x = rng.integers(lo, hi, (m, k)).astype(np.int8)
  w = rng.integers(-8, 8, (e, k, n)) if scenario != "A8W8" else rng.integers(-128, 128, (e, k, n))
  w = w.astype(np.int8)
  # Scales put C at O(1), so SwiGLU and the quantizer see a realistic spread.
  spread = float(np.std(x.astype(F32)) * np.std(w.astype(F32)) * np.sqrt(k)) or 1.0
  shape = (e, groups, n) if groups > 1 else (e, n)
  w_scale = (rng.uniform(0.5, 1.5, shape) * 2 / spread).astype(F32)
  x_scale = rng.uniform(0.5, 1.5, (m,)).astype(F32)
  if negative_scales:
    w_scale *= rng.choice([-1, 1], shape).astype(F32)
    x_scale *= rng.choice([-1, 1], (m,)).astype(F32)
  return x, w, w_scale, x_scale


def check(got, x, w, w_scale, x_scale, counts, scenario, **kw):
  bounds = ref.group_bounds(counts, 1)
  want_q, want_s = ref.swiglu_quant(x, w, w_scale, x_scale, bounds, scenario=scenario, **kw)
  q, s = got
  assert q.dtype == jnp.int8 and s.dtype == jnp.float32
  assert q.shape == want_q.shape and s.shape == want_s.shape
  assert_int8_equal(q, want_q)
  # A8W4: the golden's C is B.1.4's literal hi/lo float32 sum over k groups, the op's its
  # own float32 sum of the same terms: where they cancel, C and the scale move by many ulps
  # (20 in a CI example: G=4, terms ~1.4 summing to -0.05); the bound is derived per row.
  slack = (ref.a8w4_scale_slack(x, w, w_scale, x_scale, bounds, kw["assist"])
           if scenario == "A8W4" else 0)
  assert_scale_close(s, want_s, SCALE_ULPS + slack)
  total = sum(counts)
  assert not np.any(np.asarray(q)[total:]) and not np.any(np.asarray(s)[total:])
  assert np.all(np.isfinite(np.asarray(s)))


GROUPINGS = {
    "uneven": [5, 17, 0, 30],
    "empty_first": [0, 20, 12, 20],
    "empty_middle": [20, 0, 0, 32],
    "empty_last": [30, 22, 0, 0],
    "tail_rows": [9, 3, 11, 7],  # sum 30 < m = 52
}


@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("group_list_type", [0, 1])
@pytest.mark.parametrize("dynamic", [False, True])
def test_a8w8(grouping, group_list_type, dynamic):
  counts = GROUPINGS[grouping]
  x, w, ws, xs = make_case(0, "A8W8", 52, 64, 48, 4)
  gl = counts_to_list(counts, group_list_type)
  gl = np.asarray(gl, np.int64) if dynamic else gl
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws, xs, gl,
                                                   group_list_type=group_list_type)
  check(got, x, w, ws, xs, counts, "A8W8")


@pytest.mark.parametrize("form", ["nd", "nz", "list_e", "list_1", "list_e_nz"])
def test_a8w8_weight_forms(form):
  counts = [7, 0, 25, 12]
  x, w, ws, xs = make_case(1, "A8W8", 44, 40, 72, 4)  # k, n not multiples of the fractal
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, encode_int8_weight(w, form), [ws] if form.startswith("list") else ws, xs,
      jnp.asarray(counts), group_list_type=1)
  check(got, x, w, ws, xs, counts, "A8W8")


@pytest.mark.parametrize("scale_dtype", [jnp.float16, jnp.bfloat16])
def test_a8w8_half_precision_scale(scale_dtype):
  counts = [10, 20, 14]
  x, w, ws, xs = make_case(2, "A8W8", 44, 32, 32, 3)
  ws_half = np.asarray(jnp.asarray(ws, scale_dtype))
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws_half, xs, counts, group_list_type=1)
  check(got, x, w, ws_half.astype(F32), xs, counts, "A8W8")


# Every value of each argument, each pair of dequant mode and weight form (not the full
# product: 10 cases instead of 20, the scale form alternating).
@pytest.mark.parametrize("dequant_mode,groups,form,scale_form", [
    (mode, groups, form, ("float32", "int64_words")[(i + mode) % 2])
    for mode, groups in ((0, 1), (1, 4))
    for i, form in enumerate(["words_nd", "words_nz", "int4_nd", "int4_nz", "words_list"])])
def test_a8w4(dequant_mode, groups, form, scale_form):
  counts = [11, 0, 23, 14]
  x, w, ws, xs = make_case(3, "A8W4", 60, 128, 80, 4, groups=groups)
  assist = ref.canonical_assist(w, ws)
  scale_in = ws if scale_form == "float32" else ref.float32_to_word(ws)
  if form == "words_list":
    scale_in = list(scale_in)
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, encode_int4_weight(w, form), scale_in, xs, jnp.asarray(np.cumsum(counts)),
      weight_assist_matrix=assist, dequant_mode=dequant_mode)
  check(got, x, w, ws, xs, counts, "A8W4", assist=assist)


def test_a8w4_literal_assist_matrix():
  """A non-canonical assist matrix enters the result as written (semantics A.3 item 5)."""
  counts = [20, 12, 16]
  x, w, ws, xs = make_case(4, "A8W4", 48, 64, 32, 3, groups=2)
  rng = np.random.default_rng(5)
  assist = (ref.canonical_assist(w, ws) + rng.normal(0, 3, (3, 32))).astype(F32)
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, ref.pack_int4(w), ws, xs, counts, weight_assist_matrix=assist, dequant_mode=1,
      group_list_type=1)
  check(got, x, w, ws, xs, counts, "A8W4", assist=assist)


def test_a8w4_default_assist_is_canonical():
  counts = [20, 12, 16]
  x, w, ws, xs = make_case(6, "A8W4", 48, 64, 32, 3)
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, ref.pack_int4(w), ws, xs, counts,
                                                   group_list_type=1)
  check(got, x, w, ws, xs, counts, "A8W4", assist=ref.canonical_assist(w, ws))
  np.testing.assert_allclose(npu_ops.weight_assist_matrix(ref.pack_int4(w), ws),
                             ref.canonical_assist(w, ws), rtol=1e-5, atol=1e-3)


def test_a8w4_int64_words_under_jit():
  """NumPy int64 words passed to jit with x64 off arrive as int32 low words: still exact."""
  counts = [9, 30, 9]
  x, w, ws, xs = make_case(7, "A8W4", 48, 64, 32, 3)
  words = ref.float32_to_word(ws)
  words[..., :] |= np.int64(1) << 46  # high bits must be ignored
  f = jax.jit(lambda *a: npu_ops.npu_grouped_matmul_swiglu_quant_v2(*a, group_list_type=1))
  got = f(x, ref.pack_int4(w), words, xs, np.asarray(counts))
  check(got, x, w, ws, xs, counts, "A8W4", assist=ref.canonical_assist(w, ws))


# Each smooth shape with both x forms, the weight form alternating (6 of the 12 products),
# on the XLA path and on every kernel that takes A4W4 (the TPU kernel reads int32 words
# and jnp.int4 and multiplies by the smooth scale in its epilogue).
@pytest.mark.parametrize("impl", ["xla"] + [i for i in impls("fused_A4W4") if i.startswith("pallas")])
@pytest.mark.parametrize("smooth_shape,x_form,w_form", [
    (smooth, x_form, ("words_nd", "int4_nz")[(i + j) % 2])
    for i, smooth in enumerate([None, "per_column", "per_expert"])
    for j, x_form in enumerate(["words", "int4"])])
def test_a4w4(smooth_shape, x_form, w_form, impl):
  counts = [13, 21, 0, 6]
  x, w, ws, xs = make_case(8, "A4W4", 44, 64, 48, 4)
  rng = np.random.default_rng(9)
  smooth = {None: None, "per_column": rng.uniform(0.5, 2, (4, 24)).astype(F32),
            "per_expert": rng.uniform(0.5, 2, (4,)).astype(F32)}[smooth_shape]
  x_in = ref.pack_int4(x) if x_form == "words" else int4_array(x)
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x_in, encode_int4_weight(w, w_form), ref.float32_to_word(ws), xs, counts,
      smooth_scale=smooth, group_list_type=1, **IMPLEMENTATIONS[impl])
  smooth_ref = None if smooth is None else smooth.reshape(4, -1)
  check(got, x, w, ws, xs, counts, "A4W4", smooth=smooth_ref)


@pytest.mark.parametrize("dynamic", [False, True])
def test_edge_rows(dynamic):
  """Single expert, negative scales, an all-zero row, rows past the total."""
  x, w, ws, xs = make_case(10, "A8W8", 24, 32, 16, 1, negative_scales=True)
  x[3] = 0
  counts = [20]
  gl = jnp.asarray(counts) if dynamic else counts
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws, xs, gl)
  check(got, x, w, ws, xs, counts, "A8W8")
  assert got[1][3] == 0 and not np.any(np.asarray(got[0][3]))


@pytest.mark.parametrize("dynamic", [False, True])
def test_one_row(dynamic):
  x, w, ws, xs = make_case(11, "A8W8", 1, 32, 16, 2)
  for counts in ([1, 0], [0, 1], [0, 0]):
    gl = jnp.asarray(counts) if dynamic else counts
    got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws, xs, gl, group_list_type=1)
    check(got, x, w, ws, xs, counts, "A8W8")


def test_group_list_shorter_than_experts():
  x, w, ws, xs = make_case(12, "A8W8", 40, 32, 16, 6)
  counts = [10, 15, 5]  # experts 3..5 unused
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws, xs, jnp.asarray(counts),
                                                   group_list_type=1)
  check(got, x, w, ws, xs, counts, "A8W8")


def test_one_compilation_for_three_dynamic_group_lists():
  x, w, ws, xs = make_case(14, "A8W8", 64, 32, 16, 4)
  traces = []

  @jax.jit
  @chex.assert_max_traces(n=1)
  def f(gl):
    traces.append(1)
    return npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws, xs, gl, group_list_type=1)

  for counts in ([16, 16, 16, 16], [0, 64, 0, 0], [3, 0, 40, 2]):
    check(f(jnp.asarray(counts, jnp.int32)), x, w, ws, xs, counts, "A8W8")
  assert len(traces) == 1


def test_tuning_config_is_only_a_hint():
  x, w, ws, xs = make_case(15, "A8W8", 96, 32, 16, 3)
  gl = jnp.asarray([30, 0, 66])
  base = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws, xs, gl, group_list_type=1)
  for cfg in ([1], [8, 0], [512], []):
    got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws, xs, gl, group_list_type=1,
                                                     tuning_config=cfg)
    np.testing.assert_array_equal(got[0], base[0])
    np.testing.assert_array_equal(got[1], base[1])


def test_invalid_dynamic_group_list_is_clamped_not_nan():
  """semantics A.3 item 7: negative counts -> empty, total capped at m; no NaN."""
  x, w, ws, xs = make_case(16, "A8W8", 32, 32, 16, 3)
  # traced (known values raise like a static list: tests/test_edges.py)
  op = jax.jit(npu_ops.npu_grouped_matmul_swiglu_quant_v2, static_argnames="group_list_type")
  q, s = op(x, w, ws, xs, jnp.asarray([10, -5, 100]), group_list_type=1)
  check((q, s), x, w, ws, xs, [10, 0, 22], "A8W8")
  q, s = op(x, w, ws, xs, jnp.asarray([20, 8, 40]))
  check((q, s), x, w, ws, xs, [20, 0, 12], "A8W8")


def test_v1():
  counts = [12, 20, 8]
  x, w, ws, xs = make_case(17, "A8W8", 40, 32, 16, 3)
  q, s, off = npu_ops.npu_grouped_matmul_swiglu_quant(x, ref.nd_to_nz(w, 32), list(np.cumsum(counts)),
                                                      ws, xs)
  check((q, s), x, w, ws, xs, counts, "A8W8")
  assert off.shape == () and off.dtype == jnp.float32
  x, w, ws, xs = make_case(18, "A8W4", 40, 64, 16, 3, groups=2)
  assist = ref.canonical_assist(w, ws)
  q, s, _ = npu_ops.npu_grouped_matmul_swiglu_quant(
      x, ref.pack_int4(w), jnp.asarray(np.cumsum(counts)), ref.float32_to_word(ws), xs,
      bias=assist)
  check((q, s), x, w, ws, xs, counts, "A8W4", assist=assist)


@st.composite
def cases(draw):
  scenario = draw(st.sampled_from(["A8W8", "A8W4", "A4W4"]))
  e = draw(st.integers(1, 6))
  m = draw(st.integers(1, 80))
  k = draw(st.sampled_from([8, 16, 48, 64]))
  n = draw(st.sampled_from([2, 8, 16, 34]))
  if scenario != "A8W8":
    n = max(8, n // 8 * 8)
  counts = draw(st.lists(st.integers(0, m), min_size=e, max_size=e))
  # Scale the counts so their total fits in m (tail rows allowed).
  total = sum(counts)
  if total > m:
    counts = [c * m // total for c in counts]
  # A8W4: per channel or per k-group (G | k, k / G even); A4W4: smooth scales or none.
  groups = draw(st.sampled_from([1, 2, 4])) if scenario == "A8W4" else 1
  smooth = draw(st.sampled_from([None, "per_column", "per_expert"])) if scenario == "A4W4" \
      else None
  return (scenario, m, k, n, e, counts, draw(st.booleans()), draw(st.integers(0, 2**16)),
          groups, smooth)


@given(cases())
# found by CI (seed 1272762531): A8W4 terms that cancel, the scale 20 ulps from the golden's
@example(case=("A8W4", 54, 64, 8, 6, [0, 0, 0, 0, 39, 0], False, 26, 4, None))
def test_property_against_golden(case):
  """Under the `ci` profile (conftest) new random examples every run; a failure prints the
  seed (`--hypothesis-seed=...`) and the falsifying case."""
  scenario, m, k, n, e, counts, dynamic, seed, groups, smooth = case
  x, w, ws, xs = make_case(seed, scenario, m, k, n, e, groups=groups)
  x_in = ref.pack_int4(x) if scenario == "A4W4" else x
  w_in = w if scenario == "A8W8" else ref.pack_int4(w)
  gl = jnp.asarray(counts) if dynamic else counts
  rng = np.random.default_rng(seed)
  smooth_in = {None: None, "per_column": rng.uniform(0.5, 2, (e, n // 2)).astype(np.float32),
               "per_expert": rng.uniform(0.5, 2, (e,)).astype(np.float32)}[smooth]
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x_in, w_in, ws, xs, gl, group_list_type=1, smooth_scale=smooth_in,
      dequant_mode=1 if groups > 1 else 0)
  extra = {"assist": ref.canonical_assist(w, ws)} if scenario == "A8W4" else {}
  if smooth_in is not None:
    extra["smooth"] = smooth_in.reshape(e, -1)
  check(got, x, w, ws, xs, counts, scenario, **extra)


def test_vmap_over_group_lists_and_tokens():
  x, w, ws, xs = make_case(19, "A8W8", 32, 16, 8, 3)
  gls = [[10, 10, 12], [0, 30, 0]]
  op = lambda x, gl: npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws, xs, gl,
                                                                group_list_type=1)
  xb = np.stack([x, x[::-1]])
  q, s = jax.vmap(op)(xb, jnp.asarray(gls))
  for i in range(2):
    check((q[i], s[i]), xb[i], w, ws, xs, gls[i], "A8W8")


@pytest.mark.parametrize("scenario", ["A8W8", "A4W4"])
@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("tokens", [4, 512])
def test_epilogue_per_block_or_after_the_matmul(scenario, dynamic, tokens):
  """Both placements of the epilogue (few / many expected tokens) against the golden."""
  m, k, n, e = 40, 256, 32, 8
  assert fused_lib._epilogue_after(m, k, n, e, tokens, scenario) == (tokens == 4)
  counts = [7, 0, 12, 1, 0, 9, 3, 0]  # sum 32 < m: rows past the groups
  x, w, ws, xs = make_case(17, scenario, m, k, n, e, negative_scales=True)
  x[2] = 0
  ws[-1] = np.inf  # an unused expert's scale reaches no row (rows past the groups stay 0)
  gl = jnp.asarray(counts) if dynamic else counts
  kw, smooth = {}, None
  if scenario == "A4W4":
    smooth = np.random.default_rng(18).uniform(0.5, 2, (e, n // 2)).astype(F32)
    x_in, w_in, ws_in = ref.pack_int4(x), encode_int4_weight(w, "words_nd"), ws
    kw = dict(smooth=smooth)
  else:
    x_in, w_in, ws_in = x, w, ws
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x_in, w_in, ws_in, xs, gl, smooth_scale=smooth, group_list_type=1, tuning_config=[tokens])
  check(got, x, w, ws, xs, counts, scenario, **kw)


@pytest.mark.parametrize("dynamic", [False, True])
def test_large_weights_take_the_dense_ladder(dynamic):
  """k x n = 2^20 (512 x 2048): the XLA path's remainder ladder of four sizes per octave
  (`row_blocks.remainder_blocks`; the other tests' weights take one per octave), per-block
  epilogue, remainders of many sizes, an empty group, rows past the groups."""
  counts = [1, 37, 0, 130, 90]  # sum 258 < m
  x, w, ws, xs = make_case(21, "A8W8", 270, 512, 2048, len(counts))
  gl = jnp.asarray(counts) if dynamic else counts
  got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws, xs, gl, group_list_type=1,
                                                   tuning_config=[128])
  check(got, x, w, ws, xs, counts, "A8W8")


@pytest.mark.parametrize("scenario,groups", [("A8W8", 1), ("A8W4", 2)])
def test_strict_dtype_and_rank_promotion(scenario, groups):
  """No implicit promotion inside the op (peers' suites run under both settings)."""
  counts = [11, 0, 23, 14]
  x, w, ws, xs = make_case(4, scenario, 60, 256, 80, 4, groups=groups)
  w_in = w if scenario == "A8W8" else jnp.asarray(w, jnp.int4)
  with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
    got = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
        x, w_in, ws, xs, jnp.asarray(counts), group_list_type=1, dequant_mode=int(groups > 1))
  check(got, x, w, ws, xs, counts, scenario,
        **({} if scenario == "A8W8" else {"assist": ref.canonical_assist(w, ws)}))


@pytest.mark.parametrize("impl", impls("fused_A8W4"))
def test_numpy_assist_matrix_under_jit_with_a_dynamic_list(impl):
  """A8W4's assist matrix given as a NumPy array (v2's weight_assist_matrix, v1's bias)
  inside jit with a traced group list: every implementation takes it and gives the
  golden's codes (the reference indexed the NumPy array with traced group ids)."""
  rng = np.random.default_rng(19)
  x = rng.integers(-128, 128, (8, 32)).astype(np.int8)
  w = rng.integers(-8, 8, (2, 32, 16))
  ws = rng.uniform(5e-3, 2e-2, (2, 16)).astype(np.float32)
  xs = rng.uniform(0.5, 2, 8).astype(np.float32)
  assist = ref.canonical_assist(w, ws)
  counts = [3, 5]
  want = ref.swiglu_quant(x, w, ws, xs, ref.group_bounds(counts, 1), scenario="A8W4",
                          assist=assist)
  v2 = jax.jit(lambda gl: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, int4_array(w), ws, xs, gl, weight_assist_matrix=assist, group_list_type=1,
      **IMPLEMENTATIONS[impl]))
  v1 = jax.jit(lambda gl: npu_ops.npu_grouped_matmul_swiglu_quant(
      x, int4_array(w), gl, ws, xs, bias=assist, **IMPLEMENTATIONS[impl])[:2])
  for got in (v2(jnp.asarray(counts)), v1(jnp.cumsum(jnp.asarray(counts)))):
    assert_int8_equal(got[0], want[0])
    assert_scale_close(got[1], want[1])


@pytest.mark.parametrize("impl", impls("fused_A8W8"))
def test_non_finite_scales_give_the_goldens_nan_scales(impl):
  """A NaN or inf x_scale, or a NaN column of an expert's weight scale, puts NaN in the
  rows' C: their scales are NaN on every implementation, as the golden's (the TPU kernel,
  moving per-row scales between rows and columns by a float max, read a NaN as -inf), and
  their codes 0; the other rows are the golden's."""
  x, w, ws, xs = make_case(31, "A8W8", 10, 128, 64, 3)
  xs[1], xs[2], ws[2, 5] = np.nan, np.inf, np.nan  # rows 1, 2; rows 8, 9 (expert 2)
  counts = [8, 0, 2]
  # default tiles: one row tile of these rows, its scales moved in rows of its width
  # (at which XLA:CPU's float max dropped the NaN; at the suite's 32, it did not)
  q, s = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w, ws, xs, jnp.asarray(counts), group_list_type=1,
      **dict(IMPLEMENTATIONS[impl], tiles=None))
  with np.errstate(invalid="ignore"):
    want_q, want_s = ref.swiglu_quant(x, w, ws, xs, ref.group_bounds(counts, 1),
                                      scenario="A8W8")
  bad = np.isnan(want_s)
  assert bad[[1, 2]].all() and bad[8:].all() and not bad[[0, 3, 4, 5, 6, 7]].any()
  np.testing.assert_array_equal(np.isnan(np.asarray(s)), bad)
  assert not np.asarray(q)[bad].any()
  assert_int8_equal(np.asarray(q)[~bad], want_q[~bad])
  assert_scale_close(np.asarray(s)[~bad], want_s[~bad])


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("impl", impls("fused_A8W4"))
def test_a8w4_zero_rows_dequantize_to_float32_residuals(impl, groups):
  """A8W4 all-zero x rows (semantics B.1.4, README): C is the float32 residual of
  `A - sum_g s_g 8 colsum_g`, so their codes may be noise, but `codes * scale` is at most
  a few ulps of the terms that cancel (golden: exactly 0), never a value of a real row's
  size; the other rows are the golden's."""
  x, w, ws, xs = make_case(23, "A8W4", 40, 256, 64, 2, groups=groups)
  zero = [0, 7, 21, 39]
  x[zero] = 0
  counts = [22, 18]
  assist = ref.canonical_assist(w, ws)
  q, s = jax.jit(lambda gl: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, int4_array(w), ws, xs, gl, weight_assist_matrix=assist, group_list_type=1,
      dequant_mode=int(groups > 1), **IMPLEMENTATIONS[impl]))(jnp.asarray(counts))
  q, s = np.asarray(q), np.asarray(s)
  live = np.setdiff1d(np.arange(40), zero)
  want_q, want_s = ref.swiglu_quant(x, w, ws, xs, ref.group_bounds(counts, 1),
                                    scenario="A8W4", assist=assist)
  assert_int8_equal(q[live], want_q[live])
  # C of a zero row <= ~4 ulps of |A| (|A| * x_scale bounds both cancelling sums), so
  # SwiGLU's output and the scale (amax / 127) stay below |A|^2 2^-40 per row.
  bound = (np.abs(assist).max() * xs.max()) ** 2 * 2.0 ** -40
  assert np.all(s[zero] <= bound) and np.all(np.abs(q[zero] * s[zero][:, None]) <= 127 * bound)
  slack = ref.a8w4_scale_slack(x, w, ws, xs, ref.group_bounds(counts, 1), assist)
  assert_scale_close(s[live], want_s[live], SCALE_ULPS + np.asarray(slack)[live])
