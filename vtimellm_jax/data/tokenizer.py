"""LLaMA sentencepiece tokenizers: train a small one, save/load a directory, encode like the release.

The release tokenized with transformers 4.31's slow `LlamaTokenizer`. That path (a) splits the text
on the special tokens (`<s>`, `</s>`, `<unk>`), stripping the whitespace next to a special token
unless the folder declares it an `AddedToken` with `lstrip`/`rstrip` false, (b) runs sentencepiece
on every remaining piece on its own, so each piece gets sentencepiece's dummy `▁` prefix, and (c)
puts BOS in front. With `"legacy": false` in the folder's `tokenizer_config.json` (Vicuna v1.5's
setting; an absent flag means true) step (b) differs for a piece that follows a special token and
does not start with a space: the `▁` is removed from its first sentencepiece token (dropped when
the token is just `▁`) and the shortened string is looked up in the vocabulary (`<unk>` if absent).

transformers 5 only ships the tokenizers-backed `LlamaTokenizer`, whose Metaspace pre-tokenizer
differs from that path (docs/data.md). `ReleaseEncoder` therefore does (a), (c) and the non-legacy
rule itself and asks the backend only for sentencepiece's ids of one piece, feeding it the piece
with one leading space when the backend would otherwise drop the prefix (a quirk probed once at
construction). `load_tokenizer` reads the flag and the special tokens' strip settings from the
folder's json files, as transformers 4.31 did. The result is token-for-token the release's slow
tokenizer (tested against the `sentencepiece` package directly and compared with transformers 4.31;
see docs/data.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Iterable, Protocol, Sequence, runtime_checkable

from vtimellm_jax import errors
from vtimellm_jax.data import chatglm_tokenizer, sentencepiece_training
from vtimellm_jax.models import families

UNK_ID, BOS_ID, EOS_ID = (sentencepiece_training.UNK_ID, sentencepiece_training.BOS_ID,
                          sentencepiece_training.EOS_ID)
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
  if vocab_size <= 259:
    raise errors.UserError(f"vocab_size {vocab_size} is too small: byte fallback alone needs 259 ids")
  lines = [t.replace("\n", " ") for t in texts if t and t.strip()]
  model_proto = sentencepiece_training.train_model(lines, vocab_size, pieces)
  return save_tokenizer_model(model_proto, out_dir, model_max_length=model_max_length)


def save_tokenizer_model(model_proto: bytes, out_dir: str | os.PathLike, *,
                         model_max_length: int = MODEL_MAX_LENGTH) -> pathlib.Path:
  """Returns `out_dir` after writing a transformers-loadable LLaMA tokenizer dir for `model_proto`."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "tokenizer.model").write_bytes(model_proto)
  # As Vicuna v1.5 writes them: AddedToken objects that keep the neighbouring whitespace.
  added = lambda t: {"__type": "AddedToken", "content": t, "lstrip": False, "normalized": False,  # noqa: E731
                     "rstrip": False, "single_word": False}
  specials = {"bos_token": added(BOS), "eos_token": added(EOS), "unk_token": added(UNK), "pad_token": UNK}
  config = dict(specials, tokenizer_class="LlamaTokenizer", add_bos_token=True, add_eos_token=False,
                legacy=False, model_max_length=model_max_length, padding_side="right",
                clean_up_tokenization_spaces=False)
  (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
  special_map = {k: {f: v for f, v in t.items() if f != "__type"} if isinstance(t, dict) else t
                 for k, t in specials.items()}
  (out / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
  return out


def load_tokenizer(path: str | os.PathLike, *, model_max_length: int = MODEL_MAX_LENGTH):
  """Returns the transformers LLaMA tokenizer of directory `path`, set up as the release's.

  pad = unk and right padding, as the release's training script sets them. The folder's
  `ReleaseOptions` (legacy flag, strip settings of the special tokens) ride along as the attribute
  `release_options`, for `ReleaseEncoder`.
  """
  import transformers  # pylint: disable=g-import-not-at-top

  path = pathlib.Path(path)
  if not (path / "tokenizer.model").exists() and not (path / "tokenizer.json").exists():
    raise errors.UserError(f"{path}: not a tokenizer directory (no tokenizer.model or tokenizer.json)")
  options = read_release_options(path)
  try:
    tok = transformers.AutoTokenizer.from_pretrained(
        str(path), model_max_length=model_max_length, padding_side="right")
  except (OSError, ValueError) as e:
    raise errors.UserError(f"{path}: cannot load the tokenizer: {e}") from e
  tok.pad_token = tok.unk_token
  _match_spaced_pieces(tok)
  tok.release_options = options
  return tok


@dataclasses.dataclass(frozen=True)
class ReleaseOptions:
  """How transformers 4.31's slow `LlamaTokenizer` treats a tokenizer folder.

  legacy: `tokenizer_config.json`'s `legacy` (absent: True, 4.31's default).
  strip: special token -> (lstrip, rstrip): whether it eats the whitespace on its left / right.
    4.31 keeps the whitespace next to an `AddedToken` with lstrip/rstrip false (how the config's
    plain strings are wrapped) and strips both sides of a special token that
    `special_tokens_map.json` gives as a plain string. The release sets pad = unk afterwards, so
    `<unk>` follows the unk token.
  """
  legacy: bool = True
  strip: tuple[tuple[str, bool, bool], ...] = ()

  def strips(self, token: str) -> tuple[bool, bool]:
    for name, left, right in self.strip:
      if name == token:
        return left, right
    return False, False


def read_release_options(path: str | os.PathLike) -> ReleaseOptions:
  """Returns how transformers 4.31's slow tokenizer reads tokenizer folder `path` (see ReleaseOptions).

  Raises:
    UserError: a json file is unreadable, `legacy` is not a bool, or a special token entry is
      neither a string nor an object with a string `content`.
  """
  path = pathlib.Path(path)
  config_file, map_file = path / "tokenizer_config.json", path / "special_tokens_map.json"
  config = chatglm_tokenizer.read_settings(config_file) if config_file.exists() else {}
  legacy = config.get("legacy", True)
  if not isinstance(legacy, bool):
    raise errors.UserError(f"{config_file}: 'legacy' must be true or false, found {legacy!r}")
  special_map = chatglm_tokenizer.read_settings(map_file) if map_file.exists() else {}
  strip = []
  for key, default in (("bos_token", BOS), ("eos_token", EOS), ("unk_token", UNK)):
    # 4.31: the config's value (a plain string is wrapped as an AddedToken that strips nothing),
    # then special_tokens_map.json's value replaces it as it is (a plain string strips both sides).
    token, left, right = _special_entry(config.get(key, default), config_file, key, wrapped=True)
    if key in special_map:
      token, left, right = _special_entry(special_map[key], map_file, key, wrapped=False)
    if token is not None:
      strip.append((token, left, right))
  return ReleaseOptions(legacy=legacy, strip=tuple(strip))


def _special_entry(value, file: pathlib.Path, key: str, *, wrapped: bool):
  if value is None:
    return None, False, False
  if isinstance(value, str):
    return value, not wrapped, not wrapped
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"], bool(value.get("lstrip", False)), bool(value.get("rstrip", False))
  raise errors.UserError(f"{file}: {key!r} must be a string or an AddedToken object, found {value!r}")


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


@runtime_checkable
class Encoder(Protocol):
  """What templates, the input pipeline and inference prompts use of a tokenizer, whatever its family.

  `family` names the encoder's record in `models.families`, which says the templates its ids are
  built with; nothing above this module asks which class an encoder is, so a family's tokenizer
  needs no branch in the modules that use it. `ReleaseEncoder` and `chatglm_tokenizer.ChatGLMEncoder`
  are the two; `load_encoder` picks one for a tokenizer folder.
  """

  family: str
  eos_id: int
  pad_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...

  def answer_text(self, ids: Sequence[int]) -> str: ...

  def pieces(self, ids: Sequence[int]) -> list[str]: ...


class ReleaseEncoder:
  """Encodes text exactly like the release's slow LLaMA tokenizer, on any LLaMA backend.

  Follows the folder's `legacy` flag and special-token strip settings (`ReleaseOptions`): taken
  from `options`, else from the tokenizer's `release_options` (set by `load_tokenizer`), else read
  from the tokenizer's folder (`name_or_path`), else 4.31's defaults (legacy, nothing stripped).
  Picklable (Grain workers get a copy); holds the transformers tokenizer it wraps.
  """

  family = families.VICUNA.name  # the LLaMA-tokenizer family: templates `plain` and `v1`

  def __init__(self, tokenizer, options: ReleaseOptions | None = None):
    self.tokenizer = tokenizer
    if options is None:
      options = getattr(tokenizer, "release_options", None)
    if options is None:
      folder = pathlib.Path(str(getattr(tokenizer, "name_or_path", "") or ""))
      options = read_release_options(folder) if str(folder) and folder.is_dir() else ReleaseOptions()
    self.options = options
    self.legacy = options.legacy
    self.bos_id = _required_id(tokenizer, "bos")
    self.eos_id = _required_id(tokenizer, "eos")
    self.unk_id = _required_id(tokenizer, "unk")
    self.pad_id = self.unk_id if tokenizer.pad_token_id is None else int(tokenizer.pad_token_id)
    # Special tokens the slow tokenizer never splits; longest first so "</s>" beats "<s>".
    self._specials = sorted({tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token}, key=len,
                            reverse=True)
    self._special_ids = {t: tokenizer.convert_tokens_to_ids(t) for t in self._specials}
    self._strips = {t: options.strips(t) for t in self._specials}
    self._cache: dict[str, list[int]] = {}
    self._vocab: dict[str, int] | None = None  # built on first need (non-legacy), not pickled
    self._id_pieces: dict[int, str] | None = None
    # A tokenizers Metaspace backend adds no `▁` to a piece that already starts with a space, while
    # sentencepiece always does; one extra leading space restores the prefix in that case.
    self._lead_space = self._backend(" a") == self._backend("a")

  def __getstate__(self):
    return self.__dict__ | {"_cache": {}, "_vocab": None, "_id_pieces": None}

  def __len__(self) -> int:
    """Returns the number of token ids (`len` of the wrapped tokenizer), as `ChatGLMEncoder` does."""
    return len(self.tokenizer)

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

  def encode_piece_after_special(self, text: str) -> list[int]:
    """Returns the non-legacy ids of `text` right after a special token (4.31's `_tokenize`).

    A piece that does not start with a space loses the `▁` of its first sentencepiece token: a bare
    `▁` is dropped, otherwise the rest of the token is looked up in the vocabulary (`<unk>` if it
    is not there).
    """
    ids = self.encode_piece(text)
    if self.legacy or not ids or text.startswith(" "):
      return ids
    first = self._piece(ids[0])
    if not first.startswith(SPACE_MARKER):
      return ids
    if len(first) == 1:
      return ids[1:]
    return [self._lookup(first[1:])] + ids[1:]

  def _piece(self, token_id: int) -> str:
    """Returns sentencepiece's piece string of a backend id."""
    if self._id_pieces is None:
      pieces = {}
      for piece, i in self.vocab.items():
        # `_match_spaced_pieces` spells user pieces "▁05" as " 05" in the backend.
        pieces.setdefault(int(i), SPACE_MARKER + piece[1:] if piece.startswith(" ") else piece)
      self._id_pieces = pieces
    return self._id_pieces.get(int(token_id), "")

  def _lookup(self, piece: str) -> int:
    return int(self.vocab.get(piece, self.unk_id))

  @property
  def vocab(self) -> dict[str, int]:
    """The tokenizer's `get_vocab()`, read once."""
    if self._vocab is None:
      self._vocab = dict(self.tokenizer.get_vocab())
    return self._vocab

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
    """Returns the ids the release's slow tokenizer gives for `text` (`tokenizer(text).input_ids`)."""
    if not self.legacy:
      text = text.replace(SPACE_MARKER, " ")  # 4.31 keeps `▁` for the start of the whole text
    parts = self.split_specials(text)
    for k, part in enumerate(parts):
      if part in self._special_ids:
        left, right = self._strips[part]
        if left and k and parts[k - 1] not in self._special_ids:
          parts[k - 1] = parts[k - 1].rstrip()
        if right and k + 1 < len(parts) and parts[k + 1] not in self._special_ids:
          parts[k + 1] = parts[k + 1].lstrip()
    ids = [self.bos_id] if add_bos else []
    for k, part in enumerate(parts):
      if part in self._special_ids:
        ids.append(self._special_ids[part])
      elif k and parts[k - 1] in self._special_ids:
        ids.extend(self.encode_piece_after_special(part))
      else:
        ids.extend(self.encode_piece(part))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Returns the text of `ids`, negative ids (placeholder, ignore) left out."""
    return self.tokenizer.decode([i for i in ids if i >= 0])

  def answer_text(self, ids: Sequence[int]) -> str:
    """Returns the text of generated ids as the release decodes an answer: special tokens left out,
    nothing stripped."""
    return self.tokenizer.decode([i for i in ids if i >= 0], skip_special_tokens=True)

  def pieces(self, ids: Sequence[int]) -> list[str]:
    """Returns the piece string of every id (`<video>` for the placeholder)."""
    return [self.tokenizer.convert_ids_to_tokens(i) if i >= 0 else "<video>" for i in ids]


def _required_id(tokenizer, name: str) -> int:
  value = getattr(tokenizer, f"{name}_token_id")
  if value is None:
    raise errors.UserError(f"tokenizer {getattr(tokenizer, 'name_or_path', '?')} has no {name} token")
  return int(value)


def load_encoder(path: str | os.PathLike, *, model_max_length: int = MODEL_MAX_LENGTH):
  """Returns the release-compatible encoder of tokenizer folder `path`, for either model family.

  A folder whose tokenizer_config.json names `ChatGLMTokenizer` gives a
  `chatglm_tokenizer.ChatGLMEncoder`; any other gives `ReleaseEncoder(load_tokenizer(path))`.

  Raises:
    UserError: the folder is missing, not a tokenizer folder, or its files are unreadable.
  """
  if not pathlib.Path(path).is_dir():
    raise errors.UserError(f"{path}: not a tokenizer folder")
  if chatglm_tokenizer.is_chatglm_folder(path):
    return chatglm_tokenizer.ChatGLMEncoder(path)
  return ReleaseEncoder(load_tokenizer(path, model_max_length=model_max_length))
