"""The release's query texts, conversation prompts, answer clean-up and moments in seconds."""

import pytest

from inference_fixtures import SYSTEM, tiny_vtimellm  # noqa: F401
from vtimellm_jax.data import templates, tokenizer as tokenizer_lib
from vtimellm_jax.errors import UserError
from vtimellm_jax.evaluation.annotations import VideoAnnotation
from vtimellm_jax.inference import evaluate, moments, prompts


def test_release_queries_verbatim():
  # the release's prompt, written out by hand.
  assert templates.grounding_question("  A Man jumps into the pool. ") == (
      "<video>\nDuring which frames can we see a man jumps into the pool?")
  assert templates.grounding_question("the end..") == "<video>\nDuring which frames can we see the end.?"
  assert templates.captioning_question() == (
      "<video>\n Could you please describe the events in the video in detail? Be specific about the activities "
      "of individuals, their surroundings, and interactions with others. The output should be in JSON format, "
      'structured as follows: {"event": "xx", "timestamps": "from xx to xx"}.')
  assert prompts.chat_question("what happens?") == "<video>\nwhat happens?"


def test_conversation_prompt_is_vicuna_v1():
  single = prompts.conversation_prompt([], "<video>\nq1")
  assert single == SYSTEM + " USER: <video>\nq1 ASSISTANT:"
  multi = prompts.conversation_prompt([("<video>\nq1", "a1")], "q2")
  assert multi == SYSTEM + " USER: <video>\nq1 ASSISTANT: a1</s>USER: q2 ASSISTANT:"
  for history, question in (([], "no video"), ([("<video>\nq", "a")], "<video>\nagain")):
    with pytest.raises(UserError, match="exactly one <video>"):
      prompts.conversation_prompt(history, question)


def test_prompt_tokens_and_answer_decoding(tiny_vtimellm):
  enc = tokenizer_lib.ReleaseEncoder(tokenizer_lib.load_tokenizer(tiny_vtimellm.model_dir))
  prompt = prompts.conversation_prompt([("<video>\nq1 the dog", "a1 runs")], "q2 walks")
  before, after = tiny_vtimellm.video_ids(prompt)  # sentencepiece directly, the slow tokenizer's way
  assert prompts.tokenize_prompt(enc, prompt) == before + [-200] + after
  ids = tiny_vtimellm.sp.encode("the dog runs from 10 to 20.")
  assert prompts.decode_answer(enc, ids) == "the dog runs from 10 to 20."
  assert prompts.decode_answer(enc, tiny_vtimellm.sp.encode("  the dog </s>")) == "the dog"


def test_eval_queries_follow_the_release_order():
  ann = {"a": VideoAnnotation(10.0, ((0, 1), (2, 3)), ("First one.", "second")),
         "b": VideoAnnotation(5.0, ((0, 5),), ("Third",))}
  got = [(q.index, q.video_id, q.task, q.sentence_id) for q in evaluate.build_queries(ann, "all")]
  assert got == [(0, "a", "captioning", None), (1, "a", "grounding", 0), (2, "a", "grounding", 1),
                 (3, "b", "captioning", None), (4, "b", "grounding", 0)]
  grounding = evaluate.build_queries(ann, "grounding")
  assert [q.question for q in grounding] == [
      "<video>\nDuring which frames can we see first one?", "<video>\nDuring which frames can we see second?",
      "<video>\nDuring which frames can we see third?"]
  assert {q.task for q in evaluate.build_queries(ann, "captioning")} == {"captioning"}


def test_moments_in_seconds():
  answer = "A man walks from 10 to 25, then From 50 to 99. Not from 100 to 120 or 5 to 7."
  assert [(m.start, m.end) for m in moments.find_moments(answer)] == [(10, 25), (50, 99)]
  assert moments.moments_in_seconds(answer, 80.0) == [[8.0, 20.0], [40.0, 79.2]]
  assert moments.moments_in_seconds(answer, None) is None
  assert moments.annotate(answer, 80.0).startswith("A man walks from 10 to 25 (8.0s-20.0s), then From 50 to 99 "
                                                   "(40.0s-79.2s).")
  assert moments.annotate(answer, None) == answer


def test_moments_without_from_as_the_grounding_metric_reads_them():
  # The quickstart's model answers grounding queries "In <colour> SS to EE."; the release's metric
  # reads "SS and EE" too.
  answer = "In red 06 to 19. Also 20 and 45, not 7 to 9 nor 120 to 130."
  assert [(m.start, m.end) for m in moments.find_moments(answer)] == [(6, 19), (20, 45)]
  assert moments.annotate(answer, 50.0).startswith("In red 06 to 19 (3.0s-9.5s). Also 20 and 45 (10.0s-22.5s),")
