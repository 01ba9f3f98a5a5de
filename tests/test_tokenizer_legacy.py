"""The tokenizer folder's `legacy` flag: ids and labels as the release's transformers 4.31 made them.

The reference is written here from transformers 4.31's slow `LlamaTokenizer` rules, on the
`sentencepiece` package directly:
- the text is split at `<s>`, `</s>`, `<unk>`; BOS goes in front;
- legacy true: every other piece is encoded by sentencepiece on its own;
- legacy false: `▁` in the text becomes a space; the text before the first special token is
  encoded as in legacy mode; a piece after a special token that does not start with a space loses
  the `▁` of its first sentencepiece token (a bare `▁` is dropped) and the rest is looked up as a
  piece (`<unk>`, id 0, when it is not one);
- the special tokens here are AddedToken objects with lstrip/rstrip false: neighbouring whitespace
  stays; a special token given as a plain string in special_tokens_map.json eats it on both sides.
Labels follow the release's `tokenizer_image_token` and `preprocess_v1` (rounds counted on their
own) and `preprocess_plain`, also written here.
"""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
import sentencepiece as spm

from data_fixtures import tiny_tokenizer_dir  # noqa: F401  pylint: disable=unused-import
from vtimellm_jax import errors
from vtimellm_jax.data import templates
from vtimellm_jax.data import tokenizer as tokenizer_lib

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SPECIAL = {"<s>": 1, "</s>": 2, "<unk>": 0}
MARK = "\u2581"
IGNORE, VIDEO = -100, -200


def split_specials(text: str) -> list[str]:
  out, pos = [], 0
  while pos < len(text):
    hits = [(text.find(s, pos), -len(s), s) for s in SPECIAL if text.find(s, pos) >= 0]
    if not hits:
      out.append(text[pos:])
      break
    at, _, special = min(hits)
    if at > pos:
      out.append(text[pos:at])
    out.append(special)
    pos = at + len(special)
  return out


def slow_ids(sp, text: str, legacy: bool, strip_all: bool = False) -> list[int]:
  """`tokenizer(text).input_ids` of transformers 4.31's slow LlamaTokenizer, from its rules."""
  if not legacy:
    text = text.replace(MARK, " ")
  parts = split_specials(text)
  if strip_all:
    for k, part in enumerate(parts):
      if part in SPECIAL:
        if k and parts[k - 1] not in SPECIAL:
          parts[k - 1] = parts[k - 1].rstrip()
        if k + 1 < len(parts) and parts[k + 1] not in SPECIAL:
          parts[k + 1] = parts[k + 1].lstrip()
  ids = [1]
  for k, part in enumerate(parts):
    if part in SPECIAL:
      ids.append(SPECIAL[part])
      continue
    if not part:
      continue
    pieces = sp.encode(part, out_type=str)
    after_special = k > 0
    if not legacy and after_special and not part.startswith(" ") and pieces[0].startswith(MARK):
      pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
    ids.extend(sp.piece_to_id(p) for p in pieces)  # an unknown piece gives unk (0)
  return ids


def image_token_ids(sp, prompt: str, legacy: bool) -> list[int]:
  """The release's tokenizer_image_token: chunks around <video>, first BOS kept, -200 between."""
  chunks = [slow_ids(sp, c, legacy) for c in prompt.split("<video>")]
  ids = [chunks[0][0]]
  for k, chunk in enumerate(chunks):
    if k:
      ids.append(VIDEO)
    ids.extend(chunk[1:])
  return ids


def release_v1(sp, turns, legacy: bool, max_length: int = 2048):
  """The release's preprocess_v1 (has_image) on the Vicuna v1 prompt of `turns`."""
  conv = SYSTEM + " "
  for k, (role, text) in enumerate(turns):
    conv += ("USER", "ASSISTANT")[k % 2] + ": " + text + (" ", "</s>")[k % 2]
  ids = image_token_ids(sp, conv, legacy)
  labels = list(ids)
  total = sum(1 for i in ids if i != 0)
  cur = 1
  labels[:1] = [IGNORE]
  for rnd in conv.split("</s>"):
    if not rnd:
      break
    parts = rnd.split(" ASSISTANT: ")
    if len(parts) != 2:
      break
    round_len = len(image_token_ids(sp, rnd, legacy))
    instruction_len = len(image_token_ids(sp, parts[0] + " ASSISTANT: ", legacy)) - 2
    labels[cur:cur + instruction_len] = [IGNORE] * len(labels[cur:cur + instruction_len])
    cur += round_len
  labels[cur:] = [IGNORE] * len(labels[cur:])
  dropped = cur < max_length and cur != total
  return ids, [IGNORE] * len(ids) if dropped else labels, dropped


