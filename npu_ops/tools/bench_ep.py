"""Expert-parallel MoE benchmark: `python -m npu_ops.tools.bench --ep 8`.

On `D` simulated CPU devices (this host's cores shared by all of them), for each
mode: tokens per second of the MoE layer with its experts over the devices
(`npu_ops.moe.moe_mlp(..., mesh=, expert_axis=)`) against the same layer on one
device, timed interleaved in one process; and the bytes the step moves between
devices against the ideal, each routed row that leaves its device sent once each
way (int8 forward: its codes and scale out, float32 results back; a training step
also sends the results' gradients out and the rows' gradients back). The CPU
exchange is a padded `all_to_all` (XLA:CPU has no ragged one): every pair of
devices exchanges `capacity` rows, whatever the routing.

Where the compilers are installed (`npu_ops[aot]`), the same layer is compiled for
all chips of TPU v5e:2x2 and 8 H100s and the compiler's collectives are read back:
the ragged all-to-all buffers per chip (the most they can move; they move only the
rows routed) against the ideal for a uniform routing.
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType

from npu_ops.tools import aot
from npu_ops import moe
from npu_ops._src import qat

MODES = {"int8": "int8 forward", "float": "float train step", "qat": "qat train step"}


def use_cpu_devices(n: int) -> None:
  """Asks for `n` CPU devices; must run before JAX starts its CPU backend."""
  try:
    jax.config.update("jax_num_cpu_devices", n)
  except RuntimeError:  # JAX has started: its device count is fixed
    pass
  if len(jax.devices("cpu")) < n:
    raise SystemExit(f"--ep {n}: JAX started with {len(jax.devices('cpu'))} CPU devices; "
                     "run the benchmark in a fresh process")


def _weights(d_model, d_ff, e, mode, seed=0):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.normal(size=shape) / np.sqrt(shape[-2]), jnp.float32)
  w = moe.MoEWeights(normal(d_model, e), normal(e, d_model, 2 * d_ff), normal(e, d_ff, d_model))
  if mode == "float":
    return w
  s_gu, s_d = (qat.weight_scale_from_amax(a) for a in (w.w_gate_up, w.w_down))
  if mode == "qat":
    return w._replace(gate_up_scale=s_gu, down_scale=s_d)
  return moe.MoEWeights(w.router, qat.quantize_weight(w.w_gate_up, s_gu),
                        qat.quantize_weight(w.w_down, s_d), s_gu, s_d)


def _step(mode, **parallel):
  """The timed program: the int8 forward, or loss and gradients of x and every weight."""
  run = lambda x, w: moe.moe_mlp(x, w, top_k=2, mode=mode, **parallel).y
  if mode == "int8":
    return jax.jit(run)
  return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(run(x, w) ** 2), argnums=(0, 1)))


def _row_bytes(mode, d_model):
  """Bytes each routed row moves between devices, all ways of one step."""
  if mode == "int8":
    return (d_model + 4) + 4 * d_model  # codes + scale out, float32 results back
  return 4 * (4 * d_model)  # rows out, results back, their gradients out and back


def crossing_rows(x, router, devices, experts, top_k=2) -> int:
  """(token, slot) rows routed to an expert on another device (tokens split evenly)."""
  _, chosen = moe.top_k_routing(jnp.asarray(x) @ router, top_k)
  source = np.arange(x.shape[0]) // (x.shape[0] // devices)
  return int((np.asarray(chosen) // (experts // devices) != source[:, None]).sum())


def run_cpu(devices, tokens, d_model, d_ff, experts, modes, repeats, capacity_factor=None):
  from npu_ops.tools.bench import time_interleaved  # noqa: PLC0415
  mesh = jax.make_mesh((devices,), ("expert",), axis_types=(AxisType.Auto,))
  x = jnp.asarray(np.random.default_rng(1).normal(size=(tokens, d_model)), jnp.float32)
  rows = []
  for mode in modes:
    w = _weights(d_model, d_ff, experts, mode)
    one = _step(mode)
    ep = _step(mode, mesh=mesh, expert_axis="expert", capacity_factor=capacity_factor)
    best = time_interleaved({"one": functools.partial(one, x, w),
                             "ep": functools.partial(ep, x, w)}, repeats)
    count, _, buffer_bytes = aot.exchange_stats(ep.lower(x, w).compile().as_text())
    ideal = crossing_rows(x, w.router, devices, experts) * _row_bytes(mode, d_model)
    moved = buffer_bytes * (devices - 1)  # each device's buffers, less the block it keeps
    rows.append(dict(mode=MODES[mode], one_tps=tokens / best["one"], ep_tps=tokens / best["ep"],
                     collectives=count, moved_mb=moved / 1e6, ideal_mb=ideal / 1e6))
  return rows


def run_targets():
  """The AOT expert-parallel cases: collectives and their buffers per chip vs the ideal."""
  missing = aot.missing_compilers()
  out = []
  for target in ("v5e", "h100"):
    if aot.kind_of(target) in missing:
      continue
    chips = len(aot.chips(target, every=True))
    for case in aot.cases():
      if not case.name.startswith("EP MoE"):
        continue
      r = aot.compile_case(case, target)
      mode = next(m for m in MODES if m in case.name)
      tokens, d_model = case.args[0][0]
      pairs = tokens // chips * 2  # top 2
      ideal = pairs * (chips - 1) / chips * _row_bytes(mode, d_model)  # uniform routing
      out.append(dict(target=target, chips=chips, case=case.name, compiled=r.compiled,
                      collectives=r.exchanges, ragged=r.ragged_exchanges,
                      buffer_mb=r.exchange_bytes / 1e6, ideal_mb=ideal / 1e6))
  return out


def report(args) -> None:
  aot.use_cpu_host()
  use_cpu_devices(args.ep)
  tokens, (d_model, d_ff, experts) = args.ep_tokens, args.ep_shape
  if experts % args.ep or tokens % args.ep:
    raise SystemExit(f"--ep {args.ep}: must divide {experts} experts and {tokens} tokens")
  print(f"Expert-parallel MoE on {args.ep} simulated CPU devices (jax {jax.__version__}): "
        f"{tokens} tokens, d_model {d_model}, d_ff {d_ff}, {experts} experts, top 2"
        + (f", capacity factor {args.ep_capacity_factor}" if args.ep_capacity_factor else "")
        + ".\n"
        "tok/s: tokens per second (one device; experts over the devices); MB: bytes between "
        "devices per step, moved (padded all_to_all) and ideal (each row routed off its "
        "device, once each way).")
  print(f"{'mode':<17} {'one tok/s':>9} {'EP tok/s':>9} {'EP/one':>6} {'a2a':>4} "
        f"{'moved MB':>9} {'ideal MB':>9} {'x ideal':>7}")
  for r in run_cpu(args.ep, tokens, d_model, d_ff, experts, args.ep_modes, args.repeats,
                   args.ep_capacity_factor):
    print(f"{r['mode']:<17} {r['one_tps']:>9.0f} {r['ep_tps']:>9.0f} "
          f"{r['ep_tps'] / r['one_tps']:>6.2f} {r['collectives']:>4} {r['moved_mb']:>9.1f} "
          f"{r['ideal_mb']:>9.1f} {r['moved_mb'] / r['ideal_mb']:>7.2f}")
  targets = run_targets() if args.ep_aot else []
  if targets:
    print("\nCompiled for all chips (4096 tokens, 16 experts): ragged all-to-all buffers "
          "per chip (the most they move) vs the ideal per chip for a uniform routing.")
    print(f"{'target':<10} {'case':<34} {'a2a':>8} {'buffer MB':>9} {'ideal MB':>8} "
          f"{'x ideal':>7}")
    for r in targets:
      print(f"{r['target'] + ' x' + str(r['chips']):<10} {r['case']:<34} "
            f"{str(r['collectives']) + ' (' + str(r['ragged']) + 'r)':>8} "
            f"{r['buffer_mb']:>9.1f} {r['ideal_mb']:>8.1f} {r['buffer_mb'] / r['ideal_mb']:>7.2f}")


if __name__ == "__main__":  # its options live in bench's parser
  sys.exit("the expert-parallel benchmark runs through bench: "
           "python -m npu_ops.tools.bench --ep D [--ep-tokens ... --ep-modes ...]")
