"""A chat-completions request body, checked whole and turned into a `ChatRequest`.

  {"messages": [{"role": "user", "content": [
       {"type": "video_url", "video_url": {"url": "file:///videos/x.mp4", "duration": 73.1}},
       {"type": "text", "text": "During which frames can we see ...?"}]}],
   "temperature": 0, "max_tokens": 256, "seed": 0, "stream": false}

A conversation is the release's: alternating user and assistant messages ending with a user one,
one video in the first user message (a `video_url` part naming a video file, or a features `.npy`
with an optional `"duration"` in seconds); the server adds the release's system prompt itself, so
a `system` message is refused.

Nothing of a body is trusted before it is checked: a body that is not UTF-8 JSON, nests deeper than
`MAX_JSON_DEPTH` (measured before the recursive parser sees it), or holds a number JSON cannot
carry (NaN, Infinity, 1e999) is refused, and so is every field of the wrong kind or out of its
range. A refusal is an `HTTPError`: its status and the error JSON the client gets. What the request
names (its media file, its length in the server's context) is checked by the server that serves it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

from vtimellm_jax.inference import generate, prompts

MAX_JSON_DEPTH = 32  # a chat request nests 6 deep; the bound keeps the parser's recursion shallow
MAX_TEMPERATURE = 2.0  # OpenAI's range, and the release demo's slider
MAX_DURATION_S = 1e6  # eleven days: any video; the bound keeps the moments' seconds ordinary numbers


class HTTPError(Exception):
  """A request the server refuses: its status and a message for the client."""

  def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.kind = status, message, kind

  def json(self) -> dict:
    """Returns the body every refusal has: {"error": {"message", "type", "code"}}."""
    return {"error": {"message": self.message, "type": self.kind, "code": self.status}}


@dataclasses.dataclass(frozen=True)
class ChatRequest:
  """A parsed chat-completions request."""

  history: tuple[tuple[str, str], ...]  # earlier (question, answer) rounds; the first question has <video>
  question: str
  media_url: str
  duration: float | None  # from the video_url part (features have no length of their own)
  temperature: float
  top_p: float
  max_tokens: int | None
  seed: int
  stream: bool = False
  include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


# Strings (an unterminated one runs to the end) and brackets: what nesting depth is made of. The
# match never fails once it starts, so the scan is linear whatever the body holds.
_JSON_TOKENS = re.compile(rb'"(?:[^"\\]+|\\.)*"?|[\[\]{}]', re.DOTALL)
_OPENING, _CLOSING = frozenset(b"[{"), frozenset(b"]}")


def _json_depth_within(raw: bytes, limit: int) -> bool:
  """Returns whether arrays and objects in a JSON text nest at most `limit` deep (strings skipped)."""
  depth = 0
  for match in _JSON_TOKENS.finditer(raw):
    first = raw[match.start()]
    if first in _OPENING:
      depth += 1
      if depth > limit:
        return False
    elif first in _CLOSING:
      depth -= 1
  return True


def _refuse_constant(name: str):
  raise ValueError(f"{name} is not a number JSON allows")


def _finite_float(text: str) -> float:
  value = float(text)
  if not math.isfinite(value):
    raise ValueError(f"{text} is out of the range of a double")
  return value


def parse_json(raw: bytes):
  """Returns the value of a request body; HTTPError 400 if it is not UTF-8 JSON of finite numbers and bounded depth.

  The depth is checked before parsing, so a deeply nested body never reaches the recursive parser;
  NaN, Infinity and numbers beyond a double (which Python's json would take) are refused while parsing.
  """
  try:
    text = raw.decode("utf-8")
  except UnicodeDecodeError as e:
    raise HTTPError(400, f"the body is not UTF-8 JSON: {e}") from None
  if not _json_depth_within(raw, MAX_JSON_DEPTH):
    raise HTTPError(400, f"the body nests arrays and objects deeper than {MAX_JSON_DEPTH}")
  try:
    return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
  except ValueError as e:
    raise HTTPError(400, f"the body is not JSON: {e}") from None


def _number(value, name: str, lo: float, hi: float | None = None, *, integer: bool = False,
            lo_open: bool = False):
  """Returns `value` if it is a finite number (an integer if asked) in its range; HTTPError 400 otherwise."""
  kinds = (int,) if integer else (int, float)
  ok = not isinstance(value, bool) and isinstance(value, kinds) and (integer or math.isfinite(value))
  ok = ok and (value > lo if lo_open else value >= lo) and (hi is None or value <= hi)
  if not ok:
    low, high = (f"{x:g}" if isinstance(x, float) else str(x) for x in (lo, hi))
    bound = f"in {'(' if lo_open else '['}{low}, {high}]" if hi is not None else f"{'>' if lo_open else '>='} {low}"
    raise HTTPError(400, f"{name} must be {'an integer' if integer else 'a number'} {bound}, got {value!r}")
  return value


def _option(body: dict, name: str, default, *args, **kwargs):
  """Returns the checked number `body[name]`, or `default` when it is absent or null."""
  value = body.get(name)
  return default if value is None else _number(value, name, *args, **kwargs)


def _message_parts(message: dict, index: int) -> tuple[str, list[dict]]:
  """Returns (the message's text, its video_url parts)."""
  content = message.get("content")
  if isinstance(content, str):
    return content, []
  if not isinstance(content, list):
    raise HTTPError(400, f"messages[{index}].content must be a string or a list of parts")
  texts, videos = [], []
  for k, part in enumerate(content):
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text" and isinstance(part.get("text"), str):
      texts.append(part["text"])
    elif kind == "video_url" and isinstance(part.get("video_url"), dict) and isinstance(part["video_url"].get("url"), str):
      videos.append(part["video_url"])
    else:
      raise HTTPError(400, f"messages[{index}].content[{k}] must be a text part or a video_url part with a url")
  return "\n".join(texts), videos


def _stream_options(body: dict) -> tuple[bool, bool]:
  """Returns (stream, include_usage) of a request; HTTPError 400 for values OpenAI would refuse too."""
  stream, options = body.get("stream"), body.get("stream_options")
  if stream is not None and not isinstance(stream, bool):
    raise HTTPError(400, f"stream must be true or false, got {stream!r}")
  if options is None:
    return bool(stream), False
  if not stream:
    raise HTTPError(400, "stream_options is only taken with stream: true")
  usage = options.get("include_usage") if isinstance(options, dict) else None
  if not isinstance(options, dict) or not isinstance(usage, (bool, type(None))):
    raise HTTPError(400, f"stream_options must be an object with a true or false include_usage, got {options!r}")
  return True, bool(usage)


def parse_chat_request(body) -> ChatRequest:
  """Returns the ChatRequest of a decoded JSON body; HTTPError 400 naming what is wrong."""
  if not isinstance(body, dict):
    raise HTTPError(400, "the body must be a JSON object")
  stream, include_usage = _stream_options(body)
  _option(body, "n", 1, 1, 1, integer=True)
  for name in ("presence_penalty", "frequency_penalty"):  # some clients send 0; another value would go unheeded
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or value != 0):
      raise HTTPError(400, f"{name} is not supported: 0 or absent, got {value!r}")
  messages = body.get("messages")
  if not isinstance(messages, list) or not messages:
    raise HTTPError(400, "messages must be a non-empty list")
  texts, video = [], None
  for i, message in enumerate(messages):
    if not isinstance(message, dict):
      raise HTTPError(400, f"messages[{i}] must be an object")
    role = message.get("role")
    if role == "system":
      raise HTTPError(400, "system messages are not taken: the model was trained with the release's system prompt")
    expected = "user" if i % 2 == 0 else "assistant"
    if role != expected:
      raise HTTPError(400, f"messages[{i}].role must be {expected!r} (user and assistant alternate, starting "
                           f"and ending with user), got {role!r}")
    text, videos = _message_parts(message, i)
    if videos and (i != 0 or len(videos) > 1):
      raise HTTPError(400, "exactly one video_url part, in the first user message")
    if i == 0:
      if not videos:
        raise HTTPError(400, "the first user message needs a video_url part (a video file or a features .npy)")
      video = videos[0]
    if prompts.VIDEO_TAG in text:
      raise HTTPError(400, f"messages[{i}] contains {prompts.VIDEO_TAG}; the video goes in a video_url part")
    if role == "user" and not text.strip():
      raise HTTPError(400, f"messages[{i}] has no text")
    texts.append(text)
  if len(messages) % 2 == 0:
    raise HTTPError(400, "the last message must be the user's")
  duration = video.get("duration")
  if duration is not None:
    duration = float(_number(duration, "video_url.duration (seconds)", 0, MAX_DURATION_S, lo_open=True))
  texts[0] = prompts.chat_question(texts[0])
  history = tuple(zip(texts[0:-1:2], texts[1:-1:2]))
  tokens_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
  return ChatRequest(history, texts[-1], video["url"], duration,
                     temperature=float(_option(body, "temperature", generate.RELEASE_TEMPERATURE, 0, MAX_TEMPERATURE)),
                     top_p=float(_option(body, "top_p", 1.0, 0, 1, lo_open=True)),
                     max_tokens=_option(body, tokens_name, None, 1, integer=True),
                     seed=_option(body, "seed", 0, 0, 2**31 - 1, integer=True),
                     stream=stream, include_usage=include_usage)
