"""The shapes the kernels are judged at, their routings, and their rooflines.

Shared by the model's report (`python -m npu_ops.perf predict`) and the accelerator
check (`python -m npu_ops.tools.accelerator_check`), so both speak of the same cases.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

import npu_ops
from npu_ops.perf import chips as chips_lib

K, N = 2048, 2816  # the expert shape of the benchmarks (d_model 2048, SwiGLU halves of 1408)


def group_sizes(kind: str, m: int, e: int, *, top_k: int = 8, seed: int = 0) -> np.ndarray:
  """int32 `[e]` summing to m (rows = tokens x top_k):

  * "uniform": m / e each;
  * "zipf": expert i gets about m / (i + 1) / H_e (a few hot experts);
  * "random": m / top_k tokens, each choosing `top_k` distinct experts uniformly (decode).
  """
  rng = np.random.default_rng(seed)
  if kind == "uniform":
    sizes = np.full(e, m // e)
    sizes[: m - sizes.sum()] += 1
  elif kind == "zipf":
    p = 1.0 / np.arange(1, e + 1)
    sizes = np.floor(m * p / p.sum()).astype(int)
    sizes[0] += m - sizes.sum()
  elif kind == "random":
    choice = np.stack([rng.choice(e, top_k, replace=False) for _ in range(m // top_k)])
    sizes = np.bincount(choice.ravel(), minlength=e)
  else:
    raise ValueError(f"kind: expected 'uniform', 'zipf' or 'random', got {kind!r}")
  return sizes.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Case:
  """One routed problem: `m` rows over `e` experts of `[K, N]`."""
  name: str
  m: int
  e: int
  routing: str
  top_k: int = 8

  def sizes(self) -> np.ndarray:
    return group_sizes(self.routing, self.m, self.e, top_k=self.top_k)


DECODE = (Case("decode 8 tok, top-8, e=64", 64, 64, "random"),
          Case("decode 8 tok, top-8, e=256", 64, 256, "random"),
          Case("decode 64 tok, top-4, e=128", 256, 128, "random", top_k=4),
          Case("decode 64 tok, top-8, e=256", 512, 256, "random"))
PREFILL = (Case("prefill 4096, e=8 uniform", 4096, 8, "uniform"),
           Case("prefill 4096, e=16 uniform", 4096, 16, "uniform"),
           Case("prefill 4096, e=16 zipf", 4096, 16, "zipf"),
           Case("prefill 16384, e=64 uniform", 16384, 64, "uniform"),
           Case("prefill 16384, e=64 zipf", 16384, 64, "zipf"))

OPS = ("fused A8W8", "gmm bf16", "tgmm bf16", "gmm vjp bf16")
# On request (`predict --ops`): A8W4 with jnp.int4 weights, and with torch_npu's int32 words
A8W4_OPS = ("fused A8W4", "fused A8W4 words")
# A4W4 as torch_npu calls it: tokens in int32 words, jnp.int4 weights, a smooth scale; MX
# inputs (fp8 or fp4 tokens and weights, e8m0 scales per block of 32 along k; per-token
# int8 out); the int8 grouped matmul (exact int32 out: the MoE layer's int8 down projection)
ALL_OPS = OPS + A8W4_OPS + ("fused A4W4", "fused MX", "fused MXFP4", "gmm int8")


@dataclasses.dataclass(frozen=True)
class Problem:
  """An op at a case: its function and arguments (`ShapeDtypeStruct` for data, concrete
  group sizes), useful FLOPs, ideal HBM bytes (each operand read once: x, the weights of
  the experts that hold rows, the outputs) and the dtype of its products; for its floor,
  the group sizes and how each of its `[K, N]` products takes a group's rows: "streamed"
  (rows x W: gmm, the fused op, the VJP's d x) or "contracted" (x^T dy: tgmm, d w)."""
  fn: object
  args: tuple
  flops: float
  ideal_bytes: float
  dtype: str
  sizes: tuple[int, ...]
  products: tuple[str, ...] = ("streamed",)

  def roofline(self, chip: chips_lib.Chip) -> float:
    """`max(FLOPs / peak, ideal bytes / HBM bandwidth)`: the issue's goals are multiples
    of it."""
    return max(self.flops / chip.peak(self.dtype), self.ideal_bytes / chip.hbm_bandwidth)

  def floor(self, chip: chips_lib.Chip) -> float:
    """The least time of any TPU kernel under the model's rules: `max(MXU time, ideal
    bytes / HBM bandwidth)`, where the MXU takes each group's rows in whole passes, a
    product streaming `chip.mxu_rows` rows at a time (a group of 75 rows costs 128; the
    rows of two groups never share a pass: their weights differ) and contracting rows
    padded to `chip.mxu_width`. Above the roofline where groups are small and the chip
    is bound by its MXU."""
    rows = np.asarray(self.sizes, np.int64)
    padded = {"streamed": chip.mxu_rows, "contracted": chip.mxu_width}
    mxu_flops = sum(2.0 * K * N * float(np.sum(-(-rows // padded[p]) * padded[p]))
                    for p in self.products)
    return max(mxu_flops / chip.peak(self.dtype), self.ideal_bytes / chip.hbm_bandwidth)


def problem(op: str, case: Case, *, implementation=None, arrays=None) -> Problem:
  """`op` at `case` (`arrays`: a function turning `(shape, dtype)` into an operand;
  default `jax.ShapeDtypeStruct`, for the model)."""
  make = arrays or (lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype))
  m, e = case.m, case.e
  sizes = case.sizes()
  used, rows = int(np.count_nonzero(sizes)), tuple(int(r) for r in sizes)
  kw = {} if implementation is None else dict(implementation=implementation)
  if op == "fused A8W8":
    args = (make((m, K), jnp.int8), make((e, K, N), jnp.int8), make((e, N), jnp.float32),
            make((m,), jnp.float32), sizes)
    fn = lambda x, w, ws, xs, gl: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
        x, w, ws, xs, gl, group_list_type=1, **kw)
    ideal = m * K + used * (K * N + 4 * N) + 4 * m + m * (N // 2) + 4 * m
    return Problem(fn, args, 2.0 * m * K * N, ideal, "int8", rows)
  if op in A8W4_OPS:  # per channel, with the assist matrix (as torch_npu calls it)
    w = ((e, K, N // 8), jnp.int32) if op.endswith("words") else ((e, K, N), jnp.int4)
    args = (make((m, K), jnp.int8), make(*w), make((e, N), jnp.float32),
            make((m,), jnp.float32), sizes, make((e, N), jnp.float32))
    fn = lambda x, w, ws, xs, gl, assist: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
        x, w, ws, xs, gl, group_list_type=1, weight_assist_matrix=assist, **kw)
    ideal = m * K + used * (K * N // 2 + 8 * N) + 4 * m + m * (N // 2) + 4 * m
    return Problem(fn, args, 2.0 * m * K * N, ideal, "int8", rows)
  if op == "fused A4W4":
    args = (make((m, K // 8), jnp.int32), make((e, K, N), jnp.int4), make((e, N), jnp.float32),
            make((m,), jnp.float32), sizes, make((e, N // 2), jnp.float32))
    fn = lambda x, w, ws, xs, gl, smooth: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
        x, w, ws, xs, gl, group_list_type=1, smooth_scale=smooth, **kw)
    ideal = m * K // 2 + used * (K * N // 2 + 4 * N + 2 * N) + 4 * m + m * (N // 2) + 4 * m
    return Problem(fn, args, 2.0 * m * K * N, ideal, "int8", rows)
  if op in ("fused MX", "fused MXFP4"):  # roofline at the bfloat16 rate: the MXU multiplies
    # dequantized values
    f8, pairs = jnp.float8_e4m3fn if op == "fused MX" else jnp.float4_e2m1fn, K // 64
    args = (make((m, K), f8), make((e, K, N), f8), make((e, pairs, N, 2), jnp.uint8),
            make((m, pairs, 2), jnp.uint8), sizes)
    fn = lambda x, w, ws, xs, gl: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
        x, w, ws, xs, gl, group_list_type=1, dequant_mode=2, quant_mode=0,
        quant_dtype=jnp.int8, **kw)
    per = 1 if op == "fused MX" else 0.5  # bytes a value
    ideal = (m + used * N) * K * (per + 1 / 32) + m * (N // 2) + 4 * m
    return Problem(fn, args, 2.0 * m * K * N, ideal, "bfloat16", rows)
  if op == "gmm int8":
    fn = lambda x, w, gl: npu_ops.grouped_matmul(x, w, gl, **kw)
    args = (make((m, K), jnp.int8), make((e, K, N), jnp.int8), sizes)
    return Problem(fn, args, 2.0 * m * K * N, m * K + used * K * N + 4 * m * N, "int8", rows)
  bf = jnp.bfloat16
  if op == "gmm bf16":
    fn = lambda x, w, gl: npu_ops.grouped_matmul(x, w, gl, **kw)
    return Problem(fn, (make((m, K), bf), make((e, K, N), bf), sizes), 2.0 * m * K * N,
                   2.0 * (m * K + used * K * N + m * N), "bfloat16", rows)
  if op == "tgmm bf16":
    fn = lambda x, dy, gl: npu_ops.tgmm(x, dy, gl, num_groups=e, **kw)
    return Problem(fn, (make((m, K), bf), make((m, N), bf), sizes), 2.0 * m * K * N,
                   2.0 * (m * K + m * N + e * K * N), "bfloat16", rows, ("contracted",))
  if op == "gmm vjp bf16":  # d x and d w of grouped_matmul, from dy
    def fn(x, w, dy, gl):
      _, vjp = jax.vjp(lambda x, w: npu_ops.grouped_matmul(x, w, gl, **kw), x, w)
      return vjp(dy)
    args = (make((m, K), bf), make((e, K, N), bf), make((m, N), bf), sizes)
    return Problem(fn, args, 4.0 * m * K * N,
                   2.0 * (2 * m * K + 2 * m * N + used * K * N + e * K * N), "bfloat16", rows,
                   ("streamed", "contracted"))
  raise ValueError(f"op: expected one of {ALL_OPS}, got {op!r}")
