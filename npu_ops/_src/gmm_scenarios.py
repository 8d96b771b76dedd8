"""The scenarios of `npu_grouped_matmul` (semantics B.4.3): what is supported, how each
scenario's operands are checked and prepared, and how each computes and dequantizes.

`SUPPORTED` lists the scenarios (rendered into the README by a test); `scenario_of` tells
them apart by the dtypes of x and weight; `PREPARE[scenario]` validates one grouped
problem's parameters into a `Prepared`; `COMPUTE[scenario]` runs it on the package's
grouped matmuls and a vectorized epilogue that gathers each row's group parameters.
The structure (lists, m/k-axis grouping) is `npu_ops.npu_grouped_matmul`'s.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from npu_ops._src import grouped as grouped_lib
from npu_ops._src import quant as quant_lib
from npu_ops._src import row_blocks
from npu_ops._src.validation import check_dtype, check_scale_groups, describe, fail, require
from npu_ops._src.groups import per_row
from npu_ops._src.operands import A4W4, A8W4, A8W8
from npu_ops._src.quant_matmul import decode_quant_param, requant_int8
from npu_ops._src.scales import float32_from_scale_words
from npu_ops._src.weight_quant import antiquant_weight
from pallas_kernels import epilogue
from pallas_kernels.common import TileSizes

F16, BF16, F32 = np.dtype(jnp.float16), np.dtype(jnp.bfloat16), np.dtype(jnp.float32)
I8, I32, I4 = np.dtype(jnp.int8), np.dtype(jnp.int32), np.dtype(jnp.int4)
FLOATS = (F16, BF16, F32)
_WORDS = (np.dtype(np.int64), np.dtype(np.uint64))

FLOAT, ANTIQUANT = "float", "antiquant"  # beside operands' A8W8, A8W4, A4W4
_SHORT = {F16: "fp16", BF16: "bf16", F32: "fp32", I8: "int8", I32: "int32", I4: "int4"}



# --- the supported scenarios, as data (rendered into README by a test) ----------------------

COLUMNS = ("fp16 / fp16", "bf16 / bf16", "fp32 / fp32", "int8 / int8", "int4 / int4",
           "int8 / int4", "fp16 / int8", "bf16 / int8", "fp16 / int4", "bf16 / int4")
_FLOAT_CELLS = {"fp16 / fp16": ("fp16",), "bf16 / bf16": ("bf16",), "fp32 / fp32": ("fp32",)}
# scenario row -> {"x / weight" dtypes: output dtypes}; an absent cell raises.
SUPPORTED: dict[str, dict[str, tuple[str, ...]]] = {
    "no quant, m-axis groups (group_type 0)": _FLOAT_CELLS,
    "no quant, k-axis groups (group_type 2)": _FLOAT_CELLS,
    "no quant, independent list (group_type -1)": _FLOAT_CELLS,
    "quant: scale, int32 or float bias": {"int8 / int8": ("int8", "fp16", "bf16", "int32")},
    "quant: scale and per_token_scale": {"int8 / int8": ("fp16", "bf16")},
    "quant A4W4: scale words per channel or group": {"int4 / int4": ("fp16", "bf16")},
    "anti-quant per channel": {c: (c[:4],) for c in COLUMNS[6:]},
    "anti-quant per group": {"fp16 / int4": ("fp16",), "bf16 / int4": ("bf16",)},
    "pseudo-quant A8W4 (quant_group_size, bias, per_token_scale)": {
        "int8 / int4": ("fp16", "bf16")},
}
# Recognized but not implemented (NotImplementedError): row -> reason.
PLANNED: dict[str, str] = {
    "pseudo-quant A8W4 asymmetric (offset)": "semantics B.4.3 leaves the use of offset open",
    "MX / fp8 / hif8 (Ascend 950)": "not on A2/A3",
}
ACT_NOTE = ("`act_type` 1 ReLU, 2 GELU-tanh, 4 FastGELU, 5 SiLU: after the dequant (quant with "
            "per_token_scale, A8W4, anti-quant); 3 GELU-erf is unsupported, as in torch_npu.")


def supported_table_markdown() -> str:
  """The README table: scenarios (rows) x (x / weight dtypes) (columns) -> output dtypes."""
  lines = ["| scenario | " + " | ".join(COLUMNS) + " |",
           "|---|" + "---|" * len(COLUMNS)]
  for row, cells in SUPPORTED.items():
    lines.append(f"| {row} | " + " | ".join(", ".join(cells[c]) if c in cells else "-"
                                             for c in COLUMNS) + " |")
  for row, reason in PLANNED.items():
    lines.append(f"| {row} | planned ({reason}) |" + " |" * (len(COLUMNS) - 1))
  return "\n".join(lines + ["", ACT_NOTE])



class Options(NamedTuple):
  act_type: int
  output_dtype: Any
  quant_group_size: int
  implementation: str | None
  expected_tokens: int | None
  interpret: bool
  tiles: TileSizes | None

  def run(self, block_sizes: row_blocks.GmmBlockSizes) -> dict[str, Any]:
    """The keyword arguments of the package's grouped matmuls."""
    return dict(implementation=self.implementation, block_sizes=block_sizes,
                interpret=self.interpret, tiles=self.tiles)


