"""A loaded VTimeLLM with its tokenizer, answering batches of questions about videos.

`Answerer.answer` takes conversations (earlier rounds + a new question) and one feature array per
conversation, and returns the answers of the whole batch from one `generate` call. Shapes are kept
to a few compiled programs: the text is right-padded to a multiple of `PAD_MULTIPLE` tokens and a
short batch is filled up to `batch_size` rows with copies of its first row (their answers dropped).
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vtimellm_jax import cli_types
from vtimellm_jax.errors import UserError
from vtimellm_jax.inference import generate as generate_lib
from vtimellm_jax.inference import prompts
from vtimellm_jax.models import answering, lora

PAD_MULTIPLE = 32


@dataclasses.dataclass(frozen=True)
class Answer:
  """One generated answer: the cleaned-up text and the generated ids (eos excluded)."""

  text: str
  token_ids: tuple[int, ...]


def load_answerer(model_dir: str | os.PathLike, dtype: str = "auto", quant: str = "none") -> Answerer:
  """Returns the Answerer of a model directory (model.json + params/ + tokenizer files).

  `dtype` "auto" computes and stores in the dtype the directory stores; any other value sets both (the
  adapter stays float32), e.g. bfloat16 to halve the memory of a float32 checkpoint on a GPU. `quant`
  (`cli_types.ANSWER_QUANTS`) holds the decoder projections quantised once LoRA is merged.
  """
  from vtimellm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.models import load  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.models.vtimellm import VTimeLLM  # pylint: disable=g-import-not-at-top

  if dtype not in cli_types.DTYPES_OR_AUTO:
    raise UserError(f"--dtype must be one of {', '.join(cli_types.DTYPES_OR_AUTO)}, got {dtype!r}")
  if quant not in cli_types.ANSWER_QUANTS:
    raise UserError(f"--quant must be one of {', '.join(cli_types.ANSWER_QUANTS)}, got {quant!r}")
  path = pathlib.Path(model_dir)
  if not path.is_dir():
    raise UserError(f"--model {model_dir}: not a folder")
  overrides = {} if dtype == "auto" else {"dtype": dtype, "param_dtype": dtype}
  model = load.load_model(path, model_cls=VTimeLLM, **overrides)
  encoder = tokenizer_lib.load_encoder(path)
  if model.config.vocab_size < len(encoder):
    raise UserError(f"{path}: the tokenizer has {len(encoder)} tokens but the model only "
                    f"{model.config.vocab_size} embeddings")
  return Answerer(model, encoder, quant)


@nnx.jit
def _embed(model, ids_bt, mask_bt, features_bnf):
  """Returns (float[B, T', D] prompt embeddings with spliced features, int32[B] lengths)."""
  embeds, mask, _ = model.embed_inputs(ids_bt, mask_bt, features_bnf)
  return embeds, mask.sum(-1).astype(jnp.int32)


class Answerer:
  """Answers questions about videos with a VTimeLLM and the release's prompts."""

  def __init__(self, model, encoder, quant: str = "none"):
    """Takes `model` over: its LoRA (if any) is merged, as the release merges it to answer, its layers
    are put in the answering layout (`models/answering.py`), and with `quant` (int8, nf4, fp4) each
    decoder projection is then quantised (`lora.quantize_for_answering`)."""
    lora.merge_lora(model)
    self.model = answering.answering_layout(model)
    if quant != "none":
      lora.quantize_for_answering(self.model, quant)
    self.quant = quant
    self.encoder = encoder

  @property
  def feature_dim(self) -> int:
    return self.model.feature_dim

  @property
  def stop_ids(self) -> tuple[int, ...]:
    """The ids that end an answer: this tokenizer's </s>, whatever id it has, and its family's others."""
    return tuple(getattr(self.encoder, "stop_ids", (self.encoder.eos_id,)))

  def prompt_ids(self, history: Sequence[tuple[str, str]], question: str) -> list[int]:
    """Returns the token ids (one placeholder) of a conversation's prompt."""
    return prompts.prompt_ids(self.encoder, history, question)

  def answer(self, conversations: Sequence[tuple[Sequence[tuple[str, str]], str]],
             features: Sequence[np.ndarray], config: generate_lib.GenerationConfig,
             keys: jax.Array | None = None, batch_size: int | None = None, seed: int = 0) -> list[Answer]:
    """Returns one Answer per conversation, all generated in one batch.

    Args:
      conversations: (history of (question, answer) rounds, new question) per row; the first
        question of each holds `<video>`.
      features: float[N, feature_dim] per row; N must be equal across the batch.
      config: decoding settings.
      keys: one PRNG key per row (sampling); default: split from `seed`.
      batch_size: rows of the compiled program (>= len(conversations)); default: the batch.
      seed: seed of the default keys.
    """
    n = len(conversations)
    batch_size = batch_size or n
    if n == 0 or n > batch_size:
      raise ValueError(f"{n} conversations for a batch of {batch_size}")
    counts = {f.shape[0] for f in features}
    if len(features) != n or len(counts) != 1:
      raise UserError(f"a batch needs one feature array per question, all with the same number of frames; "
                      f"got frame counts {sorted(counts)}")
    ids = [self.prompt_ids(history, question) for history, question in conversations]
    if keys is None:
      keys = jax.random.split(jax.random.key(seed), n)
    # Fill the batch with copies of row 0 so every batch has the same shape.
    fill = batch_size - n
    ids += [ids[0]] * fill
    features = np.stack(list(features) + [features[0]] * fill).astype(np.float32)
    keys = jnp.concatenate([keys, jnp.repeat(keys[:1], fill, axis=0)]) if fill else keys
    ids_bt, lengths = generate_lib.pad_right(ids, self.encoder.pad_id, PAD_MULTIPLE)
    mask_bt = (np.arange(ids_bt.shape[1])[None] < lengths[:, None]).astype(np.int32)
    embeds, embed_lengths = _embed(self.model, jnp.asarray(ids_bt), jnp.asarray(mask_bt), jnp.asarray(features))
    config = dataclasses.replace(config, eos_id=self.encoder.eos_id, stop_ids=self.stop_ids)
    out = generate_lib.generate(self.model, embeds, embed_lengths, config, keys)
    return [Answer(prompts.decode_answer(self.encoder, row), tuple(row)) for row in out.rows()[:n]]
