"""The TPU kernels' default tiles, chosen by the model: `python -m npu_ops.perf tune`.

At each tuning point (an op at a shape and routing: our decode and prefill cases, and
the shapes tokamax measured on v5e) and on each chip, every tile candidate (`candidates`)
is run through the model (`model.predict`, explicit `tiles=`) and the fastest wins (ties:
the first, candidates in a fixed order, so the search is deterministic). `--write`
stores the winners in `pallas_kernels/tpu_tiles.py` (`TABLE`), which the kernels read
at trace time: a problem takes the entry nearest to its (k, n, rows per group).
"""

from __future__ import annotations

import dataclasses
import pathlib
import pprint

import jax
import jax.numpy as jnp
import numpy as np

import npu_ops
from npu_ops.perf import cases as cases_lib
from npu_ops.perf import model
from pallas_kernels import common
from pallas_kernels import tpu
from pallas_kernels import tpu_tiles

CHIPS = ("v5e", "v6e", "v5p", "tpu7x")
KERNEL_OPS = {"gmm": "gmm bf16", "tgmm": "tgmm bf16", "fused": "fused A8W8"}
# The kernels' operand dtypes tuned: (op, dtype) -> the model's op (`npu_ops.perf.cases`)
TUNED = {("gmm", "bfloat16"): "gmm bf16", ("tgmm", "bfloat16"): "tgmm bf16",
         ("fused", "int8"): "fused A8W8", ("gmm", "int8"): "gmm int8"}


@dataclasses.dataclass(frozen=True)
class Point:
  """An op (`gmm`, `tgmm`, `fused`) on `dtype` operands at `m` rows of `[k, n]` over `e`
  experts, routed by `sizes` (int32 group sizes)."""
  op: str
  m: int
  k: int
  n: int
  e: int
  sizes: tuple[int, ...]
  name: str = ""  # where the point comes from (a case's name, or tokamax's data)
  dtype: str = "bfloat16"

  @property
  def itemsize(self) -> int:
    return np.dtype(self.dtype).itemsize

  @property
  def out_itemsize(self) -> int:  # the kernels' result: int32 of int8 (gmm), else bf16
    return 4 if self.dtype == "int8" and self.op != "fused" else 2

  @property
  def key(self) -> tuple[int, int, int]:
    """What the table is looked up by: (k, n, rows per group)."""
    return self.k, self.n, max(1, self.m // self.e)


def _case_point(op: str, dtype: str, case: cases_lib.Case) -> Point:
  return Point(op, case.m, cases_lib.K, cases_lib.N, case.e, tuple(int(s) for s in case.sizes()),
               case.name, dtype)


def _tokamax_points() -> list[Point]:
  """The shapes (and group sizes) of tokamax's measured v5e entries, once each."""
  from npu_ops.perf import validate  # noqa: PLC0415 (needs tokamax)
  seen, points = set(), []
  for entry in validate.load_entries("v5e"):
    m, k = entry.lhs
    if entry.kind == "tgmm":
      op, n = "tgmm", entry.rhs[1]
    else:
      op, n = "gmm", entry.rhs[1] if entry.kind == "gmm_t" else entry.rhs[2]
    p = Point(op, m, k, n, len(entry.group_sizes), entry.group_sizes,
              f"tokamax v5e m={m} k={k} n={n} g={len(entry.group_sizes)}")
    if (p.op, p.key) not in seen:
      seen.add((p.op, p.key))
      points.append(p)
  return points


def points(include_tokamax: bool = True) -> list[Point]:
  """Every tuning point: our decode and prefill cases per op, then tokamax's v5e shapes
  (bf16 gmm / tgmm) when tokamax is installed."""
  ours = [_case_point(op, dtype, c) for op, dtype in TUNED
          for c in cases_lib.DECODE + cases_lib.PREFILL
          if not (op == "tgmm" and c.routing == "random")]  # tgmm: training (prefill) shapes
  if not include_tokamax:
    return ours
  try:
    return ours + _tokamax_points()
  except RuntimeError:  # no tokamax
    return ours


def candidates(p: Point) -> list[common.TileSizes]:
  """The tiles searched at `p`, in a fixed order. Rows: 32 up to twice the rows per group
  (at least 64, at most 512). Fused: rows only (k is resident, a row is computed whole).
  gmm / tgmm: k whole, else (when no whole-k tile fits) 512 / 1024 / 2048; columns split
  evenly into 1-8 tiles; only tiles within the kernels' VMEM plan."""
  tokens = max(1, p.m // p.e)
  cap = min(512, max(64, 2 * common._pow2_at_least(tokens)), common.round_up(p.m, 32))  # noqa: SLF001
  rows = [b for b in (32, 64, 128, 256, 512) if b <= cap]
  if p.op == "fused":
    return [common.TileSizes(bm, 512, 256) for bm in rows]
  kr, nr = common.round_up(p.k, 128), common.round_up(p.n, 128)
  vmem = lambda bm, bk, bn: tpu._float_vmem(p.op, bm, bk, bn, p.itemsize, p.out_itemsize)  # noqa: SLF001
  fits = vmem(32, kr, 128) <= tpu._VMEM_PLAN  # noqa: SLF001
  ks = [kr] if fits else [b for b in (2048, 1024, 512) if b < kr]
  ns = sorted({common.round_up(common.cdiv(p.n, c), 128) for c in range(1, 9)}, reverse=True)
  out = []
  for bm in rows:
    for bk in ks:
      for bn in ns:
        if vmem(bm, bk, min(bn, nr)) <= tpu._VMEM_PLAN:  # noqa: SLF001
          out.append(common.TileSizes(bm, bk, bn))
  return out


def _program(p: Point, tiles: common.TileSizes | None):
  """(fn, args) of `p`'s op with `tiles` (None: the defaults), for `model.predict`."""
  s = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype)
  sizes = np.asarray(p.sizes, np.int32)
  bf = jnp.dtype(p.dtype)
  if p.op == "gmm":
    return (lambda x, w, g: npu_ops.grouped_matmul(x, w, g, tiles=tiles),
            (s((p.m, p.k), bf), s((p.e, p.k, p.n), bf), sizes))
  if p.op == "tgmm":
    return (lambda x, dy, g: npu_ops.tgmm(x, dy, g, num_groups=p.e, tiles=tiles),
            (s((p.m, p.k), bf), s((p.m, p.n), bf), sizes))
  return (lambda x, w, ws, xs, g: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w, ws, xs, g, group_list_type=1, tiles=tiles),
          (s((p.m, p.k), jnp.int8), s((p.e, p.k, p.n), jnp.int8), s((p.e, p.n), jnp.float32),
           s((p.m,), jnp.float32), sizes))


