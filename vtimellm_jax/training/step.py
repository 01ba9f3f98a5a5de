"""The optimizer and the jitted train step: gradient accumulation as a `lax.scan` over micro-batches.

The loss is the mean next-token cross-entropy over every labelled token of the global batch, so
1 x 16 and 4 x 4 micro-batches give the same update. (The release, on transformers 4.31, averaged
per-micro-batch means instead; the two agree when micro-batches hold equal token counts.)

With `loss_chunk` > 0 the loss never holds the [B, T, V] logits: the final hidden states go through
`lm_head` a chunk of positions at a time, under `jax.checkpoint`, so the backward pass recomputes
each chunk's logits instead of keeping fp32 logits and their softmax for the whole sequence.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from vtimellm_jax.models.vtimellm import IGNORE_INDEX

BATCH_KEYS = ("input_ids", "labels", "attention_mask", "features")


def make_optimizer(optim: ml_collections.ConfigDict, total_steps: int):
  """Returns (AdamW with clipping, lr schedule): linear warmup over warmup_ratio, then cosine to 0."""
  warmup = math.ceil(total_steps * optim.warmup_ratio)  # as HF's get_cosine_schedule_with_warmup
  schedule = optax.warmup_cosine_decay_schedule(0.0, optim.lr, warmup, max(total_steps, warmup + 1), 0.0)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.max_grad_norm),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay),
  )
  return tx, schedule


def training_flops_per_token(config, seq_len: int, trains_base: bool = False) -> float:
  """Returns matmul FLOPs per training token, counted as the PyTorch baseline (`torch_peft_baseline.py`) counts them.

  Forward 2P and input gradients 2P over the frozen matmul parameters P (lm_head in, embeddings
  out), plus 2P weight gradients when the base itself trains; attention 4 L d per layer, x3.
  """
  c = config
  per_layer = (2 * c.hidden_size * c.num_heads * c.head_size + 2 * c.hidden_size * c.num_kv_heads * c.head_size
               + 3 * c.hidden_size * c.intermediate_size)
  matmul_params = c.num_layers * per_layer + c.hidden_size * c.vocab_size
  attention = 4 * seq_len * c.num_heads * c.head_size * c.num_layers
  return (6 if trains_base else 4) * matmul_params + 3 * attention


def nll_sum(logits_btv: jax.Array, labels_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Returns (summed next-token NLL over labelled positions, their count) in fp32."""
  logits = logits_btv[:, :-1].astype(jnp.float32)
  targets = labels_bt[:, 1:]
  valid = targets != IGNORE_INDEX
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
  return jnp.where(valid, logz - picked, 0.0).sum(), valid.sum()


def chunked_nll_sum(hidden_btd: jax.Array, labels_bt: jax.Array, lm_head: nnx.Module,
                    chunk: int) -> tuple[jax.Array, jax.Array]:
  """Returns `nll_sum`'s (summed NLL, count) from final hidden states, `chunk` positions of logits at a time."""
  b, t, _ = hidden_btd.shape
  chunk = min(chunk, t)
  # Position t predicts label t + 1, as in nll_sum; the last position predicts nothing.
  targets = jnp.concatenate([labels_bt[:, 1:], jnp.full((b, 1), IGNORE_INDEX, labels_bt.dtype)], axis=1)
  pad = -t % chunk
  if pad:  # padded positions carry no label, so they add nothing
    hidden_btd = jnp.pad(hidden_btd, ((0, 0), (0, pad), (0, 0)))
    targets = jnp.pad(targets, ((0, 0), (0, pad)), constant_values=IGNORE_INDEX)
  head_def, head_state = nnx.split(lm_head)

  # Saves only its inputs: the chunk's logits are recomputed in the backward pass.
  @jax.checkpoint
  def chunk_nll(head_state, h_bcd, y_bc):
    logits = nnx.merge(head_def, head_state)(h_bcd).astype(jnp.float32)
    valid = y_bc != IGNORE_INDEX
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, jnp.where(valid, y_bc, 0)[..., None], axis=-1)[..., 0]
    return jnp.where(valid, logz - picked, 0.0).sum()

  def body(total, i):
    h = jax.lax.dynamic_slice_in_dim(hidden_btd, i * chunk, chunk, axis=1)
    y = jax.lax.dynamic_slice_in_dim(targets, i * chunk, chunk, axis=1)
    return total + chunk_nll(head_state, h, y), None

  total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange((t + pad) // chunk))
  return total, (targets != IGNORE_INDEX).sum()


def micro_batch_nll(model: nnx.Module, micro_batch: dict, loss_chunk: int = 0) -> tuple[jax.Array, jax.Array]:
  """Returns (summed next-token NLL, labelled token count) of one micro-batch [b, ...] in fp32."""
  args = (micro_batch["input_ids"], micro_batch["attention_mask"], micro_batch["features"], micro_batch["labels"])
  if loss_chunk > 0:
    hidden, labels, _ = model.hidden_states(*args)
    return chunked_nll_sum(hidden, labels, model.lm_head, loss_chunk)
  logits, labels = model(*args)
  return nll_sum(logits, labels)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, has_dropout: bool,
                    loss_chunk: int = 0):
  """Returns step(trainable, opt_state, frozen, batch, step, key) -> (trainable, opt_state, metrics).

  `batch` arrays are [A, b, ...]: A micro-batches of b rows, scanned in order. `loss_chunk` > 0
  computes the loss `loss_chunk` positions at a time (see `chunked_nll_sum`); 0 from full logits.
  """

  def micro_loss(trainable, frozen, micro_batch, key):
    # Fresh Variable objects at this trace level (unflattening makes new ones), so the dropout
    # stream may be reseeded here; the State passed in belongs to the enclosing scan.
    model = nnx.merge(graphdef, trainable, jax.tree.map(lambda x: x, frozen))
    if has_dropout:
      # Every stacked layer's stream gets its own split of the key.
      nnx.reseed(model, dropout=key, policy="match_shape")
    return micro_batch_nll(model, micro_batch, loss_chunk)

  grad_fn = jax.value_and_grad(micro_loss, has_aux=True)

  def step(trainable, opt_state, frozen, batch, step_index, key):
    step_key = jax.random.fold_in(key, step_index)
    accum = batch["input_ids"].shape[0]

    def body(carry, xs):
      grads_sum, nll_total, count_total = carry
      micro_batch, i = xs
      (nll, count), grads = grad_fn(trainable, frozen, micro_batch, jax.random.fold_in(step_key, i))
      grads_sum = jax.tree.map(lambda a, g: a + g.astype(jnp.float32), grads_sum, grads)
      return (grads_sum, nll_total + nll, count_total + count), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
    (grads, nll, count), _ = jax.lax.scan(body, init, ({k: batch[k] for k in BATCH_KEYS}, jnp.arange(accum)))
    denom = jnp.maximum(count, 1).astype(jnp.float32)
    grads = jax.tree.map(lambda g: g / denom, grads)
    updates, opt_state = tx.update(grads, opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    metrics = {"loss": nll / denom, "grad_norm": optax.tree.norm(grads), "tokens": count}
    return trainable, opt_state, metrics

  return step
