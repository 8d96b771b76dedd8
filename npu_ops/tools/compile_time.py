"""Compile time of our ops against the program a JAX user would write instead (issue 33).

`python -m npu_ops.tools.compile_time [--targets cpu v5e] [--cases ...]` jit-compiles each
op (trace + lower + compile, caches cleared, best of `--repeats`) and the plain program
beside it, at the same shapes, in the same process: `jax.lax.ragged_dot` for the grouped
matmuls, plus a jnp dequant / SwiGLU / per-token quant epilogue for the fused op. Group
sizes are a dynamic int32 array (one compile serves every routing). `v5e` (or any TPU
target of `npu_ops.tools.aot`) compiles for a compile-only device (needs the `aot` extra).
Quote the ratios, from a quiet host: compile time moves with load as run time does.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp

from npu_ops.tools import positive_int

K, N = 2048, 2816  # the benchmark shapes (docs/performance.md)


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  ours: Callable[..., object]
  plain: Callable[..., object]
  args: tuple[tuple[tuple[int, ...], object], ...]


def _plain_epilogue(acc, w_scale, x_scale, counts):
  """Dequant, SwiGLU and per-token int8 quant as a user writes them in jnp."""
  gid = jnp.repeat(jnp.arange(w_scale.shape[0]), counts, total_repeat_length=acc.shape[0])
  c = (acc.astype(jnp.float32) * w_scale[gid]) * x_scale[:, None]
  half = c.shape[1] // 2
  s = jax.nn.silu(c[:, :half]) * c[:, half:]
  amax = jnp.max(jnp.abs(s), axis=1, keepdims=True)
  scale = amax / 127
  q = jnp.round(s / jnp.where(scale > 0, scale, 1)).astype(jnp.int8)
  return q, scale[:, 0]


def _fused(m, k, n, e) -> Case:
  import npu_ops  # noqa: PLC0415

  def ours(x, w, ws, xs, counts):
    return npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws, xs, counts, group_list_type=1)

  def plain(x, w, ws, xs, counts):
    acc = jax.lax.ragged_dot(x, w, counts, preferred_element_type=jnp.int32)
    return _plain_epilogue(acc, ws, xs, counts)
  return Case(f"fused A8W8 m={m} k={k} n={n} e={e}", ours, plain,
              (((m, k), jnp.int8), ((e, k, n), jnp.int8), ((e, n), jnp.float32),
               ((m,), jnp.float32), ((e,), jnp.int32)))


def _gmm(m, k, n, e) -> Case:
  import npu_ops  # noqa: PLC0415
  return Case(f"bf16 grouped_matmul m={m} e={e}",
              lambda x, w, c: npu_ops.grouped_matmul(x, w, c),
              lambda x, w, c: jax.lax.ragged_dot(x, w, c),
              (((m, k), jnp.bfloat16), ((e, k, n), jnp.bfloat16), ((e,), jnp.int32)))


def _gmm_grad(m, k, n, e) -> Case:
  import npu_ops  # noqa: PLC0415

  def grad_of(dot):
    def step(x, w, dy, counts):
      loss = lambda x, w: jnp.vdot(dot(x, w, counts).astype(jnp.float32), dy.astype(jnp.float32))
      return jax.grad(loss, argnums=(0, 1))(x, w)
    return step
  return Case(f"bf16 gmm gradient (dx, dw) m={m} e={e}", grad_of(npu_ops.grouped_matmul),
              grad_of(jax.lax.ragged_dot),
              (((m, k), jnp.bfloat16), ((e, k, n), jnp.bfloat16), ((m, n), jnp.bfloat16),
               ((e,), jnp.int32)))


def cases() -> list[Case]:
  """The table of issue 33 (k=2048, n=2816 unless named)."""
  return [_fused(4096, K, N, 16), _fused(512, K, N, 64), _fused(256, 256, 512, 4),
          _gmm(4096, K, N, 16), _gmm_grad(512, K, N, 64)]


def compile_seconds(fn: Callable[..., object], args, target: str = "cpu", repeats: int = 2
                    ) -> float:
  """Best of `repeats` trace + lower + compile of `jax.jit(fn)` with cleared caches."""
  sharding = None
  if target != "cpu":
    from npu_ops.tools import aot  # noqa: PLC0415
    sharding = jax.sharding.SingleDeviceSharding(aot.device(target))
  specs = [jax.ShapeDtypeStruct(s, d, sharding=sharding) for s, d in args]
  best = float("inf")
  for _ in range(repeats):
    jax.clear_caches()
    t0 = time.perf_counter()
    jax.jit(fn).trace(*specs).lower().compile()
    best = min(best, time.perf_counter() - t0)
  return best


def main(argv: Sequence[str] | None = None) -> list[dict]:
  from npu_ops.tools import aot  # noqa: PLC0415  (its targets; it starts no backend)
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--targets", nargs="+", default=["cpu"], choices=["cpu", *aot.TPU_TARGETS],
                 help="cpu and/or TPU targets of npu_ops.tools.aot, e.g. v5e (default: cpu)")
  p.add_argument("--cases", nargs="*", default=None,
                 help="substrings of case names to run (default: all)")
  p.add_argument("--repeats", type=positive_int, default=2,
                 help="compiles per program, caches cleared; the fastest counts (default: 2)")
  a = p.parse_args(argv)
  # A persistent compilation cache (JAX_COMPILATION_CACHE_DIR, as the test suite sets)
  # would make the second compile a read: time the compiler (JAX decides at a process's
  # first compile, so from the command line this holds for every case).
  jax.config.update("jax_enable_compilation_cache", False)
  if any(t != "cpu" for t in a.targets):
    aot.use_cpu_host()
  rows = []
  print(f"{'case':44s} {'target':6s} {'ours s':>7s} {'plain s':>7s} {'ratio':>6s}"
        "   (ratio: ours / plain, lower is better; the goal is <= 2)", flush=True)
  for case in cases():
    if a.cases and not any(c in case.name for c in a.cases):
      continue
    for target in a.targets:
      ours = compile_seconds(case.ours, case.args, target, a.repeats)
      plain = compile_seconds(case.plain, case.args, target, a.repeats)
      rows.append(dict(case=case.name, target=target, ours=ours, plain=plain))
      print(f"{case.name:44s} {target:6s} {ours:7.2f} {plain:7.2f} {ours / plain:6.1f}",
            flush=True)
  return rows


if __name__ == "__main__":
  main()