def release_plain(sp, caption: str, legacy: bool):
  ids = image_token_ids(sp, "<video>\n" + caption + "\n", legacy)
  n = len(image_token_ids(sp, "<video>\n", legacy))
  return ids, [IGNORE] * n + ids[n:]


def _folder(src, dst, legacy, plain_string_specials=False):
  shutil.copytree(src, dst)
  config = json.loads((dst / "tokenizer_config.json").read_text())
  config.pop("legacy", None)
  if legacy is not None:
    config["legacy"] = legacy
  if plain_string_specials:
    for key in ("bos_token", "eos_token", "unk_token"):
      config[key] = SPECIAL_NAMES[key]
    (dst / "special_tokens_map.json").write_text(json.dumps(dict(SPECIAL_NAMES, pad_token="<unk>")))
  (dst / "tokenizer_config.json").write_text(json.dumps(config))
  return dst


SPECIAL_NAMES = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
FLAGS = {"false": False, "absent": None, "true": True}


@pytest.fixture(scope="module")
def sp(tiny_tokenizer_dir):  # noqa: F811
  return spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))


@pytest.fixture(scope="module", params=sorted(FLAGS))
def flagged(request, tiny_tokenizer_dir, tmp_path_factory):  # noqa: F811
  """(legacy as 4.31 reads it, encoder) for a folder with `legacy` false, absent or true."""
  flag = FLAGS[request.param]
  folder = _folder(tiny_tokenizer_dir, tmp_path_factory.mktemp("flag") / "tok", flag)
  enc = tokenizer_lib.ReleaseEncoder(tokenizer_lib.load_tokenizer(folder))
  return flag is not False, enc


def test_written_folder_is_vicuna_like(tiny_tokenizer_dir):  # noqa: F811
  config = json.loads((tiny_tokenizer_dir / "tokenizer_config.json").read_text())
  assert config["legacy"] is False
  assert config["eos_token"]["lstrip"] is False and config["eos_token"]["rstrip"] is False
  options = tokenizer_lib.read_release_options(tiny_tokenizer_dir)
  assert not options.legacy and options.strips("</s>") == (False, False)


TEXTS = [
    "x</s>USER: next", "</s>USER: at the start", "a</s> USER after a space", "a</s>ß byte fallback",
    "a</s>\nnew line", "a</s>42 digits", "a</s>東京 café", "x<s>y<unk>z", "<s>", "", " one",
    "  two leading", "with " + MARK + "marker</s>" + MARK + "b", "ends with a space </s>",
    SYSTEM + " USER: hi ASSISTANT: From 00 to 09.</s>USER: again ASSISTANT: ok</s>",
]


def test_encode_equals_the_slow_tokenizer_rules(sp, flagged):
  legacy, enc = flagged
  assert enc.legacy is legacy
  for text in TEXTS:
    assert enc.encode(text) == slow_ids(sp, text, legacy), (legacy, text)


def test_the_flag_changes_ids_after_a_special_token(sp, flagged):
  legacy, enc = flagged
  ids = enc.encode("a</s>USER: hi")
  assert ids[:3] == [1, sp.piece_to_id(MARK + "a"), 2]
  first = sp.encode("USER: hi", out_type=str)[0]
  assert first.startswith(MARK)
  want = sp.piece_to_id(first if legacy else first[1:])
  assert ids[3] == want
  # The tiny vocabulary has "▁USER"-like pieces whose stripped form is not a piece: <unk>.
  stripped = [p[1:] for p in sp.encode("USER", out_type=str)[:1] if len(p) > 1]
  if not legacy and stripped and sp.piece_to_id(stripped[0]) == 0:
    assert ids[3] == 0


def test_unknown_stripped_piece_becomes_unk(sp, tiny_tokenizer_dir, tmp_path):  # noqa: F811
  # Find a word whose first sentencepiece token, without its `▁`, is not a piece.
  words = ["kitchen", "counting", "surroundings", "interactions", "timestamps", "ASSISTANT", "USER"]
  unknown = [w for w in words
             if len(sp.encode(w, out_type=str)[0]) > 1 and sp.piece_to_id(sp.encode(w, out_type=str)[0][1:]) == 0]
  assert unknown, "the tiny vocabulary should have a stripped piece that is not a piece"
  enc = tokenizer_lib.ReleaseEncoder(tokenizer_lib.load_tokenizer(_folder(tiny_tokenizer_dir, tmp_path / "t", False)))
  word = unknown[0]
  assert enc.encode("a</s>" + word)[3] == 0
  assert enc.encode("a</s>" + word) == slow_ids(sp, "a</s>" + word, False)
  assert enc.encode("a</s> " + word)[3] != 0  # a leading space keeps the `▁`


