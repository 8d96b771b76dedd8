"""group_list canonicalization, clamping (semantics A.3 item 7) and checkify reporting."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import checkify

import npu_ops
from npu_ops._src import groups


def ends_ref(gl, group_list_type, m):
  """The documented clamping rules, in plain Python."""
  out, run = [], 0
  for v in gl:
    run = max(run, min(max(v, 0), m)) if group_list_type == 0 else min(run + max(v, 0), m)
    out.append(run)
  return out


@pytest.mark.parametrize("gl,t", [([0, 3, 3, 9], 0), ([0, 3, 0, 6], 1), ([5], 0), ([10], 1)])
def test_static_and_dynamic_agree(gl, t):
  static = groups.group_ends(gl, group_list_type=t, m=10, num_groups=4)
  dynamic = groups.group_ends(np.asarray(gl, np.int64), group_list_type=t, m=10, num_groups=4)
  assert isinstance(static, tuple)
  np.testing.assert_array_equal(dynamic, static)
  np.testing.assert_array_equal(static, ends_ref(gl, t, 10))


def test_pairs_example_of_spec_cumsum_equals_count():
  cumsum = [123, 123, 456, 456, 456, 789, 789, 789, 789]
  count = [123, 0, 333, 0, 0, 333, 0, 0, 0]
  a = groups.group_ends(cumsum, group_list_type=0, m=800, num_groups=9)
  b = groups.group_ends(jnp.asarray(count), group_list_type=1, m=800, num_groups=9)
  np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("gl,t", [([4, -2, 7], 1), ([4, 2, 7], 0), ([8, 9, 2**30], 1),
                                  ([-3, 12, 5], 0), ([2**30, 3, 1], 0)])
def test_dynamic_invalid_values_are_clamped(gl, t):
  # traced values are clamped (semantics A.3 item 7); known ones raise like a static list
  got = jax.jit(lambda g: groups.group_ends(g, group_list_type=t, m=10, num_groups=3))(
      jnp.asarray(gl, jnp.int32))
  np.testing.assert_array_equal(got, ends_ref([min(v, 11) for v in gl], t, 10))
  for concrete in (np.asarray(gl, np.int64), jnp.asarray(gl, jnp.int32)):
    with pytest.raises(ValueError, match="group_list"):
      groups.group_ends(concrete, group_list_type=t, m=10, num_groups=3)


@pytest.mark.parametrize("gl,t,valid", [([1, 2, 3], 1, True), ([1, -2, 3], 1, False),
                                        ([4, 3, 9], 0, False), ([4, 6, 11], 0, False),
                                        ([6, 6, 0], 1, False), ([0, 0, 10], 0, True)])
def test_checkify_reports_invalid_group_list(gl, t, valid):
  x = jnp.ones((10, 8), jnp.float32)
  w = jnp.ones((3, 8, 4), jnp.float32)
  f = jax.jit(checkify.checkify(lambda g: npu_ops.grouped_matmul(x, w, g) if t == 1 else
                                npu_ops.check_group_list(g, 10, t)))
  with npu_ops.debug_checks():
    err, _ = f(jnp.asarray(gl))
  assert (err.get() is None) == valid, err.get()
  if t == 1:  # off (the default), the op checks nothing: the same jit traces again
    err, _ = f(jnp.asarray(gl))
    assert err.get() is None


@pytest.mark.parametrize("gl,t,match", [([1, -2], 1, "non-negative"), ([3, 2], 0, "non-decreasing"),
                                        ([5, 6], 1, "m=10"), ([1, 2, 3, 4, 5], 1, "experts"),
                                        ([], 1, "experts"), ([1.5], 1, "ints")])
def test_static_errors(gl, t, match):
  with pytest.raises((ValueError, TypeError), match=match):
    groups.group_ends(gl, group_list_type=t, m=10, num_groups=4)


def test_dynamic_errors():
  with pytest.raises(TypeError, match="integer"):
    groups.group_ends(jnp.ones(3), group_list_type=0, m=10, num_groups=4)
  with pytest.raises(ValueError, match="1-D"):
    groups.group_ends(jnp.ones((2, 2), jnp.int32), group_list_type=0, m=10, num_groups=4)
  with pytest.raises(ValueError, match="group_list_type"):
    groups.group_ends([1], group_list_type=2, m=10, num_groups=4)


@pytest.mark.parametrize("m", [40, 2**30 + 5])  # the second: partial sums past int32
def test_dynamic_counts_saturate_at_m_without_overflow(m):
  """Counts become ends clamped to m; where e * m could overflow int32, a saturating scan
  keeps every partial sum <= m (against Python's unbounded integers)."""
  counts = np.array([m // 2, m // 2 + 3, 7, m], np.int32)
  got = jax.jit(lambda c: groups.group_ends(c, group_list_type=1, m=m, num_groups=4))(counts)
  want = np.minimum(np.cumsum(np.clip(counts.astype(object), 0, m)), m).astype(np.int64)
  np.testing.assert_array_equal(np.asarray(got, np.int64), want)
