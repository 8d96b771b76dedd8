"""The model against latencies measured on real chips (tokamax's autotuning data).

tokamax's wheel ships, per chip, the measured time of its Pallas Mosaic TPU ragged_dot
(a megablox-style kernel) at tuned tilings: `tokamax/data/autotuning/<chip>/
pallas_mosaic_tpu_ragged_dot.json`. Each usable entry (no activation; returning the
residuals then returns the output itself, the same kernel) is one of: a grouped matmul `[m, k] x [g, k, n]`, the same
with the weights transposed (`[g, n, k]`), or the weight gradient `[m, k]^T x [m, n] ->
[g, k, n]`. The model runs, at the entry's tiling and the group sizes it was measured with
(`measured_group_sizes`), jax's megablox `gmm` / `tgmm` (the same algorithm) and tokamax's
kernel itself (its grid run by `emit_pipeline`, with its buffer counts: see
`model._tokamax_pipelines`), and each kernel time is compared with the measurement.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np

from npu_ops.perf import model

DATA_DIRS = {"v5e": "tpu_v5_lite", "tpu7x": "tpu7x"}
_DTYPES = {"bf16": jnp.bfloat16, "f32": jnp.float32, "s8": jnp.int8, "f16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class Entry:
  """One measured kernel run."""
  chip: str
  kind: str                  # "gmm", "gmm_t" (transposed weights) or "tgmm"
  lhs: tuple[int, ...]
  rhs: tuple[int, ...]
  dtype: str
  group_sizes: tuple[int, ...]
  tiling: tuple[int, int, int]
  measured_s: float
  residuals: bool = False    # the output returned twice: XLA writes a copy of it
  buffers: int = 2           # tokamax's input_buffer_count (its kernel's lhs buffers)

  @property
  def label(self) -> str:
    m = self.lhs[0]
    g = len(self.group_sizes)
    nz = sum(1 for s in self.group_sizes if s)
    if self.kind == "tgmm":
      k, n = self.lhs[1], self.rhs[1]
    else:
      k = self.lhs[1]
      n = self.rhs[1] if self.kind == "gmm_t" else self.rhs[2]
    return f"{self.kind:5} m={m:<6} k={k:<5} n={n:<5} g={g:<3} ({nz:>3} used)"


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
  dtype, dims = re.fullmatch(r"(\w+)\[([\d,]*)\]", text).groups()
  return dtype, tuple(int(d) for d in dims.split(",") if d)


def tokamax_data_dir() -> pathlib.Path:
  try:
    import tokamax  # noqa: PLC0415
  except ImportError as err:
    raise RuntimeError("the validation reads tokamax's measured latencies: "
                       "pip install tokamax (or the 'perf' extra)") from err
  return pathlib.Path(tokamax.__file__).parent / "data" / "autotuning"


def load_entries(chip: str) -> list[Entry]:
  """The usable entries of tokamax's measurements for `chip` ("v5e" or "tpu7x")."""
  path = tokamax_data_dir() / DATA_DIRS[chip] / "pallas_mosaic_tpu_ragged_dot.json"
  entries = []
  for key, runs in json.loads(path.read_text()).items():
    spec = json.loads(key)
    if spec.get("activation"):  # residuals or not: the same kernel when no activation
      continue
    dtype, lhs = _shape(spec["lhs"])
    _, rhs = _shape(spec["rhs"])
    dims = spec["ragged_dot_dimension_numbers"]
    contract = dims["dot_dimension_numbers"][0]
    if not dims["rhs_group_dimensions"]:
      kind = "tgmm"
    else:
      kind = "gmm_t" if contract[1] == [2] else "gmm"
    gs = spec["group_sizes"]
    if isinstance(gs, dict):
      gs = measured_group_sizes(gs["total_size"], gs["num_groups"])
    for config, result in runs.items():
      cfg = json.loads(config)
      entries.append(Entry(chip, kind, lhs, rhs, dtype, tuple(int(g) for g in gs),
                           (cfg["tile_m"], cfg["tile_k"], cfg["tile_n"]),
                           float(np.median(result["evaluation_times_ms"])) / 1e3,
                           bool(spec.get("return_residuals")),
                           int(cfg.get("input_buffer_count", 2))))
  return entries


