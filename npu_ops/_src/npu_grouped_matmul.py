"""`npu_grouped_matmul` (aclnnGroupedMatmul V4/V5, aclnnGroupedMatmulWeightNz), semantics B.4.

Structure (semantics B.4.2):

* `group_type=-1`: an independent list of matmuls `y_i = x_i @ W_i` (x_i 2-6 dims).
* `group_type=0`: m-axis groups, rows `[start_i, end_i)` of x use `W_i`; rows
  outside every group are 0 (semantics A.3 item 1).
* `group_type=2`: k-axis groups, `y[i] = x[:, K_i] @ W[K_i, :]`, stacked `[E, m, n]`;
  an empty k-group gives a zero matrix (float only, as in torch_npu).

Numerics per group i (semantics B.4.3), told apart by the dtypes of x and weight:

* float: `y = x @ W + bias` (float32 accumulation, one rounding).
* A8W8 quant: `acc = int32(x @ W)`; `(acc + int32 bias) * scale [* per_token] [+ float bias]`,
  int8 output by the fixpipe requant of the int64 scale words, int32 output `acc + bias`.
* A4W4: `sum_g scale[g] * (x_g @ W_g) [* per_token]` (scale words, per channel or group).
* anti-quant (float x, int8/int4 weight): `x @ ((W + offset) * scale) + bias`.
* A8W4 pseudo-quant: `(sum_g s_g * ((x - 8)_g @ W_g) + bias) * per_token` (the kernel's
  hi/lo nibble split, exact in int32 through `(x - 8) @ W = x @ W - 8 * colsum`).
* `act_type` (quant with per-token scale, A4W4, A8W4, anti-quant) after the dequant.

This module is the structure: lists, m-axis and k-axis grouping, one grouped problem at
a time. Each scenario's checks, computation and epilogue are `npu_ops._src.gmm_scenarios`'s
(with `SUPPORTED`, the table the README renders). Every m-grouped matmul runs on
`npu_ops._src.grouped` (differentiable, so `jax.grad` works) and every k-grouped one on `tgmm`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from npu_ops._src import backend
from npu_ops._src import gmm_scenarios as scenarios
from npu_ops._src import grouped as grouped_lib
from npu_ops._src import groups as groups_lib
from npu_ops._src import layouts, operands, row_blocks
from npu_ops._src import quant as quant_lib
from npu_ops._src.validation import (asarray, check_array, check_dtype, check_int_option, describe,
                                     fail, require)
from npu_ops._src.gmm_swiglu_quant import expected_tokens
from npu_ops._src.operands import A8W4
from pallas_kernels.common import TileSizes

_MAX_TENSORS = 128  # torch_npu's limit on a TensorList

# --- public op ---------------------------------------------------------------------------------

def npu_grouped_matmul(x: Any, weight: Any, *, bias: Any = None, scale: Any = None,
                       offset: Any = None, antiquant_scale: Any = None,
                       antiquant_offset: Any = None, per_token_scale: Any = None,
                       group_list: Any = None, split_item: int = 0, group_type: int | None = None,
                       group_list_type: int = 0, act_type: int = 0, output_dtype: Any = None,
                       tuning_config: Any = None, quant_group_size: int = 0,
                       implementation: str | None = None, interpret: bool = False,
                       tiles: TileSizes | None = None) -> list[jax.Array]:
  """torch_npu.npu_grouped_matmul (semantics B.4); weights in ND or FRACTAL_NZ.

  Args:
    x: an array or a list of arrays. float16/bfloat16/float32 (float and
      anti-quant), int8 (quant, A8W4), or int4 as int32 words `[m, k/8]` /
      `jnp.int4` (A4W4). 2-D, except with group_type -1 (2-6 dims).
    weight: an array `[E, k, n]` or a list of `[k, n]` arrays (group_type 2: one
      `[k, n]`, or a list whose k ranges are concatenated). Float weights have
      x's dtype; int8; int4 as int32 words (`n/8` last dim) or `jnp.int4`. Any of
      them may be FRACTAL_NZ storage (two more dims, `npu_format_cast(w, 29)`);
      n then comes from scale / antiquant_scale / bias, else the padded width.
    bias: per group `[E, n]` or a list of `[n]`: float16 for float16 x, float32
      for bfloat16/float32 x; int32 or bfloat16/float16/float32 for A8W8; float32
      (required, offline `8 * sum_k W * s`) for A8W4.
    scale: A8W8: `[E, n]` / `[E, 1]` int64 words of `npu_trans_quant_param` (int8
      output, the offset rides in the words), bfloat16 (bfloat16 output) or
      float32 (float16/bfloat16 output; used as is). A4W4: words with float32 bits
      in the low word (or float32), `[E, n]` or `[E, G, n]`; A8W4: the same,
      `[E, k/quant_group_size, n]`.
    offset: None (A8W4 asymmetric quantization is planned).
    antiquant_scale, antiquant_offset: anti-quant, x's dtype, `[E, n]` per channel
      or `[E, G, n]` per group (int4 weights, G dividing k).
    per_token_scale: float32 `[m]` (a list of `[m_i]` per x with group_type -1).
    group_list: Python ints (static) or an int32/int64 array (dynamic, one
      compilation for all values), at most E entries.
    split_item: 0/1 a list of outputs (per x, or per group with 1), 2/3 one
      output (m-axis: `[m, n]`, k-axis: `[E, m, n]`, list: concatenated along m).
    group_type: None (0 with a group_list, else -1), -1, 0 or 2.
    group_list_type: 0 cumsum, 1 counts, 2 `[E, 2]` (expert, size) pairs
      (m-axis only, every scenario: torch_npu's take int8 x int8 only, semantics A.3
      item 9; A8W4 always reads counts, as the kernel).
    act_type: 0 none, 1 relu, 2 gelu-tanh, 4 fast-gelu, 5 silu.
    output_dtype: None (x's dtype for float x; A8W8: from the scale dtype, int8
      for words, bfloat16 for bfloat16, float16 for float32; A4W4/A8W4: float16)
      or int8 / float16 / bfloat16 / int32 / float32 where SUPPORTED lists it.
    tuning_config: `[expected tokens per expert, ...]`: a row-block size hint.
    quant_group_size: 0 (or None) or k / G (A8W4, 256 on the NPU).
    implementation: None, "xla", "reference", "pallas_tpu" or "pallas_gpu"
      (`npu_ops._src.backend`): the float grouped matmuls (m- and k-axis) run on the
      Pallas kernels; integer scenarios have none (None falls back to XLA).
    interpret, tiles: run a kernel in interpret mode; the kernels' tile sizes.

  Returns:
    A list of arrays (see split_item).

  Raises:
    ValueError / TypeError naming the argument for shapes, dtypes and modes
    outside semantics B.4; NotImplementedError for the PLANNED scenarios.
  """
  split_item = check_int_option("split_item", split_item, (0, 1, 2, 3))
  if isinstance(act_type, (int, np.integer)) and not isinstance(act_type, bool) and act_type == 3:
    fail("act_type", "0, 1, 2, 4 or 5 (3, GELU-erf, is unsupported by torch_npu)", 3)
  act_type = check_int_option("act_type", act_type, quant_lib.ACT_TYPES)
  if group_type is None:
    group_type = 0 if group_list is not None else -1
  if group_type == 1:
    fail("group_type", "-1, 0 or 2 (n-axis grouping, 1, is unsupported by torch_npu)", 1)
  group_type = check_int_option("group_type", group_type, (-1, 0, 2))
  group_list_type = check_int_option("group_list_type", group_list_type, (0, 1, 2))
  if quant_group_size is None:
    quant_group_size = 0
  if isinstance(quant_group_size, bool) or not isinstance(quant_group_size, (int, np.integer)):
    fail("quant_group_size", "a Python int (0, or the k-group size of A8W4)",
         repr(quant_group_size), TypeError)
  # checked here, for every scenario: paths that do not group k would ignore a bad value
  require(quant_group_size >= 0, "quant_group_size", "0, or the k-group size of A8W4 (> 0)",
          quant_group_size)
  opts = scenarios.Options(act_type=act_type, output_dtype=output_dtype,
                  quant_group_size=int(quant_group_size), implementation=implementation,
                  expected_tokens=expected_tokens(tuning_config), interpret=interpret,
                  tiles=tiles)
  backend.check(implementation, interpret, tiles)
  xs = _tensor_list(x, "x")
  params = dict(bias=bias, scale=scale, offset=offset, antiquant_scale=antiquant_scale,
                antiquant_offset=antiquant_offset)
  if group_type == -1:
    if group_list is not None:
      fail("group_list", "None with group_type=-1 (an independent list of matmuls)",
           describe(group_list))
    return _independent(xs, weight, params, per_token_scale, split_item, opts)
  if group_type == 2:
    return _k_grouped(xs, weight, params, per_token_scale, group_list, group_list_type,
                      split_item, opts)
  return _m_grouped(xs, weight, params, per_token_scale, group_list, group_list_type,
                    split_item, opts)


def _tensor_list(value: Any, name: str) -> list[Any]:
  items = list(value) if isinstance(value, (list, tuple)) else [value]
  require(1 <= len(items) <= _MAX_TENSORS, name, f"1 to {_MAX_TENSORS} arrays", len(items))
  for i, v in enumerate(items):
    check_array(f"{name}[{i}]" if len(items) > 1 else name, v)
  return items


# --- structure ---------------------------------------------------------------------------------

def _m_grouped(xs, weight, params, per_token_scale, group_list, group_list_type, split_item,
               opts):
  """group_type 0: x (one or a list, concatenated along m) against E stacked weights."""
  for xi in xs:
    require(xi.ndim == 2, "x", "2-D arrays [m, k] with group_type=0", describe(xi))
  x = xs[0] if len(xs) == 1 else jnp.concatenate([jnp.asarray(xi) for xi in xs])
  if group_list is None:
    require(len(xs) > 1, "group_list", "a group list with group_type=0 and a single x", None)
    group_list, group_list_type = [xi.shape[0] for xi in xs], 1
  pts = per_token_scale
  if isinstance(pts, (list, tuple)) and len(pts) == 1:
    pts = pts[0]
  elif isinstance(pts, (list, tuple)):
    pts = jnp.concatenate([jnp.asarray(p) for p in _tensor_list(pts, "per_token_scale")])
  w = operands.stack_tensor_list(weight, "weight", expert_rank=(2, 4))  # [w0 [k, n]]: one expert
  stacked = {k: _stack_params(v, k, row_blocks.num_groups_of(w)) for k, v in params.items()}
  y, ends = _grouped(x, w, stacked, pts, group_list, group_list_type, opts)
  if split_item in (2, 3):
    return [y]
  if split_item == 0:  # one output per x
    cuts = np.cumsum([xi.shape[0] for xi in xs])[:-1]
    return list(jnp.split(y, cuts)) if len(xs) > 1 else [y]
  require(isinstance(ends, tuple), "split_item",
          "0, 2 or 3 with a dynamic group_list (1 makes output shapes depend on its values)", 1)
  return list(jnp.split(y[:ends[-1]], list(ends[:-1])))  # per group [size_i, n]


def _stack_params(value, name, num_experts):
  """A per-group TensorList as one `[E, ...]` array; NumPy lists stay NumPy (int64 words).
  A list of one rank-2 array is stacked (`[E, n]`) when its first dim is E, else one
  expert's (`[G, n]` per-group scales of a one-expert weight)."""
  if value is None:
    return None
  if (isinstance(value, (list, tuple)) and len(value) == 1 and getattr(value[0], "ndim", 0) == 2
      and value[0].shape[0] != num_experts):
    return value[0][None]
  if (isinstance(value, (list, tuple)) and len(value) > 1 and
      all(isinstance(v, np.ndarray) for v in value)):
    require(len({(v.shape, v.dtype) for v in value}) == 1, name,
            "per-group arrays of equal shapes and dtypes", [describe(v) for v in value])
    return np.stack(value)
  return operands.stack_tensor_list(value, name, expert_rank=(1, 2))


