"""The kernels compiled by the real TPU (libtpu, Mosaic) and GPU (XLA + Triton + ptxas)
compilers on compile-only devices: a representative subset of `python -m npu_ops.tools.aot`.

Needs the `aot` extra (CI installs it); without it these tests skip and say why
(`aot.missing_compilers`: libtpu, the CUDA plugin, ptxas), and collection never fails.
Each bound below is an issue-16 goal, read from what the compiler reports.
"""

import functools

import pytest

from npu_ops.tools import aot

MISSING = aot.missing_compilers()
needs = {kind: pytest.mark.skipif(kind in MISSING, reason=MISSING.get(kind, ""))
         for kind in ("tpu", "gpu")}


@functools.cache
def case(name):
  return next(c for c in aot.cases() if c.name == name)


@functools.cache
def report(target, name):
  aot.use_cpu_host()
  return aot.compile_case(case(name), target)


@pytest.fixture(autouse=True, scope="module")
def compilers_as_users_run_them():
  """The compilers at their defaults: conftest turns most of XLA's optimizations off for
  the CPU tests' speed, which would change what the compilers report here."""
  import jax  # noqa: PLC0415
  was = jax.config.values["jax_disable_most_optimizations"]
  jax.config.update("jax_disable_most_optimizations", False)
  yield
  jax.config.update("jax_disable_most_optimizations", was)


slow = pytest.mark.slow  # the rest of the table: `.ci/run` runs them with every other test

# (target, case): every benchmark-shape kernel on v5e, the fused op on v6e too.
TPU_LEAN = [("v5e", "fused A8W8 m=4096 e=16"), ("v5e", "gmm bf16 m=4096 e=16"),
            pytest.param("v5e", "tgmm bf16 m=4096 e=16", marks=slow),
            ("v5e", "gmm int8 m=4096 e=16"), pytest.param("v5p", "gmm int8 m=4096 e=16", marks=slow),
            pytest.param("v5e", "tgmm int8 m=4096 e=16", marks=slow),
            pytest.param("v5e", "fused A8W8 m=512 e=64", marks=slow),
            pytest.param("v6e", "fused A8W8 m=4096 e=16", marks=slow),
            pytest.param("v5e", "tgmm fp32 m=4096 e=16", marks=slow),
            pytest.param("v5e", "fused A8W8 fp8 e4m3 out m=4096 e=16", marks=slow)]


@needs["tpu"]
@pytest.mark.parametrize("target,name", TPU_LEAN)
def test_tpu_kernels_read_weights_in_place_and_once(target, name):
  r = report(target, name)
  assert r.compiled, r.error
  assert r.kernels == r.expected_kernels  # implementation=None picked the Mosaic kernels
  assert r.temp_bytes <= 0.10 * r.io_bytes, f"temp {r.temp_bytes} for io {r.io_bytes}"
  assert r.bytes_ratio <= 1.3, f"bytes accessed {r.bytes_ratio:.2f}x the ideal"


@needs["tpu"]
@pytest.mark.parametrize("name", ["tgmm bf16 k=n=2880 (edges past 128s)",
                                  pytest.param("tgmm bf16 k=2304 (edge k tile)", marks=slow)])
def test_tgmm_edge_tiles_compile(name):
  """tgmm copies its output tiles by hand, an edge tile at its own shape where that is
  whole (sublane, 128) tiles (k = 2304: a 256-row edge); where it is not (n = 2880 in
  1408-wide tiles: a 64-column edge, which Mosaic refuses to copy by hand) it takes a step
  per visit and the pipeline writes the output. Both compile with the Mosaic kernel."""
  r = report("v5e", name)
  assert r.compiled, r.error
  assert r.kernels == r.expected_kernels
  assert r.temp_bytes <= 0.01 * r.io_bytes, f"temp {r.temp_bytes} for io {r.io_bytes}"


