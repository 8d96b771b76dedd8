"""int4 words and FRACTAL_NZ against the index formulas of semantics B.0.3 / B.5."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import npu_ops
import numpy_reference as ref

NZ_DTYPES = [np.int8, np.float16, ml_dtypes.bfloat16, np.float32, np.int32, ml_dtypes.int4]


def random_values(rng, shape, dtype):
  if np.dtype(dtype) == np.dtype(ml_dtypes.int4):
    return rng.integers(-8, 8, shape).astype(np.int8).astype(ml_dtypes.int4)
  if np.issubdtype(np.dtype(dtype), np.integer):
    return rng.integers(-100, 100, shape).astype(dtype)
  return rng.normal(size=shape).astype(dtype)


def test_unpack_all_nibbles():
  values = np.arange(-8, 8).reshape(2, 8)  # all 16 int4 values
  words = ref.pack_int4(values)
  np.testing.assert_array_equal(npu_ops.unpack_int4(jnp.asarray(words)), values)
  np.testing.assert_array_equal(npu_ops.pack_int4(jnp.asarray(values)), words)


def test_pack_layout_is_lsb_first():
  values = np.array([[1, 2, 3, 4, 5, 6, 7, -1]])
  assert npu_ops.pack_int4(jnp.asarray(values))[0, 0] == np.int32(np.uint32(0xF7654321).view(np.int32))


def test_int4_round_trip_random():
  rng = np.random.default_rng(0)
  v = rng.integers(-8, 8, (3, 5, 64))
  np.testing.assert_array_equal(npu_ops.unpack_int4(npu_ops.pack_int4(jnp.asarray(v))), v)
  np.testing.assert_array_equal(npu_ops.unpack_int4(jnp.asarray(ref.pack_int4(v))),
                                ref.unpack_int4(ref.pack_int4(v)))


@pytest.mark.parametrize("dtype", NZ_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(32, 64), (3, 20, 70), (2, 1, 17, 5)])
def test_nz_matches_index_formula(dtype, shape):
  rng = np.random.default_rng(1)
  a = random_values(rng, shape, dtype)
  want = ref.nd_to_nz(a, ref.c0_of(dtype))
  got = npu_ops.npu_format_cast(jnp.asarray(a), 29)
  assert got.dtype == a.dtype and got.shape == want.shape
  np.testing.assert_array_equal(np.asarray(got).astype(np.float64), want.astype(np.float64))
  back = npu_ops.npu_format_cast(got, 2, shape=shape)
  np.testing.assert_array_equal(np.asarray(back).astype(np.float64), a.astype(np.float64))


def test_nz_storage_shapes_of_spec():
  w = jnp.zeros((4, 7168, 4096), jnp.int8)
  assert jax.eval_shape(lambda w: npu_ops.to_nz(w), w).shape == (4, 128, 448, 16, 32)
  w16 = jax.ShapeDtypeStruct((8, 100, 30), jnp.float16)
  assert jax.eval_shape(npu_ops.to_nz, w16).shape == (8, 2, 7, 16, 16)  # ATB Transdata example


def test_format_cast_errors():
  a = jnp.zeros((32, 32), jnp.int8)
  with pytest.raises(ValueError, match="acl_format"):
    npu_ops.npu_format_cast(a, 3)
  with pytest.raises(TypeError, match="shape"):
    npu_ops.npu_format_cast(npu_ops.to_nz(a), 2)
  with pytest.raises(ValueError, match="shape"):
    npu_ops.npu_format_cast(npu_ops.to_nz(a), 2, shape=(64, 32, 1))
  with pytest.raises(ValueError, match=r"NZ storage"):
    npu_ops.npu_format_cast(npu_ops.to_nz(a), 2, shape=(64, 32))
  with pytest.raises(TypeError, match="x"):
    npu_ops.npu_format_cast(jnp.zeros((4, 4), jnp.int16), 29)
  with pytest.raises(ValueError, match=r"x: expected FRACTAL_NZ storage .*got int8\[32, 32\]"):
    npu_ops.npu_format_cast(a, 2, shape=(32, 32))  # ND given: the array is to blame
  with pytest.raises(ValueError, match="rank"):
    npu_ops.npu_format_cast(jnp.zeros((4,), jnp.int8), 29)
