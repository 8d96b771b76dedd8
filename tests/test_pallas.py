"""Pallas kernels: the cases beyond the core numerics (those run on every implementation in
test_implementations); lowering for real TPU (Mosaic) and GPU (Triton) targets with
jax.export; dispatch rules."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

import npu_ops
from npu_ops._src import qat

import numpy_reference as ref
from helpers import assert_int8_equal, assert_scale_close, ends_within

from implementations import IMPLEMENTATIONS, KERNELS, TILES
M, K, N, E = 150, 160, 300, 4
COUNTS = {"empty_first": (0, 50, 60, 40), "empty_middle": (50, 0, 60, 40),
          "empty_last": (50, 60, 40, 0), "tail_rows": (20, 30, 0, 25)}  # last: rows past total


def int8_case(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.integers(-128, 128, (M, K), dtype=np.int8)
  w = rng.integers(-128, 128, (E, K, N), dtype=np.int8)
  w_scale = (rng.uniform(0.5, 1.5, (E, N)) * 1e-4).astype(np.float32)
  x_scale = rng.uniform(0.5, 1.5, (M,)).astype(np.float32)
  return x, w, w_scale, x_scale


def test_fused_kernel_static_group_list_nz_weight_and_default_tiles():
  x, w, w_scale, x_scale = int8_case(1)
  w_nz = npu_ops.npu_format_cast(w, 29)
  counts = [40, 40, 0, 70]
  q, s = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w_nz, w_scale, x_scale, counts, group_list_type=1, implementation="pallas_tpu",
      interpret=True, tuning_config=[37])
  want_q, want_s = ref.swiglu_quant(x, w, w_scale, x_scale, ref.group_bounds(counts, 1),
                                    scenario="A8W8")
  assert_int8_equal(q, want_q)
  assert_scale_close(s, want_s)


@pytest.mark.parametrize("impl", KERNELS)
def test_grouped_matmul_gradients_run_on_the_kernels(impl):
  rng = np.random.default_rng(3)
  x = jnp.asarray(rng.normal(size=(M, K)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(E, K, N)).astype(np.float32))
  dy = jnp.asarray(rng.normal(size=(M, N)).astype(np.float32))
  gl = jnp.asarray(COUNTS["empty_first"])

  platform = {"pallas_tpu": "tpu", "pallas_gpu": "cuda"}[impl]
  loss = lambda x, w: jnp.vdot(npu_ops.grouped_matmul(
      x, w, gl, implementation=impl, tiles=TILES), dy)
  # forward, dlhs (gmm) and drhs (tgmm), each a kernel; grad alone needs no forward
  # (the gradients' values: test_implementations.test_gmm_gradients)
  train = jax.value_and_grad(loss, argnums=(0, 1))
  assert kernel_counts(train, x, w, platforms=[platform])[platform] == 3
  assert kernel_counts(jax.grad(loss, argnums=(0, 1)), x, w, platforms=[platform])[platform] == 2


def test_qat_forward_on_the_kernel_equals_xla():
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=(M, K)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(E, K, N)).astype(np.float32) * 0.1)
  scale = qat.weight_scale_from_amax(w)
  f = lambda **kw: qat.fake_quant_gmm_swiglu_quant(x, w, scale, jnp.asarray(COUNTS["tail_rows"]),
                                                   group_list_type=1, **kw)
  np.testing.assert_array_equal(f(**IMPLEMENTATIONS["pallas_gpu"]),
                                f(implementation="xla"))


# ----- dispatch -------------------------------------------------------------------------

CUSTOM_CALL = {"tpu": "tpu_custom_call", "cuda": "__gpu$xla.gpu.triton"}
PLATFORM_OF = {"pallas_tpu": "tpu", "pallas_gpu": "cuda"}


def lowered(f, *args, platforms):
  """The exported module's text; only the custom-call compatibility checks are disabled."""
  exp = export.export(jax.jit(f), platforms=platforms, disabled_checks=[
      export.DisabledSafetyCheck.custom_call(c) for c in CUSTOM_CALL.values()])(*args)
  return exp.mlir_module()


def custom_calls(text):
  return re.findall(r"stablehlo.custom_call @([\w$.]+)", text)


def kernel_count(text, platform):
  """The op kernels in a lowered module (for TPU: not counting their metadata kernels)."""
  calls = custom_calls(text).count(CUSTOM_CALL[platform])
  if platform == "tpu":
    from pallas_kernels import tpu_visits  # noqa: PLC0415  (metadata: a scalar kernel)
    calls -= sum(text.count(f'kernel_name = "{k}"') for k in tpu_visits.KERNEL_NAMES)
  return calls


def kernel_counts(f, *args, platforms):
  text = lowered(f, *args, platforms=platforms)
  return {p: kernel_count(text, p) for p in CUSTOM_CALL}


def test_none_picks_the_kernel_per_lowering_platform():
  """implementation=None decides at lowering: one export for TPU, CUDA and CPU holds the
  Mosaic kernel, the Triton kernel and the XLA path; a CPU program holds no kernel."""
  x, w, w_scale, x_scale = int8_case()
  counts = jnp.asarray(COUNTS["empty_middle"])
  fused = lambda x, c: npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, w_scale, x_scale, c,
                                                                  group_list_type=1)
  assert kernel_counts(fused, x, counts, platforms=["tpu"]) == {"tpu": 1, "cuda": 0}
  assert kernel_counts(fused, x, counts, platforms=["cuda"]) == {"tpu": 0, "cuda": 1}
  assert kernel_counts(fused, x, counts, platforms=["cpu"]) == {"tpu": 0, "cuda": 0}
  assert kernel_counts(fused, x, counts, platforms=["tpu", "cuda", "cpu"]) == {"tpu": 1, "cuda": 1}
  # On this CPU the same jitted program runs the XLA path, bit for bit.
  q, s = jax.jit(fused)(x, counts)
  want_q, want_s = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w, w_scale, x_scale, counts, group_list_type=1, implementation="xla")
  np.testing.assert_array_equal(q, want_q)
  np.testing.assert_array_equal(s, want_s)
  # No kernel for the case: XLA on every platform.
  w4 = (w // 16).astype(jnp.int4)
  groups_of_80_rows = jnp.ones((E, 2, N), jnp.float32)  # k = 160: no 128-row k groups
  a8w4 = lambda x, c: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w4, groups_of_80_rows, x_scale, c, group_list_type=1, dequant_mode=1)
  assert kernel_counts(a8w4, x, counts, platforms=["tpu", "cuda"]) == {"tpu": 0, "cuda": 0}
  xf = jnp.ones((8, 128))
  gmm_float = lambda a: npu_ops.grouped_matmul(a, jnp.ones((2, 128, 128)), [3, 5])
  assert kernel_counts(gmm_float, xf, platforms=["tpu", "cuda"]) == {"tpu": 1, "cuda": 1}
  gmm_int8 = lambda a: npu_ops.grouped_matmul(a, w[:2], [3, 5])  # exact int32 on the MXU too
  assert kernel_counts(gmm_int8, x[:8], platforms=["tpu", "cuda"]) == {"tpu": 1, "cuda": 1}


