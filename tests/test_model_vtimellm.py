"""The adapter splice: N projected features replace the one `<video>` placeholder of each row."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vtimellm_jax.errors import UserError
from vtimellm_jax.models import llama
from vtimellm_jax.models.vtimellm import (IGNORE_INDEX, VIDEO_TOKEN_INDEX, VTimeLLM, check_placeholders,
                                          splice_features)


def _reference_splice(embeds, ids, mask, labels, feats):
  """Per row: text before the placeholder, the features, text after; padding moves to the end."""
  out_e, out_m, out_l = [], [], []
  for e, i, m, l, f in zip(embeds, ids, mask, labels, feats):
    p = int(np.where(i == VIDEO_TOKEN_INDEX)[0][0])
    out_e.append(np.concatenate([e[:p], f, e[p + 1:]]))
    out_m.append(np.concatenate([m[:p], np.ones(len(f), m.dtype), m[p + 1:]]))
    out_l.append(np.concatenate([l[:p], np.full(len(f), IGNORE_INDEX), l[p + 1:]]))
  return np.stack(out_e), np.stack(out_m), np.stack(out_l)


@pytest.mark.parametrize("n_features", [1, 5])  # an image (stage 1) and a short video
def test_splice_matches_reference(n_features):
  rng = np.random.RandomState(0)
  b, t, d = 3, 8, 4
  ids = rng.randint(3, 50, (b, t))
  mask = np.ones((b, t), np.int32)
  mask[1, 6:] = 0
  mask[2, 3:] = 0
  for row, pos in enumerate([0, 4, 2]):  # first token, middle, last real token
    ids[row, pos] = VIDEO_TOKEN_INDEX
  labels = np.where(mask == 1, rng.randint(3, 50, (b, t)), IGNORE_INDEX)
  embeds = rng.randn(b, t, d).astype(np.float32)
  feats = rng.randn(b, n_features, d).astype(np.float32)
  got = splice_features(jnp.asarray(embeds), jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(labels), jnp.asarray(feats))
  want = _reference_splice(embeds, ids, mask, labels, feats)
  for g, w in zip(got, want):
    assert g.shape == (b, t - 1 + n_features) + w.shape[2:]
    np.testing.assert_array_equal(np.asarray(g), w)


def test_model_runs_the_spliced_sequence_like_the_plain_llm():
  config = llama.tiny()
  model = VTimeLLM(config, nnx.Rngs(0))
  ids = np.array([[1, 5, VIDEO_TOKEN_INDEX, 7, 8, 9]])
  feats = np.random.RandomState(1).randn(1, 3, 768).astype(np.float32)
  logits, labels = model(jnp.asarray(ids), jnp.ones_like(jnp.asarray(ids)), jnp.asarray(feats), jnp.asarray(ids))
  assert logits.shape == (1, 8, config.vocab_size)
  assert np.asarray(labels).tolist() == [[1, 5, -100, -100, -100, 7, 8, 9]]
  # Same sequence built by hand through the plain decoder.
  projected = np.asarray(feats @ np.asarray(model.mm_projector.kernel[...]) + np.asarray(model.mm_projector.bias[...]))
  text = np.asarray(model.model.embed(jnp.asarray(ids)))
  embeds = np.concatenate([text[:, :2], projected, text[:, 3:]], axis=1)
  hidden, _, _ = model.model(jnp.asarray(embeds), jnp.arange(8)[None], jnp.array([8]))
  np.testing.assert_allclose(np.asarray(model.lm_head(hidden)), np.asarray(logits), rtol=1e-5, atol=1e-5)


def test_rows_without_or_with_several_placeholders_are_rejected():
  ids = np.array([[1, VIDEO_TOKEN_INDEX, 3], [1, 2, 3], [VIDEO_TOKEN_INDEX, 2, VIDEO_TOKEN_INDEX]])
  with pytest.raises(UserError) as e:
    check_placeholders(ids, names=["a.json#0", "a.json#1", "a.json#2"])
  assert "a.json#1: 0 placeholders" in str(e.value) and "a.json#2: 2 placeholders" in str(e.value)
  assert "a.json#0" not in str(e.value)
  check_placeholders(ids[:1])
