"""The decoder's KV cache: its layout, how prefill and decode write it, and decode attention over a window.

Layout: keys float[L, B, K, S, H] and values float[L, B, K, H, S] (layers, rows, kv heads, then
positions and head dims), one pair of stacked arrays for stacked layers, or one pair of buffers per
layer for layers held one module per layer (the answering layout, `models/answering.py`: a layer's
buffer is then written in place and read without touching the others'). A decode step reads the
first `window` positions of a layer where they lie: the slice fuses into the reductions below, and
both reductions run over the minor axis (head dims for the logits, positions for the values), so
XLA keeps the stored layout and never copies or transposes a layer's cache to read it. The cache is
carried through the layers and the decode loop, and every write updates it in place.

  prefill  the T prompt positions of rows row0 .. row0 + B - 1 are written at positions 0 .. T - 1
           (one dynamic-update-slice per array); the prompt attends only to itself, through the
           model's attention kernel (cuDNN, splash, ...), not through the cache.
  decode   the new tokens are written (a dynamic-update-slice when every row writes the same slot,
           as `generate`'s rows do; a scatter of B x T x K head vectors when each row has its own,
           as the server's slots do) and attend to the slots their row wrote at or before them,
           among the first `window` slots. `window` is static: callers round the live length up
           to a power of two (`decode_window`), so one compiled step serves many lengths and the
           slots beyond the window are never read.

Decode attention against the cache is a matrix-vector product per row and head, bound by reading the
cache. On GPU and TPU it is written as multiply-and-reduce: XLA fuses the window slice, the upcast
and the product into one pass over the keys (and one over the values), where a matmul would take a
copy of the window as its operand. On CPU it is written as matmuls (einsum): XLA's CPU backend
hands a broadcast multiply-and-reduce to its YNNPACK reduce fusion, which runs it an order of
magnitude slower than a matmul of the same window (docs/performance.md, "Decoding on a CPU").
The platform is the one being compiled for (`sharding.target_platform`), so an AOT compile for a
GPU from a CPU host gets the GPU form.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from vtimellm_jax.sharding import target_platform

# The smallest window a decode step reads; windows are powers of two from here (a few compiled steps
# per cache length), and cache lengths multiples of it (so prompts of nearby lengths share them).
MIN_WINDOW = 256


class KVCache(NamedTuple):
  """Keys float[L, B, K, S, H] and values float[L, B, K, H, S] of every layer, or, for layers held
  one module per layer (`models/answering.py`), tuples of L such arrays without the L axis."""

  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]

  @classmethod
  def zeros(cls, layers: int, batch: int, kv_heads: int, length: int, head_dim: int, dtype,
            per_layer: bool = False) -> KVCache:
    shapes = (batch, kv_heads, length, head_dim), (batch, kv_heads, head_dim, length)
    if per_layer:
      return cls(*(tuple(jnp.zeros(shape, dtype) for _ in range(layers)) for shape in shapes))
    return cls(*(jnp.zeros((layers, *shape), dtype) for shape in shapes))

  @property
  def length(self) -> int:
    """The positions each row holds (S)."""
    return self.k[0].shape[2] if isinstance(self.k, tuple) else self.k.shape[3]

  @property
  def kv_heads(self) -> int:
    return self.k[0].shape[1] if isinstance(self.k, tuple) else self.k.shape[2]

  @property
  def dtype(self):
    return self.k[0].dtype if isinstance(self.k, tuple) else self.k.dtype


def _update(c, layer, x: jax.Array, start: tuple) -> jax.Array | tuple:
  """Returns cache array `c` with the block x written into layer `layer` at `start` (4 indices)."""
  x = x.astype(c[0].dtype if isinstance(c, tuple) else c.dtype)
  if isinstance(c, tuple):  # the layer's own buffer (layer is a Python int)
    return c[:layer] + (jax.lax.dynamic_update_slice(c[layer], x, start),) + c[layer + 1:]
  return jax.lax.dynamic_update_slice(c, x[None], (layer, *start))


def _scatter(c, layer, index: tuple, x: jax.Array) -> jax.Array | tuple:
  """Returns cache array `c` with x written into layer `layer` at `index` (an indexing tuple of one layer)."""
  x = x.astype(c[0].dtype if isinstance(c, tuple) else c.dtype)
  if isinstance(c, tuple):
    return c[:layer] + (c[layer].at[index].set(x),) + c[layer + 1:]
  return c.at[(layer, *index)].set(x)


def _read(c, layer, shape: tuple) -> jax.Array:
  """Returns the leading block `shape` (4 sizes) of layer `layer` of cache array `c`."""
  if isinstance(c, tuple):
    return jax.lax.slice(c[layer], (0, 0, 0, 0), shape)
  return jax.lax.dynamic_slice(c, (layer, 0, 0, 0, 0), (1, *shape))[0]


def decode_window(live: int, length: int) -> int:
  """Returns the static window a decode step reads: the smallest power of two >= `live` (at least
  MIN_WINDOW), at most the cache `length`."""
  window = MIN_WINDOW
  while window < live:
    window *= 2
  return min(window, length)


def cache_length(positions: int) -> int:
  """Returns the cache length that holds `positions`: rounded up to a multiple of MIN_WINDOW."""
  return -(-positions // MIN_WINDOW) * MIN_WINDOW


def bytes_per_position(config) -> int:
  """Returns the cache bytes of one position of one row: layers x (k, v) x kv heads x head dim x dtype bytes."""
  return config.num_layers * 2 * config.num_kv_heads * config.head_size * jnp.dtype(config.compute_dtype).itemsize


def write_prefill(cache: KVCache, layer, row0, k_btkh: jax.Array, v_btkh: jax.Array) -> KVCache:
  """Returns the cache with layer `layer`'s rows row0 .. row0 + B - 1 holding k, v at positions 0 .. T - 1."""
  return KVCache(_update(cache.k, layer, k_btkh.transpose(0, 2, 1, 3), (row0, 0, 0, 0)),
                 _update(cache.v, layer, v_btkh.transpose(0, 2, 3, 1), (row0, 0, 0, 0)))


