"""ChatGLM3 tokenizers on `sentencepiece`: load a folder, encode and decode as the release did.

A ChatGLM3 tokenizer folder holds `tokenizer.model` (a sentencepiece BPE model with byte fallback
and a dummy prefix; unk 0, bos 1, eos 2) and `tokenizer_config.json` naming `tokenizer_class`
"ChatGLMTokenizer". On top of the sentencepiece ids ChatGLM3 puts 9 extra ids, in this order from
the model's size on: `[MASK] [gMASK] [sMASK] sop eop <|system|> <|user|> <|assistant|>
<|observation|>`. A text is `[gMASK] sop` followed by sentencepiece's ids of the whole text.

The release ran ChatGLM3's tokenizer class under transformers 4.31 (docs/data.md). That version
never splits a ChatGLM3 text at special-token strings: the class keeps no special token in the
attributes 4.31 reads for splitting (whether or not the folder's `tokenizer_config.json` declares
`eos_token` / `unk_token` / `pad_token`), so `</s>`, `<unk>` or `<|user|>` typed in a message are
spelt out by sentencepiece. Only `encode_special_tokens: true` in the config changes that: the four
role strings are then cut out of the text and given their ids. `ChatGLMEncoder` does exactly this.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
from typing import Iterable, Sequence

from vtimellm_jax import errors
from vtimellm_jax.data import sentencepiece_training
from vtimellm_jax.models import families

TOKENIZER_CLASS = "ChatGLMTokenizer"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
EXTRA_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop") + ROLE_TOKENS
UNK_ID, BOS_ID, EOS_ID = (sentencepiece_training.UNK_ID, sentencepiece_training.BOS_ID,
                          sentencepiece_training.EOS_ID)
_BYTE_PIECES = 256


def tokenizer_class(path: str | os.PathLike) -> str | None:
  """Returns `tokenizer_class` of folder `path`'s tokenizer_config.json (None without one).

  Raises:
    UserError: the file exists but is not a readable JSON object.
  """
  file = pathlib.Path(path) / "tokenizer_config.json"
  if not file.exists():
    return None
  value = read_settings(file).get("tokenizer_class")
  return value if isinstance(value, str) else None


def is_chatglm_folder(path: str | os.PathLike) -> bool:
  """Returns whether tokenizer folder `path` declares ChatGLM3's tokenizer class."""
  return tokenizer_class(path) == TOKENIZER_CLASS


