"""Test configuration: CPU, x64 off (the JAX default users run with), hypothesis profile.

`NPU_OPS_TEST_DEVICE=gpu|tpu` (set by `python -m npu_ops.tools.accelerator_check`) leaves the
platform to JAX and runs that platform's Pallas kernel natively (`implementations`)."""

import os
import sys

if not os.environ.get("NPU_OPS_TEST_DEVICE"):
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))

# Most of the suite's time is XLA compiling. JAX's persistent compilation cache keeps every
# compiled program in `.jax_cache/` (the key is the program itself, so a changed function
# compiles anew): a rerun of README's quick command takes about a fifth less than the first
# (docs/performance.md, "Compile time").
# Set before JAX is imported, so the notebooks' kernels and the mutants' runs (subprocesses)
# share it; an executable for a compile-only TPU cannot be read back (JAX warns and
# compiles it again: pyproject's filterwarnings). NPU_OPS_TEST_COMPILATION_CACHE=0: off;
# JAX_COMPILATION_CACHE_DIR: elsewhere.
if os.environ.get("NPU_OPS_TEST_COMPILATION_CACHE", "1") != "0":
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
      os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".jax_cache"))
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Most tests compile a small program and run it once, so XLA:CPU's code generation costs
# more than it saves: LLVM at -O0 without its expensive passes
# (`jax_disable_most_optimizations`), and fusions emitted by XLA's elemental IR emitter
# instead of its MLIR fusion emitters (which build and optimize an MLIR module per fusion
# whatever the LLVM level). XLA's HLO passes run as always: the elemental emitter gives the
# same bits as the fusion emitters (but cannot compile a bitcast of float4_e2m1fn values to
# uint4, an XLA bug: the reference path's MX fp4 output under jit, which no test compiles),
# and -O0 the same but for the order in which a vectorized float reduction adds (an ulp or
# two; integers exact). Together they halve the suite's compile time (docs/performance.md,
# "Compile time"). Inherited by what the tests spawn; the exceptions run as users run them:
# the compile-only accelerator builds (test_aot) and the QAT notebook, which trains for
# minutes (`users_compiler`).
# NPU_OPS_TEST_FAST_COMPILE=0: XLA's defaults everywhere.
FAST_COMPILE_XLA_FLAG = "--xla_cpu_use_fusion_emitters=false"
if os.environ.get("NPU_OPS_TEST_FAST_COMPILE", "1") != "0":
  os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
  if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_XLA_FLAG}".strip()

import hypothesis  # noqa: E402

# Each example compiles new shapes. `ci` (the default, what CI runs): 10 new random examples
# per property every run (not derandomized: each run explores other inputs); a failure
# prints the falsifying example and the seed to rerun it (`pytest --hypothesis-seed=N`).
# HYPOTHESIS_PROFILE=thorough for 200.
hypothesis.settings.register_profile(
    "ci", max_examples=10, deadline=None, derandomize=False, print_blob=True,
    database=None, suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.register_profile(
    "thorough", max_examples=200, deadline=None, print_blob=True,
    suppress_health_check=[hypothesis.HealthCheck.too_slow])
hypothesis.settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.hookimpl(trylast=True)  # after hypothesis' own plugin has read --hypothesis-seed
def pytest_configure(config):
  """One seed per run, chosen here unless given, passed to xdist workers through the
  environment, and printed at the start and end of the run: rerun a failure with
  `pytest --hypothesis-seed=N` (or NPU_OPS_HYPOTHESIS_SEED=N)."""
  import random  # noqa: PLC0415

  from hypothesis import core  # noqa: PLC0415
  seed = (config.getoption("hypothesis_seed", None)
          or os.environ.get("NPU_OPS_HYPOTHESIS_SEED") or random.getrandbits(32))
  os.environ["NPU_OPS_HYPOTHESIS_SEED"] = str(seed)
  core.global_force_seed = int(seed)
  # xdist: one test at a time per worker (unless asked otherwise), so that with the
  # longest tests first (`pytest_collection_modifyitems`) the workers finish together
  if getattr(config.option, "maxschedchunk", 0) is None:
    config.option.maxschedchunk = 1


@pytest.fixture
def users_compiler(monkeypatch):
  """XLA:CPU at its defaults, as users run it, for the processes a test spawns (the
  fast-compile settings above off)."""
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
  monkeypatch.setenv("XLA_FLAGS", " ".join(
      f for f in os.environ.get("XLA_FLAGS", "").split() if f != FAST_COMPILE_XLA_FLAG))


@pytest.fixture(params=["fast", pytest.param("optimized", marks=pytest.mark.slow)])
def compiler(request):
  """Runs a test twice: with the suite's fast-compile settings, and (in the slow set: its
  compiles cost more, and it clears JAX's caches around it) with XLA:CPU's LLVM at its
  default level (in process, the elemental emitter kept). Tests of subnormal and NaN
  edges take it: LLVM folds some bit tests into float compares there (`(bits & 0x7FFFFFFF)
  != 0` into `x != 0`, which reads a subnormal x as 0), which -O0 never does."""
  if request.param == "fast":
    yield request.param
    return
  before = jax.config.values["jax_disable_most_optimizations"]
  jax.clear_caches()  # executables compiled at -O0 would be reused
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield request.param
  finally:
    jax.config.update("jax_disable_most_optimizations", before)
    jax.clear_caches()


def pytest_collection_modifyitems(config, items):
  """Longest first: the slow tests (the notebooks, the bench, the mutants: up to minutes
  each; notebooks first) run before the rest. xdist hands each worker one test at a time
  (`pytest_configure`), so this is list scheduling, longest first: no worker is left
  finishing a long test while the other idles."""
  del config
  rank = lambda item: (0 if "notebook" in item.name else 1) if item.get_closest_marker("slow") else 2
  items[:] = sorted(items, key=rank)  # stable: the collection order within each rank


def pytest_report_header(config):
  return f"hypothesis seed: {os.environ['NPU_OPS_HYPOTHESIS_SEED']} (rerun: --hypothesis-seed=N)"


def pytest_terminal_summary(terminalreporter):
  terminalreporter.write_line(
      f"hypothesis seed: {os.environ['NPU_OPS_HYPOTHESIS_SEED']} "
      f"(rerun with --hypothesis-seed={os.environ['NPU_OPS_HYPOTHESIS_SEED']})")
