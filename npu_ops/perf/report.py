"""Tables of our kernels under the model: against the roofline, and against megablox."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import npu_ops
from npu_ops.perf import cases as cases_lib
from npu_ops.perf import chips as chips_lib
from npu_ops.perf import model, tune, validate


def predict_table(chip: str, ops, chosen) -> str:
  """Each op at each case: modeled time, roofline, their ratio, the floor's ratio to the
  roofline and the time's to the floor, HBM bytes over the ideal."""
  c = chips_lib.get(chip)
  lines = [f"chip {c.name}: peak int8 {c.peak('int8') / 1e12:.0f}, bf16 "
           f"{c.peak('bfloat16') / 1e12:.0f} TFLOP/s, HBM {c.hbm_bandwidth / 1e9:.0f} GB/s, "
           f"{c.cores} core(s) a device; x roof: model time / roofline; floor: the least "
           "any kernel can take (each group's rows in whole MXU passes), over the roofline; "
           "x floor: model time / floor; x bytes: HBM bytes / ideal (lower is better)",
           f"{'case':30} {'op':16} {'model us':>9} {'roof us':>8} {'x roof':>6} "
           f"{'floor':>6} {'x floor':>7} {'x bytes':>7} {'steps':>6}  kernels"]
  for case in chosen:
    for op in ops:
      prob = cases_lib.problem(op, case)
      pred = model.predict(prob.fn, *prob.args, chip=c)
      roof, floor = prob.roofline(c), prob.floor(c)
      names = ",".join(k.name.replace("npu_", "") for k in pred.kernels) or "-"
      lines.append(f"{case.name:30} {op:16} {pred.seconds * 1e6:9.1f} {roof * 1e6:8.1f} "
                   f"{pred.seconds / roof:6.2f} {floor / roof:6.2f} {pred.seconds / floor:7.2f} "
                   f"{pred.hbm_bytes / prob.ideal_bytes:7.2f} "
                   f"{pred.grid_steps:6d}  {names}")
  return "\n".join(lines)


def ours_for_entry(entry: validate.Entry) -> model.Prediction:
  """Our bf16 grouped matmul / tgmm at a measured entry's shapes and group sizes."""
  dtype = validate._DTYPES[entry.dtype]  # noqa: SLF001 (one table of dtype names)
  spec = lambda shape: jax.ShapeDtypeStruct(shape, dtype)
  gs = np.asarray(entry.group_sizes, np.int32)
  if entry.kind == "tgmm":
    fn = lambda x, dy, g: npu_ops.tgmm(x, dy, g, num_groups=len(gs), preferred_element_type=dtype)
    return model.predict(fn, spec(entry.lhs), spec(entry.rhs), gs, chip=entry.chip)
  if entry.kind == "gmm_t":  # the VJP's d x = dy [m, n] @ w[g]^T, w [g, k, n] read in place
    def fn(dy, w, g):
      x = jnp.zeros((dy.shape[0], w.shape[1]), dtype)
      return jax.vjp(lambda x: npu_ops.grouped_matmul(x, w, g, preferred_element_type=dtype),
                     x)[1](dy)[0]
    return model.predict(fn, spec(entry.lhs), spec(entry.rhs), gs, chip=entry.chip)
  fn = lambda x, w, g: npu_ops.grouped_matmul(x, w, g, preferred_element_type=dtype)
  return model.predict(fn, spec(entry.lhs), spec(entry.rhs), gs, chip=entry.chip)


def megablox_table(chip: str = "v5e") -> str:
  """At every measured entry of `chip`: tokamax's measured time, megablox and tokamax's
  kernel at the tuned tiling (model), ours (model), and ours over each."""
  lines = [f"{'case':46} {'measured':>9} {'megablox':>9} {'tokamax':>9} {'ours':>9} "
           f"{'ours/mb':>8} {'ours/tk':>8}  (ms; ratios below 1: ours faster under the model)"]
  for entry in validate.load_entries(chip):
    if entry.residuals:
      continue
    mb = validate.predict_entry(entry).kernel_seconds
    tk = validate.predict_entry(entry, "tokamax").kernel_seconds
    ours = ours_for_entry(entry).seconds
    lines.append(f"{entry.label:46} {entry.measured_s * 1e3:9.3f} {mb * 1e3:9.3f} "
                 f"{tk * 1e3:9.3f} {ours * 1e3:9.3f} {ours / mb:8.2f} {ours / tk:8.2f}")
  return "\n".join(lines)


def tiles_table(chips) -> str:
  """At every tuning point, per chip: the model's time with the previous tile rules over
  its time with the default (table) tiles."""
  pts = tune.points()
  head = f"{'op':5} {'point':44} " + " ".join(f"{c:>7}" for c in chips)
  cols = {c: tune.comparison(c) for c in chips}
  lines = [head + "   (previous rules / model's tiles, modeled time: above 1, the "
                   "model's tiles are faster)"]
  for i, p in enumerate(pts):
    ratios = " ".join(f"{cols[c][i][1] / cols[c][i][2]:7.2f}" for c in chips)
    lines.append(f"{p.op:5} {p.name:44} {ratios}")
  return "\n".join(lines)
