"""A model of how the Pallas TPU pipeline runs a program's kernels, step by step.

`predict(fn, *args, chip="v5e")` traces `fn` (large operands as `jax.ShapeDtypeStruct`,
the values that steer the kernels, such as group sizes, as concrete arrays), evaluates
every XLA op whose inputs are all known (the kernels' metadata: group ids, row-tile ids,
counts), and follows each `pallas_call` through its grid:

* the grid, dynamic grid dimensions included (from their now concrete operands);
* every BlockSpec's index map, evaluated for all grid steps at once (NumPy, vectorized
  over steps) with the concrete scalar-prefetch operands;
* an input block is copied from HBM when its block index differs from the previous
  step's (Pallas' TPU pipeline skips the copy otherwise); an output block is written
  back when its index is about to change, and after the last step;
* block bytes are the in-bounds part of the block, its last two dims padded to the
  chip's (sublane, 128-lane) tile;
* per step, the kernel body's work: MXU FLOPs of its `dot_general`s and VPU element
  operations, counted only on the steps whose `pl.when` / `lax.cond` branch runs (the
  predicate is evaluated per step where it depends on program ids and scalar-prefetch
  values; otherwise the costliest branch);
* copies the body makes by hand (`pltpu.make_async_copy` of an operand left in HBM, under
  `pl.when` on program ids and scalar-prefetch values, in loops of at most 4096 trips that
  those values bound, not in loops bounded by data): each start
  copies its destination's bytes when the body reaches it, each wait holds the body until
  the oldest copy on its semaphore has arrived;
* time: a timeline of the steps and one DMA queue (`_timeline`) that serves copies in the
  order they are issued: a block is issued one step ahead (further with `pl.Buffered(n)`,
  or as soon as a buffer frees with its lookahead), a step computes once its blocks have
  arrived and the step before is done, for its work plus a fixed overhead (the one fitted
  constant, `STEP_OVERHEAD_S`);
* dimension semantics: on a chip whose device drives two TensorCores (v5p), the steps
  of the outermost "parallel" grid axis are split between the cores, which share the
  HBM bandwidth.

A kernel on known operands with small results (metadata computed on the scalar unit,
`pallas_kernels.tpu_visits`) is also run, in interpret mode, so the kernels it feeds are
followed as those fed by XLA ops.

Ops outside the kernels whose inputs are not all known (the data path's XLA ops) are
costed by a roofline: `max(FLOPs / peak, bytes in + out / HBM bandwidth)` each. Around the
kernels, a `scan` or `fori_loop` counts every trip (walked step by step while known values
change, e.g. a scan over layers; the rest at one step's cost), a `while_loop` whose
condition depends on data one trip (a lower bound), a `cond` the branch its known index
takes, else its costliest branch.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
from jax._src import core as jax_core
from jax._src import tree_util
from jax._src.interpreters import partial_eval as pe
from jax._src.pallas import core as pallas_core
from jax._src.state import indexing
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from npu_ops.perf import chips as chips_lib
from pallas_kernels import tpu
from pallas_kernels import tpu_tiles

# Fixed cost of one grid step (pipeline bookkeeping, DMA issue and wait, scalar work),
# fitted on tokamax's measured v5e latencies only (`python -m npu_ops.perf validate`),
# then used unchanged on every chip.
STEP_OVERHEAD_S = 0.45e-6

_UNKNOWN = object()  # a value the model does not know (data, not metadata)
# Steps of a loop around kernels walked one by one; the rest cost what one step costs.
_WALKED_STEPS = 1024
# An op of known values this large (inputs and outputs) computes data passed concretely, not
# the kernels' metadata (a few thousand int32 at most): costed as the chip would run it.
_DATA_BYTES = 2**20


@dataclasses.dataclass(frozen=True)
class _Semaphores:
  """The value of a kernel's semaphore operand: which of them it is, wherever it is passed
  (into a `pl.when`'s branch or a loop), so that a wait finds the copies it waits for."""
  number: int


@dataclasses.dataclass(frozen=True)
class KernelCost:
  """One `pallas_call` under the model.

  Attributes:
    name: the kernel's name.
    grid: the grid, dynamic dimensions resolved.
    seconds: modeled time.
    hbm_bytes: bytes the pipeline copies in and writes back.
    flops: MXU FLOPs the steps run (whole blocks: padding rows included).
    grid_steps: steps run (all of them, by every core together).
    compute_seconds, dma_seconds: the sums of the two per-step terms (before overlap).
    cores: TensorCores the steps were split over.
    mxu_seconds, vpu_seconds: the sums of the MXU and the vector units' time per step, of
      which a step's compute is the larger plus the step overhead: which unit bounds it.
  """
  name: str
  grid: tuple[int, ...]
  seconds: float
  hbm_bytes: float
  flops: float
  grid_steps: int
  compute_seconds: float
  dma_seconds: float
  cores: int
  mxu_seconds: float = 0.0
  vpu_seconds: float = 0.0


@dataclasses.dataclass(frozen=True)
class Prediction:
  """What `predict` returns: totals over the program, and each kernel.

  `seconds` = the kernels' time + the XLA ops' roofline time (`xla_seconds`);
  `hbm_bytes` and `flops` likewise add the kernels' and the XLA ops'.
  """
  chip: str
  seconds: float
  hbm_bytes: float
  flops: float
  grid_steps: int
  kernels: tuple[KernelCost, ...]
  xla_seconds: float
  xla_bytes: float
  xla_flops: float
  xla_ops: tuple[tuple[str, str, float], ...] = ()  # (primitive, output type, seconds)

  @property
  def kernel_seconds(self) -> float:
    return sum(k.seconds for k in self.kernels)


def predict(fn: Callable[..., Any], *args, chip: str | chips_lib.Chip = "v5e",
            **kwargs) -> Prediction:
  """Models `fn(*args, **kwargs)` on a TPU `chip` ("v5e", "v6e", "v5p", "tpu7x").

  Args:
    fn: any function whose TPU lowering holds Pallas TPU kernels: npu_ops' ops under
      `implementation=None` (their TPU branch is taken), megablox's `gmm`, ...
    args: `jax.ShapeDtypeStruct` for large operands (nothing is allocated) and concrete
      arrays (NumPy or jax) for the values that steer the kernels (group sizes, offsets).
      The ops on concrete values are evaluated; those of a MiB or more (data passed
      concretely) are costed too.
    chip: a name of `npu_ops.perf.chips.CHIPS` or a `Chip`.

  Raises:
    ValueError: a kernel's grid or scalar-prefetch operand depends on an unknown value
      (pass it concretely), a kernel copies by hand where the model cannot follow (in a
      loop bounded by data or of over 4096 trips, or on a condition on data), or the chip
      is unknown.
  """
  if not callable(fn):
    raise TypeError(f"fn: expected a callable (fn(*args) is what is predicted), got {fn!r}")
  if not isinstance(chip, (chips_lib.Chip, str, type(None))):  # None: the ValueError below
    raise TypeError(f"chip: expected a TPU's name ({', '.join(chips_lib.TPUS)}) or a Chip, "
                    f"got {chip!r}")
  if not isinstance(chip, chips_lib.Chip) and chip not in chips_lib.CHIPS:
    raise ValueError(f"chip: expected a TPU ({', '.join(chips_lib.TPUS)}), got {chip!r}")
  chip = chips_lib.get(chip)
  if not chip.vpu_rate:  # the GPU entries carry no TPU pipeline constants
    raise ValueError(f"chip: expected a TPU ({', '.join(chips_lib.TPUS)}), got {chip.name!r} "
                     "(the model follows Pallas TPU pipelines)")
  leaves, tree = jax.tree.flatten((args, kwargs))
  known = [None if isinstance(a, jax.ShapeDtypeStruct) else np.asarray(a) for a in leaves]
  specs = [a if isinstance(a, jax.ShapeDtypeStruct) else jax.ShapeDtypeStruct(
      np.shape(a), np.asarray(a).dtype) for a in leaves]

  def flat_fn(*flat):
    a, kw = jax.tree.unflatten(tree, flat)
    return fn(*a, **kw)

  token = tpu_tiles.CHIP.set(chip.name)  # the kernels' default tiles: this chip's
  try:
    with _tokamax_pipelines():
      closed = jax.make_jaxpr(flat_fn)(*specs)
    acc = _Accumulator(chip)
    _walk(closed.jaxpr, [np.asarray(c) if _is_array(c) else c for c in closed.consts],
          [_UNKNOWN if k is None else k for k in known], acc)
  finally:
    tpu_tiles.CHIP.reset(token)
  kernels = tuple(acc.kernels)
  return Prediction(
      chip=chip.name,
      seconds=sum(k.seconds for k in kernels) + acc.xla_seconds,
      hbm_bytes=sum(k.hbm_bytes for k in kernels) + acc.xla_bytes,
      flops=sum(k.flops for k in kernels) + acc.xla_flops,
      grid_steps=sum(k.grid_steps for k in kernels), kernels=kernels,
      xla_seconds=acc.xla_seconds, xla_bytes=acc.xla_bytes, xla_flops=acc.xla_flops,
      xla_ops=tuple(acc.xla_ops))


@contextlib.contextmanager
def _tokamax_pipelines():
  """tokamax's TPU kernels, as the pipeline they stand for.

  tokamax runs a kernel's grid through `pltpu.emit_pipeline` inside one pallas_call without
  a grid (`tokamax._src.mosaic_tpu.custom_buffered_pallas_call`), which traces only on a
  TPU. While `predict` traces, that helper builds the gridded pallas_call its pipeline
  runs: the same grid, BlockSpecs, scalar-prefetch operands and body, an input with
  n > 2 buffers as `pl.Buffered(n, use_lookahead=True)` (what the helper gives
  emit_pipeline), and no axis split over cores (its outer call has no grid to split).
  Nothing changes when tokamax is not imported.
  """
  module = sys.modules.get("tokamax._src.mosaic_tpu")
  original = getattr(module, "custom_buffered_pallas_call", None)
  if original is None:
    yield
    return
  module.custom_buffered_pallas_call = _gridded_pallas_call
  try:
    yield
  finally:
    module.custom_buffered_pallas_call = original


def _gridded_pallas_call(kernel, out_shape, grid_spec, compiler_params,
                         input_buffer_count=None, **kwargs):
  in_specs = list(grid_spec.in_specs)
  for i, count in enumerate(input_buffer_count or ()):
    if count != 2:
      in_specs[i] = dataclasses.replace(
          in_specs[i], pipeline_mode=pl.Buffered(buffer_count=count, use_lookahead=True))
  spec = pltpu.PrefetchScalarGridSpec(
      num_scalar_prefetch=grid_spec.num_scalar_prefetch, grid=grid_spec.grid,
      in_specs=in_specs, out_specs=grid_spec.out_specs,
      scratch_shapes=grid_spec.scratch_shapes)
  params = dataclasses.replace(
      compiler_params, dimension_semantics=("arbitrary",) * len(grid_spec.grid))
  return pl.pallas_call(kernel, out_shape, grid_spec=spec, compiler_params=params, **kwargs)


# --- the program around the kernels -------------------------------------------------------

@dataclasses.dataclass
class _Accumulator:
  chip: chips_lib.Chip
  kernels: list = dataclasses.field(default_factory=list)
  xla_seconds: float = 0.0
  xla_bytes: float = 0.0
  xla_flops: float = 0.0
  xla_ops: list = dataclasses.field(default_factory=list)

  def add(self, other: "_Accumulator", times: int = 1) -> None:
    """Counts `other`'s program `times` times."""
    self.kernels.extend(other.kernels * times)
    self.xla_seconds += times * other.xla_seconds
    self.xla_bytes += times * other.xla_bytes
    self.xla_flops += times * other.xla_flops
    self.xla_ops.extend((op, out, times * sec) for op, out, sec in other.xla_ops)

  @property
  def seconds(self) -> float:
    return sum(k.seconds for k in self.kernels) + self.xla_seconds


def _is_array(x) -> bool:
  return isinstance(x, (np.ndarray, np.generic, jax.Array))


def _sub_jaxpr(params: dict) -> tuple[Any, list] | None:
  """The jaxpr a call-like equation runs (pjit, closed_call, custom_jvp/vjp, remat)."""
  for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
    j = params.get(key)
    if isinstance(j, jax_core.ClosedJaxpr):
      return j.jaxpr, list(j.consts)
    if isinstance(j, jax_core.Jaxpr):
      return j, []
  return None


_FREE = {"reshape", "squeeze", "expand_dims", "bitcast_convert_type", "copy_p", "pjit",
         "closed_call", "platform_index", "optimization_barrier"}


def _walk(jaxpr, consts: Sequence[Any], args: Sequence[Any], acc: _Accumulator) -> list:
  # What XLA would remove (e.g. a traced `w[0].shape`) costs nothing: dead code first.
  n_out = len(jaxpr.outvars)
  full = pe.convert_constvars_jaxpr(jaxpr) if jaxpr.constvars else jaxpr
  live, used = pe.dce_jaxpr(full, [True] * n_out, instantiate=True)
  args = [a for a, u in zip([*consts, *args], used) if u]
  return _walk_live(live, args, acc)


def _walk_live(jaxpr, args: Sequence[Any], acc: _Accumulator) -> list:
  env: dict = {}

  def read(v):
    if isinstance(v, jax_core.Literal):
      return np.asarray(v.val)
    return env.get(v, _UNKNOWN)

  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for eqn in jaxpr.eqns:
    vals = [read(v) for v in eqn.invars]
    name = eqn.primitive.name
    known = all(x is not _UNKNOWN for x in vals)
    if name == "pallas_call":
      acc.kernels.append(_simulate(eqn, vals, acc.chip))
      outs = _run_metadata_kernel(eqn, vals) if known else [_UNKNOWN] * len(eqn.outvars)
    elif name == "npu_ops_platform_select":
      branch = dict(eqn.params["branches"]).get("tpu", eqn.params["default"])
      avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
      closed = jax.make_jaxpr(branch)(*avals)
      outs = _walk(closed.jaxpr, closed.consts, vals, acc)
    elif name.startswith("npu_ops_") and getattr(eqn.primitive, "expansion", None):
      # npu_ops' own primitives (grouped matmul, tgmm) lower through their expansion
      avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars]
      impl, params = eqn.primitive.expansion, eqn.params
      closed = jax.make_jaxpr(lambda *a: impl(*a, **params))(*avals)
      outs = _walk(closed.jaxpr, closed.consts, vals, acc)
      outs = outs if eqn.primitive.multiple_results else outs[:1]
    elif name != "scan" and (sub := _sub_jaxpr(eqn.params)) is not None:
      inner, inner_consts = sub  # a call: its known ops are evaluated, its kernels followed
      n_extra = len(eqn.invars) - len(inner.invars)  # e.g. custom_vjp's leading consts
      outs = _walk(inner, inner_consts, vals[max(n_extra, 0):], acc)
      outs = outs[:len(eqn.outvars)] + [_UNKNOWN] * (len(eqn.outvars) - len(outs))
    elif name in _CONTROL and (not known or name == "scan" or _holds_kernel(eqn)):
      outs = _CONTROL[name](eqn, vals, acc)
    elif known:
      outs = _evaluate(eqn, vals)
      if sum(_nbytes(v.aval) for v in (*eqn.invars, *eqn.outvars)) >= _DATA_BYTES:
        _xla_cost(eqn, acc)  # concrete data, not metadata: it runs on the chip all the same
    else:
      _xla_cost(eqn, acc)
      outs = [_UNKNOWN] * len(eqn.outvars)
    for v, o in zip(eqn.outvars, outs):
      env[v] = o
  return [read(v) for v in jaxpr.outvars]


