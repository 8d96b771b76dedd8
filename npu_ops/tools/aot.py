"""Ahead-of-time compile checks: the real TPU and GPU compilers, on a host without either.

    pip install -e ".[aot]"                      # libtpu and the CUDA plugin (ptxas)
    python -m npu_ops.tools.aot                        # every case on v5e, v6e, v5p, TPU7x, H100, A100
    python -m npu_ops.tools.aot --targets v5e a100 --cases fused

Nothing runs on an accelerator: each case is traced with `implementation=None`,
lowered for the target (so the per-platform dispatch of `npu_ops._src.backend` is what
is checked) and compiled by libtpu (Mosaic included) or by XLA's CUDA compiler
(Triton to PTX, ptxas to cubin) for a GPU described by a target config. What the
compilers report is read back:

* TPU: temp memory (`memory_analysis`), bytes accessed (`cost_analysis`; a Pallas
  call counts its `pl.CostEstimate`) over the ideal of reading every argument and
  writing every output once.
* GPU: registers and spills of each Pallas kernel (ptxas -v on the PTX that XLA
  compiled, which reproduces XLA's own spill warnings) and its shared memory.
* Expert-parallel cases ("EP ...") compile for every chip of the target's topology
  (TPU v5e:2x2 and v6e:2x2: 4 chips, v5p:2x2x1: 4 chips, tpu7x:2x2x1: 8 TensorCores;
  GPU: 8 GPUs, topology
  1x1x8) with the experts sharded over them; the exchange is counted: the
  all-to-all collectives (ragged or not) in the compiled program and the bytes of
  their buffers (for a ragged one, the most it can move).

The GPU target configs are this package's own, written from NVIDIA's public
specifications (SM count, clocks, memory, shared memory and register limits).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import glob
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

TPU_TARGETS = {"v5e": "v5e:2x2", "v6e": "v6e:2x2", "v5p": "v5p:2x2x1", "tpu7x": "tpu7x:2x2x1"}

# GpuTargetConfigProto text: the device facts XLA's GPU compiler plans with.
_GPU_SPEC = """gpu_device_info {{
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: {smem_per_sm}
  threads_per_core_limit: 2048
  core_count: {sms}
  fpus_per_core: {fpus}
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: {bandwidth}
  l2_cache_size: {l2}
  clock_rate_ghz: {clock}
  device_memory_size: {memory}
  shared_memory_per_block_optin: {smem_optin}
  cuda_compute_capability {{ major: {major} minor: 0 }}
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 8 patch: 0 }}
device_description_str: "{name}"
"""
GPU_TARGETS = {
    # H100 SXM5 80 GB: 132 SMs, 228 KiB shared memory per SM (227 KiB per block opt-in),
    # 50 MiB L2, 3.35 TB/s HBM3, 1.98 GHz boost; compute capability 9.0 (sm_90a).
    "h100": _GPU_SPEC.format(smem_per_sm=233472, sms=132, fpus=128, bandwidth=3352320000000,
                             l2=52428800, clock=1.98, memory=84942979072, smem_optin=232448,
                             major=9, name="NVIDIA H100 80GB HBM3"),
    # A100 SXM4 80 GB: 108 SMs, 164 KiB shared memory per SM (163 KiB per block opt-in),
    # 40 MiB L2, 2.04 TB/s HBM2e, 1.41 GHz boost; compute capability 8.0 (sm_80).
    "a100": _GPU_SPEC.format(smem_per_sm=167936, sms=108, fpus=64, bandwidth=2039040000000,
                             l2=41943040, clock=1.41, memory=85100068864, smem_optin=166912,
                             major=8, name="NVIDIA A100-SXM4-80GB"),
}
TARGETS = tuple(TPU_TARGETS) + tuple(GPU_TARGETS)
_CUSTOM_CALL = {"tpu": "tpu_custom_call", "gpu": "__gpu$xla.gpu.triton"}


def _op_kernels(hlo: str, kind: str) -> int:
  """The Pallas kernels of ops in a compiled program: not the TPU kernels' metadata
  kernels (`pallas_kernels.tpu_visits`)."""
  from pallas_kernels import tpu_visits  # noqa: PLC0415
  target = _CUSTOM_CALL[kind]
  calls = hlo.count(target + '"') or hlo.count(target)
  if kind == "tpu":
    calls -= sum(f"/{name}/pallas_call" in line for line in hlo.splitlines()
                 if target in line for name in tpu_visits.KERNEL_NAMES)
  return calls


def use_cpu_host() -> None:
  """Keeps JAX on the CPU (the CUDA plugin's start-up check fails without a GPU).
  Call before anything initializes a JAX backend."""
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])
  # libtpu takes a machine-wide lock unless told that several processes (test workers,
  # a CLI beside them) may load it: compile-only use needs no exclusive TPU.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def missing_compilers() -> dict[str, str]:
  """Why each kind of target cannot be compiled here ({} when both can)."""
  import importlib.util  # noqa: PLC0415

  def found(name: str) -> bool:  # find_spec("a.b") raises when the package `a` is absent
    try:
      return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
      return False

  missing = {}
  if not found("libtpu"):
    missing["tpu"] = 'libtpu is not installed (pip install "jax[tpu]==0.10.2", or npu_ops[aot])'
  if not found("jax_plugins.xla_cuda12"):
    missing["gpu"] = ('the CUDA plugin is not installed (pip install "jax[cuda12]==0.10.2", '
                      "or npu_ops[aot])")
  elif _ptxas() is None:
    missing["gpu"] = "ptxas is not installed (pip install nvidia-cuda-nvcc-cu12, or npu_ops[aot])"
  return missing


def kind_of(target: str) -> str:
  if target in TPU_TARGETS:
    return "tpu"
  if target in GPU_TARGETS:
    return "gpu"
  raise ValueError(f"target: expected one of {TARGETS}, got {target!r}")


GPU_CHIPS = 8  # the multi-GPU topology of the expert-parallel cases (1 host, 8 GPUs)


@functools.cache
def chips(target: str, every: bool = False) -> tuple[jax.Device, ...]:
  """Compile-only devices of the target: the first, or (`every`) all of its topology."""
  from jax.experimental import topologies  # noqa: PLC0415
  if kind_of(target) == "tpu":
    found = topologies.get_topology_desc(TPU_TARGETS[target], "tpu").devices
  else:
    found = topologies.get_topology_desc(
        "gpu", platform="cuda", target_config=GPU_TARGETS[target],
        topology=f"1x1x{GPU_CHIPS if every else 1}").devices
  return tuple(found) if every else (found[0],)


def device(target: str) -> jax.Device:
  """A compile-only device of the target."""
  return chips(target)[0]


# --- the cases ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Case:
  """One program to compile: `fn(*args)` over arguments of these shapes and dtypes."""
  name: str
  fn: Callable[..., Any]
  args: tuple[tuple[tuple[int, ...], Any], ...]
  # Pallas kernels the program must hold on TPU and GPU (0: XLA only), or {kind: count}
  kernels: int | dict[str, int]
  # Expert parallel: compiled over every chip, `fn(mesh)` builds the program over a mesh
  # of this one axis and each arg carries a third item, its PartitionSpec.
  mesh_axis: str | None = None


def _fused(m, k, n, e, *, weight="int8", groups=1, group_list=None, global_groups=None,
           quant_dtype=0, quant_mode=0):
  import npu_ops  # noqa: PLC0415
  a8w4 = weight in ("int4", "words")

  def fn(x, w, ws, xs, gl, *more):
    # A8W4: the assist matrix; A4W4: the smooth scale; global_groups: a traced offset
    gl = gl if group_list is None else list(group_list)
    more = list(more)
    assist = more.pop(0) if a8w4 else None
    smooth = more.pop(0) if weight == "a4w4" else None
    return npu_ops.npu_grouped_matmul_swiglu_quant_v2(
        x, w, ws, xs, gl, group_list_type=1, dequant_mode=int(groups > 1),
        weight_assist_matrix=assist, smooth_scale=smooth,
        group_offset=more[0] if more else None, quant_dtype=quant_dtype, quant_mode=quant_mode)
  scale = (e, groups, n) if groups > 1 else (e, n)
  if weight == "int8":
    w = ((e, k, n), jnp.int8)
  elif weight == "words":  # int4 as int32 words (8 per word), converted on every call
    w = ((e, k, n // 8), jnp.int32)
  else:  # jnp.int4, read in place
    w = ((e, k, n), jnp.int4)
  x = ((m, k // 8), jnp.int32) if weight == "a4w4" else ((m, k), jnp.int8)
  # A8W4 as torch_npu calls it: with the assist matrix, computed once when the weights load
  # (without it the op computes it from the weights on every call: docs/performance.md)
  more = ([((e, n), jnp.float32)] if a8w4 else [((e, n // 2), jnp.float32)]
          if weight == "a4w4" else [])
  if global_groups:
    return fn, (x, w, (scale, jnp.float32), ((m,), jnp.float32), ((global_groups,), jnp.int32),
                *more, ((), jnp.int32))
  return fn, (x, w, (scale, jnp.float32), ((m,), jnp.float32), ((e,), jnp.int32), *more)


def _fused_mx(m, k, n, e, *, quant_dtype, quant_mode, dtype=jnp.float8_e4m3fn):
  """MX inputs: fp8 (or fp4) x and weights with e8m0 scales per block of 32 along k."""
  import npu_ops  # noqa: PLC0415

  def fn(x, w, ws, xs, gl):
    return npu_ops.npu_grouped_matmul_swiglu_quant_v2(
        x, w, ws, xs, gl, group_list_type=1, dequant_mode=2, quant_dtype=quant_dtype,
        quant_mode=quant_mode)
  kb = -(-k // 64)
  return fn, (((m, k), dtype), ((e, k, n), dtype),
              ((e, kb, n, 2), jnp.uint8), ((m, kb, 2), jnp.uint8), ((e,), jnp.int32))


def _accumulated(dtype):
  """The result type of the grouped matmul cases: int32 for integers (exact), else float32."""
  return jnp.int32 if jnp.issubdtype(dtype, jnp.integer) else jnp.float32


def _gmm(m, k, n, e, dtype):
  import npu_ops  # noqa: PLC0415
  return (lambda x, w, gl: npu_ops.grouped_matmul(x, w, gl,
                                                  preferred_element_type=_accumulated(dtype)),
          (((m, k), dtype), ((e, k, n), dtype), ((e,), jnp.int32)))


def _tgmm(m, k, n, e, dtype):
  import npu_ops  # noqa: PLC0415
  return (lambda x, dy, gl: npu_ops.tgmm(x, dy, gl, preferred_element_type=_accumulated(dtype)),
          (((m, k), dtype), ((m, n), dtype), ((e,), jnp.int32)))


def _gmm_vjp(m, k, n, e, dtype, precision=None):
  import npu_ops  # noqa: PLC0415

  def step(x, w, dy, gl):
    loss = lambda x, w: jnp.vdot(npu_ops.grouped_matmul(x, w, gl, precision=precision).astype(
        jnp.float32),
                                 dy.astype(jnp.float32))
    return jax.value_and_grad(loss, argnums=(0, 1))(x, w)
  return step, (((m, k), dtype), ((e, k, n), dtype), ((m, n), dtype), ((e,), jnp.int32))


def _qat_step(m, k, n, e):
  import npu_ops  # noqa: PLC0415

  def step(x, w, s, dy, gl):
    loss = lambda x, w, s: jnp.vdot(npu_ops.fake_quant_gmm_swiglu_quant(
        x, w, s, gl, group_list_type=1), dy)
    return jax.grad(loss, argnums=(0, 1, 2))(x, w, s)
  f32 = jnp.float32
  return step, (((m, k), f32), ((e, k, n), f32), ((e, n), f32), ((m, n // 2), f32),
                ((e,), jnp.int32))


def _moe(tokens, d_model, d_ff, e, mode):
  from flax import nnx  # noqa: PLC0415
  from npu_ops.nn import MoEMLP  # noqa: PLC0415
  def build():
    layer = MoEMLP(d_model, d_ff, e, top_k=2, mode="float", rngs=nnx.Rngs(0))
    return layer.convert("int8") if mode == "int8" else layer
  # Shapes only: computing the random weights compiled a dozen programs (seconds)
  # whenever the cases were listed.
  layer = nnx.eval_shape(build)
  if mode == "int8":
    graph, state = nnx.split(layer)
    fn = lambda state, x: nnx.merge(graph, state)(x)
  else:
    graph, state = nnx.split(layer)

    def fn(state, x):
      loss = lambda state: jnp.sum(nnx.merge(graph, state)(x) ** 2)
      return jax.value_and_grad(loss)(state)
  leaves, tree = jax.tree.flatten(state)
  specs = tuple((tuple(a.shape), a.dtype) for a in leaves)
  return (lambda x, *leaves: fn(jax.tree.unflatten(tree, leaves), x),
          (((tokens, d_model), jnp.float32),) + specs)


def _moe_ep(tokens, d_model, d_ff, e, mode):
  """The MoE layer with its experts over the mesh axis "expert": int8 forward, or a
  training step (loss, gradients of the input and every weight) in float and qat modes."""
  from jax.sharding import PartitionSpec as P  # noqa: PLC0415
  from npu_ops import moe  # noqa: PLC0415

  def build(mesh):
    run = lambda x, w: moe.moe_mlp(x, w, top_k=2, mode=mode, mesh=mesh, expert_axis="expert").y
    if mode == "int8":
      return run
    return jax.value_and_grad(lambda x, w: jnp.sum(run(x, w) ** 2), argnums=(0, 1))
  f32, ex = jnp.float32, P("expert")
  w_dtype = jnp.int8 if mode == "int8" else f32
  weights = moe.MoEWeights(((d_model, e), f32, P()), ((e, d_model, 2 * d_ff), w_dtype, ex),
                           ((e, d_ff, d_model), w_dtype, ex))
  if mode != "float":
    weights = weights._replace(gate_up_scale=((e, 2 * d_ff), f32, ex),
                               down_scale=((e, d_model), f32, ex))
  return build, (((tokens, d_model), f32, P("expert")), weights)


BENCH = dict(k=2048, n=2816)


def cases() -> list[Case]:
  """Every kernel entry point at the benchmark shapes and at the edges."""
  k, n = BENCH["k"], BENCH["n"]
  out = []
  for m, e in ((4096, 16), (512, 64), (16384, 8)):
    out.append(Case(f"fused A8W8 m={m} e={e}", *_fused(m, k, n, e), kernels=1))
  out += [
      Case("fused A8W8 n/2=150", *_fused(256, 256, 300, 4), kernels=1),
      Case("fused A8W8 one group", *_fused(512, 512, 1024, 1), kernels=1),
      Case("fused A8W8 static, empty groups", *_fused(512, 512, 1024, 4,
                                                      group_list=(0, 200, 0, 300)), kernels=1),
      Case("fused A8W4 per channel m=4096 e=16", *_fused(4096, k, n, 16, weight="int4"),
           kernels=1),
      Case("fused A8W4 per group (G=4)", *_fused(4096, k, n, 16, weight="int4", groups=4),
           kernels=1),
      Case("fused A8W4 int32 words", *_fused(4096, k, n, 16, weight="words"), kernels=1),
      Case("fused A4W4 m=4096 e=16", *_fused(4096, k, n, 16, weight="a4w4"), kernels=1),
      Case("fused A8W8 group_offset (4 of 16 experts)",
           *_fused(4096, k, n, 4, global_groups=16), kernels=1),
      Case("fused A8W8 fp8 e4m3 out m=4096 e=16",
           *_fused(4096, k, n, 16, quant_dtype=jnp.float8_e4m3fn), kernels=1),
      Case("fused A8W4 fp8 e5m2 out m=4096 e=16",
           *_fused(4096, k, n, 16, weight="int4", quant_dtype=jnp.float8_e5m2), kernels=1),
      Case("fused A8W8 MX fp8 out m=4096 e=16",
           *_fused(4096, k, n, 16, quant_dtype=jnp.float8_e4m3fn, quant_mode=2), kernels=1),
      Case("fused MX in, MX fp8 out m=4096 e=16",
           *_fused_mx(4096, k, n, 16, quant_dtype=jnp.float8_e4m3fn, quant_mode=2), kernels=1),
      Case("fused MX in, per-token fp8 out m=4096 e=16",
           *_fused_mx(4096, k, n, 16, quant_dtype=jnp.float8_e5m2, quant_mode=0), kernels=1),
      Case("fused MX fp4 in, MX fp4 out m=4096 e=16",
           *_fused_mx(4096, k, n, 16, quant_dtype=jnp.float4_e2m1fn, quant_mode=2,
                      dtype=jnp.float4_e2m1fn), kernels={"tpu": 1, "gpu": 0}),
  ]
  for dtype, tag in ((jnp.bfloat16, "bf16"), (jnp.float32, "fp32")):
    out += [Case(f"gmm {tag} m=4096 e=16", *_gmm(4096, k, n, 16, dtype), kernels=1),
            Case(f"tgmm {tag} m=4096 e=16", *_tgmm(4096, k, n, 16, dtype), kernels=1),
            Case(f"gmm vjp {tag} m=4096 e=16", *_gmm_vjp(4096, k, n, 16, dtype), kernels=3)]
  out += [
      Case("gmm vjp fp32 precision=highest", *_gmm_vjp(4096, k, n, 16, jnp.float32, "highest"),
           kernels=3),
      Case("gmm int8 m=4096 e=16", *_gmm(4096, k, n, 16, jnp.int8), kernels=1),
      Case("tgmm int8 m=4096 e=16", *_tgmm(4096, k, n, 16, jnp.int8), kernels=1),
      Case("gmm bf16 m=512 e=64", *_gmm(512, k, n, 64, jnp.bfloat16), kernels=1),
      Case("tgmm bf16 m=512 e=64", *_tgmm(512, k, n, 64, jnp.bfloat16), kernels=1),
      # edge tiles copied by hand at their own shape (k), or not whole tiles (n = 2880)
      Case("tgmm bf16 k=2304 (edge k tile)", *_tgmm(4096, 2304, n, 16, jnp.bfloat16),
           kernels=1),
      Case("tgmm bf16 k=n=2880 (edges past 128s)", *_tgmm(4096, 2880, 2880, 8, jnp.bfloat16),
           kernels=1),
      Case("QAT step m=4096 e=16", *_qat_step(4096, k, n, 16), kernels=3),
      Case("MoEMLP int8 forward", *_moe(1024, 1024, 1408, 16, "int8"), kernels=2),
      Case("MoEMLP float train step", *_moe(1024, 1024, 1408, 16, "float"), kernels=5),
  ]
  # 4096 tokens over all chips, 16 experts (top 2), d_model 1024, d_ff 1408.
  for mode, what, kernels in (("int8", "int8 forward", 2), ("float", "float train step", 6),
                              ("qat", "qat train step", 7)):
    out.append(Case(f"EP MoE {what} (all chips)", *_moe_ep(4096, 1024, 1408, 16, mode),
                    kernels=kernels, mesh_axis="expert"))
  return out


# --- compiling and reading back -----------------------------------------------------------

@dataclasses.dataclass
class Report:
  target: str
  case: str
  compiled: bool
  kernels: int = 0            # Pallas calls in the compiled program
  expected_kernels: int = 0
  temp_bytes: int = 0
  io_bytes: int = 0           # arguments + outputs: each read or written once is the ideal
  bytes_accessed: float | None = None
  registers: int | None = None  # GPU: the most any Pallas kernel uses
  spill_bytes: int | None = None  # GPU: spill stores + loads, all Pallas kernels
  shared_bytes: int | None = None
  exchanges: int = 0          # all-to-all collectives (ragged or not) in the program
  ragged_exchanges: int = 0   # of which ragged-all-to-all
  exchange_bytes: int = 0     # bytes of their result buffers
  seconds: float = 0.0
  error: str = ""

  @property
  def bytes_ratio(self) -> float | None:
    return None if self.bytes_accessed is None else self.bytes_accessed / self.io_bytes


def _ptxas() -> str | None:
  try:
    import nvidia.cuda_nvcc  # noqa: PLC0415
  except ImportError:
    return shutil.which("ptxas")
  path = pathlib.Path(list(nvidia.cuda_nvcc.__path__)[0]) / "bin" / "ptxas"
  return str(path) if path.exists() else shutil.which("ptxas")


def _gpu_kernel_stats(dump: str) -> tuple[int | None, int | None, int]:
  """(max registers, spill bytes, max shared memory) of the Pallas kernels XLA compiled,
  from its dump: ptxas -v on each PTX that holds an `npu_` entry, and the thunk sequence.
  Registers and spills are None when ptxas is missing or no `npu_` kernel was found (not
  0, which would read as "no spills")."""
  registers = spills = shared = 0
  matched = 0
  ptxas = _ptxas()
  for ptx in glob.glob(os.path.join(dump, "*.ptx")):
    text = pathlib.Path(ptx).read_text()
    if not re.search(r"\.entry npu_", text) or ptxas is None:
      continue
    arch = re.search(r"^\.target (\S+)", text, re.M).group(1)
    info = subprocess.run([ptxas, f"-arch={arch}", "-v", ptx, "-o", os.devnull],
                          capture_output=True, text=True, check=True).stderr
    for entry in re.split(r"Compiling entry function", info)[1:]:
      if not entry.strip().startswith("'npu_"):
        continue
      matched += 1
      registers = max(registers, int(re.search(r"Used (\d+) registers", entry).group(1)))
      spills += sum(int(v) for v in re.findall(r"(\d+) bytes spill (?:stores|loads)", entry))
  for seq in glob.glob(os.path.join(dump, "*thunk_sequence.txt")):
    for line in pathlib.Path(seq).read_text().splitlines():
      if " npu_" in line and (found := re.search(r"shared_memory: (\d+) bytes", line)):
        shared = max(shared, int(found.group(1)))
  if not matched:
    return None, None, shared
  return registers, spills, shared


def compile_case(case: Case, target: str) -> Report:
  """Compiles one case for one target and reads back what the compiler reports."""
  from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding  # noqa: PLC0415
  kind = kind_of(target)
  report = Report(target, case.name, False, expected_kernels=case.kernels if isinstance(
      case.kernels, int) else case.kernels[kind])
  is_spec = lambda a: (isinstance(a, tuple) and len(a) == 3 and isinstance(a[0], tuple)
                       and all(isinstance(v, int) for v in a[0]))
  if case.mesh_axis:
    mesh = Mesh(np.array(chips(target, every=True)), (case.mesh_axis,))
    fn = case.fn(mesh)
    specs = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a[0], a[1], sharding=NamedSharding(
        mesh, a[2])), case.args, is_leaf=is_spec)
  else:
    fn, sharding = case.fn, SingleDeviceSharding(device(target))
    specs = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in case.args]
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory() as dump:
    try:
      options = {"xla_dump_to": dump} if kind == "gpu" else {}
      compiled = jax.jit(fn).trace(*specs).lower().compile(compiler_options=options)
    except Exception as e:  # noqa: BLE001 (a failed compile is a result)
      report.error = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
      report.seconds = time.perf_counter() - t0
      return report
    report.seconds = time.perf_counter() - t0
    report.compiled = True
    report.kernels = _op_kernels(compiled.as_text(), kind)
    report.exchanges, report.ragged_exchanges, report.exchange_bytes = exchange_stats(
        compiled.as_text())
    mem = compiled.memory_analysis()
    report.temp_bytes = mem.temp_size_in_bytes
    report.io_bytes = mem.argument_size_in_bytes + mem.output_size_in_bytes
    if kind == "tpu":
      cost = compiled.cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      report.bytes_accessed = float(cost["bytes accessed"])
    else:
      report.registers, report.spill_bytes, report.shared_bytes = _gpu_kernel_stats(dump)
  return report


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8}
# `%name = f32[2048,1,1024]{...} ragged-all-to-all(` (TPU), a tuple of arrays for a
# tuple all-to-all (CPU), or async (GPU) `... ragged-all-to-all-start(` then
# `%name = f32[...]{...} ragged-all-to-all-done(`, counted at the done.
_EXCHANGE = re.compile(r"= ([^=]+?) (ragged-)?all-to-all(?:-done)?\(")


def exchange_stats(hlo: str) -> tuple[int, int, int]:
  """(all-to-all collectives, how many of them ragged, bytes of their results) in
  compiled HLO text."""
  count = ragged = total = 0
  for found in _EXCHANGE.finditer(re.sub(r"/\*index=\d+\*/", "", hlo)):  # in long tuples
    count += 1
    ragged += bool(found.group(2))
    for dtype, dims in re.findall(r"(\w+)\[([\d,]*)\]", found.group(1)):
      total += _DTYPE_BYTES.get(dtype, 4) * int(np.prod([int(v) for v in dims.split(",") if v]))
  return count, ragged, total


def _exchange(r: Report) -> str:
  """`3 a2a (2 ragged), 21.0 MB`: the collectives of an expert-parallel program."""
  if not r.exchanges:
    return ""
  return f"{r.exchanges} a2a ({r.ragged_exchanges} ragged), {_mb(r.exchange_bytes)} MB"


def _mb(v: float | None) -> str:
  return "-" if v is None else f"{v / 1e6:.1f}"


def format_table(reports: Sequence[Report]) -> str:
  """A markdown table of the reports (also docs/accelerators.md's)."""
  lines = ["| target | case | compiled | kernels | temp MB | temp / io | bytes / ideal "
           "| regs | spill B | smem KB | a2a | s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in reports:
    if not r.compiled:
      lines.append(f"| {r.target} | {r.case} | **no**: {r.error} | | | | | | | | | |")
      continue
    ratio = "-" if r.bytes_ratio is None else f"{r.bytes_ratio:.2f}"
    lines.append(
        f"| {r.target} | {r.case} | yes | {r.kernels} | {_mb(r.temp_bytes)} | "
        f"{r.temp_bytes / r.io_bytes:.2f} | {ratio} | {r.registers or '-'} | "
        f"{'-' if r.spill_bytes is None else r.spill_bytes} | "
        f"{'-' if r.shared_bytes is None else f'{r.shared_bytes / 1024:.0f}'} | "
        f"{_exchange(r) or '-'} | {r.seconds:.1f} |")
  return "\n".join(lines)


def format_summary(reports: Sequence[Report]) -> str:
  """One row per case, one column per target: TPU `temp/io, bytes/ideal`, GPU
  `registers/spill bytes`, or `FAIL`; a trailing `*` marks a kernel count other than
  the case expects (dispatch did not pick the kernels)."""
  targets = list(dict.fromkeys(r.target for r in reports))
  by = {(r.case, r.target): r for r in reports}

  def cell(r: Report | None) -> str:
    if r is None:
      return ""
    if not r.compiled:
      return "FAIL"
    mark = "" if r.kernels == r.expected_kernels else "*"
    if r.bytes_ratio is None:
      spill = "-" if r.spill_bytes is None else r.spill_bytes  # no Pallas kernel
      kernel = f"{r.registers or '-'}/{spill}"
    elif r.exchanges:  # bytes / ideal counts the receive buffer sized for any routing
      kernel = f"{r.temp_bytes / r.io_bytes:.2f}"
    else:
      kernel = f"{r.temp_bytes / r.io_bytes:.2f}, {r.bytes_ratio:.2f}"
    return kernel + mark + (f"; {_exchange(r)}" if r.exchanges else "")

  lines = ["| case | " + " | ".join(targets) + " |", "|---|" + "---|" * len(targets)]
  for name in dict.fromkeys(r.case for r in reports):
    lines.append(f"| {name} | " + " | ".join(cell(by.get((name, t))) for t in targets) + " |")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Report]:
  use_cpu_host()
  # An executable for a compile-only device cannot be read back from a persistent
  # compilation cache (JAX_COMPILATION_CACHE_DIR): writing it would only add to the "s"
  # column (JAX decides at a process's first compile).
  jax.config.update("jax_enable_compilation_cache", False)
  p = argparse.ArgumentParser(
      prog="python -m npu_ops.tools.aot",
      description="Compile every kernel entry point with the real TPU and GPU compilers "
                  "(no accelerator needed) and print what they report.")
  p.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS,
                 help="compile-only targets (default: all)")
  p.add_argument("--cases", nargs="*", default=None,
                 help="only cases whose name contains one of these words (default: all; "
                      "no words: list the case names)")
  p.add_argument("--summary", action="store_true",
                 help="one row per case and one column per target (docs/accelerators.md's table)")
  args = p.parse_args(argv)
  if args.cases == []:  # `--cases` alone: the names to choose from
    print("\n".join(c.name for c in cases()))
    return []
  missing = missing_compilers()
  targets = [t for t in args.targets if kind_of(t) not in missing]
  for kind, why in missing.items():
    print(f"skipping {kind} targets: {why}", file=sys.stderr)
  chosen = [c for c in cases() if not args.cases or any(w in c.name for w in args.cases)]
  reports = []
  progress = sys.stderr.isatty()  # never mixed into a piped table
  for target in targets:
    for case in chosen:
      if progress:
        print(f"\r{target}: {case.name} ...".ljust(70), end="", file=sys.stderr, flush=True)
      reports.append(compile_case(case, target))
  if progress:
    print("\r" + " " * 70 + "\r", end="", file=sys.stderr)
  print(f"jax {jax.__version__}; temp / io: compiler temp memory over arguments + outputs; "
        "bytes / ideal: TPU bytes accessed over reading every argument and writing every "
        "output once (lower is better, 1.0 the least possible); regs, spill B, smem KB: per Pallas kernel on GPU (ptxas); a2a: the "
        "all-to-all collectives of an expert-parallel case (EP, compiled over all chips) and "
        "their buffers' bytes (per chip; a ragged one moves only the rows routed)")
  print(format_summary(reports) if args.summary else format_table(reports))
  return reports


if __name__ == "__main__":
  main()