def write_decode(cache: KVCache, layer, step: CacheStep, k_btkh: jax.Array, v_btkh: jax.Array,
                 after: jax.Array) -> KVCache:
  """Returns the cache with layer `layer` holding the step's T new tokens of every row.

  With a shared `step.slot`, token t of every row goes to slot + t (one dynamic-update-slice per
  array); otherwise token t of row b goes to positions_bt[b, t] (a scatter of B x T x K head vectors).
  `after` is the step's attention output float[B, T, ...], computed from the cache before this write.
  """
  # The written values are made to depend on the read (0 x one element of each row's attention
  # output): XLA's CPU pipeline copies a buffer that is read and updated in place unless the
  # update depends on the read; GPU and TPU order the two without a copy either way.
  tie = (after[:, :, :1, :1] * 0).astype(k_btkh.dtype)
  k_bkth, v_bkth = ((x + tie).transpose(0, 2, 1, 3) for x in (k_btkh, v_btkh))
  if step.slot is not None:
    return KVCache(_update(cache.k, layer, k_bkth, (0, 0, step.slot, 0)),
                   _update(cache.v, layer, v_bkth.transpose(0, 1, 3, 2), (0, 0, 0, step.slot)))
  b, heads = k_bkth.shape[:2]
  rows, kv_heads, slots = jnp.arange(b)[:, None, None], jnp.arange(heads)[None, :, None], step.positions_bt[:, None, :]
  # Both give [B, K, T, H] blocks: advanced indices around a slice come first (numpy's rule).
  return KVCache(_scatter(cache.k, layer, (rows, kv_heads, slots), k_bkth),
                 _scatter(cache.v, layer, (rows, kv_heads, slice(None), slots), v_bkth))