def _run_metadata_kernel(eqn, vals) -> list:
  """The results of a kernel on known operands that computes metadata (another kernel's
  scalar-prefetch operands, as `pallas_kernels.tpu_visits` does): run in interpret mode
  here. A kernel over data (a MiB or more in or out) stays unknown."""
  if sum(_nbytes(v.aval) for v in (*eqn.invars, *eqn.outvars)) >= _DATA_BYTES:
    return [_UNKNOWN] * len(eqn.outvars)
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    outs = eqn.primitive.bind(*map(jnp.asarray, vals), **{**eqn.params, "interpret": True})
  return [np.asarray(o) for o in outs]


def _holds_kernel(eqn) -> bool:
  """Whether `eqn` runs a kernel: a pallas_call, one of npu_ops' primitives (their kernels
  sit behind an expansion or a platform choice), or a sub-program holding one."""
  name = eqn.primitive.name
  if name == "pallas_call" or name.startswith("npu_ops_"):
    return True
  return any(_holds_kernel(e) for j in _branches(eqn.params) for e in j.jaxpr.eqns) or (
      (sub := _sub_jaxpr(eqn.params)) is not None and any(_holds_kernel(e) for e in sub[0].eqns))


def _repeat(jaxpr, consts, args, acc: _Accumulator, times: int) -> None:
  """`times` runs of a program whose known inputs do not change between runs: walked once,
  its cost counted `times` times."""
  once = _Accumulator(acc.chip)
  _walk(jaxpr, consts, args, once)
  acc.add(once, times)


