"""npu_ops.perf: the pipeline model against counts written by hand from the Pallas TPU
pipeline's rules (a block is copied when its index changes, written back before it
changes), and against latencies measured on real chips (tokamax's data)."""

import importlib
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax._src.lax import lax as lax_internal

import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

import npu_ops
from npu_ops.perf import cases, chips, model

S = jax.ShapeDtypeStruct


def ops(p: model.Prediction) -> list:
  """A prediction's kernels but the TPU kernels' metadata kernels (`tpu_visits`)."""
  from pallas_kernels import tpu_visits  # noqa: PLC0415
  return [k for k in p.kernels if k.name not in tpu_visits.KERNEL_NAMES]


def _matmul(x, w, *, semantics=("arbitrary", "arbitrary")):
  """out[i, j] = x[i] @ w[:, j] over a (4, 2) grid of 128 x 128 output blocks."""
  def kernel(x_ref, w_ref, o_ref):
    o_ref[...] = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)
  return pl.pallas_call(
      kernel, grid=(4, 2),
      in_specs=[pl.BlockSpec((128, 256), lambda i, j: (i, 0)),
                pl.BlockSpec((256, 128), lambda i, j: (0, j))],
      out_specs=pl.BlockSpec((128, 128), lambda i, j: (i, j)),
      out_shape=jax.ShapeDtypeStruct((512, 256), jnp.float32),
      compiler_params=pltpu.CompilerParams(dimension_semantics=semantics))(x, w)


def test_blocks_are_copied_when_their_index_changes():
  p = model.predict(_matmul, S((512, 256), jnp.float32), S((256, 256), jnp.float32), chip="v5e")
  (k,) = p.kernels
  assert k.grid == (4, 2) and k.grid_steps == 8 and p.grid_steps == 8
  x_copies = 4 * 128 * 256 * 4       # x's block changes with i only: 4 copies
  w_copies = 8 * 256 * 128 * 4       # w's block alternates with j: a copy every step
  writes = 8 * 128 * 128 * 4         # every output block once
  assert k.hbm_bytes == x_copies + w_copies + writes
  assert k.flops == 8 * 2 * 128 * 256 * 128
  v5e = chips.get("v5e")
  # bounded below by either resource and above by both plus the steps' overhead
  lower = max(k.flops / v5e.peak("float32"), k.hbm_bytes / v5e.hbm_bandwidth)
  assert lower <= p.seconds <= (k.flops / v5e.peak("float32") + k.hbm_bytes / v5e.hbm_bandwidth
                                + 8 * model.STEP_OVERHEAD_S)
  assert p.xla_seconds == 0


def test_parallel_axes_split_over_the_cores_of_a_dual_core_chip():
  args = S((512, 256), jnp.float32), S((256, 256), jnp.float32)
  par = model.predict(lambda x, w: _matmul(x, w, semantics=("parallel", "arbitrary")), *args,
                      chip="v5p")
  arb = model.predict(_matmul, *args, chip="v5p")
  assert par.kernels[0].cores == 2 and arb.kernels[0].cores == 1
  assert par.seconds < 0.75 * arb.seconds
  # each core fetches its own first x block: no more bytes than with one core plus those
  assert par.hbm_bytes == arb.hbm_bytes
  one_core = model.predict(lambda x, w: _matmul(x, w, semantics=("parallel", "arbitrary")),
                           *args, chip="v5e")
  assert one_core.kernels[0].cores == 1


def test_a_later_parallel_axis_copies_per_core():
  """Split along its second axis (grid (4, 2), "parallel" on j), each core of a v5p runs
  j = its core for i = 0..3: w's block (0, j) never changes on a core (copied twice in
  all, against 8 times on one core, where j alternates), x's block (i, 0) changes every
  step of each core (4 copies a core)."""
  args = S((512, 256), jnp.float32), S((256, 256), jnp.float32)
  split = model.predict(lambda x, w: _matmul(x, w, semantics=("arbitrary", "parallel")), *args,
                        chip="v5p")
  (k,) = split.kernels
  assert k.cores == 2
  x_block, w_block, out_block = 128 * 256 * 4, 256 * 128 * 4, 128 * 128 * 4
  assert k.hbm_bytes == 2 * 4 * x_block + 2 * w_block + 8 * out_block


def test_loops_and_conds_around_kernels_count_what_runs():
  """A kernel in a scan over layers (its group sizes closed over: concrete), in a
  fori_loop with known bounds, or in a while loop: once per trip; a cond with a known
  index takes its branch only, one that depends on data the costliest; with every input
  concrete, the kernel is still modeled (not run)."""
  sizes = np.full(4, 64, np.int32)
  layer = lambda x, w: npu_ops.grouped_matmul(x, w, sizes)
  x, w = S((256, 128), jnp.bfloat16), S((4, 128, 128), jnp.bfloat16)
  one = model.predict(layer, x, w)
  assert len(ops(one)) == 1 and one.grid_steps > 0
  scan = model.predict(lambda x, ws: lax.scan(lambda x, w: (layer(x, w), None), x, ws)[0],
                       x, S((6, 4, 128, 128), jnp.bfloat16))
  assert len(ops(scan)) == 6 and scan.grid_steps == 6 * one.grid_steps
  assert scan.seconds == pytest.approx(6 * one.seconds)
  for n in (np.int32(5), 5):  # a while loop (traced bound) and a scan (static)
    fori = model.predict(lambda x, w, n: lax.fori_loop(0, n, lambda i, x: layer(x, w), x),
                         x, w, n)
    assert len(ops(fori)) == 5 and fori.hbm_bytes == pytest.approx(5 * one.hbm_bytes)
  known = model.predict(lambda x, w, n: lax.fori_loop(0, n, lambda i, x: layer(x, w), x),
                        np.zeros((256, 128), jnp.bfloat16), w, np.int32(3))
  assert len(ops(known)) == 3
  dots = model.predict(lambda a: lax.scan(lambda c, _: (c @ a, None), a, None, length=8)[0],
                       S((512, 512), jnp.float32))
  assert dots.xla_flops == 8 * 2 * 512**3
  # long loops whose known values change (a counter, a known xs) walk 1024 steps, no more
  steps = np.arange(5000, dtype=np.int32)
  long = model.predict(lambda a, s, n: (
      lax.scan(lambda c, i: (c @ a + i, None), a, s)[0],
      lax.fori_loop(0, n, lambda i, c: (c[0] @ a, c[1] + 1), (a, np.int32(0)))),
      S((128, 128), jnp.float32), steps, np.int32(5000))
  assert long.xla_flops == 2 * 5000 * 2 * 128**3
  branch = lambda i, x, w: lax.cond(i > 0, layer, lambda x, w: x, x, w)
  assert model.predict(branch, np.int32(0), x, w).kernels == ()
  assert len(ops(model.predict(branch, np.int32(1), x, w))) == 1
  assert len(ops(model.predict(branch, S((), jnp.int32), x, w))) == 1  # the costliest


def test_concrete_data_costs_what_its_shape_costs():
  """Operands passed as arrays instead of ShapeDtypeStructs are evaluated (they might steer
  a kernel) and, being data (a MiB or more), costed as the chip runs them."""
  a = np.ones((1024, 1024), np.float32)
  shaped = model.predict(jnp.dot, S(a.shape, a.dtype), S(a.shape, a.dtype))
  concrete = model.predict(jnp.dot, a, a)
  assert concrete.seconds == shaped.seconds > 0 and concrete.xla_flops == 2 * 1024**3


def test_xla_ops_around_kernels():
  """ragged_dot outside a kernel: 2 m k n FLOPs (each row meets one group), compute-bound
  at these shapes; a kernel is named after its function."""
  m, k, n, g = 4096, 2048, 2816, 4
  p = model.predict(lax.ragged_dot, S((m, k), jnp.bfloat16), S((g, k, n), jnp.bfloat16),
                    S((g,), jnp.int32))
  assert p.xla_flops == 2 * m * k * n
  assert p.seconds == pytest.approx(2 * m * k * n / chips.get("v5e").peak("bfloat16"))
  assert model.predict(_matmul, S((512, 256), jnp.float32), S((256, 256), jnp.float32)
                       ).kernels[0].name == "kernel"