def read_settings(file: pathlib.Path) -> dict:
  """Returns a tokenizer folder's JSON settings file as a dict; UserError naming the file otherwise."""
  try:
    data = json.loads(file.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise errors.UserError(f"{file}: cannot read the tokenizer settings: {e}") from e
  if not isinstance(data, dict):
    raise errors.UserError(f"{file}: expected a JSON object, found {type(data).__name__}")
  return data


class ChatGLMEncoder:
  """Encodes and decodes like ChatGLM3's tokenizer under transformers 4.31 (see the module doc).

  Attributes:
    family: its record in `models.families` ('chatglm3'), which names the template its ids suit.
    path: the tokenizer folder.
    gmask_id, sop_id, user_id, assistant_id: ids of those extra tokens.
    eos_id: sentencepiece's eos (`</s>`), which closes a training sample.
    pad_id, unk_id: sentencepiece's unk (ChatGLM3 pads with it).
    vocab_size: sentencepiece pieces + 9 extra tokens (65024 for ChatGLM3-6B).
    stop_ids: (user_id, eos_id), the ids that end a generated answer in the release.
    encode_special_tokens: the config's flag: role strings in the text become role ids.

  Picklable (Grain workers get a copy): the sentencepiece model travels as its bytes.
  """

  family = families.CHATGLM3.name

  def __init__(self, path: str | os.PathLike):
    self.path = pathlib.Path(path)
    config_file = self.path / "tokenizer_config.json"
    if not self.path.is_dir():
      raise errors.UserError(f"{self.path}: not a tokenizer folder")
    if not config_file.exists():
      raise errors.UserError(f"{self.path}: no tokenizer_config.json (a ChatGLM3 tokenizer folder "
                             f"declares tokenizer_class {TOKENIZER_CLASS!r} there)")
    config = read_settings(config_file)
    if config.get("tokenizer_class") != TOKENIZER_CLASS:
      raise errors.UserError(f"{config_file}: tokenizer_class is {config.get('tokenizer_class')!r}, "
                             f"not {TOKENIZER_CLASS!r}")
    flag = config.get("encode_special_tokens", False)
    if not isinstance(flag, bool):
      raise errors.UserError(f"{config_file}: 'encode_special_tokens' must be true or false, "
                             f"found {flag!r}")
    self.encode_special_tokens = flag
    model_file = self.path / "tokenizer.model"
    try:
      proto = model_file.read_bytes()
    except OSError as e:
      raise errors.UserError(f"{self.path}: cannot read the sentencepiece model tokenizer.model: "
                             f"{e}") from e
    self._setup(proto)

  def _setup(self, proto: bytes) -> None:
    import sentencepiece as spm  # pylint: disable=g-import-not-at-top

    self._proto = proto
    sp = spm.SentencePieceProcessor()
    try:
      sp.LoadFromSerializedProto(proto)
    except (RuntimeError, OSError) as e:
      raise errors.UserError(f"{self.path / 'tokenizer.model'}: not a sentencepiece model: {e}") from e
    if sp.eos_id() < 0 or sp.unk_id() < 0:
      raise errors.UserError(f"{self.path / 'tokenizer.model'}: the sentencepiece model has no "
                             "eos or unk piece")
    self._sp = sp
    self.sp_size = sp.get_piece_size()
    self._extra = {name: self.sp_size + k for k, name in enumerate(EXTRA_TOKENS)}
    self._extra_names = {i: name for name, i in self._extra.items()}
    self.vocab_size = self.sp_size + len(EXTRA_TOKENS)
    self.eos_id, self.unk_id, self.bos_id = sp.eos_id(), sp.unk_id(), sp.bos_id()
    self.pad_id = self.unk_id
    self.gmask_id, self.sop_id = self._extra["[gMASK]"], self._extra["sop"]
    self.user_id, self.assistant_id = self._extra["<|user|>"], self._extra["<|assistant|>"]
    self.stop_ids = (self.user_id, self.eos_id)
    self._roles = re.compile("|".join(re.escape(t) for t in ROLE_TOKENS))
    # The ids 4.31 decodes as "" (its class maps eos, bos and pad = unk to empty strings).
    self._silent = {i for i in (self.eos_id, self.unk_id, self.bos_id) if i >= 0}
    self._vocab: dict[str, int] | None = None

  def __getstate__(self):
    return {"path": self.path, "encode_special_tokens": self.encode_special_tokens,
            "proto": self._proto}

  def __setstate__(self, state):
    self.path = state["path"]
    self.encode_special_tokens = state["encode_special_tokens"]
    self._setup(state["proto"])

  def __len__(self) -> int:
    return self.vocab_size

  def __repr__(self) -> str:
    return f"ChatGLMEncoder({str(self.path)!r}, vocab_size={self.vocab_size})"

  def command(self, name: str) -> int:
    """Returns the id of an extra token ('[gMASK]', 'sop', '<|user|>', ...) or of '<eos>'/'<pad>'/'<bos>'.

    Raises:
      UserError: `name` is none of them.
    """
    ids = {"<bos>": self.bos_id, "<eos>": self.eos_id, "<pad>": self.pad_id, **self._extra}
    if name not in ids:
      raise errors.UserError(f"{name!r} is not a ChatGLM3 special token; known: {', '.join(ids)}")
    return ids[name]

  def encode(self, text: str) -> list[int]:
    """Returns the ids the release's tokenizer gives for `text`, without the `[gMASK] sop` prefix.

    That is sentencepiece's ids of the whole text (dummy prefix included; an empty text gives
    none); with `encode_special_tokens` each role string in the text is its role id and the text
    between them is encoded piece by piece.
    """
    if not self.encode_special_tokens:
      return list(self._sp.encode(text)) if text else []
    ids, last = [], 0
    for match in self._roles.finditer(text):
      if match.start() > last:
        ids.extend(self._sp.encode(text[last:match.start()]))
      ids.append(self._extra[match.group()])
      last = match.end()
    if last < len(text):
      ids.extend(self._sp.encode(text[last:]))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Returns the text of `ids`, special tokens left out, nothing stripped.

    As transformers 4.31's decode of the release's tokenizer with clean-up off, except that the
    9 extra tokens are dropped too (4.31 spells their names; the release's answers end before its
    stop ids, so none of them is in an answer it shows). eos, bos, unk and negative ids
    (placeholder, ignore) are dropped as 4.31 drops them.
    """
    keep = [int(i) for i in ids if 0 <= i < self.sp_size and int(i) not in self._silent]
    return self._sp.decode(keep)

  def answer_text(self, ids: Sequence[int]) -> str:
    """Returns the text of generated ids as the release decodes an answer: `decode`'s, which already
    leaves every special token out."""
    return self.decode(ids)

  def pieces(self, ids: Sequence[int]) -> list[str]:
    """Returns the piece string of every id (extra tokens by name, `<video>` for the placeholder)."""
    out = []
    for i in ids:
      i = int(i)
      if i < 0:
        out.append("<video>")
      elif i in self._extra_names:
        out.append(self._extra_names[i])
      elif i < self.sp_size:
        out.append(self._sp.id_to_piece(i))
      else:
        out.append(f"<id {i}>")
    return out

  @property
  def vocab(self) -> dict[str, int]:
    """Returns piece -> id for every sentencepiece piece and extra token."""
    if self._vocab is None:
      self._vocab = {self._sp.id_to_piece(i): i for i in range(self.sp_size)} | self._extra
    return self._vocab


def train_chatglm_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, *, vocab_size: int,
                            pieces: Sequence[str] = ()) -> pathlib.Path:
  """Returns `out_dir` after writing a small ChatGLM3-like tokenizer folder trained on `texts`.

  sentencepiece BPE with ChatGLM3's settings (byte fallback, dummy prefix, digits split, whitespace
  kept, identity normalization, unk 0 / bos 1 / eos 2) and a tokenizer_config.json naming
  ChatGLMTokenizer. Chinese text works: when the corpus has more distinct characters than the
  vocabulary can hold, the rarest are left to byte fallback.

  Args:
    texts: training sentences (any iterable; consumed once).
    out_dir: directory to create or overwrite; gets `tokenizer.model` and `tokenizer_config.json`.
    vocab_size: sentencepiece vocabulary size (the 9 extra tokens come on top); must exceed 259
      plus the number of `pieces`.
    pieces: strings kept whole as single pieces (sentencepiece's user-defined symbols).
  """
  lines = [t.replace("\n", " ") for t in texts if t and t.strip()]
  if not lines:
    raise errors.UserError("cannot train a tokenizer: the text corpus is empty")
  room = vocab_size - 3 - _BYTE_PIECES - len(pieces)
  if room < 2:
    raise errors.UserError(f"vocab_size {vocab_size} is too small: byte fallback and "
                           f"{len(pieces)} fixed piece(s) alone need {vocab_size - room + 2} ids")
  model_proto = sentencepiece_training.train_model(_common_characters_only(lines, max(room // 2, 1)), vocab_size,
                                                   pieces)
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / "tokenizer.model").write_bytes(model_proto)
  # As ChatGLM3-6B's folder of late 2023 writes it (the remote-code entry left out).
  config = {"tokenizer_class": TOKENIZER_CLASS, "remove_space": False, "do_lower_case": False,
            "padding_side": "left", "clean_up_tokenization_spaces": False}
  (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
  return out


def _common_characters_only(lines: Sequence[str], keep: int) -> list[str]:
  """Returns `lines` without the characters outside the `keep` most frequent ones (spaces stay).

  sentencepiece fails when the characters it must keep outnumber the vocabulary and keeps at
  least 98% of the corpus's characters; a small vocabulary over Chinese text needs fewer, so the
  rare ones are left out of training (they encode by byte fallback). Half of the room is left for
  merges.
  """
  counts = collections.Counter(c for line in lines for c in line if c != " ")
  if len(counts) <= keep:
    return list(lines)
  common = {c for c, _ in counts.most_common(keep)} | {" "}
  kept = ["".join(c for c in line if c in common) for line in lines]
  return [line for line in kept if line.strip()]
