"""TPU (Mosaic) kernels: the fused grouped matmul + dequant + SwiGLU + per-token or MX quant
(A8W8, A8W4, A4W4, MX inputs), and the float grouped matmuls `gmm` / `tgmm` of the
differentiation rules.

Operands are read in place: no wrapper pads or concatenates anything per call.
Row tiles past `m`, column tiles past `n` and k tiles past `k` are partial blocks
(Pallas clips their copies); the kernels zero the k edge of both operands where
it is partial, mask rows by their group, and write only whole output rows.

Group metadata travels by scalar prefetch (`common.row_visits`, megablox's
technique, laid out on the scalar unit by `tpu_visits`): the grid walks (row tile,
group) visits in row order. The rows before the first group (group_offset) and past
the group total form two more, weightless groups whose visits write zeros and read the
blocks of the nearest real visit, so no output is post-processed and no row is moved.

Weight-stationary order: when one expert's whole `[k, n]` weight (the fused op) or
one `[k, block_n]` column tile of it (gmm) fits the VMEM budget, the contraction
is one step, so the weight block index stays the same across a group's
consecutive visits and Pallas does not copy it again: every expert's weights
cross HBM once per call (per column tile for gmm), however its tokens fall on
row tiles. Larger weights are tiled over k and re-read per visit.

How fast this is on each TPU, against the roofline, is `npu_ops.perf`'s model
(docs/performance.md); the bytes each kernel moves, compiled for each chip, are
`python -m npu_ops.tools.aot`'s (docs/accelerators.md).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import common
from pallas_kernels import epilogue
from pallas_kernels import tpu_tiles
from pallas_kernels import tpu_visits
from pallas_kernels.common import TileSizes

# Rows per tile of the fused kernel where the model's table has no entry (docs/performance.md,
# "Speed on TPU"): with an expert's whole weight resident, 128-row visits wait on
# the weight copy at prefill.
FUSED_MAX_BLOCK_M = 256

# VMEM: one expert's weight block, double-buffered, is resident up to this size; the
# whole kernel is planned to stay under _VMEM_PLAN and asks the compiler for
# _VMEM_LIMIT (v5e / v6e have 128 MiB of VMEM, v5p 95 MiB; the default scope is 16-32).
_RESIDENT_WEIGHT_BYTES = 24 * 2**20
_VMEM_PLAN = 40 * 2**20
_VMEM_LIMIT = 64 * 2**20


def supports(p: common.Problem) -> str | None:
  """Why these kernels cannot run problem `p` (None: they can): MX inputs only with an ND
  weight, no float16 gmm / tgmm, beyond what neither backend does (`common.shared_gap`)."""
  if p.op == "fused_mx" and p.transposed:
    return "MX inputs with a transposed weight (the TPU kernel reads ND weights)"
  if p.op in ("gmm", "tgmm") and "float16" in (p.dtype, p.out_dtype):
    return "float16 operands or output (Mosaic loads and stores no float16 vectors)"
  return common.shared_gap(p)


def default_tiles(p: common.Problem) -> TileSizes:
  """The tiles the kernels take when `tiles=` is not given: the `npu_ops.perf` model's
  choice for the chip lowered for (`tpu_tiles`), else the rules below; fitted to the
  problem's dimensions and to VMEM."""
  fused = p.op in ("fused", "fused_mx")  # one kernel (MX inputs: 1-byte operands too)
  itemsize = 1 if fused else np.dtype(p.dtype).itemsize
  found = tpu_tiles.lookup(tpu_tiles.current_chip(), "fused" if fused else p.op, itemsize,
                           p.k, p.n, p.tokens_per_group)
  if found is not None:
    bm, bk, bn = found
  elif fused:
    t = TileSizes.for_problem(p.m, p.k, p.n, p.groups, p.expected_tokens,
                              max_block_m=FUSED_MAX_BLOCK_M)
    bm, bk, bn = t.block_m, t.block_k, t.block_n
  else:
    bm = TileSizes.for_problem(p.m, p.k, p.n, p.groups, p.expected_tokens).block_m
    bk, bn = (_resident_float_tiles if p.op == "gmm" else _tgmm_float_tiles)(
        p.k, p.n, itemsize, bm)
  if fused:
    return TileSizes(bm, bk, bn)
  out_itemsize = np.dtype(p.out_dtype or p.dtype).itemsize
  return _fit_vmem(p.op, p.k, p.n, itemsize, out_itemsize, bm, bk, bn)


