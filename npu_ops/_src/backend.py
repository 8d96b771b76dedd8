"""Which implementation runs a grouped op: XLA, the dense reference, or a Pallas kernel.

`implementation`:
  * None: per *lowering* platform, the Pallas kernel where it has the case (TPU:
    "pallas_tpu", CUDA/ROCm: "pallas_gpu") and "xla" elsewhere. The choice is made
    when the computation is lowered, not from `jax.default_backend()`: an AOT
    compile for a TPU from a CPU host holds the Mosaic kernel, and one
    `jax.export(..., platforms=["tpu", "cuda", "cpu"])` artifact holds all three.
    A case no kernel can do runs "xla" everywhere.
  * "xla": the row-block XLA path (`npu_ops._src.row_blocks`), fast on CPU.
  * "reference": `npu_ops._src.reference`, the semantics as plain whole-array jnp (every
    group over all rows; for checking).
  * "pallas_tpu" / "pallas_gpu": always that kernel; a case it cannot do raises
    NotImplementedError.
`interpret=True` runs a kernel's body in Pallas interpret mode on any backend;
`tiles` overrides the kernel's `TileSizes`.

Every implementation is a `Backend` of `BACKENDS`: what it takes is declared in one place,
its `supports(problem) -> reason | None` (`pallas_kernels.common.Problem`; a kernel
backend's is its module's), with the class of its tile configuration (`config`) and, for
the kernels, their default tiles (the module's `default_tiles(problem)`: on TPU the
`npu_ops.perf` model's choice for the chip being lowered for). Every grouped op is a
`GroupedOp` (its static arguments, and what the kernels, the XLA path and the reference
run for it), which `run` runs on the implementation `resolve` chose.
"""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core
from jax.interpreters import batching, mlir

from npu_ops._src import manual_axes
from npu_ops._src.row_blocks import GmmBlockSizes
from npu_ops._src.validation import check_choice, fail
from pallas_kernels import tpu_tiles
from pallas_kernels.common import Problem, TileSizes

KERNELS: tuple[str, ...] = ("pallas_tpu", "pallas_gpu")
AUTO = "auto"  # `resolve`'s answer for None when a kernel has the case
# Lowering platform -> the kernel that serves it under implementation=None.
KERNEL_OF_PLATFORM = {"tpu": "pallas_tpu", "cuda": "pallas_gpu", "rocm": "pallas_gpu"}


@dataclasses.dataclass(frozen=True)
class Backend:
  """One implementation of the grouped ops (grouped matmul, tgmm, the fused op, MX inputs).

  Attributes:
    name: its `implementation=` name.
    config: the class of its tiles (`TileSizes` for the kernels, the XLA path's row blocks
      `GmmBlockSizes`; None: the reference has none).
    supports: `supports(problem)`: None when it runs `problem`, else the reason it does not.
  """
  name: str
  config: type | None
  supports: Callable[[Problem], str | None]


def _any_problem(problem: Problem) -> None:
  del problem  # the XLA path and the reference run every problem


def _kernel_supports(implementation: str) -> Callable[[Problem], str | None]:
  return lambda problem: kernels(implementation).supports(problem)


BACKENDS: dict[str, Backend] = {
    "xla": Backend("xla", GmmBlockSizes, _any_problem),
    "reference": Backend("reference", None, _any_problem),
    **{k: Backend(k, TileSizes, _kernel_supports(k)) for k in KERNELS}}
IMPLEMENTATIONS: tuple[str, ...] = tuple(BACKENDS)  # "xla", "reference", the kernels


def check(implementation: str | None, interpret: bool = False,
          tiles: TileSizes | None = None) -> None:
  """Trace-time validation of the three dispatch arguments."""
  check_choice("implementation", implementation, (None, *IMPLEMENTATIONS),
               f"None or one of {IMPLEMENTATIONS}")
  if not isinstance(interpret, (bool, np.bool_)):
    fail("interpret", "a bool", repr(interpret), TypeError)
  if tiles is not None and not isinstance(tiles, TileSizes):
    fail("tiles", "None or an npu_ops.TileSizes", repr(tiles), TypeError)


def resolve(implementation: str | None, problem: Problem, *, interpret: bool = False,
            tiles: TileSizes | None = None) -> str:
  """The implementation that runs: one of IMPLEMENTATIONS, or AUTO for None (a kernel or
  XLA, chosen per lowering platform by `run`).

  Args:
    implementation: as asked (see the module docstring).
    problem: the case, as the kernel backends judge it.
    interpret, tiles: validated here.

  Raises:
    NotImplementedError: a kernel asked for by name does not support `problem`.
  """
  check(implementation, interpret, tiles)
  if implementation in KERNELS:
    gap = BACKENDS[implementation].supports(problem)
    if gap is not None:
      others = "".join(f" or {k!r}" for k in KERNELS
                       if k != implementation and BACKENDS[k].supports(problem) is None)
      raise NotImplementedError(
          f"implementation={implementation!r} has no kernel for {gap}; use None (XLA where "
          f"the platform's kernel lacks the case), 'xla'{others}")
  return AUTO if implementation is None else implementation


