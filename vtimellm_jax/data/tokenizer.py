"""LLaMA sentencepiece tokenizers: train a small one, save/load a directory, encode like the release.

The release tokenized with transformers 4.31's slow `LlamaTokenizer` in legacy mode. That path
(a) splits the text on the special tokens (`<s>`, `</s>`, `<unk>`), (b) runs sentencepiece on every
remaining piece on its own, so each piece gets sentencepiece's dummy `▁` prefix (also the piece
right after `</s>`), and (c) puts BOS in front. transformers 5 only ships the tokenizers-backed
`LlamaTokenizer`, whose Metaspace pre-tokenizer differs from that path in two places:

- with `legacy: false` the text right after `</s>` gets no `▁` prefix;
- a piece that starts with a space gets no extra `▁` (sentencepiece always adds one).

`ReleaseEncoder` therefore does (a) and (c) itself and asks the backend only for (b), feeding it
the piece with one leading space when the backend would otherwise drop the prefix. The result is
token-for-token the legacy slow path (tested against the `sentencepiece` package directly; see
docs/data.md). Which backend quirk applies is probed once at construction, not assumed.
"""

from __future__ import annotations

import io
import json
import os
import pathlib
from typing import Iterable, Sequence

from vtimellm_jax import errors

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPACE_MARKER = "\u2581"  # sentencepiece's word-start marker
MODEL_MAX_LENGTH = 2048


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int = 1000,
                    model_max_length: int = MODEL_MAX_LENGTH, pieces: Sequence[str] = ()) -> pathlib.Path:
  """Returns `out_dir` after writing a LLaMA-like sentencepiece tokenizer trained on `texts` there.

  The model follows LLaMA's sentencepiece settings (BPE, byte fallback, split digits, dummy prefix,
  whitespace kept as is, identity normalization) and ids (unk 0, bos 1, eos 2, pad = unk), so the
  directory loads with `transformers.AutoTokenizer` / `LlamaTokenizer` and behaves like Vicuna's.

  Args:
    texts: training sentences (any iterable; consumed once).
    out_dir: directory to create or overwrite; gets `tokenizer.model`, `tokenizer_config.json` and
      `special_tokens_map.json`.
    vocab_size: sentencepiece vocabulary size; must exceed 259 (3 specials + 256 byte pieces).
    model_max_length: written into the config, as the release's training sets it.
    pieces: strings kept whole as single pieces (sentencepiece's user-defined symbols), e.g. the
      time indices "▁00".."▁99" of a model with a time code (models/time_code.py; a piece that starts
      with the word marker "▁" matches a space before it, as in sentencepiece).
  """
  import sentencepiece as spm  # pylint: disable=g-import-not-at-top

  if vocab_size <= 259:
    raise errors.UserError(f"vocab_size {vocab_size} is too small: byte fallback alone needs 259 ids")
  lines = [t.replace("\n", " ") for t in texts if t and t.strip()]
  if not lines:
    raise errors.UserError("cannot train a tokenizer: the text corpus is empty")
  buf = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, split_digits=True, add_dummy_prefix=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", allow_whitespace_only_pieces=True,
        user_defined_symbols=list(pieces), character_coverage=0.99995, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
        unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, hard_vocab_limit=False, minloglevel=2)
  except RuntimeError as e:
    # sentencepiece reports e.g. a corpus too small for the vocabulary as a RuntimeError.
    raise errors.UserError(f"sentencepiece training failed: {e}") from e
  return save_tokenizer_model(buf.getvalue(), out_dir, model_max_length=model_max_length)


