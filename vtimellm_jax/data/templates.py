"""Prompt templates `plain` (stage 1), `v1` (stages 2, 3, inference), `glm` (ChatGLM3) and labels.

Token level, before video expansion: `input_ids` hold the text tokens with exactly one placeholder
`VIDEO_TOKEN_INDEX` (-200) where `<video>` stood; `labels` are the token ids where the loss is taken
and `IGNORE_INDEX` (-100) elsewhere (always at the placeholder).

Labels are computed the way the release computes them, not re-derived: the prompt is split at
`<video>`, every chunk tokenized with BOS and only the first BOS kept; for `v1` the release then
tokenizes every round (`USER: q ASSISTANT: a`) on its own, masks `len(instruction) - 2` tokens and
advances by `len(round)`; when the sum does not reach the full length it ignores the whole sample.
Running that same counting here gives the release's labels wherever it trains, and flags
(`Tokenized.release_dropped`) the samples it would silently drop.

`glm` is the release's ChatGLM3 rule (its `preprocess_glm`), used with a ChatGLM3 tokenizer for
every stage: `[gMASK] sop`, then per turn its role token (`<|user|>`, `<|assistant|>`) and the ids
of its whole text (`<video>` as the placeholder; each chunk around it encoded on its own), then
`</s>`. A token is trained iff the token before it belongs to an assistant turn (role token
included): the answer's tokens and the role token or `</s>` right after it. The release builds this
as a per-token loss mask shifted right by one; no sample is ever dropped.

Over-length: the release cuts the text at 2048 tokens, so its model sequence (text - 1 + 100
features) can reach 2147. Here the text is cut at `max_length - num_features + 1` tokens so that the
model sequence never exceeds `max_length` (static shapes, and the 2048-long RoPE cache the release
trains with); labels are the release's labels cut at the same place.

Which templates suit an encoder is its family's business (`enc.family`, a record of
`models.families`: `caption_template` for stage 1, `template` for stages 2, 3 and inference); this
module never asks which encoder class it was given.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from vtimellm_jax import errors
from vtimellm_jax.data import chatglm_tokenizer
from vtimellm_jax.data import tokenizer as tokenizer_lib
from vtimellm_jax.models import families

VIDEO_TOKEN_INDEX = -200
IGNORE_INDEX = -100
VIDEO_TAG = "<video>"
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
ROLES = {"human": "USER", "gpt": "ASSISTANT"}
SEP, SEP2 = " ", "</s>"
PLAIN_SEP = "\n"
# The tokenizer each template's ids are laid out for, as messages name it, and how a folder of it is
# told apart when that takes a declaration (None: any other tokenizer folder loads as LLaMA's).
TOKENIZER_OF = {
    "plain": ("LLaMA", None),
    "v1": ("LLaMA", None),
    "glm": ("ChatGLM3", f"tokenizer_config.json with tokenizer_class {chatglm_tokenizer.TOKENIZER_CLASS}"),
}
TEMPLATES = tuple(TOKENIZER_OF)
# The text the release cuts from the end of a decoded answer, by template: v1's conversation stop
# string (its ChatGLM inference, `glm`, only strips whitespace).
ANSWER_STOP = {"v1": SEP2}
MAX_LENGTH = 2048

# The release's evaluation queries (its eval.py), verbatim.
GROUNDING_QUERY = "During which frames can we see {}?"
CAPTIONING_QUERY = (
    "Could you please describe the events in the video in detail? Be specific about the activities of "
    "individuals, their surroundings, and interactions with others. The output should be in JSON format, "
    'structured as follows: {"event": "xx", "timestamps": "from xx to xx"}.')


def grounding_sentence(sentence: str) -> str:
  """Returns an annotated sentence as the release puts it in a query: stripped, lower-cased, no final '.'."""
  sentence = sentence.strip().lower()
  return sentence[:-1] if sentence.endswith(".") else sentence


def grounding_question(sentence: str) -> str:
  """Returns the release's first user message of a grounding query for an annotated sentence."""
  return VIDEO_TAG + "\n" + GROUNDING_QUERY.format(grounding_sentence(sentence))


