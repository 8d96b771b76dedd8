"""The first run on a real accelerator: the kernels' tests on the chip, then their speed.

    python -m npu_ops.tools.accelerator_check            # on a GPU or TPU host, from the repo root
    python -m npu_ops.tools.accelerator_check --no-tests --shapes prefill

1. Runs the kernel tests of `tests/` with `NPU_OPS_TEST_DEVICE=gpu|tpu`: the Pallas
   kernel of this platform runs natively (not in interpret mode) against the NumPy
   goldens and against the XLA path on the same chip.
2. Times, at the performance model's shapes (prefill and decode), the fused A8W8 op,
   the bf16 and int8 grouped matmuls and tgmm (ours, `implementation=None`: the kernel), against
   `jax.lax.ragged_dot` (the same epilogue after it, for the fused op) and a dense dot
   of the same useful FLOPs, and prints each one's time, its rate as a share of the
   chip's peak, its ideal bytes (operands once: x, the weights of the groups that hold
   rows, the output) as a share of the HBM bandwidth, and the roofline fraction
   `max(FLOPs / peak, ideal bytes / bandwidth) / time`.

Times are the mean of back-to-back calls (JAX dispatches asynchronously, so the chip
stays busy), after a compile and two warm-up calls. Every stage reports its error and
the run goes on, so one broken piece does not hide the rest.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

import npu_ops
from npu_ops.perf import chips
from npu_ops.perf.cases import K, N, group_sizes

# (name, routed rows m, experts e, group sizes): prefill spreads m rows evenly (and as a
# Zipf draw); decode routes few tokens, top-8, over many experts.
SHAPES = {
    "prefill": [("prefill m=4096 e=16 uniform", 4096, 16, "uniform"),
                ("prefill m=4096 e=16 zipf", 4096, 16, "zipf"),
                ("prefill m=16384 e=64 uniform", 16384, 64, "uniform")],
    "decode": [("decode 8 tok x top-8, e=256", 64, 256, "random"),
               ("decode 64 tok x top-8, e=128", 512, 128, "random")],
}
TEST_SELECTION = {"gpu": "pallas_gpu or gpu_kernel or on_the_kernel",
                  "tpu": "pallas_tpu or on_the_kernel"}
TEST_FILES = ["tests/test_implementations.py", "tests/test_fp8_mx.py", "tests/test_pallas.py"]


def time_call(fn, *args, calls: int = 20) -> float:
  """Seconds per call: mean of `calls` back-to-back calls after compile + 2 warm-ups."""
  out = fn(*args)
  jax.block_until_ready(out)
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(calls):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / calls


def _epilogue(acc, w_scale, x_scale, sizes):
  """What a user writes after ragged_dot: dequant, SwiGLU, per-token int8 quant."""
  rows = jnp.repeat(w_scale, sizes, axis=0, total_repeat_length=acc.shape[0])
  y = acc.astype(jnp.float32) * rows * x_scale[:, None]
  h = y.shape[1] // 2
  s = jax.nn.silu(y[:, :h]) * y[:, h:]
  scale = jnp.max(jnp.abs(s), axis=1) / 127
  q = jnp.round(s / jnp.where(scale == 0, 1, scale)[:, None]).astype(jnp.int8)
  return q, scale


def contenders(op: str, m: int, e: int, sizes: np.ndarray, rng: np.random.Generator):
  """(arguments, {name: jitted fn}, useful FLOPs, ideal bytes, peak dtype) for one op."""
  touched = int(np.count_nonzero(sizes))
  gl = jnp.asarray(sizes)
  if op == "fused A8W8":
    x = jnp.asarray(rng.integers(-128, 128, (m, K), dtype=np.int8))
    w = jnp.asarray(rng.integers(-128, 128, (e, K, N), dtype=np.int8))
    ws = jnp.asarray(rng.uniform(1e-4, 2e-4, (e, N)).astype(np.float32))
    xs = jnp.asarray(rng.uniform(0.5, 1.5, (m,)).astype(np.float32))
    args = (x, w, ws, xs, gl)
    fns = {
        "ours": jax.jit(lambda x, w, ws, xs, gl: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
            x, w, ws, xs, gl, group_list_type=1)),
        "ragged_dot": jax.jit(lambda x, w, ws, xs, gl: _epilogue(jax.lax.ragged_dot(
            x, w, gl, preferred_element_type=jnp.int32), ws, xs, gl)),
        "dense dot": jax.jit(lambda x, w, ws, xs, gl: jnp.dot(
            x, w[0], preferred_element_type=jnp.int32)),
    }
    ideal = m * K + touched * K * N + m * (N // 2 + 4) + touched * N * 4 + m * 4
    return args, fns, 2 * m * K * N, ideal, "int8"
  if op == "gmm int8":  # exact int32 out: the int8 MoE layer's down projection
    x = jnp.asarray(rng.integers(-128, 128, (m, K), dtype=np.int8))
    w = jnp.asarray(rng.integers(-128, 128, (e, K, N), dtype=np.int8))
    i32 = jnp.int32
    fns = {"ours": jax.jit(lambda x, w, gl: npu_ops.grouped_matmul(x, w, gl)),
           "ragged_dot": jax.jit(lambda x, w, gl: jax.lax.ragged_dot(
               x, w, gl, preferred_element_type=i32)),
           "dense dot": jax.jit(lambda x, w, gl: jnp.dot(x, w[0], preferred_element_type=i32))}
    return (x, w, gl), fns, 2 * m * K * N, m * K + touched * K * N + 4 * m * N, "int8"
  x = jnp.asarray(rng.standard_normal((m, K)), jnp.bfloat16)
  if op == "gmm bf16":
    w = jnp.asarray(rng.standard_normal((e, K, N)) / 45, jnp.bfloat16)
    args = (x, w, gl)
    fns = {"ours": jax.jit(lambda x, w, gl: npu_ops.grouped_matmul(x, w, gl)),
           "ragged_dot": jax.jit(lambda x, w, gl: jax.lax.ragged_dot(x, w, gl)),
           "dense dot": jax.jit(lambda x, w, gl: jnp.dot(x, w[0]))}
    return args, fns, 2 * m * K * N, 2 * (m * K + touched * K * N + m * N), "bfloat16"
  # tgmm: the weight gradient, out[g] = x[rows of g]^T @ dy[rows of g]
  dy = jnp.asarray(rng.standard_normal((m, N)), jnp.bfloat16)
  args = (x, dy, gl)
  fns = {"ours": jax.jit(lambda x, dy, gl: npu_ops.tgmm(x, dy, gl, num_groups=e)),
         "ragged_dot": jax.jit(lambda x, dy, gl: jax.grad(
             lambda w: jnp.vdot(jax.lax.ragged_dot(x, w, gl), dy))(
                 jnp.zeros((e, K, N), jnp.bfloat16))),
         "dense dot": jax.jit(lambda x, dy, gl: jnp.dot(x.T, dy))}
  return args, fns, 2 * m * K * N, 2 * (m * K + m * N + e * K * N), "bfloat16"


def bench(shape_sets: list[str], ops: list[str], chip: chips.Chip | None) -> None:
  print(f"\n== speed (k={K}, n={N}; time per call; % of the chip's peak for the op's dtype; "
        "ideal bytes / time as % of HBM bandwidth; roof = roofline time / time; higher is "
        "better for all three, 100% and 1.0 the most possible)")
  print(f"{'shape':32} {'op':11} {'contender':11} {'us':>9} {'TFLOP/s':>8} {'%peak':>6} "
        f"{'%HBM':>6} {'roof':>5}")
  rng = np.random.default_rng(0)
  for set_name in shape_sets:
    for name, m, e, kind in SHAPES[set_name]:
      sizes = group_sizes(kind, m, e)
      for op in ops:
        try:
          args, fns, flops, ideal, dtype = contenders(op, m, e, sizes, rng)
        except Exception as err:  # noqa: BLE001 (report and go on)
          print(f"{name:32} {op:11} setup failed: {type(err).__name__}: {err}")
          continue
        for who, fn in fns.items():
          try:
            sec = time_call(fn, *args)
          except Exception as err:  # noqa: BLE001
            msg = str(err).splitlines()[0][:120] if str(err) else ""
            print(f"{name:32} {op:11} {who:11} failed: {type(err).__name__}: {msg}")
            continue
          row = f"{name:32} {op:11} {who:11} {sec * 1e6:9.1f} {flops / sec / 1e12:8.1f}"
          if chip is not None and who != "dense dot":
            peak, bw = chip.peak(dtype), chip.hbm_bandwidth
            roof = max(flops / peak, ideal / bw) / sec
            row += f" {100 * flops / sec / peak:6.1f} {100 * ideal / sec / bw:6.1f} {roof:5.2f}"
          elif chip is not None:
            row += f" {100 * flops / sec / chip.peak(dtype):6.1f}"
          print(row, flush=True)
        del args, fns


def run_tests(platform: str, extra: list[str]) -> int:
  root = pathlib.Path(__file__).resolve().parents[2]
  if not (root / "tests").is_dir():
    print("tests/ not found next to the package (run from a clone of the repository)")
    return 1
  env = dict(os.environ, NPU_OPS_TEST_DEVICE=platform, XLA_PYTHON_CLIENT_PREALLOCATE="false")
  env.pop("JAX_PLATFORMS", None)
  cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *TEST_FILES, "-k", TEST_SELECTION[platform], *extra]
  print("\n== kernel tests on the chip:", " ".join(cmd[1:]), flush=True)
  return subprocess.call(cmd, cwd=root, env=env)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--no-tests", action="store_true", help="skip the kernel tests")
  p.add_argument("--no-bench", action="store_true", help="skip the timings")
  p.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=["prefill", "decode"])
  ops = ["fused A8W8", "gmm bf16", "gmm int8", "tgmm bf16"]
  p.add_argument("--ops", nargs="+", default=ops, choices=ops)
  p.add_argument("--pytest-args", nargs=argparse.REMAINDER, default=[],
                 help="passed on to pytest (last)")
  args = p.parse_args(argv)
  backend = jax.default_backend()
  dev = jax.devices()[0]
  chip = chips.chip_of_device(dev)
  print(f"jax {jax.__version__}, backend {backend}, device {dev.device_kind!r} "
        f"({'peak: ' + ', '.join(f'{k} {v / 1e12:.0f} TFLOP/s' for k, v in chip.peak_flops.items()) + f', HBM {chip.hbm_bandwidth / 1e12:.2f} TB/s' if chip else 'no spec on file'})")
  platform = {"gpu": "gpu", "cuda": "gpu", "tpu": "tpu"}.get(backend)
  if platform is None:
    print("no GPU or TPU here: this check is for an accelerator host")
    return 2
  status = 0
  if not args.no_tests:
    status = run_tests(platform, args.pytest_args)
    print(f"kernel tests: {'passed' if status == 0 else f'FAILED (pytest exit {status})'}")
  if not args.no_bench:
    try:
      bench(args.shapes, args.ops, chip)
    except Exception:  # noqa: BLE001
      traceback.print_exc()
      status = status or 1
  return status


if __name__ == "__main__":
  sys.exit(main())