@needs["tpu"]
@pytest.mark.parametrize("target", ["v6e", "tpu7x"])
def test_lowering_for_a_tpu_takes_that_chips_tiles(target, monkeypatch):
  """The TPU kernels' default tiles are those of the chip the program is lowered for
  (`pallas_kernels.tpu_tiles`), read from the compile-only devices."""
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  import numpy as np  # noqa: PLC0415

  import npu_ops  # noqa: PLC0415
  from pallas_kernels import tpu, tpu_tiles  # noqa: PLC0415
  aot.use_cpu_host()
  seen, default_tiles = [], tpu.default_tiles
  monkeypatch.setattr(tpu, "default_tiles",
                      lambda p: seen.append(tpu_tiles.current_chip()) or default_tiles(p))
  sharding = jax.sharding.SingleDeviceSharding(aot.device(target))
  spec = lambda shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16, sharding=sharding)
  f = lambda x, w: npu_ops.grouped_matmul(x, w, np.full(4, 64, np.int32))
  jax.jit(f).trace(spec((256, 512)), spec((4, 512, 256))).lower()
  assert seen == [target]


@needs["tpu"]
def test_tpu_gmm_vjp_reads_the_weights_in_place():
  """dlhs = dy @ w^T reads w as stored (no transposed copy). Three kernels each read
  what they need once: forward, dlhs and tgmm together move ~1.7x the program's own
  arguments + outputs at best (w twice, x and dy twice, dw once)."""
  r = report("v5e", "gmm vjp bf16 m=4096 e=16")
  assert r.compiled and r.kernels == 3
  assert r.temp_bytes <= 0.01 * r.io_bytes
  assert r.bytes_ratio <= 2.5


@needs["tpu"]
@pytest.mark.parametrize("name", [pytest.param("fused A8W4 per group (G=4)", marks=slow),
                                  "fused A8W4 int32 words", "fused A4W4 m=4096 e=16"])
def test_tpu_int4_weights_are_read_in_place(name):
  """jnp.int4 weights go to the kernel as they are (widened block by block in VMEM), and
  A8W4's k-group column sums are summed there too: no pass over the weights outside the
  kernel (1.13x the ideal bytes measured; 5.06x when XLA summed them). int32-word weights
  (torch_npu's int4pack) likewise, as the TPU holds them (k-minor: no relayout copy),
  unpacked in VMEM (30.6x when XLA unpacked them through an int32 per value). A4W4's
  tokens in int32 words too (6.3x when XLA unpacked them)."""
  r = report("v5e", name)
  assert r.compiled and r.kernels == 1
  assert r.temp_bytes <= 0.10 * r.io_bytes, f"temp {r.temp_bytes} for io {r.io_bytes}"
  assert r.bytes_ratio <= 1.3, f"bytes accessed {r.bytes_ratio:.2f}x the ideal"


@needs["tpu"]
@pytest.mark.parametrize("name", ["fused MX in, per-token fp8 out m=4096 e=16",
                                  pytest.param("fused MX in, MX fp8 out m=4096 e=16", marks=slow)])
def test_tpu_mx_inputs_are_read_in_place(name):
  """MX inputs go to the fused kernel as they are: fp8 tokens and weights dequantized in
  VMEM, the weights' scale bytes read in the layout a TPU holds torch_npu's `[e, P, n, 2]`
  in (`[e, 2, P, n]`: no relayout copy). 1.02x the ideal bytes with per-token output,
  1.15x with MX output (A8W8's 1.14x); 23-25x on the XLA path, before 2026-12-06."""
  r = report("v5e", name)
  assert r.compiled and r.kernels == 1
  assert r.temp_bytes <= 0.10 * r.io_bytes, f"temp {r.temp_bytes} for io {r.io_bytes}"
  assert r.bytes_ratio <= (1.1 if "per-token" in name else 1.25), (
      f"bytes accessed {r.bytes_ratio:.2f}x the ideal")


