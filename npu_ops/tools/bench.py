"""Benchmark: grouped ops vs a dense dot of the same FLOPs, and vs ragged_dot.

    python -m npu_ops.tools.bench                       # the matrix: m x e x group lists
    python -m npu_ops.tools.bench --m 4096 --e 16       # one shape, four group lists
    python -m npu_ops.tools.bench --out bench_results   # also writes JSON and a PNG plot
    python -m npu_ops.tools.bench --qat                 # training steps: QAT vs float
    python -m npu_ops.tools.bench --ep 8                # expert parallel, 8 simulated devices

For each (m, k, n, e, group list) the contenders run interleaved in one process
(machine noise hits all of them alike), each timed as the minimum of `--repeats`
calls. The ratio of an op is `dense time / op time` (1.0 = the speed of one dense
dot with the same useful FLOPs; higher is better):

* fused:        npu_grouped_matmul_swiglu_quant_v2 (A8W8), dynamic group list
* static:       the same with the group list as Python ints
* gmm:          grouped_matmul int8 -> int32, dynamic       (dense: int8 jnp.dot)
* dots:         gmm against one exact int8 dot per non-empty group, dispatched one by
                one (what any per-group XLA form pays: on CPU each dot call repacks
                its group's [k, n] weight, or runs an unpacked kernel for few rows)
* bf16, f32:    grouped_matmul bf16/f32 -> f32, dynamic      (dense: jnp.dot, same dtype)
* t-bf16, t-f32: tgmm -> f32 (the weight gradient), dynamic (dense: x^T @ dy)
* t-flr:        tgmm f32 against x^T @ dy plus writing a fresh `[e, k, n]` float32
                array (what any XLA form must do: tgmm's output is e times the dense
                one's; with few rows per group writing it dominates)
* roof:         the host's roofline over op time, for the fused op and gmm (int8) and gmm
                bf16 / f32: `max(useful ops / R, bytes of the weights the groups touch / B)`
                with R the best dense dot rate of that dtype on this host (over row counts)
                and B the read bandwidth (a reduction over 256 MB), measured once per run
                (`measure_roofline`); 1.0 = at the roofline
* ragged:       jax.lax.ragged_dot int8 + the same jnp epilogue (skipped when
                `m * e` exceeds --ragged-max, as it costs e times the work)
* tokamax:      tokamax.ragged_dot(implementation="xla") when tokamax is installed
                (the same dense form: skipped with ragged)

The peers (ragged, tokamax) run in a round of their own with the fused op, and
are reported as their time over the fused op's ("ragged": 8x = 8 times slower).

The header also gives `call`, per dtype: the time of a dot of 2 rows against one `[k, n]`
weight read from memory, i.e. what any XLA:CPU dot call costs before its rows (YNNPACK packs
the weight on every call): a group of few tokens costs at least that, however the op is
written. `cap` = roofline time / (`call` per non-empty group + useful ops / R): the best
int8 `r-*` that one dot call per group can reach on this host; `c-bf`, `c-f32` the same
for the float gmm.

`mem` is the fused op's peak memory (arguments + outputs + XLA temporaries, from
the compiled executable) over its arguments + outputs.

`--qat` times a training step (forward + gradients for x, the weights and, for
QAT, the weight scales) of the fused op's fake-quant form
(`fake_quant_gmm_swiglu_quant`) against the same step in float32
(`swiglu(grouped_matmul(x, w))`, both on the fast grouped matmul VJP).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import sys
import textwrap
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

import npu_ops
from npu_ops._src import quant
from npu_ops.tools import positive_int

GROUP_KINDS = ("uniform", "skewed", "one_group", "many_empty")


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
    raise ValueError(f"group kind: expected one of {GROUP_KINDS}, got {kind!r}")
  counts = np.floor(p * m).astype(np.int32)
  counts[np.argmax(counts)] += m - counts.sum()
  return counts


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                     min_seconds: float = 1.0) -> dict[str, float]:
  """Min wall time of each fn, calls interleaved round-robin after one warm-up each.

  Runs at least `repeats` rounds, and more (up to 50) while the rounds add up to
  less than `min_seconds`, so millisecond-scale cases get enough samples. Each
  round starts one fn later: a call right after one that freed a large output
  ran up to 10% slower (measured, tgmm at m=512, e=64), so no fn always follows
  the same one.
  """
  for f in fns.values():
    jax.block_until_ready(f())
  best = {name: float("inf") for name in fns}
  order = list(fns.items())
  rounds, spent = 0, 0.0
  while rounds < repeats or (spent < min_seconds and rounds < 50):
    shift = rounds % len(order)
    for name, f in order[shift:] + order[:shift]:
      t0 = time.perf_counter()
      jax.block_until_ready(f())
      dt = time.perf_counter() - t0
      best[name] = min(best[name], dt)
      spent += dt
    rounds += 1
  return best


def _ragged_epilogue(acc, w_scale, x_scale, counts):
  gid = jnp.repeat(jnp.arange(w_scale.shape[0]), counts, total_repeat_length=acc.shape[0])
  c = (acc.astype(jnp.float32) * w_scale[gid]) * x_scale[:, None]
  return quant.quantize_per_token(quant.swiglu(c))


def peak_memory_ratio(fn, *args) -> float:
  """(arguments + outputs + temporaries) / (arguments + outputs) of the compiled fn."""
  mem = jax.jit(fn).lower(*args).compile().memory_analysis()
  io = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
  return (io + mem.temp_size_in_bytes) / io


@dataclasses.dataclass(frozen=True)
class Roofline:
  """What this host does at best, measured once per run (`measure_roofline`).

  Attributes:
    rate: best dense dot rate, ops/s (2 per multiply-add), by operand dtype name
      ("int8", "bfloat16", "float32"): the fastest of dense dots of several row counts.
    read: read bandwidth, bytes/s (the fastest of a few reductions over 256 MB).
    call: seconds of a dot of 2 rows against one `[k, n]` weight read from memory (one
      of several whose bytes exceed the caches), by dtype name like `rate`: what every
      XLA:CPU dot call costs before its rows (YNNPACK packs the weight per call).
  """
  rate: dict[str, float]
  read: float
  call: dict[str, float]

  def time(self, dtype: str, ops: float, weight_bytes: float) -> float:
    """The roofline time of `ops` useful ops reading `weight_bytes` of weights."""
    return max(ops / self.rate[dtype], weight_bytes / self.read)

  def calls_time(self, dtype: str, ops: float, calls: int) -> float:
    """The least time of `ops` ops in `calls` dot calls (one per group) on XLA:CPU."""
    return calls * self.call[dtype] + ops / self.rate[dtype]

  def describe(self) -> str:
    per = lambda d, f: ", ".join(f"{name} {f(v)}" for name, v in d.items())
    return (f"Roofline: R = {per(self.rate, lambda v: f'{v / 1e9:.0f}')} GOP/s (best dense "
            f"dot), B = {self.read / 1e9:.1f} GB/s (read); a dot call of 2 rows: "
            f"{per(self.call, lambda v: f'{v * 1e3:.2f}')} ms.")


_ROOF_ROWS = (256, 512, 1024, 2048, 4096)


def measure_roofline(k: int, n: int, dtypes: tuple[str, ...] = ("int8",), *, repeats: int = 5,
                     read_bytes: int = 256 << 20) -> Roofline:
  """Measures R (per dtype), B and the per-call cost on this host (see `Roofline`)."""
  rng = np.random.default_rng(1)
  w8 = jnp.asarray(rng.integers(-128, 128, (k, n), dtype=np.int8))
  rate, call = {}, {}
  for name in dtypes:
    dt = jnp.dtype(name)
    acc = jnp.int32 if dt == jnp.int8 else jnp.float32
    dot = jax.jit(lambda a, b, acc=acc: jnp.dot(a, b, preferred_element_type=acc))
    w = w8.astype(dt)
    xs = {r: jnp.asarray(rng.integers(-128, 128, (r, k), dtype=np.int8)).astype(dt)
          for r in _ROOF_ROWS}
    t = time_interleaved({r: functools.partial(dot, x, w) for r, x in xs.items()}, repeats,
                         min_seconds=0.2)
    rate[name] = max(2 * r * k * n / v for r, v in t.items())
    # 2-row dots against distinct weights of 64 MB in all: a weight repeated would be read
    # from the caches (measured: half the time of one read from memory).
    count = int(np.clip(-(-(64 << 20) // (k * n * dt.itemsize)), 1, 16))
    ws = [(w8 + jnp.int8(i)).astype(dt) for i in range(count)]
    dots = jax.jit(lambda a, ws, acc=acc: [jnp.dot(a, w, preferred_element_type=acc) for w in ws])
    x2 = xs[_ROOF_ROWS[0]][:2]
    call[name] = time_interleaved({"call": lambda: dots(x2, ws)}, repeats,
                                  min_seconds=0.2)["call"] / count
    del ws
  a = jnp.ones((read_bytes,), jnp.int8)
  words = jax.lax.bitcast_convert_type(a.reshape(-1, 4), jnp.int32)
  reads = {"max8": functools.partial(jax.jit(jnp.max), a),
           "sum32": functools.partial(jax.jit(jnp.sum), words),
           "rows8": functools.partial(jax.jit(lambda v: jnp.max(v.reshape(-1, 4096), axis=0)), a)}
  read = read_bytes / min(time_interleaved(reads, repeats, min_seconds=0.2).values())
  del a, words, reads
  return Roofline(rate, read, call)


def _tokamax_ragged_dot():
  try:
    import tokamax  # noqa: PLC0415 (optional peer)
    from absl import flags  # noqa: PLC0415 (a tokamax dependency)
  except ImportError:
    return None
  # tokamax reads its absl flags on first use, parsing sys.argv when nobody has:
  # under pytest (or any CLI with its own options) that raises. Use the defaults.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  return lambda x, w, c: tokamax.ragged_dot(x, w, c, implementation="xla",
                                            preferred_element_type=jnp.int32)


def run_case(m: int, k: int, n: int, e: int, kind: str, *, repeats: int, ragged: bool,
             float_dtypes: tuple[str, ...] = ("bfloat16", "float32"),
             roof: Roofline | None = None, seed: int = 0) -> dict:
  """Times every contender on one problem; returns times (s), ratios, fractions of
  `roof` (when given) and memory."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.integers(-128, 128, (m, k), dtype=np.int8))
  w = jnp.asarray(rng.integers(-128, 128, (e, k, n), dtype=np.int8))
  w_scale = jnp.asarray(rng.uniform(0.5, 1.5, (e, n)).astype(np.float32) * 1e-5)
  x_scale = jnp.asarray(rng.uniform(0.5, 1.5, (m,)).astype(np.float32))
  counts_np = group_counts(kind, m, e, rng)
  counts = jnp.asarray(counts_np)
  static_counts = [int(c) for c in counts_np]

  def fused(x, w, ws, xs, c):
    return npu_ops.npu_grouped_matmul_swiglu_quant_v2(x, w, ws, xs, c, group_list_type=1)

  i8 = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.int32)
  jf = jax.jit(fused)
  jfs = jax.jit(lambda x, w, ws, xs: fused(x, w, ws, xs, static_counts))
  jg = jax.jit(lambda x, w, c: npu_ops.grouped_matmul(x, w, c))
  jd = jax.jit(i8)
  w0 = w[0]  # sliced once: an eager slice per call would be timed with the dense dot
  w_list = list(w)  # the per-expert form, prepared once (read in place by the XLA path)
  starts = np.cumsum(counts_np) - counts_np
  pieces = [(x[s:s + c], w[g]) for g, (s, c) in enumerate(zip(starts, counts_np)) if c]
  fns = {"dense": lambda: jd(x, w0),
         "group_dots": lambda: [jd(xg, wg) for xg, wg in pieces],
         "fused": lambda: jf(x, w, w_scale, x_scale, counts),
         "fused_static": lambda: jfs(x, w, w_scale, x_scale),
         "fused_list": lambda: jf(x, w_list, w_scale, x_scale, counts),
         "gmm": lambda: jg(x, w, counts),
         "gmm_list": lambda: jg(x, w_list, counts)}
  t = time_interleaved(fns, repeats)
  del pieces  # the weight copies go before the peers' round
  # The peers take e times the work and memory: they get their own round with the fused
  # op, as freeing their buffers slowed whatever ran next by up to 40% (m=512, e=64).
  peers = {}
  if ragged:
    jr = jax.jit(lambda x, w, ws, xs, c: _ragged_epilogue(
        jax.lax.ragged_dot(x, w, c, preferred_element_type=jnp.int32), ws, xs, c))
    peers["ragged"] = lambda: jr(x, w, w_scale, x_scale, counts)
  tok = _tokamax_ragged_dot() if ragged else None  # tokamax's "xla" is ragged_dot's dense form
  if tok is not None:
    jt = jax.jit(tok)
    peers["tokamax"] = lambda: jt(x, w, counts)
  tp = time_interleaved({"fused": fns["fused"], **peers}, repeats) if peers else {}
  del fns, peers

  row = {"m": m, "k": k, "n": n, "e": e, "groups": kind, "counts": static_counts,
         **{f"t_{name}": v for name, v in t.items()},
         **{f"ratio_{name}": t["dense"] / v for name, v in t.items() if name != "dense"},
         "ratio_gmm_dots_floor": t["group_dots"] / t["gmm"],
         **{f"t_{name}": v for name, v in tp.items() if name != "fused"},
         **{f"{name}_vs_fused": v / tp["fused"] for name, v in tp.items() if name != "fused"},
         "mem": peak_memory_ratio(fused, x, w, w_scale, x_scale, counts)}
  # The roofline counts the rows in groups and the weights of the non-empty groups.
  ops, touched = 2 * int(counts_np.sum()) * k * n, int((counts_np > 0).sum()) * k * n
  if roof is not None:
    row["t_roof"] = roof.time("int8", ops, touched)
    row.update({f"roof_{name}": row["t_roof"] / t[name]
                for name in ("fused", "fused_static", "fused_list", "gmm", "gmm_list")})
    row["cap"] = row["t_roof"] / roof.calls_time("int8", ops, int((counts_np > 0).sum()))

  for name in float_dtypes:
    dt = jnp.dtype(name)
    xf, wf = x.astype(dt), w.astype(dt)
    wf0, wf_list = wf[0], list(wf)
    dy = jnp.asarray(rng.normal(size=(m, n)), dt)
    f32 = jnp.float32
    jdf = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=f32))
    jdt = jax.jit(lambda a, b: jax.lax.dot_general(a, b, (((0,), (0,)), ((), ())),
                                                   preferred_element_type=f32))
    jgf = jax.jit(lambda a, b, c: npu_ops.grouped_matmul(a, b, c, preferred_element_type=f32))
    jtg = jax.jit(lambda a, b, c: npu_ops.tgmm(a, b, c, preferred_element_type=f32))
    # + a[0, 0]: computed from an argument, so XLA cannot fold it into a constant
    jfill = jax.jit(lambda a: jnp.zeros((e, k, n), f32) + a[0, 0].astype(f32))
    tf = time_interleaved({"dense": lambda: jdf(xf, wf0), "gmm": lambda: jgf(xf, wf, counts),
                           "gmm_list": lambda: jgf(xf, wf_list, counts),
                           "dense_t": lambda: jdt(xf, dy), "tgmm": lambda: jtg(xf, dy, counts),
                           "fill": lambda: jfill(xf)},
                          max(1, repeats // 2))
    tag = _TAGS[name]
    row.update({f"t_dense_{tag}": tf["dense"], f"t_gmm_{tag}": tf["gmm"],
                f"t_dense_t_{tag}": tf["dense_t"], f"t_tgmm_{tag}": tf["tgmm"],
                f"t_fill_{tag}": tf["fill"],
                f"t_gmm_list_{tag}": tf["gmm_list"],
                f"ratio_gmm_{tag}": tf["dense"] / tf["gmm"],
                f"ratio_gmm_list_{tag}": tf["dense"] / tf["gmm_list"],
                f"ratio_tgmm_{tag}": tf["dense_t"] / tf["tgmm"],
                f"ratio_tgmm_floor_{tag}": (tf["dense_t"] + tf["fill"]) / tf["tgmm"]})
    if roof is not None and name in roof.rate:
      row[f"t_roof_{tag}"] = roof.time(name, ops, touched * dt.itemsize)
      row[f"roof_gmm_{tag}"] = row[f"t_roof_{tag}"] / tf["gmm"]
      row[f"roof_gmm_list_{tag}"] = row[f"t_roof_{tag}"] / tf["gmm_list"]
      row[f"cap_{tag}"] = row[f"t_roof_{tag}"] / roof.calls_time(
          name, ops, int((counts_np > 0).sum()))
  return row


def run_qat_case(m: int, k: int, n: int, e: int, kind: str, *, repeats: int, seed: int = 0
                 ) -> dict:
  """Times forward and forward + backward of the QAT fused op and of its float twin."""
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(m, k)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(e, k, n)).astype(np.float32) * k ** -0.5)
  w_scale = npu_ops.weight_scale_from_amax(w)
  dy = jnp.asarray(rng.normal(size=(m, n // 2)).astype(np.float32))
  counts = jnp.asarray(group_counts(kind, m, e, rng))
  qat_fwd = lambda x, w, s: npu_ops.fake_quant_gmm_swiglu_quant(x, w, s, counts,
                                                                group_list_type=1)
  float_fwd = lambda x, w, s: quant.swiglu(npu_ops.grouped_matmul(x, w, counts))
  step = lambda fwd: jax.jit(jax.grad(lambda x, w, s: jnp.vdot(fwd(x, w, s), dy),
                                      argnums=(0, 1, 2)))
  compiled = {"qat_fwd": jax.jit(qat_fwd), "float_fwd": jax.jit(float_fwd),
              "qat_step": step(qat_fwd), "float_step": step(float_fwd)}
  t = time_interleaved({name: functools.partial(f, x, w, w_scale)
                        for name, f in compiled.items()}, repeats)
  return {"m": m, "k": k, "n": n, "e": e, "groups": kind, **{f"t_{nm}": v for nm, v in t.items()},
          "qat_fwd_over_float": t["qat_fwd"] / t["float_fwd"],
          "qat_step_over_float": t["qat_step"] / t["float_step"]}


def format_qat_row(r: dict) -> str:
  return (f"{r['m']:>6} {r['e']:>3} {r['groups']:>10} | {r['t_float_fwd'] * 1e3:9.1f} "
          f"{r['t_qat_fwd'] * 1e3:9.1f} {r['qat_fwd_over_float']:>7.2f} | "
          f"{r['t_float_step'] * 1e3:9.1f} {r['t_qat_step'] * 1e3:9.1f} "
          f"{r['qat_step_over_float']:>7.2f}")


def qat_header(k: int, n: int) -> str:
  h = (f"{'m':>6} {'e':>3} {'groups':>10} | {'float ms':>9} {'qat ms':>9} {'ratio':>7} | "
       f"{'float+bwd':>9} {'qat+bwd':>9} {'ratio':>7}")
  return (f"k={k}, n={n}; {host_kind() or 'host unknown'}\n"
          "QAT fused op vs float32 gmm + swiglu, forward | forward + backward "
          "(ratio = qat time / float time)\n" + h + "\n" + "-" * len(h))


_TAGS = {"bfloat16": "bf16", "float32": "f32"}
# (result key, column label, legend). "ratio_*": dense dot time / op time; "roof_*": roofline
# time / op time. Both: 1.0 = at that bound, higher is better.
INT8_COLUMNS = (("ratio_fused", "fused", "fused op, dynamic list"),
                ("ratio_fused_list", "list", "fused op, weights as a list of experts"),
                ("ratio_gmm", "gmm", "int8 grouped_matmul"),
                ("ratio_gmm_list", "glist", "gmm, weights as a list"),
                ("ratio_gmm_dots_floor", "dots", "gmm vs one dot per group"),
                ("roof_fused", "r-fus", "fused / roofline"),
                ("roof_fused_list", "r-lst", "list / roofline"),
                ("roof_gmm", "r-gmm", "gmm / roofline"),
                ("roof_gmm_list", "r-gl", "glist / roofline"),
                ("cap", "cap", "the best r-* of one dot call per group"))
FLOAT_COLUMNS = (("ratio_gmm_bf16", "bf16", "bf16 grouped_matmul"),
                 ("ratio_gmm_list_bf16", "bf16l", "bf16 gmm, weights as a list"),
                 ("roof_gmm_bf16", "r-bf", "bf16 / roofline"),
                 ("roof_gmm_list_bf16", "r-bfl", "bf16l / roofline"),
                 ("ratio_gmm_f32", "f32", "f32 grouped_matmul"),
                 ("ratio_gmm_list_f32", "f32l", "f32 gmm, weights as a list"),
                 ("roof_gmm_f32", "r-f32", "f32 / roofline"),
                 ("roof_gmm_list_f32", "r-f3l", "f32l / roofline"),
                 ("cap_bf16", "c-bf", "the best r-bf of one bf16 dot call per group"),
                 ("cap_f32", "c-f32", "the same for f32"),
                 ("ratio_tgmm_bf16", "t-b16", "bf16 tgmm"), ("ratio_tgmm_f32", "t-f32", "f32 tgmm"),
                 ("ratio_tgmm_floor_f32", "t-flr", "f32 tgmm vs x^T dy + writing [e, k, n]"))


def _cells(r: dict, columns) -> list[str]:
  cells = [f"{r['m']:>5} {r['e']:>3} {r['groups']:>10}"]
  # "-": not run (e.g. --float-dtypes with none)
  return cells + [f"{r[key]:>5.2f}" if key in r else f"{'-':>5}" for key, _, _ in columns]


def format_row(r: dict) -> str:
  """One line of the int8 table."""
  cells = _cells(r, INT8_COLUMNS)
  for peer in ("ragged", "tokamax"):
    if peer == "ragged" or _tokamax_ragged_dot():
      vs = r.get(f"{peer}_vs_fused")
      cells.append(f"{vs:>5.1f}x" if vs else f"{'-':>6}")
  cells.append(f"{r['mem']:>4.2f}")
  return " ".join(cells)


def format_float_row(r: dict) -> str:
  """One line of the float table."""
  return " ".join(_cells(r, FLOAT_COLUMNS))


def _column_labels(columns) -> str:
  return f"{'m':>5} {'e':>3} {'groups':>10} " + " ".join(f"{lb:>5}" for _, lb, _ in columns)


def _legend(columns) -> str:
  return "; ".join(f"{label} = {text}" for _, label, text in columns) + "."


# CPU features that decide the int8 dot's speed on XLA:CPU, in the order they matter.
_CPU_FEATURES = (("amx_int8", "AMX-INT8"), ("avx512_vnni", "AVX-512 VNNI"),
                 ("avx_vnni", "AVX-VNNI"), ("avx512f", "AVX-512"), ("avx2", "AVX2"))


def host_kind() -> str:
  """The CPU model and its int8-relevant features (Linux /proc/cpuinfo), so figures from
  different hosts can be told apart; "" where unknown."""
  try:
    info = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    return ""
  field = lambda key: next((line.split(":", 1)[1].strip() for line in info.splitlines()
                            if line.startswith(key)), "")
  flags = set(field("flags").split())
  features = [label for flag, label in _CPU_FEATURES if flag in flags]
  return f"{field('model name')} ({', '.join(features) or 'no AVX2'})"


def header(k: int, n: int, roof: Roofline | None = None) -> str:
  """The int8 table's title, legend and column labels."""
  h = (_column_labels(INT8_COLUMNS) + f" {'ragged':>6}"
       + (f" {'tokam':>6}" if _tokamax_ragged_dot() else "") + f" {'mem':>4}")
  notes = ["fused..dots: dense int8 dot time / op time (1.0 = the speed "
           "of a dense dot of equal FLOPs); r-*: roofline time / op time, the roofline being "
           "max(ops / R, bytes of the weights the groups touch / B); higher is better. "
           + _legend(INT8_COLUMNS),
           "ragged (tokam = tokamax): their time / the fused op's (higher: we are faster). mem: the "
           "fused op's peak memory / (inputs + outputs), lower is better. Times: bench.json."]
  host = host_kind()
  return (f"k={k}, n={n}; jax {jax.__version__} on {jax.devices()[0].device_kind}"
          + (f", {host}" if host else "") + ".\n"
          + (textwrap.fill(roof.describe(), 98) + "\n" if roof else "")
          + "\n".join(textwrap.fill(t, 98) for t in notes) + "\n" + h + "\n" + "-" * len(h))


def float_header() -> str:
  """The float table's legend and column labels."""
  h = _column_labels(FLOAT_COLUMNS)
  note = ("Float paths (training): bf16, f32: dense dot time / op time (same dtype); r-*: "
          "roofline time / op time; t-*: tgmm vs the dense x^T @ dy. " + _legend(FLOAT_COLUMNS))
  return textwrap.fill(note, 98) + "\n" + h + "\n" + "-" * len(h)


def plot(rows: list[dict], path: pathlib.Path) -> bool:
  try:
    import matplotlib  # noqa: PLC0415 (optional extra)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
  except ImportError:
    return False
  fig, ax = plt.subplots(figsize=(max(8, len(rows) * 0.35), 4.5))
  xs = np.arange(len(rows))
  for key, label, _ in INT8_COLUMNS + FLOAT_COLUMNS:
    ax.plot(xs, [r.get(key, np.nan) for r in rows], "o-" if key.startswith("ratio") else "s--",
            label=label, ms=4)
  ax.axhline(1.0, color="gray", lw=0.8)
  # The CPU goals: fused op and gmm at 0.9 of a dense dot at m=4096, e <= 16, and at 0.7 of
  # the roofline everywhere (see docs/performance.md).
  ax.axhline(0.9, color="red", lw=0.8, ls="--", label="goal: 0.9 of a dense dot")
  ax.axhline(0.7, color="purple", lw=0.8, ls=":", label="goal: 0.7 of the roofline")
  ax.set_xticks(xs, [f"m={r['m']} e={r['e']} {r['groups']}" for r in rows], rotation=75,
                fontsize=7)
  ax.set_ylabel("dense (roofline) time / op time")
  ax.set_title(f"npu_ops grouped ops vs a dense dot of equal FLOPs (k={rows[0]['k']}, "
               f"n={rows[0]['n']})")
  ax.legend(fontsize=7, ncol=3)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def main(argv=None):
  p = argparse.ArgumentParser(
      prog="python -m npu_ops.tools.bench", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--m", type=positive_int, nargs="+", default=[512, 4096, 16384],
                 help="token rows (default: %(default)s)")
  p.add_argument("--k", type=positive_int, default=2048, help="contraction dim (default: %(default)s)")
  p.add_argument("--n", type=positive_int, default=2816,
                 help="output columns before SwiGLU halves them (default: %(default)s)")
  p.add_argument("--e", type=positive_int, nargs="+", default=[8, 16, 64],
                 help="experts (default: %(default)s)")
  p.add_argument("--groups", nargs="+", default=list(GROUP_KINDS), choices=GROUP_KINDS,
                 help="group lists: rows spread evenly, skewed (Dirichlet(0.5) shares), all "
                      "in one group, or 1 in 8 groups non-empty (default: all four)")
  p.add_argument("--repeats", type=positive_int, default=5,
                 help="timed calls per contender; the minimum counts (default: %(default)s)")
  p.add_argument("--ragged-max", type=int, default=4096 * 16,
                 help="run the ragged_dot baseline only where m * e <= this (it costs e "
                      "times the work on CPU; default: %(default)s)")
  p.add_argument("--float-dtypes", nargs="*", default=["bfloat16", "float32"],
                 choices=sorted(_TAGS),
                 help="float gmm/tgmm columns; none to skip (default: %(default)s)")
  p.add_argument("--qat", action="store_true",
                 help="time QAT training steps against float ones instead")
  p.add_argument("--out", help="folder for bench.json and bench.png (default: print only)")
  p.add_argument("--ep", type=positive_int, metavar="D",
                 help="instead: the MoE layer with its experts over D simulated CPU devices "
                      "vs one device, and the bytes exchanged (npu_ops.tools.bench_ep)")
  p.add_argument("--ep-tokens", type=positive_int, default=4096,
                 help="tokens per step with --ep (default: %(default)s)")
  p.add_argument("--ep-modes", nargs="+", default=["int8", "float"],
                 choices=["int8", "float", "qat"],
                 help="with --ep: int8 forward, float or qat train steps (default: %(default)s)")
  p.add_argument("--ep-shape", type=positive_int, nargs=3, default=[1024, 1408, 16],
                 metavar=("D_MODEL", "D_FF", "EXPERTS"),
                 help="with --ep: the layer's shape (default: %(default)s)")
  p.add_argument("--ep-capacity-factor", type=float,
                 help="with --ep: the sharded layer's capacity_factor (default: none, no "
                      "token dropped)")
  p.add_argument("--ep-aot", action=argparse.BooleanOptionalAction, default=True,
                 help="with --ep: also compile for TPU/GPU chips when the compilers are "
                      "installed (default: %(default)s)")
  args = p.parse_args(argv)
  if args.ep is not None:  # before anything starts JAX's CPU backend with one device
    from npu_ops.tools import bench_ep  # noqa: PLC0415
    return bench_ep.report(args)

  cases = [(m, e, g) for m in args.m for e in args.e for g in args.groups]
  roof = None
  if args.qat:
    print(qat_header(args.k, args.n), flush=True)
  else:
    roof = measure_roofline(args.k, args.n, ("int8",) + tuple(args.float_dtypes))
    print(header(args.k, args.n, roof), flush=True)
  rows = []
  for i, (m, e, kind) in enumerate(cases):
    progress = sys.stderr.isatty()  # never mixed into a piped or redirected table
    if progress:
      print(f"\r[{i + 1}/{len(cases)}] m={m} e={e} {kind} ...", end="", file=sys.stderr,
            flush=True)
    if args.qat:
      rows.append(run_qat_case(m, args.k, args.n, e, kind, repeats=args.repeats))
    else:
      rows.append(run_case(m, args.k, args.n, e, kind, repeats=args.repeats,
                           ragged=m * e <= args.ragged_max,
                           float_dtypes=tuple(args.float_dtypes), roof=roof))
      rows[-1]["roofline"] = dataclasses.asdict(roof)
    rows[-1]["host"] = host_kind()  # figures from different host kinds stay apart
    if progress:
      print("\r" + " " * 60 + "\r", end="", file=sys.stderr)
    print((format_qat_row if args.qat else format_row)(rows[-1]), flush=True)
  if not args.qat:
    static = [r["t_fused_static"] / r["t_fused"] for r in rows]
    print(f"The fused op with a static list took {min(static):.2f}-{max(static):.2f}x the time "
          "of the dynamic list.", flush=True)
  if not args.qat and args.float_dtypes:
    print("\n" + float_header() + "\n" + "\n".join(map(format_float_row, rows)), flush=True)
  if args.out and args.qat:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_qat.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out / 'bench_qat.json'}")
  elif args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(rows, indent=1))
    print(f"wrote {out / 'bench.json'}" + (f" and {out / 'bench.png'}"
                                           if plot(rows, out / "bench.png") else
                                           " (install matplotlib for the plot)"))
  return rows


if __name__ == "__main__":
  main()