def captioning_question() -> str:
  """Returns the release's first user message of the dense-captioning query.

  The release puts a space between "<video>\\n" and the query text here (and not for grounding).
  """
  return VIDEO_TAG + "\n " + CAPTIONING_QUERY


class OverLengthError(errors.UserError):
  """The text is so long that cutting it to the model budget would remove `<video>`."""


@dataclasses.dataclass(frozen=True)
class Tokenized:
  """One tokenized sample (token level, before video expansion)."""
  input_ids: np.ndarray  # int32[T], exactly one VIDEO_TOKEN_INDEX
  labels: np.ndarray  # int32[T], IGNORE_INDEX where not trained
  release_dropped: bool  # the release's length-count check failed: all labels ignored, as there
  full_length: int  # text tokens before truncation

  @property
  def truncated(self) -> bool:
    return self.full_length > len(self.input_ids)


def v1_prompt(turns: Sequence[tuple[str, str]], generation_prompt: bool = False) -> str:
  """Returns the Vicuna v1 prompt of (role, text) turns; with `generation_prompt` it ends 'ASSISTANT:'."""
  out = SYSTEM + SEP
  for k, (role, text) in enumerate(turns):
    # The release writes an empty message as just "ROLE:" (its generation prompt).
    out += f"{ROLES[role]}: {text}{(SEP, SEP2)[k % 2]}" if text else f"{ROLES[role]}:"
  if generation_prompt:
    out += f"{ROLES['gpt']}:"
  return out


def plain_prompt(turns: Sequence[tuple[str, str]]) -> str:
  """Returns the stage-1 prompt: '<video>\\n' + caption + '\\n' (the question text is dropped)."""
  _check_plain(turns)
  return VIDEO_TAG + "\n" + turns[1][1] + PLAIN_SEP


def tokenize_video_prompt(enc: tokenizer_lib.ReleaseEncoder, prompt: str) -> list[int]:
  """Returns the release's ids of `prompt`: chunks around `<video>` joined by the placeholder."""
  chunks = [enc.encode(chunk) for chunk in prompt.split(VIDEO_TAG)]
  ids = [enc.bos_id]
  for k, chunk in enumerate(chunks):
    if k:
      ids.append(VIDEO_TOKEN_INDEX)
    ids.extend(chunk[1:])  # every chunk's own BOS goes; the first one was kept above
  return ids


def family_of(enc) -> families.Family:
  """Returns the registry record of the family an encoder tokenizes for (`enc.family`)."""
  return families.get(enc.family)


def check_encoder(template: str, enc) -> None:
  """Raises UserError unless `template` exists and is one the encoder's family trains with: 'glm'
  for a ChatGLM3 tokenizer, 'plain' and 'v1' for a LLaMA one."""
  if template not in TEMPLATES:
    raise errors.UserError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
  family = family_of(enc)
  if template in (family.caption_template, family.template):
    return
  need, folder = TOKENIZER_OF[template]
  head = (f"template {template!r} needs a {need} tokenizer folder ({folder})" if folder else
          f"template {template!r} is for {need} tokenizers")
  if family.caption_template == family.template:
    trains = f"template {family.template!r} at every stage"
  else:
    trains = f"template {family.caption_template!r} for stage 1 and {family.template!r} for stages 2 and 3"
  where = getattr(enc, "path", None) or "this tokenizer"
  raise errors.UserError(f"{head}; {where} is a {TOKENIZER_OF[family.template][0]} tokenizer, which "
                         f"the release trains with {trains}")


def default_template(enc, is_image: bool) -> str:
  """Returns the release's template for a record: the encoder's family's caption template ('plain'
  for LLaMA) for stage-1 images, its conversation template ('v1') otherwise; 'glm' for ChatGLM3."""
  family = family_of(enc)
  return family.caption_template if is_image else family.template