def test_bare_marker_is_dropped(sp, tiny_tokenizer_dir, tmp_path):  # noqa: F811
  # A character outside the vocabulary starts with a bare `▁` and byte pieces: the `▁` goes.
  assert sp.encode("ß", out_type=str)[0] == MARK
  enc = tokenizer_lib.ReleaseEncoder(tokenizer_lib.load_tokenizer(_folder(tiny_tokenizer_dir, tmp_path / "t", False)))
  assert enc.encode("a</s>ß") == [1, sp.piece_to_id(MARK + "a"), 2] + sp.encode("ß")[1:]


def test_plain_string_specials_strip_whitespace(sp, tiny_tokenizer_dir, tmp_path):  # noqa: F811
  for flag in (False, None):
    folder = _folder(tiny_tokenizer_dir, tmp_path / f"t{flag}", flag, plain_string_specials=True)
    assert tokenizer_lib.read_release_options(folder).strips("</s>") == (True, True)
    enc = tokenizer_lib.ReleaseEncoder(tokenizer_lib.load_tokenizer(folder))
    for text in TEXTS:
      assert enc.encode(text) == slow_ids(sp, text, flag is None, strip_all=True), (flag, text)


CASES = {
    "multi_turn": [("<video>\nDuring which frames can we see a man walks?", "From 00 to 09."),
                   ("During which frames can we see the dog jumps into pool?", "From 10 to 55."),
                   ("Describe the events.", "A woman is cooking in the kitchen.")],
    "answer_ends_in_space": [("<video>\nDescribe the video.", "a man is counting money. "),
                             ("and then? ", "the dog jumps. ")],
    "video_at_end": [("Describe the video.\n<video>", "A dog runs."),
                     ("  two spaces  lead", " leading space answer")],
    "video_at_start_no_newline": [("<video>What is it?", "Nothing."), ("ok", "fine")],
    "unicode_digits": [("<video>\nWhat happens at the café in 東京? ☕ naïve", "déjà vu: 音楽 🎵 1234567."),
                       ("Ünïcödé 3.14?", "From 05 to 95, " + MARK + "marker.")],
    "stripped_word": [("<video>\nsay it", "fine"), ("kitchen timestamps?", "surroundings 42")],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_v1_ids_and_labels_follow_the_release(name, sp, flagged):
  legacy, enc = flagged
  turns = [(r, t) for q, a in CASES[name] for r, t in (("human", q), ("gpt", a))]
  want_ids, want_labels, want_dropped = release_v1(sp, turns, legacy)
  out = templates.tokenize(turns, "v1", enc, num_features=1)
  assert out.input_ids.tolist() == want_ids
  assert out.labels.tolist() == want_labels
  assert out.release_dropped == want_dropped


@pytest.mark.parametrize("caption", ["A dog runs into the pool.", " café 東京 3 men, 42 seconds  "])
def test_plain_ids_and_labels_follow_the_release(caption, sp, flagged):
  legacy, enc = flagged
  want_ids, want_labels = release_plain(sp, caption, legacy)
  out = templates.tokenize([("human", "<video>\nRender"), ("gpt", caption)], "plain", enc, num_features=1)
  assert out.input_ids.tolist() == want_ids and out.labels.tolist() == want_labels


def test_the_flag_matters_for_multi_turn_records(sp, tiny_tokenizer_dir, tmp_path):  # noqa: F811
  # The two flags give different ids (and so labels) after every `</s>` of this tiny vocabulary.
  turns = [(r, t) for q, a in CASES["multi_turn"] for r, t in (("human", q), ("gpt", a))]
  outs = [templates.tokenize(turns, "v1", tokenizer_lib.ReleaseEncoder(tokenizer_lib.load_tokenizer(
      _folder(tiny_tokenizer_dir, tmp_path / str(flag), flag))), num_features=1) for flag in (False, True)]
  assert outs[0].input_ids.tolist() != outs[1].input_ids.tolist()


def test_encoder_pickles_with_its_flag(flagged):
  legacy, enc = flagged
  text = "a</s>USER: hi</s>kitchen"
  want = enc.encode(text)
  copy = pickle.loads(pickle.dumps(enc))
  assert copy.legacy is legacy and copy.encode(text) == want


@pytest.mark.parametrize("config, match", [
    ("{not json", "tokenizer_config.json"),
    ('{"legacy": "false"}', "'legacy' must be true or false"),
    ('{"legacy": false, "eos_token": 3}', "'eos_token' must be"),
])
def test_bad_config_is_a_user_error(config, match, tiny_tokenizer_dir, tmp_path):  # noqa: F811
  folder = _folder(tiny_tokenizer_dir, tmp_path / "t", False)
  (folder / "tokenizer_config.json").write_text(config)
  with pytest.raises(errors.UserError, match=match) as info:
    tokenizer_lib.load_tokenizer(folder)
  assert str(folder) in str(info.value)
