"""Quantization recipes of the MoE layer: the formats of its expert weights and activations.

A recipe says what each of the experts' two grouped matmuls reads: the weights (gate/up
`[e, d, 2f]`, down `[e, f, d]`) and the activations entering them (the tokens, and the
SwiGLU output h):

| recipe | weights | activations |
|---|---|---|
| "w8a8" | int8, per channel | int8, per token |
| "w4a8" | int4, per group of 32 rows of k | int8, per token |
| "w4a4" | int4, per channel | int4, per token |
| "fp8" | float8_e4m3fn, per channel | float8_e4m3fn, per token |
| "mxfp4" | MX fp4: blocks of 32 along k, e8m0 scales | MX fp4, blocks of 32 |

Each has two forms, which compute the same numbers up to float rounding:

* QAT (`fake_weight`, `fake_activation`): float values on the recipe's grid, with the STE /
  LSQ gradients of `npu_ops._src.qat` (weight scales are learned, except MX's powers of two);
* deployment (`quantize_weight`, `quantize_activation`, `codes_matmul`): the codes and
  scales themselves, multiplied exactly (int32 for integer codes; fp8 and fp4 codes are
  exact in bfloat16, their products exact in float32, summed in float32) and dequantized.

Weights keep the `[e, k, n]` layout in every format; their scales are `[e, n]` (per
channel), `[e, G, n]` (per group of k/G rows) or, for MX, e8m0 `[e, k/32, n]` (a block of
32 rows of k per scale: the per-group layout).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from npu_ops._src import grouped as grouped_lib
from npu_ops._src import groups
from npu_ops._src import qat
from npu_ops._src import quant
from npu_ops._src.validation import (check_array, check_choice, check_float_array, check_rank,
                                     describe, fail, require)
from pallas_kernels import epilogue

_FP8 = np.dtype(jnp.float8_e4m3fn)
_FP4 = np.dtype(jnp.float4_e2m1fn)
_MX_BLOCK = epilogue.MX_BLOCK
FORMATS = ("int8", "int4", "fp8", "mxfp4")  # of weights and activations


# A method that runs as one compiled program (the recipe static): called eagerly, op by op,
# its scale arithmetic compiled dozens of small programs on the first call.
_one_program = functools.partial(jax.jit, static_argnums=0)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """One quantization recipe (see the module docstring).

  Attributes:
    name: its name in `RECIPES`.
    weights, activations: "int8", "int4", "fp8" (float8_e4m3fn) or "mxfp4"; integer
      formats pair with each other, fp8 and mxfp4 with themselves (the deployed products).
    weight_group: rows of k sharing a weight scale (0: one scale per output channel;
      integer weights only).
  """
  name: str
  weights: str
  activations: str
  weight_group: int = 0

  def __post_init__(self):
    if not isinstance(self.name, str):
      fail("name", "a str", repr(self.name), TypeError)
    for field in ("weights", "activations"):
      check_choice(field, getattr(self, field), FORMATS)
    if (isinstance(self.weight_group, bool) or not isinstance(self.weight_group, int)
        or self.weight_group < 0):
      fail("weight_group", "an int >= 0 (0: one scale per output channel)",
           repr(self.weight_group))
    integer = ("int8", "int4")
    if not ((self.weights in integer and self.activations in integer)
            or self.weights == self.activations):
      fail("activations", f"a format that pairs with {self.weights!r} weights (int8 / int4 "
           "with int8 / int4; fp8 with fp8; mxfp4 with mxfp4)", repr(self.activations))
    if self.weight_group and self.weights not in integer:
      fail("weight_group", f"0 with {self.weights!r} weights (fp8: per channel; mxfp4: its "
           "blocks of 32)", repr(self.weight_group))

  @property
  def learned_scales(self) -> bool:
    """Whether QAT learns the weight scales (LSQ); MX block scales are set by each
    block's largest exponent."""
    return self.weights != "mxfp4"

  @property
  def code_dtype(self) -> np.dtype:
    """The dtype of the deployed weight codes (int4 values are held in int8)."""
    return {"fp8": _FP8, "mxfp4": _FP4}.get(self.weights, np.dtype(np.int8))

  def scale_groups(self, k: int) -> int:
    """Weight scales along k: 1 (per channel), k / weight_group, or k / 32 (MX)."""
    rows = _MX_BLOCK if self.weights == "mxfp4" else self.weight_group
    if not rows:
      return 1
    if k % rows:
      fail("recipe", f"a k divisible by {rows} for {self.name!r}", f"k={k}")
    return k // rows

  def scale_shape(self, e: int, k: int, n: int) -> tuple[int, ...]:
    """The shape of a `[e, k, n]` weight's scales."""
    g = self.scale_groups(k)
    return (e, n) if g == 1 and self.weights != "mxfp4" else (e, g, n)

  # --- QAT ---------------------------------------------------------------------------

  @_one_program
  def initial_weight_scale(self, w: jax.Array) -> jax.Array | None:
    """The step sizes QAT starts from (amax / largest code), or None for MX."""
    if self.weights == "mxfp4":
      return None
    if self.weights == "fp8":
      _check_weight(w)
      amax = epilogue.row_amax(w, axis=1)[:, 0]
      return jnp.where(epilogue.exceeds_zero(amax), epilogue.scale_for_amax(amax, _fp8_max()),
                       1.0)
    return qat.weight_scale_from_amax(w, groups=self.scale_groups(w.shape[1]),
                                      bits=_bits(self.weights))

  def fake_weight(self, w: jax.Array, scale: jax.Array | None,
                  grad_scale: float | None = None) -> jax.Array:
    """`w [e, k, n]` on the recipe's grid (LSQ gradients for `scale`; MX: STE)."""
    if self.weights == "mxfp4":
      return qat.fake_quant_mx(jnp.swapaxes(w, 1, 2), _FP4).swapaxes(1, 2)
    if self.weights == "fp8":
      return qat.fake_quant(w, _channel_scale(w, scale)[:, None, :], dtype=_FP8,
                            grad_scale=grad_scale)
    return qat.fake_quant_weight(w, scale, bits=_bits(self.weights), grad_scale=grad_scale)

  def fake_activation(self, x: jax.Array) -> jax.Array:
    """`x [rows, k]` on the recipe's activation grid (per token, or MX blocks)."""
    if self.activations == "mxfp4":
      return qat.fake_quant_mx(x, _FP4)
    if self.activations == "fp8":
      return qat.dynamic_fake_quant(x, dtype=_FP8)
    return qat.dynamic_fake_quant(x, bits=_bits(self.activations))

  # --- deployment --------------------------------------------------------------------

  @_one_program
  def quantize_weight(self, w: jax.Array, scale: jax.Array | None
                      ) -> tuple[jax.Array, jax.Array]:
    """(codes `[e, k, n]` of `code_dtype`, scales): the deployed form of `fake_weight`."""
    if self.weights == "mxfp4":
      codes, scales = quant.quantize_mx(jnp.swapaxes(w, 1, 2).astype(jnp.float32), _FP4)
      return codes.swapaxes(1, 2), scales.swapaxes(1, 2)
    if self.weights == "fp8":
      return qat.quantize(w, _channel_scale(w, scale)[:, None, :], dtype=_FP8), scale
    return qat.quantize_weight(w, scale, bits=_bits(self.weights)), scale

  @_one_program
  def quantize_activation(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(codes, scales) of `fake_activation`: per token `[rows]` float32, or MX e8m0
    `[rows, k/32]`."""
    x = x.astype(jnp.float32)
    if self.activations == "mxfp4":
      return quant.quantize_mx(x, _FP4)
    fp8 = self.activations == "fp8"
    dtype = _FP8 if fp8 else np.dtype(np.int8)
    if x.shape[-1] == 0:  # nothing to quantize: amax 0, scale 0 (as quantize_per_token)
      return jnp.zeros(x.shape, dtype), jnp.zeros(x.shape[:-1], jnp.float32)
    # subnormal values read exactly, as fake_activation (dynamic_fake_quant) reads them
    codes, scale = epilogue.quantize_rows(
        x, qmax=_fp8_max() if fp8 else qat.qmax_for(_bits(self.activations)), dtype=dtype,
        exact_subnormals=True)
    return codes, scale[..., 0]

  def codes_matmul(self, x_codes: jax.Array, x_scale: jax.Array, w_codes: jax.Array,
                   w_scale: jax.Array, sizes: jax.Array, expert: jax.Array) -> jax.Array:
    """The dequantized grouped product of activation and weight codes: float32
    `[rows, n]` (`sizes`: rows per expert; `expert`: each row's expert)."""
    if self.activations == "mxfp4":  # MX scales vary along k: dequantize (exact in bf16)
      x = quant.dequantize_mx(x_codes, x_scale, jnp.bfloat16)
      w = quant.dequantize_mx(w_codes.swapaxes(1, 2), w_scale.swapaxes(1, 2),
                              jnp.bfloat16).swapaxes(1, 2)
      return grouped_lib.grouped_matmul(x, w, sizes, preferred_element_type=jnp.float32)
    if self.weights == "fp8":
      acc = grouped_lib.grouped_matmul(x_codes.astype(jnp.bfloat16),
                                       w_codes.astype(jnp.bfloat16), sizes,
                                       preferred_element_type=jnp.float32)
      return acc * groups.per_row(w_scale, expert) * x_scale[:, None]
    g = self.scale_groups(w_codes.shape[1])
    if w_scale.ndim == 2:  # per channel: one exact int32 product
      acc = grouped_lib.grouped_matmul(x_codes, w_codes, sizes).astype(jnp.float32)
      return acc * groups.per_row(w_scale, expert) * x_scale[:, None]
    rows = w_codes.shape[1] // g  # per group: each group's exact product, dequantized
    out = 0.0
    for j in range(g):
      part = grouped_lib.grouped_matmul(x_codes[:, j * rows:(j + 1) * rows],
                                        w_codes[:, j * rows:(j + 1) * rows], sizes)
      out = out + part.astype(jnp.float32) * groups.per_row(w_scale[:, j], expert)
    return out * x_scale[:, None]


def _check_weight(w) -> None:
  check_float_array("weight", w)
  check_rank("weight", w, 3)
  require(w.shape[1] >= 1, "weight", "[e, k, n] with k >= 1", describe(w))


def _channel_scale(w, scale) -> jax.Array:
  """fp8's per-channel step sizes `[e, n]` of a weight `[e, k, n]`, checked."""
  _check_weight(w)
  check_array("weight_scale", scale)
  want = (w.shape[0], w.shape[2])
  require(tuple(scale.shape) == want, "weight_scale", f"float [e={want[0]}, n={want[1]}] "
          "per-channel step sizes", describe(scale))
  return jnp.asarray(scale)


def _bits(fmt: str) -> int:
  return 4 if fmt == "int4" else 8


def _fp8_max() -> float:
  return float(jnp.finfo(_FP8).max)


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("w8a8", "int8", "int8"),
    Recipe("w4a8", "int4", "int8", weight_group=32),
    Recipe("w4a4", "int4", "int4"),
    Recipe("fp8", "fp8", "fp8"),
    Recipe("mxfp4", "mxfp4", "mxfp4"),
)}


def get(name: str | Recipe) -> Recipe:
  """A recipe by name (`RECIPES`), or the Recipe itself."""
  if isinstance(name, Recipe):
    return name
  return RECIPES[check_choice("recipe", name, tuple(sorted(RECIPES)))]
