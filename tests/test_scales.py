"""Scale words (semantics A.2, B.0.4 item 2): float32 bits in the low word, every carrier."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import npu_ops
import numpy_reference as ref

SCALES = np.array([[1.0, -2.5e-3, 3.0e-38, 65504.0], [np.pi, -0.0, 1e-45, 7.0]], np.float32)


def test_numpy_int64_and_uint64_words_with_x64_off():
  words = ref.float32_to_word(SCALES) | (np.int64(1) << 46)  # high bits are ignored
  for w in (words, words.view(np.uint64)):
    got = npu_ops.float32_from_scale_words(w, "s")
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), SCALES.view(np.uint32))


def test_int32_low_words_and_floats():
  low = SCALES.view(np.int32)
  np.testing.assert_array_equal(np.asarray(npu_ops.float32_from_scale_words(low, "s")), SCALES)
  got = npu_ops.float32_from_scale_words(jnp.asarray(SCALES, jnp.bfloat16), "s")
  assert got.dtype == jnp.float32


def test_jax_int64_words_with_x64_on():
  words = ref.float32_to_word(SCALES)
  with jax.enable_x64(True):
    got = npu_ops.float32_from_scale_words(jnp.asarray(words), "s")
    np.testing.assert_array_equal(np.asarray(got).view(np.uint32), SCALES.view(np.uint32))


def test_bad_scale_dtype():
  with pytest.raises(TypeError, match="weight_scale"):
    npu_ops.float32_from_scale_words(np.ones(3, np.int16), "weight_scale")
