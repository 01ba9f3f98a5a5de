"""Label parity: our templates vs a reference written here from the release's rules, on sentencepiece.

The reference tokenizes like the release's slow legacy LLaMA tokenizer using the `sentencepiece`
package directly (split on special tokens, each piece encoded on its own with its dummy prefix,
`<video>` chunks joined by -200 with only the first BOS kept), and labels a token iff it holds a
byte of an assistant answer (with the space before it, which sentencepiece's `▁` prefix glues to
the answer's first piece) or is the `</s>` closing an answer; stage 1 labels the caption and the
final newline.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from data_fixtures import tiny_tokenizer_dir  # noqa: F401  pylint: disable=unused-import
from vtimellm_jax import errors
from vtimellm_jax.data import records
from vtimellm_jax.data import templates
from vtimellm_jax.data import tokenizer as tokenizer_lib
from vtimellm_jax.inference import prompts
from vtimellm_jax.models import families

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SPECIAL = {"<s>": 1, "</s>": 2, "<unk>": 0}


@pytest.fixture(scope="module")
def sp(tiny_tokenizer_dir):  # noqa: F811
  return spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))


@pytest.fixture(scope="module")
def legacy_dir(tiny_tokenizer_dir, tmp_path_factory):  # noqa: F811
  """The tiny tokenizer folder without the `legacy` flag (transformers 4.31 then defaults to true)."""
  out = tmp_path_factory.mktemp("legacy") / "tok"
  shutil.copytree(tiny_tokenizer_dir, out)
  config = json.loads((out / "tokenizer_config.json").read_text())
  config.pop("legacy", None)
  (out / "tokenizer_config.json").write_text(json.dumps(config))
  return out


@pytest.fixture(scope="module")
def enc(legacy_dir):
  out = tokenizer_lib.ReleaseEncoder(tokenizer_lib.load_tokenizer(legacy_dir))
  assert out.legacy
  return out


def legacy_pieces(sp, text: str, base: int = 0) -> list[tuple[int, int, int]]:
  """(id, byte begin, byte end) of the slow legacy tokenizer's pieces of `text`, no BOS."""
  out, pos = [], base
  for part in re.split(r"(</s>|<s>|<unk>)", text):
    n = len(part.encode())
    if part in SPECIAL:
      out.append((SPECIAL[part], pos, pos + n))
    elif part:
      out.extend((p.id, pos + p.begin, pos + p.end)
                 for p in sp.encode(part, return_type="proto").pieces)
    pos += n
  return out


def reference(sp, prompt: str, trained: list[tuple[int, int]]) -> tuple[list[int], list[int]]:
  """Returns (input_ids, labels) of `prompt`, trained byte spans `trained`, by the release's rules."""
  ids, spans, pos = [1], [(0, 0)], 0
  for k, chunk in enumerate(prompt.split("<video>")):
    if k:
      ids.append(-200)
      spans.append((pos, pos + len(b"<video>")))
      pos += len(b"<video>")
    for i, b, e in legacy_pieces(sp, chunk, pos):
      ids.append(i)
      spans.append((b, e))
    pos += len(chunk.encode())
  labels = [i if i != -200 and any(b < t and e > s for s, t in trained) else -100
            for i, (b, e) in zip(ids, spans)]
  return ids, labels


def v1_reference(sp, turns):
  prompt, trained = SYSTEM + " ", []
  for q, a in turns:
    prompt += "USER: " + q + " ASSISTANT:"
    start = len(prompt.encode())
    prompt += " " + a + "</s>"
    trained.append((start, len(prompt.encode())))
  return reference(sp, prompt, trained)


def ours(enc, turns, template="v1", **kw):
  flat = [(r, t) for q, a in turns for r, t in (("human", q), ("gpt", a))]
  out = templates.tokenize(flat, template, enc, **kw)
  assert out.input_ids.dtype == np.int32 and out.labels.dtype == np.int32
  return out


