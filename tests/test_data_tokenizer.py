"""The tokenizer library: a trained directory loads as a LLaMA tokenizer with LLaMA's special ids."""

from __future__ import annotations

import pytest
import sentencepiece as spm
import transformers

from data_fixtures import corpus
from vtimellm_jax import errors
from vtimellm_jax.data import tokenizer as tokenizer_lib


def test_trained_directory_loads_like_llama(tmp_path):
  out = tokenizer_lib.train_tokenizer(iter(corpus(200, seed=3)), tmp_path / "tok", vocab_size=400)
  for tok in (transformers.AutoTokenizer.from_pretrained(str(out)),
              transformers.LlamaTokenizer.from_pretrained(str(out))):
    assert (tok.unk_token, tok.bos_token, tok.eos_token, tok.pad_token) == ("<unk>", "<s>", "</s>",
                                                                            "<unk>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 0)
    assert tok.model_max_length == 2048 and tok.padding_side == "right"
    assert tok("the man 42")["input_ids"][0] == 1
  sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
  assert sp.get_piece_size() == 400
  # LLaMA's sentencepiece behaviour: digits split, unknown characters fall back to bytes.
  assert sp.encode("42", out_type=str) == ["▁", "4", "2"]
  assert sp.encode("ß", out_type=str) == ["▁", "<0xC3>", "<0x9F>"]


def test_bad_training_input_is_a_user_error(tmp_path):
  with pytest.raises(errors.UserError, match="empty"):
    tokenizer_lib.train_tokenizer(["", "  "], tmp_path / "a")
  with pytest.raises(errors.UserError, match="too small"):
    tokenizer_lib.train_tokenizer(["some text"], tmp_path / "b", vocab_size=100)
  with pytest.raises(errors.UserError, match="not a tokenizer directory"):
    tokenizer_lib.load_tokenizer(tmp_path)
