"""Expert parallelism: send each routed row to the device that owns its expert, and back.

Runs inside `jax.shard_map` over a mesh axis of `D` devices (the expert axis), each
owning `e / D` consecutive experts (device `j` holds experts `[j * e/D, (j+1) * e/D)`).
A device's rows are sorted by expert (`moe.dispatch`), so the rows bound for device
`j` are one contiguous run of them.

Layout on the receiver: a buffer of `D * C` rows, source `i`'s rows at
`[i * C, i * C + n_i)` in the sender's order, zeros after them; `C` (the capacity
per source and destination, static) is at most the rows a device routes, so by
default nothing is lost. Two exchanges give that layout:
* "ragged": `jax.lax.ragged_all_to_all` sends each run as it is (the routed rows
  only). TPU and GPU; XLA:CPU (jax 0.10.2) has no ragged-all-to-all.
* "padded": each run is padded to `C` rows and `jax.lax.all_to_all` sends all
  `D * C` (any platform; `D * C` rows each way whatever the routing).
The receiver learns which of its experts each row is for from the per-expert counts
(exchanged first, a few int32 a device): rows travel without their expert ids. A
payload of several arrays (int8 codes and their scales) travels as one array of
bytes per row, so each exchange is one collective (TPU pads a collective's rows to
128 lanes: a per-row scale alone would cost 512 bytes a row). The way back sends
each source its rows' results, at the rows they left from.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.lax import ragged_all_to_all

RAGGED, PADDED = "ragged", "padded"
EXCHANGES = (RAGGED, PADDED)


class Exchange(NamedTuple):
  """The sizes and offsets of one device's exchange (int32).

  Attributes:
    send_sizes: `[D]` rows this device sends to each device.
    input_offsets: `[D]` where each device's run starts among this device's sorted rows.
    recv_counts: `[D, e/D]` rows this device receives from each device for each of
      its experts (in that order: a source's rows are sorted by expert).
    back_offsets: `[D]` where each source's run started among the source's sorted
      rows (where its results go back to).
  """
  send_sizes: jax.Array
  input_offsets: jax.Array
  recv_counts: jax.Array
  back_offsets: jax.Array

  @property
  def recv_sizes(self) -> jax.Array:
    """`[D]` rows this device receives from each device."""
    return jnp.sum(self.recv_counts, axis=1, dtype=jnp.int32)


def plan(expert_sizes: jax.Array, axis_name: str, num_devices: int) -> Exchange:
  """The exchange of rows sorted by expert, `expert_sizes [e]` rows per expert."""
  counts = expert_sizes.astype(jnp.int32).reshape(num_devices, -1)
  send = jnp.sum(counts, axis=1, dtype=jnp.int32)
  offsets = jnp.cumsum(send, dtype=jnp.int32) - send
  # One all_to_all: row j (my counts for device j's experts, my offset of its run) to j.
  got = lax.all_to_all(jnp.concatenate([counts, offsets[:, None]], axis=1), axis_name, 0, 0,
                       tiled=True)
  return Exchange(send, offsets, got[:, :-1], got[:, -1])


def received_experts(ex: Exchange, capacity: int) -> jax.Array:
  """int32 `[D * C]`: the local expert of each row of the receive buffer (e/D for
  the rows past each source's run)."""
  ends = jnp.cumsum(ex.recv_counts, axis=1, dtype=jnp.int32)
  col = jnp.arange(capacity, dtype=jnp.int32)
  find = lambda e: jnp.searchsorted(e, col, side="right").astype(jnp.int32)
  return jax.vmap(find)(ends).reshape(-1)


def keep_within_capacity(experts: jax.Array, experts_per_device: int, num_devices: int,
                         capacity: int) -> jax.Array:
  """bool, shaped like `experts`: (token, slot) pairs within the capacity of their
  destination, in token order (GShard: the earliest tokens are kept)."""
  dest = experts.reshape(-1) // experts_per_device
  onehot = (dest[:, None] == jnp.arange(num_devices, dtype=dest.dtype)[None, :]).astype(jnp.int32)
  rank = jnp.sum(jnp.cumsum(onehot, axis=0) * onehot, axis=1) - 1
  return (rank < capacity).reshape(experts.shape)


def to_owners(rows: Any, ex: Exchange, axis_name: str, capacity: int, how: str) -> Any:
  """Rows (a pytree of `[P, ...]` arrays, sorted by expert) -> each owner's buffer
  `[D * C, ...]` (zeros past each source's run). Differentiable for a single array;
  several travel as bytes (not differentiable)."""
  leaves, tree = jax.tree.flatten(rows)
  if len(leaves) > 1:
    packed, unpack = _as_bytes(leaves)
    return jax.tree.unflatten(tree, unpack(to_owners(packed, ex, axis_name, capacity, how)))
  (a,) = leaves
  num_devices = ex.send_sizes.shape[0]
  if how == RAGGED:  # my run lands at row me * C of every owner's buffer
    at = jnp.full((num_devices,), lax.axis_index(axis_name) * capacity, jnp.int32)
    out = _ragged(a, num_devices * capacity, ex.input_offsets, ex.send_sizes, at,
                  ex.recv_sizes, axis_name)
  else:
    out = _padded(_runs(a, ex.input_offsets, ex.send_sizes, capacity), axis_name)
  return jax.tree.unflatten(tree, [out])


def to_sources(results: jax.Array, ex: Exchange, axis_name: str, capacity: int, how: str,
               num_rows: int) -> jax.Array:
  """The owners' results (`[D * C, ...]`, in the receive layout) -> each source's
  `[P, ...]` in its sorted row order (zeros for rows it did not send)."""
  num_devices = ex.send_sizes.shape[0]
  if how == RAGGED:
    starts = jnp.arange(num_devices, dtype=jnp.int32) * capacity
    return _ragged(results, num_rows, starts, ex.recv_sizes, ex.back_offsets, ex.send_sizes,
                   axis_name)
  runs = _padded(results, axis_name).reshape(num_devices, capacity, *results.shape[1:])
  # Sorted row r went to device dest[r], as row r - input_offsets[dest[r]] of its run.
  r = jnp.arange(num_rows, dtype=jnp.int32)
  ends = ex.input_offsets + ex.send_sizes
  dest = jnp.minimum(jnp.searchsorted(ends, r, side="right"), num_devices - 1)
  col = r - ex.input_offsets[dest]
  sent = (r < ends[-1]) & (col < capacity)
  picked = runs[dest, jnp.clip(col, 0, capacity - 1)]
  return jnp.where(sent.reshape(sent.shape + (1,) * (results.ndim - 1)), picked,
                   jnp.zeros((), results.dtype))


def _as_bytes(leaves: list[jax.Array]):
  """(uint8 `[P, bytes]`: each row's bytes of every leaf, the inverse for `[R, bytes]`)."""
  # Sizes are spelled out, not inferred (-1): with zero rows a reshape cannot infer them.
  rows = lambda a: a.shape[0]
  cols = lambda a: math.prod(a.shape[1:])
  parts = [lax.bitcast_convert_type(a.reshape(rows(a), cols(a)), jnp.uint8)
           .reshape(rows(a), cols(a) * a.dtype.itemsize) for a in leaves]

  def unpack(packed):
    out, at = [], 0
    for a, part in zip(leaves, parts):
      piece = packed[:, at:at + part.shape[1]]
      at += part.shape[1]
      if a.dtype.itemsize > 1:
        piece = piece.reshape(rows(piece), cols(a), a.dtype.itemsize)
      out.append(lax.bitcast_convert_type(piece, a.dtype).reshape((rows(piece),) + a.shape[1:]))
    return out
  return jnp.concatenate(parts, axis=1), unpack


def _runs(a: jax.Array, starts: jax.Array, sizes: jax.Array, capacity: int) -> jax.Array:
  """`[D * C, ...]`: run `j` of `a` (rows `[starts[j], starts[j] + sizes[j])`) at rows
  `[j * C, j * C + sizes[j])`, zeros after it."""
  c = jnp.arange(capacity, dtype=jnp.int32)[None, :]
  idx = jnp.clip(starts[:, None] + c, 0, max(a.shape[0] - 1, 0)).reshape(-1)
  valid = (c < sizes[:, None]).reshape(-1)
  return jnp.where(valid.reshape(valid.shape + (1,) * (a.ndim - 1)), a[idx],
                   jnp.zeros((), a.dtype))


def _padded(a: jax.Array, axis_name: str) -> jax.Array:
  """`[D * C, ...]`: block `j` to device `j`; block `i` of the result came from `i`."""
  return lax.all_to_all(a, axis_name, 0, 0, tiled=True)


def _ragged(a, out_rows, input_offsets, send_sizes, output_offsets, recv_sizes, axis_name):
  out = jnp.zeros((out_rows,) + a.shape[1:], a.dtype)
  return ragged_all_to_all(a, out, input_offsets, send_sizes, output_offsets, recv_sizes,
                           axis_name=axis_name)
