"""Annotations of the synthetic corpus, in the release's formats (its training data and evaluation files).

- stage 1: LLaVA image-caption records (`id`, `image`, human `<image>\\n` + instruction, gpt caption)
  for stills of single events; a still shows no motion, so its caption names colour and shape only.
- stage 2: InternVid-style template QA with `<sN>/<eN>` tokens and `meta` {duration, token}: 20%
  single-turn dense captioning, 80% multi-turn grounding / segment captioning, several templates
  per task. Token k is event k in time order; `meta.token` lists every event of the video.
- stage 3: dialogues of a few turns, with `meta`; they include the release's own evaluation queries
  (grounding, and dense captioning answered as a JSON list) so that the stage-3 model has seen the
  form of the questions `eval` asks.
- eval: ActivityNet Captions-style `{video_id: {duration, timestamps, sentences}}`.

All choices come from the generator passed in, so a seed fixes every text.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from . import vocabulary
from vtimellm_jax.data import templates

DENSE_FRACTION = 0.2  # stage 2: share of single-turn dense-captioning records, as the release
# Stage 2, multi-turn records: every event is asked for (grounding, the skill the quickstart measures
# and the slower one to learn), and this share of events is also captioned from its given moment.
# Grounding every event instead of 75% of them brought the quickstart's transition to finding the
# asked event forward by hundreds of steps (docs/synthetic.md, "What is written").
CAPTIONING_SHARE = 0.25


def dense_choice(rng: np.random.Generator, num_records: int) -> np.ndarray:
  """Returns bool[num_records]: which stage-2 records are dense captioning (exactly DENSE_FRACTION, rounded)."""
  dense = np.zeros(num_records, bool)
  dense[rng.permutation(num_records)[:round(DENSE_FRACTION * num_records)]] = True
  return dense

STILL_INSTRUCTIONS = ("", "Describe the image briefly.", "What is shown in this picture?",
                      "Give a short caption of the image.", "Write a terse but informative summary of the picture.")
STILL_CAPTIONS = ("{subject}.", "{subject} on a {background} background.", "a single {subject}.",
                  "{subject} in the middle of the picture.", "a picture of {subject}.")

DENSE_QUESTIONS = (
    "Could you describe the events in the video, with the start and end of each one?",
    "Describe what happens in the video and when, event by event.",
    "Please list the events in this video together with their timestamps.",
    "What are the events in the video? Give the time of each one.",
    "Tell me everything that happens in this video, in order, with times.",
)
GROUNDING_QUESTIONS = (
    templates.GROUNDING_QUERY,  # the release's evaluation query, verbatim
    "When in the video does it happen that {}?",
    "Find the moment in which {}.",
    "Give the start and end of the segment where {}.",
    "At which frames is it shown that {}?",
)
# The answer names the asked colour right before the start index: the token that predicts the index
# then carries the query itself. With "From <s0>", a small model has to route the query to "From"
# and match it against frames in one go, and in the quickstart's budget it does not (docs/synthetic.md).
GROUNDING_ANSWER = "In {colour} {s} to {e}."
CAPTIONING_QUESTIONS = (
    "What happens from {s} to {e}?",
    "What is going on between {s} and {e}?",
    "Describe the moment from {s} to {e}.",
    "What can we see during frames {s} to {e}?",
    "Tell me what the video shows from {s} to {e}.",
)
_NUMBER_WORDS = {2: "two", 3: "three", 4: "four"}


def _tokens(k: int) -> tuple[str, str]:
  return f"<s{k}>", f"<e{k}>"


def meta(plan: vocabulary.VideoPlan) -> dict[str, Any]:
  """Returns the record's `meta`: duration and the seconds of every event's `<sK>` and `<eK>`."""
  token = {}
  for k in range(len(plan.events)):
    s, e = _tokens(k)
    token[s], token[e] = plan.span(k)
  return {"duration": plan.duration, "token": token}


def _capitalised(text: str) -> str:
  return text[0].upper() + text[1:]


def _pick(rng: np.random.Generator, options):
  return options[int(rng.integers(len(options)))]


def _record(plan: vocabulary.VideoPlan, qa: list[tuple[str, str]], source: str) -> dict[str, Any]:
  """Returns a stage-2/3 record; the first question gets the `<video>\\n` prefix unless it has it."""
  conversations = []
  for i, (q, a) in enumerate(qa):
    if i == 0 and not q.startswith(templates.VIDEO_TAG):
      q = templates.VIDEO_TAG + "\n" + q
    conversations += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
  return {"source": source, "id": plan.id, "conversations": conversations, "meta": meta(plan)}


def still_record(rng: np.random.Generator, still_id: str, image: str,
                 event: vocabulary.Event) -> dict[str, Any]:
  """Returns a stage-1 LLaVA record for the still `image` (a path relative to the stills folder)."""
  caption = _pick(rng, STILL_CAPTIONS).format(subject=event.subject, background=vocabulary.BACKGROUND_NAME)
  return {"id": still_id, "image": image,
          "conversations": [{"from": "human", "value": "<image>\n" + _pick(rng, STILL_INSTRUCTIONS)},
                            {"from": "gpt", "value": _capitalised(caption)}]}


def _dense_prose(plan: vocabulary.VideoPlan) -> str:
  parts = []
  for k, event in enumerate(plan.events):
    s, e = _tokens(k)
    parts.append(f"From {s} to {e}, {event.sentence}.")
  return " ".join(parts)


def stage2_record(rng: np.random.Generator, plan: vocabulary.VideoPlan, dense: bool) -> dict[str, Any]:
  """Returns one stage-2 record: dense captioning if `dense`, else a grounding turn for every event and a
  captioning turn for some (CAPTIONING_SHARE), in random order."""
  if dense:
    return _record(plan, [(_pick(rng, DENSE_QUESTIONS), _dense_prose(plan))], "synthetic_dense")
  qa = []
  for k, event in enumerate(plan.events):
    s, e = _tokens(k)
    answer = GROUNDING_ANSWER.format(colour=event.colour, s=s, e=e)
    qa.append((_pick(rng, GROUNDING_QUESTIONS).format(event.sentence), answer))
    if rng.random() < CAPTIONING_SHARE:
      qa.append((_pick(rng, CAPTIONING_QUESTIONS).format(s=s, e=e), _capitalised(event.sentence) + "."))
  return _record(plan, [qa[i] for i in rng.permutation(len(qa))], "synthetic_qa")


# Stage-3 dialogue turns: each returns (question, answer) about event k of the plan.
def _ask_overview(plan, k, rng):
  del k
  n = len(plan.events)
  lines = []
  for i, event in enumerate(plan.events):
    s, e = _tokens(i)
    lead = "First" if i == 0 else ("Finally" if i == n - 1 else "Then")
    lines.append(f"{lead}, from {s} to {e}, {event.sentence}.")
  q = _pick(rng, ("What is going on in this video?", "Can you tell me what happens in this video?",
                  "Walk me through this video, please."))
  return q, f"The video shows {_NUMBER_WORDS[n]} shapes, one after another. " + " ".join(lines)


def _ask_json(plan, k, rng):
  del k, rng
  items = [{"event": ev.sentence, "timestamps": "from {} to {}".format(*_tokens(i))}
           for i, ev in enumerate(plan.events)]
  return templates.CAPTIONING_QUERY, json.dumps(items)


def _ask_when_colour(plan, k, rng):
  event, (s, e) = plan.events[k], _tokens(k)
  q = _pick(rng, ("When does the {c} shape appear?", "At what point can I see something {c}?",
                  "When is the {c} shape on screen?")).format(c=event.colour)
  return q, f"The {event.colour} {event.shape} is visible from {s} to {e}; it {event.motion}."


def _ask_motion(plan, k, rng):
  event, (s, e) = plan.events[k], _tokens(k)
  q = _pick(rng, ("How does the {c} {sh} move?", "What does the {c} {sh} do?")).format(c=event.colour, sh=event.shape)
  return q, f"It {event.motion}, from {s} to {e}."


def _ask_after(plan, k, rng):
  event = plan.events[k]
  q = _pick(rng, ("What happens right after the {c} {sh}?", "And after the {c} {sh}, what comes next?")
            ).format(c=event.colour, sh=event.shape)
  if k == len(plan.events) - 1:
    return q, f"Nothing else: the {event.colour} {event.shape} is the last event of the video."
  s, e = _tokens(k + 1)
  return q, f"Right after it, from {s} to {e}, {plan.events[k + 1].sentence}."


def _ask_count(plan, k, rng):
  del k
  n = len(plan.events)
  q = _pick(rng, ("How many shapes appear in the video?", "How many different shapes do you see?"))
  subjects = [ev.subject for ev in plan.events]
  return q, f"{_capitalised(_NUMBER_WORDS[n])} shapes appear: {', '.join(subjects[:-1])} and {subjects[-1]}."


def _ask_grounding(plan, k, rng):
  del rng
  event, (s, e) = plan.events[k], _tokens(k)
  return templates.GROUNDING_QUERY.format(event.sentence), GROUNDING_ANSWER.format(colour=event.colour, s=s, e=e)


_OPENERS = (_ask_json, _ask_overview, _ask_grounding)
_FOLLOW_UPS = (_ask_when_colour, _ask_motion, _ask_after, _ask_count, _ask_grounding)


def stage3_record(rng: np.random.Generator, plan: vocabulary.VideoPlan) -> dict[str, Any]:
  """Returns one stage-3 dialogue: an opener (JSON dense captions, overview or grounding), 2-3 follow-ups."""
  opener = _OPENERS[int(rng.integers(len(_OPENERS)))]
  qa = [opener(plan, int(rng.integers(len(plan.events))), rng)]
  if opener is _ask_json:  # asked exactly as `eval` asks it, "<video>\n " included
    qa[0] = (templates.captioning_question(), qa[0][1])
  for _ in range(int(rng.integers(2, 4))):
    ask = _FOLLOW_UPS[int(rng.integers(len(_FOLLOW_UPS)))]
    qa.append(ask(plan, int(rng.integers(len(plan.events))), rng))
  return _record(plan, qa, "synthetic_dialogue")


def eval_entry(plan: vocabulary.VideoPlan) -> dict[str, Any]:
  """Returns the ActivityNet-style annotation of one held-out video."""
  return {"duration": plan.duration, "timestamps": [list(plan.span(k)) for k in range(len(plan.events))],
          "sentences": [event.caption for event in plan.events]}


def corpus_lines(records: list[dict[str, Any]]) -> list[str]:
  """Returns the text of every turn, with time tokens written as the release writes them (two digits).

  `<image>`/`<video>` tags are left out: they never reach the tokenizer as text.
  """
  from vtimellm_jax.data import records as records_lib  # pylint: disable=g-import-not-at-top

  lines = []
  for record in records:
    m = record.get("meta")
    for turn in record["conversations"]:
      text = turn["value"]
      for tag in (templates.VIDEO_TAG, "<image>"):
        text = text.replace(tag, "")
      if m is not None:
        for key, t in m["token"].items():
          text = text.replace(key, records_lib.timestamp_text(t, m["duration"]))
      text = " ".join(text.split())
      if text:
        lines.append(text)
  return lines