def kernels(implementation: str) -> types.ModuleType:
  """The kernel module of a Pallas implementation (`supports`, `default_tiles`, kernels)."""
  if implementation == "pallas_tpu":
    from pallas_kernels import tpu  # noqa: PLC0415 (only when asked: imports Mosaic)
    return tpu
  from pallas_kernels import gpu  # noqa: PLC0415 (only when asked: imports Triton)
  return gpu


@dataclasses.dataclass(frozen=True)
class GroupedOp:
  """One grouped op at one call's static arguments: what each implementation runs.

  Each op (`grouped.Matmul`, `grouped.TransposedMatmul`, `fused.Fused`, `fused_mx.FusedMX`) is a
  frozen dataclass of this with its static arguments as fields and three methods, each
  taking the call's array arguments (`args` of `run`):
    * `kernel(module, tiles, *args)`: a kernel module's entry point (`module`: `kernels()`);
    * `xla(*args)`: the XLA path;
    * `reference(*args)`: the semantics as plain whole-array jnp (`npu_ops._src.reference`).

  Attributes:
    problem: the case, as the backends judge it (`Backend.supports`).
    interpret: run a kernel's body in Pallas interpret mode.
    static_ends: the group ends when static (Python ints), else None (an operand).
  """
  problem: Problem
  interpret: bool
  static_ends: tuple[int, ...] | None
  # Ops whose outputs have no derivative (integer codes and their scales): why, and what to
  # differentiate instead; `run` raises it as a TypeError under jvp / grad.
  no_derivative: ClassVar[str | None] = None

  def ends(self, array: jax.Array) -> Any:
    """The group ends: static when they are, else the int32 operand `array`."""
    return array if self.static_ends is None else self.static_ends

  @staticmethod
  def ends_from_row0(array: jax.Array, start: Any) -> jax.Array:
    """The int32 ends counted from row 0 (the kernels' form), for ends from row `start`."""
    return array if start is None else array + start

  def kernel(self, module: types.ModuleType, tiles: TileSizes, *args: Any) -> Any:
    raise NotImplementedError

  def xla(self, *args: Any) -> Any:
    raise NotImplementedError

  def reference(self, *args: Any) -> Any:
    raise NotImplementedError


def run(op: GroupedOp, impl: str, args: Sequence[Any], tiles: TileSizes | None = None) -> Any:
  """Runs `op` on `args` with a resolved implementation (`resolve`).

  A kernel runs with `tiles` (given, or its module's `default_tiles(op.problem)`).
  AUTO becomes a per-platform choice made at lowering (`platform_select`): the
  platform's kernel where it supports the problem, else XLA. A kernel asked for by name
  and lowered for CPU without `interpret` raises a ValueError saying how to fix it. The
  output shapes come from the reference (whole-array jnp, quick to trace), so a lowering
  traces only the branch it lowers.
  """
  if untraced(args):
    try:
      program = _program(op, impl, tiles, tpu_tiles.CHIP.get())
    except TypeError:  # static arguments JAX cannot hash (an unhashable interpret option)
      program = None
    if program is not None:  # an eager call: one compiled program, not its ops one by one
      return program(*args)
  if op.no_derivative is not None:
    return _without_derivative(op.no_derivative, lambda *a: _run(op, impl, a, tiles), args)
  return _run(op, impl, args, tiles)


def untraced(tree: Any) -> bool:
  """Whether no leaf of `tree` is traced: an eager call (outside jit, grad, vmap)."""
  return not any(isinstance(a, jax.core.Tracer) for a in jax.tree.leaves(tree))


@functools.lru_cache(maxsize=256)
def _program(op: GroupedOp, impl: str, tiles: TileSizes | None, chip: str | None
             ) -> Callable[..., Any]:
  """An eager call's program: op by op, the XLA path's epilogue or the reference compiled
  each small op on its first call (dozens of programs; docs/performance.md). One per
  `tpu_tiles.CHIP` too: a kernel in interpret mode takes its tiles and cores from the chip
  set when it is traced."""
  del chip  # a key only
  return jax.jit(lambda *args: run(op, impl, args, tiles))


def _without_derivative(message: str, fn: Callable[..., Any], args: Sequence[Any]) -> Any:
  """`fn(*args)`, raising TypeError(message) when differentiated (the XLA path's loops and
  the platform choice would fail with JAX's internal errors, naming nothing of ours)."""
  @jax.custom_jvp
  def f(*a):
    return fn(*a)

  @f.defjvp
  def _(primals, tangents):
    raise TypeError(message)
  return f(*args)


