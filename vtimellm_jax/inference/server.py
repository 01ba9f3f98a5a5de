"""The HTTP server: an OpenAI-style chat-completions endpoint over the continuous-batching engine.

  POST /v1/chat/completions  {"messages": [{"role": "user", "content": [
                                 {"type": "video_url", "video_url": {"url": "file:///videos/x.mp4"}},
                                 {"type": "text", "text": "During which frames can we see ...?"}]}],
                              "temperature": 0, "max_tokens": 256, "seed": 0}
  GET  /health               {"status": "ok", "slots", "busy", "waiting", "completed"}

A conversation is the release's: alternating user and assistant messages ending with a user one,
one video in the first user message (a `video_url` part naming a video file, or a features `.npy`
with an optional `"duration"` in seconds); the server adds the release's system prompt itself, so
a `system` message is refused. The answer comes back as an OpenAI chat completion plus `moments`:
every "from SS to EE" of the answer, in frames and, when the video's length is known, in seconds.
Turn k of a conversation (k earlier answers) samples with `fold_in(key(seed), k)`, as `chat` does,
so a conversation gets `chat`'s answers; temperature 0 is greedy.

Who may read what: the server binds 127.0.0.1 unless told otherwise; with an API key every
/v1 request needs `Authorization: Bearer <key>` (401 without it); media are read only under the
`--media-root` folders, after resolving `..` and symlinks, and a path outside them is a 403 whose
message is the same whether or not the file exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import os
import pathlib
import time
import urllib.parse
import uuid

import jax
import numpy as np

from vtimellm_jax.data import records
from vtimellm_jax.errors import UserError
from vtimellm_jax.inference import batching, features as features_lib, generate, moments, prompts

MAX_BODY_BYTES = 1 << 20  # a chat request is text and a path: a megabyte is generous
FEATURE_SUFFIX = ".npy"


class HTTPError(Exception):
  """A request the server refuses: its status and a message for the client."""

  def __init__(self, status: int, message: str, kind: str = "invalid_request_error"):
    super().__init__(message)
    self.status, self.message, self.kind = status, message, kind


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


def _number(body: dict, name: str, default, lo: float, hi: float | None = None, integer: bool = False):
  value = body.get(name, default)
  if value is None:
    return default
  kinds = (int,) if integer else (int, float)
  if isinstance(value, bool) or not isinstance(value, kinds) or value < lo or (hi is not None and value > hi):
    bound = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
    raise HTTPError(400, f"{name} must be {'an integer' if integer else 'a number'} {bound}, got {value!r}")
  return value


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


def parse_chat_request(body) -> ChatRequest:
  """Returns the ChatRequest of a decoded JSON body; HTTPError 400 naming what is wrong."""
  if not isinstance(body, dict):
    raise HTTPError(400, "the body must be a JSON object")
  if body.get("stream"):
    raise HTTPError(400, "stream is not supported; the answer comes whole")
  if body.get("n", 1) != 1:
    raise HTTPError(400, "n must be 1")
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
  if duration is not None and (isinstance(duration, bool) or not isinstance(duration, (int, float)) or duration <= 0):
    raise HTTPError(400, f"video_url.duration must be a number of seconds > 0, got {duration!r}")
  texts[0] = prompts.chat_question(texts[0])
  history = tuple(zip(texts[0:-1:2], texts[1:-1:2]))
  max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
  return ChatRequest(history, texts[-1], video["url"], duration,
                     temperature=float(_number(body, "temperature", generate.RELEASE_TEMPERATURE, 0)),
                     top_p=float(_number(body, "top_p", 1.0, 1e-9, 1.0)),
                     max_tokens=None if max_tokens is None else _number({"max_tokens": max_tokens}, "max_tokens", None, 1,
                                                                        integer=True),
                     seed=_number(body, "seed", 0, 0, 2**31 - 1, integer=True))


class MediaRoots:
  """The folders the server reads media from; `resolve` refuses every path outside them."""

  def __init__(self, roots):
    self.roots = []
    for root in roots:
      if not pathlib.Path(root).is_dir():
        raise UserError(f"--media-root {root}: not a folder")
      self.roots.append(os.path.realpath(root))

  def resolve(self, url: str) -> pathlib.Path:
    """Returns the real path of a file:// URL or absolute path under a root; HTTPError 400/403/404."""
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "file":
      if parsed.netloc not in ("", "localhost"):
        raise HTTPError(400, f"{url}: a file:// URL must name a file of this machine")
      path = urllib.parse.unquote(parsed.path)
    elif parsed.scheme and len(parsed.scheme) > 1:  # one letter would be a Windows drive
      raise HTTPError(400, f"{url}: only files the server can read are taken (an absolute path or a file:// URL)")
    else:
      path = url
    if "\x00" in path or not os.path.isabs(path):
      raise HTTPError(400, f"{url}: the path must be absolute")
    # realpath resolves `..` and every symlink, so what is checked is what would be opened.
    real = os.path.realpath(path)
    if not any(os.path.commonpath([real, root]) == root for root in self.roots):
      # The same answer whether or not the file exists: the client learns nothing outside the roots.
      raise HTTPError(403, f"{url}: not under a media root of this server", "permission_error")
    if not os.path.isfile(real):
      raise HTTPError(404, f"{url}: no such file", "not_found_error")
    return pathlib.Path(real)


