"""The frame-time code of small models (models/time_code.py): the code, the frames, the pieces, the plumbing."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from vtimellm_jax.configs import common
from vtimellm_jax.data import tokenizer as tokenizer_lib
from vtimellm_jax.errors import UserError
from vtimellm_jax.models import llama, time_code
from vtimellm_jax.models.load import load_model, save_model
from vtimellm_jax.models.vtimellm import VTimeLLM
from vtimellm_jax.training import model_setup

TEXTS = [f"From {a:02d} to {b:02d}, a red square slides." for a in range(0, 90, 7) for b in (a + 5, a + 9)] * 4


@pytest.mark.parametrize("dim", [64, 128, 129])
def test_code_is_unit_rms_and_names_every_index(dim):
  c = np.asarray(time_code.code(np.arange(100), dim))
  assert c.shape == (100, dim)
  np.testing.assert_allclose(np.sqrt((c ** 2).mean(-1)), 1.0, rtol=1e-5)
  # What init_time_pieces relies on: each index's code scores itself highest among the 100.
  np.testing.assert_array_equal((c @ c.T).argmax(-1), np.arange(100))


def test_frames_get_the_code_and_images_do_not():
  x = jax.random.normal(jax.random.key(0), (2, 100, 32)) * 3.0
  out = np.asarray(time_code.add_to_frames(x, 0.5))
  rms = np.sqrt((np.asarray(x) ** 2).mean(-1, keepdims=True))
  np.testing.assert_allclose(out - np.asarray(x), 0.5 * rms * np.asarray(time_code.code(np.arange(100), 32))[None],
                             rtol=1e-5, atol=1e-5)
  image = x[:, :1]
  np.testing.assert_array_equal(np.asarray(time_code.add_to_frames(image, 0.5)), np.asarray(image))
  np.testing.assert_array_equal(np.asarray(time_code.add_to_frames(x, 0.0)), np.asarray(x))
  # 50 frames sit on the same 00-99 grid: frame k is at index 2k.
  half = np.asarray(time_code.add_to_frames(x[:, :50], 1.0)) - np.asarray(x[:, :50])
  want = np.broadcast_to(np.asarray(time_code.code(np.arange(0, 100, 2), 32)), half.shape)
  np.testing.assert_allclose(half / rms[:, :50], want, rtol=1e-4, atol=1e-5)


def _model(time_code_scale, vocab=64):
  config = llama.tiny(vocab_size=vocab, time_code=time_code_scale)
  return VTimeLLM(config, nnx.Rngs(0))


def test_model_adds_the_code_to_video_tokens_only_when_set(tmp_path):
  ids = jnp.asarray([[1, 5, -200, 7, 8]])
  mask = jnp.ones_like(ids)
  feats = jax.random.normal(jax.random.key(1), (1, 100, 768))
  plain, coded = _model(0.0), _model(1.0)
  e0, _, _ = plain.embed_inputs(ids, mask, feats)
  e1, _, _ = coded.embed_inputs(ids, mask, feats)
  assert not np.allclose(np.asarray(e0[:, 2:102]), np.asarray(e1[:, 2:102]))
  np.testing.assert_array_equal(np.asarray(e0[:, :2]), np.asarray(e1[:, :2]))  # text untouched
  # The scale travels with the model directory, so chat/eval add the same code.
  save_model(coded, tmp_path / "m")
  loaded = load_model(tmp_path / "m")
  assert loaded.config.time_code == 1.0
  e2, _, _ = loaded.embed_inputs(ids, mask, feats)
  np.testing.assert_allclose(np.asarray(e2), np.asarray(e1), rtol=1e-6)


def test_tokenizer_keeps_time_pieces_whole(tmp_path):
  import sentencepiece as spm

  tok_dir = tokenizer_lib.train_tokenizer(TEXTS, tmp_path / "tok", vocab_size=420, pieces=time_code.TIME_PIECES)
  tok = tokenizer_lib.load_tokenizer(tok_dir)
  text = "From 37 to 49, red 05."
  ids = tokenizer_lib.ReleaseEncoder(tok).encode(text, add_bos=False)
  # The word before an index is right before it (no lone space token), as sentencepiece itself cuts it.
  assert ids == spm.SentencePieceProcessor(model_file=str(tok_dir / "tokenizer.model")).encode(text)
  for index in ("▁37", "▁49", "▁05"):
    assert tokenizer_lib.piece_id(tok.get_vocab(), index) in ids
  assert tok.decode(ids) == text


def test_bare_time_pieces_still_serve(tmp_path):
  bare = [p.lstrip(tokenizer_lib.SPACE_MARKER) for p in time_code.TIME_PIECES]
  tok_dir = tokenizer_lib.train_tokenizer(TEXTS, tmp_path / "tok", vocab_size=420, pieces=bare)
  tok = tokenizer_lib.load_tokenizer(tok_dir)
  model = model_setup.build_base(_config(tok_dir, 1.0), vocab_size=len(tok.get_vocab()))
  ids = [tokenizer_lib.piece_id(tok.get_vocab(), p) for p in bare]
  frames = np.asarray(time_code.code(np.arange(100), model.config.hidden_size))
  np.testing.assert_array_equal((frames @ np.asarray(model.lm_head.kernel[...])[:, ids]).argmax(-1), np.arange(100))


def _config(tok_dir, scale):
  c = common.recipe("tiny")
  c.data.tokenizer = str(tok_dir)
  c.model.time_code = scale
  return c


def test_random_init_starts_time_pieces_from_the_code(tmp_path):
  tok_dir = tokenizer_lib.train_tokenizer(TEXTS, tmp_path / "tok", vocab_size=420, pieces=time_code.TIME_PIECES)
  tok = tokenizer_lib.load_tokenizer(tok_dir)
  vocab = tok.get_vocab()
  ids = [tokenizer_lib.piece_id(vocab, p) for p in time_code.TIME_PIECES]
  model = model_setup.build_base(_config(tok_dir, 1.0), vocab_size=len(vocab))
  assert model.config.time_code == 1.0
  out = np.asarray(model.lm_head.kernel[...])[:, ids]  # [D, 100]
  frames = np.asarray(time_code.code(np.arange(100), model.config.hidden_size))
  # A hidden state equal to frame t's code picks the piece of t.
  np.testing.assert_array_equal((frames @ out).argmax(-1), np.arange(100))
  embed = np.asarray(model.model.embed_tokens[...])[ids]
  np.testing.assert_allclose(embed, frames * time_code.EMBED_STD, rtol=1e-5, atol=1e-7)
  # Without the option nothing is special about those rows.
  plain = model_setup.build_base(_config(tok_dir, 0.0), vocab_size=len(vocab))
  assert plain.config.time_code == 0.0
  assert not np.allclose(np.asarray(plain.lm_head.kernel[...])[:, ids], out)


def test_time_code_needs_the_pieces(tmp_path):
  tok_dir = tokenizer_lib.train_tokenizer(TEXTS, tmp_path / "tok", vocab_size=420)
  with pytest.raises(UserError, match=r"tok.*100 index pieces.*missing '▁00'"):
    model_setup.build_base(_config(tok_dir, 1.0), vocab_size=420)
