"""Benchmark: the fused A8W8 op and the grouped matmul vs their baselines.

    python -m npu_ops.bench                 # the primary shape, a few group lists
    python -m npu_ops.bench --m 512 4096 --e 8 16 64 --json out.json

For each (m, k, n, e, group distribution) it times, interleaved in one process
(so machine noise hits every contender alike), with a *dynamic* group list:

* ours:      `npu_grouped_matmul_swiglu_quant_v2` (A8W8, XLA path), and the bare
             `grouped_matmul` (int8 -> int32);
* ragged:    `jax.lax.ragged_dot` (int8 -> int32) plus the same jnp epilogue;
* dense:     one dense int8 `jnp.dot` [m, k] x [k, n] -> int32: the same useful
             FLOPs, the roofline the grouped op aims at.

Ratios are the result (`dense / ours`: 1.0 means dense-dot speed); absolute times
on shared machines are noise.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import npu_ops


def group_counts(kind: str, m: int, e: int, rng: np.random.Generator) -> np.ndarray:
  """Token counts per expert: uniform, skewed (Dirichlet), one group, or mostly empty."""
  if kind == "uniform":
    p = np.full(e, 1 / e)
  elif kind == "skewed":
    p = rng.dirichlet(np.full(e, 0.5))
  elif kind == "one_group":
    p = np.eye(e)[e // 2]
  elif kind == "many_empty":
    p = np.zeros(e)
    p[rng.choice(e, max(1, e // 8), replace=False)] = 1
    p /= p.sum()
  else:
    raise ValueError(f"group kind: expected uniform/skewed/one_group/many_empty, got {kind!r}")
  counts = np.floor(p * m).astype(np.int32)
  counts[np.argmax(counts)] += m - counts.sum()
  return counts


def _epilogue(acc, w_scale, x_scale, counts):
  gid = jnp.repeat(jnp.arange(w_scale.shape[0]), counts, total_repeat_length=acc.shape[0])
  c = (acc.astype(jnp.float32) * w_scale[gid]) * x_scale[:, None]
  return npu_ops.quantize_per_token(npu_ops.swiglu(c))


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
  """Min wall time of each fn, calls interleaved round-robin after one warm-up each."""
  for f in fns.values():
    jax.block_until_ready(f())
  best = {name: float("inf") for name in fns}
  for _ in range(repeats):
    for name, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      best[name] = min(best[name], time.perf_counter() - t0)
  return best


def run_case(m: int, k: int, n: int, e: int, kind: str, *, repeats: int, ragged: bool,
             seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.integers(-128, 128, (m, k), dtype=np.int8))
  w = jnp.asarray(rng.integers(-128, 128, (e, k, n), dtype=np.int8))
  w_scale = jnp.asarray(rng.uniform(0.5, 1.5, (e, n)).astype(np.float32) * 1e-5)
  x_scale = jnp.asarray(rng.uniform(0.5, 1.5, (m,)).astype(np.float32))
  counts = jnp.asarray(group_counts(kind, m, e, rng))

  fused = jax.jit(lambda x, w, ws, xs, c: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w, ws, xs, c, group_list_type=1))
  gmm = jax.jit(lambda x, w, c: npu_ops.grouped_matmul(x, w, c))
  dense = jax.jit(lambda x, w: jnp.dot(x, w, preferred_element_type=jnp.int32))
  fns = {
      "fused": lambda: fused(x, w, w_scale, x_scale, counts),
      "gmm": lambda: gmm(x, w, counts),
      "dense": lambda: dense(x, w[0]),
  }
  if ragged:
    rd = jax.jit(lambda x, w, ws, xs, c: _epilogue(
        jax.lax.ragged_dot(x, w, c, preferred_element_type=jnp.int32), ws, xs, c))
    fns["ragged+epilogue"] = lambda: rd(x, w, w_scale, x_scale, counts)
  t = time_interleaved(fns, repeats)
  row = {"m": m, "k": k, "n": n, "e": e, "groups": kind, **{f"t_{a}": v for a, v in t.items()},
         "fused_vs_dense": t["dense"] / t["fused"], "gmm_vs_dense": t["dense"] / t["gmm"]}
  if ragged:
    row["fused_speedup_vs_ragged"] = t["ragged+epilogue"] / t["fused"]
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--m", type=int, nargs="+", default=[4096])
  p.add_argument("--k", type=int, default=2048)
  p.add_argument("--n", type=int, default=2816)
  p.add_argument("--e", type=int, nargs="+", default=[16])
  p.add_argument("--groups", nargs="+", default=["uniform", "skewed", "one_group", "many_empty"])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--no-ragged", action="store_true", help="skip the (slow) ragged_dot baseline")
  p.add_argument("--json", help="write the rows to this JSON file")
  args = p.parse_args(argv)

  rows = []
  header = (f"{'m':>6} {'k':>5} {'n':>5} {'e':>3} {'groups':>10} | {'fused ms':>8} {'dense ms':>8} "
            f"{'ragged ms':>9} | {'fused/dense':>11} {'gmm/dense':>9} {'vs ragged':>9}")
  print(f"jax {jax.__version__}, {jax.devices()[0].platform}; ratios = dense-dot time / op time "
        "(higher is better; 1.0 = dense int8 dot speed)\n" + header + "\n" + "-" * len(header))
  for m in args.m:
    for e in args.e:
      for kind in args.groups:
        r = run_case(m, args.k, args.n, e, kind, repeats=args.repeats, ragged=not args.no_ragged)
        rows.append(r)
        ragged = "fused_speedup_vs_ragged" in r
        vs = f"{r['fused_speedup_vs_ragged']:8.1f}x" if ragged else "-"
        t_ragged = f"{r['t_ragged+epilogue'] * 1e3:9.1f}" if ragged else "-"
        print(f"{m:>6} {args.k:>5} {args.n:>5} {e:>3} {kind:>10} | {r['t_fused'] * 1e3:8.1f} "
              f"{r['t_dense'] * 1e3:8.1f} {t_ragged:>9} | {r['fused_vs_dense']:>11.2f} "
              f"{r['gmm_vs_dense']:>9.2f} {vs:>9}", flush=True)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