@needs["tpu"]
def test_k_minor_is_the_layout_the_tpu_compiler_picks():
  """`tpu.k_minor` says which int32 `[e, k, c]` arrays a TPU holds k-minor (layout
  {1,2,0}), as the compiler's default layout for a parameter does."""
  import jax.numpy as jnp  # noqa: PLC0415

  from pallas_kernels import tpu  # noqa: PLC0415
  shapes = [(16, 2048, 352), (64, 2048, 176), (256, 7168, 256), (16, 2048, 512),
            (16, 100, 352), (16, 352, 100), (16, 300, 200), (16, 200, 300), (16, 2048, 96),
            (16, 64, 96), (1, 2048, 352), (4, 256, 20), (4, 320, 33), (4, 256, 40),
            (12, 256, 20), (3, 2048, 352), (8, 2880, 720)]
  for shape in shapes:
    layout = _parameter_layout(shape, jnp.int32)
    assert tpu.k_minor(shape) == (layout == "1,2,0"), (shape, layout)


def _parameter_layout(shape, dtype) -> str:
  """The minor-to-major order of the layout a compile-only v5e gives a parameter."""
  import jax  # noqa: PLC0415
  aot.use_cpu_host()
  sharding = jax.sharding.SingleDeviceSharding(aot.device("v5e"))
  compiled = jax.jit(lambda w: w + 1).lower(
      jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)).compile()
  text = compiled.as_text()
  return text[text.index("entry_computation_layout"):].split("{", 2)[2].split(":")[0]


@needs["tpu"]
def test_tpu_mx_fp4_operands_are_read_in_place():
  """fp4 MX tokens and weights go to the kernel as they are and are decoded from their
  codes in VMEM (through an int4 view of the block: XLA's bitcast of fp4 to int4 is a pass
  over them, 3.9x the ideal bytes): 1.04x with int8 output (the AOT table's MXFP4 case,
  1.8-2.1x with the fp4 output's XLA packing). The m = 513, k = 64 tokens, which XLA:TPU
  holds m-minor and whose XLA conversion crashed its v5p compiler, compile there."""
  import jax.numpy as jnp  # noqa: PLC0415
  fn, args = aot._fused_mx(4096, 2048, 2816, 16, quant_dtype=jnp.int8, quant_mode=0,
                           dtype=jnp.float4_e2m1fn)
  r = aot.compile_case(aot.Case("MX fp4", fn, args, kernels=1), "v5e")
  assert r.compiled and r.kernels == 1
  assert r.bytes_ratio <= 1.1, f"bytes accessed {r.bytes_ratio:.2f}x the ideal"
  fn, args = aot._fused_mx(513, 64, 128, 1, quant_dtype=jnp.int8, quant_mode=0,
                           dtype=jnp.float4_e2m1fn)
  r = aot.compile_case(aot.Case("MX fp4, m-minor tokens", fn, args, kernels=1), "v5p")
  assert r.compiled and r.kernels == 1, r.error


@needs["tpu"]
def test_pairs_major_is_the_layout_the_tpu_compiler_picks():
  """`tpu.pairs_major` says which uint8 MX weight scales `[e, P, n, 2]` a TPU holds as
  `[e, 2, P, n]` (layout {2,1,3,0}, where the MX-input kernel's transpose is free), as the
  compiler's default layout for a parameter does (e = 1 with P not a multiple of 8 is
  {2,1,3,0} too, and the rule says no: a size-1 dim may go anywhere)."""
  import jax.numpy as jnp  # noqa: PLC0415

  from pallas_kernels import tpu  # noqa: PLC0415
  shapes = [(16, 32, 2816, 2), (64, 32, 2816, 2), (256, 112, 4096, 2), (8, 2, 128, 2),
            (4, 3, 192, 2), (16, 45, 1440, 2), (64, 48, 768, 2), (4, 1, 128, 2),
            (16, 112, 192, 2), (256, 32, 1440, 2), (256, 16, 2816, 2), (4, 24, 192, 2)]
  for shape in shapes:
    layout = _parameter_layout(shape, jnp.uint8)
    assert tpu.pairs_major(shape) == (layout == "2,1,3,0"), (shape, layout)


