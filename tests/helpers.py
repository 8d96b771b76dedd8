"""Shared test helpers: input builders and the tolerances of docs/semantics.md."""

from __future__ import annotations

import contextlib
import faulthandler

import ml_dtypes
import numpy as np

import numpy_reference as ref


def assert_int8_equal(got, want):
  """int8 codes: every code equal to the golden's (README: bit-exact int8 codes)."""
  got = np.asarray(got)
  want = np.asarray(want)
  assert got.shape == want.shape, (got.shape, want.shape)
  np.testing.assert_array_equal(got.astype(np.int64), want.astype(np.int64))


@contextlib.contextmanager
def ends_within(seconds: float):
  """Ends the test process, with every thread's traceback, if the block runs longer: the
  TPU interpreter that runs copies on wait (`pltpu.InterpretParams`) waits forever on a
  copy that was never started, and a crashed worker is a failed test, not a stalled run."""
  faulthandler.dump_traceback_later(seconds, exit=True)
  try:
    yield
  finally:
    faulthandler.cancel_dump_traceback_later()


def ulp_distance(got, want) -> np.ndarray:
  """|got - want| in float32 ulps (units in the last place): the distance between the two
  float32 values counted in representable numbers (sign-magnitude bits, so 0 == -0)."""
  def ordered(a):
    bits = np.asarray(a, np.float32).view(np.int32).astype(np.int64)
    return np.where(bits < 0, -(bits & 0x7FFFFFFF), bits)
  return np.abs(ordered(got) - ordered(want))


# Per-token scales against the golden: amax / 127 is correctly rounded on both sides, so
# they differ only where the amax does, i.e. through SwiGLU's exp (NumPy's in the golden,
# XLA's in the op; each within an ulp of exp, so up to 2 apart): silu(a) = a / (1 + exp(-a))
# then rounds 1 + exp(-a) (<= 2 ulps apart), the quotient (+ 1: 3) and the product with the
# gate (+ 1: 4) once each, and a correctly rounded amax / 127 can add one more across a
# binade: 5. Measured: 0 ulps for most rows, 3 on the fixed cases (A8W8 per-block epilogue,
# A8W4 MSD with float32 partial sums, the QAT fused forward), 4 once in CI's random examples
# (A4W4, k=48, n=16: hypothesis seed 812281536), codes all equal. Kernel vs XLA path: 0 ulps
# (test_implementations compares those bit for bit), and the division itself is checked bit
# for bit against NumPy's IEEE one (test_ties).
SCALE_ULPS = 5


def assert_scale_close(got, want, max_ulps=SCALE_ULPS):
  """float32 scales within `max_ulps` ulps each (see SCALE_ULPS for the bound's reason);
  `max_ulps` may be an array, a bound per scale."""
  got = np.asarray(got)
  want = np.asarray(want)
  assert got.shape == want.shape, (got.shape, want.shape)
  d = ulp_distance(got, want)
  over = d - np.broadcast_to(max_ulps, d.shape)
  assert over.max(initial=0) <= 0, (
      f"{d.flat[over.argmax()]} ulps (bound {np.broadcast_to(max_ulps, d.shape).flat[over.argmax()]})"
      f" at {np.unravel_index(over.argmax(), d.shape)}: "
      f"{got.flat[over.argmax()]!r} vs {want.flat[over.argmax()]!r}")


def counts_to_list(counts, group_list_type: int):
  counts = [int(c) for c in counts]
  return list(np.cumsum(counts)) if group_list_type == 0 else counts


def int4_array(values) -> np.ndarray:
  return np.asarray(values, np.int8).astype(ml_dtypes.int4)


def encode_int4_weight(w: np.ndarray, form: str):
  """int4 values [e, k, n] in one of the torch_npu storage forms."""
  if form == "words_nd":
    return ref.pack_int4(w)
  if form == "words_nz":
    return ref.nd_to_nz(ref.pack_int4(w), 8)
  if form == "int4_nd":
    return int4_array(w)
  if form == "int4_nz":
    return ref.nd_to_nz(w.astype(np.int8), 64).astype(ml_dtypes.int4)
  if form == "words_list":
    return [ref.pack_int4(wi) for wi in w]
  raise ValueError(form)


def encode_int8_weight(w: np.ndarray, form: str):
  if form == "nd":
    return w
  if form == "nz":
    return ref.nd_to_nz(w, 32)
  if form == "list_e":
    return list(w)
  if form == "list_1":
    return [w]
  if form == "list_e_nz":
    return [ref.nd_to_nz(wi, 32) for wi in w]
  raise ValueError(form)