CASES = {
    "single_turn": [("<video>\nCould you describe the events in the video?",
                     "From 04 to 17, a man is counting money. From 21 to 99, the dog jumps.")],
    "multi_turn": [("<video>\nDuring which frames can we see a man walks?", "From 00 to 09."),
                   ("During which frames can we see the dog jumps into pool?", "From 10 to 55."),
                   ("Describe the events.", "A woman is cooking in the kitchen.")],
    "unicode": [("<video>\nWhat happens at the café in 東京? ☕ naïve", "déjà vu: 音楽 plays 🎵 twice."),
                ("And then…", "Ünïcödé «quotes» — done.")],
    "numbers": [("<video>\nDuring which frames can we see 3 men?", "17 to 42"),
                ("Between 00 and 99?", "From 05 to 95, 1234567 counting 3.14.")],
    "video_at_end": [("Describe the video.\n<video>", "A dog runs."),
                     ("  two spaces  lead", " leading space answer")],
    "spaces": [("<video> What    is  it?", "Nothing  at all ."), ("ok", "fine\n\nnew lines\n")],
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_v1_labels_match_spec_reference(name, sp, enc):
  turns = CASES[name]
  want_ids, want_labels = v1_reference(sp, turns)
  out = ours(enc, turns)
  assert not out.release_dropped
  assert out.input_ids.tolist() == want_ids
  assert out.labels.tolist() == want_labels
  assert out.input_ids.tolist().count(templates.VIDEO_TOKEN_INDEX) == 1


@pytest.mark.parametrize("caption", ["A dog runs into the pool.", "café 東京 3 men, 42 seconds",
                                     " leading space and  double  space"])
def test_plain_labels_match_spec_reference(caption, sp, enc):
  prompt = "<video>\n" + caption + "\n"
  start = len("<video>\n".encode())
  want_ids, want_labels = reference(sp, prompt, [(start, len(prompt.encode()))])
  # The question text is dropped by the plain template (stage 1 keeps only "<video>\n").
  out = ours(enc, [("Render a short caption of <video> please", caption)], template="plain",
             num_features=1)
  assert out.input_ids.tolist() == want_ids
  assert out.labels.tolist() == want_labels


def test_over_length_is_cut_to_the_model_budget(sp, enc):
  long_answer = " ".join(["the man walks into the kitchen from 12 to 34"] * 40)
  turns = [("<video>\nDescribe the video.", long_answer), ("again?", long_answer)]
  want_ids, want_labels = v1_reference(sp, turns)
  max_length = 300
  out = ours(enc, turns, max_length=max_length)
  budget = max_length - 100 + 1
  assert len(want_ids) > budget
  assert out.full_length == len(want_ids) and out.truncated
  assert out.input_ids.tolist() == want_ids[:budget]
  assert out.labels.tolist() == want_labels[:budget]


def test_release_drop_is_flagged(enc):
  # A literal <unk> becomes id 0 = the pad id, which the release's length count skips: it then
  # ignores the whole sample. We keep its tokens, ignore all labels, and flag it.
  out = ours(enc, [("<video>\nwhat is <unk> here?", "nothing.")])
  assert out.release_dropped
  assert (out.labels == -100).all()
  assert 0 in out.input_ids.tolist()


def test_answer_holding_the_separator_is_flagged(enc):
  out = ours(enc, [("<video>\nsay it", "USER: hi ASSISTANT: hello"), ("more", "ok")])
  assert out.release_dropped and (out.labels == -100).all()


def test_encoder_equals_sentencepiece_on_prompt_pieces(sp, enc, tiny_tokenizer_dir):  # noqa: F811
  texts = [SYSTEM + " USER: ", "\nDuring which frames can we see 3 dogs? ASSISTANT: From 00 to 99.",
           "x</s>USER: next", "  two leading", " one", "東京 café 🎵", "tab\there", "", "<s>a<unk>b"]
  for text in texts:
    want = [1] + [i for i, _, _ in legacy_pieces(sp, text)]
    assert enc.encode(text) == want, text


def test_raw_transformers_tokenizer_on_single_chunks(sp, tiny_tokenizer_dir):  # noqa: F811
  # Documents (docs/data.md) where the tokenizers-backed class equals the slow path on its own:
  # texts without `</s>` inside and without leading spaces.
  tok = tokenizer_lib.load_tokenizer(tiny_tokenizer_dir)
  for text in [SYSTEM + " USER: ", "\nDuring which frames? ASSISTANT: From 00 to 17.", "東京 café"]:
    assert tok(text)["input_ids"] == [1] + sp.encode(text), text
  assert (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id) == (1, 2, 0, 0)


def test_encoders_are_told_apart_by_their_family_not_their_class(enc, tiny_tokenizer_dir):  # noqa: F811
  assert isinstance(enc, tokenizer_lib.Encoder) and templates.family_of(enc) is families.VICUNA
  # A transformers tokenizer is no encoder: the pipeline wraps it in a ReleaseEncoder.
  assert not isinstance(tokenizer_lib.load_tokenizer(tiny_tokenizer_dir), tokenizer_lib.Encoder)


def test_a_new_family_needs_only_its_registry_entry(enc, sp, monkeypatch):
  # A third LLaMA-tokenizer family that trains every stage with 'v1': its record alone decides the
  # templates, checks, generation prompt and answer clean-up; nothing branches on the encoder's class.
  third = dataclasses.replace(families.VICUNA, name="llama_chat", caption_template="v1")
  monkeypatch.setitem(families.FAMILIES, third.name, third)
  other = copy.copy(enc)
  other.family = third.name
  assert templates.default_template(other, True) == "v1" and templates.default_template(enc, True) == "plain"
  turns = [("human", "<video>\nq"), ("gpt", "a")]
  assert templates.tokenize(turns, "v1", other).input_ids.tolist() == ours(enc, [("<video>\nq", "a")]).input_ids.tolist()
  with pytest.raises(errors.UserError, match="template 'plain' is for LLaMA tokenizers; this tokenizer is a "
                     "LLaMA tokenizer, which the release trains with template 'v1' at every stage"):
    templates.tokenize(turns, "plain", other)
  assert prompts.prompt_ids(other, [], "<video>\nq") == prompts.prompt_ids(enc, [], "<video>\nq")
  ids = sp.encode("from 10 to 20 </s>")  # "</s>" spelt out, which the v1 answer clean-up cuts
  assert prompts.decode_answer(other, ids) == prompts.decode_answer(enc, ids) == "from 10 to 20"
  # A family whose conversation template cannot generate is refused by name, not answered in v1.
  monkeypatch.setitem(families.FAMILIES, third.name, dataclasses.replace(third, template="plain"))
  with pytest.raises(errors.UserError, match="template 'plain' has no generation prompt"):
    prompts.prompt_ids(other, [], "<video>\nq")


def test_timestamp_rule_from_spec():
  record = {"id": "3n3oCNerzV0", "conversations": [
      {"from": "human", "value": "<video>\nWhen?"},
      {"from": "gpt", "value": "From <s0> to <e0>, counting. From <s1> to <e1>, more."}],
            "meta": {"split": [129.8, 184.0], "duration": 54.2,
                     "token": {"<s0>": 0, "<e0>": 9.4, "<s1>": 49.4, "<e1>": 53.2}}}
  prepared, faults = records.prepare(record)
  assert not faults
  assert prepared.turns[1][1] == "From 00 to 17, counting. From 91 to 98, more."
  # Python rounds halves to even, as the release does: 0.125 * 100 = 12.5 -> 12; 99.6 -> 99.
  assert records.timestamp_text(12.5, 100.0) == "12" and records.timestamp_text(13.5, 100.0) == "14"
  assert records.timestamp_text(99.6, 100.0) == "99"


def test_stage1_image_is_rewritten():
  prepared, faults = records.prepare({"id": "004539375", "image": "00453/004539375.jpg",
                                      "conversations": [{"from": "human", "value": "<image>\nSay"},
                                                        {"from": "gpt", "value": "a cat"}]})
  assert not faults and prepared.is_image and prepared.num_features == 1
  assert prepared.turns[0][1] == "<video>\nSay"