@needs["tpu"]
def test_tpu_group_offset_moves_no_rows():
  """group_offset: the fused kernel skips the other groups' rows in its metadata (1.20x the
  ideal bytes measured on v5e at 4 of 16 experts; 4.81x when the rows were moved)."""
  r = report("v5e", "fused A8W8 group_offset (4 of 16 experts)")
  assert r.compiled and r.kernels == 1
  assert r.bytes_ratio <= 1.3, f"bytes accessed {r.bytes_ratio:.2f}x the ideal"


TPU_EDGES = ["fused A8W8 n/2=150", "fused A8W4 per channel m=4096 e=16",
             "fused A8W8 group_offset (4 of 16 experts)"]


@slow
@needs["tpu"]
@pytest.mark.parametrize("name", TPU_EDGES)
def test_tpu_edge_cases_compile(name):
  r = report("v5p", name)
  assert r.compiled, r.error
  assert r.kernels == r.expected_kernels


def _takes(fn, *args):
  return aot.Case("", fn, tuple(args), 0)


@needs["tpu"]
@pytest.mark.parametrize("form", ["gmm float16", "tgmm float16", "gmm bf16 to float16",
                                  "gmm int4", "tgmm int4"])
def test_tpu_grouped_matmuls_where_mosaic_has_no_float16(form):
  """float16 grouped matmuls compile for a TPU under implementation=None on the XLA path (the
  kernels decline them: Mosaic loads and stores no float16 vectors); int4 ones on the
  kernels (int4 operands widened to int8 before them, as for the XLA path)."""
  import jax.numpy as jnp  # noqa: PLC0415
  import npu_ops  # noqa: PLC0415
  f16, bf16, i4, i32 = jnp.float16, jnp.bfloat16, jnp.int4, jnp.int32
  gs = ((3,), i32)
  case, kernels = {
      "gmm float16": (_takes(npu_ops.grouped_matmul, ((64, 128), f16), ((3, 128, 256), f16),
                             gs), 0),
      "tgmm float16": (_takes(npu_ops.tgmm, ((64, 128), f16), ((64, 96), f16), gs), 0),
      "gmm bf16 to float16": (_takes(
          lambda x, w, g: npu_ops.grouped_matmul(x, w, g, preferred_element_type=f16),
          ((64, 128), bf16), ((3, 128, 256), bf16), gs), 0),
      "gmm int4": (_takes(npu_ops.grouped_matmul, ((64, 128), i4), ((3, 128, 256), i4), gs), 1),
      "tgmm int4": (_takes(npu_ops.tgmm, ((64, 128), i4), ((64, 96), i4), gs), 1),
  }[form]
  aot.use_cpu_host()
  r = aot.compile_case(case, "v5e")
  assert r.compiled, r.error
  assert r.kernels == kernels


@needs["gpu"]
@pytest.mark.parametrize("groups,k", [(1, 256), (2, 200)])
def test_gpu_a8w4_xla_path_compiles(groups, k):
  """The fused op's XLA path on int4 weights (implementation='xla'; None takes it where the
  kernel declines, e.g. k groups of 100 rows): XLA:GPU fused the weights' int4 -> int32
  column sums into a Triton reduction it failed to compile (on the H200 too)."""
  import jax.numpy as jnp  # noqa: PLC0415
  import npu_ops  # noqa: PLC0415
  m, n, e = 7, 24, 3

  def fn(x, w, ws, xs, gl):
    return npu_ops.npu_grouped_matmul_swiglu_quant_v2(
        x, w, ws, xs, gl, group_list_type=1, dequant_mode=int(groups > 1),
        implementation="xla")
  scale = (e, groups, n) if groups > 1 else (e, n)
  aot.use_cpu_host()
  r = aot.compile_case(aot.Case("", fn, (((m, k), jnp.int8), ((e, k, n), jnp.int4),
                                         (scale, jnp.float32), ((m,), jnp.float32),
                                         ((e,), jnp.int32)), 0), "h100")
  assert r.compiled, r.error