def test_none_under_vmap_and_grad_on_cpu():
  rng = np.random.default_rng(8)
  x = jnp.asarray(rng.normal(size=(2, 40, 16)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(E, 16, 8)).astype(np.float32))
  gl = jnp.asarray([10, 0, 20, 5])
  run = lambda impl: jax.jit(jax.vmap(jax.grad(lambda x: jnp.sum(npu_ops.grouped_matmul(
      x, w, gl, implementation=impl) ** 2))))(x)
  np.testing.assert_allclose(run(None), run("xla"), rtol=1e-6)


def test_explicit_kernel_requests_that_cannot_be_served_raise():
  x, w, w_scale, x_scale = int8_case()
  with pytest.raises(NotImplementedError, match="A8W4 scale groups of 80 rows"):
    npu_ops.npu_grouped_matmul_swiglu_quant_v2(
        x, (w // 16).astype(jnp.int4), jnp.ones((E, 2, N)), x_scale, [M], group_list_type=1,
        dequant_mode=1, implementation="pallas_tpu")
  xf, wf = jnp.ones((M, K), jnp.bfloat16), jnp.ones((E, K, N), jnp.bfloat16)
  with pytest.raises(NotImplementedError, match="float16 operands"):
    npu_ops.tgmm(xf.astype(jnp.float16), xf.astype(jnp.float16), [M],
                 implementation="pallas_tpu")
  # at trace time (eval_shape lowers nothing), not when the program is lowered
  with pytest.raises(NotImplementedError, match="float16 operands"):
    jax.eval_shape(lambda a: npu_ops.tgmm(a, a, [M], implementation="pallas_tpu"),
                   xf.astype(jnp.float16))
  for op, args in ((npu_ops.grouped_matmul, (xf, wf)), (npu_ops.tgmm, (xf, xf))):
    with pytest.raises(NotImplementedError, match="float8_e4m3fn result"):
      jax.eval_shape(lambda a, b: op(a, b, [M], preferred_element_type=jnp.float8_e4m3fn,
                                     implementation="pallas_gpu"), *args)
  with pytest.raises(NotImplementedError, match="float16 operands"):
    jax.eval_shape(lambda a: npu_ops.grouped_matmul(a, wf.astype(jnp.float16), [M],
                                                    implementation="pallas_tpu"),
                   xf.astype(jnp.float16))
  with pytest.raises(ValueError, match="implementation"):
    npu_ops.grouped_matmul(jnp.ones((8, 4)), jnp.ones((1, 4, 4)), [8], implementation="triton")
  with pytest.raises(TypeError, match="interpret"):
    npu_ops.grouped_matmul(jnp.ones((8, 4)), jnp.ones((1, 4, 4)), [8], interpret="yes")
  with pytest.raises(TypeError, match="tiles"):
    npu_ops.grouped_matmul(jnp.ones((8, 4)), jnp.ones((1, 4, 4)), [8], tiles=(32, 128, 128))


def test_tpu_fused_plan_keeps_an_expert_resident_when_it_fits():
  from pallas_kernels import tpu
  tiles = npu_ops.TileSizes()
  bench = tpu.fused_plan(4096, 2048, 2816, 1, tiles)   # 5.8 MB of int8 weight per expert
  assert bench.resident and bench.block_k == 2048 and bench.block_m == 128
  mixtral = tpu.fused_plan(4096, 4096, 28672, 1, tiles)  # 117 MB per expert: k is tiled
  assert not mixtral.resident and mixtral.block_k == 512 and 32 <= mixtral.block_m < 128
  grouped = tpu.fused_plan(4096, 8192, 4096, 4, tiles)  # A8W4, k groups of 2048 rows
  assert 2048 % grouped.block_k == 0
  assert tpu.fused_plan(64, 128, 1 << 20, 1, tiles).block_m == 32  # never below 32 rows


def test_tpu_kernels_take_the_tiles_given():
  """The TPU gmm / tgmm run the tiles asked for (the defaults come from the model's table):
  rows a multiple of 32 but not a power of two, k tiled with a partial last tile (160 =
  128 + 32), partial column tiles; a tile set beyond the VMEM plan is refused, naming it."""
  rng = np.random.default_rng(5)
  x = rng.normal(size=(M, K)).astype(np.float32)
  w = rng.normal(size=(E, K, N)).astype(np.float32)
  dy = rng.normal(size=(M, N)).astype(np.float32)
  counts = COUNTS["tail_rows"]
  bounds = ref.group_bounds(counts, 1)
  tiles = npu_ops.TileSizes(block_m=96, block_k=128, block_n=384)
  run = dict(implementation="pallas_tpu", interpret=True, tiles=tiles,
             precision=jax.lax.Precision.HIGHEST)
  x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
  got = npu_ops.grouped_matmul(x, w, np.asarray(counts), **run)
  want = ref.grouped_matmul(x64, w64, bounds, np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  got = npu_ops.tgmm(x, dy, np.asarray(counts), num_groups=E, **run)
  want = np.zeros((E, K, N))
  for i, (lo, hi) in enumerate(bounds):
    want[i] = x64[lo:hi].T @ dy64[lo:hi]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
  big = npu_ops.TileSizes(512, 8192, 4096)
  with pytest.raises(ValueError, match="tiles: expected blocks within the TPU gmm kernel's VMEM"):
    jax.jit(lambda a, b: npu_ops.grouped_matmul(  # the kernel is traced when lowered
        a, b, np.full(4, 1024), implementation="pallas_tpu", interpret=True, tiles=big)).trace(
        jax.ShapeDtypeStruct((4096, 8192), jnp.float32),
        jax.ShapeDtypeStruct((4, 8192, 8192), jnp.float32)).lower()


def test_tile_sizes():
  with pytest.raises(ValueError, match="block_m: expected a positive multiple of 32"):
    npu_ops.TileSizes(block_m=48)
  assert npu_ops.TileSizes(block_m=96, block_n=1408).block_n == 1408  # TPU: lanes, not 2**i
  with pytest.raises(ValueError, match="block_k"):
    npu_ops.TileSizes(block_k=64)
  assert npu_ops.TileSizes.for_problem(4096, 2048, 2816, 16).block_m == 128
  assert npu_ops.TileSizes.for_problem(4096, 2048, 2816, 16, expected_tokens=40).block_m == 64
  assert npu_ops.TileSizes.for_problem(512, 2048, 2816, 64).block_m == 32
  small = npu_ops.TileSizes.for_problem(64, 100, 100, 2)
  assert (small.block_k, small.block_n) == (128, 128)


# ----- lowering for the real targets ------------------------------------------------------

@pytest.mark.parametrize("impl", KERNELS)
def test_kernels_lower_for_their_target(impl):
  platform = PLATFORM_OF[impl]
  spec = jax.ShapeDtypeStruct
  m, k, n, e = 256, 256, 512, 4
  fused = lambda x, w, ws, xs, gl: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w, ws, xs, gl, group_list_type=1, implementation=impl)
  text = lowered(fused, spec((m, k), jnp.int8), spec((e, n // 32, k // 16, 16, 32), jnp.int8),
                 spec((e, n), jnp.float32), spec((m,), jnp.float32), spec((e,), jnp.int32),
                 platforms=[platform])
  assert kernel_count(text, platform) == 1
  assert "npu_gmm_swiglu_quant" in text
  a8w4 = lambda x, w, ws, xs, gl, assist: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w, ws, xs, gl, group_list_type=1, dequant_mode=1, weight_assist_matrix=assist,
      implementation=impl)
  text = lowered(a8w4, spec((m, k), jnp.int8), spec((e, k, n // 8), jnp.int32),  # int4 words
                 spec((e, 2, n), jnp.float32), spec((m,), jnp.float32), spec((e,), jnp.int32),
                 spec((e, n), jnp.float32), platforms=[platform])
  assert kernel_count(text, platform) == 1
  # the TPU kernel takes the words as they are (unpacked in VMEM); the GPU's get them
  # unpacked by XLA first (shifting each nibble to the top)
  assert ("stablehlo.shift_left" in text) == (platform != "tpu")

  def train_step(x, w, dy, gl):  # forward gmm, then gmm and tgmm for the gradients
    loss = lambda x, w: jnp.vdot(npu_ops.grouped_matmul(x, w, gl, implementation=impl), dy)
    return jax.value_and_grad(loss, argnums=(0, 1))(x, w)

  text = lowered(train_step, spec((m, k), jnp.bfloat16), spec((e, k, n), jnp.bfloat16),
                 spec((m, n), jnp.bfloat16), spec((e,), jnp.int32), platforms=[platform])
  assert kernel_count(text, platform) == 3
  assert "npu_gmm" in text and "npu_tgmm" in text


def test_v1_takes_the_kernel_too():
  x, w, w_scale, x_scale = int8_case(6)
  cumsum = [40, 40, 100, 150]
  q, s, _ = npu_ops.npu_grouped_matmul_swiglu_quant(x, w, cumsum, w_scale, x_scale,
                                                     implementation="pallas_gpu", interpret=True,
                                                     tiles=TILES)
  want_q, want_s = ref.swiglu_quant(x, w, w_scale, x_scale, ref.group_bounds(cumsum, 0),
                                    scenario="A8W8")
  assert_int8_equal(q, want_q)
  assert_scale_close(s, want_s)


@pytest.mark.parametrize("group_type", [0, 2])
def test_npu_grouped_matmul_float_paths_on_the_kernels(group_type):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(M, K)).astype(np.float32))
  if group_type == 0:   # m-axis: rows of x per expert weight
    w, group_list = jnp.asarray(rng.normal(size=(E, K, N)).astype(np.float32)), [50, 50, 110, 140]
  else:                 # k-axis: k ranges of x and of one weight
    w, group_list = jnp.asarray(rng.normal(size=(K, N)).astype(np.float32)), [40, 40, 100, 160]
  run = lambda **kw: npu_ops.npu_grouped_matmul(x, w, group_list=jnp.asarray(group_list),
                                                group_type=group_type, split_item=3, **kw)[0]
  got = run(implementation="pallas_tpu", interpret=True, tiles=TILES)
  want = run(implementation="xla")
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  assert kernel_counts(lambda x: npu_ops.npu_grouped_matmul(
      x, w, group_list=jnp.asarray(group_list), group_type=group_type, split_item=3,
      implementation="pallas_gpu")[0], x, platforms=["cuda"])["cuda"] == 1


@pytest.mark.parametrize("impl", KERNELS)
def test_kernels_take_zero_rows(impl):
  kw = IMPLEMENTATIONS[impl]
  x, w, w_scale, _ = int8_case()
  q, s = npu_ops.npu_grouped_matmul_swiglu_quant_v2(x[:0], w, w_scale, jnp.ones((0,)),
                                                    jnp.zeros((E,), jnp.int32), **kw)
  assert q.shape == (0, N // 2) and s.shape == (0,)
  xf, wf = jnp.ones((0, K)), jnp.ones((E, K, N))
  assert npu_ops.grouped_matmul(xf, wf, jnp.zeros((E,), jnp.int32), **kw).shape == (0, N)
  out = npu_ops.tgmm(xf, jnp.ones((0, N)), jnp.zeros((E,), jnp.int32), **kw)
  np.testing.assert_array_equal(out, np.zeros((E, K, N)))


def test_kernel_precision_is_the_strongest_asked_that_the_compiler_has():
  from pallas_kernels import common
  P = jax.lax.Precision
  mosaic = (P.DEFAULT, P.HIGHEST)
  assert common.float32_precision(None, jnp.float32) is None
  assert common.float32_precision(P.HIGHEST, jnp.bfloat16) is None  # exact products anyway
  assert common.float32_precision(P.HIGH, jnp.float32) == P.HIGH
  assert common.float32_precision(P.HIGH, jnp.float32, supported=mosaic) == P.HIGHEST
  assert common.float32_precision((P.DEFAULT, P.HIGH), jnp.float32) == P.HIGH
  assert common.float32_precision((P.DEFAULT, P.DEFAULT), jnp.float32) == P.DEFAULT


def test_import_boundaries():
  """The kernels' package imports nothing of npu_ops (the epilogue math they share lives in
  `pallas_kernels.epilogue`), and no core module imports `npu_ops.tools` (issue 33 item 5)."""
  import os
  import subprocess
  import sys
  code = ("import sys\n"
          "import pallas_kernels.tpu, pallas_kernels.gpu\n"
          "assert not [m for m in sys.modules if m.startswith('npu_ops')], 'kernels import npu_ops'\n"
          "import npu_ops, npu_ops.nn, npu_ops.moe, npu_ops.perf, npu_ops._src.expert_parallel\n"
          "assert not [m for m in sys.modules if m.startswith('npu_ops.tools')], 'core imports tools'\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"})
  assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize("counts,offset", [(COUNTS["empty_first"], None),
                                           (COUNTS["tail_rows"], None), ((150, 0, 0, 0), None),
                                           ((0, 0, 0, 7), None), ((10, 20, 30, 40, 20, 30), 1)])
def test_tpu_fused_kernel_split_between_two_cores(counts, offset):
  """On a v5p (two TensorCores a device) the fused kernel deals its row tiles to both cores
  (a "parallel" grid axis, `tpu_visits.two_cores`): each core's visits, head and tail
  included, give the reference's codes (interpret mode runs the cores one after the other).
  With group_offset, 4 local experts of 6 groups from the second."""
  from pallas_kernels import common, tpu_tiles, tpu_visits  # noqa: PLC0415
  x, w, w_scale, x_scale = int8_case(4)
  tiles = npu_ops.TileSizes(32, 128, 128)
  token = tpu_tiles.CHIP.set("v5p")
  try:
    q, s = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
        x, w, w_scale, x_scale, np.asarray(counts), group_list_type=1, group_offset=offset,
        implementation="pallas_tpu", interpret=True, tiles=tiles)
  finally:
    tpu_tiles.CHIP.reset(token)
  bounds = ref.group_bounds(counts, 1)
  if offset is not None:
    bounds = bounds[offset:offset + E]
  want_q, want_s = ref.swiglu_quant(x, w, w_scale, x_scale, bounds, scenario="A8W8")
  assert_int8_equal(q, want_q)
  assert_scale_close(s, want_s)
  # the metadata: each core runs the visits of its own row tiles, all of them once, cut
  # where the MXU passes (8 rows each here, one at least per visit) are most even
  ends = jnp.cumsum(jnp.asarray(counts[:E], jnp.int32))
  start = None if offset is None else jnp.int32(sum(counts[:offset]))
  if offset is not None:
    ends = jnp.cumsum(jnp.asarray(counts, jnp.int32))[offset:offset + E]
  one = common.row_visits(ends, M, 32, start)
  two, _, _, bound, _ = tpu_visits.two_cores(one, M, 32, by_visits=False, mxu_rows=8,
                                          interpret=True)
  assert bound == common.per_core(M, 32, E, 2)
  assert int(two.count.sum()) == int(one.count[0]) and two.group.shape == (2 * bound,)
  runs = [np.asarray(two.tile[c * bound:c * bound + int(two.count[c])]) for c in range(2)]
  assert np.array_equal(np.concatenate(runs), np.asarray(one.tile[:int(one.count[0])]))
  cut = runs[1][0]
  assert len(runs[0]) and runs[0][-1] < cut  # contiguous tile ranges, a tile at least each
  passes = np.zeros(5, int)  # per tile: each group's rows in it, 8 at a time
  for lo, hi in bounds:
    for tile in range(5):
      rows = min(hi, 32 * tile + 32) - max(lo, 32 * tile)
      passes[tile] += -(-rows // 8) if rows > 0 else 0
  work = [max(passes[:c].sum(), passes[c:].sum()) for c in range(1, 5)]
  assert max(passes[:cut].sum(), passes[cut:].sum()) == min(work), (passes, cut)


@pytest.mark.parametrize("offset", [None, 1])
def test_tpu_kernels_multiply_only_the_row_blocks_of_their_group(offset):
  """With 256-row tiles a visit multiplies and finishes only the 128-row blocks
  (`tpu.ROW_BLOCK`) that hold its group's rows: groups that start and end inside blocks,
  share a tile three ways, skip a block, leave rows past the total; with group_offset the
  head rows too. The fused op's codes and gmm's output against the NumPy reference."""
  from pallas_kernels import tpu  # noqa: PLC0415
  assert tpu.ROW_BLOCK == 128
  m, k, n = 600, 128, 256
  counts = (5, 200, 0, 130, 100, 90, 40)  # 565 rows of 600
  e = len(counts) - (offset or 0)
  rng = np.random.default_rng(11)
  x = rng.integers(-128, 128, (m, k), dtype=np.int8)
  w = rng.integers(-128, 128, (len(counts), k, n), dtype=np.int8)
  w_scale = (rng.uniform(0.5, 1.5, (len(counts), n)) * 1e-4).astype(np.float32)
  x_scale = rng.uniform(0.5, 1.5, (m,)).astype(np.float32)
  local = slice(offset or 0, None)
  bounds = ref.group_bounds(counts, 1)[local]
  tiles = npu_ops.TileSizes(256, 128, 128)
  q, s = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w[local], w_scale[local], x_scale, np.asarray(counts), group_list_type=1,
      group_offset=offset, implementation="pallas_tpu", interpret=True, tiles=tiles)
  want_q, want_s = ref.swiglu_quant(x, w[local], w_scale[local], x_scale, bounds,
                                    scenario="A8W8")
  assert_int8_equal(q, want_q)
  assert_scale_close(s, want_s)
  xf = rng.normal(size=(m, k)).astype(np.float32)
  wf = rng.normal(size=(e, k, n)).astype(np.float32)
  got = npu_ops.grouped_matmul(xf, wf, np.asarray(counts), group_offset=offset,
                               implementation="pallas_tpu", interpret=True, tiles=tiles,
                               precision=jax.lax.Precision.HIGHEST)
  want = ref.grouped_matmul(xf.astype(np.float64), wf.astype(np.float64), bounds, np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("chip", ["v5e", "tpu7x"])
def test_tgmm_contracts_row_blocks_as_wide_as_the_mxu(chip):
  """tgmm contracts rows: its row blocks are 128 rows on v5e and 256 on TPU7x, whose MXU is
  256 wide (`tpu_tiles.mxu_width`). Groups that start and end inside either, share a 512-row
  tile, are empty, leave rows past the total: against the NumPy reference."""
  from pallas_kernels import tpu_tiles  # noqa: PLC0415
  counts = (5, 300, 0, 130, 200, 90, 40)  # 765 rows of 800
  m, k, n = 800, 128, 256
  rng = np.random.default_rng(5)
  x = rng.normal(size=(m, k)).astype(np.float32)
  dy = rng.normal(size=(m, n)).astype(np.float32)
  token = tpu_tiles.CHIP.set(chip)
  try:
    got = npu_ops.tgmm(x, dy, np.asarray(counts), num_groups=len(counts),
                       implementation="pallas_tpu", interpret=True,
                       tiles=npu_ops.TileSizes(512, 128, 128),
                       precision=jax.lax.Precision.HIGHEST)
  finally:
    tpu_tiles.CHIP.reset(token)
  want = np.zeros((len(counts), k, n))
  for g, (lo, hi) in enumerate(ref.group_bounds(counts, 1)):
    want[g] = x[lo:hi].astype(np.float64).T @ dy[lo:hi].astype(np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("impl", KERNELS)
def test_kernels_take_more_experts_than_rows(impl):
  """Decode over many experts: 40 rows over 64 experts (most empty, some of one row). A
  grid step costs time even when skipped, so the grid has no more visits than rows
  (`common.per_core`), not one per expert; the codes against the NumPy reference."""
  from pallas_kernels import common  # noqa: PLC0415
  m, k, n, e = 40, 128, 256, 64
  rng = np.random.default_rng(21)
  counts = np.zeros(e, np.int64)
  counts[rng.choice(e, 25, replace=False)] = 1
  counts[3], counts[60] = 9, 6  # 40 rows in all
  x = rng.integers(-128, 128, (m, k), dtype=np.int8)
  w = rng.integers(-128, 128, (e, k, n), dtype=np.int8)
  w_scale = (rng.uniform(0.5, 1.5, (e, n)) * 1e-4).astype(np.float32)
  x_scale = rng.uniform(0.5, 1.5, (m,)).astype(np.float32)
  q, s = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w, w_scale, x_scale, counts, group_list_type=1, implementation=impl, interpret=True,
      tiles=npu_ops.TileSizes(32, 128, 128))
  want_q, want_s = ref.swiglu_quant(x, w, w_scale, x_scale, ref.group_bounds(counts, 1),
                                    scenario="A8W8")
  assert_int8_equal(q, want_q)
  assert_scale_close(s, want_s)
  v = common.row_visits(jnp.cumsum(jnp.asarray(counts, jnp.int32)), m, 32)
  assert v.group.shape == (m,) == (common.per_core(m, 32, e),)  # not 2 tiles + 65
  assert int(v.count[0]) <= m


@pytest.mark.parametrize("case", ["spread", "one_group", "offset", "a8w4_words", "a4w4_mx"])
def test_tpu_fused_kernel_splits_decode_visits_between_two_cores(case):
  """On a v5p, a few rows over many experts (fewer row tiles than groups) split their
  visits between the two TensorCores at a group boundary (`tpu_visits.two_cores`): a row
  tile then holds rows of both cores' groups, each core writes its own output and rows are
  taken from the core that holds their group. Codes against the NumPy reference; with
  group_offset, 48 local experts of 64 from the eighth; A8W4 from int32 words (each core
  unpacks its experts' weights on their first visit); "spread" with k = 768, its weights in
  3 pieces (`tpu.weight_pieces`); A4W4 (tokens in int32 words) with MX output, whose
  SwiGLU values each core writes for XLA to quantize (codes and scale bytes bit for bit)."""
  from pallas_kernels import common, tpu_tiles, tpu_visits  # noqa: PLC0415
  m, k, n, e = 40, 768 if case == "spread" else 128, 256, 64
  rng = np.random.default_rng(22)
  counts = np.zeros(e, np.int64)
  if case == "one_group":
    counts[5] = 37  # and 3 rows past the total
  else:
    counts[rng.choice(e, 25, replace=False)] = 1
    counts[3], counts[60] = 9, 6
  offset = 8 if case == "offset" else None
  local = slice(offset or 0, (offset or 0) + 48 if offset else e)
  a8w4, a4w4 = case == "a8w4_words", case == "a4w4_mx"
  int4 = (-8, 8)
  x = rng.integers(*(int4 if a4w4 else (-128, 128)), (m, k), dtype=np.int8)
  w = rng.integers(*(int4 if a8w4 or a4w4 else (-128, 128)), (e, k, n), dtype=np.int8)[local]
  w_scale = (rng.uniform(0.5, 1.5, (e, n)) * (1e-3 if a8w4 else 1e-4)).astype(np.float32)[local]
  x_scale = rng.uniform(0.5, 1.5, (m,)).astype(np.float32)
  assist = ref.canonical_assist(w, w_scale[:, None]) if a8w4 else None
  mx = dict(quant_mode=2, quant_dtype=jnp.float8_e4m3fn) if a4w4 else {}
  token = tpu_tiles.CHIP.set("v5p")
  try:
    q, s = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
        ref.pack_int4(x) if a4w4 else x, ref.pack_int4(w) if a8w4 or a4w4 else w, w_scale,
        x_scale, counts, group_list_type=1, group_offset=offset, weight_assist_matrix=assist,
        implementation="pallas_tpu", interpret=True, tiles=npu_ops.TileSizes(32, 128, 128),
        **mx)
  finally:
    tpu_tiles.CHIP.reset(token)
  bounds = ref.group_bounds(counts, 1)[local]
  scenario = "A8W4" if a8w4 else "A4W4" if a4w4 else "A8W8"
  want_q, want_s = ref.swiglu_quant(x, w, w_scale, x_scale, bounds, scenario=scenario,
                                    assist=assist,
                                    out=("mx", "float8_e4m3fn") if a4w4 else "int8")
  if a4w4:  # MX codes and e8m0 scale bytes, bit for bit
    bits = lambda a: np.asarray(a).view(np.uint8)
    np.testing.assert_array_equal(bits(q), bits(want_q))
    np.testing.assert_array_equal(bits(s), bits(want_s))
  else:
    assert_int8_equal(q, want_q)
    assert_scale_close(s, want_s)
  ends = jnp.cumsum(jnp.asarray(counts, jnp.int32))
  one = common.row_visits(ends, m, 32)
  two, _, _, _, row = tpu_visits.two_cores(one, m, 32, by_visits=True, interpret=True)
  c0, c1 = (int(c) for c in two.count)
  assert c0 + c1 == int(one.count[0])
  if case == "spread":  # both cores busy, split where a group starts
    assert abs(c0 - c1) <= 2 and 0 < int(row) < m


# A hot expert's run of 5 row tiles of 32, then runs of one and of two, an empty group, rows
# past the total: a ring of R buffers copies R - 1 runs ahead during the long run
HOT_THEN_COLD = np.array([5, 130, 0, 3, 2, 4, 6, 1, 40], np.int64)


@pytest.mark.parametrize("chip,case,ring", [("v5e", "prefill", 4), ("v5p", "prefill", 3),
                                            ("v5p", "decode_a8w4_words", 2),
                                            ("v5e", "decode_a8w4_words", 3)])
def test_tpu_fused_kernel_waits_for_the_weights_it_copies(chip, case, ring, monkeypatch):
  """The fused kernel copies each expert's resident weights by hand into a ring of VMEM
  buffers (`tpu.ring_buffers`, `ring` of them here), with the expert's own operands (its
  weight scales, A8W4's assist) in rings beside it, a visit starting one copy at most,
  as far ahead as a free buffer allows (`common.WeightRuns`). In the interpreter that runs
  a copy only when it is waited for and watches for races (a copy into a buffer that is
  being read), on one TensorCore (v5e: a step per row tile, looping over the tile's
  visits) and two (v5p: each core its own runs; decode splits the visits at a group
  boundary): the codes against the NumPy reference. A long run, runs of one visit and of
  several, row tiles shared by several groups, empty groups, rows past the total; A8W8's
  weights in pieces of k (`tpu.weight_pieces`), A8W4's whole."""
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
  from pallas_kernels import tpu, tpu_tiles, tpu_visits  # noqa: PLC0415
  monkeypatch.setattr(tpu, "MAX_WEIGHT_BUFFERS", ring)
  rng = np.random.default_rng(3)
  a8w4 = case.startswith("decode")
  if a8w4:  # fewer row tiles than experts: the visits are split between the cores
    m, counts = 40, np.array([3, 0, 9, 1, 1, 6, 0, 2, 5, 1, 4, 2, 0, 3], np.int64)
  else:  # row tiles split; k in 3 pieces, each waited for before its product
    m, counts = 200, HOT_THEN_COLD
  k, n, e = 128 if a8w4 else 768, 256, len(counts)
  assert tpu.weight_pieces(k, tpu.K_CHUNK) == (1 if a8w4 else 3)
  x = rng.integers(-128, 128, (m, k), dtype=np.int8)
  w = rng.integers(*((-8, 8) if a8w4 else (-128, 128)), (e, k, n), dtype=np.int8)
  w_scale = (rng.uniform(0.5, 1.5, (e, 1, n)) * (1e-3 if a8w4 else 1e-4)).astype(np.float32)
  x_scale = rng.uniform(0.5, 1.5, (m,)).astype(np.float32)
  assist = ref.canonical_assist(w, w_scale) if a8w4 else None
  ends = jnp.cumsum(jnp.asarray(counts, jnp.int32))
  interpret = pltpu.InterpretParams(dma_execution_mode="on_wait", detect_races=True,
                                    num_cores_or_threads=tpu_tiles.cores(chip))
  token = tpu_tiles.CHIP.set(chip)
  try:
    with ends_within(300):
      q, s = tpu.gmm_swiglu_quant(
          jnp.asarray(x), jnp.asarray(ref.pack_int4(w) if a8w4 else w), jnp.asarray(w_scale),
          jnp.asarray(x_scale), ends, assist=None if assist is None else jnp.asarray(assist),
          tiles=npu_ops.TileSizes(32, 128, 128), interpret=interpret)
  finally:
    tpu_tiles.CHIP.reset(token)
  plan = tpu.fused_plan(m, k, n, 1, npu_ops.TileSizes(32, 128, 128))
  assert plan.resident and plan.weight_buffers == ring
  want_q, want_s = ref.swiglu_quant(x, w, w_scale[:, 0], x_scale, ref.group_bounds(counts, 1),
                                    scenario="A8W4" if a8w4 else "A8W8", assist=assist)
  assert_int8_equal(q, want_q)
  assert_scale_close(s, want_s)
  # the runs, from the visits' experts: a run starts where a core's expert changes and
  # names it; every visit knows its run
  v, runs, _ = tpu_visits.row_visits(ends, m, 32, interpret=True)
  count, wid = int(v.count[0]), np.asarray(v.weight)
  starts = [t for t in range(count) if t == 0 or wid[t] != wid[t - 1]]
  assert np.asarray(runs.run)[:count].tolist() == [
      sum(s <= t for s in starts) - 1 for t in range(count)]
  assert (np.asarray(runs.run)[count:] == len(starts) - 1).all()  # past the count: no run
  expert = np.asarray(runs.expert)
  assert expert[:len(starts)].tolist() == wid[starts].tolist()
  assert (expert[len(starts):] == -1).all()


def test_weight_pieces_divide_k_as_deep_as_the_mxu_takes():
  """A resident weight's pieces (`tpu.weight_pieces`): equal, dividing k, each a multiple
  of 256 deep (what every chip's MXU takes whole) and no deeper than asked (gmm: 256, the
  fused kernel: `tpu.K_CHUNK`, 512), the deepest such; one piece where none divides k."""
  from pallas_kernels import tpu  # noqa: PLC0415
  for deepest, depths in ((256, (256,)), (tpu.K_CHUNK, (256, 512))):
    for k in range(128, 8193, 128):
      pieces = tpu.weight_pieces(k, deepest)
      assert k % pieces == 0
      fits = [d for d in depths if k % d == 0]
      assert k // pieces == (fits[-1] if fits else k), (k, deepest)


@pytest.mark.parametrize("chip,transposed,k,ring", [("v5e", False, 1024, 4),
                                                    ("v5p", True, 768, 3),
                                                    ("v5e", True, 256, 2)])
def test_tpu_gmm_waits_for_the_weights_it_copies(chip, transposed, k, ring, monkeypatch):
  """gmm copies each run's resident `[k, block_n]` weight tile by hand too, into a ring of
  `ring` buffers, the runs following the grid (column tile outermost): on one TensorCore
  a column tile's last runs copy the next column tile's first ones; on a v5p the two
  cores split the column tiles and each starts its own. In the interpreter that copies
  on wait, detects races and runs two cores for the v5p: two column tiles, weights
  `[e, k, n]` or `[e, n, k]` (`transpose_rhs`, the VJP's), in 4, 3 or 1 pieces of k
  (`tpu.weight_pieces`), a long run among short ones, against the NumPy reference."""
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
  from pallas_kernels import tpu, tpu_tiles  # noqa: PLC0415
  monkeypatch.setattr(tpu, "MAX_WEIGHT_BUFFERS", ring)
  rng = np.random.default_rng(4)
  m, n, counts = 200, 512, HOT_THEN_COLD
  assert tpu.weight_pieces(k) == k // 256
  tiles = npu_ops.TileSizes(32, k, 256)  # k in one step: resident, copied by hand
  assert tpu._float_blocks("gmm", k, n, 4, 4, tiles)[1] == k  # noqa: SLF001
  x = rng.normal(size=(m, k)).astype(np.float32)
  w = rng.normal(size=(len(counts), k, n)).astype(np.float32)
  interpret = pltpu.InterpretParams(dma_execution_mode="on_wait", detect_races=True,
                                    num_cores_or_threads=tpu_tiles.cores(chip))
  token = tpu_tiles.CHIP.set(chip)
  try:
    with ends_within(300):
      got = tpu.gmm(jnp.asarray(x), jnp.asarray(np.swapaxes(w, 1, 2) if transposed else w),
                    jnp.cumsum(jnp.asarray(counts, jnp.int32)), out_dtype=jnp.float32,
                    tiles=tiles, transpose_rhs=transposed,
                    precision=jax.lax.Precision.HIGHEST, interpret=interpret)
  finally:
    tpu_tiles.CHIP.reset(token)
  want = ref.grouped_matmul(x.astype(np.float64), w.astype(np.float64),
                            ref.group_bounds(counts, 1), np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("chip", ["v5e", "v5p"])
def test_tpu_int8_gmm_copies_its_column_scales_with_the_weights(chip, monkeypatch):
  """The int8 MoE layer's down projection (gmm with `scales`): each run's column scales
  are copied just before its weights, into a ring beside theirs, and a step per row tile
  loops over its visits. In the interpreter that copies on wait and detects races (two
  cores for the v5p: two column tiles), a hot group among cold ones sharing row tiles,
  rows past the total: `(float32(x @ w[g]) * col[g]) * row`, bit for bit with NumPy."""
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
  from pallas_kernels import tpu, tpu_tiles  # noqa: PLC0415
  monkeypatch.setattr(tpu, "MAX_WEIGHT_BUFFERS", 3)
  rng = np.random.default_rng(7)
  m, k, n, counts = 200, 512, 512, HOT_THEN_COLD
  x = rng.integers(-128, 128, (m, k)).astype(np.int8)
  w = rng.integers(-128, 128, (len(counts), k, n)).astype(np.int8)
  col = rng.uniform(1e-4, 3e-4, (len(counts), n)).astype(np.float32)
  row = rng.uniform(0.5, 1.5, m).astype(np.float32)
  interpret = pltpu.InterpretParams(dma_execution_mode="on_wait", detect_races=True,
                                    num_cores_or_threads=tpu_tiles.cores(chip))
  token = tpu_tiles.CHIP.set(chip)
  try:
    with ends_within(300):
      got = tpu.gmm(jnp.asarray(x), jnp.asarray(w), jnp.cumsum(jnp.asarray(counts, jnp.int32)),
                    out_dtype=jnp.float32, tiles=npu_ops.TileSizes(32, k, 256),
                    scales=(jnp.asarray(col), jnp.asarray(row)), interpret=interpret)
  finally:
    tpu_tiles.CHIP.reset(token)
  acc = ref.grouped_matmul(x, w, ref.group_bounds(counts, 1))
  want = np.zeros((m, n), np.float32)
  for g, (lo, hi) in enumerate(ref.group_bounds(counts, 1)):
    want[lo:hi] = (acc[lo:hi].astype(np.float32) * col[g]) * row[lo:hi, None]
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("chip,ring,k,n", [("v5e", 2, 512, 512), ("v5e", 3, 512, 512),
                                            ("v5p", 3, 512, 512), ("v5e", 3, 448, 384),
                                            ("v5p", 2, 448, 384), ("v5e", 3, 448, 320)])
def test_tpu_tgmm_writes_its_output_tiles_back_by_hand(chip, ring, k, n, monkeypatch):
  """tgmm takes a grid step per row tile and loops over its visits inside; at a group's
  last visit its output tile goes into a ring of `ring` VMEM buffers and is copied to HBM
  by hand (`tpu.MAX_OUTPUT_BUFFERS`); a buffer is waited for before it is written again,
  and the last visit waits for every copy. On one TensorCore the output tiles (k tile,
  column tile) run as one sequence, a tile's last copies overlapping the next tile's
  visits; on a v5p each tile is its own. In the interpreter that copies on wait, detects
  races and runs two cores for the v5p: 2 k tiles x 2 column tiles (whole, or the last
  ones partial: 448 = 256 + 192, 384 = 256 + 128, copied at their own shapes; 320 =
  256 + 64, not whole (8, 128) tiles: a step per visit, the pipeline's output), a hot
  group among cold and empty ones, groups past the list, rows past the total, against
  NumPy."""
  from jax.experimental.pallas import tpu as pltpu  # noqa: PLC0415
  from pallas_kernels import tpu, tpu_tiles  # noqa: PLC0415
  monkeypatch.setattr(tpu, "MAX_OUTPUT_BUFFERS", ring)
  rng = np.random.default_rng(5)
  m, counts = 200, HOT_THEN_COLD
  groups = len(counts) + 2
  tiles = npu_ops.TileSizes(32, 256, 256)
  assert tpu._float_blocks("tgmm", k, n, 4, 4, tiles) == (32, 256, 256)  # noqa: SLF001
  x = rng.normal(size=(m, k)).astype(np.float32)
  dy = rng.normal(size=(m, n)).astype(np.float32)
  interpret = pltpu.InterpretParams(dma_execution_mode="on_wait", detect_races=True,
                                    num_cores_or_threads=tpu_tiles.cores(chip))
  token = tpu_tiles.CHIP.set(chip)
  try:
    with ends_within(300):
      got = tpu.tgmm(jnp.asarray(x), jnp.asarray(dy),
                     jnp.cumsum(jnp.asarray(counts, jnp.int32)), num_groups=groups,
                     out_dtype=jnp.float32, tiles=tiles,
                     precision=jax.lax.Precision.HIGHEST, interpret=interpret)
  finally:
    tpu_tiles.CHIP.reset(token)
  want = np.zeros((groups, k, n))
  for g, (lo, hi) in enumerate(ref.group_bounds(counts, 1)):
    want[g] = x[lo:hi].astype(np.float64).T @ dy[lo:hi].astype(np.float64)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def _visits_reference(spans, m_tiles, block_m, bound, visit_empty=False):
  """NumPy, from the definition: per span (rows [lo, hi), in row order) a visit per row
  tile it touches (an empty one: none, or one with visit_empty), the last repeated."""
  group, tile = [], []
  for i, (lo, hi) in enumerate(spans):
    first = min(lo // block_m, m_tiles - 1)
    tiles = range(first, (hi - 1) // block_m + 1) if hi > lo else [first] * visit_empty
    for t in tiles:
      group.append(i)
      tile.append(t)
  count = min(len(group), bound)
  group, tile = group[:count], tile[:count]
  return (np.asarray(group + [group[-1]] * (bound - count)),
          np.asarray(tile + [tile[-1]] * (bound - count)), count)


def _steps_reference(tile, count, m_tiles, prefix=""):
  """`TileSteps` from its definition: a step from visit 0 and where the row tile changes."""
  starts = [t for t in range(count) if t == 0 or tile[t] != tile[t - 1]]
  assert len(starts) <= m_tiles
  return {prefix + "first": np.asarray(starts + [count] * (m_tiles + 1 - len(starts))),
          prefix + "count": np.asarray([len(starts)])}


def _row_visits_reference(ends, m, block_m, start):
  """`RowVisits` and `WeightRuns` from their definitions (common.py), in NumPy."""
  G = len(ends)
  bounds = [start, *ends, m]
  spans = [(bounds[i - 1] if i else 0, bounds[i]) for i in range(G + 2)]
  bound = max(1, min(-(-m // block_m) + G + 1, m))
  group, tile, count = _visits_reference(spans, -(-m // block_m), block_m, bound)
  real = [t < count and 1 <= group[t] <= G for t in range(bound)]
  src = []
  for t in range(bound):
    before = [s for s in range(t + 1) if real[s]]
    after = [s for s in range(t, bound) if real[s]]
    src.append(t if real[t] else before[-1] if before else after[0] if after else bound - 1)
  weight = np.clip(group[src] - 1, 0, max(G - 1, 0))
  run, expert, r = [], [-1] * bound, -1
  for t in range(bound):
    if t < count and (t == 0 or weight[t] != weight[t - 1]):
      r += 1
      expert[r] = weight[t]
    run.append(max(r, 0))
  return dict(group=group, tile=tile, count=[count], weight=weight, read_tile=tile[src],
              bounds=bounds, run=run, expert=expert)


def _two_core_reference(one, m, block_m, by_visits, mxu_rows):
  """`one` (`_row_visits_reference`'s) dealt to two TensorCores as `tpu_visits.two_cores`
  defines it (row tiles [0, cut) to core 0, the cut where the cores' MXU passes are most
  even; `by_visits`: the visits, at the group start nearest the middle), with each core's
  weight runs, in NumPy."""
  group, tile = np.asarray(one["group"]), np.asarray(one["tile"])
  bounds, n, bound = one["bounds"], one["count"][0], len(one["group"])
  G, m_tiles, row = len(bounds) - 2, -(-m // block_m), None
  if by_visits:
    starts = [t for t in range(1, n) if group[t] != group[t - 1]]
    first = min(starts, key=lambda t: (abs(2 * t - n), t)) if starts else n
    per = min(bound, -(-bound // 2) + m_tiles)
    g1 = group[min(first, bound - 1)]
    row = (bounds[g1 - 1] if g1 > 0 else 0) if first < n else bounds[-1]
  else:
    per_tile = np.zeros(m_tiles, int)
    for t in range(n):
      g, tl = group[t], tile[t]
      if 1 <= g <= G:
        lo, hi = max(bounds[g - 1], tl * block_m), min(bounds[g], (tl + 1) * block_m)
        per_tile[tl] += max(-(-max(hi - lo, 0) // mxu_rows), 1)
    cost = [max(per_tile[:c].sum(), per_tile[c:].sum()) for c in range(1, m_tiles)]
    cut = 1 + int(np.argmin(cost))
    first = sum(1 for t in range(n) if tile[t] < cut)
    span = m_tiles - 1
    per = max(1, min(span + G + 1, span * block_m, m))
  counts, out = [first, n - first], {k: [] for k in ("group", "tile", "weight", "read_tile")}
  run, expert = [], [-1] * (2 * per)
  for c, start in enumerate((0, first)):
    r = -1
    for s in range(per):
      src = min(max(start + min(s, max(counts[c] - 1, 0)), 0), bound - 1)
      for k in out:
        out[k].append(one[k][src])
      if s < counts[c] and (s == 0 or out["weight"][-1] != out["weight"][-2]):
        r += 1
        expert[c * per + r] = out["weight"][-1]
      run.append(max(r, 0))
  return dict(out, count=counts, run=run, expert=expert), per, row


def _random_lists(seed, cases=8):
  # one visit in all (a tile's rows in one group, or in none), one group over many tiles
  yield from [(1, 20, 32, 0, np.asarray([20])), (3, 20, 32, 0, np.zeros(3, int)),
              (2, 30, 32, 30, np.asarray([30, 30])), (1, 300, 64, 0, np.asarray([300]))]
  rng = np.random.default_rng(seed)
  for _ in range(cases):
    G, m = int(rng.integers(1, 9)), int(rng.integers(1, 400))
    block_m = int(rng.choice([32, 64, 128]))
    counts = rng.multinomial(int(rng.integers(0, m + 1)), rng.dirichlet(np.full(G + 1, 0.4)))
    start, ends = int(counts[0]), np.cumsum(counts)[1:]  # rows before `start`: another
    yield G, m, block_m, (start if rng.random() < 0.5 else 0), ends  # device's groups


def test_tpu_metadata_on_the_scalar_unit():
  """The TPU kernels lay their visits out in a scalar kernel (`tpu_visits`), not in XLA's
  small integer ops (compile time): gmm's / the fused op's `RowVisits` and weight runs,
  tgmm's visits, the steps of a row tile each (`TileSteps`), and a v5p's (`two_cores`:
  row tiles dealt to two TensorCores, or the visits split), against NumPy from their
  definitions, and `common`'s jnp visits (the GPU kernels') too, over random lists with
  empty groups, group_offset's head rows, rows past the total, one group. Interpret mode runs the kernel's own scalar code."""
  from pallas_kernels import common, tpu_visits  # noqa: PLC0415

  fields = lambda v, runs: {**v._asdict(), **runs._asdict()}

  # one program a list (op by op, the jnp forms compiled each small op: 3x the time)
  @functools.partial(jax.jit, static_argnums=(2, 3, 4))
  def layouts(ends, start, m, block_m, num_groups):
    v, runs, steps = tpu_visits.row_visits(ends, m, block_m, start, interpret=True)
    jv = common.row_visits(ends, m, block_m, start)  # the GPU kernels' jnp
    bounds = jnp.concatenate([ends, jnp.broadcast_to(ends[-1], (num_groups - ends.shape[0],))])
    # a v5p's two cores: row tiles dealt (where there are two), or the visits split
    dealt = {}
    for by_visits in (False, True) if -(-m // block_m) >= 2 else (True,):
      two, two_runs, two_steps, per, row = tpu_visits.two_cores(
          v, m, block_m, by_visits=by_visits, mxu_rows=8, interpret=True)
      dealt[by_visits] = ({**fields(two, two_runs), "steps_first": two_steps.first,
                           "steps_count": two_steps.count}, per, row)
    return ({**fields(v, runs), **{f"steps_{k}": a for k, a in steps._asdict().items()}},
            jv._asdict(),
            tpu_visits.visit_metadata(ends, num_groups, -(-m // block_m), block_m, start,
                                      interpret=True),
            common.visit_metadata(bounds, -(-m // block_m), block_m, visit_empty=True,
                                  first=start), dealt)

  for G, m, block_m, start, ends in _random_lists(7):
    num_groups, m_tiles = G + 2, -(-m // block_m)
    got, jnp_, (gid, mt, nv, bounds, first, ns), (jg, jt, jc), dealt = layouts(
        jnp.asarray(ends, jnp.int32), jnp.int32(start), m, block_m, num_groups)
    want = _row_visits_reference(ends.tolist(), m, block_m, start)
    want.update(_steps_reference(want["tile"], int(want["count"][0]), m_tiles, "steps_"))
    for name, value in want.items():
      np.testing.assert_array_equal(got[name], value, err_msg=f"{name}: {G, m, block_m}")
      if name in jnp_:  # (the GPU kernels copy no weights by hand: no runs)
        np.testing.assert_array_equal(jnp_[name], value, err_msg=f"jnp {name}: {G, m, block_m}")
    for by_visits, (two, per, row) in dealt.items():
      want_two, want_per, want_row = _two_core_reference(want, m, block_m, by_visits, 8)
      assert per == want_per
      for name, value in want_two.items():
        np.testing.assert_array_equal(two[name], value,
                                      err_msg=f"{name}, by_visits={by_visits}: {G, m, block_m}")
      for c in range(2):  # each core's steps, from its own visits
        count = int(want_two["count"][c])
        core = _steps_reference(want_two["tile"][c * per:c * per + count], count, m_tiles)
        np.testing.assert_array_equal(
            two["steps_first"][c * (m_tiles + 1):(c + 1) * (m_tiles + 1)], core["first"])
        assert int(two["steps_count"][c]) == core["count"][0]
      if by_visits:
        assert int(row) == want_row
    # tgmm: the groups of `ends`, then empty ones up to num_groups, each visited
    want_bounds = [start, *ends, *[ends[-1]] * 2]
    spans = list(zip(want_bounds[:-1], want_bounds[1:]))
    wg, wt, wc = _visits_reference(spans, m_tiles, block_m, m_tiles + num_groups - 1, True)
    np.testing.assert_array_equal(bounds, want_bounds)
    np.testing.assert_array_equal(gid, wg)
    np.testing.assert_array_equal(mt, wt)
    assert int(nv[0]) == wc
    want_steps = _steps_reference(wt, wc, m_tiles)
    np.testing.assert_array_equal(first, want_steps["first"])
    assert int(ns[0]) == want_steps["count"][0]
    np.testing.assert_array_equal(jg, wg)
    np.testing.assert_array_equal(jt, wt)
    assert int(jc[0]) == wc


@pytest.mark.parametrize("impl", KERNELS)
def test_kernels_lower_inside_shard_map_with_its_type_check(impl):
  """Code that calls a grouped op per device inside `jax.shard_map` (MaxText's MoE layer
  does) lowers there with shard_map's type check on (`check_vma`, its default), which
  refused every kernel's result (and the TPU kernels' metadata kernels') as untyped:
  results are typed as varying over the axes their operands vary over. gmm, its gradient
  (dx, dw), tgmm summed over the devices and the fused op, lowered for the kernels'
  platform (their values inside shard_map: test_grouped_matmul, on CPU)."""
  from jax.sharding import AxisType, PartitionSpec as P  # noqa: PLC0415
  platform = PLATFORM_OF[impl]
  mesh = jax.make_mesh((1,), ("data",), axis_types=(AxisType.Auto,))
  rows = P("data", None)
  spec = jax.ShapeDtypeStruct
  m, k, n, e = 256, 128, 256, 4

  def local(x, w, dy, x8, w8, gl):
    f = lambda a, b: jnp.vdot(npu_ops.grouped_matmul(a, b, gl, implementation=impl), dy)
    gx, gw = jax.grad(f, argnums=(0, 1))(x, w)
    t = jax.lax.psum(npu_ops.tgmm(x, dy, gl, implementation=impl), "data")
    q, s = npu_ops.npu_grouped_matmul_swiglu_quant_v2(
        x8, w8, jnp.ones((e, n)), jnp.ones((x8.shape[0],)), gl, group_list_type=1,
        implementation=impl)
    return npu_ops.grouped_matmul(x, w, gl, implementation=impl), gx, gw, t, q, s

  fn = jax.shard_map(local, mesh=mesh, in_specs=(rows, P(), rows, rows, P(), P()),
                     out_specs=(rows, rows, P(), P(), rows, P("data")))
  text = lowered(fn, spec((m, k), jnp.float32), spec((e, k, n), jnp.float32),
                 spec((m, n), jnp.float32), spec((m, k), jnp.int8), spec((e, k, n), jnp.int8),
                 spec((e,), jnp.int32), platforms=[platform])
  assert kernel_count(text, platform) == 5  # gmm, dx, dw, tgmm, fused