class ChatService:
  """Turns parsed requests into engine requests and answers; shared by the HTTP app and tests."""

  def __init__(self, engine: batching.Engine, videos, media: MediaRoots, max_new_tokens: int, model_name: str):
    self.engine = engine
    self.videos = videos  # served.VideoCache
    self.media = media
    self.max_new_tokens = max_new_tokens
    self.model_name = model_name

  def inputs(self, request: ChatRequest) -> tuple[np.ndarray, float | None]:
    """Returns (float32[N, D] features, duration or None) of the request's media (may run CLIP)."""
    path = self.media.resolve(request.media_url)
    try:
      if path.suffix == FEATURE_SUFFIX:
        return records.read_features(path, self.engine.bot.feature_dim), request.duration
      if path.suffix.lstrip(".").lower() not in features_lib.VIDEO_EXTENSIONS:
        raise HTTPError(400, f"{request.media_url}: not a video ({', '.join(features_lib.VIDEO_EXTENSIONS)}) "
                             f"nor a features {FEATURE_SUFFIX}")
      if not self.videos.can_encode:
        raise HTTPError(400, "this server was started without --clip: send features (.npy), not videos")
      feats, measured = self.videos(path)
    except UserError as e:
      raise HTTPError(400, f"{request.media_url}: {e}") from None
    return feats, request.duration or measured

  def submit(self, request: ChatRequest, feats: np.ndarray):
    """Returns (the engine's Future, prompt positions, max new tokens)."""
    bot = self.engine.bot
    try:
      ids = tuple(bot.prompt_ids(request.history, request.question))
    except UserError as e:
      raise HTTPError(400, str(e)) from None
    positions = self.engine.prompt_positions(ids, feats.shape[0])
    room = self.engine.context - positions
    max_new = request.max_tokens if request.max_tokens is not None else min(self.max_new_tokens, room)
    if room < 1 or max_new > room:
      raise HTTPError(400, f"the conversation takes {positions} of the server's {self.engine.context} positions; "
                           f"{max(room, 0)} are left for the answer, {max_new} asked (max_tokens)")
    key = jax.random.fold_in(jax.random.key(request.seed), len(request.history))
    try:
      future = self.engine.submit(batching.Request(ids, feats, max_new, request.temperature, request.top_p, key))
    except batching.QueueFull as e:
      raise HTTPError(503, f"the server is full ({e}); retry later", "server_busy") from None
    return future, positions, max_new

  def completion(self, tokens: list[int], positions: int, max_new: int, duration: float | None) -> dict:
    """Returns the chat-completion JSON of generated ids."""
    text = prompts.decode_answer(self.engine.bot.encoder, tokens)
    found = moments.find_moments(text)
    spans = [m.seconds(duration) if duration else (None, None) for m in found]
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": self.model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": "length" if len(tokens) >= max_new else "stop"}],
        "usage": {"prompt_tokens": positions, "completion_tokens": len(tokens),
                  "total_tokens": positions + len(tokens)},
        "moments": [{"start": None if s is None else round(s, 2), "end": None if e is None else round(e, 2),
                     "start_frame": m.start, "end_frame": m.end} for m, (s, e) in zip(found, spans)],
        "duration": duration,
    }