def test_kernels_write_float_results_only():
  """gmm / tgmm results other than float32, bfloat16, float16 (fp8, fp4) are XLA's: the
  Triton kernels' conversion to them aborted the process on an A100 (e4m3 needs sm_89) and
  failed to parse for most fp8 types on an H100."""
  from pallas_kernels import common  # noqa: PLC0415
  for out in ("float8_e4m3fn", "float8_e5m2", "float8_e5m2fnuz", "float4_e2m1fn"):
    for op in ("gmm", "tgmm"):
      assert "result" in common.shared_gap(common.Problem(op, 64, 128, 256, 3, "bfloat16", out))
  assert common.shared_gap(common.Problem("gmm", 64, 128, 256, 3, "bfloat16", "float32")) is None


@slow
@needs["tpu"]
def test_tpu_a8w4_k_group_over_k_tiles_compiles_from_a_cpu_host():
  """A8W4 whose weights are not resident (2 k n > 24 MiB) and whose k group spans k tiles:
  the kernel's group index was a floor division, whose lowering asks the default device
  for its TPU generation (a CPU host's AOT compile and jax.export have none)."""
  import jax.numpy as jnp  # noqa: PLC0415
  aot.use_cpu_host()
  fn, args = aot._fused(64, 4096, 4096, 3, weight="int4")
  r = aot.compile_case(aot.Case("", fn, args, 1), "v5e")
  assert r.compiled, r.error
  assert r.kernels == 1


# (target, case, temp-bytes bound as a share of arguments + outputs): measured on jax 0.10.2
# (a100 and h100 alike) 0.22 (fused A8W8: the kernel's float32 SwiGLU scratch, m * n/2 * 4
# bytes, which XLA quantizes per token), 0.32 (MX: the same scratch + the MX epilogue's
# padded codes, 2 * m * n/2 bytes), 1.90 (A8W4 G=4: the k-group column sums), 1e-5 (gmm),
# 1e-7 (tgmm), 1e-5 (vjp), 0.62 (group_offset: the float32 scratch over all m rows against
# the local experts' weights; 1.00 when the rows were moved); bounds ~15% above.
GPU_CASES = [("a100", "fused A8W8 m=4096 e=16", 0.25),
             # fp8 bits (no fp8 conversion before sm_89), MX inputs and output
             ("a100", "fused MX in, MX fp8 out m=4096 e=16", 0.36),
             pytest.param("a100", "fused A8W4 per group (G=4)", 2.2, marks=slow),
             pytest.param("h100", "fused A4W4 m=4096 e=16", 2.3, marks=slow),
             pytest.param("h100", "gmm fp32 m=4096 e=16", 0.01, marks=slow),
             pytest.param("a100", "tgmm fp32 m=4096 e=16", 0.01, marks=slow),
             pytest.param("a100", "gmm vjp fp32 precision=highest", 0.01, marks=slow),
             pytest.param("h100", "fused A8W8 group_offset (4 of 16 experts)", 0.72,
                          marks=slow)]


@needs["gpu"]
@pytest.mark.parametrize("target,name,temp_share", GPU_CASES)
def test_gpu_kernels_compile_without_spills(target, name, temp_share):
  r = report(target, name)
  assert r.compiled, r.error
  assert r.kernels == r.expected_kernels
  # ptxas ran on a matched `npu_` kernel (None: no kernel found or no ptxas)
  assert r.registers is not None and r.spill_bytes is not None, "no Pallas kernel in the PTX"
  assert 0 < r.registers <= 255
  assert r.spill_bytes == 0, f"{r.spill_bytes} bytes of register spills"
  assert r.temp_bytes <= temp_share * r.io_bytes, f"temp {r.temp_bytes} for io {r.io_bytes}"


