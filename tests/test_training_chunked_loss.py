"""The chunked loss (config.model.loss_chunk) gives the full-logits loss and gradients, and the same step."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from vtimellm_jax.models import llama, lora
from vtimellm_jax.models.vtimellm import IGNORE_INDEX, VIDEO_TOKEN_INDEX, VTimeLLM
from vtimellm_jax.training import step as step_lib

FEATURES, FEATURE_DIM, TEXT = 5, 12, 14  # T' = TEXT - 1 + FEATURES = 18 positions


def _model(trainable=nnx.LoRAParam):
  model = VTimeLLM(llama.tiny(vocab_size=97), nnx.Rngs(0), feature_dim=FEATURE_DIM)
  lora.attach_lora(model, lora.LoraConfig(rank=4, alpha=8.0, dropout=0.0), nnx.Rngs(1))
  # LoRA B starts at 0, which would leave half the gradients trivially equal; make it non-zero.
  for _, layer in lora.lora_layers(model):
    layer.lora_b[...] = 0.05 * jax.random.normal(jax.random.key(2), layer.lora_b[...].shape)
  return nnx.split(model, nnx.All(nnx.Param, trainable), ...)


def _batch(rows=3, seed=0):
  """Returns a micro-batch [rows, ...]: right-padded rows, prompts without labels, one all-padding tail."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, 97, (rows, TEXT)).astype(np.int32)
  ids[:, 2] = VIDEO_TOKEN_INDEX
  lengths = [TEXT, TEXT - 5, 6][:rows]
  mask = (np.arange(TEXT)[None] < np.asarray(lengths)[:, None]).astype(np.int32)
  labels = np.where(mask.astype(bool), ids, IGNORE_INDEX)
  labels[:, :5] = IGNORE_INDEX  # the prompt
  labels[0, 8] = IGNORE_INDEX  # a hole inside the answer
  return {"input_ids": jnp.asarray(ids), "attention_mask": jnp.asarray(mask), "labels": jnp.asarray(labels),
          "features": jnp.asarray(rng.randn(rows, FEATURES, FEATURE_DIM).astype(np.float32))}


def _loss_and_grads(graphdef, trainable, frozen, batch, chunk):
  def loss(trainable):
    total, count = step_lib.micro_batch_nll(nnx.merge(graphdef, trainable, frozen), batch, chunk)
    return total, count

  return jax.jit(jax.value_and_grad(loss, has_aux=True))(trainable)


@pytest.mark.parametrize("trains", ["lora", "all"])
def test_chunked_loss_and_gradients_equal_the_full_logits_ones(trains):
  # "all" also trains lm_head, whose gradient then flows through the recomputed chunks.
  graphdef, trainable, frozen = _model(nnx.LoRAParam if trains == "lora" else nnx.Param)
  batch = _batch()
  (want, want_count), want_grads = _loss_and_grads(graphdef, trainable, frozen, batch, 0)
  assert int(want_count) > 0 and float(want) > 0
  for chunk in (6, 7, 64):  # dividing T' = 18, not dividing it, longer than it
    (got, count), grads = _loss_and_grads(graphdef, trainable, frozen, batch, chunk)
    assert int(count) == int(want_count), chunk
    np.testing.assert_allclose(float(got), float(want), rtol=1e-6, err_msg=f"chunk {chunk}")
    for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(want_grads)):
      # fp32 sums in another order: equal to 1e-5 of each tensor's scale.
      np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5 * float(np.abs(w).max()),
                                 err_msg=f"chunk {chunk} {jax.tree_util.keystr(path)}")


def test_chunked_nll_sum_matches_nll_sum_on_the_same_logits():
  # The shift alone: an identity lm_head turns hidden states into logits, so both see the same numbers.
  rng = np.random.RandomState(3)
  hidden = jnp.asarray(rng.randn(2, 11, 7).astype(np.float32))
  labels = jnp.asarray(rng.randint(0, 7, (2, 11)).astype(np.int32)).at[1, 6:].set(IGNORE_INDEX).at[0, 0].set(IGNORE_INDEX)
  head = nnx.Linear(7, 7, use_bias=False, kernel_init=nnx.initializers.constant(jnp.eye(7)), rngs=nnx.Rngs(0))
  want = step_lib.nll_sum(hidden, labels)
  for chunk in (1, 3, 4, 11):
    got = step_lib.chunked_nll_sum(hidden, labels, head, chunk)
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
    assert int(got[1]) == int(want[1])


def test_one_train_step_is_the_same_with_and_without_chunks():
  graphdef, trainable, frozen = _model()
  # Adam's first update is lr * g / (|g| + eps): with eps 1e-8 a gradient near 1e-5 turns rounding
  # differences between the two loss paths into visible update differences; 1e-4 keeps it linear there.
  optim = ml_collections.ConfigDict(dict(lr=1e-2, warmup_ratio=0.0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-4,
                                         max_grad_norm=1.0))
  tx, _ = step_lib.make_optimizer(optim, 10)
  # Two micro-batches of 3 rows, as the trainer's accumulation scan sees them.
  micro = [_batch(seed=0), _batch(seed=1)]
  batch = {k: jnp.stack([m[k] for m in micro]) for k in step_lib.BATCH_KEYS}
  results = []
  for chunk in (0, 5):
    step = jax.jit(step_lib.make_train_step(graphdef, tx, has_dropout=False, loss_chunk=chunk))
    results.append(step(trainable, tx.init(trainable), frozen, batch, jnp.int32(1), jax.random.key(0)))
  (want_params, _, want), (got_params, _, got) = results
  assert int(got["tokens"]) == int(want["tokens"]) > 0
  np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(got["grad_norm"]), float(want["grad_norm"]), rtol=1e-5)
  moved = 0
  for old, g, w in zip(jax.tree.leaves(trainable), jax.tree.leaves(got_params), jax.tree.leaves(want_params)):
    # Adam's first update is about lr * sign(g): a gradient within rounding of 0 may move either way.
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-4 * float(np.abs(w - old).max()))
    moved += not np.allclose(g, old)
  assert moved == len(jax.tree.leaves(trainable))  # the step did update every trainable leaf
