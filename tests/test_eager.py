"""Called eagerly (outside jit), each op runs as one compiled program, not op by op: op by op,
the first call of a quantizer compiled dozens of small programs (1.4-2.7 s for
`quantize_per_token`, `dynamic_fake_quant`, `fake_quant_weight`, the MX quantizers; 5.3 s for
`fake_quant_gmm_swiglu_quant`; the fused op on MX inputs 86, the MoE layer 37;
docs/performance.md, "Compile time"). Counted, not timed: the
programs JAX lowers during one call. The shapes are this file's own, so no other test's
programs are in JAX's caches."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import npu_ops
from npu_ops import moe, recipes

M, K, N, E = 37, 72, 46, 3
rng = np.random.default_rng(0)
ARRAYS = dict(x=rng.normal(size=(M, K)).astype(np.float32),
              w=rng.normal(size=(E, K, N)).astype(np.float32),
              ws=rng.uniform(0.01, 0.1, (E, N)).astype(np.float32),
              x8=rng.integers(-127, 128, (M, K)).astype(np.int8),
              w8=rng.integers(-127, 128, (E, K, N)).astype(np.int8),
              xs=rng.uniform(0.01, 0.1, (M,)).astype(np.float32),
              dy=rng.normal(size=(M, N)).astype(np.float32),
              counts=np.asarray([10, 0, 20], np.int32),
              ends=np.asarray([10, 10, 30], np.int64),
              # MX inputs: fp8 values, e8m0 scales per pair of 32-wide blocks along k
              xf8=rng.normal(size=(M, K)).astype(ml_dtypes.float8_e4m3fn),
              wf8=rng.normal(size=(E, K, N)).astype(ml_dtypes.float8_e4m3fn),
              xmx=np.full((M, 2, 2), 1.0, ml_dtypes.float8_e8m0fnu),
              wmx=np.full((E, 2, N, 2), 0.5, ml_dtypes.float8_e8m0fnu),
              router=rng.normal(size=(K, E)).astype(np.float32),
              w_gate_up=rng.normal(size=(E, K, 16)).astype(np.float32),
              w_down=rng.normal(size=(E, 8, K)).astype(np.float32),
              logits=rng.normal(size=(M, E)).astype(np.float32),
              y_sorted=rng.normal(size=(2 * M, 5)).astype(np.float32),
              w2=rng.integers(-127, 128, (K, N)).astype(np.int8),
              w4=rng.integers(-8, 8, (K, 48)).astype(np.int32))

# (name, call, programs): the group list of a grouped op is checked and turned into ends by
# a program of its own, v2's facade lays out the weight scale by one more (a reshape), and
# on MX inputs the two scales (bitcasts); dequantize_mx's call quantizes first, a
# recipe's weight codes take its initial scale first; npu_grouped_matmul finds the rows'
# groups by one more, and its scenario's product (a grouped matmul) is a program of its own;
# from_nz's input is made by npu_format_cast.
CALLS = [
    ("quantize_per_token", lambda a: npu_ops.quantize_per_token(a["x"]), 1),
    ("swiglu", lambda a: npu_ops.swiglu(a["x"]), 1),
    ("quantize_mx", lambda a: npu_ops.quantize_mx(a["x"]), 1),
    ("dequantize_mx", lambda a: npu_ops.dequantize_mx(*npu_ops.quantize_mx(a["x"])), 2),
    ("fake_quant", lambda a: npu_ops.fake_quant(a["x"], np.float32(0.1)), 1),
    ("dynamic_fake_quant", lambda a: npu_ops.dynamic_fake_quant(a["x"]), 1),
    ("fake_quant_mx", lambda a: npu_ops.fake_quant_mx(a["x"]), 1),
    ("fake_quant_weight", lambda a: npu_ops.fake_quant_weight(a["w"], a["ws"]), 1),
    ("quantize_weight", lambda a: npu_ops.quantize_weight(a["w"], a["ws"]), 1),
    ("weight_scale_from_amax", lambda a: npu_ops.weight_scale_from_amax(a["w"]), 1),
    ("fake_quant_gmm_swiglu_quant", lambda a: npu_ops.fake_quant_gmm_swiglu_quant(
        a["x"], a["w"], a["ws"], a["counts"], group_list_type=1), 2),
    ("grouped_matmul", lambda a: npu_ops.grouped_matmul(a["x"], a["w"], a["counts"]), 2),
    ("tgmm", lambda a: npu_ops.tgmm(a["x"], a["dy"], a["counts"]), 2),
    ("npu_grouped_matmul_swiglu_quant_v2", lambda a: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
        a["x8"], a["w8"], a["ws"], a["xs"], a["counts"], group_list_type=1), 3),
    ("v2 reference", lambda a: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
        a["x8"], a["w8"], a["ws"], a["xs"], a["counts"], group_list_type=1,
        implementation="reference"), 3),
    ("v2 MX inputs", lambda a: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
        a["xf8"], a["wf8"], a["wmx"], a["xmx"], a["counts"], group_list_type=1,
        dequant_mode=2), 4),
    ("moe_mlp", lambda a: moe.moe_mlp(a["x"], moe.MoEWeights(
        a["router"], a["w_gate_up"], a["w_down"], None, None), top_k=2), 1),
    ("MoE routing, dispatch and combine", lambda a: (lambda gates, experts: npu_ops.combine(
        a["y_sorted"], npu_ops.dispatch(experts, E), gates))(
            *npu_ops.top_k_routing(a["logits"], 2)), 3),
    ("npu_format_cast", lambda a: npu_ops.npu_format_cast(a["w2"], npu_ops.FORMAT_NZ), 1),
    ("from_nz", lambda a: npu_ops.from_nz(npu_ops.npu_format_cast(a["w2"], npu_ops.FORMAT_NZ),
                                          K, N), 2),
    ("npu_convert_weight_to_int4pack", lambda a: npu_ops.npu_convert_weight_to_int4pack(
        a["w4"]), 1),
    ("npu_grouped_matmul", lambda a: npu_ops.npu_grouped_matmul(
        [a["x"]], [a["w"]], group_list=a["ends"], split_item=3, group_type=0), 4),
    ("recipe activation codes", lambda a: recipes.get("w8a8").quantize_activation(a["x"]), 1),
    ("recipe weight codes", lambda a: recipes.get("fp8").quantize_weight(
        a["w"], recipes.get("fp8").initial_weight_scale(a["w"])), 2),
]


def lowered_by(call):
  """(call(), the programs JAX lowered while it ran)."""
  lowered = []

  def listen(event, duration, **kw):
    del duration, kw
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
      lowered.append(event)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    return jax.block_until_ready(call()), len(lowered)
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)


@pytest.mark.parametrize("inputs", ["jax", "numpy"])
@pytest.mark.parametrize("name,call,programs", CALLS, ids=[c[0] for c in CALLS])
def test_an_eager_call_is_one_program(name, call, programs, inputs):
  """With jax.Arrays, and with the NumPy arrays users often pass: a NumPy operand moves to
  the device without a program of its own (`jnp.asarray` of one compiled an identity
  program per shape and dtype: the fused op lowered 5 programs, not 2). JAX's caches are
  cleared first, so every program the call needs is counted, whatever ran before."""
  arrays = ARRAYS if inputs == "numpy" else {k: jnp.asarray(v) for k, v in ARRAYS.items()}
  jax.clear_caches()
  _, lowered = lowered_by(lambda: call(arrays))
  assert 1 <= lowered <= programs, (name, lowered)


def test_an_eager_kernel_call_is_one_program_per_chip():
  """A TPU kernel in interpret mode takes its tiles and cores from the chip set when it is
  traced (`tpu_tiles.CHIP`: the v5p's two TensorCores split the visits), so an eager call's
  program is one per chip: the same call under another chip lowers again, under the first
  one again it does not."""
  from pallas_kernels import tpu_tiles  # noqa: PLC0415
  a = {k: jnp.asarray(v) for k, v in ARRAYS.items()}
  call = lambda: npu_ops.npu_grouped_matmul_swiglu_quant_v2(
      a["x8"][:, :64], a["w8"][:, :64, :32], a["ws"][:, :32], a["xs"], a["counts"],
      group_list_type=1, implementation="pallas_tpu", interpret=True)
  counts, results = [], []
  for chip in ("v5e", "v5p", "v5e"):
    token = tpu_tiles.CHIP.set(chip)
    try:
      result, lowered = lowered_by(call)
    finally:
      tpu_tiles.CHIP.reset(token)
    results.append(result)
    counts.append(lowered)
  assert counts[0] >= 1 and counts[1] >= 1 and counts[2] == 0, counts
  for q, s in results[1:]:  # the same values on one core and on two
    np.testing.assert_array_equal(q, results[0][0])
    np.testing.assert_array_equal(s, results[0][1])
