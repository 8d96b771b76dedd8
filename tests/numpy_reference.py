"""Independent NumPy references, written from docs/semantics.md formulas.

Nothing here imports npu_ops: these are the goldens the package is tested against.
Loops are plain and slow on purpose; shapes in tests stay small.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

F32 = np.float32


# --- B.0.1 group_list -------------------------------------------------------------

def group_bounds(group_list, group_list_type: int) -> list[tuple[int, int]]:
  """[(start_i, end_i)] for a *valid* group_list (cumsum 0 / count 1)."""
  gl = [int(v) for v in group_list]
  ends = gl if group_list_type == 0 else list(np.cumsum(gl))
  starts = [0] + ends[:-1]
  return list(zip(starts, ends))


# --- B.0.3 int4 words ---------------------------------------------------------------

def pack_int4(values: np.ndarray) -> np.ndarray:
  """[..., c] values in [-8, 7] -> int32 [..., c/8], value t in bits [4t, 4t+3]."""
  v = np.asarray(values, np.int64)
  out = np.zeros(v.shape[:-1] + (v.shape[-1] // 8,), np.uint64)
  for j in range(v.shape[-1] // 8):
    for t in range(8):
      out[..., j] |= (v[..., 8 * j + t].astype(np.uint64) & np.uint64(0xF)) << np.uint64(4 * t)
  return out.astype(np.uint32).view(np.int32)


def unpack_int4(words: np.ndarray) -> np.ndarray:
  w = np.asarray(words).view(np.uint32).astype(np.int64)
  out = np.zeros(w.shape[:-1] + (w.shape[-1] * 8,), np.int64)
  for j in range(w.shape[-1]):
    for t in range(8):
      nib = (w[..., j] >> (4 * t)) & 0xF
      out[..., 8 * j + t] = np.where(nib >= 8, nib - 16, nib)
  return out


# --- B.5 FRACTAL_NZ -------------------------------------------------------------------

def c0_of(dtype) -> int:
  if np.dtype(dtype) == np.dtype(ml_dtypes.int4):
    return 64
  return 32 // np.dtype(dtype).itemsize


def nd_to_nz(a: np.ndarray, c0: int) -> np.ndarray:
  """NZ[..., c1, r1, i, j] = A[..., 16*r1 + i, c0*c1 + j], zero padded."""
  *batch, r, c = a.shape
  r1, c1 = -(-r // 16), -(-c // c0)
  nz = np.zeros((*batch, c1, r1, 16, c0), a.dtype)
  for rr in range(r):
    for cc in range(c):
      nz[..., cc // c0, rr // 16, rr % 16, cc % c0] = a[..., rr, cc]
  return nz


def nz_to_nd(nz: np.ndarray, r: int, c: int) -> np.ndarray:
  c0 = nz.shape[-1]
  out = np.zeros((*nz.shape[:-4], r, c), nz.dtype)
  for rr in range(r):
    for cc in range(c):
      out[..., rr, cc] = nz[..., cc // c0, rr // 16, rr % 16, cc % c0]
  return out


# --- B.0.4 scale words ---------------------------------------------------------------------

def float32_to_word(scale: np.ndarray) -> np.ndarray:
  """A8W4/A4W4 word: float32 bits in the low 32 bits, upper bits 0 (as int64)."""
  return np.asarray(scale, F32).view(np.uint32).astype(np.uint64).astype(np.int64)


# --- B.4 grouped matmul ------------------------------------------------------------------

def grouped_matmul(lhs, rhs, bounds, out_dtype=np.int64) -> np.ndarray:
  m, n = lhs.shape[0], rhs.shape[-1]
  out = np.zeros((m, n), out_dtype)
  acc = np.int64 if np.issubdtype(out_dtype, np.integer) else np.float64
  for i, (s, e) in enumerate(bounds):
    out[s:e] = (lhs[s:e].astype(acc) @ rhs[i].astype(acc)).astype(out_dtype)
  return out


# --- B.0.5 / B.0.6 / B.1 fused op ---------------------------------------------------------

def swiglu(c: np.ndarray) -> np.ndarray:
  c = c.astype(F32)
  h = c.shape[-1] // 2
  act, gate = c[:, :h], c[:, h:]
  with np.errstate(over="ignore"):  # exp(-act) = inf for act < -88: silu -> -0, as on device
    return (act / (F32(1) + np.exp(-act))) * gate


# the largest code of each per-token output type (semantics A.3 items 3 and 6)
QMAX = {"int8": 127.0, "int4": 7.0, "float8_e4m3fn": 448.0, "float8_e5m2": 57344.0}


def per_token(s: np.ndarray, out: str = "int8") -> tuple[np.ndarray, np.ndarray]:
  """scale = amax/qmax; Q = RNE(S * (qmax/amax)) saturated at +-qmax (int8, int4: an
  integer (int4 values in int8), fp8: the ml_dtypes cast); amax = 0 -> (0, 0) (semantics
  A.3 items 2, 3, 6)."""
  s = s.astype(F32)
  qmax = F32(QMAX[out])
  amax = np.max(np.abs(s), axis=-1)
  integer = out in ("int8", "int4")
  q = np.zeros(s.shape, np.int8 if integer else getattr(ml_dtypes, out))
  for r in range(s.shape[0]):
    if amax[r] > 0:
      # float32 arithmetic as if its exponent had no limit: a tiny row (where qmax / amax
      # would overflow) is scaled by 2**64 first, which changes no rounding.
      lift = F32(2.0 ** 64) if amax[r] < 2.0 ** -64 else F32(1)
      v = np.clip((s[r] * lift) * (qmax / (amax[r] * lift)), -qmax, qmax)
      q[r] = np.rint(v).astype(np.int8) if integer else v.astype(q.dtype)
  return q, (amax / qmax).astype(F32)


def per_token_int8(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  return per_token(s, "int8")


# --- B.1.6 MX ----------------------------------------------------------------------------

MX_EMAX = {"float8_e4m3fn": 8, "float8_e5m2": 15, "float4_e2m1fn": 2}


def mx_quant(s: np.ndarray, out: str) -> tuple[np.ndarray, np.ndarray]:
  """MX output quantization of rows `s [m, d]` in blocks of 32 (B.1.6): values rounded to
  bf16; E = the block's largest bf16 exponent field; E = 255 -> scale 0xFF, codes NaN (fp4:
  0); E = 0 -> scale 0, codes value * 0; else e = max(E, emax) - emax, codes =
  bf16(value * 2**(127 - e)) cast RNE, saturated. Returns (codes [m, d] of the ml_dtypes
  type, scale bytes uint8 [m, ceil(d/32)])."""
  t = getattr(ml_dtypes, out)
  top = F32(ml_dtypes.finfo(t).max)
  emax = MX_EMAX[out]
  v = np.asarray(s, F32).astype(ml_dtypes.bfloat16)
  m, d = v.shape
  nb = -(-d // 32)
  codes = np.zeros((m, d), t)
  scales = np.zeros((m, nb), np.uint8)
  for r in range(m):
    for b in range(nb):
      blk = v[r, 32 * b:32 * b + 32]
      big_e = int(((blk.view(np.uint16) >> 7) & 0xFF).max())
      if big_e == 255:
        scales[r, b] = 255
        codes[r, 32 * b:32 * b + 32] = np.nan if out != "float4_e2m1fn" else 0.0
      elif big_e == 0:
        codes[r, 32 * b:32 * b + 32] = (blk.astype(F32) * F32(0)).astype(t)
      else:
        e = max(big_e, emax) - emax
        scales[r, b] = e
        data = (blk.astype(np.float64) * 2.0 ** (127 - e)).astype(ml_dtypes.bfloat16)
        codes[r, 32 * b:32 * b + 32] = np.clip(data.astype(F32), -top, top).astype(t)
  return codes, scales


def e8m0_value(b: np.ndarray) -> np.ndarray:
  """2**(b - 127) (float64), NaN for 0xFF."""
  b = np.asarray(b).astype(np.int64)
  return np.where(b == 255, np.nan, np.ldexp(1.0, b - 127))


def mx_torch_npu_layout(codes: np.ndarray, scales: np.ndarray, out: str):
  """torch_npu's MX outputs: scale bytes [m, ceil(d/64), 2] (pairs of blocks, a missing
  last one 0); fp4 codes packed two a byte, the first in the low nibble."""
  m, nb = scales.shape
  pairs = np.zeros((m, -(-nb // 2) * 2), np.uint8)
  pairs[:, :nb] = scales
  if out == "float4_e2m1fn":
    nib = codes.view(np.uint8) & 0xF
    codes = (nib[:, 0::2] | (nib[:, 1::2] << 4)).astype(np.uint8)
  return codes, pairs.reshape(m, -1, 2)


def mx_grouped_matmul(x, w, x_scale, w_scale, bounds) -> np.ndarray:
  """B.1.6's C: per block of 32 along k, the block's dot (float64, then float32) times
  2**(xs - 127) times 2**(ws - 127), blocks summed in order in float32. x [m, k] and
  w [e, k, n] element values; x_scale bytes [m, ceil(k/64), 2]; w_scale [e, ceil(k/64), n, 2]."""
  m, k = x.shape
  n = w.shape[-1]
  c = np.zeros((m, n), F32)
  for i, (s, e) in enumerate(bounds):
    for b in range(-(-k // 32)):
      cols = slice(32 * b, min(32 * b + 32, k))
      part = (x[s:e, cols].astype(np.float64) @ w[i, cols].astype(np.float64)).astype(F32)
      sx = e8m0_value(x_scale[s:e, b // 2, b % 2]).astype(F32)
      sw = e8m0_value(w_scale[i, b // 2, :, b % 2]).astype(F32)
      c[s:e] = c[s:e] + (part * sx[:, None]) * sw[None, :]
  return c


def quantize_out(sw: np.ndarray, out: str):
  """The fused op's output quantization: per token (int8 / fp8) or ("mx", type) in
  torch_npu's layout."""
  if isinstance(out, tuple):
    return mx_torch_npu_layout(*mx_quant(sw, out[1]), out[1])
  return per_token(sw, out)