def tokenize(turns: Sequence[tuple[str, str]], template: str, enc, *,
             max_length: int = MAX_LENGTH, num_features: int = 100) -> Tokenized:
  """Returns the release's input_ids and labels of a conversation, cut to fit `max_length`.

  Args:
    turns: (role, text) pairs after the record rewrites, roles 'human'/'gpt', one `<video>`.
    template: 'plain', 'v1' (a `tokenizer.ReleaseEncoder`) or 'glm' (a `ChatGLMEncoder`).
    enc: the release-compatible encoder of the tokenizer.
    max_length: model sequence limit (text - 1 + num_features), also the release's
      `model_max_length` for its length check.
    num_features: N, the feature rows that replace the placeholder (100 videos, 1 images).

  Raises:
    OverLengthError: the text is so long that the cut would remove `<video>`.
    UserError: unknown template, a template that does not suit the tokenizer, or malformed turns.
  """
  check_encoder(template, enc)
  if template == "glm":
    ids, labels, dropped = _glm_labels(turns, enc)
  elif template == "plain":
    ids, labels, dropped = _plain_labels(turns, enc)
  elif template == "v1":
    ids, labels, dropped = _v1_labels(turns, enc, max_length)
  if ids.count(VIDEO_TOKEN_INDEX) != 1:
    raise errors.UserError(f"the prompt holds {ids.count(VIDEO_TOKEN_INDEX)} <video> tags; exactly "
                           "one is supported")
  labels = [IGNORE_INDEX if i == VIDEO_TOKEN_INDEX else l for i, l in zip(ids, labels)]
  budget = max_length - num_features + 1
  full_length = len(ids)
  if ids.index(VIDEO_TOKEN_INDEX) >= budget:
    raise OverLengthError(f"{full_length} text tokens and <video> at position "
                           f"{ids.index(VIDEO_TOKEN_INDEX)} do not fit {budget}")
  return Tokenized(np.asarray(ids[:budget], np.int32), np.asarray(labels[:budget], np.int32),
                   dropped, full_length)


def text_budget(max_length: int, num_features: int) -> int:
  """Returns the most text tokens a sample may keep: T - 1 + N <= max_length."""
  return max_length - num_features + 1


def _check_plain(turns: Sequence[tuple[str, str]]) -> None:
  if len(turns) != 2 or turns[0][0] != "human" or VIDEO_TAG not in turns[0][1]:
    raise errors.UserError("the plain template needs exactly one human turn holding <video> and "
                           f"one answer; found {len(turns)} turn(s)")


def _plain_labels(turns, enc) -> tuple[list[int], list[int], bool]:
  ids = tokenize_video_prompt(enc, plain_prompt(turns))
  n_prompt = len(tokenize_video_prompt(enc, VIDEO_TAG + "\n"))
  labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
  return ids, labels[:len(ids)], False


def _v1_labels(turns, enc, max_length: int) -> tuple[list[int], list[int], bool]:
  conversation = v1_prompt(turns)
  ids = tokenize_video_prompt(enc, conversation)
  labels = list(ids)
  # The release counts tokens that differ from the pad id (pad = unk = 0), placeholder included.
  total = sum(1 for i in ids if i != enc.pad_id)
  answer_sep = SEP + ROLES["gpt"] + ": "
  cur = 1
  labels[:cur] = [IGNORE_INDEX] * cur
  for rnd in conversation.split(SEP2):
    if not rnd:
      break
    parts = rnd.split(answer_sep)
    if len(parts) != 2:
      break
    round_len = len(tokenize_video_prompt(enc, rnd))
    # -2: the round's own BOS and the trailing space piece that the answer's first word absorbs.
    instruction_len = len(tokenize_video_prompt(enc, parts[0] + answer_sep)) - 2
    end = min(cur + instruction_len, len(labels))
    labels[cur:end] = [IGNORE_INDEX] * max(end - cur, 0)
    cur += round_len
  labels[cur:] = [IGNORE_INDEX] * max(len(labels) - cur, 0)
  dropped = cur < max_length and cur != total
  if dropped:
    labels = [IGNORE_INDEX] * len(ids)
  return ids, labels, dropped


