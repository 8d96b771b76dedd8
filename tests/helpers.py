"""Shared test helpers: input builders and the tolerances of docs/semantics.md."""

from __future__ import annotations

import ml_dtypes
import numpy as np

import numpy_reference as ref


def assert_int8_close(got, want, *, min_exact: float = 0.999):
  """int8 outputs: |diff| <= 1 everywhere and at least 99.9% exact (issue 2)."""
  got = np.asarray(got).astype(np.int64)
  want = np.asarray(want).astype(np.int64)
  assert got.shape == want.shape, (got.shape, want.shape)
  diff = np.abs(got - want)
  assert diff.max(initial=0) <= 1, f"max |diff| = {diff.max()}"
  exact = np.mean(diff == 0) if diff.size else 1.0
  assert exact >= min_exact, f"only {exact:.4%} exact"


def assert_scale_close(got, want, rtol=1e-5):
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=rtol, atol=0)


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