def _scan(eqn, vals: list, acc: _Accumulator) -> list:
  """A scan, step by step: its body walked with each step's known values (known values
  all through: `jnp.searchsorted`'s bisection; known group sizes steering a kernel in a
  scan over layers). Once nothing known changes between steps (carry and xs all
  unknown), the remaining steps cost what one does."""
  p = eqn.params
  body, n_consts, n_carry, length = p["jaxpr"], p["num_consts"], p["num_carry"], p["length"]
  if length > 64 and not _holds_kernel(eqn) and all(v is not _UNKNOWN for v in vals):
    return _evaluate(eqn, vals)  # a long loop of known values: one XLA program, not a walk a step
  consts, carry, xs = vals[:n_consts], vals[n_consts:n_consts + n_carry], vals[n_consts + n_carry:]
  unknown = lambda values: all(v is _UNKNOWN for v in values)
  ys = []
  for done, i in enumerate(reversed(range(length)) if p["reverse"] else range(length)):
    if (unknown(carry) and unknown(xs)) or done == _WALKED_STEPS:  # the rest, as one step
      _repeat(body.jaxpr, body.consts, [*consts, *([_UNKNOWN] * n_carry),
                                        *([_UNKNOWN] * len(xs))], acc, length - done)
      carry = [_UNKNOWN] * n_carry
      ys = None
      break
    outs = _walk(body.jaxpr, body.consts,
                 [*consts, *carry, *(_UNKNOWN if x is _UNKNOWN else x[i] for x in xs)], acc)
    carry, y = outs[:n_carry], outs[n_carry:]
    ys.append(y)
  n_ys = len(eqn.outvars) - n_carry
  if ys is None or any(v is _UNKNOWN for y in ys for v in y):
    stacked = [_UNKNOWN] * n_ys
  else:
    if p["reverse"]:
      ys.reverse()
    stacked = [np.stack([y[j] for y in ys]) if ys else np.zeros(v.aval.shape, v.aval.dtype)
               for j, v in enumerate(eqn.outvars[n_carry:])]
  return [c if c is _UNKNOWN else np.asarray(c) for c in carry] + stacked


def _while(eqn, vals: list, acc: _Accumulator) -> list:
  """A while loop, step by step while its condition is known (a `fori_loop` with known
  bounds around a kernel); a `fori_loop` whose other carries are unknown costs its trip
  count times one step (all of it past `_WALKED_STEPS`); a loop whose condition depends
  on data, one step (a lower bound: the model cannot know how often it runs), as does one
  known for more than 16 x `_WALKED_STEPS` steps."""
  p = eqn.params
  cond, body = p["cond_jaxpr"], p["body_jaxpr"]
  c_consts = vals[:p["cond_nconsts"]]
  b_consts = vals[p["cond_nconsts"]:p["cond_nconsts"] + p["body_nconsts"]]
  carry = vals[p["cond_nconsts"] + p["body_nconsts"]:]
  counter = _fori_counter(eqn)
  for done in itertools.count():
    trips = _while_trips(eqn, [*c_consts, *b_consts, *carry])
    if not isinstance(trips, int) and (done == _WALKED_STEPS or all(
        v is _UNKNOWN for i, v in enumerate(carry) if i not in counter)):
      _repeat(body.jaxpr, body.consts, [*b_consts, *carry], acc, int(trips))
      return [v if i in counter[1:] else _UNKNOWN for i, v in enumerate(carry)]
    (go,) = _walk(cond.jaxpr, cond.consts, [*c_consts, *carry], acc)
    if go is _UNKNOWN or done == 16 * _WALKED_STEPS:  # data decides: one step, a lower bound
      _walk(body.jaxpr, body.consts, [*b_consts, *carry], acc)
      return [_UNKNOWN] * len(carry)
    if not bool(go):
      return list(carry)
    carry = _walk(body.jaxpr, body.consts, [*b_consts, *carry], acc)


def _fori_counter(eqn) -> tuple[int, ...]:
  """The carry positions of a `fori_loop`'s counter and bound (cond `i < upper`)."""
  cond = eqn.params["cond_jaxpr"].jaxpr
  n = eqn.params["cond_nconsts"]
  if len(cond.eqns) == 1 and cond.eqns[0].primitive.name == "lt":
    pos = [cond.invars.index(v) - n if v in cond.invars else -1 for v in cond.eqns[0].invars]
    if min(pos) >= 0:
      return tuple(pos)
  return ()


def _cond(eqn, vals: list, acc: _Accumulator) -> list:
  """A cond: the branch its known index takes; with an index that depends on data, the
  costliest branch (by the model's seconds)."""
  branches, index, operands = eqn.params["branches"], vals[0], vals[1:]
  if index is not _UNKNOWN:
    branch = branches[int(np.clip(index, 0, len(branches) - 1))]  # XLA clamps the index
    return _walk(branch.jaxpr, branch.consts, operands, acc)
  runs = []
  for branch in branches:
    run = _Accumulator(acc.chip)
    _walk(branch.jaxpr, branch.consts, operands, run)
    runs.append(run)
  acc.add(max(runs, key=lambda run: run.seconds))
  return [_UNKNOWN] * len(eqn.outvars)


_CONTROL = {"scan": _scan, "while": _while, "cond": _cond}


def _branches(params: dict) -> list:
  out = list(params.get("branches", ()))
  for key in ("body_jaxpr", "cond_jaxpr", "jaxpr"):
    j = params.get(key)
    if isinstance(j, jax_core.ClosedJaxpr):
      out.append(j)
  return out


def _integral(aval) -> bool:
  return _kind(getattr(aval, "dtype", np.float32)) == "integral"


def _real(aval) -> bool:
  return _kind(getattr(aval, "dtype", np.complex64)) == "real"


@functools.cache
def _kind(dtype) -> str:  # asked for every operand of every op the model evaluates
  dtype = np.dtype(dtype)
  if dtype == np.bool_ or np.issubdtype(dtype, np.integer):
    return "integral"
  return "real" if np.issubdtype(dtype, np.floating) else "other"


# Float ops whose values NumPy gives as XLA does (one IEEE operation per element, or none;
# signed zeros aside): not sums, whose order of additions differs.
_EXACT_FLOAT = {"add", "sub", "mul", "div", "max", "min", "eq", "ne", "lt", "le", "gt", "ge",
                "neg", "abs", "floor", "ceil", "select_n", "broadcast_in_dim",
                "reshape", "squeeze", "slice", "iota", "concatenate", "reduce_max",
                "reduce_min", "convert_element_type", "dynamic_slice", "dynamic_update_slice",
                "gather", "scatter", "scatter-add", "lt_to", "le_to", "eq_to"}


