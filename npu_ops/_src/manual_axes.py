"""The types of values inside `jax.shard_map`: which manual mesh axes they vary over.

With `check_vma` (shard_map's default) JAX types every value as varying over some manual
axes or invariant; a loop or cond that starts from constants and folds varying operands
in, or a primitive of ours whose abstract value says nothing of them, fails its checks.
Outside shard_map no value varies and these functions change nothing.
"""

from __future__ import annotations

from typing import Any

import jax
from jax import lax

from pallas_kernels import common


varying = common.varying  # the manual axes an array varies over (the kernels' results too)


def union(*operands: Any) -> frozenset:
  """The axes any array of the pytrees `operands` varies over."""
  return frozenset().union(*map(varying, jax.tree.leaves(operands)))


def varying_as(tree: Any, *operands: Any) -> Any:
  """`tree` typed as varying over the axes that any of `operands` vary over."""
  axes = union(*operands)
  if not axes:
    return tree

  def cast(a):
    missing = tuple(sorted(axes - varying(a), key=str))
    return lax.pcast(a, missing, to="varying") if missing else a
  return jax.tree.map(cast, tree)


def shaped_array(shape: tuple[int, ...], dtype: Any, axes: frozenset) -> jax.core.ShapedArray:
  """An abstract value varying over `axes` (inside shard_map: on its manual mesh)."""
  if not axes:
    return jax.core.ShapedArray(shape, dtype)
  mat = type(jax.core.ShapedArray((), dtype).manual_axis_type)(varying=axes)
  sharding = jax.sharding.NamedSharding(jax.sharding.get_abstract_mesh(),
                                        jax.sharding.PartitionSpec())
  return jax.core.ShapedArray(shape, dtype, manual_axis_type=mat, sharding=sharding)