def save_tokenizer_model(model_proto: bytes, out_dir: str | os.PathLike, *,
                         model_max_length: int = MODEL_MAX_LENGTH) -> pathlib.Path:
  """Returns `out_dir` after writing a transformers-loadable LLaMA tokenizer dir for `model_proto`."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "tokenizer.model").write_bytes(model_proto)
  specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": UNK}
  config = dict(specials, tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False,
                legacy=False, model_max_length=model_max_length, padding_side="right",
                clean_up_tokenization_spaces=False)
  (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
  (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
  return out


def load_tokenizer(path: str | os.PathLike, *, model_max_length: int = MODEL_MAX_LENGTH):
  """Returns the transformers LLaMA tokenizer of directory `path`, set up as the release's.

  pad = unk and right padding, as the release's training script sets them.
  """
  import transformers  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path)
  if not (path / "tokenizer.model").exists() and not (path / "tokenizer.json").exists():
    raise errors.UserError(f"{path}: not a tokenizer directory (no tokenizer.model or tokenizer.json)")
  try:
    tok = transformers.AutoTokenizer.from_pretrained(
        str(path), model_max_length=model_max_length, padding_side="right")
  except (OSError, ValueError) as e:
    raise errors.UserError(f"{path}: cannot load the tokenizer: {e}") from e
  tok.pad_token = tok.unk_token
  _match_spaced_pieces(tok)
  return tok


def _match_spaced_pieces(tok) -> None:
  """Makes user-defined pieces that start with the space marker ("▁05") match text (" 05").

  sentencepiece matches such a piece where the text has a space; the tokenizers backend compares
  added tokens with the raw text, which holds " 05", never "▁05", so it spelt them out instead.
  Rewriting their content with a real space gives sentencepiece's ids (and decodes the same).
  Vicuna's tokenizer has no such pieces: it is left untouched.
  """
  spaced = lambda piece: len(piece) > 1 and piece.startswith(SPACE_MARKER)  # noqa: E731
  backend = getattr(tok, "backend_tokenizer", None)
  if backend is None or not any(spaced(str(t)) for t in getattr(tok, "added_tokens_decoder", {}).values()):
    return  # nothing to rewrite (Vicuna's tokenizer): skip serialising a large backend
  state = json.loads(backend.to_str())
  vocab = state.get("model", {}).get("vocab")
  if not isinstance(vocab, dict):
    return
  for token in state.get("added_tokens", []):
    piece = token["content"]
    if not token["special"] and spaced(piece):
      # Renamed in the model's vocabulary too, or the backend would give the piece a new id.
      token["content"] = " " + piece[1:]
      if piece in vocab:
        vocab[token["content"]] = vocab.pop(piece)
  import tokenizers  # pylint: disable=g-import-not-at-top

  tok._tokenizer = tokenizers.Tokenizer.from_str(json.dumps(state))  # pylint: disable=protected-access


def piece_id(vocab: dict[str, int], piece: str) -> int | None:
  """Returns the id of sentencepiece piece `piece` ("▁05" or "05") in a loaded tokenizer's `get_vocab()`,
  or None if it is not one token there."""
  for form in (piece, " " + piece[1:] if piece.startswith(SPACE_MARKER) else None):
    if form is not None and form in vocab:
      return int(vocab[form])
  return None


class ReleaseEncoder:
  """Encodes text exactly like the release's slow legacy LLaMA tokenizer, on any LLaMA backend.

  Picklable (Grain workers get a copy); holds the transformers tokenizer it wraps.
  """

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.bos_id = _required_id(tokenizer, "bos")
    self.eos_id = _required_id(tokenizer, "eos")
    self.unk_id = _required_id(tokenizer, "unk")
    self.pad_id = self.unk_id if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
    # Special tokens the slow tokenizer never splits; longest first so "</s>" beats "<s>".
    self._specials = sorted({tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token}, key=len,
                            reverse=True)
    self._special_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in self._specials}
    self._cache: dict[str, list[int]] = {}
    # A tokenizers Metaspace backend adds no `▁` to a piece that already starts with a space, while
    # sentencepiece always does; one extra leading space restores the prefix in that case.
    self._lead_space = self._backend(" a") == self._backend("a")

  def __getstate__(self):
    return self.__dict__ | {"_cache": {}}

  def _backend(self, text: str) -> list[int]:
    # The Rust backend directly is about 3x faster than `tokenizer(...)` and gives the same ids.
    backend = getattr(self.tokenizer, "backend_tokenizer", None)
    if backend is not None:
      return backend.encode(text, add_special_tokens=False).ids
    return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

  def encode_piece(self, text: str) -> list[int]:
    """Returns sentencepiece's ids of `text` (no special tokens inside), dummy prefix included."""
    if not text:
      return []
    ids = self._cache.get(text)
    if ids is None:
      ids = self._backend(" " + text if self._lead_space else text)
      # Prompts repeat long pieces (the system prompt in every round count): keep recent ones.
      if len(self._cache) >= 4096:
        self._cache.clear()
      self._cache[text] = ids
    return list(ids)

  def split_specials(self, text: str) -> list[str]:
    """Returns `text` cut into special tokens and the (non-empty) text pieces between them."""
    parts = [text]
    for special in self._specials:
      cut = []
      for part in parts:
        if part in self._special_ids:
          cut.append(part)
          continue
        pieces = part.split(special)
        for k, piece in enumerate(pieces):
          if k:
            cut.append(special)
          if piece:
            cut.append(piece)
      parts = cut
    return parts

  def encode(self, text: str, add_bos: bool = True) -> list[int]:
    """Returns the ids the slow legacy tokenizer gives for `text` (`tokenizer(text).input_ids`)."""
    ids = [self.bos_id] if add_bos else []
    for part in self.split_specials(text):
      ids.extend([self._special_ids[part]] if part in self._special_ids else self.encode_piece(part))
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Returns `[self.encode(t) for t in texts]`."""
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    """Returns the text of `ids`, negative ids (placeholder, ignore) left out."""
    return self.tokenizer.decode([i for i in ids if i >= 0])

  def pieces(self, ids: Sequence[int]) -> list[str]:
    """Returns the piece string of every id (`<video>` for the placeholder)."""
    return [self.tokenizer.convert_ids_to_tokens(i) if i >= 0 else "<video>" for i in ids]


def _required_id(tokenizer, name: str) -> int:
  value = getattr(tokenizer, f"{name}_token_id")
  if value is None:
    raise errors.UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no {name} token")
  return int(value)