def _gathered_rows(ids, x):
  """Scalar prefetch: step i reads x's row block ids[i] and multiplies it only when
  ids[i] >= 0 (a `pl.when`); a (128, 1) float32 scale block pads to (128, 128)."""
  def kernel(ids_ref, x_ref, s_ref, o_ref):
    @pl.when(ids_ref[pl.program_id(0)] >= 0)
    def _():
      o_ref[...] = jnp.dot(x_ref[...], x_ref[...].T, preferred_element_type=jnp.float32) * s_ref[...]
  row = lambda i, ids: (jnp.maximum(ids[i], 0), 0)
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(ids.shape[0],),
          in_specs=[pl.BlockSpec((128, 256), row), pl.BlockSpec((128, 1), row)],
          out_specs=pl.BlockSpec((128, 128), lambda i, ids: (i, 0))),
      out_shape=jax.ShapeDtypeStruct((128 * ids.shape[0], 128), jnp.float32))(
          ids, x, jnp.ones((x.shape[0], 1), jnp.float32))


def test_scalar_prefetch_index_maps_and_when_branches_per_step():
  ids = np.array([0, 0, 2, 2, 1, -1, -1, 3], np.int32)  # x blocks 0, 2, 1, 0, 3
  p = model.predict(_gathered_rows, ids, S((512, 256), jnp.bfloat16), chip="v6e")
  (k,) = p.kernels
  blocks = 5  # index sequence 0 0 2 2 1 0 0 3: changes at steps 0, 2, 4, 5, 7
  x_bytes = blocks * 128 * 256 * 2
  scale_bytes = blocks * 128 * 128 * 4  # (128, 1) padded to 128 lanes
  out_bytes = 8 * 128 * 128 * 4
  assert k.hbm_bytes == x_bytes + scale_bytes + out_bytes
  assert k.flops == 6 * 2 * 128 * 256 * 128  # two steps skip the dot


def test_loops_with_dynamic_bounds_count_their_trips():
  """A `fori_loop` whose bounds come from scalar prefetch (the kernels' row-block loop)
  runs `upper - lower` times at each step: 3, 0 and 2 products of 128 rows here."""
  def kernel(n_ref, x_ref, o_ref):
    def body(b, carry):
      r = pl.ds(pl.multiple_of(b * 128, 128), 128)
      o_ref[r] = jnp.dot(x_ref[r], x_ref[r].T, preferred_element_type=jnp.float32)[:, :128]
      return carry
    jax.lax.fori_loop(1, n_ref[pl.program_id(0)], body, 0)
  f = lambda n, x: pl.pallas_call(
      kernel, grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(3,),
          in_specs=[pl.BlockSpec((512, 256), lambda i, n: (0, 0))],
          out_specs=pl.BlockSpec((512, 128), lambda i, n: (0, 0))),
      out_shape=jax.ShapeDtypeStruct((512, 128), jnp.float32))(n, x)
  (k,) = model.predict(f, np.array([4, 0, 3], np.int32), S((512, 256), jnp.bfloat16)).kernels
  assert k.flops == 5 * 2 * 128 * 256 * 128


def test_branches_inside_a_loop_run_where_their_step_takes_them():
  """A `pl.when` inside a loop on a value known per step (the loop's constant, e.g. the k
  tile's offset) runs only on the steps that take it: two exclusive branches, a 256-deep
  product on step 0 and a 128-deep one on step 1, twice each (not both on both steps)."""
  def kernel(x_ref, o_ref):
    first = pl.program_id(0) == 0

    def body(b, carry):
      @pl.when(first)
      def _():
        o_ref[...] += jnp.dot(x_ref[...], x_ref[...].T, preferred_element_type=jnp.float32)

      @pl.when(jnp.logical_not(first))
      def _():
        o_ref[...] += jnp.dot(x_ref[:, :128], x_ref[:, :128].T,
                              preferred_element_type=jnp.float32)
      return carry
    jax.lax.fori_loop(0, 2, body, 0)
  f = lambda x: pl.pallas_call(
      kernel, grid=(2,), in_specs=[pl.BlockSpec((128, 256), lambda i: (0, 0))],
      out_specs=pl.BlockSpec((128, 128), lambda i: (0, 0)),
      out_shape=jax.ShapeDtypeStruct((128, 128), jnp.float32))(x)
  (k,) = model.predict(f, S((128, 256), jnp.float32)).kernels
  assert k.flops == 2 * (2 * 128 * 256 * 128 + 2 * 128 * 128 * 128)