def _independent(xs, weight, params, per_token_scale, split_item, opts):
  """group_type -1: y_i = x_i @ W_i for each pair, each a one-group problem."""
  if isinstance(weight, (list, tuple)):
    ws = list(weight)
  else:
    check_array("weight", weight)
    require(weight.ndim in (3, 5), "weight", "a list of [k, n] arrays or a stacked [E, k, n] "
            "(rank 3) / FRACTAL_NZ (rank 5) array", describe(weight))
    ws = [weight[i] for i in range(weight.shape[0])]
  require(len(ws) == len(xs), "weight", f"{len(xs)} weights, one per x (group_type=-1)", len(ws))
  per_pair = {k: _per_pair(v, k, len(xs)) for k, v in params.items()}
  pts = _per_pair(per_token_scale, "per_token_scale", len(xs))
  outs = []
  for i, (xi, wi) in enumerate(zip(xs, ws)):
    require(2 <= xi.ndim <= 6, "x", "2 to 6 dims with group_type=-1", describe(xi))
    check_array("weight", wi)
    require(wi.ndim in (2, 4), "weight", "[k, n] (ND) or rank-4 FRACTAL_NZ arrays", describe(wi))
    x2 = asarray(xi.reshape(-1, xi.shape[-1]))
    pi = {k: None if v[i] is None else v[i][None] for k, v in per_pair.items()}
    y, _ = _grouped(x2, wi[None], pi, pts[i], [x2.shape[0]], 1, opts)
    outs.append(y.reshape(*xi.shape[:-1], y.shape[-1]))
  if split_item in (2, 3):
    require(len({o.shape[-1] for o in outs}) == 1, "split_item",
            "0 or 1 when the outputs have different n (2/3 concatenates along m)", split_item)
    return [jnp.concatenate([o.reshape(-1, o.shape[-1]) for o in outs])]
  return outs


