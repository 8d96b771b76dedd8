"""Token routing for MoE layers: top-k gating, sort by expert, un-sort and combine.

The grouped ops want the rows of each expert contiguous. `dispatch` sorts the
`T * k` (token, slot) pairs by expert (stably, so the order inside an expert is
token order) and returns the counts as a dynamic group list: one compilation
serves every routing. `combine` undoes the sort with a gather (not a scatter)
and sums each token's k expert outputs with its gate weights.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from npu_ops._validation import check_rank, describe, require


class Dispatch(NamedTuple):
  """Where each (token, slot) pair went. All int32; `T` tokens, `k` slots, `e` experts.

  Attributes:
    token_index: `[T*k]` token of each sorted row (gather x with it).
    unsort: `[T*k]` sorted row of each flat (token, slot) pair.
    group_sizes: `[e]` rows per expert, in sorted order (a count group list).
  """
  token_index: jax.Array
  unsort: jax.Array
  group_sizes: jax.Array


def top_k_routing(logits: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Softmax gate, top-k experts per token, weights renormalized to sum to 1.

  Args:
    logits: float `[T, e]`.
    k: experts per token, `1 <= k <= e`.

  Returns:
    (weights float32 `[T, k]`, experts int32 `[T, k]`). Gradients flow to the
    logits through the weights.
  """
  check_rank("logits", logits, 2)
  e = logits.shape[1]
  require(isinstance(k, int) and 1 <= k <= e, "k", f"an int in [1, e={e}]", repr(k))
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, experts = jax.lax.top_k(probs, k)
  return weights / jnp.sum(weights, axis=-1, keepdims=True), experts.astype(jnp.int32)


def dispatch(experts: jax.Array, num_experts: int) -> Dispatch:
  """Sorts the (token, slot) pairs of `experts [T, k]` by expert."""
  check_rank("experts", experts, 2)
  t, k = experts.shape
  flat = experts.reshape(-1)
  order = jnp.argsort(flat, stable=True).astype(jnp.int32)
  unsort = jnp.zeros_like(order).at[order].set(jnp.arange(t * k, dtype=jnp.int32))
  sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
  return Dispatch(token_index=order // k, unsort=unsort, group_sizes=sizes)


def combine(y_sorted: jax.Array, routing: Dispatch, weights: jax.Array) -> jax.Array:
  """`out[t] = sum_j weights[t, j] * y[row of (t, j)]`: `[T*k, d]` -> `[T, d]`."""
  check_rank("weights", weights, 2)
  t, k = weights.shape
  require(y_sorted.ndim == 2 and y_sorted.shape[0] == t * k, "y_sorted",
          f"[T*k={t * k}, d]", describe(y_sorted))
  y = y_sorted[routing.unsort].reshape(t, k, y_sorted.shape[1])
  return jnp.einsum("tk,tkd->td", weights.astype(y.dtype), y)