_FP8 = tuple(np.dtype(d) for d in (jnp.float8_e4m3fn, jnp.float8_e5m2))


def scenario_of(x, w) -> str:
  xd, wd = np.dtype(x.dtype), np.dtype(w.dtype)
  if xd in _FP8 or wd in _FP8:
    raise NotImplementedError("npu_grouped_matmul: fp8 / MX operands (Ascend 950) are planned")
  if xd not in (*FLOATS, I8, I32, I4):
    fail("x", "float16, bfloat16, float32, int8 or int4 (or int32 words of int4)", describe(x),
         TypeError)
  if xd in FLOATS:
    if wd in FLOATS:
      return FLOAT
    if xd != F32 and wd in (I8, I32, I4):
      return ANTIQUANT
  elif xd == I8 and wd == I8:
    return A8W8
  elif xd == I8 and wd in (I32, I4):
    return A8W4
  elif xd in (I32, I4) and wd in (I32, I4):
    return A4W4
  fail("weight", f"a dtype combination of semantics B.4.3 with x {describe(x)} (float x: the same "
       "float or, for fp16/bf16 x, int8/int4; int8 x: int8 or int4; int4 x: int4)",
       describe(w), TypeError)


class Prepared(NamedTuple):
  x: jax.Array                     # [m, k]: float, or int8 values
  w: jax.Array                     # [E, k, n]: float (dequantized), or int8 values
  per_group: dict[str, jax.Array]  # leading E: gathered per row by group id
  pts: jax.Array | None            # float32 [m]
  out_dtype: np.dtype


# --- validation per scenario -------------------------------------------------------------------

def check_output_dtype(output_dtype, allowed) -> np.dtype:
  """None -> allowed[0] (the scenario's default); else one of `allowed`."""
  if output_dtype is None:
    return np.dtype(allowed[0])
  try:
    dt = np.dtype(output_dtype)
  except TypeError:
    fail("output_dtype", "a dtype", repr(output_dtype), TypeError)
  require(dt in allowed, "output_dtype", f"one of {[_SHORT.get(a, a.name) for a in allowed]} "
          "for this scenario", dt.name, TypeError)
  return dt


def _forbid(params, pts, names, scenario):
  for name in names:
    v = pts if name == "per_token_scale" else params[name]
    if v is not None:
      fail(name, f"None in the {scenario} scenario", describe(v))


def _per_group(name, v, e, n, dtypes, *, groups=False, k=None):
  """[E, n] / [E, 1] (or [E, G, n] with groups) of `dtypes` -> [E, G, n or 1] as given."""
  check_dtype(name, v, dtypes)
  v = jnp.asarray(v) if not isinstance(v, np.ndarray) else v
  check_scale_groups(name, v, e=e, n=n, k=k or 1, ranks=(2, 3) if groups else (2,), n_or_1=True)
  return v.reshape(e, -1, v.shape[-1])


def _check_pts(pts, m):
  check_dtype("per_token_scale", pts, (F32,))
  require(tuple(pts.shape) == (m,), "per_token_scale", f"shape [m={m}]", describe(pts))
  return jnp.asarray(pts, jnp.float32)