def measured_group_sizes(total: int, groups: int) -> tuple[int, ...]:
  """The group sizes an entry stored as a total was measured with.

  tokamax commit c24a9b8 ("Switch ragged dot arg specs to use default group sizes",
  2026-03-18) rewrote the keys of its TPU7x entries from explicit group sizes to a total,
  keeping the measured times (every TPU7x time in the shipped file equals one measured
  under an explicit list in the file's history). Those lists came from tokamax's arg
  specs of the time: `[total, 0, ...]` for 4096 rows over 8 groups ("compute_bound"),
  an even split for Mixtral's 8192 rows over 8 ("8x7b") and for 8 rows over 8
  ("memory_bound"), and for the MaxText shapes the generator below (its code, seed 0).
  The `generate_group_sizes` that the key now implies draws different sizes: with it, the
  model is off by up to 59% on the 8-group entries, which were never run that way.
  """
  if (total, groups) == (4096, 8):
    return (total,) + (0,) * (groups - 1)
  if (total, groups) in ((8192, 8), (8, 8)):
    return (total // groups,) * groups
  rng = np.random.RandomState(0)  # np.random.seed(0) then the global draws, as tokamax did
  share = rng.uniform(size=(groups,))
  share = rng.binomial(1, 0.9, (groups,)) * share
  sizes = np.int32((share / np.sum(share)) * total)
  sizes[0] += total - np.sum(sizes)
  return tuple(map(int, sizes))


@functools.cache
def _megablox():
  return importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")


@functools.cache
def _tokamax_kernel():
  return importlib.import_module("tokamax._src.ops.ragged_dot.pallas_mosaic_tpu_kernel")


KERNELS = ("megablox", "tokamax")


def predict_entry(entry: Entry, kernel: str = "megablox") -> model.Prediction:
  """The model's prediction for `kernel` ("megablox" or "tokamax": the kernel measured) at
  the entry's shapes, tiling and groups."""
  dtype = _DTYPES[entry.dtype]
  spec = lambda shape: jax.ShapeDtypeStruct(shape, dtype)
  gs = np.asarray(entry.group_sizes, np.int32)
  if kernel == "megablox":
    mb = _megablox()
    gmm = functools.partial(mb.gmm, preferred_element_type=dtype, tiling=entry.tiling)
    tgmm = functools.partial(mb.tgmm, preferred_element_type=dtype, tiling=entry.tiling)
  elif kernel == "tokamax":
    tk = _tokamax_kernel()
    common = dict(precision=jax.lax.Precision.DEFAULT, out_dtype=dtype, tiling=entry.tiling,
                  input_buffer_count=entry.buffers)
    gmm, tgmm = functools.partial(tk.gmm, **common), functools.partial(tk.tgmm, **common)
  else:
    raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
  if entry.kind == "tgmm":
    m, k = entry.lhs
    return model.predict(lambda lhs_t, rhs, g: tgmm(lhs_t, rhs, g), spec((k, m)),
                         spec(entry.rhs), gs, chip=entry.chip)
  fn = lambda lhs, rhs, g: gmm(lhs, rhs, g, transpose_rhs=entry.kind == "gmm_t")
  return model.predict(fn, spec(entry.lhs), spec(entry.rhs), gs, chip=entry.chip)


@dataclasses.dataclass(frozen=True)
class Row:
  entry: Entry
  predicted_s: float       # megablox under the model
  tokamax_s: float = 0.0   # tokamax's kernel under the model (0: not modeled)

  @property
  def error(self) -> float:
    return self.predicted_s / self.entry.measured_s - 1

  @property
  def tokamax_error(self) -> float:
    return self.tokamax_s / self.entry.measured_s - 1


def entry_seconds(entry: Entry, kernel: str = "megablox") -> float:
  """The kernel's modeled time, plus the copy of its output when the entry returns it
  twice (as the output and as the residuals: two buffers)."""
  p = predict_entry(entry, kernel)
  copy = 0.0
  if entry.residuals:
    out = 2 * np.prod(entry.lhs[:1] + (entry.rhs[1] if entry.kind == "gmm_t" else entry.rhs[-1],)
                      ) if entry.kind != "tgmm" else 2 * len(entry.group_sizes) * entry.lhs[1] * entry.rhs[1]
    copy = 2 * float(out) / model.chips_lib.get(entry.chip).hbm_bandwidth
  return p.kernel_seconds + copy


def validate(chip: str, kernels: tuple[str, ...] = ("megablox",)) -> list[Row]:
  """Every usable entry of `chip`: measured time and the model's kernel time (megablox's,
  and tokamax's kernel's when `kernels` names it)."""
  return [Row(e, entry_seconds(e), entry_seconds(e, "tokamax") if "tokamax" in kernels else 0.0)
          for e in load_entries(chip)]


def summary(rows: list[Row], kernel: str = "megablox") -> tuple[float, float]:
  """(median |error|, max |error|) of `kernel`'s predictions."""
  errs = np.abs([r.error if kernel == "megablox" else r.tokamax_error for r in rows])
  return float(np.median(errs)), float(np.max(errs))


def format_rows(rows: list[Row]) -> str:
  """The table `python -m npu_ops.perf validate` prints (error: model / measured - 1;
  nearer 0 is better; negative: the chip ran slower than the model says)."""
  both = all(r.tokamax_s for r in rows)
  lines = [f"{'chip':6} {'case':46} {'tiles (m,k,n)':17} {'buf':>3} {'measured ms':>11} "
           f"{'megablox ms':>11} {'error':>7}" + (f" {'tokamax ms':>10} {'error':>7}" if both else "")]
  for r in rows:
    t = "/".join(map(str, r.entry.tiling))
    line = (f"{r.entry.chip:6} {r.entry.label:46} {t:17} {r.entry.buffers:3} "
            f"{r.entry.measured_s * 1e3:11.3f} {r.predicted_s * 1e3:11.3f} "
            f"{100 * r.error:+6.1f}%")
    if both:
      line += f" {r.tokamax_s * 1e3:10.3f} {100 * r.tokamax_error:+6.1f}%"
    lines.append(line)
  for kernel in ("megablox", "tokamax") if both else ("megablox",):
    med, mx = summary(rows, kernel)
    lines.append(f"{rows[0].entry.chip}: {len(rows)} entries, {kernel} under the model: "
                 f"median |error| {100 * med:.1f}%, max {100 * mx:.1f}% (goal: 15%, 35%)")
  return "\n".join(lines)