def _run(op: GroupedOp, impl: str, args: Sequence[Any], tiles: TileSizes | None) -> Any:
  def on(name: str) -> Callable[..., Any]:
    def branch(*a):
      if BACKENDS[name].supports(op.problem) is not None:  # AUTO only: named ones were checked
        return op.xla(*a)
      module = kernels(name)
      return op.kernel(module, tiles or module.default_tiles(op.problem), *a)
    return branch

  if impl == "reference":
    return op.reference(*args)
  if impl in KERNELS and op.interpret:
    return on(impl)(*args)
  if impl in KERNELS:
    return platform_select(args, {"cpu": _needs_interpret(impl)}, default=on(impl),
                           shapes=op.reference)
  if impl != AUTO:
    return op.xla(*args)
  return platform_select(args, {p: on(k) for p, k in KERNEL_OF_PLATFORM.items()}, default=op.xla,
                         shapes=op.reference)


def _needs_interpret(impl: str) -> Callable[..., Any]:
  def cpu(*args):
    del args
    raise ValueError(f"implementation={impl!r} was lowered for CPU, where a Pallas kernel runs "
                     "only in interpret mode: pass interpret=True, or implementation=None / "
                     "'xla' for the XLA path (an AOT compile for TPU/GPU lowers the kernel)")
  return cpu


# --- per-platform choice at lowering ------------------------------------------------------
# `jax.lax.platform_dependent` lowers every kept branch for all the module's platforms,
# and a Pallas call has no CPU lowering, so a multi-platform export fails. This primitive
# lowers each branch with `mlir.lower_fun` for its own platform only (JAX restricts the
# platforms of a rule registered per platform), and traces a branch only when it is
# lowered: a CPU program never traces the kernels.

_select_p = jex_core.Primitive("npu_ops_platform_select")
_select_p.multiple_results = True


def platform_select(args: Sequence[Any], branches: dict[str, Callable[..., Any]], *,
                    default: Callable[..., Any], shapes: Callable[..., Any] | None = None) -> Any:
  """`branches[platform](*args)` on the platforms named, `default(*args)` elsewhere.

  `args` may be pytrees (QArrays, None for an absent operand). Every branch returns the
  same pytree of arrays, whose shapes `jax.eval_shape(shapes or default, *args)` gives
  (`shapes`: a function with the same results that is cheaper to trace). Outside of a
  trace the branch of `jax.default_backend()` runs directly.
  """
  args = tuple(args)
  flat_args, args_tree = jax.tree.flatten(args)
  if untraced(flat_args):
    return branches.get(jax.default_backend(), default)(*args)
  out_shapes = jax.eval_shape(shapes or default, *args)
  axes = manual_axes.union(flat_args)  # the results vary where any operand does (shard_map)
  flat_shapes, tree = jax.tree.flatten(out_shapes)
  flat = lambda f: (lambda *a: jax.tree.leaves(f(*jax.tree.unflatten(args_tree, a))))
  outs = _select_p.bind(*flat_args, branches=tuple((p, flat(f)) for p, f in branches.items()),
                        default=flat(default),
                        out_avals=tuple(manual_axes.shaped_array(s.shape, s.dtype, axes)
                                        for s in flat_shapes))
  return jax.tree.unflatten(tree, outs)


def _select_impl(*args, **params):
  return jax.jit(lambda *a: _select_p.bind(*a, **params))(*args)


def _select_abstract_eval(*args, branches, default, out_avals):
  del args, branches, default
  return out_avals


def _select_batch(args, dims, *, branches, default, out_avals):
  size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)  # None: not mapped
  args = [a if d is None else jnp.moveaxis(a, d, 0) for a, d in zip(args, dims)]
  in_axes = tuple(None if d is None else 0 for d in dims)
  vmapped = lambda f: jax.vmap(f, in_axes=in_axes)
  outs = _select_p.bind(
      *args, branches=tuple((p, vmapped(f)) for p, f in branches),
      default=vmapped(default),
      out_avals=tuple(manual_axes.shaped_array((size,) + a.shape, a.dtype, manual_axes.union(a))
                      for a in out_avals))
  return outs, [0] * len(outs)


def _lowering(platform: str | None):
  def rule(ctx, *args, branches, default, out_avals):
    del out_avals
    fn = dict(branches).get(platform, default)
    token = tpu_tiles.CHIP.set(_tpu_chip(ctx) if platform == "tpu" else None)
    try:  # the TPU kernels' default tiles are the chip's (`pallas_kernels.tpu_tiles`)
      return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)
    finally:
      tpu_tiles.CHIP.reset(token)
  return rule


def _tpu_chip(ctx) -> str | None:
  """The TPU generation a lowering is for: its backend's devices (a TPU host, or the
  compile-only devices of an AOT compile); None when unknown (e.g. `jax.export`)."""
  try:
    return tpu_tiles.chip_of_kind(ctx.module_context.backend.devices()[0].device_kind)
  except Exception:  # noqa: BLE001 (no backend, or one without devices: the default chip)
    return None


_select_p.def_impl(_select_impl)
_select_p.def_abstract_eval(_select_abstract_eval)
batching.primitive_batchers[_select_p] = _select_batch
mlir.register_lowering(_select_p, _lowering(None))
for _platform in (*KERNEL_OF_PLATFORM, "cpu"):
  mlir.register_lowering(_select_p, _lowering(_platform), platform=_platform)