def _resident_float_tiles(k: int, n: int, itemsize: int, bm: int) -> tuple[int, int]:
  """gmm: the widest column tile (up to 2048) whose `[k, block_n]` weight, double-buffered,
  stays resident, so k is one step; only when not even 128 columns fit is k tiled (and
  the weight re-read per visit)."""
  del bm
  cap = min(2048, _RESIDENT_WEIGHT_BYTES // (2 * k * itemsize) // 128 * 128)
  bn = _balanced_tile(n, max(cap, 128))
  bk = common.round_up(k, 128) if cap >= 128 else _k_tile(k, 2 * bn * itemsize,
                                                         _RESIDENT_WEIGHT_BYTES)
  return bk, bn


def _tgmm_float_tiles(k: int, n: int, itemsize: int, bm: int) -> tuple[int, int]:
  """tgmm: a `[bk, bn]` float32 accumulator plus the output block (2 buffers) in what the
  input tiles (2 buffers each) leave of the plan: all of k where it fits, so x is read
  once per column tile and dy once."""
  bn = _balanced_tile(n, 1536)
  row_bytes = bn * (4 + 2 * itemsize)
  budget = _VMEM_PLAN - 2 * bm * (common.round_up(k, 128) + bn) * itemsize
  return _balanced_tile(k, max(128, budget // row_bytes // 128 * 128)), bn


def _float_vmem(op: str, bm: int, bk: int, bn: int, itemsize: int, out_itemsize: int) -> int:
  """VMEM of the float kernels' blocks: inputs and output double-buffered, the float32
  accumulator once."""
  if op == "gmm":
    return 2 * (bm * bk + bk * bn) * itemsize + 4 * bm * bn + 2 * bm * bn * out_itemsize
  return 2 * bm * (bk + bn) * itemsize + 4 * bk * bn + 2 * bk * bn * out_itemsize


def _fit_vmem(op: str, k: int, n: int, itemsize: int, out_itemsize: int, bm: int, bk: int,
              bn: int) -> TileSizes:
  """Tiles no larger than the problem (k and n rounded up to 128), halved (the larger of
  the k and column tiles first, then rows) until the blocks fit the VMEM plan."""
  bk, bn = min(bk, common.round_up(k, 128)), min(bn, common.round_up(n, 128))
  while _float_vmem(op, bm, bk, bn, itemsize, out_itemsize) > _VMEM_PLAN:
    if max(bk, bn) > 128:
      if bk >= bn:
        bk = common.round_up(bk // 2, 128)
      else:
        bn = common.round_up(bn // 2, 128)
    elif bm > 32:
      bm //= 2
    else:
      break
  return TileSizes(bm, bk, bn)


def _float_blocks(op: str, k: int, n: int, itemsize: int, out_itemsize: int,
                  tiles: TileSizes) -> tuple[int, int, int]:
  """The blocks a float kernel runs: `tiles`, a dimension taken whole where its tile
  reaches it; a ValueError naming `tiles` when they overflow the VMEM plan."""
  bm = tiles.block_m
  bk = k if tiles.block_k >= k else tiles.block_k
  bn = n if tiles.block_n >= n else tiles.block_n
  need = _float_vmem(op, bm, common.round_up(bk, 128), common.round_up(bn, 128), itemsize,
                     out_itemsize)
  if need > _VMEM_PLAN:
    raise ValueError(f"tiles: expected blocks within the TPU {op} kernel's VMEM plan of "
                     f"{_VMEM_PLAN >> 20} MiB, got {tiles} (k={k}, n={n}: "
                     f"{need / 2**20:.1f} MiB)")
  return bm, bk, bn


def _mxu_precision(precision, dtype):
  """Mosaic multiplies float32 at DEFAULT (one bfloat16 pass) or HIGHEST; HIGH asks
  for more than one pass, so it gets HIGHEST (bf16 operands: exact either way)."""
  return common.float32_precision(precision, dtype,
                                  supported=(lax.Precision.DEFAULT, lax.Precision.HIGHEST))


def _params(*semantics: str) -> pltpu.CompilerParams:
  return pltpu.CompilerParams(dimension_semantics=semantics, vmem_limit_bytes=_VMEM_LIMIT)


# A visit multiplies and finishes only the blocks of this many rows that hold its
# group's rows (`_for_row_blocks`): a group sharing a row tile pays for its own rows, to
# the MXU's granularity (fewer rows take it as long: `npu_ops.perf.chips.Chip.mxu_rows`),
# not for the whole tile, so skewed routing can take large tiles.
ROW_BLOCK = 128


# The contraction, and the product's columns, are multiplied in chunks of this many (loops):
# Mosaic unrolls a dot into MXU operations, so one of a whole [rows, k] x [k, n] block
# would be compiled as (k / 128) x (n / 128) times the code (docs/performance.md,
# "Compile time"). A column chunk is a multiple of every chip's MXU width, and the last
# (n % N_CHUNK) pads to it as the whole product would.
K_CHUNK = 512
N_CHUNK = 512


def _accumulate(acc, x, w, k0, k: int, *, transpose_rhs: bool = False, precision=None) -> None:
  """acc += x @ w (w read as its transpose with `transpose_rhs`) for refs x `[rows, bk]`
  and w `[bk, n]` of the k tile at k0: `K_CHUNK`-deep pieces in a loop, then the tile's
  last piece (a multiple of 128), each over `N_CHUNK`-wide column chunks in a loop, then
  the last columns. In the last k tile only the k columns below k are
  multiplied, and only the 128-wide block that k cuts is masked (a partial tile holds
  garbage past k; masking every piece cost the vector units more than the MXU its product:
  2.4x the time at k = 2880 under the model)."""
  bk = x.shape[1]
  dims = (((1,), (1 if transpose_rhs else 0,)), ((), ()))
  out = jnp.float32 if jnp.issubdtype(acc.dtype, jnp.floating) else jnp.int32
  column_chunks, last_columns = divmod(acc.shape[1], N_CHUNK)

  def product(start, size: int, masked: bool = False):
    kc = pl.ds(start, size)
    xb = x[:, kc]
    if masked:
      xb = _mask_k_edge(xb, k0 + start, k, 1)

    def multiply(cs):
      wb = w[cs, kc] if transpose_rhs else w[kc, cs]
      if masked:
        wb = _mask_k_edge(wb, k0 + start, k, 1 if transpose_rhs else 0)
      acc[:, cs] += lax.dot_general(xb, wb, dims, precision=precision,
                                    preferred_element_type=out)

    def column_chunk(c, carry):
      multiply(pl.ds(pl.multiple_of(c * N_CHUNK, N_CHUNK), N_CHUNK))
      return carry
    if column_chunks:
      lax.fori_loop(0, column_chunks, column_chunk, 0)
    if last_columns:
      multiply(pl.ds(column_chunks * N_CHUNK, last_columns))

  def columns(extent: int):
    """x[:, :extent] @ w[:extent], extent static; masked where it passes k's 128 block."""
    chunks, tail = divmod(extent, K_CHUNK)

    def chunk(c, carry):
      product(pl.multiple_of(c * K_CHUNK, K_CHUNK), K_CHUNK)
      return carry
    if chunks:
      lax.fori_loop(0, chunks, chunk, 0)
    if tail:  # a block as wide as k (any width) needs no mask: nothing lies past k
      size = min(common.round_up(tail, 128), bk - chunks * K_CHUNK)
      product(chunks * K_CHUNK, size, masked=size > tail)

  last = k - (common.cdiv(k, bk) - 1) * bk  # the valid columns of the last k tile
  if last == bk:
    columns(bk)
    return

  lax.cond(k0 + bk <= k, lambda: columns(bk), lambda: columns(last))


# Where a group's row blocks may start within its tile: every operand's sublane tile
# (8 rows of 32-bit, 16 of 16-bit, 32 of 8-bit values) divides it.
ROW_ALIGN = 32


def _for_row_blocks(ends_ref, g, r0, bm: int, fn, block: int = ROW_BLOCK) -> None:
  """Runs `fn(rows)` for `block`-row blocks of the row tile at r0 that together hold the
  rows of group g (ends_ref: `RowVisits.bounds`), once each and disjoint, in a loop (one
  copy of the block's code). The blocks start at the group's first row (rounded down to
  `ROW_ALIGN`) where that takes fewer than blocks on the tile's own grid: a group of 100
  rows from row 100 takes one block, not two. (Fewer blocks from a start at or after the
  grid's first block end before the grid's last one: they stay in the tile.)"""
  lo, hi = jnp.where(g > 0, ends_ref[jnp.maximum(g - 1, 0)], 0), ends_ref[g]
  sub = block if bm % block == 0 else bm
  nb = bm // sub
  # lax.div truncates: on the non-negative operands it floors without jnp's sign fix-up
  first = jnp.minimum(lax.div(jnp.maximum(lo - r0, 0), sub), nb)
  last = jnp.minimum(lax.div(jnp.maximum(hi - r0 + sub - 1, 0), sub), nb)
  base, count = first * sub, last - first
  if nb > 1:  # from the group's first row instead, where that saves a block
    start = lax.div(jnp.clip(lo - r0, 0, bm), ROW_ALIGN) * ROW_ALIGN
    own = lax.div(jnp.maximum(jnp.minimum(hi - r0, bm) - start + sub - 1, 0), sub)
    base, count = jnp.where(own < count, start, base), jnp.minimum(own, count)

  def body(b, carry):
    fn(pl.ds(pl.multiple_of(base + b * sub, ROW_ALIGN if nb > 1 else sub), sub))
    return carry
  lax.fori_loop(0, count, body, 0)


def _mask_k_edge(a: jax.Array, k0, k: int, axis: int) -> jax.Array:
  """Zeros the entries of a k tile at or past k (a partial block holds garbage there)."""
  idx = k0 + lax.broadcasted_iota(jnp.int32, a.shape, axis)
  return jnp.where(idx < k, a, jnp.zeros((), a.dtype))


def _k_tile(k: int, row_bytes: int, budget: int, quantum: int = 128) -> int:
  """The contraction tile: all of k when `k * row_bytes` fits `budget`, else the largest
  multiple of `quantum` (a divisor of k where one exists) that does."""
  if k * row_bytes <= budget:
    return k
  fit = max(128, budget // row_bytes // 128 * 128)
  divisors = [d for d in range(quantum, fit + 1, quantum) if k % d == 0]
  return divisors[-1] if divisors else fit


@dataclasses.dataclass(frozen=True)
class FusedPlan:
  """Blocks of the fused kernel: rows, contraction, and the k groups of one k tile."""
  block_m: int
  block_k: int
  k_tiles: int
  weight_buffers: int = 2  # the ring of a resident weight's VMEM buffers (`ring_buffers`)

  @property
  def resident(self) -> bool:
    return self.k_tiles == 1


# The fused kernel takes A8W4 weights as int32 words `[e, k, n/8]` (torch_npu's int4pack,
# 8 int4 a word) and unpacks them in VMEM (`_unpack_words`): the words cross HBM as they are.
READS_INT4_WORDS = True


def k_minor(shape: tuple[int, ...]) -> bool:
  """Whether a TPU holds an int32 `[e, k, c]` array k-minor (layout {1,2,0}). XLA's default
  TPU layout takes as minor dim the one its 128 lanes pad least (relatively), then as
  second-minor the one its sublanes pad least (8 of them; a dim under 8 takes a power of
  two), ties going to the dim more minor in the logical order: torch_npu's words
  `[e, 2048, 352]` are k-minor (352 words pad to 384 lanes, 2048 not at all). The fused
  kernel then reads them as `[e, c, k]`, the same bytes, where asking for `[e, k, c]`
  would make XLA copy them on every call. tests/test_aot.py checks this against the
  compiler."""
  sublanes = lambda d: common.round_up(d, 8) if d >= 8 else 1 << (d - 1).bit_length()

  def least_padded(dims, padded):  # the last of the dims that pad least, relatively
    return min(reversed(dims), key=lambda d: padded(shape[d]) / shape[d])
  return (least_padded((0, 1, 2), lambda d: common.round_up(d, 128)) == 1
          and least_padded((0, 2), sublanes) == 2)


def pairs_major(shape: tuple[int, ...]) -> bool:
  """Whether a TPU holds uint8 MX weight scales `[e, P, n, 2]` (torch_npu's: block b at
  `[b // 2, ..., b % 2]`) as `[e, 2, P, n]` (layout {2,1,3,0}), so that the MX-input kernel's
  transpose to that shape is free: XLA's default TPU layout takes n as minor where its 128
  lanes pad it least (ties to n), then P as second-minor where P is a multiple of 8
  (measured on the compile-only v5e over e = 1-256, P = 1-112, n = 128-2816; elsewhere,
  XLA copies the scales: 1/32 of the weights' bytes). tests/test_aot.py checks this
  against the compiler."""
  e, p, n, _ = shape
  lanes = lambda d: common.round_up(d, 128) / d
  return lanes(n) <= min(lanes(e), lanes(p)) and p % 8 == 0


# Rows of a weight block turned into int8 values at a time (a loop: Mosaic unrolls vector
# code, so a whole `[k, n]` block at once would be that much more code).
UNPACK_ROWS = 128


def _unpack_words(words: jax.Array, n: int, put) -> None:
  """int32 words `[rows, n/8]` -> their int4 values in [-8, 7] (int32), handed to
  `put(columns, values)` 128 columns at a time. Column c is nibble c % 8 of word c // 8:
  each 128 columns take 16 words of one aligned 128-lane window, brought to their 8 lanes
  each by a gather within the vector register, then shifted to the top and
  arithmetically back (sign extended)."""
  rows, c = words.shape
  if c % 128:  # whole windows (the padding feeds only columns past n)
    words = jnp.concatenate([words, jnp.zeros((rows, common.round_up(c, 128) - c), words.dtype)],
                            axis=1)
  lane = lax.broadcasted_iota(jnp.int32, (1, 128), 1)
  shift = 28 - 4 * (lane & 7)
  for b in range(common.cdiv(n, 128)):  # columns 128b ..: words 16b .. 16b + 15
    window = words[:, 128 * (b // 8):128 * (b // 8 + 1)]
    word = jnp.broadcast_to(lax.shift_right_logical(lane, 3) + 16 * (b % 8), (rows, 128))
    mine = jnp.take_along_axis(window, word, axis=1, mode="promise_in_bounds")
    width = min(128, n - 128 * b)
    values = jnp.right_shift(jnp.left_shift(mine, shift), 28)
    put(slice(128 * b, 128 * b + width), values[:, :width])


def fused_plan(m: int, k: int, n: int, groups: int, tiles: TileSizes, *,
               widened: bool = False, lhs_words: bool = False, out_bytes: int = 1,
               mx_inputs: bool = False) -> FusedPlan:
  """Weight-stationary when an expert's `[k, n]` int8 weight, double-buffered, fits;
  else k tiles of at most tiles.block_k (a divisor of the k group for A8W4). int4
  weights (`widened`: A8W4, A4W4) are held as int8 values in one more `[block_k, n]`
  VMEM block; MX inputs (`mx_inputs`) their fp8 weights as bfloat16 values, and the x
  tile too. x in int32 words (`lhs_words`, A4W4) takes k tiles of 1024 columns or more
  (128 words a row or more: a TPU's lanes), MX inputs 2048 (32 pairs of blocks of weight
  scales: the uint8 sublane tile), else k whole. `out_bytes`: an output value's
  (1: codes; 4: float32 SwiGLU values, for MX output)."""
  gs = k // groups
  value_bytes = 2 if mx_inputs else 1 if widened else 0  # the weight's values in VMEM
  if (4 if mx_inputs else 2) * k * n <= _RESIDENT_WEIGHT_BYTES:  # MX: bfloat16 values too
    bk = k
  elif groups == 1:  # the k edge is masked
    bk = min(tiles.block_k, common.round_up(k, 128))
    if lhs_words or mx_inputs:
      bk = common.round_up(bk, 2048 if mx_inputs else 1024)
      bk = k if bk >= k else bk
  else:  # a divisor of the k group (a multiple of 128: `common.shared_gap`)
    bk = min(tiles.block_k, gs)
    while gs % bk:
      bk //= 2
  bm = tiles.block_m
  # x tile (int8, 2 buffers), weight (2 buffers), int32 and float32 row accumulators, the
  # output (2 buffers) and the epilogue's float32 temporaries (~4 per SwiGLU column).
  need = lambda bm: ((4 if mx_inputs else 2) * bm * bk + (2 + value_bytes) * bk * n
                    + 8 * bm * n + 2 * out_bytes * bm * (n // 2) + 16 * bm * (n // 2))
  while bm > 32 and need(bm) > _VMEM_PLAN:
    bm //= 2
  return FusedPlan(block_m=bm, block_k=bk, k_tiles=common.cdiv(k, bk),
                   weight_buffers=ring_buffers(need(bm), bk * n, MAX_WEIGHT_BUFFERS))


# VMEM buffers of the blocks the kernels copy by hand: a ring of two, and more where they
# fit _VMEM_RING beside the kernel's planned blocks. Resident weights (the fused kernel,
# gmm): up to MAX_WEIGHT_BUFFERS; more hide more of skewed routing's copies (a hot
# expert's visits copy the next experts' weights); past four the model finds nothing more
# (docs/performance.md). tgmm's output tiles: up to MAX_OUTPUT_BUFFERS.
MAX_WEIGHT_BUFFERS = 4
MAX_OUTPUT_BUFFERS = 3
_VMEM_RING = 56 * 2**20


def ring_buffers(planned: int, buffer: int, most: int) -> int:
  """A ring of VMEM buffers of `buffer` bytes: the two that `planned` (the kernel's VMEM
  plan, in bytes) counts, and as many more, up to `most`, as fit `_VMEM_RING`."""
  return int(max(2, min(most, 2 + (_VMEM_RING - planned) // max(buffer, 1))))


# A resident weight is copied in equal pieces of k, and at a run's first visit each piece
# is waited for just before its product (`_multiply_by_pieces`): a core's first visit,
# whose weights nothing could copy sooner, waits for one piece, not for the whole weight.
# A piece is as deep as the MXU of every chip takes whole (256) or a multiple of it. The
# fused kernel takes pieces up to `K_CHUNK` deep: each piece reads and writes its int32
# accumulator once more, on vector units as busy as the MXU there (docs/performance.md).
PIECE_QUANTUM = 256


def weight_pieces(k: int, deepest: int = PIECE_QUANTUM) -> int:
  """How many equal pieces of k a resident weight is copied and multiplied in: the
  deepest that divide k, multiples of `PIECE_QUANTUM` up to `deepest` (else one)."""
  sizes = [d for d in range(PIECE_QUANTUM, deepest + 1, PIECE_QUANTUM) if k % d == 0]
  return k // sizes[-1] if sizes else 1


def _each(copies, method: str) -> None:
  for c in copies:
    getattr(c, method)()


def _weights_by_hand(w_buf, copy_of, run, prev_run, seq, live, starts, first, exists,
                     pieces: int, own_of=None):
  """The VMEM buffer (of `w_buf`, a ring `[ring, ...]`) that holds run `run`'s weights,
  copied by hand, and `wait(p)`, which waits for its piece p (of `pieces`) at the run's
  first visit (`starts`): the kernel's grid visits runs of consecutive visits that read
  the same weights (`common.WeightRuns`).

  A visit starts one copy at most, so a row tile's copy never queues behind more than
  one weight copy: the visit `seq` visits after the core's first (`prev_run`: the run of
  the visit before; `live`: within the core's count) reaches run
  `min(seq + 1, run + ring - 1)`, the furthest whose buffer (run - ring + 1's at the
  latest) is free, and starts its copy where the visit before did not reach it and the
  run `exists`; a core's `first` visit starts its own run's copy and the next's. With a
  ring of two, each run's copy starts at the first visit of the run before; with more, a
  long run of visits (a hot expert's) copies the next runs' weights while it computes,
  where the grid's pipeline (jax 0.10.2: no lookahead, two buffers) would copy one and
  leave the copy engine idle, the short runs after it waiting. `copy_of(G, slot, p)` is
  the async copy of piece p of run G's weights into buffer `slot`; `own_of(G, slot)`,
  the copies of run G's own operands (its scales) into slot `slot` of their rings,
  started before its weights and waited for at the run's first visit."""
  ring = w_buf.shape[0]

  def start(r):
    slot = lax.rem(r, ring)
    _each(own_of(r, slot) if own_of else (), "start")
    for p in range(pieces):
      copy_of(r, slot, p).start()

  pl.when(first & exists(run))(lambda: start(run))
  reach = jnp.minimum(seq + 1, run + ring - 1)  # run + 1 at a core's first visit
  new = first | (reach > jnp.minimum(seq, prev_run + ring - 1))
  pl.when(live & new & exists(reach))(lambda: start(reach))

  if own_of:
    pl.when(starts)(lambda: _each(own_of(run, lax.rem(run, ring)), "wait"))

  def wait(p) -> None:
    pl.when(starts)(lambda: copy_of(run, lax.rem(run, ring), p).wait())
  return w_buf.at[lax.rem(run, ring)], wait


def _multiply_by_pieces(k: int, pieces: int, wait, multiply) -> None:
  """`multiply(start, size)` for each of k's `pieces` (equal), after `wait(p)` for piece
  p's copy: one loop (one copy of the product's code)."""
  size = k // pieces

  def piece(p, carry):
    wait(p)
    multiply(pl.multiple_of(p * size, size), size)
    return carry
  lax.fori_loop(0, pieces, piece, 0)


def gmm_swiglu_quant(x: jax.Array, w: jax.Array, w_scale: jax.Array, x_scale: jax.Array,
                     ends: jax.Array, *, start: jax.Array | None = None,
                     assist: jax.Array | None = None, a4w4: bool = False,
                     smooth: jax.Array | None = None, tiles: TileSizes,
                     out_dtype=jnp.int8, qmax: float = epilogue.INT8_QMAX,
                     mx_out: bool = False, mx_inputs: bool = False,
                     interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """Fused op on canonical operands: A8W8, A8W4 when `assist` is given, A4W4 with `a4w4`,
  MX inputs with `mx_inputs` (as `gmm_swiglu_quant_mx` lays them out).

  Args:
    x: int8 `[m, k]` (A4W4: int8 holding int4 values, or int4 in int32 words `[m, k/8]`,
      unpacked in VMEM); w: int8 `[e, k, n]` (A8W4,
      A4W4: jnp.int4, int8 holding int4 values, or int4 in int32 words `[e, k, n/8]`);
    w_scale: float32 `[e, G, n]` (G = 1 per channel; A8W4 may have G k groups of
      k/G rows, a multiple of 128); x_scale: float32 `[m]`; ends: int32 `[E]`
      group row ends, E <= e; start: int32 scalar, the first row of group 0 (megablox's
      group_offset: rows before it, and past the last end, are 0; None: row 0);
      assist: A8W4's float32 `[e, n]` (its k groups' column
      sums, the "- 8" of `(x - 8) @ W`, are summed in the kernel from the weight block
      in VMEM: no pass over the weights outside it).
    a4w4: A4W4's dequant order, `(acc * x_scale) * w_scale` (semantics B.1.5), with
      `smooth`, float32 `[e, n/2]` or `[e, 1]` (None: 1), multiplying the SwiGLU result.
    tiles: block sizes (`block_n` unused: a row is computed whole);
    out_dtype, qmax: the per-token codes (int8 and 127, or an fp8 type and its largest
      finite value: `epilogue.codes_for_amax`);
    mx_inputs: x float8 `[m, k]` and w float8 `[e, k, n]` with e8m0 scale bytes per block
      of 32 along k, block b at column b of x_scale (uint8 `[m, 2P]`) and at
      `[b % 2, b // 2]` of w_scale (uint8 `[e, 2, P, n]`: how a TPU holds torch_npu's
      `[e, P, n, 2]` where `pairs_major`, so no copy), P >= ceil(k / 64): both dequantized
      in VMEM to bfloat16 (exact: a float8 value times a power of two) and multiplied in
      float32 (exact products).
    mx_out: MX codes of out_dtype instead (semantics B.1.6), in blocks of 32 along a row:
      quantized in the kernel (`_mx_quantize`) where n/2 is a multiple of 128; else
      the kernel writes the SwiGLU values, float32 `[m, n/2]`, and XLA quantizes them
      (`epilogue.quantize_mx_rows`, the XLA path's quantizer, as the GPU kernel does);
    interpret: run in Pallas interpret mode (any backend).

  Returns:
    (q `[m, n/2]` of out_dtype, scale float32 `[m]`, or e8m0 bytes uint8
    `[m, ceil(n/64)]` with `mx_out`), rows past the last end 0.

  Grid (visit, k tile). Each step multiplies an x tile by the `[block_k, n]` weight
  tile of its group (both SwiGLU halves) into an int32 row accumulator `[block_m, n]`;
  A8W4 closes each k group in float32; A8W4 and A4W4 widen their int4 weight block to
  int8 values in VMEM first; MX inputs dequantize theirs (and each x row block) to
  bfloat16 values, into a float32 accumulator. The last k step dequantizes, applies SwiGLU
  to the halves `[:, :n/2]` and `[:, n/2:]`, quantizes whole rows and writes the
  visit's rows. An expert's weights that fit VMEM whole (one k tile) stay there over its
  visits and are copied by the kernel, the next expert's while the current one's visits
  run (`ring_buffers`), in pieces of k that an expert's first visit multiplies as they
  arrive (`weight_pieces`; int4 weights whole); k tiles come through the grid's pipeline.
  """
  x_words = x.dtype == jnp.int32  # A4W4's tokens as torch_npu packs them: unpacked in VMEM
  m, k = x.shape[0], x.shape[1] * (8 if x_words else 1)
  e, n = w.shape[0], w_scale.shape[-1]
  nh = n // 2
  groups = 1 if mx_inputs else w_scale.shape[1]
  # MX fp4 operands: on TPU7x loaded as fp4 vectors and converted; Mosaic has no fp4 vectors
  # on earlier chips, where their codes are decoded (`_fp4_values`), read through an int4
  # view of the block (XLA's bitcast to int4 would be a pass over them). fp4 x: a whole x
  # tile at a step (4-bit rows are addressed 64 at a time, its row blocks start at any 32).
  fp4_codes = mx_inputs and w.dtype == jnp.float4_e2m1fn
  fp4_x = mx_inputs and x.dtype == jnp.float4_e2m1fn
  fp4_vectors = tpu_tiles.current_chip() == "tpu7x"
  if mx_inputs and (assist is not None or a4w4 or smooth is not None or w.ndim != 3
                    or not (fp4_codes or w.dtype in (jnp.float8_e4m3fn, jnp.float8_e5m2))):
    raise ValueError("mx_inputs: expected float8 or float4_e2m1fn ND weights `[e, k, n]` and "
                     f"no A8W4 / A4W4 operands, got w {w.dtype}{list(w.shape)}")
  gs = k // groups
  a8w4 = assist is not None
  if a8w4 and a4w4:
    raise ValueError("assist: expected None for A4W4 (A8W4's assist matrix)")
  if smooth is not None and not a4w4:
    raise ValueError("smooth: expected None unless a4w4 (A4W4's smooth scale)")
  # int4 weights widened to int8 values in VMEM (`wv_ref`); MX: fp8 ones dequantized to
  # bfloat16 values there
  widen = a8w4 or a4w4 or mx_inputs
  words = w.dtype == jnp.int32
  if words and not widen:
    raise ValueError("w: expected int32 words only for int4 weights (A8W4, A4W4)")
  if x_words and not a4w4:
    raise ValueError("x: expected int32 words only for A4W4")
  if m == 0:  # no rows, no grid
    return jnp.zeros((0, nh), out_dtype), jnp.zeros((0,), jnp.float32)
  mx_blocks = mx_out and nh % 128 == 0  # MX blocks quantized in the kernel
  mx_values = mx_out and not mx_blocks   # else its SwiGLU values, quantized by XLA
  plan = fused_plan(m, k, n, groups, tiles, widened=widen, lhs_words=x_words,
                    out_bytes=4 if mx_values else 1, mx_inputs=mx_inputs)
  bm, bk, k_tiles = plan.block_m, plan.block_k, plan.k_tiles
  gpt = max(bk // gs, 1)            # k groups closed inside one k tile (bk >= gs)
  # k tiles one k group spans (bk < gs; per channel the last may be partial: k % bk)
  tiles_per_group = common.cdiv(gs, bk) if bk < gs else 1
  m_tiles = common.cdiv(m, bm)
  num_groups = ends.shape[0]
  # A device with two TensorCores (v5p) splits the work between them (a "parallel" axis;
  # elsewhere it has one step): the row tiles where they outnumber the groups (prefill),
  # else the visits, at a group boundary (decode: every visit streams an expert's weights
  # through the MXU, at a cost of 128 rows however few it has), each core then writing
  # its own copy of the output, merged by rows below.
  cores = tpu_tiles.cores(tpu_tiles.current_chip())
  by_visits = cores > 1 and m_tiles < num_groups
  v, runs, steps = tpu_visits.row_visits(ends, m, bm, start, interpret=interpret)
  split_row = None
  per_core = common.per_core(m, bm, num_groups)
  if not by_visits:
    cores = min(cores, m_tiles)  # a core of its own for each row tile at most
  if cores > 1:
    v, runs, steps, per_core, split_row = tpu_visits.two_cores(
        v, m, bm, by_visits=by_visits, mxu_rows=ROW_BLOCK, interpret=interpret)
  # a view: no copy (MX: the scale bytes as they come, `[e, 2, P, n]`)
  scales = w_scale if mx_inputs else w_scale.astype(jnp.float32).reshape(e, groups, 1, n)
  # MX: rows of a weight scale block, per block parity
  kb_rows = w_scale.shape[2] if mx_inputs and plan.resident else bk // (2 * epilogue.MX_BLOCK)
  # Per-row scales travel lane-dense (`_lane_dense`: x_scale in, the output's scales out),
  # turned into a VMEM column and back by the kernel (`_to_column`, `_to_rows`).
  lanes = _row_lanes(bm)
  m_rows = common.cdiv(m, lanes)
  if not mx_inputs:  # MX: block scale bytes `[m, KB]`, a whole row's to a row tile
    x_scale = _lane_dense(x_scale, bm)
  words_k_minor = words and k_minor(w.shape)
  # Resident weights: copied by the kernel (`_weights_by_hand`), the expert's own operands
  # (its weight scales; A8W4's assist, A4W4's smooth) just before them, and a grid step
  # per row tile (per core) that loops over the tile's visits.
  by_hand = plan.resident
  if not by_hand:
    runs, steps = (), ()
  pieces = 1 if widen else weight_pieces(k, K_CHUNK)  # int4 whole: widened whole
  n_sides = 1 + (a8w4 or smooth is not None)  # the expert's operands beside its weights

  def kernel(gid_ref, mt_ref, nv_ref, wid_ref, rt_ref, ends_ref, *refs):
    if by_hand:  # the weight runs, the steps
      run_ref, expert_ref, first_ref, steps_ref, *refs = refs
    x_ref, w_in, s_in, xs_ref, *refs = refs
    a_in = sm_in = None  # A8W4's assist, A4W4's smooth
    # the tile's per-row scales as columns (MX output: the SwiGLU values, no scales)
    *refs, xs_col, qs_col = refs if not mx_out else (*refs, None)
    if by_hand:  # (scratch) the weights' ring, and a ring of each of the expert's operands
      refs, (w_buf, w_sem, *side_bufs, side_sem) = refs[:-n_sides - 3], refs[-n_sides - 3:]
    if x_words or mx_inputs:
      *refs, xv_ref = refs
    if mx_inputs:
      *refs, wsv_ref = refs
    if widen:
      *refs, wv_ref = refs
    if a8w4:
      a_in, *refs = refs
    elif smooth is not None:
      sm_in, *refs = refs
    q_ref, *refs = refs
    if not mx_values:
      qs_ref, *refs = refs
    acc, *refs = refs
    if a8w4:
      f, cs = refs
    c, step, kk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    # the step's last k tile (a step past a core's count, where the other has more: none)
    last_k = (kk == k_tiles - 1) & (step < (steps_ref[c] if by_hand else nv_ref[c]))
    if not mx_inputs:  # the row tile's x scales as a column
      pl.when(last_k)(lambda: _to_column(xs_ref, xs_col))

    def visit(t, carry):
      i = c * per_core + t  # this core's visit t
      g = gid_ref[i]
      w_ref, s_ref = w_in, s_in
      a_ref, sm_ref = a_in, sm_in
      if by_hand:  # the weights in HBM, copied run by run into w_buf
        run = run_ref[i]
        prev_run = run_ref[jnp.maximum(i - 1, 0)]
        live = t < nv_ref[c]
        starts = live & ((t == 0) | (run != prev_run))
        expert = lambda r: expert_ref[c * per_core + jnp.minimum(r, per_core - 1)]
        sides = [s_in, a_in if a8w4 else sm_in][:n_sides]

        def copy_of(r, slot, p):  # piece p of run r's weights
          ks = slice(None) if widen else pl.ds(pl.multiple_of(p * (k // pieces), k // pieces),
                                              k // pieces)
          return pltpu.make_async_copy(w_in.at[expert(r), ks], w_buf.at[slot, ks],
                                       w_sem.at[slot, p])

        def own_of(r, slot):  # run r's own operands
          return [pltpu.make_async_copy(src.at[expert(r)], buf.at[slot], side_sem.at[slot, q])
                  for q, (src, buf) in enumerate(zip(sides, side_bufs))]
        w_ref, wait = _weights_by_hand(w_buf, copy_of, run, prev_run, t, live, starts,
                                       starts & (t == 0),
                                       lambda r: (r < per_core) & (expert(r) >= 0), pieces,
                                       own_of)
        slot = lax.rem(run, w_buf.shape[0])
        s_ref = side_bufs[0].at[slot]
        if a8w4:
          a_ref = side_bufs[1].at[slot]
        elif smooth is not None:
          sm_ref = side_bufs[1].at[slot]
        if widen:
          wait(0)
      # fp4 operands' values at `view` of their ref, from its codes' int4 view (a bitcast of
      # the ref, taken before the pipeline block's leading dim is indexed away)
      def fp4_value(ref, codes, view):
        if fp4_vectors:
          return ref[view].astype(jnp.float32)
        return _fp4_values(codes[view].astype(jnp.int32))
      w_codes = (w_ref.bitcast(jnp.int4) if by_hand else w_ref.bitcast(jnp.int4).at[0]
                 ) if fp4_codes and not fp4_vectors else None
      if fp4_codes and not by_hand:
        w_ref = w_ref.at[0]
      real = (t < nv_ref[c]) & common.RowVisits.is_real(g, num_groups)  # not head or tail
      rows = common.group_rows(ends_ref, g, mt_ref[i] * bm, bm)

      @pl.when(real & (kk == 0))
      def _():
        if not a8w4 or tiles_per_group > 1:  # A8W4 closes k groups within a tile into f
          acc[...] = jnp.zeros_like(acc)
        if a8w4:
          f[...] = jnp.zeros_like(f)
          if not plan.resident:
            cs[...] = jnp.zeros_like(cs)

      # int4 weights are held as int8 values in VMEM (`wv_ref`: int4 widened, int32 words
      # unpacked, the k edge of a partial tile zeroed, which zeroes the products with x's
      # garbage there too), A8W4's with their column sums: once per expert when its weights
      # stay resident (a group's visits are consecutive), else every step (a new k tile).
      first_visit = real & ((t == 0) | (gid_ref[jnp.maximum(i - 1, 0)] != g))
      unpack_rows = UNPACK_ROWS if bk % UNPACK_ROWS == 0 else bk  # divides the k groups too

      def unpack(ci, carry):
        rows = pl.ds(pl.multiple_of(ci * unpack_rows, unpack_rows), unpack_rows)

        def put(cols, vals):  # int32 values of the rows' columns cols
          if k % bk:
            vals = _mask_k_edge(vals, kk * bk + ci * unpack_rows, k, 0)
          wv_ref[rows, cols] = vals.astype(jnp.int8)
          if a8w4:  # 8 * the column sums of the k group these rows are in, exact in int32
            sums = cs.at[lax.div(ci * unpack_rows, gs) if tiles_per_group == 1 else 0]
            sums[:, cols] += 8 * jnp.sum(vals, axis=0, keepdims=True)

        if words:
          _unpack_words(w_ref[:, rows].T if words_k_minor else w_ref[rows, :], n, put)
        elif a8w4 or k % bk:
          put(slice(None), w_ref[rows, :].astype(jnp.int32))
        else:  # nothing to sum or mask: int4 -> int8 in one conversion
          wv_ref[rows, :] = w_ref[rows, :].astype(jnp.int8)
        return carry

      def dequantize(rows, b):  # MX: rows of the weight block times the scale of block b
        scale = wsv_ref[lax.rem(b, 2), pl.ds(lax.div(b, 2), 1), :].astype(jnp.bfloat16)
        # (past k in a partial tile: garbage, which `_accumulate` masks as it multiplies)
        wv_ref[rows, :] = w_ref[rows, :].astype(jnp.bfloat16) * scale

      def dequantize_block(b, carry):
        dequantize(pl.ds(pl.multiple_of(b * epilogue.MX_BLOCK, epilogue.MX_BLOCK),
                         epilogue.MX_BLOCK), b)
        return carry

      def dequantize_fp4(start, size: int, j):  # `size` <= 64 rows from `start`: the pair j
        # of blocks (2j, 2j + 1: scales at [0, j], [1, j]); 4-bit rows load 64 at a time
        vals = fp4_value(w_ref, w_codes, (pl.ds(start, size), slice(None)))
        for half in range(common.cdiv(size, epilogue.MX_BLOCK)):
          lo, hi = half * epilogue.MX_BLOCK, min(size, (half + 1) * epilogue.MX_BLOCK)
          scale = wsv_ref[half, pl.ds(j, 1), :]
          wv_ref[pl.ds(start + lo, hi - lo), :] = (vals[lo:hi] * scale).astype(wv_ref.dtype)

      def dequantize_pair(j, carry):
        pair = 2 * epilogue.MX_BLOCK
        dequantize_fp4(pl.multiple_of(j * pair, pair), pair, j)
        return carry

      if widen:
        @pl.when(first_visit if plan.resident else real)
        def _():
          if a8w4 and tiles_per_group == 1:  # sums of the k groups in the block (k tiled:
            cs[...] = jnp.zeros_like(cs)     # their own)
          if mx_inputs:  # the block's scales as float32 once, then 32 rows a scale row
            wsv_ref[...] = _mx_scales(s_ref[...])
            per = 2 * epilogue.MX_BLOCK if fp4_codes else epilogue.MX_BLOCK
            whole, tail = divmod(bk, per)  # a tail only where bk = k
            lax.fori_loop(0, whole, dequantize_pair if fp4_codes else dequantize_block, 0)
            if tail and fp4_codes:
              dequantize_fp4(whole * per, tail, whole)
            elif tail:
              dequantize(pl.ds(whole * per, tail), whole)
          else:
            lax.fori_loop(0, bk // unpack_rows, unpack, 0)

      def multiply_mx(r):  # the rows' x dequantized to bfloat16, times the weight's values
        # Each x column's scale, spread from its block's by a product with a 0 / 1 matrix:
        # exact (a power of two, one nonzero term a column). A NaN scale spreads over its
        # whole row, whose C is NaN anyway (NaN times any weight); the pair's padding
        # blocks past k are zeroed first.
        blocks = xs_ref.shape[1]
        block = lambda d: lax.broadcasted_iota(jnp.int32, (blocks, bk), d)
        spread = (block(0) == kk * (bk // epilogue.MX_BLOCK) + lax.shift_right_logical(
            block(1), 5)).astype(jnp.bfloat16)
        used = lax.broadcasted_iota(jnp.int32, (1, blocks), 1) < common.cdiv(
            k, epilogue.MX_BLOCK)
        scales = jnp.where(used, _mx_scales(xs_ref[r, :]), jnp.zeros((), jnp.float32))
        scale = jnp.dot(scales.astype(jnp.bfloat16), spread, preferred_element_type=jnp.float32)
        values = xv_ref[r] if fp4_x else x_ref[r]  # fp4: the tile's values, decoded below
        xv_ref[r] = (values.astype(jnp.float32) * scale).astype(xv_ref.dtype)
        _accumulate(acc.at[r], xv_ref.at[r], wv_ref, kk * bk, k)

      def multiply_a8w8(r):  # A4W4 too, on its widened weights (and unpacked tokens)
        xr = x_ref.at[r]
        if x_words:  # the rows' words unpacked as the weights' are (`_unpack_words`)
          def put(cols, vals):
            xv_ref[r, cols] = vals.astype(jnp.int8)
          _unpack_words(x_ref[r, :], bk, put)
          xr = xv_ref.at[r]
        _accumulate(acc.at[r], xr, wv_ref if a4w4 else w_ref, kk * bk, k)

      def multiply_a8w4(r):  # each k group of the tile closed in float32 (semantics B.1)
        xb, wb = x_ref[r], wv_ref[...]
        for c in range(gpt):
          cols = slice(c * min(gs, bk), (c + 1) * min(gs, bk))
          part = jnp.dot(xb[:, cols], wb[cols], preferred_element_type=jnp.int32)
          if tiles_per_group == 1:
            f[r] += epilogue.close_k_group(part, cs[c], s_ref[c])
          else:
            acc[r] += part

        if tiles_per_group > 1:  # a k group spans tiles: close it on its last one
          @pl.when(kk % tiles_per_group == tiles_per_group - 1)
          def _():
            # lax.div: jnp's floor division lowers a sign, which asks the default device
            # for its TPU generation (a CPU host's AOT compile has none)
            f[r] += epilogue.close_k_group(acc[r], cs[0], s_ref[lax.div(kk, tiles_per_group)])
            acc[r] = jnp.zeros_like(acc[r])

      # Only the row blocks that hold the group's rows are multiplied and finished.
      r0 = mt_ref[i] * bm
      for_rows = lambda fn: _for_row_blocks(ends_ref, g, r0, bm, fn)
      if by_hand and not widen:  # each piece of the weights multiplied once it is here
        def piece(k0, size):
          pl.when(real)(lambda: for_rows(lambda r: _accumulate(
              acc.at[r], x_ref.at[r, pl.ds(k0, size)], w_ref.at[pl.ds(k0, size)], 0, size)))
        _multiply_by_pieces(k, pieces, wait, piece)
      else:
        if fp4_x:  # the x tile's values, scaled in place by each row block
          @pl.when(real)
          def _():
            x_codes = None if fp4_vectors else x_ref.bitcast(jnp.int4)
            xv_ref[...] = fp4_value(x_ref, x_codes, (slice(None), slice(None))).astype(
                xv_ref.dtype)
        pl.when(real)(lambda: for_rows(multiply_a8w4 if a8w4 else multiply_mx if mx_inputs
                                       else multiply_a8w8))
      if a8w4 and tiles_per_group > 1 and not plan.resident:
        @pl.when(real & (kk % tiles_per_group == tiles_per_group - 1))
        def _():  # the k group closed: its column sums start again
          cs[...] = jnp.zeros_like(cs)

      def finish(r):  # dequant, SwiGLU, quantize and write the group's rows in rows r
        xs = None if mx_inputs else xs_col[r]
        if mx_inputs:  # scaled already
          act, gate = acc[r, :nh], acc[r, nh:]
        elif a8w4:
          act = epilogue.finish_a8w4(f[r, :nh], a_ref[:, :nh], xs)
          gate = epilogue.finish_a8w4(f[r, nh:], a_ref[:, nh:], xs)
        else:
          dequant = epilogue.dequant_a4w4 if a4w4 else epilogue.dequant_a8w8
          act = dequant(acc[r, :nh], s_ref[0, :, :nh], xs)
          gate = dequant(acc[r, nh:], s_ref[0, :, nh:], xs)
        s = epilogue.swiglu_halves(act, gate)
        if smooth is not None:
          s = s * sm_ref[...]
        rows_r = common.group_rows(ends_ref, g, r0 + r.start, r.size)
        if mx_values:  # the values, quantized in blocks by XLA
          q_ref[r] = jnp.where(rows_r, s, q_ref[r])
          return
        if mx_blocks:  # codes as their bits, and each block's scale byte
          codes, scale = _mx_quantize(s, out_dtype)
          q_ref[r] = jnp.where(rows_r, codes, q_ref[r])
          qs_ref[r] = jnp.where(rows_r, scale, qs_ref[r])
          return
        q, scale = epilogue.quantize_rows(s, qmax=qmax, dtype=out_dtype)
        q_ref[r] = jnp.where(rows_r, q, q_ref[r])
        qs_col[r] = jnp.where(rows_r, scale, qs_col[r])

      last_step = (t < nv_ref[c]) & (kk == k_tiles - 1)

      pl.when(last_step & real)(lambda: for_rows(finish))

      @pl.when(last_step & ~real)  # head and tail rows are 0
      def _():
        q_ref[...] = jnp.where(rows, jnp.zeros((), q_ref.dtype), q_ref[...])
        if mx_blocks:
          qs_ref[...] = jnp.where(rows, jnp.zeros((), qs_ref.dtype), qs_ref[...])
        elif not mx_out:
          qs_col[...] = jnp.where(rows, 0.0, qs_col[...])

      return carry

    if by_hand:  # core c's steps from c * (m_tiles + 1)
      at = c * (m_tiles + 1) + step
      lax.fori_loop(first_ref[at], first_ref[at + 1], visit, 0)
    else:
      visit(step, 0)
    # The output block stays over the row tile's visits, each finishing its rows in qs_col;
    # the last one's rows are those written back.
    if not mx_out:
      pl.when(last_k)(lambda: _to_rows(qs_col, qs_ref))

  # Index maps (head and tail visits read the blocks of the nearest real visit: no copy).
  # The scalar-prefetch operands `pre` are `v`'s fields, in order, then `runs`', `steps`'.
  def at(c, t, pre):  # the visit whose blocks step t reads (by hand: its row tile's first)
    first = pre[len(v) + len(runs)][c * (m_tiles + 1) + t] if by_hand else t
    return c * per_core + first
  row = ((lambda c, t, kk, *pre: (c, pre[1][at(c, t, pre)], 0)) if by_visits else
         (lambda c, t, kk, *pre: (pre[1][at(c, t, pre)], 0)))
  row3 = lambda *a: (*row(*a), 0)  # the scales' `[m / lanes, 1, lanes]` blocks
  lead, lead_block = ((cores,), (None,)) if by_visits else ((), ())  # by visits: per core
  k_group_block = lambda kk: kk if (tiles_per_group == 1 and gpt < groups) else 0
  weight_block = lambda c, t, kk, *pre: (pre[3][at(c, t, pre)], kk, 0)
  # (fp4 codes through the pipeline: a leading dim of 1, not squeezed: Mosaic bitcasts no
  # ref with a squeezed dim)
  w_spec = pl.BlockSpec((1 if fp4_codes else None, bk, w.shape[2]), weight_block)
  if words_k_minor:  # the words as the TPU holds them: `[e, n/8, k]` (no copy)
    w = jnp.swapaxes(w, 1, 2)
    w_spec = pl.BlockSpec((None, w.shape[1], bk),
                          lambda *a: (weight_block(*a)[0], 0, weight_block(*a)[1]))
  if by_hand:
    w_spec = pl.BlockSpec(memory_space=pl.ANY)
  scale_block = lambda c, t, kk, *pre: (pre[3][at(c, t, pre)], k_group_block(kk), 0, 0)
  x_block = lambda c, t, kk, *pre: (pre[4][at(c, t, pre)], kk)
  scale_shape = (None, gpt if tiles_per_group == 1 else groups, 1, n)
  scale_spec = pl.BlockSpec(scale_shape, scale_block)
  x_scale_spec = pl.BlockSpec((bm // lanes, 1, lanes), lambda *a: (x_block(*a)[0], 0, 0))
  if mx_inputs:  # the weight scales' rows of the k tile; a row tile's x scales whole
    scale_spec = pl.BlockSpec((None, 2, kb_rows, n), lambda *a: (
        scale_block(*a)[0], 0, a[2] if not plan.resident else 0, 0))
    x_scale_spec = pl.BlockSpec((bm, x_scale.shape[1]), lambda *a: (x_block(*a)[0], 0))
  in_specs = [pl.BlockSpec((bm, bk // 8 if x_words else bk), x_block), w_spec,
              scale_spec, x_scale_spec]
  args = [x, w, scales, x_scale]
  scratch = [pltpu.VMEM((bm, n), jnp.float32 if mx_inputs else jnp.int32)]
  per_expert = lambda cols: pl.BlockSpec((None, 1, cols),
                                         lambda *a: (weight_block(*a)[0], 0, 0))
  if a8w4:
    in_specs += [per_expert(n)]
    args += [assist.astype(jnp.float32).reshape(e, 1, n)]
    # float32 k-group sums; int32 column sums: every k group of an expert (resident), or
    # the running sums of the k group a tile is in (k tiled)
    scratch += [pltpu.VMEM((bm, n), jnp.float32),
                pltpu.VMEM((groups if plan.resident else gpt if tiles_per_group == 1 else 1,
                            1, n), jnp.int32)]
  elif smooth is not None:
    in_specs += [per_expert(smooth.shape[-1])]
    args += [smooth.astype(jnp.float32).reshape(e, 1, smooth.shape[-1])]
  if widen:  # the weight block's int8 values (MX: bfloat16)
    scratch += [pltpu.VMEM((bk, n), jnp.bfloat16 if mx_inputs else jnp.int8)]
  if mx_inputs:
    scratch += [pltpu.VMEM((2, kb_rows, n), jnp.float32)]  # its scales' values
  if x_words or mx_inputs:  # the x tile's int8 values (MX: bfloat16)
    scratch += [pltpu.VMEM((bm, bk), jnp.bfloat16 if mx_inputs else jnp.int8)]
  if by_hand:  # the rings of the weights and of the expert's own operands, from HBM
    ring = plan.weight_buffers
    scratch += [pltpu.VMEM((ring, *w.shape[1:]), w.dtype),
                pltpu.SemaphoreType.DMA((ring, pieces))]
    scratch += [pltpu.VMEM((ring, *a.shape[1:]), a.dtype) for a in args[2::2][:n_sides]]
    scratch.append(pltpu.SemaphoreType.DMA((ring, n_sides)))
    in_specs[2::2] = [pl.BlockSpec(memory_space=pl.ANY)] * len(in_specs[2::2])
  scratch += [pltpu.VMEM((bm, 1), jnp.float32)] * (1 if mx_out else 2)  # x_scale, the
  # output's scales
  visits = cores * per_core  # the static bound of the grid
  weight_reads = num_groups if plan.resident else visits  # per visit when k is tiled
  info = jnp.iinfo if jnp.issubdtype(w.dtype, jnp.integer) else jnp.finfo
  w_bytes = w.size // e * info(w.dtype).bits // 8  # one expert's
  x_reads = m_tiles if plan.resident else visits
  x_info = jnp.iinfo if jnp.issubdtype(x.dtype, jnp.integer) else jnp.finfo
  cost = pl.CostEstimate(
      flops=2 * m * k * n, transcendentals=m * nh,
      bytes_accessed=(x_reads * bm * x.shape[1] * x_info(x.dtype).bits // 8  # words: k / 2 a row
                      + weight_reads * (w_bytes + (w_scale.size // e if mx_inputs
                                                   else 4 * groups * n))
                      + (x_scale.size if mx_inputs else 4 * m)
                      + m * nh * (4 if mx_values else 1)
                      + (m * nh // 32 if mx_blocks else 0 if mx_out else 4 * m)))
  q_dtype = jnp.float32 if mx_values else jnp.uint8 if mx_blocks else out_dtype
  out_specs = [pl.BlockSpec((*lead_block, bm, nh), row)]
  out_shape = [common.result((*lead, m, nh), q_dtype, *v, *args)]
  if mx_blocks:  # e8m0 scale bytes, one a block
    out_specs.append(pl.BlockSpec((*lead_block, bm, nh // epilogue.MX_BLOCK), row))
    out_shape.append(common.result((*lead, m, nh // epilogue.MX_BLOCK), jnp.uint8, *v, *args))
  elif not mx_out:
    out_specs.append(pl.BlockSpec((*lead_block, bm // lanes, 1, lanes), row3))
    out_shape.append(common.result((*lead, m_rows, 1, lanes), jnp.float32, *v, *args))
  q, *qs = pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(v) + len(runs) + len(steps),
          grid=(cores, _steps(steps.count if by_hand else v.count), k_tiles),
          in_specs=in_specs, out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=_params("parallel", "arbitrary", "arbitrary"), cost_estimate=cost,
      interpret=interpret, name="npu_gmm_swiglu_quant")(*v, *runs, *steps, *args)
  # each row from the core that holds its group (by visits; the other's copy: garbage)
  by_row = ((lambda a: a) if not by_visits else lambda a: jnp.where(
      (jnp.arange(m) >= split_row).reshape((m,) + (1,) * (a.ndim - 2)), a[1], a[0]))
  if mx_values:  # the XLA path's quantizer, on whole rows (fp8 / fp4 codes as their bits)
    q, qs = epilogue.quantize_mx_rows(by_row(q), out_dtype, as_bits=True)
    return epilogue.codes_from_bits(q, out_dtype), qs
  if mx_blocks:
    return epilogue.codes_from_bits(by_row(q), out_dtype), by_row(qs[0])
  return by_row(q), by_row(qs[0].reshape(*lead, m_rows * lanes)[..., :m])


def gmm_swiglu_quant_mx(x: jax.Array, w: jax.Array, x_scale: jax.Array, w_scale: jax.Array,
                        ends: jax.Array, *, tiles: TileSizes, out_dtype, qmax: float,
                        mx_out: bool, start: jax.Array | None = None,
                        interpret: bool = False) -> tuple[jax.Array, jax.Array]:
  """The fused op on MX inputs (semantics B.1.6), the fused kernel's `mx_inputs` form: x and
  the expert's weights dequantized in VMEM (each value times its block's power of two,
  exact in bfloat16 where the XLA path's float32 product is normal) and multiplied in
  float32 over the whole k tile, as the XLA path's one float32 product sums them (not
  block by block as the golden and the GPU kernel: float32 sums in another order).

  Args:
    x: float8_e4m3fn / float8_e5m2 / float4_e2m1fn `[m, k]` (fp4 decoded in VMEM);
    w: those dtypes `[e, k, n]` (ND, read in place; fp4 decoded in VMEM);
    x_scale: e8m0 bytes uint8 `[m, ceil(k/64), 2]`; w_scale: uint8 `[e, ceil(k/64), n, 2]`;
    ends: int32 group ends; start: the first row of group 0 (None: row 0);
    out_dtype, qmax: the codes; mx_out: MX codes (else per token); tiles, interpret: as
    `gmm_swiglu_quant`.

  Returns:
    (codes `[m, n/2]` of out_dtype, scales: float32 `[m]` per token, e8m0 bytes uint8
    `[m, ceil(n/64)]` for MX), rows past the last end 0.
  """
  m = x.shape[0]
  blocks = 2 * x_scale.shape[1]  # block b at [b // 2, b % 2]: column / row b of these
  return gmm_swiglu_quant(
      x, w, jnp.transpose(w_scale, (0, 3, 1, 2)), x_scale.reshape(m, blocks),
      ends, start=start, tiles=tiles, out_dtype=out_dtype, qmax=qmax, mx_out=mx_out,
      mx_inputs=True, interpret=interpret)


def _fp4_values(codes: jax.Array) -> jax.Array:
  """float32 values of e2m1 codes (int32 `[rows, c]`, the low 4 bits): looked up in a table of
  the 16 values (`_fp4_bits` of lanes 0-15) by a gather within each 128-lane vector, where c
  is a multiple of 128 (two operations a value where the bits take nine), else built as
  bits."""
  rows, width = codes.shape
  if width % 128:
    return _fp4_bits(codes)
  table = _fp4_bits(lax.broadcasted_iota(jnp.int32, (rows, 128), 1) & 15)
  return jnp.concatenate([jnp.take_along_axis(table, codes[:, w:w + 128] & 15, axis=1,
                                              mode="promise_in_bounds")
                          for w in range(0, width, 128)], axis=1)


def _fp4_bits(codes: jax.Array) -> jax.Array:
  """float32 values of e2m1 codes (int32, the low 4 bits: sign, 2-bit exponent of bias 1,
  1-bit mantissa), built as float32 bits: the magnitude's 3 bits c are the exponent and
  mantissa's, 2**(e - 1) * (1 + m / 2) = bits `(126 << 23) + (c << 22)`, for c >= 2; c = 1
  (subnormal) is 0.5 = `126 << 23`, c = 0 is 0."""
  c = codes & 7
  bits = jnp.where(c >= 2, (c << 22) + (126 << 23), c * (126 << 23))
  return lax.bitcast_convert_type(bits | ((codes & 8) << 28), jnp.float32)


def _mx_scales(scale_bytes: jax.Array) -> jax.Array:
  """e8m0 bytes -> their values in float32, byte 0's 2**-127 (a subnormal: a product with
  it is 0 or NaN wherever the XLA path's is, which XLA:CPU and the TPU flush) as 0, so
  that bfloat16 holds every one exactly: powers of two and NaN."""
  b = scale_bytes.astype(jnp.int32)
  return jnp.where(b == 0, 0.0, epilogue.e8m0_to_float32(b))


def _mx_quantize(s: jax.Array, dtype) -> tuple[jax.Array, jax.Array]:
  """MX codes of `s [rows, c]` (c a multiple of 128) in blocks of 32 along a row, as their
  bits (uint8 `[rows, c]`), and the blocks' scale bytes (uint8 `[rows, c / 32]`), as
  `epilogue.quantize_mx_rows` gives them. Each block's largest exponent field reaches its
  last lane through five lane rotations (lane j: the largest of lanes j - 31 .. j); a
  product with a 0 / 1 matrix picks those lanes out, the block's terms are computed once a
  block (`epilogue.mx_block_terms`), and such products spread its multiplier and its NaN
  flag back over its lanes. The products are exact in bfloat16, one MXU pass: integers
  under 256, powers of two, 0 and 1, one term of each sum not 0."""
  size = epilogue.MX_BLOCK
  v, fields = epilogue.mx_fields(s)
  c = s.shape[1]
  d = 1
  while d < size:
    fields = jnp.maximum(fields, pltpu.roll(fields, d, 1))
    d *= 2
  iota = lambda shape, axis: lax.broadcasted_iota(jnp.int32, shape, axis)
  last = (iota((c, c // size), 0) == size * iota((c, c // size), 1) + size - 1)
  bf16 = lambda a: a.astype(jnp.bfloat16)
  product = lambda a, b: jnp.dot(bf16(a), bf16(b), preferred_element_type=jnp.float32)
  block_exp = product(fields, last).astype(jnp.int32)
  multiplier, nan_block, scale = epilogue.mx_block_terms(block_exp, dtype)
  spread = iota((c // size, c), 0) == lax.div(iota((c // size, c), 1), size)
  codes = epilogue.mx_scaled_codes(v, product(multiplier, spread),
                                   product(nan_block, spread) > 0, dtype, as_bits=True,
                                   convert=True)
  return codes, scale


def _row_lanes(bm: int) -> int:
  """Rows to a lane-dense row of per-row values (`_lane_dense`) for `bm`-row tiles."""
  return ROW_BLOCK if bm % ROW_BLOCK == 0 else bm


def _lane_dense(values: jax.Array, bm: int) -> jax.Array:
  """float32 `[m]` per-row values as `[m / L, 1, L]` (L = `_row_lanes(bm)`, zero-padded):
  as `[m, 1]` each row would take a 128-lane tile, in HBM and in every copy; the kernel
  turns a tile's rows into a VMEM column (`_to_column`)."""
  lanes = _row_lanes(bm)
  rows = common.cdiv(values.shape[0], lanes)
  return jnp.pad(values.astype(jnp.float32), (0, rows * lanes - values.shape[0])).reshape(
      rows, 1, lanes)


def _to_column(rows_ref, col_ref) -> None:
  """col_ref `[bm, 1]` = rows_ref `[bm / L, 1, L]` (float32) read row by row. Each `[1, L]`
  row becomes a column through a max over an `[L, L]` broadcast of its int32 bits with all
  but the diagonal at the least int32: every value's bits kept (NaN, -0.0; a float max
  drops NaN on XLA:CPU), for any L, with no transpose. (A loop: one copy of the code,
  whatever the tile.)"""
  lanes = rows_ref.shape[-1]

  def body(j, carry):
    row = jnp.broadcast_to(_bits(rows_ref[j]), (lanes, lanes))
    col_ref[pl.ds(pl.multiple_of(j * lanes, lanes), lanes), :] = _float(
        jnp.max(jnp.where(_diagonal(lanes), row, _LEAST), axis=1, keepdims=True))
    return carry
  lax.fori_loop(0, rows_ref.shape[0], body, 0)


def _to_rows(col_ref, rows_ref) -> None:
  """rows_ref `[bm / L, 1, L]` = col_ref `[bm, 1]` (`_to_column`'s inverse)."""
  lanes = rows_ref.shape[-1]

  def body(j, carry):
    col = jnp.broadcast_to(_bits(col_ref[pl.ds(pl.multiple_of(j * lanes, lanes), lanes), :]),
                           (lanes, lanes))
    rows_ref[j] = _float(jnp.max(jnp.where(_diagonal(lanes), col, _LEAST), axis=0,
                                 keepdims=True))
    return carry
  lax.fori_loop(0, rows_ref.shape[0], body, 0)


_LEAST = np.iinfo(np.int32).min
_bits = lambda a: lax.bitcast_convert_type(a, jnp.int32)
_float = lambda a: lax.bitcast_convert_type(a, jnp.float32)


def _diagonal(size: int) -> jax.Array:
  return lax.broadcasted_iota(jnp.int32, (size, size), 0) == lax.broadcasted_iota(
      jnp.int32, (size, size), 1)


def _steps(count: jax.Array) -> jax.Array:
  """The visits a kernel's grid runs: the most any core has (a dynamic grid dimension, as
  megablox's), not the metadata's static bound, whose padding steps would each cost a
  step's fixed overhead."""
  return jnp.max(count).astype(jnp.int32)


def _balanced_tile(size: int, cap: int) -> int:
  """A multiple of 128 of at most `cap` that splits `size` into the fewest, most
  even tiles (2816 with cap 2048: 2 tiles of 1408, not 2048 + 768)."""
  return common.round_up(common.cdiv(size, common.cdiv(size, cap)), 128)


def gmm(lhs: jax.Array, rhs: jax.Array, ends: jax.Array, *, out_dtype, tiles: TileSizes,
        start: jax.Array | None = None, interpret: bool = False, transpose_rhs: bool = False,
        precision=None, scales: tuple[jax.Array, jax.Array] | None = None) -> jax.Array:
  """Grouped matmul `[m, k] x [e, k, n] -> [m, n]` (`rhs [e, n, k]` read as its
  transpose with `transpose_rhs`) of float or int8 operands, accumulated in float32 or int32
  (`common.accumulator`: exact for int8); rows before `start` (group 0's
  first row, as `gmm_swiglu_quant`) and past the last end are 0. `scales`: (float32
  `[e, n]` per group and column, float32 `[m]` per row): the result is
  `epilogue.dequant_a8w8(acc, scales[0][g], scales[1][:, None])`.

  Grid (column tile, visit, k tile): column tiles outermost, so a group's visits are
  consecutive within a column tile and, with k in one step, its weight tile stays put;
  such a resident tile is copied by the kernel (with its column scales), the next
  group's while the current group's visits run (`_weights_by_hand`; where the column
  tiles are whole), in pieces of k that a group's first visit multiplies as they arrive
  (`weight_pieces`). With resident weights the grid takes a step per row tile instead,
  which loops over the tile's visits (`common.TileSteps`): under skewed routing most
  visits are a cold group's, each a step's fixed cost for a little work.
  """
  m, k = lhs.shape
  n = rhs.shape[1 if transpose_rhs else 2]
  isz = lhs.dtype.itemsize
  if m == 0:
    return jnp.zeros((0, n), out_dtype)
  bm, bk, bn = _float_blocks("gmm", k, n, isz, np.dtype(out_dtype).itemsize, tiles)
  precision = _mxu_precision(precision, lhs.dtype)
  m_tiles, k_tiles, n_tiles = common.cdiv(m, bm), common.cdiv(k, bk), common.cdiv(n, bn)
  num_groups = ends.shape[0]
  v, runs, steps = tpu_visits.row_visits(ends, m, bm, start, interpret=interpret)
  visits = v.group.shape[0]
  # Resident weights (one k tile, whole column tiles) are copied by the kernel, in runs
  # that follow the grid: column tile j's runs, then j + 1's (`_weights_by_hand`). On one
  # TensorCore a column tile's runs reach into the next one's; where two cores split the
  # column tiles (v5p), each column tile starts its own.
  by_hand = k_tiles == 1 and n % bn == 0
  # ... and a grid step per row tile that loops over the tile's visits
  runs, steps = (runs, steps) if by_hand else ((), ())
  one_core = tpu_tiles.cores(tpu_tiles.current_chip()) == 1
  pieces = weight_pieces(k)
  scaled = scales is not None
  # the visit step t starts at: it runs visits [first[t], first[t + 1]), else visit t
  first_visit = (lambda t, pre: pre[len(v) + len(runs)][t]) if by_hand else (lambda t, pre: t)

  def kernel(gid_ref, mt_ref, nv_ref, wid_ref, rt_ref, ends_ref, *refs):
    refs = list(refs)
    take = lambda count: [refs.pop(0) for _ in range(count)]
    run_ref, expert_ref, first_ref, _ = take(4) if by_hand else (None,) * 4
    x_ref, w_hbm = take(2)
    cs_in, rs_ref = take(2) if scaled else (None, None)
    o_ref, acc = take(2)
    w_buf, w_sem = take(2) if by_hand else (None, None)
    # the column scales' ring, copied just before the weights
    cs_buf, cs_sem = take(2) if by_hand and scaled else (None, None)
    (rs_col,) = take(1) if scaled else (None,)
    j, s, kk = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    if scaled:  # the row tile's row scales as a column
      pl.when(kk == k_tiles - 1)(lambda: _to_column(rs_ref, rs_col))

    def visit(t, carry):
      g, w_ref, cs_ref = gid_ref[t], w_hbm, cs_in
      if by_hand:  # run R * j + r: column tile j's run r, of R a column tile
        per_tile = run_ref[jnp.maximum(nv_ref[0] - 1, 0)] + 1
        run = per_tile * j + run_ref[t]
        # the run of the visit before (column tile j - 1's last run where t is 0)
        prev_run = jnp.where(t == 0, run - 1, per_tile * j + run_ref[jnp.maximum(t - 1, 0)])
        live = t < nv_ref[0]
        starts = live & ((t == 0) | (run != prev_run))
        # the visits before this one in the core's copies: all column tiles' on one core
        seq = (nv_ref[0] * j if one_core else per_tile * j) + t
        end = per_tile * (n_tiles if one_core else j + 1)  # the runs this core's copies reach

        cols_of = lambda r: pl.ds(pl.multiple_of(lax.div(r, per_tile) * bn, 128), bn)

        def copy_of(r, slot, p):
          cols = cols_of(r)
          ks = pl.ds(pl.multiple_of(p * (k // pieces), k // pieces), k // pieces)
          expert = expert_ref[lax.rem(r, per_tile)]
          src, dst = ((w_hbm.at[expert, cols, ks], w_buf.at[slot, :, ks]) if transpose_rhs
                      else (w_hbm.at[expert, ks, cols], w_buf.at[slot, ks]))
          return pltpu.make_async_copy(src, dst, w_sem.at[slot, p])

        def own_of(r, slot):  # run r's column scales
          return [pltpu.make_async_copy(cs_in.at[expert_ref[lax.rem(r, per_tile)], :, cols_of(r)],
                                        cs_buf.at[slot], cs_sem.at[slot])]
        w_ref, wait = _weights_by_hand(w_buf, copy_of, run, prev_run, seq, live, starts,
                                       starts & (t == 0) & ((j == 0) | (not one_core)),
                                       lambda r: r < end, pieces, own_of if scaled else None)
        if scaled:
          cs_ref = cs_buf.at[lax.rem(run, w_buf.shape[0])]
      real = (t < nv_ref[0]) & common.RowVisits.is_real(g, num_groups)

      @pl.when(real & (kk == 0))
      def _():
        acc[...] = jnp.zeros_like(acc)

      r0 = mt_ref[t] * bm
      last_step = (t < nv_ref[0]) & (kk == k_tiles - 1)

      def multiply(k0, size, r):  # the k columns [k0, k0 + size) of a resident tile
        x = x_ref.at[r, pl.ds(k0, size)]
        w = w_ref.at[:, pl.ds(k0, size)] if transpose_rhs else w_ref.at[pl.ds(k0, size)]
        _accumulate(acc.at[r], x, w, 0, size, transpose_rhs=transpose_rhs, precision=precision)

      if by_hand:  # each piece of the weights multiplied once it is here
        _multiply_by_pieces(k, pieces, wait, lambda k0, size: pl.when(real)(
            lambda: _for_row_blocks(ends_ref, g, r0, bm, functools.partial(multiply, k0, size))))
      else:
        pl.when(real)(lambda: _for_row_blocks(ends_ref, g, r0, bm, lambda r: _accumulate(
            acc.at[r], x_ref.at[r], w_ref, kk * bk, k, transpose_rhs=transpose_rhs,
            precision=precision)))

      @pl.when(real & last_step)
      def _():
        def write(r):
          rows = common.group_rows(ends_ref, g, r0 + r.start, r.size)
          v = acc[r]
          if scaled:
            v = epilogue.dequant_a8w8(v, cs_ref[...], rs_col[r])
          o_ref[r] = jnp.where(rows, v.astype(o_ref.dtype), o_ref[r])
        _for_row_blocks(ends_ref, g, r0, bm, write)

      @pl.when(last_step & ~real)  # head and tail rows are 0
      def _():
        rows = common.group_rows(ends_ref, g, r0, bm)
        o_ref[...] = jnp.where(rows, jnp.zeros((), o_ref.dtype), o_ref[...])
      return carry
    if by_hand:
      lax.fori_loop(first_ref[s], first_ref[s + 1], visit, 0)
    else:
      visit(s, 0)

  resident = k_tiles == 1
  cost = pl.CostEstimate(
      flops=2 * m * k * n, transcendentals=0,
      bytes_accessed=isz * (n_tiles * (m_tiles if resident else visits) * bm * k
                            + (num_groups if resident else visits) * k * n)
      + m * n * np.dtype(out_dtype).itemsize + (4 * (rhs.shape[0] * n + m) if scaled else 0))
  # The scalar-prefetch operands are `v`'s fields, in order, then `runs`', then `steps`'.
  def weight_spec(expert):
    return pl.BlockSpec((None, bn, bk) if transpose_rhs else (None, bk, bn),
                        lambda j, t, kk, *pre: ((expert(pre)[t], j, kk) if transpose_rhs
                                                else (expert(pre)[t], kk, j)))
  in_specs = [pl.BlockSpec((bm, bk), lambda j, t, kk, *pre: (pre[4][first_visit(t, pre)], kk)),
              weight_spec(lambda pre: pre[3])]
  scratch = [pltpu.VMEM((bm, bn), common.accumulator(lhs.dtype))]
  args = [lhs, rhs]
  if by_hand:
    in_specs[1] = pl.BlockSpec(memory_space=pl.ANY)
    ring = ring_buffers(_float_vmem("gmm", bm, common.round_up(k, 128),
                                    common.round_up(bn, 128), isz,
                                    np.dtype(out_dtype).itemsize),
                        common.round_up(k, 128) * common.round_up(bn, 128) * isz,
                        MAX_WEIGHT_BUFFERS)
    scratch += [pltpu.VMEM((ring, *((bn, k) if transpose_rhs else (k, bn))), rhs.dtype),
                pltpu.SemaphoreType.DMA((ring, pieces))]
    if scaled:
      scratch += [pltpu.VMEM((ring, 1, bn), jnp.float32), pltpu.SemaphoreType.DMA((ring,))]
  if scaled:  # per (group, column) and per row (lane-dense, a VMEM column at the write)
    lanes = _row_lanes(bm)
    in_specs += [pl.BlockSpec(memory_space=pl.ANY) if by_hand else  # (copied by hand)
                 pl.BlockSpec((None, 1, bn), lambda j, t, kk, *pre: (pre[3][t], 0, j)),
                 pl.BlockSpec((bm // lanes, 1, lanes),
                              lambda j, t, kk, *pre: (pre[4][first_visit(t, pre)], 0, 0))]
    args += [scales[0].astype(jnp.float32).reshape(rhs.shape[0], 1, n),
             _lane_dense(scales[1], bm)]
    scratch.append(pltpu.VMEM((bm, 1), jnp.float32))
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(v) + len(runs) + len(steps),
          grid=(n_tiles, _steps(steps.count if by_hand else v.count), k_tiles),
          in_specs=in_specs,
          out_specs=pl.BlockSpec((bm, bn),
                                 lambda j, t, kk, *pre: (pre[1][first_visit(t, pre)], j)),
          scratch_shapes=scratch),
      out_shape=common.result((m, n), out_dtype, *v, lhs, rhs),
      # column tiles are independent: a dual-TensorCore device (v5p) splits them
      compiler_params=_params("parallel", "arbitrary", "arbitrary"), cost_estimate=cost,
      interpret=interpret, name="npu_gmm")(*v, *runs, *steps, *args)


def _last_tile(block: int, size: int) -> int:
  """The extent of the last of a dimension's tiles of `block` over `size`."""
  return size - (common.cdiv(size, block) - 1) * block


def _tile_shapes(block: int, size: int, index) -> list:
  """(extent, where) of a dimension's tiles of `block` over `size`: the whole tiles where
  `index` is below the last, the last one's (`size`'s remainder) where it is the last; one
  entry, where True, when the tiles divide `size`."""
  tiles, last = common.cdiv(size, block), _last_tile(block, size)
  if last == block:
    return [(block, True)]
  return [(block, index < tiles - 1), (last, index == tiles - 1)]


def _when(cond, fn) -> None:
  """fn() where `cond` holds (a bool known now: there, or nowhere)."""
  if cond is True:
    fn()
  elif cond is not False:
    pl.when(cond)(fn)


def tgmm(lhs: jax.Array, rhs: jax.Array, ends: jax.Array, *, num_groups: int, out_dtype,
         tiles: TileSizes, start: jax.Array | None = None, interpret: bool = False,
         precision=None) -> jax.Array:
  """k-grouped matmul `out[g] = lhs[rows of g]^T @ rhs[rows of g]`: `[num_groups, k, n]`;
  groups without rows (empty, or past len(ends)) give 0. Group 0 starts at row `start`
  (an int32 scalar, megablox's group_offset; None: 0): rows before it are read by no visit.

  Grid (k tile, column tile, row tile): a step per row tile the groups touch, which loops
  over the tile's visits (`tpu_visits.visit_metadata`: one per group with rows in it, and
  one per empty group). A group's visits are consecutive and accumulate into one float32
  (int8 operands: int32) tile; at its last visit the tile goes into a ring of VMEM
  buffers (`ring_buffers`) and its copy to HBM starts, behind the pipeline's request for
  the next step's x and dy blocks (an empty group's tile of zeros too, so every output
  tile is written exactly once). Megablox's grid takes a step per (row tile, group):
  under skewed routing most of its steps are a cold group's, each paying a step's fixed
  cost for a little work, and its output written back as the step ends, ahead of the
  next step's blocks. Where an edge tile's extent is not a whole number of the output's
  (sublane, 128) tiles, which a copy by hand cannot take (k or n past the tiles, e.g.
  n = 2880), the grid takes that step per visit and the pipeline writes the output.
  """
  m, k = lhs.shape
  n = rhs.shape[-1]
  isz = lhs.dtype.itemsize
  if m == 0:  # no rows: every group is empty
    return jnp.zeros((num_groups, k, n), out_dtype)
  osz = np.dtype(out_dtype).itemsize
  bm, bk, bn = _float_blocks("tgmm", k, n, isz, osz, tiles)
  precision = _mxu_precision(precision, lhs.dtype)
  m_tiles, k_tiles, n_tiles = common.cdiv(m, bm), common.cdiv(k, bk), common.cdiv(n, bn)
  # group g's rows are [bounds[g], bounds[g + 1]): `group_rows(bounds, g + 1, ...)`
  meta = tpu_visits.visit_metadata(ends, num_groups, m_tiles, bm, start, interpret=interpret)
  visits = meta[0].shape[0]
  # the row blocks are this product's contraction: as wide as the MXU (256 on v6e, TPU7x),
  # or a narrower one would take it as long
  block = max(ROW_BLOCK, tpu_tiles.mxu_width(tpu_tiles.current_chip()))
  ring = ring_buffers(_float_vmem("tgmm", bm, bk, bn, isz, osz), bk * bn * osz,
                      MAX_OUTPUT_BUFFERS)
  # one TensorCore runs the output tiles one after the other: their copies overlap
  chained = tpu_tiles.cores(tpu_tiles.current_chip()) == 1
  # copies by hand take whole (sublane, 128) tiles of the output, or a whole dimension
  sublanes = 32 // osz
  by_hand = all(extent % quantum == 0 or extent == size for block, size, quantum in (
      (bk, k, sublanes), (bn, n, 128)) for extent in (block, _last_tile(block, size)))
  # step t runs visits [first[t], first[t + 1]), of row tile mt[first[t]]; where the
  # pipeline writes the output, visit t
  first_visit = (lambda t, first: first[t]) if by_hand else (lambda t, first: t)

  def kernel(gid_ref, mt_ref, nv_ref, bounds_ref, first_ref, ns_ref, x_ref, dy_ref, o_ref,
             acc, *out_ring):
    i, j, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    # finished tiles numbered in order: tile q is group q % G's, of output tile (k tile,
    # column tile) number q // G (chained: one core runs them in grid order; else each is a
    # sequence of its own), held in buffer q % ring until its copy ends
    tile = i * n_tiles + j if chained else 0
    o_buf, o_sem = out_ring if by_hand else (None, None)

    def copy(q, go):  # go(copy of tile q): its shape is its output tile's (edges: less)
      at = lax.div(q, num_groups) if chained else i * n_tiles + j
      ti, tj = lax.div(at, n_tiles), lax.rem(at, n_tiles)
      slot = lax.rem(q, ring)
      for rows, in_k in _tile_shapes(bk, k, ti):
        for cols, in_n in _tile_shapes(bn, n, tj):
          _when(in_k & in_n, lambda rows=rows, cols=cols: go(pltpu.make_async_copy(
              o_buf.at[slot, pl.ds(0, rows), pl.ds(0, cols)],
              o_ref.at[lax.rem(q, num_groups), pl.ds(pl.multiple_of(ti * bk, bk), rows),
                       pl.ds(pl.multiple_of(tj * bn, bn), cols)],
              o_sem.at[slot])))

    r0 = mt_ref[first_visit(s, first_ref)] * bm

    def visit(v, carry):
      g = gid_ref[v]
      q = tile * num_groups + g

      @pl.when((v == 0) | (gid_ref[jnp.maximum(v - 1, 0)] != g))
      def _():
        acc[...] = jnp.zeros_like(acc)

      def multiply(r):  # the row blocks holding the group's rows (none when it is empty)
        rows = common.group_rows(bounds_ref, g + 1, r0 + r.start, r.size)
        # rows of other groups, and garbage rows past m, contribute nothing (no 0 * inf)
        dyb = jnp.where(rows, dy_ref[r], jnp.zeros((), dy_ref.dtype))
        step = K_CHUNK if bk % K_CHUNK == 0 else bk

        def chunk(c, carry):  # K_CHUNK rows of the output tile at a time (compile time)
          kc = pl.ds(pl.multiple_of(c * step, step), step)
          xb = jnp.where(rows, x_ref[r, kc], jnp.zeros((), x_ref.dtype))
          acc[kc, :] += lax.dot_general(xb, dyb, (((0,), (0,)), ((), ())),
                                        precision=precision, preferred_element_type=acc.dtype)
          return carry
        lax.fori_loop(0, bk // step, chunk, 0)
      _for_row_blocks(bounds_ref, g + 1, r0, bm, multiply, block)

      @pl.when((v == nv_ref[0] - 1) | (gid_ref[jnp.minimum(v + 1, visits - 1)] != g))
      def _():  # the group's last visit: its tile to a free buffer, and on to HBM
        if not by_hand:
          o_ref[...] = acc[...].astype(o_ref.dtype)
          return
        pl.when(q >= ring)(lambda: copy(q - ring, lambda c: c.wait()))
        o_buf[lax.rem(q, ring)] = acc[...].astype(o_buf.dtype)
        copy(q, lambda c: c.start())

      if by_hand:
        @pl.when((v == nv_ref[0] - 1) & (
            (i == k_tiles - 1) & (j == n_tiles - 1) if chained else True))
        def _():  # the sequence's last visit: every copy still under way
          for back in range(ring):
            pl.when(q >= back)(lambda back=back: copy(q - back, lambda c: c.wait()))
      return carry
    if by_hand:
      lax.fori_loop(first_ref[s], first_ref[s + 1], visit, 0)
    else:
      visit(s, 0)

  # x and dy once per output tile: a row tile's blocks are copied once
  cost = pl.CostEstimate(
      flops=2 * m * k * n, transcendentals=0,
      bytes_accessed=isz * m_tiles * bm * (k * n_tiles + n * k_tiles) + num_groups * k * n * osz)
  tile_of = lambda t, mt, first: mt[first_visit(t, first)]
  scratch = [pltpu.VMEM((bk, bn), common.accumulator(lhs.dtype))]
  if by_hand:
    out_spec = pl.BlockSpec(memory_space=pl.ANY)
    scratch += [pltpu.VMEM((ring, bk, bn), out_dtype), pltpu.SemaphoreType.DMA((ring,))]
  else:
    out_spec = pl.BlockSpec((None, bk, bn), lambda i, j, t, gid, *_: (gid[t], i, j))
  return pl.pallas_call(
      kernel,
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=len(meta), grid=(k_tiles, n_tiles,
                                               _steps(meta[5] if by_hand else meta[2])),
          in_specs=[pl.BlockSpec((bm, bk), lambda i, j, t, gid, mt, nv, bounds, first, ns:
                                 (tile_of(t, mt, first), i)),
                    pl.BlockSpec((bm, bn), lambda i, j, t, gid, mt, nv, bounds, first, ns:
                                 (tile_of(t, mt, first), j))],
          out_specs=out_spec, scratch_shapes=scratch),
      out_shape=common.result((num_groups, k, n), out_dtype, *meta[:4], lhs, rhs),
      # output tiles (k, n) are independent: a dual-TensorCore device splits them (one
      # core runs them in order, the copies by hand chained from one to the next)
      compiler_params=_params(*(("arbitrary",) * 2 if by_hand and chained else
                                ("parallel",) * 2), "arbitrary"), cost_estimate=cost,
      interpret=interpret, name="npu_tgmm")(*meta, lhs, rhs)