def _act_needs(opts, ok, what):
  if opts.act_type:
    require(ok, "act_type", f"0 {what}", opts.act_type)


def _prepare_float(x, w, params, pts, *, m, k, n, e, opts, int4_weight):
  _forbid(params, pts, ("scale", "antiquant_scale", "antiquant_offset", "per_token_scale"),
          "float (no quant)")
  _act_needs(opts, False, "without quantization (torch_npu applies it after a dequant)")
  require(opts.quant_group_size == 0, "quant_group_size",
          "0 on float inputs (it is A8W4's k-group size)", opts.quant_group_size)
  dt = np.dtype(x.dtype)
  require(np.dtype(w.dtype) == dt, "weight", f"the dtype of x ({dt.name})", describe(w),
          TypeError)
  out = check_output_dtype(opts.output_dtype, (dt,))
  per_group = {}
  if params["bias"] is not None:
    want = F16 if dt == F16 else F32
    b = _per_group("bias", params["bias"], e, n, (want,))
    per_group["bias"] = jnp.asarray(b, jnp.float32)
  return Prepared(x, w, per_group, None, out)


def _prepare_antiquant(x, w, params, pts, *, m, k, n, e, opts, int4_weight):
  _forbid(params, pts, ("scale", "per_token_scale"), "anti-quant")
  dt = np.dtype(x.dtype)
  s = params["antiquant_scale"]
  if s is None:
    fail("antiquant_scale", f"a {dt.name} scale for an integer weight with float x", None)
  # per group: int4 weights only (semantics B.4.3)
  scale = _per_group("antiquant_scale", s, e, n, (dt,), groups=int4_weight, k=k)
  offset = None
  if params["antiquant_offset"] is not None:
    o = params["antiquant_offset"]
    require(tuple(o.shape) == tuple(s.shape), "antiquant_offset",
            f"the shape of antiquant_scale {list(s.shape)}", describe(o))
    offset = _per_group("antiquant_offset", o, e, n, (dt,), groups=int4_weight, k=k)
  out = check_output_dtype(opts.output_dtype, (dt,))
  # [E, G, n] -> [E, k, n]: row kk of k uses group kk // (k / G)
  rows = lambda v: jnp.repeat(jnp.asarray(v), k // v.shape[1], axis=1)
  # semantics B.4.3: float16 rounds after the offset and the scale, bfloat16 once (float32 math).
  wf = antiquant_weight(w, rows(scale), None if offset is None else rows(offset), dt,
                        inter=dt if dt == F16 else F32)
  per_group = {}
  if params["bias"] is not None:
    b = _per_group("bias", params["bias"], e, n, (F16 if dt == F16 else F32,))
    per_group["bias"] = jnp.asarray(b, jnp.float32)
  return Prepared(x, wf, per_group, None, out)


def _prepare_a8w8(x, w, params, pts, *, m, k, n, e, opts, int4_weight):
  _forbid(params, pts, ("antiquant_scale", "antiquant_offset"), "quant (int8 x int8)")
  s = params["scale"]
  if s is None:
    fail("scale", "a per-channel scale for int8 x and weight (int64 words, bfloat16 or float32)",
         None)
  check_dtype("scale", s, _WORDS + (BF16, F32))
  sd = np.dtype(s.dtype)
  words = sd in _WORDS
  allowed = {True: (I8, I32), False: (BF16, I32) if sd == BF16 else (F16, BF16, I32)}[words]
  out = check_output_dtype(opts.output_dtype, allowed)
  per_group = {}
  if out != I32:
    if words:
      sc, off = decode_quant_param(np.asarray(s) if isinstance(s, np.ndarray) else s, "scale")
      per_group["scale"] = _per_group("scale", sc, e, n, (F32,))
      per_group["offset"] = _per_group("scale", off.astype(jnp.float32), e, n, (F32,))
    else:
      per_group["scale"] = jnp.asarray(_per_group("scale", s, e, n, (sd,)), jnp.float32)
  if pts is not None:
    require(out in (F16, BF16), "per_token_scale", "None unless the output is float16/bfloat16",
            describe(pts))
    pts = _check_pts(pts, m)
  _act_needs(opts, pts is not None, "unless per_token_scale is given (quant scenario)")
  b = params["bias"]
  if b is not None:
    float_out = out in (F16, BF16)
    bias_dtypes = (I32, BF16, F16, F32) if float_out else (I32,)
    b = _per_group("bias", b, e, n, bias_dtypes)
    per_group["int_bias" if np.dtype(b.dtype) == I32 else "float_bias"] = (
        jnp.asarray(b) if np.dtype(b.dtype) == I32 else jnp.asarray(b, jnp.float32))
  return Prepared(x, w, per_group, pts, out)


def _int4_scale(s, e, n, k):
  if s is None:
    fail("scale", "scale words (float32 bits in the low word) or float32 for int4 weights", None)
  check_dtype("scale", s, _WORDS + (I32, np.dtype(np.uint32), F32))
  check_scale_groups("scale", s, e=e, n=n, k=k)
  return float32_from_scale_words(s, "scale").reshape(e, -1, n)


def _prepare_a4w4(x, w, params, pts, *, m, k, n, e, opts, int4_weight):
  _forbid(params, pts, ("bias", "antiquant_scale", "antiquant_offset"), "A4W4 quant")
  out = check_output_dtype(opts.output_dtype, (F16, BF16))
  per_group = {"scale": _int4_scale(params["scale"], e, n, k)}
  if pts is not None:
    pts = _check_pts(pts, m)
  _act_needs(opts, pts is not None, "unless per_token_scale is given (quant scenario)")
  return Prepared(x, w, per_group, pts, out)


def _prepare_a8w4(x, w, params, pts, *, m, k, n, e, opts, int4_weight):
  _forbid(params, pts, ("antiquant_scale", "antiquant_offset"), "A8W4 pseudo-quant")
  out = check_output_dtype(opts.output_dtype, (F16, BF16))
  scale = _int4_scale(params["scale"], e, n, k)
  groups = scale.shape[1]
  qgs = opts.quant_group_size
  require(qgs in (0, k // groups), "quant_group_size",
          f"0 or k / G = {k // groups} (scale {list(scale.shape)})", qgs)
  if params["bias"] is None:
    fail("bias", "float32 [E, n] (the offline 8 * sum_k W * scale term of A8W4)", None)
  b = _per_group("bias", params["bias"], e, n, (F32,))
  require(b.shape[-1] == n, "bias", f"[E={e}, n={n}]", describe(params["bias"]))
  if pts is None:
    fail("per_token_scale", f"float32 [m={m}] (A8W4 pseudo-quant)", None)
  colsum8 = epilogue.colsum8(w, groups)
  per_group = {"scale": scale, "bias": jnp.asarray(b, jnp.float32)[:, 0], "colsum8": colsum8}
  return Prepared(x, w, per_group, _check_pts(pts, m), out)


PREPARE = {FLOAT: _prepare_float, ANTIQUANT: _prepare_antiquant, A8W8: _prepare_a8w8,
            A4W4: _prepare_a4w4, A8W4: _prepare_a8w4}


# --- compute ----------------------------------------------------------------------------------

def _compute_float(p, ends, gid, inside, opts, block_sizes):
  has_epilogue = bool(p.per_group) or bool(opts.act_type)
  # The custom-VJP grouped matmul: jax.grad flows to x and the (dequantized) weight.
  y = grouped_lib.differentiable_matmul(p.x, p.w, ends,
                                        out_dtype=F32 if has_epilogue else p.out_dtype,
                                        **opts.run(block_sizes))
  if not has_epilogue:
    return y
  return _float_epilogue(y, gid, inside, p.per_group.get("bias"), act_type=opts.act_type,
                         out_dtype=p.out_dtype)


def _k_group_accs(p, ends, opts, block_sizes, groups):
  """int32 `x_g @ W_g` for each of the G k-groups (G = 1: the whole k)."""
  k = p.x.shape[1]
  gs = k // groups
  return [grouped_lib.matmul(p.x[:, g * gs:(g + 1) * gs], p.w[:, g * gs:(g + 1) * gs], ends,
                             out_dtype=jnp.int32, **opts.run(block_sizes))
          for g in range(groups)]


def _compute_a8w8(p, ends, gid, inside, opts, block_sizes):
  if set(p.per_group) == {"scale"} and p.out_dtype in (F16, BF16) and not opts.act_type:
    # per channel (and per token) only: the kernels dequantize in their epilogue, the same
    # float32 products in the same order (a missing per-token scale multiplies by 1, exactly)
    pts = jnp.ones((p.x.shape[0],), jnp.float32) if p.pts is None else p.pts
    return grouped_lib.dequantized_matmul(p.x, p.w, ends, p.per_group["scale"][:, 0], pts,
                                          out_dtype=p.out_dtype, **opts.run(block_sizes))
  (acc,) = _k_group_accs(p, ends, opts, block_sizes, 1)
  return _a8w8_epilogue(acc, gid, inside, p.per_group, p.pts, act_type=opts.act_type,
                        out_dtype=p.out_dtype)


def _compute_a4w4(p, ends, gid, inside, opts, block_sizes):
  scale = p.per_group["scale"]
  accs = _k_group_accs(p, ends, opts, block_sizes, scale.shape[1])
  return _grouped_scale_epilogue(accs, gid, inside, scale, None, None, p.pts,
                                 act_type=opts.act_type, out_dtype=p.out_dtype)


def _compute_a8w4(p, ends, gid, inside, opts, block_sizes):
  scale = p.per_group["scale"]
  accs = _k_group_accs(p, ends, opts, block_sizes, scale.shape[1])
  return _grouped_scale_epilogue(accs, gid, inside, scale, p.per_group["colsum8"],
                                 p.per_group["bias"], p.pts, act_type=opts.act_type,
                                 out_dtype=p.out_dtype)


COMPUTE = {FLOAT: _compute_float, ANTIQUANT: _compute_float, A8W8: _compute_a8w8,
            A4W4: _compute_a4w4, A8W4: _compute_a8w4}


def _finish(v, gid, inside, pts, float_bias, act_type, out_dtype):
  """float32 [m, n]: * per-token, + float bias, activation, zero outside groups, cast."""
  if pts is not None:
    v = v * pts[:, None]
  if float_bias is not None:
    v = v + per_row(float_bias, gid)
  v = quant_lib.activation(v, act_type)
  return jnp.where(inside[:, None], v, 0).astype(out_dtype)


@functools.partial(jax.jit, static_argnames=("act_type", "out_dtype"))
def _float_epilogue(y, gid, inside, bias, *, act_type, out_dtype):
  return _finish(y, gid, inside, None, None if bias is None else bias[:, 0], act_type, out_dtype)


@functools.partial(jax.jit, static_argnames=("act_type", "out_dtype"))
def _a8w8_epilogue(acc, gid, inside, per_group, pts, *, act_type, out_dtype):
  if "int_bias" in per_group:  # int32 bias joins the accumulator before scaling
    acc = acc + per_row(per_group["int_bias"][:, 0], gid)
  if out_dtype == I32:
    return jnp.where(inside[:, None], acc, 0)
  v = acc.astype(jnp.float32) * per_row(per_group["scale"][:, 0], gid)
  if out_dtype == I8:  # fixpipe requant: RNE, s9 clip, + s9 offset from the words, int8 clip
    return jnp.where(inside[:, None], requant_int8(v, per_row(per_group["offset"][:, 0], gid)), 0)
  fb = per_group.get("float_bias")
  return _finish(v, gid, inside, pts, None if fb is None else fb[:, 0], act_type, out_dtype)


@functools.partial(jax.jit, static_argnames=("act_type", "out_dtype"))
def _grouped_scale_epilogue(accs, gid, inside, scale, colsum8, bias, pts, *, act_type,
                            out_dtype):
  """A4W4 / A8W4: sum_g s_g * (acc_g [- 8 colsum_g]) [+ bias], then _finish."""
  v = 0
  for g, acc in enumerate(accs):  # (x - 8)_g @ W_g exact in int32 for A8W4 (colsum8)
    v = v + epilogue.close_k_group(acc, 0 if colsum8 is None else per_row(colsum8[:, g], gid),
                                    per_row(scale[:, g], gid))
  if bias is not None:  # A8W4: the offline bias joins before the per-token scale
    v = v + per_row(bias, gid)
  return _finish(v, gid, inside, pts, None, act_type, out_dtype)
