"""The release's inference prompts and queries, tokenized around `<video>`, and its answer clean-up.

Every question goes into the conversation template of the encoder's family (`templates.generation_ids`):
with a Vicuna tokenizer the release's Vicuna v1 conversation ending in "ASSISTANT:" (no trailing
space); with a ChatGLM3 one the release's ChatGLM sequence (`[gMASK] sop <|user|> question ...
<|assistant|>`), as its ChatGLM inference builds it. The first user message of a conversation starts
with `<video>`, which becomes the placeholder id that `VTimeLLM.embed_inputs` replaces with the
projected frame features.
"""

from __future__ import annotations

from collections.abc import Sequence

from vtimellm_jax.data import templates
from vtimellm_jax.errors import UserError

VIDEO_TAG = templates.VIDEO_TAG

def chat_question(query: str) -> str:
  """Returns the first user message of a chat about a video: '<video>\\n' + query."""
  return VIDEO_TAG + "\n" + query


def conversation_turns(history: Sequence[tuple[str, str]], question: str) -> list[tuple[str, str]]:
  """Returns the (role, text) turns of earlier (question, answer) rounds plus `question`.

  Exactly one `<video>` must appear, in the first question (the release's single-video prompt).
  """
  turns = []
  for asked, answered in history:
    turns += [("human", asked), ("gpt", answered)]
  turns.append(("human", question))
  tags = sum(text.count(VIDEO_TAG) for _, text in turns)
  if tags != 1 or VIDEO_TAG not in turns[0][1]:
    raise UserError(f"a conversation needs exactly one {VIDEO_TAG}, in its first question; found {tags}")
  return turns


def conversation_prompt(history: Sequence[tuple[str, str]], question: str) -> str:
  """Returns the v1 prompt of earlier (question, answer) rounds plus `question`, ending 'ASSISTANT:'."""
  return templates.v1_prompt(conversation_turns(history, question), generation_prompt=True)


def prompt_ids(encoder, history: Sequence[tuple[str, str]], question: str) -> list[int]:
  """Returns the ids (one placeholder) of a conversation's generation prompt in the encoder's family."""
  return templates.generation_ids(conversation_turns(history, question), encoder)


def tokenize_prompt(encoder, prompt: str) -> list[int]:
  """Returns the release's ids of a prompt: BOS, text chunks, and one placeholder where `<video>` stood."""
  return templates.tokenize_video_prompt(encoder, prompt)


def decode_answer(encoder, token_ids: Sequence[int]) -> str:
  """Returns the answer text of generated ids the way the release cleans it up.

  Special tokens are dropped, whitespace stripped, and with Vicuna a trailing '</s>' removed (the
  release strips its stop string again in case the tokenizer spelled it out; its ChatGLM inference
  only strips): `templates.ANSWER_STOP` of the family's template.
  """
  text = encoder.answer_text(list(token_ids)).strip()
  stop = templates.ANSWER_STOP.get(templates.family_of(encoder).template, "")
  if stop and text.endswith(stop):
    text = text[:-len(stop)]
  return text.strip()
