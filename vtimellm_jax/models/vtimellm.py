"""VTimeLLM: LLaMA plus the visual adapter, with frame features spliced in at the `<video>` placeholder.

A tokenized sample holds one placeholder id (-200) where `<video>` stood. The adapter maps the N
frame features (N = 100 for a video, 1 for a stage-1 image) into the LLM's embedding space and
they replace the placeholder, so a text of T tokens becomes a sequence of T - 1 + N embeddings.
Shapes stay static under jit: every row of a [B, T] batch becomes [B, T - 1 + N].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vtimellm_jax.data import records
from vtimellm_jax.errors import UserError
from vtimellm_jax.models import time_code
from vtimellm_jax.models.llama import LlamaConfig, LlamaForCausalLM
from vtimellm_jax.models.lora import Linear

# What a stage may train, as nnx filters by name (`config.trainable`): the adapter (stage 1), the LoRA
# factors (stages 2-3), or every parameter (the quickstart's stage 0).
TRAINABLE = {
    "adapter": nnx.PathContains("mm_projector"),
    "lora": nnx.LoRAParam,
    "all": nnx.Param,
}

VIDEO_TOKEN_INDEX = -200
IGNORE_INDEX = -100
CLIP_FEATURE_DIM = records.FEATURE_DIM  # CLIP ViT-L/14's embedding width


def check_placeholders(input_ids_bt: np.ndarray, attention_mask_bt: np.ndarray | None = None, names=None) -> None:
  """Raises UserError unless every row holds exactly one placeholder among its real tokens."""
  ids = np.asarray(input_ids_bt)
  valid = np.ones_like(ids, bool) if attention_mask_bt is None else np.asarray(attention_mask_bt).astype(bool)
  counts = ((ids == VIDEO_TOKEN_INDEX) & valid).sum(-1)
  bad = [(i, int(c)) for i, c in enumerate(counts) if c != 1]
  if bad:
    label = (lambda i: names[i]) if names is not None else (lambda i: f"row {i}")
    details = "; ".join(f"{label(i)}: {c} placeholders" for i, c in bad)
    raise UserError(f"each sample needs exactly one <video> placeholder ({VIDEO_TOKEN_INDEX}): {details}")


def splice_features(text_embeds_btd, input_ids_bt, attention_mask_bt, labels_bt, features_bnd):
  """Returns (embeds [B, T-1+N, D], attention_mask [B, T-1+N], labels [B, T-1+N] or None).

  Position p of each row's placeholder receives the N feature rows; tokens after it shift by N - 1.
  Feature positions are attended to and never trained on. A row without a placeholder would get
  its features at position 0, so inputs are checked on the host with `check_placeholders` first.
  """
  b, t, _ = text_embeds_btd.shape
  n = features_bnd.shape[1]
  p = jnp.argmax(input_ids_bt == VIDEO_TOKEN_INDEX, axis=-1)[:, None]  # [B, 1]
  i = jnp.arange(t - 1 + n)[None, :]  # [1, T']
  is_feature = (i >= p) & (i < p + n)
  text_index = jnp.where(i < p, i, i - n + 1).clip(0, t - 1)
  feature_index = (i - p).clip(0, n - 1)
  gather = jax.vmap(lambda x, idx: x[idx])
  embeds = jnp.where(is_feature[..., None], gather(features_bnd.astype(text_embeds_btd.dtype), feature_index),
                     gather(text_embeds_btd, text_index))
  mask = jnp.where(is_feature, 1, gather(attention_mask_bt, text_index)).astype(jnp.int32)
  labels = None
  if labels_bt is not None:
    labels = jnp.where(is_feature, IGNORE_INDEX, gather(labels_bt, text_index)).astype(jnp.int32)
  return embeds, mask, labels


class VTimeLLM(LlamaForCausalLM):
  """LLaMA with `mm_projector` (Linear 768 -> d_model, with bias) for frame features."""

  def __init__(self, config: LlamaConfig, rngs: nnx.Rngs, feature_dim: int = CLIP_FEATURE_DIM):
    super().__init__(config, rngs)
    self.feature_dim = feature_dim
    self.mm_projector = Linear(feature_dim, config.hidden_size, axes=(None, "embed"), use_bias=True,
                               dtype=config.compute_dtype, param_dtype=jnp.float32, rngs=rngs)

  def embed_inputs(self, input_ids_bt, attention_mask_bt, features_bnf, labels_bt=None):
    """Returns (embeds [B, T', D], attention_mask [B, T'], labels [B, T'] or None), T' = T - 1 + N."""
    projected = time_code.add_to_frames(self.mm_projector(features_bnf), self.config.time_code)
    return splice_features(self.model.embed(input_ids_bt), input_ids_bt, attention_mask_bt, labels_bt, projected)

  def hidden_states(self, input_ids_bt, attention_mask_bt, features_bnf, labels_bt=None):
    """Returns (final hidden [B, T', D], labels [B, T'] or None, attention mask [B, T'])."""
    embeds, mask, labels = self.embed_inputs(input_ids_bt, attention_mask_bt, features_bnf, labels_bt)
    b, t, _ = embeds.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    hidden, _, _ = self.model(embeds, positions, mask.sum(-1).astype(jnp.int32))
    return hidden, labels, mask

  def __call__(self, input_ids_bt, attention_mask_bt, features_bnf, labels_bt=None):
    """Returns (logits [B, T', V], labels [B, T'] or None) for right-padded multimodal batches."""
    hidden, labels, _ = self.hidden_states(input_ids_bt, attention_mask_bt, features_bnf, labels_bt)
    return self.lm_head(hidden), labels