def glm_turn_ids(enc: chatglm_tokenizer.ChatGLMEncoder, text: str) -> list[int]:
  """Returns the release's ids of one message's text: its chunks around `<video>`, each encoded on
  its own, joined by the placeholder (no prefix, no role token)."""
  ids = []
  for k, chunk in enumerate(text.split(VIDEO_TAG)):
    if k:
      ids.append(VIDEO_TOKEN_INDEX)
    ids.extend(enc.encode(chunk))
  return ids


def _glm_sequence(turns, enc) -> tuple[list[int], list[bool]]:
  """Returns the glm ids of `turns` ending in `</s>`, and which tokens belong to an assistant turn."""
  for k, (role, text) in enumerate(turns):
    if role != "human" and VIDEO_TAG in text:
      raise errors.UserError(f"turn {k} ({role}) holds {VIDEO_TAG}; only a human turn may")
  ids, answer = [enc.gmask_id, enc.sop_id], [False, False]
  for role, text in turns:
    turn = [enc.user_id if role == "human" else enc.assistant_id] + glm_turn_ids(enc, text)
    ids.extend(turn)
    answer.extend([role != "human"] * len(turn))
  ids.append(enc.eos_id)
  answer.append(False)
  return ids, answer


def _glm_labels(turns, enc) -> tuple[list[int], list[int], bool]:
  ids, answer = _glm_sequence(turns, enc)
  # Shifted right by one: a token is trained when the token before it is an assistant token.
  trained = [False] + answer[:-1]
  return ids, [i if t else IGNORE_INDEX for i, t in zip(ids, trained)], False


def glm_generation_ids(turns: Sequence[tuple[str, str]],
                       enc: chatglm_tokenizer.ChatGLMEncoder) -> list[int]:
  """Returns the release's ChatGLM3 inference ids of a conversation that ends with a human turn.

  The glm sequence of the conversation so far with its final `</s>` replaced by `<|assistant|>`;
  the answer is generated until one of `enc.stop_ids`. Exactly one `<video>`, in a human turn.

  Raises:
    UserError: `enc` is not a ChatGLM3 tokenizer, the last turn is not a human one, or `<video>` is
      missing, repeated or in an answer.
  """
  check_encoder("glm", enc)
  if not turns or turns[-1][0] != "human":
    raise errors.UserError("a ChatGLM3 generation prompt must end with a human turn")
  ids, _ = _glm_sequence(turns, enc)
  if ids.count(VIDEO_TOKEN_INDEX) != 1:
    raise errors.UserError(f"the prompt holds {ids.count(VIDEO_TOKEN_INDEX)} <video> tags; exactly "
                           "one is supported")
  return ids[:-1] + [enc.assistant_id]


def v1_generation_ids(turns: Sequence[tuple[str, str]], enc: tokenizer_lib.ReleaseEncoder) -> list[int]:
  """Returns the release's Vicuna inference ids of a conversation that ends with a human turn: its
  v1 prompt ending in 'ASSISTANT:', BOS first and the placeholder where `<video>` stood."""
  check_encoder("v1", enc)
  return tokenize_video_prompt(enc, v1_prompt(turns, generation_prompt=True))


def generation_ids(turns: Sequence[tuple[str, str]], enc) -> list[int]:
  """Returns the inference ids of a conversation that ends with a human turn, in the conversation
  template of the encoder's family (`v1_generation_ids`, `glm_generation_ids`).

  Raises:
    UserError: the family's template has no generation prompt, or the turns do not fit it.
  """
  template = family_of(enc).template
  if template not in _GENERATION_IDS:
    raise errors.UserError(f"template {template!r} has no generation prompt; "
                           f"answering supports {', '.join(_GENERATION_IDS)}")
  return _GENERATION_IDS[template](turns, enc)


_GENERATION_IDS = {"v1": v1_generation_ids, "glm": glm_generation_ids}


def glm_prompt(turns: Sequence[tuple[str, str]]) -> str:
  """Returns a readable rendering of the glm sequence (special tokens spelt out, for display only:
  the ids come from `tokenize`, never from encoding this string)."""
  names = {"human": "<|user|>", "gpt": "<|assistant|>"}
  body = "".join(names.get(role, "<|assistant|>") + text for role, text in turns)
  return "[gMASK]sop" + body + "</s>"