def _numpy_eval(eqn, vals) -> list | None:
  """The ops of the kernels' metadata in NumPy: XLA's values (two's-complement wrap-around,
  truncating division; for floats, the ops of `_EXACT_FLOAT`) without compiling a
  computation per op and shape, which was most of the model's time. None for anything else
  (XLA evaluates it)."""
  name, p = eqn.primitive.name, eqn.params
  avals = [v.aval for v in (*eqn.invars, *eqn.outvars)]
  if len(eqn.outvars) != 1 or not all(_integral(a) or _real(a) for a in avals):
    return None
  if not all(_integral(a) for a in avals) and name not in _EXACT_FLOAT:
    return None
  out = eqn.outvars[0].aval
  # each operand in its own dtype (a Python-float literal would otherwise compute in float64)
  vals = [np.asarray(v, v_in.aval.dtype) if _real(v_in.aval) else v
          for v, v_in in zip(vals, eqn.invars)]
  x = vals[0] if vals else None
  if (name == "convert_element_type" and _integral(out) and np.dtype(out.dtype) != np.bool_
      and _real(eqn.invars[0].aval)):
    info = np.iinfo(out.dtype)  # XLA's conversion of NaN or out-of-range values: left to XLA
    if not np.all(np.isfinite(x) & (x >= info.min) & (x <= info.max)):
      return None
  if name in _BINARY and name != "shift_right_logical":
    r = _BINARY[name](vals[0], vals[1])
  elif name in _UNARY:
    r = _UNARY[name](x)
  elif name == "convert_element_type":
    r = x != 0 if np.dtype(out.dtype) == np.bool_ else x
  elif name == "select_n":
    which, *cases = vals
    r = np.choose(np.asarray(which).astype(np.int64),
                  [np.broadcast_to(c, out.shape) for c in cases])
  elif name == "broadcast_in_dim":
    dims = p["broadcast_dimensions"]
    r = np.reshape(x, [x.shape[dims.index(i)] if i in dims else 1 for i in range(len(out.shape))])
  elif name in ("reshape", "squeeze"):
    r = np.reshape(x, out.shape)
  elif name == "slice":
    strides = p["strides"] or (1,) * x.ndim
    r = x[tuple(slice(a, b, c) for a, b, c in
                zip(p["start_indices"], p["limit_indices"], strides))]
  elif name == "iota":
    shape = [1] * len(out.shape)
    shape[p["dimension"]] = out.shape[p["dimension"]]
    r = np.arange(out.shape[p["dimension"]]).reshape(shape)
  elif name == "concatenate":
    r = np.concatenate([np.asarray(v, np.int64 if _integral(out) else out.dtype) for v in vals],
                       axis=p["dimension"])
  elif name == "cumsum":
    axis, flip = p["axis"], (lambda a: np.flip(a, p["axis"])) if p["reverse"] else (lambda a: a)
    r = flip(np.cumsum(flip(np.asarray(x, np.int64)), axis=axis))
  elif name == "reduce_sum":
    r = np.sum(np.asarray(x, np.int64), axis=tuple(p["axes"]))
  elif name in ("reduce_max", "reduce_min"):
    r = (np.max if name == "reduce_max" else np.min)(x, axis=tuple(p["axes"]))
  elif name in _TOTAL_ORDER:
    r = _TOTAL_ORDER[name](*(_total_order_key(v) for v in vals))
  elif name in ("dynamic_slice", "dynamic_update_slice"):
    update = vals[1] if name == "dynamic_update_slice" else None
    sizes = p["slice_sizes"] if update is None else update.shape
    starts = vals[1 + (update is not None):]
    window = tuple(slice(s, s + n) for s, n in zip(
        (int(np.clip(s, 0, d - n)) for s, d, n in zip(starts, x.shape, sizes)), sizes))
    if update is None:
      r = x[window]
    else:  # XLA clamps the start so that the update fits, as for the slice
      r = np.array(x)
      r[window] = update
  elif name in ("gather", "scatter", "scatter-add"):
    r = _gather_scatter(name, p, vals, out)
    if r is None:
      return None
  else:
    return None
  return [np.array(np.broadcast_to(r, out.shape)).astype(out.dtype)]


def _total_order_key(x: np.ndarray) -> np.ndarray:
  """Integers ordered as XLA's total order orders `x` (-NaN < -inf < ... < -0 < +0 < ... <
  +inf < +NaN): the float's bits, the magnitude's flipped below zero."""
  if not _real(x):
    return x
  bits = x.view(np.dtype(f"int{8 * x.dtype.itemsize}"))
  return bits ^ ((bits >> (8 * x.dtype.itemsize - 1)) & np.iinfo(bits.dtype).max)


_TOTAL_ORDER = {"lt_to": np.less, "le_to": np.less_equal, "eq_to": np.equal}


def _gather_scatter(name: str, p: dict, vals: list, out) -> np.ndarray | None:
  """A gather, scatter or scatter-add of single elements of a 1-D operand (`x[i]`,
  `x.at[i].set(u)`, `x.at[i].add(u)`: what the kernels' metadata and `jnp.searchsorted` /
  `jnp.histogram` use), as XLA computes it; None for any other form, for a scatter whose
  in-bounds indices repeat with different values, and for float sums that rounding could
  make depend on the order of additions."""
  x, indices = np.asarray(vals[0]), np.asarray(vals[1])
  dn = p["dimension_numbers"]
  if (x.ndim != 1 or indices.ndim < 1 or indices.shape[-1] != 1
      or dn.operand_batching_dims or getattr(dn, "start_indices_batching_dims", ())
      or getattr(dn, "scatter_indices_batching_dims", ())):
    return None
  idx = indices[..., 0].astype(np.int64)
  mode = p["mode"]
  clip = mode == lax.GatherScatterMode.CLIP
  if name == "gather":
    single = (tuple(dn.collapsed_slice_dims) == (0,) and not dn.offset_dims) or (
        not dn.collapsed_slice_dims and len(dn.offset_dims) == 1)  # [..., 1]
    if not single or tuple(dn.start_index_map) != (0,) or tuple(p["slice_sizes"]) != (1,):
      return None
    inside = (idx >= 0) & (idx < x.shape[0])
    r = x[np.clip(idx, 0, x.shape[0] - 1)]
    if mode == lax.GatherScatterMode.FILL_OR_DROP and not np.all(inside):
      if p["fill_value"] is None:
        return None
      r = np.where(inside, r, np.asarray(p["fill_value"]).astype(x.dtype))
    return r.reshape(out.shape)  # an offset dim of size 1, where it stands
  if (tuple(dn.update_window_dims) or tuple(dn.inserted_window_dims) != (0,)
      or tuple(dn.scatter_dims_to_operand_dims) != (0,)):
    return None
  updates = np.broadcast_to(np.asarray(vals[2], x.dtype), idx.shape).ravel()
  idx = idx.ravel()
  if clip:
    idx = np.clip(idx, 0, x.shape[0] - 1)
  keep = (idx >= 0) & (idx < x.shape[0])  # XLA drops out-of-bounds updates
  idx, updates = idx[keep], updates[keep]
  if name == "scatter":
    order = np.argsort(idx, kind="stable")
    i, u = idx[order], updates[order]
    repeat = i[1:] == i[:-1]
    if np.any(repeat & (u[1:] != u[:-1])):
      return None  # which update lands is XLA's choice
    r = np.array(x)
    r[i] = u
    return r
  if _real(x):  # exact in any order: integer values whose partial sums all fit the mantissa
    whole = lambda a: np.all(np.floor(a) == a)
    total = np.sum(np.abs(x), dtype=np.float64) + np.sum(np.abs(updates), dtype=np.float64)
    if not (whole(x) and whole(updates) and total <= 2.0 ** (np.finfo(x.dtype).nmant + 1)):
      return None
    r = np.asarray(x, np.float64).copy()
    np.add.at(r, idx, updates.astype(np.float64))
    return r
  if x.dtype == np.bool_:
    return None
  r = np.asarray(x, np.int64).copy()  # wraps as XLA's adds do once cast back
  np.add.at(r, idx, updates.astype(np.int64))
  return r


def _evaluate(eqn, vals) -> list:
  if (fast := _numpy_eval(eqn, vals)) is not None:
    return fast
  params = eqn.primitive.get_bind_params(eqn.params)
  with jax.default_device(jax.devices("cpu")[0]):
    outs = eqn.primitive.bind(*vals, **params)
  outs = outs if eqn.primitive.multiple_results else [outs]
  return [np.asarray(o) if _is_array(o) else o for o in outs]


# 4-bit types: NumPy (ml_dtypes) holds a value a byte; a TPU packs two
_HALF_BYTE = ("int4", "uint4", "float4_e2m1fn")


def _itemsize(dtype) -> float:
  return 0.5 if np.dtype(dtype).name in _HALF_BYTE else np.dtype(dtype).itemsize


def _nbytes(aval) -> float:
  if not hasattr(aval, "shape") or not hasattr(aval, "dtype"):
    return 0.0
  return math.prod(aval.shape) * _itemsize(aval.dtype)


def _copies_by_hand(jaxpr) -> bool:
  """Whether a jaxpr (or one nested in it) starts or waits for a DMA."""
  return any(eqn.primitive.name in ("dma_start", "dma_wait")
             or any(_copies_by_hand(getattr(j, "jaxpr", j))
                    for j in jax_core.jaxprs_in_params(eqn.params))
             for eqn in jaxpr.eqns)


