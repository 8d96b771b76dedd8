"""Mutation check (issue 34, item 7): each mutant below breaks one claim of README /
docs/semantics.md in a copy of the package; the tests named beside it must fail on it.

    python tests/mutation_check.py            # every mutant (~5-8 min on 2 cores)
    python tests/mutation_check.py gpu_half_up swiglu_order

Each run copies npu_ops/, pallas_kernels/ and tests/ to a temporary directory, applies one
textual replacement (which must match exactly once), and runs only the targeted tests there
(`-x`, stop at the first failure). A mutant survives when those tests pass (exit 0) or
select nothing (exit 5); the script exits 1 if any survived. `test_mutants.py` (slow set)
runs it."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  path: str   # relative to the repository root
  old: str
  new: str
  tests: tuple[str, ...]  # pytest arguments: the tests that must kill it


MUTANTS = (
    # fp8 codes (every implementation: the GPU kernel quantizes with the XLA path's
    # `float8_bits`) rounded half up instead of half to even.
    Mutant("fp8_half_up", "pallas_kernels/epilogue.py",
           "  normal = ((mag + ((1 << (drop - 1)) - 1) + ((mag >> drop) & 1)) >> drop) - (",
           "  normal = ((mag + (1 << (drop - 1))) >> drop) - (",
           ("tests/test_ties.py", "-k", "fp8 and pallas_gpu")),
    # The XLA path's int8 rounding half up (the ties reach it too).
    Mutant("xla_half_up", "pallas_kernels/epilogue.py",
           "  return round_fn(v).astype(dtype)",
           "  return jnp.floor(v + 0.5).astype(dtype)",
           ("tests/test_ties.py", "-k", "int8 and xla")),
    # FastGELU (act_type 4) computed as GELU-tanh (act_type 2).
    Mutant("fast_gelu_as_tanh", "npu_ops/_src/quant.py",
           "  if act_type == ACT_FAST_GELU:  # x * sigmoid(1.702 x), in the overflow-free form of the kernel\n",
           "  if act_type == ACT_FAST_GELU:  # x * sigmoid(1.702 x), in the overflow-free form of the kernel\n"
           "    return 0.5 * x * (1 + jnp.tanh(np.sqrt(2 / np.pi).astype(np.float32) * (x + 0.044715 * x**3)))\n",
           ("tests/test_npu_grouped_matmul.py", "-k", "activations")),
    # The GPU kernel's per-token fp8 codes one step up for ~1% of the entries.
    Mutant("gpu_fp8_one_step", "pallas_kernels/gpu.py",
           "    q, qs = epilogue.quantize_rows(s, qmax=qmax, dtype=out_dtype, as_bits=True)\n",
           "    q, qs = epilogue.quantize_rows(s, qmax=qmax, dtype=out_dtype, as_bits=True)\n"
           "    q = jnp.where((jnp.abs(s) * 4096.0) % 100.0 < 1.0, q + 1, q)\n",
           ("tests/test_fp8_mx.py", "-k", "kernels_fp8_per_token and pallas_gpu")),
    # The per-token scale amax / 127 as amax * (1 / 127), not correctly rounded.
    Mutant("scale_division", "pallas_kernels/epilogue.py",
           "  for _ in range(2):  # each round moves at most one ulp",
           "  for _ in range(0):  # each round moves at most one ulp",
           ("tests/test_ties.py", "-k", "correctly_rounded")),
    # SwiGLU's halves swapped: silu(gate) * act.
    Mutant("swiglu_order", "pallas_kernels/epilogue.py",
           "  return silu(act) * gate", "  return silu(gate) * act",
           ("tests/test_implementations.py", "-k", "fused_op and A8W8 and xla")),
    # silu differentiated as written: inf / inf (NaN) where exp(-x) overflows.
    Mutant("silu_grad_nan", "pallas_kernels/epilogue.py",
           "  return silu(x), t * silu_grad(x)",
           "  return jax.jvp(lambda x: x / (1 + jnp.exp(-x)), (x,), (t,))",
           ("tests/test_qat.py", "-k", "exp_overflows")),
    # silu's second derivative by autodiff of its first, whose overflowed x-products meet
    # the sigmoid's vanishing derivative: 0 * inf.
    Mutant("silu_second_derivative_nan", "pallas_kernels/epilogue.py",
           "  return silu_grad(x), t * silu_derivative(2, x)",
           "  return jax.jvp(lambda x: jax.nn.sigmoid(x) * (1 + x * (1 - jax.nn.sigmoid(x))), (x,),"
           " (t,))",
           ("tests/test_qat.py", "-k", "second_and_third")),
    # The dynamic scale's largest |x| counted as clipped where x * fl(qmax / amax) > qmax.
    Mutant("dynamic_max_clipped", "npu_ops/_src/qat.py",
           "  inside = jnp.abs(v) <= qmax if clips else jnp.ones(v.shape, bool)",
           "  inside = jnp.abs(v) <= qmax",
           ("tests/test_qat.py", "-k", "tied_maxima")),
    # MX scale byte 0 (2**-127, a float32 subnormal) used as an operand: XLA:CPU reads 0.
    Mutant("mx_subnormal_scale", "npu_ops/_src/quant.py",
           "  return (jnp.where(b == 0, v * 0.5, v) * epilogue.e8m0_to_float32(jnp.maximum(b, 1))).astype(out)",
           "  return (v * epilogue.e8m0_to_float32(b)).astype(out)",
           ("tests/test_fp8_mx.py", "-k", "either_end")),
    # B.6's weight left unrounded after the scale (XLA keeps a bf16 product in float32).
    Mutant("antiquant_unrounded", "npu_ops/_src/weight_quant.py",
           "  return _rounded(wf * scale.astype(inter), dtype).astype(dtype)\n",
           "  return (wf * scale.astype(inter)).astype(dtype)\n",
           ("tests/test_quant_matmul.py", "-k", "rounds_the_weight")),
    # fp8 codes of NaN (a row holding inf) encoded as if finite: a wrong-signed number.
    Mutant("fp8_nan_as_number", "pallas_kernels/epilogue.py",
           "  if width == 8:  # a row with inf gives NaN codes",
           "  if False:  # a row with inf gives NaN codes",
           ("tests/test_fp8_mx.py", "-k", "float8_bits_equal")),
    # Group boundaries one row late (dynamic counts).
    Mutant("group_boundaries", "npu_ops/_src/groups.py",
           "      return jnp.minimum(jnp.cumsum(sizes, dtype=jnp.int32), m)",
           "      return jnp.minimum(jnp.cumsum(sizes, dtype=jnp.int32) + 1, m)",
           ("tests/test_implementations.py", "-k", "fused_op and A8W8 and xla")),
    # A visit skips a row block that holds rows of its group (the TPU kernels' row blocks).
    Mutant("row_blocks_skip", "pallas_kernels/tpu.py",
           "  last = jnp.minimum(lax.div(jnp.maximum(hi - r0 + sub - 1, 0), sub), nb)",
           "  last = jnp.minimum(lax.div(jnp.maximum(hi - r0, 0), sub), nb)",
           ("tests/test_pallas.py", "-k", "row_blocks")),
    # A group's row blocks from its first row rounded up (its first rows skipped).
    Mutant("row_blocks_start_late", "pallas_kernels/tpu.py",
           "    start = lax.div(jnp.clip(lo - r0, 0, bm), ROW_ALIGN) * ROW_ALIGN",
           "    start = lax.div(jnp.clip(lo - r0, 0, bm) + ROW_ALIGN - 1, ROW_ALIGN) * ROW_ALIGN",
           ("tests/test_implementations.py", "-k", "first_row")),
    # The v5p row tiles cut at the middle tile, not where the cores' MXU work is even.
    Mutant("cores_cut_at_the_middle", "pallas_kernels/tpu_visits.py",
           "      _, cut, _ = lax.fori_loop(1, m_tiles, best_cut, (0, 1, jnp.iinfo(jnp.int32).max))",
           "      cut = jnp.int32(common.cdiv(m_tiles, 2))",
           ("tests/test_pallas.py", "-k", "split_between_two_cores")),
    # The TPU kernels' metadata (on the scalar unit): a head or tail visit reads the next
    # real visit's row tile even where one precedes it (a copy the old form saves).
    Mutant("visits_read_the_next_real_tile", "pallas_kernels/tpu_visits.py",
           "      src = jnp.where(real(t), t, jnp.where(before >= 0, before, jnp.minimum(after, bound - 1)))",
           "      src = jnp.where(real(t), t, jnp.minimum(after, bound - 1))",
           ("tests/test_pallas.py", "-k", "scalar_unit")),
    # The fused kernel's grid takes a step per visit (the steps past its row tiles' empty).
    Mutant("grid_of_the_visits", "pallas_kernels/tpu.py",
           "grid=(cores, _steps(steps.count if by_hand else v.count), k_tiles)",
           "grid=(cores, _steps(v.count), k_tiles)",
           ("tests/test_perf.py", "-k", "no_more_steps_than_rows")),
    # The model lets a kernel's body run before the copy it waits for (made by hand) arrives.
    Mutant("by_hand_waits_ignored", "npu_ops/perf/model.py",
           "        held += max(0.0, arrivals[int(key[j])].popleft() - at)",
           "        arrivals[int(key[j])].popleft()",
           ("tests/test_perf.py", "-k", "copies_made_by_hand")),
    # The model places every copy made by hand at its step's start, not where the work
    # reaches it: a wait after some work holds the whole step.
    Mutant("waits_placed_at_the_step_start", "npu_ops/perf/model.py",
           "      at = start[j] + before[j] + held",
           "      at = start[j] + held",
           ("tests/test_perf.py", "-k", "wait_holds_only or waits_hold")),
    # Two weight buffers wherever VMEM would hold more: a hot expert's visits copy one
    # expert ahead only.
    Mutant("weight_ring_of_two", "pallas_kernels/tpu.py",
           "MAX_WEIGHT_BUFFERS = 4\n", "MAX_WEIGHT_BUFFERS = 2\n",
           ("tests/test_perf.py", "-k", "run_ahead")),
    # The kernels read a run's weights from the buffer the next run's are copied into.
    Mutant("weights_read_from_the_next_buffer", "pallas_kernels/tpu.py",
           "  return w_buf.at[lax.rem(run, ring)], wait",
           "  return w_buf.at[lax.rem(run + 1, ring)], wait",
           ("tests/test_pallas.py", "-k", "waits_for_the_weights")),
    # A visit copies a run further ahead than the ring holds: into the buffer of the run
    # being read (a long run's visits would overwrite their own weights).
    Mutant("weights_copied_past_the_ring", "pallas_kernels/tpu.py",
           "  reach = jnp.minimum(seq + 1, run + ring - 1)  # run + 1 at a core's first visit\n"
           "  new = first | (reach > jnp.minimum(seq, prev_run + ring - 1))\n",
           "  reach = jnp.minimum(seq + 1, run + ring)\n"
           "  new = first | (reach > jnp.minimum(seq, prev_run + ring))\n",
           ("tests/test_pallas.py", "-k", "waits_for_the_weights")),
    # tgmm writes a group's output tile into a ring buffer whose last copy to HBM it has
    # not waited for (the copy may read the new tile).
    Mutant("output_buffer_written_before_its_copy_ends", "pallas_kernels/tpu.py",
           "        pl.when(q >= ring)(lambda: copy(q - ring, lambda c: c.wait()))\n",
           "",
           ("tests/test_pallas.py", "-k", "writes_its_output_tiles")),
    # tgmm copies an output tile to HBM from the buffer of the tile after it.
    Mutant("output_copied_from_the_next_buffer", "pallas_kernels/tpu.py",
           "      slot = lax.rem(q, ring)\n      for rows, in_k",
           "      slot = lax.rem(q + 1, ring)\n      for rows, in_k",
           ("tests/test_pallas.py", "-k", "writes_its_output_tiles")),
    # tgmm's step loops over its row tile's first visit only (a cold group sharing the
    # tile would keep its zeros).
    Mutant("tgmm_step_takes_one_visit", "pallas_kernels/tpu.py",
           "      lax.fori_loop(first_ref[s], first_ref[s + 1], visit, 0)\n    else:\n      visit(s, 0)\n\n  # x and dy",
           "      lax.fori_loop(first_ref[s], first_ref[s] + 1, visit, 0)\n    else:\n      visit(s, 0)\n\n  # x and dy",
           ("tests/test_pallas.py", "-k", "writes_its_output_tiles")),
    # gmm's step loops over its row tile's first visit only.
    Mutant("gmm_step_takes_one_visit", "pallas_kernels/tpu.py",
           "      lax.fori_loop(first_ref[s], first_ref[s + 1], visit, 0)\n    else:\n      visit(s, 0)\n\n  resident",
           "      lax.fori_loop(first_ref[s], first_ref[s] + 1, visit, 0)\n    else:\n      visit(s, 0)\n\n  resident",
           ("tests/test_pallas.py", "-k", "gmm_waits_for_the_weights")),
    # The fused kernel's step loops over its row tile's first visit only.
    Mutant("fused_step_takes_one_visit", "pallas_kernels/tpu.py",
           "      lax.fori_loop(first_ref[at], first_ref[at + 1], visit, 0)",
           "      lax.fori_loop(first_ref[at], first_ref[at] + 1, visit, 0)",
           ("tests/test_pallas.py", "-k", "fused_kernel_waits_for_the_weights")),
    # An expert's own operands (weight scales, A8W4's assist) read without waiting for
    # their copy.
    Mutant("expert_operands_not_waited", "pallas_kernels/tpu.py",
           '    pl.when(starts)(lambda: _each(own_of(run, lax.rem(run, ring)), "wait"))',
           "    pass",
           ("tests/test_pallas.py", "-k", "fused_kernel_waits_for_the_weights")),
    # An expert's weight scales read from the ring buffer of the run after it.
    Mutant("expert_scales_from_the_next_buffer", "pallas_kernels/tpu.py",
           "      s_ref = side_bufs[0].at[slot]",
           "      s_ref = side_bufs[0].at[lax.rem(slot + 1, w_buf.shape[0])]",
           ("tests/test_pallas.py", "-k", "fused_kernel_waits_for_the_weights")),
    # gmm's column scales read from the ring buffer of the run after it.
    Mutant("gmm_scales_from_the_next_buffer", "pallas_kernels/tpu.py",
           "          cs_ref = cs_buf.at[lax.rem(run, w_buf.shape[0])]",
           "          cs_ref = cs_buf.at[lax.rem(run + 1, w_buf.shape[0])]",
           ("tests/test_pallas.py", "-k", "copies_its_column_scales")),
    # tgmm copies an edge tile (k or n past the tiles) at the whole tile's shape.
    Mutant("tgmm_edge_copied_whole", "pallas_kernels/tpu.py",
           "  return [(block, index < tiles - 1), (last, index == tiles - 1)]",
           "  return [(block, True)]",
           ("tests/test_pallas.py", "-k", "writes_its_output_tiles")),
    # The fused kernel's lane-dense scales turned into columns without the diagonal mask:
    # every row would take the largest x_scale of its 128.
    Mutant("scales_to_column_unmasked", "pallas_kernels/tpu.py",
           "        jnp.max(jnp.where(_diagonal(lanes), row, _LEAST), axis=1, keepdims=True))",
           "        jnp.max(row, axis=1, keepdims=True))",
           ("tests/test_implementations.py", "-k", "test_fused_op and A8W8-pallas_tpu")),
    # The output's scales written back from the column's first row only.
    Mutant("scales_to_rows_first_only", "pallas_kernels/tpu.py",
           "    rows_ref[j] = _float(jnp.max(jnp.where(_diagonal(lanes), col, _LEAST), axis=0,",
           "    rows_ref[j] = _float(jnp.max(jnp.where(_diagonal(lanes), col[:1], _LEAST), axis=0,",
           ("tests/test_implementations.py", "-k", "test_fused_op and A8W8-pallas_tpu")),
    # The kernels read a run's weights without waiting for their copy.
    Mutant("weights_not_waited", "pallas_kernels/tpu.py",
           "    pl.when(starts)(lambda: copy_of(run, lax.rem(run, ring), p).wait())",
           "    pass",
           ("tests/test_pallas.py", "-k", "waits_for_the_weights")),
    # The kernels wait for the first piece of a run's weights only, and multiply the
    # others as they are.
    Mutant("only_the_first_piece_waited", "pallas_kernels/tpu.py",
           "  def piece(p, carry):\n    wait(p)\n",
           "  def piece(p, carry):\n    pl.when(p == 0)(lambda: wait(p))\n",
           ("tests/test_pallas.py", "-k", "waits_for_the_weights")),
    # gmm's copy for the next column tile's first run takes the current column tile.
    Mutant("gmm_next_column_tile_copied_from_this_one", "pallas_kernels/tpu.py",
           "cols_of = lambda r: pl.ds(pl.multiple_of(lax.div(r, per_tile) * bn, 128), bn)",
           "cols_of = lambda r: pl.ds(pl.multiple_of(j * bn, 128), bn)",
           ("tests/test_pallas.py", "-k", "gmm_waits_for_the_weights")),
    # int32 words read k-minor without the transpose back (the TPU's layout of the words).
    Mutant("words_k_minor_untransposed", "pallas_kernels/tpu.py",
           "w_ref[:, rows].T if words_k_minor",
           "w_ref[:, rows].T[::-1] if words_k_minor",
           ("tests/test_implementations.py", "-k", "int4_words")),
    # tgmm's contraction in 128-row blocks on a 256-wide MXU (half its rate).
    Mutant("tgmm_narrow_blocks", "pallas_kernels/tpu.py",
           "  block = max(ROW_BLOCK, tpu_tiles.mxu_width(tpu_tiles.current_chip()))",
           "  block = ROW_BLOCK",
           ("tests/test_perf.py", "-k", "tgmm_takes")),
    # int4 nibbles unpacked high first instead of low first.
    Mutant("int4_nibble_order", "npu_ops/_src/layouts.py",
           "  up = jnp.asarray([28 - 4 * t for t in range(INT4_PER_INT32)], jnp.int32)",
           "  up = jnp.asarray([4 * t for t in range(INT4_PER_INT32)], jnp.int32)",
           ("tests/test_layouts.py",)),
    # NZ fractals read with their 16 rows reversed.
    Mutant("nz_layout", "npu_ops/_src/layouts.py",
           "  b = b.transpose(*range(nb), nb + 1, nb + 2, nb, nb + 3)\n"
           "  return back(b.reshape(*batch, r1 * NZ_ROWS, c1 * c0)[..., :rows, :cols])",
           "  b = b.transpose(*range(nb), nb + 1, nb + 2, nb, nb + 3)\n"
           "  b = jnp.flip(b, nb + 1)  # rows reversed within each fractal\n"
           "  return back(b.reshape(*batch, r1 * NZ_ROWS, c1 * c0)[..., :rows, :cols])",
           ("tests/test_layouts.py",)),
    # Anti-quant without the intermediate roundings to x's dtype (semantics B.4.3 / B.6).
    Mutant("antiquant_no_intermediate_rounding", "npu_ops/_src/weight_quant.py",
           "  inter = dtype if inter is None else inter",
           "  inter = jnp.float32",
           ("tests/test_quant_matmul.py", "tests/test_npu_grouped_matmul.py", "-k",
            "weight_quant or antiquant")),
    # quant_matmul's scale without the FP19 truncation (semantics B.2.3).
    Mutant("no_fp19", "npu_ops/_src/quant_matmul.py",
           "    return bits & FP19_MASK", "    return bits",
           ("tests/test_quant_matmul.py",)),
    # A positive-subnormal test by the bits, which LLVM at its default level folds into a
    # float compare that reads the subnormal as 0 (only the `compiler` fixture's
    # "optimized" run sees it).
    Mutant("subnormal_test_folded", "pallas_kernels/epilogue.py",
           "  return times_lift(v, jnp.float32(_LIFT)) > 0",
           "  return magnitude_bits(v) > 0",
           ("tests/test_qat.py", "-k", "subnormal_columns")),
    # grouped_matmul's float result dtype by NumPy promotion (float32 for float16 x
    # bfloat16) instead of ragged_dot's (bfloat16).
    Mutant("gmm_result_promoted", "npu_ops/_src/grouped.py",
           "  return max(a, b, key=_precision_rank)",
           "  return np.dtype(jnp.promote_types(a, b))",
           ("tests/test_grouped_matmul.py", "-k", "dtypes_as_ragged_dot")),
    # The kernels' integer grouped matmul accumulated in float32 (exact only below 2^24).
    Mutant("integer_gmm_float_accumulator", "pallas_kernels/common.py",
           "  return np.dtype(np.int32 if jnp.issubdtype(dtype, jnp.integer) else np.float32)",
           "  return np.dtype(np.float32)",
           ("tests/test_implementations.py", "-k", "beyond_float32")),
    # The TPU gmm kernel's dequant in A4W4's order, (acc * x_scale) * w_scale.
    Mutant("gmm_dequant_order", "pallas_kernels/tpu.py",
           "          v = epilogue.dequant_a8w8(v, cs_ref[...], rs_col[r])",
           "          v = epilogue.dequant_a4w4(v, cs_ref[...], rs_col[r])",
           ("tests/test_implementations.py", "-k", "dequantized and pallas_tpu")),
    # NumPy operands taken by jnp.asarray: an eager call compiles a program per operand.
    Mutant("numpy_operands_staged", "npu_ops/_src/validation.py",
           "  if isinstance(a, np.ndarray):\n    return jax.device_put(",
           "  if False:\n    return jax.device_put(",
           ("tests/test_eager.py", "-k", "numpy")),
)


def _copy(dst: pathlib.Path) -> None:
  ignore = shutil.ignore_patterns("__pycache__", ".hypothesis", "*.pyc")
  for name in ("npu_ops", "pallas_kernels", "tests"):
    shutil.copytree(ROOT / name, dst / name, ignore=ignore)
  shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")


def run(mutant: Mutant) -> tuple[str, int, float, str]:
  """(name, pytest exit code, seconds, last output line) of the targeted tests on the mutant."""
  t0 = time.perf_counter()
  with tempfile.TemporaryDirectory(prefix=f"mutant_{mutant.name}_") as tmp:
    tmp = pathlib.Path(tmp)
    _copy(tmp)
    target = tmp / mutant.path
    text = target.read_text()
    if text.count(mutant.old) != 1:
      return mutant.name, -1, 0.0, f"the mutant's text occurs {text.count(mutant.old)} times"
    target.write_text(text.replace(mutant.old, mutant.new))
    env = dict(os.environ, PYTHONPATH=str(tmp), JAX_PLATFORMS="cpu", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p",
         "no:xdist", "--tb=line", *mutant.tests],
        cwd=tmp, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    return mutant.name, proc.returncode, time.perf_counter() - t0, lines[-1] if lines else ""


def main(names: list[str] | None = None, workers: int = 2) -> int:
  chosen = [m for m in MUTANTS if not names or m.name in names]
  survived = []
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for name, rc, secs, last in pool.map(run, chosen):
      killed = rc == 1  # 1: tests failed; 0 passed, 5 nothing selected, else an error
      print(f"{'killed  ' if killed else 'SURVIVED'} {name:40s} rc={rc} {secs:5.0f}s  {last}",
            flush=True)
      if not killed:
        survived.append(name)
  print(f"{len(chosen) - len(survived)} of {len(chosen)} mutants killed"
        + (f"; survived: {survived}" if survived else ""))
  return 1 if survived else 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