def create_app(service: ChatService, api_key: str | None = None, max_body: int = MAX_BODY_BYTES):
  """Returns the Starlette app of a ChatService."""
  from starlette.applications import Starlette  # pylint: disable=g-import-not-at-top
  from starlette.concurrency import run_in_threadpool  # pylint: disable=g-import-not-at-top
  from starlette.exceptions import HTTPException as StarletteHTTPException  # pylint: disable=g-import-not-at-top
  from starlette.responses import JSONResponse  # pylint: disable=g-import-not-at-top
  from starlette.routing import Route  # pylint: disable=g-import-not-at-top

  def error(e: HTTPError):
    return JSONResponse({"error": {"message": e.message, "type": e.kind, "code": e.status}}, status_code=e.status)

  def authorize(request):
    if api_key is None:
      return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
      raise HTTPError(401, "a valid API key is needed: Authorization: Bearer <key>", "authentication_error")

  async def read_json(request):
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > max_body):
      raise HTTPError(413, f"the body is over {max_body} bytes")
    body = bytearray()
    async for chunk in request.stream():
      body += chunk
      if len(body) > max_body:
        raise HTTPError(413, f"the body is over {max_body} bytes")
    try:
      return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
      raise HTTPError(400, f"the body is not JSON: {e}") from None

  async def chat_completions(request):
    try:
      authorize(request)
      parsed = parse_chat_request(await read_json(request))
      feats, duration = await run_in_threadpool(service.inputs, parsed)
      future, positions, max_new = service.submit(parsed, feats)
      try:
        tokens = await asyncio.wrap_future(future)
      except Exception as e:  # pylint: disable=broad-except
        raise HTTPError(500, f"generation failed: {e}", "server_error") from None
      return JSONResponse(service.completion(tokens, positions, max_new, duration))
    except HTTPError as e:
      return error(e)

  async def health(_):
    engine = service.engine
    return JSONResponse({"status": "ok", "model": service.model_name, "slots": engine.slots, "busy": engine.busy,
                         "waiting": engine.waiting, "completed": engine.stats.completed})

  async def refused(request, exc):
    del request
    return error(HTTPError(exc.status_code, str(exc.detail), "invalid_request_error"))

  async def internal(request, exc):
    del request
    return error(HTTPError(500, f"internal error: {exc!r}", "server_error"))

  @contextlib.asynccontextmanager
  async def lifespan(_):
    yield
    service.engine.close()

  return Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                           Route("/health", health, methods=["GET"])],
                   exception_handlers={StarletteHTTPException: refused, 500: internal}, lifespan=lifespan)


def load_service(model: str, clip: str | None, *, slots: int, context: int | None, media_roots, max_new_tokens: int,
                 max_waiting: int, dtype: str = "auto") -> ChatService:
  """Returns a ChatService of `--model` (a model directory or a quickstart workdir) and its engine."""
  from vtimellm_jax.inference import answerer, served  # pylint: disable=g-import-not-at-top

  spec = served.resolve(model, clip)
  media = MediaRoots(media_roots)  # before minutes of loading
  bot = answerer.load_answerer(spec.model_dir, dtype)
  engine = batching.Engine(bot, slots=slots, context=context, max_waiting=max_waiting)
  return ChatService(engine, served.VideoCache(spec, dtype), media, max_new_tokens, spec.model_dir.name)


class RunningServer:
  """A uvicorn server on its own thread (tests and benchmarks); `url` is where it listens."""

  def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
    import threading  # pylint: disable=g-import-not-at-top
    import uvicorn  # pylint: disable=g-import-not-at-top

    self._server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    self._thread = threading.Thread(target=self._server.run, name="vtimellm-http", daemon=True)
    self._thread.start()
    deadline = time.monotonic() + 60
    while not self._server.started:
      if not self._thread.is_alive() or time.monotonic() > deadline:
        raise RuntimeError(f"the HTTP server did not start on {host}:{port}")
      time.sleep(0.02)
    bound = self._server.servers[0].sockets[0].getsockname()
    self.url = f"http://{host}:{bound[1]}"

  def close(self) -> None:
    self._server.should_exit = True
    self._thread.join(timeout=30)