def _per_pair(value, name, count):
  if value is None:
    return [None] * count
  if isinstance(value, (list, tuple)):
    require(len(value) == count, name, f"{count} arrays, one per x (group_type=-1)", len(value))
    return list(value)
  check_array(name, value)
  if count == 1:
    return [value]
  require(value.shape[0] == count, name, f"a list of {count} arrays or a leading dim of {count}",
          describe(value))
  return [value[i] for i in range(count)]


def _check_group_count(count: int) -> None:
  require(count <= groups_lib.MAX_GROUPS, "group_list",
          f"at most {groups_lib.MAX_GROUPS} groups (semantics B.0.1)", f"{count} groups")


def _k_grouped(xs, weight, params, per_token_scale, group_list, group_list_type, split_item,
               opts):
  """group_type 2 (float only): y[i] = x[:, K_i] @ W[K_i, :], stacked [E, m, n]."""
  for name, v in list(params.items()) + [("per_token_scale", per_token_scale)]:
    if v is not None:
      fail(name, "None with group_type=2 (k-axis grouping is float only, without bias)",
           describe(v))
  if opts.act_type:
    fail("act_type", "0 with group_type=2", opts.act_type)
  require(len(xs) == 1, "x", "a single [m, k] array with group_type=2", f"{len(xs)} arrays")
  x = asarray(xs[0])
  require(x.ndim == 2, "x", "[m, k] with group_type=2", describe(x))
  check_dtype("x", x, scenarios.FLOATS)
  require(group_list_type != 2, "group_list_type", "0 or 1 with group_type=2 (pairs name "
          "experts; k-groups share one weight)", group_list_type)
  k = x.shape[1]
  ws = _tensor_list(weight, "weight")
  # One weight: its k is x's; a list's k ranges come from ND shapes (NZ pads them).
  one_k = k if len(ws) == 1 else None
  parts = [_float_weight(w if w.ndim in (3, 5) else w[None], k=one_k, n=None,
                         name="weight")[0] for w in ws]
  for w in parts:
    require(w.shape[0] == 1, "weight", "one [k, n] weight per list entry with group_type=2",
            describe(w))
  parts = [w[0] for w in parts]
  w = parts[0] if len(parts) == 1 else jnp.concatenate(parts)
  if group_list is None:
    require(len(parts) > 1, "group_list", "a group list over k with group_type=2", None)
    group_list, group_list_type = [p.shape[0] for p in parts], 1
  require(w.shape[0] == k, "weight", f"k={k} rows in all (the k of x {describe(x)})",
          describe(w))
  require(w.dtype == x.dtype, "weight", f"the dtype of x ({x.dtype.name})", describe(w),
          TypeError)
  scenarios.check_output_dtype(opts.output_dtype, (np.dtype(x.dtype),))
  # k-groups share one weight: as many groups as the list has entries
  num = (len(group_list) if groups_lib.is_static(group_list) else
         group_list.shape[0] if getattr(group_list, "ndim", 0) >= 1 else 1)
  ends = groups_lib.group_ends(group_list, group_list_type=group_list_type, m=k,
                               num_groups=max(num, 1))
  _check_group_count(len(ends))
  # [E, m, n] = per k-group, (x^T)[K_i]^T @ W[K_i]: tgmm over the rows of x^T and W.
  y = grouped_lib.differentiable_tgmm(x.T, w, ends, num_groups=len(ends), out_dtype=x.dtype,
                                      **opts.run(_block_sizes(k, len(ends), opts)))
  return [y] if split_item in (2, 3) else list(y)