def swiglu_quant(x, w, w_scale, x_scale, bounds, *, scenario: str, assist=None, smooth=None,
                 out="int8"):
  """npu_grouped_matmul_swiglu_quant_v2 golden.

  x: int values [m, k]; w: int values [e, k, n]; w_scale float32 [e, n] or [e, G, n];
  x_scale float32 [m]; bounds from group_bounds; out: "int8", "float8_e4m3fn",
  "float8_e5m2" (per token) or ("mx", type). Rows outside every group -> (0, 0).
  """
  m, k = x.shape
  n = w.shape[-1]
  sw_all = np.zeros((m, n // 2), F32)  # rows in no group: 0, which quantizes to (0, 0)
  x_scale = np.asarray(x_scale, F32)
  for i, (s, e) in enumerate(bounds):
    if e <= s:
      continue
    xi = x[s:e].astype(np.int64)
    if scenario == "A8W8":
      acc = xi @ w[i].astype(np.int64)
      c = (acc.astype(F32) * w_scale[i].astype(F32)) * x_scale[s:e, None]
    elif scenario == "A4W4":
      acc = xi @ w[i].astype(np.int64)
      c = (acc.astype(F32) * x_scale[s:e, None]) * w_scale[i].astype(F32)
    else:
      c = a8w4_c(xi, w[i], w_scale[i], assist[i], x_scale[s:e])
    sw = swiglu(c)
    if smooth is not None:
      sw = sw * np.asarray(smooth[i], F32)
    sw_all[s:e] = sw
  return quantize_out(sw_all, out)


def a8w4_c(xi, wi, scale, assist, x_scale) -> np.ndarray:
  """A8W4's C for one expert's rows, the literal formula of B.1.4 (MSD): hi/lo nibbles of
  x, per k-group partials summed in float32."""
  k, n = wi.shape
  sc = np.asarray(scale).reshape(-1, n).astype(F32)
  gs = k // sc.shape[0]
  x_hi = np.floor_divide(xi, 16)
  x_lo = (xi & 0x0F) - 8
  c_hi = np.zeros((xi.shape[0], n), F32)
  c_lo = np.zeros((xi.shape[0], n), F32)
  for g in range(sc.shape[0]):
    wg = wi[g * gs:(g + 1) * gs].astype(np.int64)
    c_hi += (x_hi[:, g * gs:(g + 1) * gs] @ wg).astype(F32) * sc[g]
    c_lo += (x_lo[:, g * gs:(g + 1) * gs] @ wg).astype(F32) * sc[g]
  return (F32(16) * c_hi + c_lo + np.asarray(assist).astype(F32)) * np.asarray(x_scale, F32)[:, None]


def a8w4_scale_slack(x, w, w_scale, x_scale, bounds, assist) -> np.ndarray:
  """Per row, the ulps of its per-token scale by which A8W4's float32 sums over k groups
  may separate the op from the golden (beyond SCALE_ULPS' SwiGLU and division).

  The golden's C (`a8w4_c`, B.1.4's literal hi/lo partials) is off the exact C by what we
  measure here (float64); the op sums the terms s_g * acc_g (acc_g exact int32) and the
  assist A in float32, within (G + 2) * u * x_scale * (sum_g |s_g acc_g| + |A|) of it
  (u = 2**-24: G additions, the assist's own rounding, the x_scale product). Where the
  terms cancel, that is many ulps of C (20 ulps of the scale in a CI example: G = 4, terms
  ~1.4 summing to -0.05). Through SwiGLU, S = silu(Cg) * Cu moves by at most
  |Cu silu'(Cg)| dCg + |silu(Cg)| dCu, the row's amax by the largest of those, the scale
  (amax / 127) by that / 127.
  """
  m, k = x.shape
  n = w.shape[-1]
  slack = np.zeros(m)
  u = 2.0 ** -24
  for i, (s, e) in enumerate(bounds):
    if e <= s:
      continue
    xi = x[s:e].astype(np.int64)
    sc = np.asarray(w_scale[i], np.float64).reshape(-1, n)
    gs = k // sc.shape[0]
    terms = [(xi[:, g * gs:(g + 1) * gs] - 8) @ w[i, g * gs:(g + 1) * gs].astype(np.int64)
             * sc[g] for g in range(sc.shape[0])]
    a = np.asarray(assist[i], np.float64)
    xs = np.asarray(x_scale[s:e], np.float64)[:, None]
    c = xs * (sum(terms) + a)
    golden = a8w4_c(xi, w[i], w_scale[i], assist[i], x_scale[s:e]).astype(np.float64)
    dc = np.abs(golden - c) + (sc.shape[0] + 2) * u * xs * (sum(map(np.abs, terms)) + np.abs(a))
    h = n // 2
    cg, cu, dg, du = c[:, :h], c[:, h:], dc[:, :h], dc[:, h:]
    sig = 1 / (1 + np.exp(-cg))
    silu, dsilu = cg * sig, sig * (1 + cg * (1 - sig))
    d_amax = np.max(np.abs(cu * dsilu) * dg + np.abs(silu) * du, axis=1)
    scale = np.max(np.abs(silu * cu), axis=1) / 127
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(scale, 1e-38))) - 23)
    slack[s:e] = np.ceil(d_amax / 127 / ulp)
  return slack