def seconds(p: Point, tiles: common.TileSizes | None, chip: str) -> float:
  """The model's time for `p` with `tiles` (None: the kernels' defaults) on `chip`."""
  fn, args = _program(p, tiles)
  return model.predict(fn, *args, chip=chip).seconds


def best(group: list[Point], chip: str) -> tuple[common.TileSizes, float]:
  """The candidate fastest over `group` (points of one op and table key, e.g. uniform and
  Zipf routing of one shape: each point's time relative to its own best, summed), and
  that sum over len(group) (1.0: the best at every point)."""
  cands = candidates(group[0])
  times = np.array([[seconds(p, t, chip) for t in cands] for p in group])
  score = (times / times.min(axis=1, keepdims=True)).sum(axis=0)
  i = int(np.argmin(score))  # the first of equals: candidates are in a fixed order
  return cands[i], float(score[i]) / len(group)


def groups(include_tokamax: bool = True) -> list[list[Point]]:
  """The tuning points grouped by op and table key, in order of first appearance."""
  out: dict = {}
  for p in points(include_tokamax):
    out.setdefault((p.op, p.dtype, p.key), []).append(p)
  return list(out.values())


def table(chips=CHIPS, include_tokamax: bool = True, log=None, ops=None) -> dict:
  """`tpu_tiles.TABLE` as the search finds it (`ops`: only these ops' entries)."""
  out: dict = {}
  for chip in chips:
    for group in groups(include_tokamax):
      if ops is not None and group[0].op not in ops:
        continue
      t, score = best(group, chip)
      p = group[0]
      out.setdefault((chip, p.op, p.itemsize), []).append(
          (*p.key, t.block_m, t.block_k, t.block_n))
      if log:
        log(f"{chip:6} {p.op:5} {p.dtype:8} k={p.k:<5} n={p.n:<5} m={p.m:<6} e={p.e:<4} "
            f"({len(group)} routing) -> {t.block_m}x{t.block_k}x{t.block_n} ({score:.3f})")
  return {key: tuple(rows) for key, rows in out.items()}


def write(new_table: dict, path: pathlib.Path | None = None) -> pathlib.Path:
  """Replaces the `TABLE = ...` of `pallas_kernels/tpu_tiles.py` with `new_table`."""
  path = path or pathlib.Path(tpu_tiles.__file__)
  text = path.read_text()
  head = text[:text.index("TABLE: dict[")]
  body = pprint.pformat(new_table, width=100, compact=True, sort_dicts=True)
  path.write_text(head + "TABLE: dict[tuple[str, str, int], tuple[tuple[int, int, int, int, "
                  "int, int], ...]] = " + body + "\n")
  return path


def comparison(chip: str, include_tokamax: bool = True) -> list[tuple[Point, float, float]]:
  """At every point: the model's time with the previous rules (no table) and with the
  table's tiles."""
  rows = []
  for p in points(include_tokamax):
    with _no_table():
      before = seconds(p, None, chip)
    rows.append((p, before, seconds(p, None, chip)))
  return rows


class _no_table:  # noqa: N801 (a context manager, used as a statement)
  """The kernels' previous rules: the table hidden while inside."""

  def __enter__(self):
    self.saved = dict(tpu_tiles.TABLE)
    tpu_tiles.TABLE.clear()

  def __exit__(self, *exc):
    tpu_tiles.TABLE.update(self.saved)
