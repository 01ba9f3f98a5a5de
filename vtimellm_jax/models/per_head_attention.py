"""Causal attention computed one (row, head) at a time: the CPU path for training small models.

XLA's attention materialises [B, N, T, S] scores, probabilities and their gradients, and on a CPU
moving those through memory costs more than the matmuls (a d128 x 4-layer LLaMA spent half its
train step there). Working on one head's [T, S] block at a time keeps it in cache. The backward
pass is written out (a custom VJP that recomputes the probabilities) so it, too, runs per head
instead of as XLA's transpose of a batched map. The result is the XLA path's up to
float rounding (tests/test_model_attention_kernels.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Heads processed together by each step of the map: 2 was fastest on a 2-core CPU for T ~ 300-400.
HEADS_PER_STEP = 2
_MASKED = -1e30


def _probs(q_td, k_sd, length):
  t, s = q_td.shape[0], k_sd.shape[0]
  scores = (q_td @ k_sd.T) * (q_td.shape[-1] ** -0.5)
  keys = jnp.arange(s)[None, :]
  visible = (keys <= jnp.arange(t)[:, None]) & (keys < length)
  return jax.nn.softmax(jnp.where(visible, scores.astype(jnp.float32), _MASKED), axis=-1)


@jax.custom_vjp
def _heads(q_ntd, k_nsd, v_nsd, lengths_n):
  return jax.lax.map(lambda a: (_probs(a[0], a[1], a[3]) @ a[2].astype(jnp.float32)).astype(a[0].dtype),
                     (q_ntd, k_nsd, v_nsd, lengths_n), batch_size=HEADS_PER_STEP)


def _heads_fwd(q, k, v, lengths):
  out = _heads(q, k, v, lengths)
  return out, (q, k, v, lengths, out)


def _heads_bwd(residuals, d_out):
  q, k, v, lengths, out = residuals

  def one(args):
    q, k, v, length, out, d_out = args
    probs = _probs(q, k, length)
    d_out32 = d_out.astype(jnp.float32)
    d_v = probs.T @ d_out32
    d_probs = d_out32 @ v.astype(jnp.float32).T
    # softmax backward: p * (dp - sum_j p_j dp_j), and sum_j p_j dp_j = <d_out, out> per query.
    d_scores = probs * (d_probs - jnp.sum(d_out32 * out.astype(jnp.float32), axis=-1, keepdims=True))
    d_scores = d_scores * (q.shape[-1] ** -0.5)
    return ((d_scores @ k.astype(jnp.float32)).astype(q.dtype), (d_scores.T @ q.astype(jnp.float32)).astype(k.dtype),
            d_v.astype(v.dtype))

  d_q, d_k, d_v = jax.lax.map(one, (q, k, v, lengths, out, d_out), batch_size=HEADS_PER_STEP)
  return d_q, d_k, d_v, None


_heads.defvjp(_heads_fwd, _heads_bwd)


def per_head_attention(q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, lengths_b: jax.Array) -> jax.Array:
  """Returns float[B, T, N, H]: causal attention with keys at or past each row's length masked.

  What `jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths_b)`
  returns; grouped KV heads are repeated to the query heads first.
  """
  b, t, n, h = q_btnh.shape
  group = n // k_btkh.shape[2]
  k_btnh, v_btnh = (jnp.repeat(x, group, axis=2) if group > 1 else x for x in (k_btkh, v_btkh))
  heads_first = lambda x: x.transpose(0, 2, 1, 3).reshape(b * n, t, h)  # noqa: E731
  out = _heads(heads_first(q_btnh), heads_first(k_btnh), heads_first(v_btnh), jnp.repeat(lengths_b, n))
  return out.reshape(b, n, t, h).transpose(0, 2, 1, 3)