def canonical_assist(w, w_scale) -> np.ndarray:
  """A[i, c] = 8 * sum_k W[i, k, c] * s[i, k // gs, c] (float64, then float32)."""
  e, k, n = w.shape
  sc = np.asarray(w_scale, np.float64).reshape(e, -1, n)
  gs = k // sc.shape[1]
  a = np.zeros((e, n))
  for kk in range(k):
    a += w[:, kk, :] * sc[:, kk // gs, :]
  return (8 * a).astype(F32)


# --- B.2 quant matmul ----------------------------------------------------------------------

def trans_quant_param(scale, offset=None, round_mode=0) -> np.ndarray:
  """int64 words, per element, written bit by bit from semantics B.2.3."""
  scale = np.asarray(scale, F32)
  shape = scale.shape if offset is None else np.broadcast_shapes(scale.shape, np.shape(offset))
  s = np.broadcast_to(scale, shape).reshape(-1)
  o = None if offset is None else np.broadcast_to(np.asarray(offset, F32), shape).reshape(-1)
  out = []
  for i, v in enumerate(s):
    u = int(np.array(v, F32).view(np.uint32))
    if round_mode == 0:
      f19 = u & 0xFFFFE000
    else:
      exp = (u >> 23) & 0xFF
      if exp == 0:
        f19 = u & 0x80000000
      elif exp == 0xFF:
        f19 = u & 0xFFFFE000
      else:
        keep, rnd, sticky = u >> 13, (u >> 12) & 1, u & 0xFFF
        if rnd and (sticky or keep & 1):
          keep += 1
        f19 = (keep << 13) & 0xFFFFFFFF
    word = f19 | (1 << 46)
    if o is not None:
      oi = int(np.clip(np.rint(o[i]), -256, 255))
      word = (word & 0x4000FFFFFFFF) | ((oi & 0x1FF) << 37)
    out.append(word)
  return np.asarray(out, np.int64).reshape(shape)


def fp19(scale) -> np.ndarray:
  return (np.asarray(scale, F32).view(np.uint32) & np.uint32(0xFFFFE000)).view(F32)


def requant(v, offset=None) -> np.ndarray:
  """semantics B.2.1 compute_requant: RNE, s9 clip, + s9 offset, clip to int8."""
  t = np.clip(np.rint(np.asarray(v, F32)), -256, 255)
  if offset is not None:
    t = t + np.clip(np.rint(np.asarray(offset, F32)), -256, 255)
  return np.clip(t, -128, 127).astype(np.int8)


def quant_matmul(x1, x2, scale, *, offset=None, pertoken=None, bias=None, out="int8"):
  """The formula table of semantics B.2.1; `scale` is the effective float32 scale."""
  acc = np.matmul(np.asarray(x1, np.int64), np.asarray(x2, np.int64))
  int_bias = bias is not None and np.asarray(bias).dtype == np.int32
  if int_bias:
    acc = acc + np.asarray(bias, np.int64)
  if out == "int32":
    return acc.astype(np.int32)
  v = acc.astype(F32) * np.asarray(scale, F32)
  if out == "int8":
    return requant(v, offset)
  if pertoken is not None:
    v = v * np.asarray(pertoken, F32)[:, None]
  if bias is not None and not int_bias:
    v = v + np.asarray(bias, F32)
  return v.astype({"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[out])


# --- B.6 weight-only quant matmul -------------------------------------------------------------

def weight_quant_matmul(x, w, scale_rows, offset_rows=None, bias=None):
  """semantics B.6 golden: W' = inter(inter(W + inter(off)) * scale); out = f32(x) @ f32(W'); + bias."""
  inter = np.asarray(x).dtype
  wf = np.asarray(w).astype(inter)
  if offset_rows is not None:
    wf = (wf.astype(F32) + np.asarray(offset_rows).astype(F32)).astype(inter)
  wf = (wf.astype(F32) * np.asarray(scale_rows).astype(F32)).astype(inter)
  out = np.asarray(x).astype(np.float64) @ wf.astype(np.float64)
  if bias is not None:
    out = out + np.asarray(bias, F32)
  return out


# --- A.4 quant-aware training: STE / LSQ rules -------------------------------------------

def _reduce_to(t: np.ndarray, shape) -> np.ndarray:
  """Sum t over the axes a `shape`-sized operand was broadcast along."""
  lead = t.ndim - len(shape)
  t = t.sum(axis=tuple(range(lead)))
  for i, d in enumerate(shape):
    if d == 1 and t.shape[i] != 1:
      t = t.sum(axis=i, keepdims=True)
  return t


def _on_grid(v, qmax, grid):
  """v clipped to [-qmax, qmax], rounded half to even: to an integer or to the fp8 `grid`
  (an ml_dtypes type name)."""
  v = np.clip(v, -qmax, qmax)
  return np.rint(v) if grid is None else v.astype(getattr(ml_dtypes, grid)).astype(F32)


def lsq(x, scale, g, qmax, grad_scale=None, grid=None):
  """Fake quant `q * s`, `q = clip(rne(x * (1/s)), -qmax, qmax)`, and its STE/LSQ vjp.

  Returns (y, dx, dscale): dx = g where |x/s| <= qmax else 0; dscale = sum of
  g * (q - x/s) inside and g * q where clipped (Esser et al., LSQ).
  """
  x = np.asarray(x, F32)
  scale = np.asarray(scale, F32)
  inv = np.where(scale > 0, F32(1) / np.where(scale > 0, scale, F32(1)), F32(0)).astype(F32)
  v = x * inv
  q = _on_grid(v, qmax, grid)
  inside = np.abs(v) <= qmax
  dx = np.where(inside, g, 0).astype(F32)
  dscale = _reduce_to(np.where(inside, q - v, q) * g, scale.shape)
  if grad_scale is not None:
    dscale = dscale * grad_scale
  return (q * scale).astype(F32), dx, dscale.astype(F32)


def dynamic_lsq(x, g, qmax=127.0, grid=None):
  """Per-row dynamic fake quant (scale = amax/qmax) and its vjp.

  The scale's LSQ cotangent sum_j g_j (q_j - x_j/s) flows through s = amax/qmax
  to the row's largest |x| (shared equally among ties, as JAX's max does).
  """
  x = np.asarray(x, F32)
  g = np.asarray(g, F32)
  y = np.zeros_like(x)
  dx = g.copy()
  for r in np.ndindex(*x.shape[:-1]):
    row = x[r]
    amax = np.max(np.abs(row))
    if amax == 0:
      continue
    s = amax / F32(qmax)
    v = row * (F32(qmax) / amax)
    q = _on_grid(v, qmax, grid)
    y[r] = q * s
    dscale = np.sum(g[r] * (q - v))
    ties = np.abs(row) == amax
    dx[r] = dx[r] + ties * np.sign(row) * dscale / F32(qmax) / ties.sum()
  return y, dx


def mx_ste(x, g, out):
  """MX fake quant (codes times block scales) and its straight-through vjp: g where
  |x| <= max * block scale (not saturated; 0 in NaN blocks)."""
  x = np.asarray(x, F32)
  codes, scales = mx_quant(x, out)
  scale = np.repeat(e8m0_value(scales), 32, axis=1)[:, :x.shape[1]]
  top = float(ml_dtypes.finfo(getattr(ml_dtypes, out)).max)
  y = (codes.astype(np.float64) * scale).astype(F32)
  with np.errstate(invalid="ignore"):
    inside = np.abs(x.astype(np.float64)) <= top * scale
  return y, np.where(inside, g, 0).astype(F32)


def silu_grad(a):
  sig = 1 / (1 + np.exp(-a))
  return sig * (1 + a * (1 - sig))


def qat_swiglu_quant_vjp(x, w, w_scale, bounds, g, qmax_w):
  """Backward of the fake-quant fused op (semantics A.4) by hand, in float64 where it can.

  Chain: x_hat = dynamic_lsq(x); w_hat = lsq(w, scale per channel/group);
  c = per-group x_hat @ w_hat (rows outside every group: 0); s = swiglu(c);
  y = dynamic_lsq(s). Returns (dx, dw, dscale).
  """
  m, k = x.shape
  e, _, n = w.shape
  h = n // 2
  x_hat, _ = dynamic_lsq(x, np.zeros_like(x))
  groups = 1 if w_scale.ndim == 2 else w_scale.shape[1]
  w4 = w.reshape(e, groups, k // groups, n)
  s4 = np.asarray(w_scale, F32).reshape(e, groups, 1, n)
  w_hat = lsq(w4, s4, np.zeros_like(w4), qmax_w)[0].reshape(e, k, n)
  c = grouped_matmul(x_hat, w_hat, bounds, np.float64)
  a, b = c[:, :h], c[:, h:]
  s = a / (1 + np.exp(-a)) * b
  _, ds = dynamic_lsq(s, g)
  dc = np.concatenate([ds * b * silu_grad(a), ds * a / (1 + np.exp(-a))], axis=1)
  dx_hat = np.zeros((m, k))
  dw_hat = np.zeros((e, k, n))
  for i, (lo, hi) in enumerate(bounds):
    dx_hat[lo:hi] = dc[lo:hi] @ w_hat[i].T.astype(np.float64)
    dw_hat[i] = x_hat[lo:hi].T.astype(np.float64) @ dc[lo:hi]
  _, dx = dynamic_lsq(x, dx_hat)
  _, dw, dscale = lsq(w4, s4, dw_hat.reshape(e, groups, k // groups, n), qmax_w)
  return dx, dw.reshape(e, k, n), dscale.reshape(w_scale.shape)


# --- a Flax MoE layer, token by token ---------------------------------------------------

def moe_mlp(x, router, w_gate_up, w_down, top_k, expert_fn=None, kept=None):
  """out[t] = sum_j p_tj * expert(x_t, e_tj) with softmax top-k gates renormalized.

  expert_fn(x_row [1, d], expert) defaults to the float expert
  swiglu(x @ W_gu[e]) @ W_down[e]. kept: bool [T, top_k], False for (token, slot)
  pairs dropped (they add nothing).
  """
  x = np.asarray(x, np.float64)
  logits = x @ np.asarray(router, np.float64)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  if expert_fn is None:
    def expert_fn(row, i):
      c = row @ np.asarray(w_gate_up[i], np.float64)
      h = c.shape[-1] // 2
      return (c[:, :h] / (1 + np.exp(-c[:, :h])) * c[:, h:]) @ np.asarray(w_down[i], np.float64)
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    top = np.argsort(-probs[t], kind="stable")[:top_k]
    p = probs[t, top] / probs[t, top].sum()
    for j, (pj, i) in enumerate(zip(p, top)):
      if kept is None or kept[t, j]:
        out[t] += pj * expert_fn(x[t:t + 1], i)[0]
  return out


def top_k_experts(x, router, top_k):
  """[T, top_k] experts of each token, best first (the routing of `moe_mlp`)."""
  logits = np.asarray(x, np.float64) @ np.asarray(router, np.float64)
  return np.argsort(-logits, axis=-1, kind="stable")[:, :top_k]


def capacity_kept(experts, devices, experts_per_device, capacity):
  """bool [T, k]: pairs each device (T / devices consecutive tokens) keeps when it
  sends at most `capacity` pairs to each device, earliest (token, slot) first."""
  kept = np.zeros(experts.shape, bool)
  per = experts.shape[0] // devices
  for src in range(devices):
    sent = np.zeros(devices, int)
    for t in range(src * per, (src + 1) * per):
      for j, e in enumerate(experts[t]):
        dest = e // experts_per_device
        kept[t, j] = sent[dest] < capacity
        sent[dest] += 1
  return kept


# --- B.4 npu_grouped_matmul --------------------------------------------------------------------

def segments(group_list, group_list_type: int) -> list[tuple[int, int, int]]:
  """[(expert, start, end)] for a valid group_list: cumsum 0 / count 1 / (expert, size) pairs 2."""
  if group_list_type == 2:
    out, start = [], 0
    for expert, size in group_list:
      out.append((int(expert), start, start + int(size)))
      start += int(size)
    return out
  return [(i, s, e) for i, (s, e) in enumerate(group_bounds(group_list, group_list_type))]


def act(v: np.ndarray, act_type: int) -> np.ndarray:
  """semantics B.4.2 activations in float32: 1 relu, 2 gelu-tanh, 4 fast-gelu, 5 silu."""
  v = np.asarray(v, F32)
  if act_type == 0:
    return v
  if act_type == 1:
    return np.maximum(v, F32(0))
  if act_type == 2:
    return (F32(0.5) * v * (F32(1) + np.tanh(F32(np.sqrt(2 / np.pi)) * (v + F32(0.044715) * v ** 3)))
            ).astype(F32)
  if act_type == 4:
    return (v / (F32(1) + np.exp(F32(-1.702) * v))).astype(F32)
  if act_type == 5:
    return (v / (F32(1) + np.exp(-v))).astype(F32)
  raise ValueError(act_type)


def _gmm_loop(m, n, segs, out_dtype, per_group):
  """y[s:e] = per_group(expert, s, e) for each segment; rows outside every segment are 0."""
  y = np.zeros((m, n), out_dtype)
  for i, s, e in segs:
    if e > s:
      y[s:e] = per_group(i, s, e)
  return y


def gmm_float(x, w, segs, bias=None) -> np.ndarray:
  """No quant (B.4.3): y = x_i @ W_i + bias_i, float64 here, cast once to x's dtype."""
  def group(i, s, e):
    v = x[s:e].astype(np.float64) @ w[i].astype(np.float64)
    if bias is not None:
      v = v + np.asarray(bias[i], np.float64)
    return v.astype(x.dtype)
  return _gmm_loop(x.shape[0], w.shape[-1], segs, x.dtype, group)


def gmm_k_grouped(x, w, bounds) -> np.ndarray:
  """group_type 2: y[i] = x[:, K_i] @ W[K_i, :] -> [E, m, n]; empty K_i -> zeros."""
  y = np.zeros((len(bounds), x.shape[0], w.shape[-1]), x.dtype)
  for i, (s, e) in enumerate(bounds):
    y[i] = (x[:, s:e].astype(np.float64) @ w[s:e].astype(np.float64)).astype(x.dtype)
  return y


def gmm_a8w8(x, w, segs, scale, *, offset=None, pts=None, bias=None, out="int8", act_type=0):
  """Quant (B.4.3): (acc + int32 bias) * scale_i [* pts] [+ float bias], act, cast / requant.

  scale: the effective float32 `[E, n]` (decoded words); offset: `[E, n]` from the words.
  """
  int_bias = bias is not None and np.asarray(bias).dtype == np.int32
  dtype = {"int8": np.int8, "int32": np.int32, "float16": np.float16,
           "bfloat16": ml_dtypes.bfloat16}[out]

  def group(i, s, e):
    acc = x[s:e].astype(np.int64) @ w[i].astype(np.int64)
    if int_bias:
      acc = acc + np.asarray(bias[i], np.int64)
    if out == "int32":
      return acc.astype(np.int32)
    v = acc.astype(F32) * np.asarray(scale[i], F32)
    if out == "int8":
      return requant(v, None if offset is None else offset[i])
    if pts is not None:
      v = v * np.asarray(pts[s:e], F32)[:, None]
    if bias is not None and not int_bias:
      v = v + np.asarray(bias[i], F32)
    return act(v, act_type).astype(dtype)
  return _gmm_loop(x.shape[0], w.shape[-1], segs, dtype, group)


def gmm_grouped_scale(x, w, segs, scale, *, pts=None, bias=None, out="float16", act_type=0,
                      a8w4=False):
  """A4W4: sum_g s_g (x_g @ W_g) [* pts]. A8W4 (a8w4=True, literal B.4.3 / B.1.4 form):
  (16 * C_hi + C_lo + bias) * pts with C_hi/lo = sum_g s_g (x_hi/lo,g @ W_g),
  x_hi = floor(x / 16), x_lo = (x & 15) - 8. scale: float32 [E, G, n]."""
  dtype = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[out]
  k = x.shape[1]

  def group(i, s, e):
    sc = np.asarray(scale[i], F32)
    gs = k // sc.shape[0]
    xi = x[s:e].astype(np.int64)
    halves = [np.floor_divide(xi, 16), (xi & 0x0F) - 8] if a8w4 else [xi]
    c = []
    for h in halves:
      acc = np.zeros((e - s, w.shape[-1]), F32)
      for g in range(sc.shape[0]):
        part = h[:, g * gs:(g + 1) * gs] @ w[i, g * gs:(g + 1) * gs].astype(np.int64)
        acc = acc + part.astype(F32) * sc[g]
      c.append(acc)
    v = F32(16) * c[0] + c[1] + np.asarray(bias[i], F32) if a8w4 else c[0]
    if pts is not None:
      v = v * np.asarray(pts[s:e], F32)[:, None]
    return act(v, act_type).astype(dtype)
  return _gmm_loop(x.shape[0], w.shape[-1], segs, dtype, group)


def antiquant_weight(w, scale, offset, dtype) -> np.ndarray:
  """B.4.3 anti-quant weight `(W + offset) * scale`, scale/offset [G, n] (row kk: group kk // (k/G)).

  float16 x: rounded to fp16 after the offset and after the scale; bfloat16 x: float32 math,
  rounded to bf16 once."""
  k = w.shape[0]
  rows = lambda v: np.repeat(np.asarray(v), k // np.asarray(v).shape[0], axis=0)
  if np.dtype(dtype) == np.float16:
    wf = w.astype(np.float16)
    if offset is not None:
      wf = (wf + rows(offset).astype(np.float16)).astype(np.float16)
    return (wf * rows(scale).astype(np.float16)).astype(np.float16)
  wf = w.astype(F32)
  if offset is not None:
    wf = wf + rows(offset).astype(F32)
  return (wf * rows(scale).astype(F32)).astype(dtype)


def gmm_antiquant(x, w, segs, scale, offset=None, bias=None, act_type=0) -> np.ndarray:
  """Anti-quant (B.4.3): y = x_i @ ((W_i + off_i) * scale_i) + bias_i, act, cast to x's dtype."""
  def group(i, s, e):
    wd = antiquant_weight(w[i], scale[i], None if offset is None else offset[i], x.dtype)
    v = x[s:e].astype(np.float64) @ wd.astype(np.float64)
    if bias is not None:
      v = v + np.asarray(bias[i], np.float64)
    return act(v.astype(F32), act_type).astype(x.dtype)
  return _gmm_loop(x.shape[0], w.shape[-1], segs, x.dtype, group)
