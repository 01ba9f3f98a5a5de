"""Training small sentencepiece models with LLaMA's and ChatGLM3's shared settings.

Both families' tokenizers are sentencepiece BPE with byte fallback, digits split, a dummy `▁`
prefix, whitespace kept as is, identity normalization and ids unk 0 / bos 1 / eos 2 (no pad piece):
the small tokenizers the tests and the quickstart train here behave like Vicuna's and ChatGLM3's.
"""

from __future__ import annotations

import io
from typing import Sequence

from vtimellm_jax import errors

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2


def train_model(lines: Sequence[str], vocab_size: int, pieces: Sequence[str] = ()) -> bytes:
  """Returns the serialized sentencepiece model trained on `lines`.

  `pieces` stay whole as single pieces (user-defined symbols). UserError when sentencepiece refuses
  (e.g. a corpus too small for the vocabulary, which it reports as a RuntimeError).
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  if not lines:
    raise errors.UserError("cannot train a tokenizer: the text corpus is empty")
  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        user_defined_symbols=list(pieces), character_coverage=0.99995, unk_id=UNK_ID, bos_id=BOS_ID,
        eos_id=EOS_ID, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        hard_vocab_limit=False, minloglevel=2)
  except RuntimeError as e:
    raise errors.UserError(f"sentencepiece training failed: {e}") from e
  return buf.getvalue()