def _while_trips(eqn, vals):
  """A `while`'s trip count (per step, in a kernel body): a `fori_loop` with dynamic bounds
  (carry `(i, upper, ...)`, cond `i < upper`, i counting up by one) runs `upper - lower`
  times where both are known; any other loop is counted once (the int 1)."""
  counter = _fori_counter(eqn)
  carry = vals[eqn.params["cond_nconsts"] + eqn.params["body_nconsts"]:]
  if counter:
    lo, hi = carry[counter[0]], carry[counter[1]]
    if lo is not _UNKNOWN and hi is not _UNKNOWN:
      return np.maximum(np.asarray(hi) - np.asarray(lo), 0).astype(np.float64)
  return 1


def _ragged_dot_flops(eqn) -> float:
  """2 x the multiply-adds of a ragged_dot_general: each element of the left operand meets
  the right operand's free columns once (one group per row, or per contracted row)."""
  dn = eqn.params["ragged_dot_dimension_numbers"]
  (_, rhs_contract), (_, rhs_batch) = dn.dot_dimension_numbers
  lhs, rhs = (v.aval.shape for v in eqn.invars[:2])
  skip = {*rhs_contract, *rhs_batch, *dn.rhs_group_dimensions}
  return 2.0 * math.prod(lhs) * math.prod(d for i, d in enumerate(rhs) if i not in skip)