def test_megablox_gmm_counts():
  """Uniform groups aligned to row tiles: one visit per row tile, each group's weight
  column tile copied once per group, x once per (column tile, row tile)."""
  mb = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")
  m, k, n, g, tm, tn = 2048, 512, 1024, 4, 256, 512
  gs = np.full(g, m // g, np.int32)
  p = model.predict(lambda x, w, s: mb.gmm(x, w, s, preferred_element_type=jnp.bfloat16,
                                           tiling=(tm, k, tn)),
                    S((m, k), jnp.bfloat16), S((g, k, n), jnp.bfloat16), gs, chip="v5e")
  (kern,) = p.kernels
  assert kern.grid == (n // tn, m // tm, 1)
  assert kern.hbm_bytes == 2 * ((n // tn) * m * k + g * k * n + m * n)
  assert kern.flops == 2 * m * k * n


def test_tokamax_kernels_are_modeled_as_the_pipeline_they_run():
  """tokamax's TPU ragged_dot (the kernel its measured latencies are of) runs its grid
  through emit_pipeline, which traces only on a TPU: under `predict` it is followed as that
  grid. Its blocks are megablox's: the same counts as above, for gmm and for tgmm (the
  weight gradient: x's and dy's row tiles once per output tile, each group's [k, n]
  written once); a 3-deep input buffer changes the timing, not the bytes."""
  pytest.importorskip("tokamax")
  tk = importlib.import_module("tokamax._src.ops.ragged_dot.pallas_mosaic_tpu_kernel")
  m, k, n, g, tm, tn = 2048, 512, 1024, 4, 256, 512
  gs = np.full(g, m // g, np.int32)
  for buffers in (2, 3):
    p = model.predict(lambda x, w, s: tk.gmm(
        x, w, s, precision=jax.lax.Precision.DEFAULT, out_dtype=jnp.bfloat16,
        tiling=(tm, k, tn), input_buffer_count=buffers),
        S((m, k), jnp.bfloat16), S((g, k, n), jnp.bfloat16), gs, chip="v5e")
    (kern,) = p.kernels
    assert kern.grid == (n // tn, m // tm, 1)
    assert kern.hbm_bytes == 2 * ((n // tn) * m * k + g * k * n + m * n)
    assert kern.flops == 2 * m * k * n and kern.seconds > 0
  p = model.predict(lambda xt, dy, s: tk.tgmm(
      xt, dy, s, precision=jax.lax.Precision.DEFAULT, out_dtype=jnp.float32,
      tiling=(tm, k, tn)), S((k, m), jnp.bfloat16), S((m, n), jnp.bfloat16), gs, chip="v5e")
  (kern,) = p.kernels
  assert kern.hbm_bytes == 2 * (n // tn) * m * k + 2 * m * n + 4 * g * k * n


# A kernel of one expert's product per step (`wid`: the expert of each step) of the same
# rows (one x block, copied once), its weights either a BlockSpec of the grid's pipeline or
# copied by hand into two VMEM buffers: the copies made by hand must cost what the same
# copies cost through the pipeline.
_T, _BM, _K, _N, _E = 8, 128, 512, 1024, 5
_WID = np.array([0, 0, 0, 1, 2, 3, 3, 4], np.int32)


def _runs(wid):
  """Per step: a new expert starts here; its run's buffer (run index % 2); the next
  run's expert (-1: none)."""
  first = np.r_[True, wid[1:] != wid[:-1]]
  run = np.cumsum(first) - 1
  starts = wid[first]
  nxt = np.where(run + 1 < len(starts), starts[np.minimum(run + 1, len(starts) - 1)], -1)
  return first.astype(np.int32), (run % 2).astype(np.int32), nxt.astype(np.int32)


def _expert_kernel(by_hand: str | None, pipeline_mode=None, interpret=False):
  """by_hand None: weights through the pipeline; "ahead": each run's weights copied at the
  step before its first (the pipeline's double buffering); "lookahead": at the first step
  of the run before (`pl.Buffered(2, use_lookahead=True)`)."""
  x_spec = pl.BlockSpec((_BM, _K), lambda t, *_: (0, 0))
  o_spec = pl.BlockSpec((_BM, _N), lambda t, *_: (t, 0))
  if by_hand is None:
    def kernel(wid, first, slot, nxt, x_ref, w_ref, o_ref):
      o_ref[...] = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)
    w_spec = pl.BlockSpec((None, _K, _N), lambda t, wid, *_: (wid[t], 0, 0),
                          **({} if pipeline_mode is None else dict(pipeline_mode=pipeline_mode)))
    scratch = []
  else:
    def kernel(wid, first, slot, nxt, x_ref, w_hbm, o_ref, buf, sem):
      t = pl.program_id(0)
      copy = lambda e, s: pltpu.make_async_copy(w_hbm.at[e], buf.at[s], sem.at[s])

      @pl.when(t == 0)
      def _():
        copy(wid[0], 0).start()

      @pl.when(first[t] == 1)
      def _():
        copy(wid[t], slot[t]).wait()

      if by_hand == "ahead":
        @pl.when((t + 1 < pl.num_programs(0)) & (first[jnp.minimum(t + 1, _T - 1)] == 1))
        def _():
          copy(wid[t + 1], 1 - slot[t]).start()
      else:
        @pl.when((first[t] == 1) & (nxt[t] >= 0))
        def _():
          copy(nxt[t], 1 - slot[t]).start()
      o_ref[...] = jnp.dot(x_ref[...], buf[slot[t]], preferred_element_type=jnp.float32)
    w_spec = pl.BlockSpec(memory_space=pl.ANY)
    scratch = [pltpu.VMEM((2, _K, _N), jnp.bfloat16), pltpu.SemaphoreType.DMA((2,))]

  def fn(wid, first, slot, nxt, x, w):
    return pl.pallas_call(kernel, grid_spec=pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4, grid=(_T,), in_specs=[x_spec, w_spec], out_specs=o_spec,
        scratch_shapes=scratch), out_shape=S((_T * _BM, _N), jnp.float32),
        interpret=interpret, name="experts")(wid, first, slot, nxt, x, w)
  return fn


@pytest.mark.parametrize("by_hand,mode", [
    ("ahead", None), ("lookahead", pl.Buffered(buffer_count=2, use_lookahead=True))])
def test_copies_made_by_hand_cost_what_the_pipelines_copies_cost(by_hand, mode):
  """The model follows a body's own DMAs (`dma_start` / `dma_wait`, under `pl.when` on
  the scalar-prefetch operands): weights copied by hand into two buffers, at the moments
  the grid's pipeline would copy them (double buffering; lookahead), take the time and
  bytes of the pipeline's copies, which the validation on measured chips stands behind.
  The kernels are real: in interpret mode they compute the products."""
  meta = [jnp.asarray(a) for a in (_WID, *_runs(_WID))]
  rng = np.random.default_rng(0)
  x = rng.integers(-4, 5, (_BM, _K)).astype(np.float32)
  w = rng.integers(-4, 5, (_E, _K, _N)).astype(np.float32)
  bf = lambda a: jnp.asarray(a, jnp.bfloat16)
  got = _expert_kernel(by_hand, interpret=True)(*meta, bf(x), bf(w))
  want = np.concatenate([x @ w[e] for e in _WID])
  np.testing.assert_array_equal(np.asarray(got), want)  # small integers: exact in bf16/f32
  args = (*meta, S((_BM, _K), jnp.bfloat16), S((_E, _K, _N), jnp.bfloat16))
  for chip in ("v5e", "v6e"):
    (hand,) = model.predict(_expert_kernel(by_hand), *args, chip=chip).kernels
    (piped,) = model.predict(_expert_kernel(None, mode), *args, chip=chip).kernels
    assert hand.hbm_bytes == piped.hbm_bytes == 2 * (_BM * _K + 5 * _K * _N) + 4 * _T * _BM * _N
    assert hand.seconds == pytest.approx(piped.seconds, rel=0.01), (chip, hand, piped)
  # and lookahead is what it is for: the weights arrive earlier than one step ahead
  (ahead,) = model.predict(_expert_kernel("ahead"), *args, chip="v6e").kernels
  (early,) = model.predict(_expert_kernel("lookahead"), *args, chip="v6e").kernels
  assert early.seconds < 0.98 * ahead.seconds


def _pieces_kernel(pieces: int, interpret=False):
  """`x [1024, 512] @ w [512, 512]` (bf16), w copied by hand in `pieces` pieces of k, all
  started at once, each waited for in a loop just before its product."""
  m, k, n = 1024, 512, 512
  size = k // pieces

  def kernel(x_ref, w_hbm, o_ref, buf, sem):
    copy = lambda p: pltpu.make_async_copy(w_hbm.at[pl.ds(p * size, size)],
                                           buf.at[pl.ds(p * size, size)], sem.at[p])
    for p in range(pieces):
      copy(p).start()
    o_ref[...] = jnp.zeros_like(o_ref)

    def piece(p, carry):
      copy(p).wait()
      ks = pl.ds(pl.multiple_of(p * size, size), size)
      o_ref[...] += jnp.dot(x_ref[:, ks], buf[ks, :], preferred_element_type=jnp.float32)
      return carry
    jax.lax.fori_loop(0, pieces, piece, 0)
  return lambda x, w: pl.pallas_call(
      kernel, out_shape=S((m, n), jnp.float32),
      in_specs=[pl.BlockSpec((m, k), lambda: (0, 0)), pl.BlockSpec(memory_space=pl.ANY)],
      out_specs=pl.BlockSpec((m, n), lambda: (0, 0)),
      scratch_shapes=[pltpu.VMEM((k, n), jnp.bfloat16), pltpu.SemaphoreType.DMA((pieces,))],
      interpret=interpret, name="pieces")(x, w)


def test_a_wait_holds_only_the_work_after_it():
  """The model follows copies made by hand in a loop of static length, and places each
  wait where the body's work reaches it: a weight copied in two pieces, each waited for
  just before its half of the product, holds the body for half the copy where one piece
  holds it for the whole (the second piece arrives while the first half multiplies). The
  kernels compute x @ w in interpret mode."""
  rng = np.random.default_rng(0)
  x = rng.integers(-4, 5, (1024, 512)).astype(np.float32)
  w = rng.integers(-4, 5, (512, 512)).astype(np.float32)
  args = (S(x.shape, jnp.bfloat16), S(w.shape, jnp.bfloat16))
  chip = chips.get("v5e")
  got = {}
  for pieces in (1, 2):
    out = _pieces_kernel(pieces, interpret=True)(jnp.asarray(x, jnp.bfloat16),
                                                 jnp.asarray(w, jnp.bfloat16))
    np.testing.assert_array_equal(np.asarray(out), x @ w)  # small integers: exact
    got[pieces] = model.predict(_pieces_kernel(pieces), *args, chip=chip)
  assert got[1].hbm_bytes == got[2].hbm_bytes == 2 * (x.size + w.size) + 4 * 1024 * 512
  assert got[1].seconds - got[2].seconds == pytest.approx(
      w.size * 2 / 2 / chip.hbm_bandwidth, rel=1e-6)


def _loop_kernel(bound):
  """A kernel copying a `[128, 128]` float32 block by hand `bound(n_ref, v_ref)` times a
  step (a `fori_loop`), copy i into buffer i % 2 on semaphore i % 2 (the loop index
  picks them), each waited for before the next."""
  def kernel(n_ref, v_ref, x_hbm, o_ref, buf, sem):
    def body(i, carry):
      slot = jax.lax.rem(i, 2)
      copy = pltpu.make_async_copy(x_hbm, buf.at[slot], sem.at[slot])
      copy.start()
      copy.wait()
      return carry
    jax.lax.fori_loop(0, bound(n_ref, v_ref), body, 0)
    o_ref[...] = buf[0]
  return lambda n, v, x: pl.pallas_call(
      kernel, out_shape=S((256, 128), jnp.float32),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=1, grid=(2,),
          in_specs=[pl.BlockSpec((8, 128), lambda i, n: (0, 0)),
                    pl.BlockSpec(memory_space=pl.ANY)],
          out_specs=pl.BlockSpec((128, 128), lambda i, n: (i, 0)),
          scratch_shapes=[pltpu.VMEM((2, 128, 128), jnp.float32),
                          pltpu.SemaphoreType.DMA((2,))]),
      name="by_hand")(n, v, x)


def test_copies_by_hand_in_a_loop_bounded_by_scalar_prefetch():
  """A `fori_loop` whose trip count the scalar-prefetch operands give (known per step: 2
  on step 0, 3 on step 1) is followed iteration by iteration: 5 copies of 64 KiB, each
  waited for before the next, so the kernel takes at least their time end to end. A loop
  bounded by data (a VMEM block's value, unknown) is refused with a clear error, not
  modeled as a kernel that copies nothing."""
  v = S((8, 128), jnp.int32)
  x = S((128, 128), jnp.float32)
  fn = _loop_kernel(lambda n_ref, v_ref: n_ref[pl.program_id(0)])
  (k,) = ops(model.predict(fn, jnp.array([2, 3], jnp.int32), v, x, chip="v5e"))
  block = 128 * 128 * 4
  v5e = chips.get("v5e")
  assert k.hbm_bytes == 5 * block + 8 * 128 * 4 + 2 * block  # the copies, v once, the output
  assert k.seconds >= 5 * block / v5e.hbm_bandwidth
  (k1,) = ops(model.predict(fn, jnp.array([0, 1], jnp.int32), v, x, chip="v5e"))
  assert k1.hbm_bytes == k.hbm_bytes - 4 * block
  data = _loop_kernel(lambda n_ref, v_ref: v_ref[0, 0])
  with pytest.raises(ValueError, match="by_hand: copies operands .* by hand inside a loop"):
    model.predict(data, jnp.array([2, 3], jnp.int32), v, x)


def test_our_kernels_are_modeled_on_their_tpu_branch():
  """implementation=None: the TPU kernel (not the XLA path) is what the model follows; at
  decode the fused op reads the touched experts' weights about once."""
  case = cases.Case("decode", 64, 64, "random")
  prob = cases.problem("fused A8W8", case)
  p = model.predict(prob.fn, *prob.args, chip="v5e")
  assert [k.name for k in ops(p)] == ["npu_gmm_swiglu_quant"]
  assert prob.ideal_bytes <= p.hbm_bytes <= 1.1 * prob.ideal_bytes
  assert p.seconds <= 1.2 * prob.roofline(chips.get("v5e"))
  vjp = cases.problem("gmm vjp bf16", case)
  names = sorted(k.name for k in ops(model.predict(vjp.fn, *vjp.args, chip="v6e")))
  assert names == ["npu_gmm", "npu_tgmm"]  # the forward's output is unused: not run


def test_fused_kernel_tiles_bring_uniform_prefill_near_the_roofline():
  """The fused kernel's default 256-row tiles on TPU (`tpu.FUSED_MAX_BLOCK_M`): uniform
  prefill within 1.2x of the roofline on v5e under the model (1.16x; 128-row tiles: 1.58x)."""
  prob = cases.problem("fused A8W8", cases.Case("prefill", 4096, 16, "uniform"))
  p = model.predict(prob.fn, *prob.args, chip="v5e")
  assert p.seconds <= 1.2 * prob.roofline(chips.get("v5e"))
  assert npu_ops.TileSizes.for_problem(4096, 2048, 2816, 16, max_block_m=256).block_m == 256


def test_kernels_copy_the_next_experts_weights_a_run_ahead(monkeypatch):
  """The fused kernel and gmm copy resident weights by hand into a ring of VMEM buffers
  (`tpu.ring_buffers`: up to four where VMEM allows), a visit starting one copy at most,
  as far ahead as a free buffer allows, so the hot experts' long runs hide the cold
  experts' copies. Zipf prefill on v6e, bound by the weights' bytes: within 1.10x of the
  roofline for the fused op (1.22x when each expert's weights came one step ahead, the
  grid pipeline's double buffering; 1.08x with a ring of two) and 1.05x for gmm (1.15x;
  1.03x), each touched expert's weights read once. On v5e, where the hot experts compute
  longer than the cold experts' copies take, the ring makes Zipf prefill 4% faster than
  two buffers (fused op 1.44x -> 1.38x, gmm 1.34x -> 1.28x) and moves uniform prefill by
  under 1%."""
  from pallas_kernels import tpu  # noqa: PLC0415
  case = cases.Case("prefill", 4096, 16, "zipf")
  for op, goal in (("fused A8W8", 1.10), ("gmm bf16", 1.05)):  # gmm: 1.15 by the pipeline
    prob = cases.problem(op, case)
    p = model.predict(prob.fn, *prob.args, chip="v6e")
    assert p.seconds <= goal * prob.roofline(chips.get("v6e")), op
    assert p.hbm_bytes <= 1.06 * prob.ideal_bytes, op

  def seconds(op, routing):
    prob = cases.problem(op, cases.Case("prefill", 4096, 16, routing))
    return model.predict(prob.fn, *prob.args, chip="v5e").seconds
  ops = ("fused A8W8", "gmm bf16")
  ring = {(op, r): seconds(op, r) for op in ops for r in ("zipf", "uniform")}
  monkeypatch.setattr(tpu, "MAX_WEIGHT_BUFFERS", 2)
  for op in ops:
    assert ring[op, "zipf"] <= 0.97 * seconds(op, "zipf"), op
    assert ring[op, "uniform"] == pytest.approx(seconds(op, "uniform"), rel=0.01), op


def test_fused_kernel_moves_per_row_scales_lane_dense():
  """x_scale and the output's scales travel as rows of 128 (`[m / 128, 1, 128]`), not as
  `[m, 1]` columns whose every row takes a 128-lane tile: the fused op at uniform prefill
  moves its ideal bytes within 2% (1.08x as columns, each row tile's scales 128x their
  size), and v6e's e=8 prefill, bound by those bytes, meets the 1.15x goal (1.16x)."""
  case = cases.Case("prefill", 4096, 8, "uniform")
  prob = cases.problem("fused A8W8", case)
  for chip in ("v5e", "v6e"):
    p = model.predict(prob.fn, *prob.args, chip=chip)
    assert p.hbm_bytes <= 1.02 * prob.ideal_bytes, (chip, p.hbm_bytes / prob.ideal_bytes)
    assert p.seconds <= 1.15 * prob.roofline(chips.get(chip)), chip


def test_predict_needs_the_values_that_steer_the_kernels():
  f = lambda x, w, gl: npu_ops.grouped_matmul(x, w, gl)
  with pytest.raises(ValueError, match="concretely"):
    model.predict(f, S((256, 128), jnp.bfloat16), S((4, 128, 256), jnp.bfloat16),
                  S((4,), jnp.int32))
  for chip in ("v9", None):  # the names predict takes: TPUs only
    with pytest.raises(ValueError, match=r"chip: expected a TPU \(v5e, v6e, v5p, tpu7x\)"):
      model.predict(f, S((256, 128), jnp.bfloat16), S((4, 128, 256), jnp.bfloat16),
                    np.full(4, 64, np.int32), chip=chip)
  with pytest.raises(TypeError, match="chip: expected a TPU's name"):  # was "unhashable"
    model.predict(f, np.ones((4, 4)), chip=["v5e"])
  with pytest.raises(TypeError, match="fn: expected a callable"):
    model.predict(None, np.ones((4, 4)))


def test_a_product_of_few_rows_takes_the_mxu_as_long_as_128():
  """The MXU holds a tile of the right operand and streams the left's rows through it: 32
  rows take as long as 128 (`Chip.mxu_rows`), while the FLOPs reported are the 32 rows'."""
  def rows(r):
    def kernel(x_ref, w_ref, o_ref):
      o_ref[...] = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)
    return lambda x, w: pl.pallas_call(
        kernel, grid=(64,), in_specs=[pl.BlockSpec((r, 2048), lambda i: (0, 0)),
                                      pl.BlockSpec((2048, 2048), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((r, 2048), lambda i: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((r, 2048), jnp.float32))(x, w)
  w = S((2048, 2048), jnp.bfloat16)
  few, full = (model.predict(rows(r), S((r, 2048), jnp.bfloat16), w, chip="v5e").kernels[0]
               for r in (32, 128))
  assert few.flops == full.flops / 4
  assert few.compute_seconds == pytest.approx(full.compute_seconds)
  assert all(c.mxu_rows == 128 for name, c in chips.CHIPS.items() if name.startswith(("v", "t")))


def test_a_product_narrower_than_the_mxu_takes_it_whole():
  """A 256x256 MXU (v6e, TPU7x) takes a 128-column right operand as long as a 256-column one;
  v5e's 128x128 MXUs do not: the time per FLOP doubles on one and stays on the other."""
  def cols(c):
    def kernel(x_ref, w_ref, o_ref):
      o_ref[...] = jnp.dot(x_ref[...], w_ref[...], preferred_element_type=jnp.float32)
    return lambda x, w: pl.pallas_call(
        kernel, grid=(64,), in_specs=[pl.BlockSpec((512, 2048), lambda i: (0, 0)),
                                      pl.BlockSpec((2048, c), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((512, c), lambda i: (0, 0)),
        out_shape=jax.ShapeDtypeStruct((512, c), jnp.float32))(x, w)
  x = S((512, 2048), jnp.bfloat16)
  for chip, ratio in (("tpu7x", 1.0), ("v6e", 1.0), ("v5e", 0.5)):
    narrow, wide = (model.predict(cols(c), x, S((2048, c), jnp.bfloat16), chip=chip).kernels[0]
                    for c in (128, 256))
    assert narrow.flops == wide.flops / 2
    assert narrow.mxu_seconds == pytest.approx(ratio * wide.mxu_seconds), chip


def test_chip_constants():
  assert chips.get("v5p").cores == 2 and chips.get("v5e").cores == 1
  assert chips.get("v5e").peak(jnp.int8) == 2 * chips.get("v5e").peak(jnp.bfloat16)
  assert chips.get("tpu7x").peak(jnp.bfloat16) == pytest.approx(2307e12 / 2)

  class Dev:
    device_kind = "NVIDIA H200"
  assert chips.chip_of_device(Dev()).name == "h200"


def test_group_sizes_of_the_cases():
  for kind in ("uniform", "zipf", "random"):
    s = cases.group_sizes(kind, 512, 16)
    assert s.sum() == 512 and s.dtype == np.int32 and len(s) == 16
  assert cases.group_sizes("zipf", 4096, 16)[0] > 4 * cases.group_sizes("zipf", 4096, 16)[15]
  with pytest.raises(ValueError, match="kind"):
    cases.group_sizes("bursty", 8, 2)


def test_model_matches_measured_chips():
  """The validation goal, median |error| <= 15% and max <= 35%, holds on v5e (where the step
  overhead is fitted). TPU7x (out of sample) misses it narrowly, by the chip's sustained MXU
  rate (docs/performance.md): its figures are held where they are, so a change that moves
  them is seen; the 8-group entries, which hinge on the measured group sizes, within 25%."""
  validate = pytest.importorskip("npu_ops.perf.validate")
  pytest.importorskip("tokamax")
  med, mx = validate.summary(validate.validate("v5e"))
  assert med <= 0.15 and mx <= 0.35, (med, mx)
  rows = validate.validate("tpu7x")
  med7, _ = validate.summary(rows)
  assert med7 <= 0.16, med7
  small = [r.error for r in rows if len(r.entry.group_sizes) == 8]
  assert len(small) == 6 and max(map(abs, small)) <= 0.25, small


@pytest.mark.slow
def test_the_measured_kernel_itself_matches_measured_chips():
  """The same with tokamax's kernel (the one measured) under the model: v5e within the
  goal; TPU7x's entries run slower than the model says, all but the k = n = 2880 family
  by 9-34% (its sustained MXU rate, docs/performance.md), held where they are."""
  validate = pytest.importorskip("npu_ops.perf.validate")
  pytest.importorskip("tokamax")
  rows = validate.validate("v5e", validate.KERNELS)
  med, mx = validate.summary(rows, "tokamax")
  assert med <= 0.15 and mx <= 0.35, (med, mx)
  rows = validate.validate("tpu7x", validate.KERNELS)
  med7, _ = validate.summary(rows, "tokamax")
  assert med7 <= 0.17, med7
  rest = [r.tokamax_error for r in rows if r.entry.lhs[1] != 2880]
  assert -0.35 <= min(rest) and max(rest) <= 0.37, (min(rest), max(rest))


def test_entries_use_the_group_sizes_they_were_measured_with():
  """tokamax's TPU7x keys say a total; the times were measured with explicit lists its
  history records (tokamax c24a9b8^): the first entries of each, copied from that file."""
  validate = pytest.importorskip("npu_ops.perf.validate")
  sizes = validate.measured_group_sizes
  assert sizes(4096, 8) == (4096,) + (0,) * 7
  assert sizes(8192, 8) == (1024,) * 8
  assert sizes(131072, 256)[:12] == (788, 877, 0, 668, 519, 792, 536, 0, 1181, 470, 970, 648)
  assert sizes(131072, 128)[:10] == (1281, 1596, 1345, 1216, 945, 1441, 976, 1990, 2151, 856)
  assert sizes(327680, 128)[:10] == (3115, 3991, 3364, 3041, 2364, 3604, 2442, 4977, 5378, 2140)
  assert sizes(524288, 256)[:10] == (2801, 3508, 0, 2672, 2078, 3168, 2146, 0, 4727, 1880)
  for total, groups in ((65536, 256), (262144, 128), (393216, 128)):
    assert sum(sizes(total, groups)) == total and len(sizes(total, groups)) == groups


def test_accelerator_check_refuses_a_host_without_one(capsys):
  from npu_ops.tools import accelerator_check  # noqa: PLC0415
  assert accelerator_check.main(["--no-tests"]) == 2
  assert "no GPU or TPU" in capsys.readouterr().out


def test_accelerator_check_contenders_agree():
  """The check times what it claims: ours and ragged_dot give the grouped product (NumPy,
  from the bf16 inputs; bf16 outputs round at 2**-9 relative, so 1% covers that and the
  float32 sums' order), and the FLOPs and ideal bytes are those of the shapes."""
  from npu_ops.tools import accelerator_check  # noqa: PLC0415
  sizes = np.array([5, 0, 11], np.int32)
  rng = np.random.default_rng(0)
  args, fns, flops, ideal, dtype = accelerator_check.contenders("gmm bf16", 16, 3, sizes, rng)
  x, w, gl = (np.asarray(a, np.float32) for a in args)
  want = np.concatenate([x[:5] @ w[0], x[5:16] @ w[2]])
  for who in ("ours", "ragged_dot"):
    np.testing.assert_allclose(np.asarray(fns[who](*args), np.float32), want, rtol=1e-2,
                               atol=1e-2 * np.abs(want).max())
  assert flops == 2 * 16 * cases.K * cases.N and dtype == "bfloat16"
  assert ideal == 2 * (16 * cases.K + 2 * cases.K * cases.N + 16 * cases.N)


def test_accelerator_check_int8_contenders_agree():
  """The int8 grouped matmul's contenders give the exact int32 product (NumPy)."""
  from npu_ops.tools import accelerator_check  # noqa: PLC0415
  sizes = np.array([5, 0, 11], np.int32)
  args, fns, flops, ideal, dtype = accelerator_check.contenders(
      "gmm int8", 16, 3, sizes, np.random.default_rng(1))
  x, w, _ = (np.asarray(a, np.int64) for a in args)
  want = np.concatenate([x[:5] @ w[0], x[5:16] @ w[2]])
  for who in ("ours", "ragged_dot"):
    np.testing.assert_array_equal(fns[who](*args), want)
  assert flops == 2 * 16 * cases.K * cases.N and dtype == "int8"
  assert ideal == 16 * cases.K + 2 * cases.K * cases.N + 4 * 16 * cases.N


def test_predict_command_prints_each_case_above_its_roofline(capsys):
  """`python -m npu_ops.perf predict`: a row per case; the model never beats the roofline
  (whole blocks and tile-padded bytes only add to the useful FLOPs and the ideal bytes),
  nor the floor (`Problem.floor`, at or above the roofline), and x roof = floor x x floor."""
  from npu_ops.perf.__main__ import main  # noqa: PLC0415
  assert main(["predict", "--chip", "v6e", "--ops", "gmm bf16", "--cases", "decode"]) == 0
  rows = [l.split() for l in capsys.readouterr().out.splitlines() if l.startswith("decode")]
  assert len(rows) == len(cases.DECODE)
  for r in rows:
    model_us, roof_us, x_roof, floor, x_floor = map(float, r[-8:-3])
    assert x_roof >= 1.0 and model_us >= roof_us and r[-1] == "row_visits,gmm"
    assert floor >= 1.0 and x_floor >= 1.0
    assert x_roof == pytest.approx(floor * x_floor, abs=0.015)


def test_the_floor_takes_each_groups_rows_in_whole_mxu_passes():
  """`Problem.floor`: no kernel beats the MXU taking each group's rows in whole passes of
  128 (`Chip.mxu_rows`; contracted rows, tgmm's, padded alike on v5p). Zipf over 16
  experts at 4096 rows (groups of 1220 down to 75 rows) takes 39 passes where 32 hold the
  rows: on v5p, bound by its MXU, 39/32 = 1.22x the roofline, above the prefill goal of
  1.15x; on v5e, bound by the weights' bytes, 39 passes of 3.75 us over the bytes' 130 us;
  on v6e the bytes stay the floor. The model's prediction stays above the floor."""
  zipf = cases.Case("prefill", 4096, 16, "zipf")
  want = [1220, 605, 403, 302, 242, 201, 173, 151, 134, 121, 110, 100, 93, 86, 80, 75]
  np.testing.assert_array_equal(zipf.sizes(), want)
  passes = 10 + 5 + 4 + 3 + 2 * 5 + 1 * 7  # ceil(size / 128) of each, by hand
  v5p, v5e, v6e = chips.get("v5p"), chips.get("v5e"), chips.get("v6e")
  for op in ("fused A8W8", "gmm bf16", "tgmm bf16"):
    prob = cases.problem(op, zipf)
    assert prob.floor(v5p) == pytest.approx(prob.roofline(v5p) * passes / 32), op
    assert prob.floor(v6e) == pytest.approx(prob.ideal_bytes / v6e.hbm_bandwidth), op
  fused = cases.problem("fused A8W8", zipf)
  pass_s = 2 * 128 * 2048 * 2816 / 394e12  # v5e int8
  assert fused.floor(v5e) == pytest.approx(passes * pass_s)
  assert fused.roofline(v5e) == pytest.approx(fused.ideal_bytes / 819e9)
  uniform = cases.problem("fused A8W8", cases.Case("prefill", 4096, 16, "uniform"))
  assert uniform.floor(v5p) == pytest.approx(uniform.roofline(v5p))  # 256 rows: 2 passes
  assert model.predict(fused.fn, *fused.args, chip="v5p").seconds >= fused.floor(v5p)


def test_timeline_prefetch_depth_and_lookahead():
  """Four steps of 1 s; one input copied at steps 0 and 2 (2.5 s each), one write-back of
  1 s after the last step. Worked by hand from the pipeline's rules."""
  compute = np.ones(4)
  copied = np.array([True, False, True, False])
  secs = np.where(copied, 2.5, 0.0)
  wb = np.array([0, 0, 0, 1.0])
  timeline = lambda buffers, lookahead: model._timeline(  # noqa: SLF001
      compute, [(copied, secs, buffers, lookahead)], wb)
  # double buffered: step 2's copy starts with step 1 (3.5 s), lands at 6.0; ends 8 + 1
  assert timeline(2, False) == pytest.approx(9.0)
  # three buffers: issued with step 0 (2.5 s), behind the first copy: lands at 5.0
  assert timeline(3, False) == pytest.approx(8.0)
  # lookahead: a free buffer from the start, queued behind the first copy: 5.0 too
  assert timeline(2, True) == pytest.approx(8.0)


def test_timeline_waits_hold_the_work_after_them():
  """One step of 4 s of work; copies made by hand, started as it begins, each waited for
  after some of the work (`before`). Worked by hand: a wait holds the rest of the step
  until its copy has arrived, from the moment the work reaches it."""
  one = np.array([True])
  start = lambda sem, secs: ("start", one, np.array([sem]), secs, np.zeros(1))
  wait = lambda sem, before: ("wait", one, np.array([sem]), 0.0, np.array([before]))
  timeline = lambda *by_hand: model._timeline(np.array([4.0]), [], np.zeros(1), by_hand)  # noqa: SLF001
  assert timeline(start(0, 3.0), wait(0, 0.0)) == pytest.approx(7.0)  # before any work
  assert timeline(start(0, 3.0), wait(0, 2.0)) == pytest.approx(5.0)  # held 1 s at 2 s
  assert timeline(start(0, 3.0), wait(0, 4.0)) == pytest.approx(4.0)  # arrived by then
  # two pieces of 1.5 s: the first holds the body 1.5 s; the second, due at 3.0, is
  # waited for at 2.0 + 1.5: here already
  assert timeline(start(0, 1.5), start(1, 1.5), wait(0, 0.0), wait(1, 2.0)) == (
      pytest.approx(5.5))
  # ... waited for after 0.5 s of work instead: held until 3.0, then 3.5 s of work left
  assert timeline(start(0, 1.5), start(1, 1.5), wait(0, 0.0), wait(1, 0.5)) == (
      pytest.approx(6.5))


def test_default_tiles_are_the_models_choice():
  """`pallas_kernels/tpu_tiles.py` holds what `python -m npu_ops.perf tune` finds: one
  group searched again here (the fused op at decode on v5e: few candidates), and every
  tuning point of ours has its entry on every chip."""
  from npu_ops.perf import tune  # noqa: PLC0415
  from pallas_kernels import tpu_tiles  # noqa: PLC0415
  group = next(g for g in tune.groups(include_tokamax=False)
               if g[0].op == "fused" and g[0].m == 64)
  t, score = tune.best(group, "v5e")
  assert score < 1.01 and len(tune.candidates(group[0])) > 1  # within 1% at each routing
  assert tpu_tiles.lookup("v5e", "fused", 1, *group[0].key) == (t.block_m, t.block_k, t.block_n)
  for chip in tune.CHIPS:
    for op, itemsize in (("gmm", 2), ("tgmm", 2), ("fused", 1), ("gmm", 1)):
      keys = {r[:3] for r in tpu_tiles.TABLE[(chip, op, itemsize)]}
      assert {p.key for p in tune.points(include_tokamax=False)
              if p.op == op and p.itemsize == itemsize} <= keys


def test_default_tiles_follow_the_chip_and_fit_the_problem():
  from pallas_kernels import common, tpu, tpu_tiles  # noqa: PLC0415
  p = common.Problem("gmm", 4096, 2048, 2816, 16, "bfloat16")
  for chip in ("v5e", "v6e", "v5p", "tpu7x"):
    token = tpu_tiles.CHIP.set(chip)
    try:
      t = tpu.default_tiles(p)
    finally:
      tpu_tiles.CHIP.reset(token)
    assert (t.block_m, t.block_k, t.block_n) == tpu_tiles.lookup(chip, "gmm", 2, 2048, 2816, 256)
  assert tpu_tiles.current_chip() == tpu_tiles.DEFAULT_CHIP  # not lowering: the default
  # a problem far from every entry: the nearest entry's tiles, cut to its k and n
  small = tpu.default_tiles(common.Problem("gmm", 64, 100, 200, 2, "bfloat16"))
  assert small.block_k == 128 and small.block_n <= 256
  # float32 has no entries: the previous rules (k resident, columns split evenly)
  f32 = tpu.default_tiles(common.Problem("gmm", 4096, 2048, 2816, 16, "float32"))
  assert (f32.block_k, f32.block_n) == (2048, 1408)


def test_group_offset_moves_no_rows():
  """group_offset (4 of 16 experts local, from expert 8): the fused kernel skips the other
  groups' rows in its metadata (`common.row_visits`), reading the local rows of x and the
  local experts' weights once and writing every output row once: HBM bytes within 1.1x of
  that (the rows moved to row 0 and back: 2.1x on a gmm, 4.8x as XLA counted the fused op)."""
  m, k, n, e = 4096, cases.K, cases.N, 4
  sizes = np.full(16, m // 16, np.int32)
  fn = lambda x, w, ws, xs, gl, off: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w, ws, xs, gl, group_list_type=1, group_offset=off)
  p = model.predict(fn, S((m, k), jnp.int8), S((e, k, n), jnp.int8), S((e, n), jnp.float32),
                    S((m,), jnp.float32), sizes, np.int32(8), chip="v5e")
  local_rows = int(sizes[8:12].sum())
  ideal = local_rows * (k + 4) + e * (k * n + 4 * n) + m * (n // 2 + 4)
  assert [kc.name for kc in ops(p)] == ["npu_gmm_swiglu_quant"]
  assert ideal <= p.hbm_bytes <= 1.1 * ideal, p.hbm_bytes / ideal


def test_tgmm_with_group_offset_moves_no_rows():
  """The weight gradient (tgmm) with group_offset (4 of 16 experts local): the kernel visits
  the local rows alone (`common.visit_metadata(first=)`), reading them once per output tile
  and writing the local outputs once: HBM bytes within 1.1x of that (moving the rows to
  row 0 first: 5.3x)."""
  m, k, n, e = 4096, cases.K, cases.N, 4
  sizes = np.full(16, m // 16, np.int32)
  fn = lambda x, dy, gl, off: npu_ops.tgmm(x, dy, gl, num_groups=e, group_offset=off)
  p = model.predict(fn, S((m, k), jnp.bfloat16), S((m, n), jnp.bfloat16), sizes, np.int32(8),
                    chip="v5e")
  ideal = 2 * (int(sizes[8:12].sum()) * (k + n) + e * k * n)
  assert [kc.name for kc in ops(p)] == ["npu_tgmm"] and p.xla_bytes == 0
  assert ideal <= p.hbm_bytes <= 1.1 * ideal, p.hbm_bytes / ideal


def test_a_visit_multiplies_only_the_row_blocks_of_its_group():
  """Skewed (Zipf) routing over 256-row tiles: the fused kernel's MXU work is that of the
  128-row blocks that hold each group's rows in each tile it touches (counted here from the
  group sizes), not of a whole tile per visit (1.37x more at this routing). Blocks start at
  the group's first row (rounded down to 32 rows) where that takes fewer than the tile's
  own 128-row grid: 44 blocks here instead of 47."""
  case = cases.Case("zipf", 4096, 16, "zipf")
  sizes = case.sizes()
  ends = np.cumsum(sizes)
  starts = ends - sizes
  bm, rb = 256, 128
  grid_blocks = blocks = 0
  for s, e in zip(starts, ends):
    for t in range(s // bm, -(-e // bm)) if e > s else ():
      lo, hi = max(s - t * bm, 0), min(e - t * bm, bm)
      on_grid = -(-hi // rb) - lo // rb
      start = lo // 32 * 32
      own = -(-(hi - start) // rb)
      grid_blocks += on_grid
      blocks += min(own, on_grid)
  fn = lambda x, w, ws, xs, gl: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w, ws, xs, gl, group_list_type=1, tiles=npu_ops.TileSizes(bm, 2048, 2816))
  prob = cases.problem("fused A8W8", case)
  (kern,) = ops(model.predict(fn, *prob.args, chip="v5e"))
  assert kern.flops == 2 * rb * blocks * cases.K * cases.N
  assert (blocks, grid_blocks) == (44, 47)
  tiles = sum((e - 1) // bm - s // bm + 1 for s, e in zip(starts, ends) if e > s)
  assert tiles * bm > 1.3 * grid_blocks * rb  # what whole-tile visits would multiply


def test_tgmm_takes_the_mxu_at_its_width():
  """On TPU7x (a 256-wide MXU) tgmm's contraction, its rows, comes in 256-row blocks: at
  uniform routing (256 rows a group) the MXU time is the useful FLOPs at peak (the default
  1408-column tiles pad to 1536: 1.09x), not twice that."""
  case = cases.Case("uniform", 4096, 16, "uniform")
  prob = cases.problem("tgmm bf16", case)
  (kern,) = ops(model.predict(prob.fn, *prob.args, chip="tpu7x"))
  ideal = prob.flops / chips.get("tpu7x").peak(jnp.bfloat16)
  assert ideal < kern.mxu_seconds <= 1536 / 1408 * ideal * 1.0001, kern.mxu_seconds / ideal


def test_tgmm_writes_its_tiles_back_behind_the_next_blocks():
  """tgmm copies each group's finished output tile to HBM by hand, after the pipeline has
  asked for the next step's x and dy blocks (`tpu.tgmm`): written back as its step ended,
  ahead of them, a tile made each short visit after it wait. Under the model, bf16 tgmm
  at 4096 rows over 16 experts: Zipf routing on v6e, bound by the output's bytes, within
  1.16x of the roofline (1.34x through the pipeline), uniform on v5e within 1.10x (1.16x);
  every output tile written once (bytes within 1.08x of the ideal)."""
  for chip, routing, goal in (("v6e", "zipf", 1.16), ("v5e", "uniform", 1.10)):
    prob = cases.problem("tgmm bf16", cases.Case(routing, 4096, 16, routing))
    p = model.predict(prob.fn, *prob.args, chip=chip)
    assert p.seconds <= goal * prob.roofline(chips.get(chip)), (chip, routing)
    assert p.hbm_bytes <= 1.08 * prob.ideal_bytes, (chip, routing)


def test_the_kernels_take_a_step_per_row_tile():
  """The fused kernel's and gmm's grids (resident weights) and tgmm's take a step per row
  tile and loop over the tile's groups inside it, not a step per (row tile, group) as
  megablox's: at 4096 rows over 16 experts with Zipf routing (default tiles: 512 rows;
  tgmm 2 column tiles) 8 steps (tgmm 8 x 2), not 23 (23 x 2). On TPU7x, where a step's fixed cost is a large share of a cold group's work,
  the fused op is within 1.20x of the roofline (1.37x with a step per visit), bf16 tgmm
  within 1.50x (1.68x), gmm within 1.15x (1.18x)."""
  for op, grid, goal in (("fused A8W8", (1, 8, 1), 1.20), ("tgmm bf16", (1, 2, 8), 1.50),
                         ("gmm bf16", (1, 8, 1), 1.15)):
    prob = cases.problem(op, cases.Case("zipf", 4096, 16, "zipf"))
    p = model.predict(prob.fn, *prob.args, chip="tpu7x")
    (kern,) = ops(p)
    assert kern.grid == grid and kern.grid_steps == math.prod(grid), (op, kern.grid)
    assert p.seconds <= goal * prob.roofline(chips.get("tpu7x")), op


def test_decode_over_many_experts_takes_no_more_steps_than_rows():
  """8 tokens x top-8 over 256 experts: a visit per touched expert (its rows fit one row
  tile), not one per expert (258), nor the metadata's static bound (64, one per row), and
  a grid step per row tile, looping over its visits: one on one TensorCore (v5e, TPU7x);
  on a v5p, whose two TensorCores share the visits at the group boundary nearest the
  middle (`tpu_visits.two_cores`; 1.79x the roofline on one core, where each visit of a
  few rows streams its expert's weights through the MXU at the cost of 128 rows), one
  per row tile a core's visits touch (64 rows: 2 at most). So the
  steps' fixed cost stays small: within 1.2x of the roofline on every chip (1.23x and
  1.97x on v5e and TPU7x with a step per expert)."""
  case = cases.Case("decode", 64, 256, "random")
  prob = cases.problem("fused A8W8", case)
  touched = int(np.count_nonzero(case.sizes()))
  assert touched < 64  # (two tokens share an expert: fewer visits than rows)
  for chip in ("v5e", "tpu7x", "v5p"):
    p = model.predict(prob.fn, *prob.args, chip=chip)
    (kern,) = ops(p)
    assert kern.cores == (2 if chip == "v5p" else 1)
    assert kern.grid[0] == kern.cores and kern.grid[1] <= (2 if chip == "v5p" else 1), chip
    assert p.seconds <= 1.2 * prob.roofline(chips.get(chip)), chip


def test_metadata_ops_in_numpy_give_xlas_values():
  """The model evaluates the kernels' metadata in NumPy (`model._numpy_eval`, no compile per
  op): every op it takes in the metadata of our kernels (row visits, the v5p decode split,
  group_offset) and megablox's (float32 arithmetic too) gives the values XLA gives."""
  from pallas_kernels import common  # noqa: PLC0415
  mb = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")
  sizes = cases.group_sizes("zipf", 1000, 16)
  ends = np.cumsum(sizes).astype(np.int32)
  fns = [lambda e, s: common.row_visits(e, 1000, 128, s),
         lambda e, s: common.row_visits(e, 1000, 64, s),
         lambda e, s: mb.make_group_metadata(group_sizes=jnp.diff(e, prepend=0), m=1024,
                                             tm=128, start_group=s, num_nonzero_groups=8,
                                             visit_empty_groups=True)]
  seen, seen_float = set(), set()

  def walk(jaxpr, consts, args, record):
    env = dict(zip(jaxpr.constvars, consts)) | dict(zip(jaxpr.invars, args))
    read = lambda v: np.asarray(v.val) if isinstance(v, model.jax_core.Literal) else env[v]
    for eqn in jaxpr.eqns:
      vals = [read(v) for v in eqn.invars]
      sub = model._sub_jaxpr(eqn.params) if eqn.primitive.name != "scan" else None
      if sub is not None:  # a call (pjit, custom_jvp): its ops, as the model walks them
        inner, inner_consts = sub
        outs = walk(inner, inner_consts, vals[len(vals) - len(inner.invars):], record)
      else:
        outs = jax.tree.leaves(eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(
            eqn.params)))
        record.append((eqn, vals, outs))
      env.update(zip(eqn.outvars, outs))
    return [read(v) for v in jaxpr.outvars]

  for fn in fns:
    closed = jax.make_jaxpr(fn)(ends, np.int32(2))
    eqns = []

    @jax.jit
    def by_xla(ends, s):  # every op's operands and values, as XLA computes them: one program
      record = []
      walk(closed.jaxpr, closed.consts, [ends, s], record)
      eqns[:] = [eqn for eqn, _, _ in record]
      return [(vals, outs) for _, vals, outs in record]

    for eqn, (vals, outs) in zip(eqns, by_xla(ends, np.int32(2))):
      outs = [np.asarray(o) for o in outs]
      fast = model._numpy_eval(eqn, [np.asarray(v) for v in vals])
      if fast is not None:
        seen.add(eqn.primitive.name)
        if any(np.issubdtype(o.dtype, np.floating) for o in outs):
          seen_float.add(eqn.primitive.name)
        for f, o in zip(fast, outs):
          np.testing.assert_array_equal(f, o, err_msg=str(eqn))
          assert f.dtype == o.dtype, eqn
  assert {"add", "sub", "lt", "select_n", "cumsum", "broadcast_in_dim", "concatenate",
          "convert_element_type", "iota", "slice", "gather", "scatter", "scatter-add"} <= seen, seen
  # megablox's histogram of tile visits is float32 arithmetic
  assert {"add", "sub", "mul", "div", "iota", "concatenate", "convert_element_type",
          "select_n", "reduce_max", "scatter-add"} <= seen_float, seen_float


def _xla_and_numpy(fn, *args, ops=("gather", "scatter", "scatter-add")):
  """fn's one op of `ops` under XLA and under the model's NumPy evaluation (None: not
  taken)."""
  (eqn,) = [e for e in jax.make_jaxpr(fn)(*args).jaxpr.eqns if e.primitive.name in ops]
  vals = [np.asarray(a) for a in args]
  xla = np.asarray(eqn.primitive.bind(*vals, **eqn.primitive.get_bind_params(eqn.params)))
  fast = model._numpy_eval(eqn, vals)
  return xla, None if fast is None else fast[0]


@pytest.mark.parametrize("mode", ["clip", "fill", "promise_in_bounds"])
def test_gathers_and_scatters_in_numpy_at_the_edges(mode):
  """The element gathers and scatters the model evaluates in NumPy (megablox's metadata,
  `jnp.searchsorted`, `jnp.histogram`) give XLA's values where indices fall outside the
  operand (clamped, filled or dropped by `mode`), and repeat (scatter-add sums them;
  a scatter whose repeats differ is left to XLA); float sums only where exact."""
  x = np.arange(10, 20, dtype=np.int32)
  idx = np.array([0, 3, -1, 9, 10, 3, 2**31 - 1, -2**31], np.int32)[:, None]
  upd = np.arange(1, 9, dtype=np.int32)
  element = lax.GatherDimensionNumbers(offset_dims=(), collapsed_slice_dims=(0,),
                                       start_index_map=(0,))
  column = lax.GatherDimensionNumbers(offset_dims=(1,), collapsed_slice_dims=(),
                                      start_index_map=(0,))
  into = lax.ScatterDimensionNumbers(update_window_dims=(), inserted_window_dims=(0,),
                                     scatter_dims_to_operand_dims=(0,))
  take = lambda dn: lambda x, i: lax.gather(x, i, dn, (1,), mode=mode, fill_value=-7)
  add = lambda x, i, u: lax.scatter_add(x, i, u, into, mode=mode)
  put = lambda x, i, u: lax.scatter(x, i, u, into, mode=mode)
  for fn, args in [(take(element), (x, idx)), (take(column), (x, idx)), (add, (x, idx, upd)),
                   (add, (x.astype(np.float32), idx, upd.astype(np.float32))),
                   (put, (x, np.int32([[1], [3], [12], [3], [-3]]), np.int32([1, 5, 2, 5, 3])))]:
    xla, fast = _xla_and_numpy(fn, *args)
    assert fast is not None, fn
    np.testing.assert_array_equal(fast, xla)
    assert fast.dtype == xla.dtype and fast.shape == xla.shape
  # (a scatter's repeats above agree) repeats that differ: which one lands is XLA's choice
  assert _xla_and_numpy(put, x, idx, upd)[1] is None
  # float32 sums that rounding could order, or not whole: left to XLA
  big = np.full(4, 2.0**24, np.float32)
  assert _xla_and_numpy(add, big, idx[:2], np.float32([1, 1]))[1] is None
  assert _xla_and_numpy(add, big * 0, idx[:1], np.float32([0.5]))[1] is None


@pytest.mark.parametrize("dtype", [np.int32, np.uint32, np.int8])
def test_integer_division_in_numpy_as_xla_divides(dtype):
  """Truncating division and remainder, by zero too (XLA: x / 0 is all ones, x % 0 is x)
  and at the type's minimum over -1."""
  info = np.iinfo(dtype)
  a = np.array([7, info.max, info.min, 0, 5, info.min, 6], dtype)
  b = np.array([-2 if info.min else 2, 3, -1 if info.min else 1, 0, 0, 0, 4], dtype)
  for op in (lax.div, lax.rem):
    xla, fast = _xla_and_numpy(op, a, b, ops=("div", "rem"))
    np.testing.assert_array_equal(fast, xla)
    assert fast.dtype == xla.dtype


def test_searchsorted_histogram_and_dynamic_slices_in_numpy():
  """`jnp.searchsorted` (a scan, walked step by step), `jnp.histogram` (float32
  scatter-add), total-order compares with NaN and signed zeros, and dynamic slices whose
  start XLA clamps: the model's values equal XLA's, without an op left to XLA."""
  a = np.array([-np.inf, -1.0, -0.0, 0.0, 0.5, 2.0, np.inf, np.nan], np.float32)
  v = np.array([np.nan, -0.0, 0.0, 0.25, 3.0, -5.0, np.inf], np.float32)
  left = lambda a, v: jnp.searchsorted(a, v, method="scan")
  right = lambda a, v: jnp.searchsorted(a, v, side="right", method="scan")
  hist = lambda a, v: jnp.histogram(v[3:5], bins=4, range=(0.0, 4.0))[0]
  slices = lambda a, v: (lax.dynamic_slice(a, (jnp.int32(6),), (4,)),
                         lax.dynamic_update_slice(a, v[:3], (jnp.int32(-2),)))
  total = lambda a, v: [p.bind(a[1:], v) for p in (lax_internal.lt_to_p, lax_internal.le_to_p,
                                                     lax_internal.eq_to_p)]
  asked = []
  evaluate = model._evaluate
  try:
    model._evaluate = lambda eqn, vals: (
        asked.append(eqn.primitive.name) if model._numpy_eval(eqn, vals) is None else None,
        evaluate(eqn, vals))[1]
    for fn in (left, right, hist, slices, total):
      closed = jax.make_jaxpr(fn)(a, v)
      got = model._walk(closed.jaxpr, closed.consts, [a, v], model._Accumulator(chips.get("v5e")))
      for g, want in zip(got, jax.tree.leaves(jax.jit(fn)(a, v)), strict=True):
        np.testing.assert_array_equal(g, np.asarray(want))
        assert g.dtype == want.dtype
  finally:
    model._evaluate = evaluate
  assert not asked, asked


def test_a8w4_visits_multiply_only_their_groups_row_blocks():
  """A8W4 takes the same row blocks as A8W8 (it multiplied whole tiles per visit: at
  uniform prefill with the table's 512-row tiles, two visits per tile, 2x the MXU work),
  and int32-word weights cost what jnp.int4 ones do in HBM: the kernel reads them as the
  TPU holds them (k-minor: the transpose before it is a bitcast there, costed 0)."""
  case = cases.Case("uniform", 4096, 16, "uniform")
  int4 = cases.problem("fused A8W4", case)
  (kern,) = ops(model.predict(int4.fn, *int4.args, chip="v5e"))
  assert kern.flops == int4.flops
  for case in (case, cases.Case("decode", 64, 64, "random")):
    int4, words = (cases.problem(op, case) for op in cases.A8W4_OPS)
    p_int4, p_words = (model.predict(p.fn, *p.args, chip="v5e") for p in (int4, words))
    assert p_words.hbm_bytes == p_int4.hbm_bytes <= 1.15 * int4.ideal_bytes


def test_mx_inputs_read_their_bytes_once():
  """The fused op on MX inputs under the model reads each touched expert's fp8 weights and
  scale bytes once (the weight scales' transpose to `[e, 2, P, n]` is the layout the TPU
  holds them in: `tpu.pairs_major`, costed 0), at decode as at prefill; and its MXU work
  is at the bfloat16 rate (dequantized values), twice A8W8's int8 time on v5e."""
  for case in (cases.Case("decode", 64, 64, "random"), cases.Case("uniform", 4096, 16, "uniform")):
    mx = cases.problem("fused MX", case)
    p = model.predict(mx.fn, *mx.args, chip="v5e")
    assert p.hbm_bytes <= 1.02 * mx.ideal_bytes and p.xla_bytes < 1e-3 * mx.ideal_bytes
  a8w8 = cases.problem("fused A8W8", case)
  (k_mx,), (k_int8,) = (ops(model.predict(q.fn, *q.args, chip="v5e")) for q in (mx, a8w8))
  assert 1.95 < k_mx.mxu_seconds / k_int8.mxu_seconds < 2.1


def _slice_kernel(start):
  def kernel(x_ref, o_ref):
    o_ref[...] = x_ref[...][:, start:start + 128]
  return lambda x: pl.pallas_call(
      kernel, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
      in_specs=[pl.BlockSpec((8, 384), lambda: (0, 0))],
      out_specs=pl.BlockSpec((8, 128), lambda: (0, 0)))(x)


def test_slices_along_whole_tiles_take_no_vector_work():
  """A value sliced at a multiple of 128 lanes picks vector registers; elsewhere the lanes
  are shifted (vector work)."""
  vpu = lambda start: model.predict(_slice_kernel(start), S((8, 384), jnp.float32),
                                    chip="v5e").kernels[0].vpu_seconds
  assert vpu(128) == 0 < vpu(64)