@needs["tpu"]
@slow
def test_tpu_int8_moe_layer_runs_both_products_on_kernels():
  """The int8 MoE layer's forward: the fused op and the down projection (an int8 grouped
  matmul dequantized in the kernel's epilogue) are kernels; what XLA adds is routing, the
  tokens' quantization and the combine (5.25x the ideal as XLA counts it on v5e, where the
  down projection on XLA's loop moved 7.8x)."""
  r = report("v5e", "MoEMLP int8 forward")
  assert r.compiled and r.kernels == 2
  assert r.bytes_ratio <= 5.5, r.bytes_ratio


# 8 GPUs, forward and a training step (a TPU EP compile takes 45-66 s on a 2-core host,
# which the CI's 20 minutes cannot spare); `python -m npu_ops.tools.aot --cases EP` compiles
# every target (the table of docs/accelerators.md).
EP_CASES = [pytest.param("h100", "EP MoE int8 forward (all chips)", marks=slow),
            pytest.param("h100", "EP MoE float train step (all chips)", marks=slow)]


@pytest.mark.parametrize("target,name", EP_CASES)
def test_expert_parallel_compiles_for_every_chip(target, name):
  """The MoE layer over all chips (4 TPU chips, 8 GPUs): the rows go there and back by
  ragged all-to-all (a training step: the results' gradients go to the experts and the
  rows' gradients come back too) and the kernels are in."""
  if aot.kind_of(target) in MISSING:
    pytest.skip(MISSING[aot.kind_of(target)])
  r = report(target, name)
  assert r.compiled, r.error
  assert r.kernels == r.expected_kernels
  assert r.ragged_exchanges == (2 if "forward" in name else 4)
  if aot.kind_of(target) == "gpu":
    assert r.registers is not None and 0 < r.registers <= 255, r.registers
    assert r.spill_bytes == 0


def test_exchange_stats_reads_sync_and_async_collectives():
  hlo = """
  %a = u8[8192,4,384]{2,1,0:T(4,128)} ragged-all-to-all(%x, %o, %i, %s, %p, %r), channel_id=1
  %b = (s32[4,5]{1,0}, /*index=1*/s32[4,5]{1,0}) all-to-all(%c, %c2), channel_id=2
  %c = ((f32[16,8]{1,0}, f32[32,8]{1,0}, s32[4]{0}), f32[32,8]{1,0}) ragged-all-to-all-start(%y)
  %d = f32[32,8]{1,0} ragged-all-to-all-done(%c)
  %ragged-all-to-all-start.1 = f32[2]{0} add(%u, %v)
  """
  assert aot.exchange_stats(hlo) == (3, 2, 8192 * 4 * 384 + 2 * 4 * 5 * 4 + 32 * 8 * 4)


def test_the_table_names_a_failed_compile():
  failed = aot.Report("v5e", "x", False, error="ValueError: no")
  ok = aot.Report("a100", "y", True, kernels=1, temp_bytes=0, io_bytes=10, registers=200,
                  spill_bytes=0, shared_bytes=4096)
  table = aot.format_table([failed, ok])
  assert "**no**: ValueError: no" in table and "| a100 | y | yes | 1 |" in table
  with pytest.raises(ValueError, match="target"):
    aot.kind_of("tpu7")


def test_missing_compilers_says_why_without_the_aot_extra(monkeypatch):
  """Without `jax_plugins` (no aot extra) find_spec("jax_plugins.xla_cuda12") raises;
  missing_compilers must name both kinds instead, so this module skips, not errors."""
  import importlib.util  # noqa: PLC0415

  def absent(name, *args):
    raise ModuleNotFoundError(f"No module named {name.split('.')[0]!r}")

  monkeypatch.setattr(importlib.util, "find_spec", absent)
  missing = aot.missing_compilers()
  assert set(missing) == {"tpu", "gpu"}
  assert "libtpu" in missing["tpu"] and "CUDA plugin" in missing["gpu"]

