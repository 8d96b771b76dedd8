"""Demo: one quantized MoE gate/up projection with the fused op.

    python -m npu_ops.tools.demo [--m 4096 --k 2048 --n 2816 --e 16]

Routes random tokens to experts (top-1), quantizes activations per token and
weights per channel to int8, stores the weights in FRACTAL_NZ like torch_npu,
runs `npu_grouped_matmul_swiglu_quant_v2` under jit with a dynamic group list,
and prints what it computed (checked against the float computation it
approximates) and how fast it ran next to a dense int8 dot of the same FLOPs.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import npu_ops
from npu_ops.tools import positive_int
from npu_ops.tools.bench import time_interleaved


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--m", type=positive_int, default=4096, help="tokens")
  p.add_argument("--k", type=positive_int, default=2048, help="hidden size")
  p.add_argument("--n", type=positive_int, default=2816, help="2 x expert intermediate size")
  p.add_argument("--e", type=positive_int, default=16, help="experts")
  args = p.parse_args(argv)
  m, k, n, e = args.m, args.k, args.n, args.e
  kx, kw, kr = jax.random.split(jax.random.key(0), 3)

  # Float activations and weights, then int8 quantization (per token / per channel).
  x_f = jax.random.normal(kx, (m, k), jnp.float32)
  w_f = jax.random.normal(kw, (e, k, n), jnp.float32) / np.sqrt(k)
  x_q, x_scale = npu_ops.quantize_per_token(x_f)
  w_q, w_scale = npu_ops.quantize_per_token(jnp.swapaxes(w_f, 1, 2))  # per output channel
  w_q = jnp.swapaxes(w_q, 1, 2)
  w_nz = npu_ops.npu_format_cast(w_q, 29)  # [e, n/32, k/16, 16, 32], as torch_npu stores it

  # Top-1 routing: sort tokens by expert, count tokens per expert.
  expert = jax.random.categorical(kr, jnp.log(jax.random.dirichlet(kr, jnp.ones(e))), shape=(m,))
  order = jnp.argsort(expert)
  x_q, x_scale, x_f = x_q[order], x_scale[order], x_f[order]
  counts = jnp.bincount(expert, length=e).astype(jnp.int32)

  op = jax.jit(lambda x, w, ws, xs, gl: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      x, w, ws, xs, gl, group_list_type=1))
  out, out_scale = op(x_q, w_nz, w_scale, x_scale, counts)

  # The float computation the int8 op approximates.
  gid = jnp.repeat(jnp.arange(e), counts, total_repeat_length=m)
  c = jnp.einsum("mk,mkn->mn", x_f, w_f[gid]) if m * k * n <= 2**26 else None
  print(f"npu_grouped_matmul_swiglu_quant_v2, A8W8: x int8 [{m}, {k}], weight int8 NZ "
        f"{list(w_nz.shape)} (logical [{e}, {k}, {n}])")
  print(f"tokens per expert: {np.asarray(counts).tolist()}")
  print(f"output {out.dtype}{list(out.shape)}, output_scale {out_scale.dtype}{list(out_scale.shape)}")
  print(f"row 0: q[:8] = {np.asarray(out[0, :8]).tolist()}, scale = {float(out_scale[0]):.4g}")
  deq = out.astype(jnp.float32) * out_scale[:, None]
  if c is None:  # full float reference too large: check a sample of rows
    rows = np.linspace(0, m - 1, 64).astype(int)
    c = jnp.einsum("mk,mkn->mn", x_f[rows], w_f[gid[rows]])
    deq = deq[rows]
  want = npu_ops.swiglu(c)
  rel = float(jnp.linalg.norm(deq - want) / jnp.linalg.norm(want))
  print(f"relative error of the dequantized output vs float SwiGLU(x @ W): {rel:.2%} "
        "(int8 x, weights and output, each rounded to 1/254 of its row's or channel's range: "
        "a few percent is what int8 gives; the codes are exact to torch_npu's formula)")

  dense = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.int32))
  t = time_interleaved({"fused": lambda: op(x_q, w_nz, w_scale, x_scale, counts),
                        "dense": lambda: dense(x_q, w_q[0])}, repeats=5)
  tflops = 2 * m * k * n / t["fused"] / 1e12
  print(f"fused op: {t['fused'] * 1e3:.1f} ms ({tflops:.2f} TOPS) on {jax.devices()[0].platform}; "
        f"a dense int8 dot of the same FLOPs: {t['dense'] * 1e3:.1f} ms "
        f"(ratio {t['dense'] / t['fused']:.2f}: dense time / ours, above 1 is faster than the "
        "dense dot, which neither dequantizes nor quantizes; on CPU the XLA path runs (0.6-0.9 on "
        "a 2-core host), on a TPU or GPU the Pallas kernels)")


if __name__ == "__main__":
  main()
