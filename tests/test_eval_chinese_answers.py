"""Answers in Chinese, as the release's ChatGLM3 model writes them ("从 SS 到 EE"): grounding, dense
captioning and the moments that chat, serve and the demo show."""

import json

import pytest

from vtimellm_jax.evaluation import captioning, grounding
from vtimellm_jax.inference import moments


@pytest.mark.parametrize("answer, span", [
    ("这个事件发生在从 05 到 19。", (5, 19)),
    ("从05到19", (5, 19)),
    ("从第20帧至第30帧。", (20, 30)),
    ("大约在 12和34 之间", (12, 34)),
    ("从 07 帧到 64 帧，一个人在跑步。", (7, 64)),
])
def test_grounding_reads_chinese_spans(answer, span):
  parsed = grounding.parse_answer(answer)
  assert (parsed.start, parsed.end, parsed.problems) == (*span, ())


def test_grounding_reads_english_first_and_flags_chinese_problems():
  # The release's pattern wins when both are there: English answers score exactly as before.
  assert grounding.parse_answer("从 30 到 40, from 10 to 20").start == 10
  assert grounding.parse_answer("从 40 到 30").problems == (grounding.REVERSED,)
  assert grounding.parse_answer("从100到120").problems == (grounding.OVER_99,)
  assert grounding.parse_answer("从 5 到 19").problems == (grounding.NO_TIMESTAMPS,)
  assert grounding.parse_answer("05 然后 19").problems == (grounding.NO_TIMESTAMPS,)


def test_captioning_reads_chinese_timestamps():
  answer = "视频中的事件：" + json.dumps([
      {"event": "一名男子走进房间", "timestamps": "从 00 到 15"},
      {"event": "他打开盒子", "timestamps": "从16到42"},
      {"event": "he jumps", "timestamps": "from 43 to 99"},
  ], ensure_ascii=False)
  parsed = captioning.parse_answer(answer)
  assert parsed.items == ((0, 15, "一名男子走进房间"), (16, 42, "他打开盒子"), (43, 99, "he jumps"))
  assert parsed.problems == ()
  odd = captioning.parse_answer(json.dumps([{"event": "x", "timestamps": "从 20 到 10"},
                                            {"event": "y", "timestamps": "大约 01 至 02 之间"}], ensure_ascii=False))
  # Not a span alone and not readable by position: the reading stops there, as for English.
  assert odd.items == ((20, 10, "x"),)
  assert odd.problems == (captioning.REVERSED, captioning.BAD_ITEM)


def test_moments_of_a_chinese_answer_have_their_spans_and_seconds():
  answer = "他从 10 到 20 跑步，然后 from 30 to 40 休息，最后从第50帧至第60帧离开。编号 100到120 不是时刻。"
  found = moments.find_moments(answer)
  assert [(m.start, m.end) for m in found] == [(10, 20), (30, 40), (50, 60)]
  assert [answer[slice(*m.span)] for m in found] == ["从 10 到 20", "from 30 to 40", "从第50帧至第60帧"]
  assert moments.moments_in_seconds(answer, 50.0) == [[5.0, 10.0], [15.0, 20.0], [25.0, 30.0]]
  assert moments.annotate("从 10 到 20。", 50.0) == "从 10 到 20 (5.0s-10.0s)。"