def decode_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, cache: KVCache, layer,
                     step: CacheStep) -> jax.Array:
  """Returns float[B, T, N, H]: the step's new tokens attend to their row's cache and to each other.

  The cache is read as it was before the step writes (so the read and the in-place write are
  independent): the slots before the row's first new token (positions_bt[b, 0], or the shared
  slot), less the prompt padding [prompt_lengths_b[b], prompt_len) when the step has a shared slot,
  among the first `step.window` slots; then the T new tokens causally, from k and v themselves.
  Query head n uses kv head n // (N / K), as `jax.nn.dot_product_attention` groups them. Logits
  and softmax in float32, probabilities rounded to the cache dtype before weighting the values, as
  XLA's path of `jax.nn.dot_product_attention` computes them.
  """
  b, t, n, h = q_btnh.shape
  heads, window = cache.kv_heads, step.window
  f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
  k_bksh, v_bkhs = _read(cache.k, layer, (b, heads, window, h)), _read(cache.v, layer, (b, heads, h, window))
  q_bkgth = f32(q_btnh.reshape(b, t, heads, n // heads, h).transpose(0, 2, 3, 1, 4)) * jnp.float32(h**-0.5)
  k_bkuh, v_bkuh = (x.transpose(0, 2, 1, 3) for x in (k_btkh, v_btkh))  # the new tokens as keys: u indexes them
  by_matmul = target_platform() == "cpu"  # see the module docstring
  if by_matmul:
    old = jnp.einsum("bkgth,bksh->bkgts", q_bkgth, f32(k_bksh))
  else:
    old = jnp.sum(q_bkgth[..., None, :] * f32(k_bksh[:, :, None, None]), axis=-1)  # [B, K, G, T, S]
  new = jnp.sum(q_bkgth[..., None, :] * f32(k_bkuh[:, :, None, None]), axis=-1)  # [B, K, G, T, U]
  slots = jnp.arange(window)
  if step.slot is not None:
    first_b = jnp.broadcast_to(step.slot, (b,))
    written = (slots[None] < step.prompt_lengths_b[:, None]) | (slots[None] >= step.prompt_len)  # [B, S]
  else:
    first_b = step.positions_bt[:, 0]
    written = jnp.ones((b, window), bool)
  seen = (slots[None] < first_b[:, None]) & written  # [B, S]
  causal = jnp.arange(t)[None, :] <= jnp.arange(t)[:, None]  # [T, U]
  logits = jnp.concatenate([jnp.where(seen[:, None, None, None], old, -jnp.inf),
                            jnp.where(causal, new, -jnp.inf)], axis=-1)
  probs = f32(jax.nn.softmax(logits, axis=-1).astype(cache.dtype))
  # Values are stored with the slots last, so this reduces over the minor axis as the logits do.
  if by_matmul:
    out_old = jnp.einsum("bkgts,bkhs->bkgth", probs[..., :window], f32(v_bkhs))
  else:
    out_old = jnp.sum(probs[..., None, :window] * f32(v_bkhs[:, :, None, None]), axis=-1)  # [B, K, G, T, H]
  out = out_old + jnp.sum(probs[..., window:, None] * f32(v_bkuh[:, :, None, None]), axis=-2)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q_btnh.dtype)


class CacheStep(NamedTuple):
  """How one forward pass uses the cache.

  A prefill (window 0) writes rows row0 .. row0 + B - 1 from position 0. A decode step (window > 0,
  a Python int) feeds tokens at rope positions `positions_bt` and reads the first `window` slots;
  its tokens are written at positions_bt, or, with a shared `slot`, every row's at slot onward
  (generate's rows all write their i-th new token at prompt_len + i - 1, after the padded prompts,
  so rows of different prompt lengths write with one dynamic-update-slice; the padding between a
  row's prompt_lengths_b and prompt_len is never attended).
  """

  row0: jax.Array | int = 0
  positions_bt: jax.Array | None = None
  window: int = 0
  slot: jax.Array | None = None
  prompt_lengths_b: jax.Array | None = None
  prompt_len: int = 0