def _dot_flops(eqn, mxu: tuple[int, int] = (1, 1)) -> float:
  """2 x the multiply-adds of a dot_general, each dimension rounded up to what a TPU MXU
  takes for it (`mxu` = (rows, width)): the MXU holds a `[width, width]` tile of the right
  operand (contraction x columns, each padded to the array's width) and streams the left's
  rows through it, so fewer than `rows` left rows still pay for a whole tile load."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs, rhs = eqn.invars[0].aval, eqn.invars[1].aval
  rows = math.prod(d for i, d in enumerate(lhs.shape) if i not in (*lc, *lb))
  cols = math.prod(d for i, d in enumerate(rhs.shape) if i not in (*rc, *rb))
  depth = math.prod(lhs.shape[d] for d in lc)
  batch = math.prod(lhs.shape[d] for d in lb)
  mxu_rows, width = mxu
  pad = lambda d, to: -(-d // to) * to
  return 2.0 * batch * max(rows, mxu_rows) * pad(depth, width) * pad(cols, width)


def _relabels(eqn) -> bool:
  """A transpose that is a bitcast on a TPU: int32 `[e, k, c]` to `[e, c, k]` where the TPU
  holds it k-minor (`tpu.k_minor`: the fused kernel reads int4 words that way); uint8 MX
  weight scales `[e, P, n, 2]` to `[e, 2, P, n]` where it holds them so (`tpu.pairs_major`)."""
  if eqn.primitive.name != "transpose":
    return False
  aval, perm = eqn.invars[0].aval, tuple(eqn.params["permutation"])
  shape, dtype = tuple(aval.shape), np.dtype(aval.dtype)
  if perm == (0, 2, 1):
    return dtype == np.int32 and tpu.k_minor(shape)
  return perm == (0, 3, 1, 2) and dtype == np.uint8 and shape[-1] == 2 and tpu.pairs_major(shape)


def _xla_cost(eqn, acc: _Accumulator) -> None:
  if eqn.primitive.name in _FREE or _relabels(eqn):
    return
  out_bytes = sum(_nbytes(v.aval) for v in eqn.outvars)
  if eqn.primitive.name in ("slice", "dynamic_slice", "gather"):
    nbytes = 2 * out_bytes  # reads only what it returns
  else:
    nbytes = sum(_nbytes(v.aval) for v in eqn.invars) + out_bytes
  flops = 0.0
  seconds = nbytes / acc.chip.hbm_bandwidth
  if eqn.primitive.name in ("dot_general", "ragged_dot_general"):
    flops = _dot_flops(eqn) if eqn.primitive.name == "dot_general" else _ragged_dot_flops(eqn)
    seconds = max(seconds, flops / acc.chip.peak(eqn.invars[0].aval.dtype))
  acc.xla_seconds += seconds
  acc.xla_ops.append((eqn.primitive.name, " ".join(str(v.aval) for v in eqn.outvars), seconds))
  acc.xla_bytes += nbytes
  acc.xla_flops += flops


# --- scalar code, vectorized over grid steps -----------------------------------------------

def _trunc_div(a, b):
  if np.issubdtype(np.result_type(a, b), np.integer):
    q = np.abs(a) // np.maximum(np.abs(b), 1)
    return np.where(b == 0, -1, np.where((np.sign(a) * np.sign(b)) < 0, -q, q))  # XLA: x/0 = -1
  return np.true_divide(a, b)


def _trunc_rem(a, b):
  if np.issubdtype(np.result_type(a, b), np.integer):  # XLA: x % 0 = x
    return np.where(b == 0, a, np.fmod(a, np.where(b == 0, 1, b)))
  return np.fmod(a, b)


def _logical(fn_bool, fn_int):
  return lambda a, b: fn_bool(a, b) if np.result_type(a, b) == np.bool_ else fn_int(a, b)


_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "max": np.maximum,
    "min": np.minimum, "eq": np.equal, "ne": np.not_equal, "lt": np.less,
    "le": np.less_equal, "gt": np.greater, "ge": np.greater_equal,
    "and": _logical(np.logical_and, np.bitwise_and),
    "or": _logical(np.logical_or, np.bitwise_or),
    "xor": _logical(np.logical_xor, np.bitwise_xor),
    "rem": _trunc_rem, "div": _trunc_div, "shift_left": np.left_shift,
    "shift_right_arithmetic": np.right_shift, "shift_right_logical": np.right_shift,
}
_UNARY = {"neg": np.negative, "abs": np.abs, "sign": np.sign, "floor": np.floor,
          "ceil": np.ceil,
          "not": lambda a: np.logical_not(a) if a.dtype == np.bool_ else np.invert(a)}
_TRANSCENDENTAL = {"exp", "exp2", "log", "log1p", "logistic", "tanh", "erf", "pow", "rsqrt",
                   "sqrt", "sin", "cos", "tan", "expm1", "atan2"}
_NO_VPU = {"get", "swap", "dot_general", "iota", "broadcast_in_dim", "reshape", "squeeze",
           "program_id", "num_programs", "addupdate", "dma_start", "dma_wait", "semaphore_wait",
           "semaphore_signal", "run_scoped", "cond", "while", "scan", "pjit", "closed_call"}


def _selects_vregs(eqn) -> bool:
  """A slice or concatenation of values along whole (8, 128) tiles: it picks or places
  vector registers, no vector work."""
  aligned = lambda offsets: all(o % t == 0 for o, t in zip(offsets[-2:][::-1], (128, 8)))
  if eqn.primitive.name == "slice":
    return (all(st == 1 for st in eqn.params["strides"] or ())
            and aligned(eqn.params["start_indices"]))
  if eqn.primitive.name == "concatenate":
    dim, shape = eqn.params["dimension"], eqn.outvars[0].aval.shape
    if dim < len(shape) - 2:
      return True
    starts = np.cumsum([0] + [v.aval.shape[dim] for v in eqn.invars[:-1]])
    return all(aligned([0] * dim + [int(o)] + [0] * (len(shape) - dim - 1)) for o in starts)
  return False


@dataclasses.dataclass
class _StepCost:
  mxu: np.ndarray  # FLOPs per step, by operand dtype name: {dtype: [S]}
  vpu: np.ndarray  # element operations per step


class _Scalars:
  """Evaluates a kernel body's or index map's scalar code for every grid step at once.

  Known values are NumPy arrays broadcastable to `[S]` (one per step); values computed
  from block data (vectors, loads from VMEM) are `_UNKNOWN`.
  """

  def __init__(self, steps: int, program_ids: Sequence[np.ndarray], grid: Sequence[int],
               mxu: tuple[int, int] = (1, 1)):
    self.steps = steps
    self.program_ids = program_ids
    self.grid = grid
    self.mxu_shape = mxu
    self.flops = np.zeros(steps)  # the useful ones (`mxu`: what they occupy the MXU for)
    self.mxu: dict[str, np.ndarray] = {}
    self.vpu = np.zeros(steps)
    # Copies the body makes by hand, in program order: (kind "start" / "wait", the steps
    # it runs on [S] bool, its semaphore's key per step [S], the bytes a start copies,
    # the body's work before it per step: (MXU FLOPs by dtype, vector element operations))
    self.dmas: list[tuple[str, np.ndarray, np.ndarray, float,
                          tuple[dict[str, np.ndarray], np.ndarray]]] = []

  def run(self, jaxpr, consts, args, mask) -> list:
    env: dict = {}

    def read(v):
      if isinstance(v, jax_core.Literal):
        return np.asarray(v.val)
      return env.get(v, _UNKNOWN)

    for v, c in zip(jaxpr.constvars, consts):
      env[v] = np.asarray(c) if _is_array(c) else c
    for v, a in zip(jaxpr.invars, args):
      env[v] = a
    for eqn in jaxpr.eqns:
      outs = self._eqn(eqn, [read(v) for v in eqn.invars], mask)
      for v, o in zip(eqn.outvars, outs):
        env[v] = o
    return [read(v) for v in jaxpr.outvars]

  def _add(self, counter: np.ndarray, amount: float, mask) -> None:
    counter += amount if mask is None else amount * mask

  def _eqn(self, eqn, vals, mask) -> list:
    name = eqn.primitive.name
    n_out = len(eqn.outvars)
    if name in ("dma_start", "dma_wait"):
      self._dma(eqn, vals, mask)
      return [_UNKNOWN] * n_out
    if name == "dot_general":
      dtype = np.dtype(eqn.invars[0].aval.dtype).name
      counter = self.mxu.setdefault(dtype, np.zeros(self.steps))
      self._add(counter, _dot_flops(eqn, self.mxu_shape), mask)  # MXU time, in FLOPs
      self._add(self.flops, _dot_flops(eqn), mask)
      return [_UNKNOWN]
    if name == "cond":
      return self._cond(eqn, vals, mask)
    if name in ("scan", "while"):
      body = eqn.params["jaxpr"] if name == "scan" else eqn.params["body_jaxpr"]
      trips = eqn.params.get("length", 1) if name == "scan" else _while_trips(eqn, vals)
      # The loop's constants are known per step (e.g. a k tile's offset): a `pl.when` in
      # the body on them runs where it is taken; the carry and the index are unknown.
      n_consts = (eqn.params["num_consts"] if name == "scan"
                  else eqn.params["body_nconsts"])
      start = 0 if name == "scan" else eqn.params["cond_nconsts"]
      args = list(vals[start:start + n_consts])
      args += [_UNKNOWN] * (len(body.jaxpr.invars) - len(args))
      if not _copies_by_hand(body.jaxpr):
        sub = _Scalars(self.steps, self.program_ids, self.grid, self.mxu_shape)
        sub.run(body.jaxpr, body.consts, args, mask)
        self._merge(sub, trips)
        return [_UNKNOWN] * n_out
      if name == "while":
        return self._fori_copies(eqn, body, args[:n_consts], vals, trips, mask)
      if trips > _MAX_UNROLLED:
        raise ValueError(_LOOP_COPIES)
      # Copies made by hand in a loop of static length (a `fori_loop` over pieces of a
      # copy, waiting for each before its work): followed iteration by iteration, the
      # carry (the index) known where its start is.
      carry = list(vals[n_consts:n_consts + eqn.params["num_carry"]])
      xs = [_UNKNOWN] * (len(body.jaxpr.invars) - n_consts - len(carry))
      for _ in range(trips):
        carry = self.run(body.jaxpr, body.consts, [*args[:n_consts], *carry, *xs],
                         mask)[:len(carry)]
      return [*carry, *[_UNKNOWN] * (n_out - len(carry))]
    if (inner := _sub_jaxpr(eqn.params)) is not None and name not in ("pallas_call",):
      jaxpr, consts = inner
      return self.run(jaxpr, consts, vals, mask)
    if name not in _NO_VPU and not _selects_vregs(eqn) and any(
        math.prod(getattr(v.aval, "shape", ())) > 1 for v in eqn.outvars):
      size = max(math.prod(getattr(v.aval, "shape", ())) for v in eqn.outvars)
      self._add(self.vpu, float(size), mask)
      return [_UNKNOWN] * n_out
    if name == "program_id":
      return [self.program_ids[eqn.params["axis"]]]
    if name == "num_programs":
      return [np.asarray(self.grid[eqn.params["axis"]])]
    if name == "get":
      return [self._get(eqn, vals)]
    if any(v is _UNKNOWN for v in vals) or any(
        math.prod(getattr(v.aval, "shape", ())) > 1 for v in eqn.outvars):
      return [_UNKNOWN] * n_out
    if name in _BINARY:
      return [_BINARY[name](vals[0], vals[1])]
    if name in _UNARY:
      return [_UNARY[name](vals[0])]
    if name == "convert_element_type":
      return [vals[0].astype(eqn.params["new_dtype"])]
    if name == "select_n":
      which, *cases = vals
      return [np.choose(which.astype(np.int32), [np.broadcast_to(c, np.shape(which))
                                                for c in cases])
              if np.ndim(which) else cases[int(which)]]
    if name == "clamp":
      return [np.clip(vals[1], vals[0], vals[2])]
    if name == "integer_pow":
      return [vals[0] ** eqn.params["y"]]
    if name in ("squeeze", "reshape", "broadcast_in_dim"):
      return [vals[0]]
    return [_UNKNOWN] * n_out

  def _get(self, eqn, vals):
    ref, *idx = vals
    if ref is _UNKNOWN:
      return _UNKNOWN
    transforms = tree_util.tree_unflatten(eqn.params["tree"], list(eqn.invars[1:]))
    lookup = {id(v): x for v, x in zip(eqn.invars[1:], idx)}
    index = []
    for t in transforms:
      if not isinstance(t, indexing.NDIndexer):
        return _UNKNOWN
      for i in t.indices:
        if isinstance(i, indexing.Slice):
          return _UNKNOWN
        value = lookup.get(id(i), i.val if isinstance(i, jax_core.Literal) else i)
        if value is _UNKNOWN:
          return _UNKNOWN
        index.append(np.asarray(value))
    if not index:
      return ref if ref.ndim else ref
    index = [np.clip(i.astype(np.int64), 0, d - 1) for i, d in zip(index, ref.shape)]
    return ref[tuple(index)]

  def _dma(self, eqn, vals, mask) -> None:
    """Records a `dma_start` / `dma_wait`: on which steps, on which semaphore (its
    operand and element, from values known per step), and the bytes a start copies (its
    destination, padded to the (sublane, lane) tile)."""
    tree = eqn.params["tree"]
    _, dst, _, _, _ = tree.unflatten([v.aval for v in eqn.invars])
    _, _, sem, _, _ = tree.unflatten(list(range(len(eqn.invars))))  # operand positions
    index = []
    for t in getattr(sem, "transforms", ()):
      for i in getattr(t, "indices", ()):
        value = vals[i] if isinstance(i, int) else _UNKNOWN
        if value is _UNKNOWN:
          raise ValueError("a copy made by hand waits on a semaphore the model cannot "
                           "identify per step (its index depends on data)")
        index.append(np.broadcast_to(np.asarray(value, np.int64), (self.steps,)))
    sem_ref = sem.ref if hasattr(sem, "ref") else sem
    sem_shape = eqn.invars[sem_ref].aval.shape
    flat = (np.ravel_multi_index(tuple(np.clip(i, 0, d - 1) for i, d in zip(index, sem_shape)),
                                 sem_shape) if index else np.zeros(self.steps, np.int64))
    owner = vals[sem_ref]
    if not isinstance(owner, _Semaphores):
      raise ValueError("a copy made by hand signals a semaphore that is not one of the "
                       "kernel's own (scratch) semaphores")
    key = owner.number * (1 << 32) + flat
    runs = np.ones(self.steps, bool) if mask is None else np.asarray(mask, bool)
    nbytes = 0.0
    if eqn.primitive.name == "dma_start":
      nbytes = float(_block_bytes(dst.shape, dst.shape, dst.dtype,
                                  [np.zeros(1)] * len(dst.shape))[0])
    before = ({d: f.copy() for d, f in self.mxu.items()}, self.vpu.copy())
    self.dmas.append(("start" if eqn.primitive.name == "dma_start" else "wait",
                      np.broadcast_to(runs, (self.steps,)), key, nbytes, before))

  def _cond(self, eqn, vals, mask) -> list:
    which, *operands = vals
    branches = eqn.params["branches"]
    if which is _UNKNOWN:  # the costliest branch
      subs = []
      for b in branches:
        sub = _Scalars(self.steps, self.program_ids, self.grid, self.mxu_shape)
        sub.run(b.jaxpr, b.consts, operands, mask)
        subs.append(sub)
      if any(sub.dmas for sub in subs):
        raise ValueError("a copy made by hand under a condition on data (not on the grid "
                         "or the scalar-prefetch operands): the model cannot tell when it runs")
      total = lambda s: s.vpu + sum(s.mxu.values(), np.zeros(self.steps))
      best = max(subs, key=lambda s: float(np.sum(total(s))))
      self._merge(best, 1)
      return [_UNKNOWN] * len(eqn.outvars)
    which = np.broadcast_to(np.asarray(which).astype(np.int64), (self.steps,))
    for i, b in enumerate(branches):
      taken = (which == i) if mask is None else (which == i) * mask
      if not np.any(taken):
        continue
      self.run(b.jaxpr, b.consts, operands, taken)
    return [_UNKNOWN] * len(eqn.outvars)

  def _fori_copies(self, eqn, body, consts, vals, trips, mask) -> list:
    """A `fori_loop` whose bounds the scalar-prefetch operands give (known per step, as
    many trips as they say, up to `_MAX_UNROLLED`) with copies made by hand inside:
    followed iteration by iteration, iteration t on the steps that run more than t trips,
    the carry (the index) known where its start is."""
    if not _fori_counter(eqn) or not isinstance(trips, np.ndarray):
      raise ValueError(_LOOP_COPIES)
    trips = np.broadcast_to(trips, (self.steps,))
    if trips.max(initial=0) > _MAX_UNROLLED:
      raise ValueError(_LOOP_COPIES)
    carry = list(vals[eqn.params["cond_nconsts"] + eqn.params["body_nconsts"]:])
    for t in range(int(trips.max(initial=0))):
      live = trips > t
      new = self.run(body.jaxpr, body.consts, [*consts, *carry],
                     live if mask is None else live * mask)
      # steps past their last trip keep the carry they left with
      carry = [_UNKNOWN if a is _UNKNOWN or b is _UNKNOWN else np.where(live, b, a)
               for a, b in zip(carry, new)]
    return carry

  def _merge(self, other: "_Scalars", times: float) -> None:
    self.vpu += times * other.vpu
    self.flops += times * other.flops
    for k, v in other.mxu.items():
      self.mxu[k] = self.mxu.get(k, np.zeros(self.steps)) + times * v


# --- one kernel ------------------------------------------------------------------------

_MAX_STEPS = 20_000_000
# iterations of a loop holding copies made by hand the model follows (a row tile's visits:
# its groups, with tgmm's empty ones up to 1024 experts)
_MAX_UNROLLED = 4096
_LOOP_COPIES = (
    "copies operands between HBM and VMEM by hand inside a loop of unknown or long length "
    f"(bounds from data, or over {_MAX_UNROLLED} iterations), which the "
    "model does not follow; it follows the grid's pipeline, copies a kernel's body makes "
    "by hand outside loops, in short static ones and in `fori_loop`s whose bounds come "
    "from the grid or the scalar-prefetch operands, and tokamax's kernels when `predict` "
    "traces them (a kernel "
    "jit-traced before, outside `predict`, is cached: jax.clear_caches() first)")


def _sublane_tile(itemsize: int) -> int:
  return 8 * max(1, 4 // itemsize)  # (8, 128) words: 16 rows of bf16, 32 of int8


def _block_bytes(block_shape, array_shape, dtype, index: list[np.ndarray]) -> np.ndarray:
  """Bytes of the in-bounds part of a block at each step, the last two dims padded to the
  (sublane, lane) tile (a squeezed dim counts 1)."""
  itemsize = _itemsize(dtype)
  sizes = []
  for bd, dim, idx in zip(block_shape, array_shape, index):
    if isinstance(bd, pallas_core.Squeezed) or bd is None:
      sizes.append(np.ones_like(idx, dtype=np.float64))
      continue
    bs = bd.block_size if hasattr(bd, "block_size") else int(bd)
    start = idx * bs if isinstance(bd, pallas_core.Blocked) or isinstance(bd, int) else idx
    sizes.append(np.clip(dim - start, 0, bs).astype(np.float64))
  if len(sizes) >= 1:
    sizes[-1] = np.ceil(sizes[-1] / 128) * 128
  if len(sizes) >= 2:
    sub = _sublane_tile(max(1, int(np.dtype(dtype).itemsize)))
    sizes[-2] = np.ceil(sizes[-2] / sub) * sub
  return np.prod(np.stack(sizes), axis=0) * itemsize if sizes else np.full(1, itemsize)


def _simulate(eqn, vals: list, chip: chips_lib.Chip) -> KernelCost:
  params = eqn.params
  gm = params["grid_mapping"]
  name = str(getattr(params.get("name_and_src_info"), "name", None) or params.get("name")
             or getattr(getattr(params["jaxpr"], "debug_info", None), "func_name", None)
             or "pallas_call")
  n_dyn = gm.num_dynamic_grid_bounds
  dyn = iter(vals[:n_dyn])
  grid = []
  for g in gm.grid:
    if isinstance(g, int):
      grid.append(g)
      continue
    v = next(dyn)
    if v is _UNKNOWN:
      raise ValueError(f"{name}: a grid dimension depends on a value the model does not "
                       "know; pass the arrays it is computed from (group sizes) concretely")
    grid.append(int(v))
  steps = math.prod(grid)
  if steps > _MAX_STEPS:
    raise ValueError(f"{name}: {steps} grid steps, more than the model follows ({_MAX_STEPS})")
  prefetch = vals[n_dyn:n_dyn + gm.num_index_operands]
  for v in prefetch:
    if v is _UNKNOWN:
      raise ValueError(f"{name}: a scalar-prefetch operand depends on a value the model does "
                       "not know; pass the arrays it is computed from concretely")
  semantics = _dimension_semantics(params, len(grid))
  cores = 1
  split_axis = None
  if chip.cores > 1:
    par = [i for i, s in enumerate(semantics) if s == "parallel" and grid[i] > 1]
    if par:
      split_axis, cores = par[0], min(chip.cores, grid[par[0]])
  if steps == 0:
    return KernelCost(name, tuple(grid), 0.0, 0.0, 0.0, 0, 0.0, 0.0, cores)
  ids = np.unravel_index(np.arange(steps), grid) if grid else ()  # no grid: one step
  program_ids = [np.asarray(i, np.int64) for i in ids]

  # Block indices of every operand at every step: when each input is copied in (its index
  # differs from the step before, on the same core) and each output written back.
  n_in = gm.num_inputs
  inputs = []  # (copied [S] bool, bytes [S], buffer count, lookahead)
  copies_out = np.zeros(steps)
  core_of = (np.zeros(steps, np.int64) if split_axis is None else
             (program_ids[split_axis] * cores) // grid[split_axis])
  order = np.argsort(core_of, kind="stable")  # each core's steps, in the order it runs them
  for i, bm in enumerate(gm.block_mappings):
    if _unpipelined(bm):
      continue
    ij = bm.index_map_jaxpr
    sc = _Scalars(steps, program_ids, grid)
    index = sc.run(ij.jaxpr, ij.consts, [*program_ids, *prefetch], None)
    if any(x is _UNKNOWN for x in index):
      raise ValueError(f"{name}: block index of operand {i} could not be evaluated")
    index = [np.broadcast_to(np.asarray(x, np.int64), (steps,)) for x in index]
    nbytes = _block_bytes(bm.block_shape, bm.array_aval.shape, bm.array_aval.dtype, index)
    nbytes = np.broadcast_to(nbytes, (steps,))
    stacked = (np.stack(index) if index else np.zeros((1, steps), np.int64))[:, order]
    differs = np.zeros(steps, bool)  # at step s: its index differs from its core's step before
    differs[order[1:]] = np.any(stacked[:, 1:] != stacked[:, :-1], axis=0) | (
        core_of[order[1:]] != core_of[order[:-1]])
    if i < n_in:
      copied = differs.copy()
      copied[order[0]] = True
      mode = bm.pipeline_mode
      inputs.append((copied, np.where(copied, nbytes, 0.0),
                     getattr(mode, "buffer_count", 2) or 2,
                     bool(getattr(mode, "use_lookahead", False))))
    else:  # written back when its core's next index differs, and at its core's last step
      written = np.ones(steps, bool)
      written[order[:-1]] = differs[order[1:]]
      copies_out += np.where(written, nbytes, 0.0)

  # The body's work per step.
  body = params["jaxpr"]
  body_consts = []
  if isinstance(body, jax_core.ClosedJaxpr):
    body, body_consts = body.jaxpr, body.consts
  sc = _Scalars(steps, program_ids, grid, (chip.mxu_rows, chip.mxu_width))
  body_args = [*prefetch] + [
      _Semaphores(i) if _memory_space(v.aval) == "semaphore_mem" else _UNKNOWN
      for i, v in enumerate(body.invars[len(prefetch):])]
  try:
    sc.run(body, body_consts, body_args, None)
  except ValueError as e:
    raise ValueError(f"{name}: {e}") from None
  # A chip's peak counts all its TensorCores (v5p: two); each core has its share.
  def busy(mxu: dict[str, np.ndarray], vpu: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Seconds of the MXU's and the vector units' work per step."""
    return (sum((flops / (chip.peak(dtype) / chip.cores) for dtype, flops in mxu.items()),
                np.zeros(steps)), vpu / chip.vpu_rate)
  mxu_s, vpu_s = busy(sc.mxu, sc.vpu)
  compute = np.maximum(mxu_s, vpu_s) + STEP_OVERHEAD_S
  # where in its step each copy made by hand starts or is waited for
  dmas = [(kind, runs, key, nbytes, np.maximum(*busy(*before)))
          for kind, runs, key, nbytes, before in sc.dmas]
  bandwidth = chip.hbm_bandwidth / cores
  seconds = 0.0
  for c in range(cores):
    sel = core_of == c
    if np.any(sel):
      seconds = max(seconds, _timeline(
          compute[sel], [(cp[sel], nb[sel] / bandwidth, b, la) for cp, nb, b, la in inputs],
          copies_out[sel] / bandwidth,
          [(kind, runs[sel], key[sel], nbytes / bandwidth, at[sel])
           for kind, runs, key, nbytes, at in dmas]))
  copies_in = sum((nb for _, nb, _, _ in inputs), np.zeros(steps))
  copies_in = copies_in + sum((np.where(runs, nbytes, 0.0)
                               for kind, runs, _, nbytes, _ in dmas if kind == "start"),
                              np.zeros(steps))
  flops = float(np.sum(sc.flops))
  return KernelCost(name=name, grid=tuple(grid), seconds=seconds,
                    hbm_bytes=float(np.sum(copies_in) + np.sum(copies_out)), flops=flops,
                    grid_steps=steps, compute_seconds=float(np.sum(compute)),
                    dma_seconds=float(np.sum(copies_in + copies_out)) / chip.hbm_bandwidth,
                    cores=cores, mxu_seconds=float(np.sum(mxu_s)),
                    vpu_seconds=float(np.sum(vpu_s)))