def _block_sizes(rows, groups, opts):
  return row_blocks.GmmBlockSizes.for_problem(rows, groups, opts.expected_tokens)


# --- one grouped problem: canonical operands, then one scenario ----------------------------

def _n_hint(w, params) -> int | None:
  """Logical n of an NZ weight: from a per-channel parameter, as torch_npu infers it."""
  if w.ndim != 5:
    return None
  for name in ("scale", "antiquant_scale", "bias"):
    p = params.get(name)
    if p is not None and p.shape[-1] > 1:
      return int(p.shape[-1])
  packed = np.dtype(w.dtype) == scenarios.I32
  return w.shape[1] * layouts.nz_c0(w.dtype) * (layouts.INT4_PER_INT32 if packed else 1)


def _float_weight(w, *, k, n, name):
  """float ND [E, k, n] or NZ [E, n1, k1, 16, c0] -> (ND [E, k, n], n)."""
  check_dtype(name, w, scenarios.FLOATS)
  # else the group list would be blamed ("between 1 and 0 entries") for no experts
  require(w.ndim < 1 or w.shape[0] >= 1, name, "at least one expert (E >= 1)", describe(w))
  if w.ndim == 3:
    if k is not None:
      require(w.shape[1] == k, name, f"[E, k={k}, n] (k of x)", describe(w))
    return w, w.shape[-1]
  require(w.ndim == 5, name, "rank 3 (ND [E, k, n]) or rank 5 (FRACTAL_NZ), or a list of "
          "rank-2/4 arrays", describe(w))
  c0 = layouts.nz_c0(w.dtype)
  k = w.shape[2] * layouts.NZ_ROWS if k is None else k
  n = w.shape[1] * c0 if n is None else n
  want = layouts.nz_shape((w.shape[0], k, n), w.dtype)
  require(tuple(w.shape) == want, name, f"FRACTAL_NZ storage {list(want)} for a logical "
          f"weight [E, {k}, {n}]", describe(w))
  return layouts.from_nz(w, k, n), n