def _timeline(compute: np.ndarray, inputs: list, write_back: np.ndarray,
              by_hand: Sequence[tuple[str, np.ndarray, np.ndarray, float, np.ndarray]] = ()
              ) -> float:
  """Seconds for one core's steps, in order.

  One DMA queue at the core's bandwidth serves the copies in the order they are issued.
  An input's copy for step j is issued when step j - (buffers - 1) starts; with lookahead
  (`pl.Buffered(use_lookahead=True)`), as soon as a buffer is free: when the block
  `buffers` copies back is last used. Step j's body runs once its blocks have arrived and
  step j - 1 is done; its output block is written back after it when the index changes.
  Copies the body makes by hand (`by_hand`: `_Scalars.dmas`, in program order, each with
  the seconds of work its step does before it) start when the body reaches them; a wait
  holds the body, and all its work after it, until the oldest copy not yet waited for on
  its semaphore has arrived.
  """
  n = len(compute)
  # Python lists and floats: the loop reads one element at a time, which NumPy makes slow
  compute, write_back = np.asarray(compute).tolist(), np.asarray(write_back).tolist()
  copied = [np.asarray(cp).tolist() for cp, _, _, _ in inputs]
  seconds_in = [np.asarray(nb).tolist() for _, nb, _, _ in inputs]
  by_hand = [(kind, np.asarray(runs).tolist(), np.asarray(key).tolist(), seconds,
              np.asarray(before).tolist()) for kind, runs, key, seconds, before in by_hand]
  start, end = [0.0] * n, [0.0] * n
  dma_free = 0.0
  pending = collections.deque()  # write-backs not yet queued: (issue time, seconds), in order
  arrivals = collections.defaultdict(collections.deque)  # by semaphore: copies made by hand
  # Per input, the steps that copy a block (in order) and when each copy arrives. Copies
  # join the queue when they are issued: the first ones before step 0; then, lookahead,
  # block r when the block `buffers` back is last used (at the start of the step after);
  # else, step j's when step j - (buffers - 1) starts.
  changes = [np.flatnonzero(cp).tolist() for cp, _, _, _ in inputs]
  rank = [(np.cumsum(cp) - 1).tolist() for cp, _, _, _ in inputs]  # step -> its r in changes
  arrival = [dict() for _ in inputs]

  def queue(issue: float, seconds: float) -> float:
    nonlocal dma_free
    while pending and pending[0][0] <= issue:
      t, w = pending.popleft()
      dma_free = max(dma_free, t) + w
    dma_free = max(dma_free, issue) + seconds
    return dma_free

  def issue(q: int, r: int, at: float) -> None:  # input q's r-th block, issued at `at`
    if r < len(changes[q]):
      step = changes[q][r]
      arrival[q][step] = queue(at, seconds_in[q][step])

  for q, (_, _, buffers, lookahead) in enumerate(inputs):
    for r in range(buffers if lookahead else len(changes[q])):
      if lookahead or changes[q][r] < max(buffers - 1, 1):
        issue(q, r, 0.0)
  # lookahead: block r is issued at the step where block r - buffers + 1 is first used
  freed = [({changes[q][r - b + 1]: r for r in range(b, len(changes[q]))} if la else {})
           for q, (_, _, b, la) in enumerate(inputs)]
  shape = [(q, buffers, lookahead) for q, (_, _, buffers, lookahead) in enumerate(inputs)]

  for j in range(n):
    before = end[j - 1] if j else 0.0
    for q, buffers, lookahead in shape:
      if j in freed[q]:
        issue(q, freed[q][j], before)
      elif buffers == 1 and copied[q][j] and j > 0:  # one buffer: copied as its step begins
        issue(q, rank[q][j], before)
    start[j] = max([before] + [a[j] for a in arrival if j in a])
    for q, buffers, lookahead in shape:
      ahead = j + buffers - 1
      if not lookahead and buffers > 1 and ahead < n and copied[q][ahead]:
        issue(q, rank[q][ahead], start[j])
    held = 0.0  # how long the step's waits have held its body so far
    for kind, runs, key, seconds, before in by_hand:
      if not runs[j]:
        continue
      at = start[j] + before[j] + held
      if kind == "start":
        arrivals[int(key[j])].append(queue(at, seconds))
      elif arrivals[int(key[j])]:
        held += max(0.0, arrivals[int(key[j])].popleft() - at)
    end[j] = start[j] + held + compute[j]
    if write_back[j]:
      pending.append((end[j], write_back[j]))
  done = end[-1]
  for t, w in pending:
    dma_free = max(dma_free, t) + w
  return max(done, dma_free)


def _dimension_semantics(params: dict, ndim: int) -> tuple[str, ...]:
  cp = params.get("compiler_params") or {}
  cp = cp.get("mosaic_tpu", cp.get("mosaic")) if isinstance(cp, dict) else cp
  sem = getattr(cp, "dimension_semantics", None)
  if not sem:
    return ("arbitrary",) * ndim
  return tuple(str(getattr(s, "name", s)).lower().replace("dimensionsemantics.", "")
               for s in sem)


def _in_smem(bm) -> bool:
  return str(getattr(bm.block_aval, "memory_space", None)).lower().endswith("smem")


def _memory_space(aval) -> str:
  return str(getattr(aval, "memory_space", None)).lower().split(".")[-1]


def _unpipelined(bm) -> bool:
  """Operands left in HBM (memory_space ANY) or whole in SMEM are not copied per step."""
  return _memory_space(bm.block_aval) in ("any", "hbm", "smem", "semaphore_mem")