def _grouped(x, w, params, pts, group_list, group_list_type, opts):
  """x [m, k] against stacked weights w [E, ...] -> (y [m, n], ends)."""
  check_array("x", x)
  check_array("weight", w)
  scenario = scenarios.scenario_of(x, w)
  if params["offset"] is not None:
    if scenario == A8W4:
      raise NotImplementedError("npu_grouped_matmul: A8W4 asymmetric quantization (offset) "
                                "is planned; semantics B.4.3 leaves the use of offset open")
    fail("offset", "None (torch_npu: reserved; int8 output takes the offset from int64 "
         "scale words)", describe(params["offset"]))
  if scenario in (scenarios.FLOAT, scenarios.ANTIQUANT):
    xv, k = asarray(x), x.shape[1]
  else:
    xv = operands.canonical_lhs(x).values
    k = xv.shape[1]
  m = xv.shape[0]
  n = _n_hint(w, params)
  if scenario == scenarios.FLOAT:
    wv, n = _float_weight(w, k=k, n=n, name="weight")
  else:
    require(w.ndim in (3, 5), "weight", "rank 3 (ND [E, k, n]) or rank 5 (FRACTAL_NZ), or a "
            "list of rank-2/4 arrays", describe(w))
    if n is None:
      n = w.shape[-1] * (layouts.INT4_PER_INT32 if np.dtype(w.dtype) == scenarios.I32 else 1)
      require(w.shape[1] == k, "weight", f"[E, k={k}, n] (k of x {describe(x)})", describe(w))
    iw = operands.canonical_weight(w, k=k, n=n)
    wv = iw.values.astype(jnp.int8)  # the XLA dots here take int8
  e = wv.shape[0]
  if scenario == A8W4:
    group_list_type = 1  # the A8W4 kernel reads counts whatever group_list_type says
    require(groups_lib.is_static(group_list) or getattr(group_list, "ndim", 1) == 1,
            "group_list", "counts [E] (A8W4 reads the group list as counts)",
            describe(group_list))
  if group_list_type == groups_lib.PAIRS:
    ends, experts = groups_lib.group_segments(group_list, m=m, num_groups=e)
  else:
    ends = groups_lib.group_ends(group_list, group_list_type=group_list_type, m=m,
                                 num_groups=e)
    experts = None
  _check_group_count(len(ends))
  prep = scenarios.PREPARE[scenario](xv, wv, params, pts, m=m, k=k, n=n, e=e, opts=opts,
                            int4_weight=np.dtype(w.dtype) in (scenarios.I32, scenarios.I4))
  if experts is not None:  # (expert, size) pairs: segment r uses expert experts[r]
    ids = jnp.asarray(experts, jnp.int32)
    prep = prep._replace(w=jnp.take(prep.w, ids, axis=0),
                         per_group={k_: jnp.take(v, ids, axis=0)
                                    for k_, v in prep.per_group.items()})
  gid = groups_lib.row_group_ids(ends, m)  # len(ends) for rows outside every group
  y = scenarios.COMPUTE[scenario](prep, ends, gid, gid < len(ends), opts,
                         _block_sizes(m, len(ends), opts))
  return y, ends


