"""The HTTP server: an OpenAI-style chat-completions endpoint over the continuous-batching engine.

  POST /v1/chat/completions  a chat request (chat_request.py) -> a chat completion, or its chunks
  GET  /v1/models            {"object": "list", "data": [{"id": <model>, "object": "model", ...}]}
  GET  /health               {"status": "ok", "slots", "busy", "waiting", "completed"}

A request's body is checked whole (`chat_request.parse_chat_request`) before any work; its media
file and its length in the context are checked here, still before any prefill. The answer comes
back as an OpenAI chat completion plus `moments`: every "from SS to EE" of the answer, in frames
and, when the video's length is known, in seconds. Turn k of a conversation (k earlier answers)
samples with `fold_in(key(seed), k)`, as `chat` does, so a conversation gets `chat`'s answers;
temperature 0 is greedy.

With `"stream": true` the answer comes as OpenAI's server-sent events: `chat.completion.chunk`s
whose text deltas leave as the engine decodes their tokens, a last chunk with the finish reason and
the whole answer's `moments`, the usage when `stream_options.include_usage` asks for it, then
`data: [DONE]`. A client that goes away, streaming or not, frees its slot before the next step.
Every refusal, uvicorn's own included, is the error JSON of `chat_request.HTTPError`.

Who may read what: the server binds 127.0.0.1 unless told otherwise; with an API key every
/v1 request needs `Authorization: Bearer <key>` (401 without it); media are read only under the
`--media-root` folders, after resolving `..` and symlinks, and a path outside them is a 403 whose
message is the same whether or not the file exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import pathlib
import re
import time
import urllib.parse
import uuid

import jax
import numpy as np

from vtimellm_jax.data import records, templates
from vtimellm_jax.errors import UserError
from vtimellm_jax.inference import batching, moments, prompts
from vtimellm_jax.inference.chat_request import ChatRequest, HTTPError, parse_chat_request, parse_json
from vtimellm_jax.video import decode

MAX_BODY_BYTES = 1 << 20  # a chat request is text and a path: a megabyte is generous
FEATURE_SUFFIX = ".npy"
OWNER = "vtimellm-jax"

_log = logging.getLogger(__name__)


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


_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")  # SentencePiece's byte-fallback pieces


def _settled(text: str) -> str:
  """Returns the part of a running answer's text that no later token can change.

  Held back: a U+FFFD tail (the first bytes of a character whose rest is still to come), whitespace
  (the whole answer is stripped) and a beginning of the stop string (the whole answer loses one).
  """
  while True:
    cut = text.rstrip().rstrip("\ufffd")
    cut = next((cut[:-k] for k in range(len(templates.SEP2), 0, -1) if cut.endswith(templates.SEP2[:k])), cut)
    if cut == text:
      return text
    text = cut


class TextDeltas:
  """Hands out a growing answer's text as deltas whose concatenation is the whole answer's text.

  Each push decodes the ids so far and hands out what the settled text gained: a token decoded
  alone would lose the space SentencePiece gives it from its neighbours and split a multi-byte
  character across tokens. A trailing run of byte-fallback tokens is left out until a text token
  closes it, because the tokenizer decodes such a run as one byte string: a byte that cannot end
  a character turns every byte of its run into U+FFFD, the ones already decoded included. A token the
  answer's decoding drops (a special token such as `<s>`) does not close a run: the tokenizer never
  sees it, so the bytes on either side of it are decoded together.
  """

  def __init__(self, decode, in_run):
    self._decode = decode  # ids -> text, as the whole answer is decoded
    self._in_run = in_run  # id -> whether it leaves a run of byte tokens open (a byte token, or one dropped)
    self._seen = 0  # ids looked at so far
    self._run = None  # where the trailing run of byte tokens starts, if the ids end with one
    self.sent = ""

  def push(self, ids) -> str:
    """Returns the text the answer so far adds to what was sent ("" while its tail may still change)."""
    for i in range(self._seen, len(ids)):
      if not self._in_run(ids[i]):
        self._run = None
      elif self._run is None:
        self._run = i
    self._seen = len(ids)
    text = _settled(self._decode(ids[:self._run]))
    if len(text) <= len(self.sent) or not text.startswith(self.sent):
      return ""
    delta, self.sent = text[len(self.sent):], text
    return delta

  def finish(self, text: str) -> str:
    """Returns the last delta, given the whole answer's text."""
    if not text.startswith(self.sent):  # a tokenizer whose decoding rewrites settled text (none served here)
      _log.warning("streamed text %r is not a prefix of the answer %r", self.sent, text)
      return ""
    delta, self.sent = text[len(self.sent):], text
    return delta


class TokenFeed:
  """An engine listener that hands a request's new token ids to the asyncio loop that serves it.

  The engine calls it on its own thread; `next` waits on the loop for the ids handed out since its
  last call, and returns None once the request's Future is done (after every id it handed out).
  """

  def __init__(self):
    self._loop = asyncio.get_running_loop()
    self._queue: asyncio.Queue = asyncio.Queue()

  def __call__(self, ids: list[int]) -> None:
    self._loop.call_soon_threadsafe(self._queue.put_nowait, ids)

  def close(self, _future=None) -> None:
    """Marks the end (a Future's done-callback); a loop already closed has no reader left."""
    with contextlib.suppress(RuntimeError):
      self._loop.call_soon_threadsafe(self._queue.put_nowait, None)

  async def next(self) -> list[int] | None:
    """Returns the ids handed out since the last call (waiting for one), or None at the end."""
    ids = await self._queue.get()
    while ids is not None and not self._queue.empty():
      more = self._queue.get_nowait()
      if more is None:
        self._queue.put_nowait(None)  # the end comes on the next call
        break
      ids = ids + more
    return ids


class ChatService:
  """Turns parsed requests into engine requests and answers; shared by the HTTP app and tests."""

  def __init__(self, engine: batching.Engine, videos, media: MediaRoots, max_new_tokens: int, model_name: str):
    self.engine = engine
    self.videos = videos  # served.VideoCache
    self.media = media
    self.max_new_tokens = max_new_tokens
    self.model_name = model_name
    self.created = int(time.time())
    self._run_tokens: dict[int, bool] = {}  # token -> `_in_byte_run`

  def model_card(self) -> dict:
    """Returns the served model as OpenAI's /v1/models lists one."""
    return {"id": self.model_name, "object": "model", "created": self.created, "owned_by": OWNER}

  def inputs(self, request: ChatRequest) -> tuple[np.ndarray, float | None]:
    """Returns (float32[N, D] features, duration or None) of the request's media (may run CLIP)."""
    if request.max_tokens is not None and request.max_tokens >= self.engine.context:
      raise HTTPError(400, f"max_tokens {request.max_tokens} leaves no positions of the server's "
                           f"{self.engine.context} for the conversation")
    path = self.media.resolve(request.media_url)
    try:
      if path.suffix == FEATURE_SUFFIX:
        return records.read_features(path, self.engine.bot.feature_dim), request.duration
      if path.suffix.lower() not in decode.VIDEO_EXTENSIONS:
        raise HTTPError(400, f"{request.media_url}: not a video ({' '.join(decode.VIDEO_EXTENSIONS)}) "
                             f"nor a features {FEATURE_SUFFIX}")
      if not self.videos.can_encode:
        raise HTTPError(400, "this server was started without --clip: send features (.npy), not videos")
      feats, measured = self.videos(path)
    except UserError as e:
      raise HTTPError(400, str(e)) from None  # the readers' messages begin with the file's path
    return feats, request.duration or measured

  def submit(self, request: ChatRequest, feats: np.ndarray, listener: batching.TokenListener | None = None):
    """Returns (the engine's Future, prompt positions, max new tokens); `listener` gets the ids as decoded."""
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
      future = self.engine.submit(batching.Request(ids, feats, max_new, request.temperature, request.top_p, key),
                                  listener)
    except batching.QueueFull as e:
      raise HTTPError(503, f"the server is full ({e}); retry later", "server_busy") from None
    return future, positions, max_new

  def decode(self, tokens) -> str:
    """Returns the answer text of generated ids."""
    return prompts.decode_answer(self.engine.bot.encoder, tokens)

  def text_deltas(self) -> TextDeltas:
    """Returns a TextDeltas of this model's tokenizer, for one streamed answer."""
    return TextDeltas(self.decode, self._in_byte_run)

  def _in_byte_run(self, token: int) -> bool:
    """Returns whether `token` leaves a run of byte-fallback tokens open: it is one, or the answer's
    decoding drops it (it decodes to nothing: a special token, or an id past the tokenizer's pieces
    in a model's padded vocabulary, which has no piece)."""
    if token not in self._run_tokens:
      encoder = self.engine.bot.encoder
      piece = encoder.pieces([token])[0]
      self._run_tokens[token] = ((piece is not None and _BYTE_PIECE.fullmatch(piece) is not None)
                                 or encoder.answer_text([token]) == "")
    return self._run_tokens[token]

  def answer_fields(self, tokens: list[int], positions: int, max_new: int, duration: float | None) -> dict:
    """Returns what both reply forms say of an answer: its text, finish reason, usage, moments and duration."""
    text = self.decode(tokens)
    found = moments.find_moments(text)
    spans = [m.seconds(duration) if duration else (None, None) for m in found]
    return {
        "text": text,
        "finish_reason": "length" if len(tokens) >= max_new else "stop",
        "usage": {"prompt_tokens": positions, "completion_tokens": len(tokens), "total_tokens": positions + len(tokens)},
        "moments": [{"start": None if s is None else round(s, 2), "end": None if e is None else round(e, 2),
                     "start_frame": m.start, "end_frame": m.end} for m, (s, e) in zip(found, spans)],
        "duration": duration,
    }

  def completion(self, tokens: list[int], positions: int, max_new: int, duration: float | None) -> dict:
    """Returns the chat-completion JSON of generated ids."""
    fields = self.answer_fields(tokens, positions, max_new, duration)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": self.model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": fields["text"]},
                     "finish_reason": fields["finish_reason"]}],
        "usage": fields["usage"],
        "moments": fields["moments"],
        "duration": duration,
    }

  async def chunks(self, request: ChatRequest, future, feed: TokenFeed, positions: int, max_new: int,
                   duration: float | None):
    """Yields the `chat.completion.chunk` JSON of a streamed answer as its tokens are decoded.

    The first chunk gives the role, each later one the text its tokens settled; the last choice
    chunk carries the finish reason with the whole answer's moments, and a chunk without choices
    the usage if asked. An engine failure ends the stream with an error event, as OpenAI's does.
    """
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": self.model_name}
    if request.include_usage:
      head["usage"] = None  # OpenAI names the field in every chunk, null until the last

    def chunk(delta: dict, finish_reason=None, **extra) -> dict:
      return head | {"choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]} | extra

    yield chunk({"role": "assistant", "content": ""})
    deltas, ids = self.text_deltas(), []
    while (new := await feed.next()) is not None:
      ids += new
      if text := deltas.push(ids):
        yield chunk({"content": text})
    try:
      tokens = future.result()
    except Exception as e:  # pylint: disable=broad-except
      yield HTTPError(500, f"generation failed: {e}", "server_error").json()
      return
    fields = self.answer_fields(tokens, positions, max_new, duration)
    if text := deltas.finish(fields["text"]):
      yield chunk({"content": text})
    yield chunk({}, fields["finish_reason"], moments=fields["moments"], duration=duration)
    if request.include_usage:
      yield head | {"choices": [], "usage": fields["usage"]}


async def _call_on_disconnect(receive, callback) -> None:
  """Calls `callback` when the client's connection closes (after the body, `receive` waits for that)."""
  while (await receive())["type"] != "http.disconnect":
    pass
  callback()


class EventStream:
  """An ASGI response of server-sent events: each JSON event as `data: ...`, then `data: [DONE]`.

  `on_disconnect` runs as soon as the client goes away, even while no event is due, so a stream
  waiting on the engine stops its request at once.
  """

  def __init__(self, events, on_disconnect):
    self.events = events  # an async iterator of JSON-able events
    self.on_disconnect = on_disconnect

  async def __call__(self, scope, receive, send) -> None:
    del scope
    watcher = asyncio.ensure_future(_call_on_disconnect(receive, self.on_disconnect))
    try:
      await send({"type": "http.response.start", "status": 200,
                  "headers": [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                              (b"x-accel-buffering", b"no")]})
      async for event in self.events:
        data = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
        await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})
      await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
    finally:
      watcher.cancel()
      self.on_disconnect()  # a stream that ended early (a failed send) stops its request too
      await self.events.aclose()


def create_app(service: ChatService, api_key: str | None = None, max_body: int = MAX_BODY_BYTES):
  """Returns the Starlette app of a ChatService."""
  from starlette.applications import Starlette  # pylint: disable=g-import-not-at-top
  from starlette.concurrency import run_in_threadpool  # pylint: disable=g-import-not-at-top
  from starlette.exceptions import HTTPException as StarletteHTTPException  # pylint: disable=g-import-not-at-top
  from starlette.responses import JSONResponse  # pylint: disable=g-import-not-at-top
  from starlette.routing import Route  # pylint: disable=g-import-not-at-top

  def error(e: HTTPError):
    return JSONResponse(e.json(), status_code=e.status)

  def authorize(request):
    if api_key is None:
      return
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
      raise HTTPError(401, "a valid API key is needed: Authorization: Bearer <key>", "authentication_error")

  async def read_json(request):
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
      raise HTTPError(400, f"Content-Length {declared!r} is not a number of bytes")
    if declared is not None and int(declared) > max_body:
      raise HTTPError(413, f"the body is over {max_body} bytes")
    body = bytearray()
    async for chunk in request.stream():
      body += chunk
      if len(body) > max_body:
        raise HTTPError(413, f"the body is over {max_body} bytes")
    return parse_json(bytes(body))

  async def answer(request, parsed: ChatRequest, feats, duration):
    """Returns the whole answer's JSON; the request stops if its client goes away first."""
    future, positions, max_new = service.submit(parsed, feats)
    watcher = asyncio.ensure_future(_call_on_disconnect(request.receive, lambda: service.engine.cancel(future)))
    try:
      tokens = await asyncio.wrap_future(future)
    except Exception as e:  # pylint: disable=broad-except
      raise HTTPError(500, f"generation failed: {e}", "server_error") from None
    finally:
      watcher.cancel()
    return JSONResponse(service.completion(tokens, positions, max_new, duration))

  def stream(parsed: ChatRequest, feats, duration):
    """Returns the event stream of an answer; its chunks leave as the engine decodes their tokens."""
    feed = TokenFeed()
    future, positions, max_new = service.submit(parsed, feats, feed)
    future.add_done_callback(feed.close)
    events = service.chunks(parsed, future, feed, positions, max_new, duration)
    return EventStream(events, lambda: service.engine.cancel(future))

  async def chat_completions(request):
    try:
      authorize(request)
      parsed = parse_chat_request(await read_json(request))
      feats, duration = await run_in_threadpool(service.inputs, parsed)
      if parsed.stream:
        return stream(parsed, feats, duration)
      return await answer(request, parsed, feats, duration)
    except HTTPError as e:
      return error(e)

  async def models(request):
    try:
      authorize(request)
    except HTTPError as e:
      return error(e)
    return JSONResponse({"object": "list", "data": [service.model_card()]})

  async def model(request):
    try:
      authorize(request)
      if request.path_params["model"] != service.model_name:
        raise HTTPError(404, f"no model {request.path_params['model']!r}; this server serves "
                             f"{service.model_name!r}", "not_found_error")
    except HTTPError as e:
      return error(e)
    return JSONResponse(service.model_card())

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
                           Route("/v1/models", models, methods=["GET"]),
                           Route("/v1/models/{model:path}", model, methods=["GET"]),
                           Route("/health", health, methods=["GET"])],
                   exception_handlers={StarletteHTTPException: refused, 500: internal}, lifespan=lifespan)


def http_protocol():
  """Returns uvicorn's HTTP protocol class, refusing a request it cannot parse with the server's error JSON.

  uvicorn answers a request that is not valid HTTP (`Content-Length: abc`, a malformed request
  line or header) itself, before the app sees it, in plain text; this subclass of the protocol
  uvicorn would pick writes that 400 as every other refusal of the server.
  """
  from uvicorn.protocols.http.auto import AutoHTTPProtocol  # pylint: disable=g-import-not-at-top

  class JSONRefusalProtocol(AutoHTTPProtocol):  # pylint: disable=abstract-method

    def send_400_response(self, msg: str) -> None:
      del msg  # uvicorn's "Invalid HTTP request received."
      refusal = HTTPError(400, "not a valid HTTP request: a malformed request line or header (such as a "
                               "Content-Length that is not a number of bytes)")
      body = json.dumps(refusal.json()).encode()
      head = (f"HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
              f"connection: close\r\n\r\n").encode()
      self.transport.write(head + body)
      self.transport.close()

  return JSONRefusalProtocol


def load_service(model: str, clip: str | None, *, slots: int, context: int | None, media_roots, max_new_tokens: int,
                 max_waiting: int, dtype: str = "auto", quant: str = "none") -> ChatService:
  """Returns a ChatService of `--model` (a model directory or a quickstart workdir) and its engine
  (`quant`: the decoder projections held quantised, `answerer.load_answerer`)."""
  from vtimellm_jax.inference import answerer, served  # pylint: disable=g-import-not-at-top

  spec = served.resolve(model, clip)
  media = MediaRoots(media_roots)  # before minutes of loading
  bot = answerer.load_answerer(spec.model_dir, dtype, quant)
  engine = batching.Engine(bot, slots=slots, context=context, max_waiting=max_waiting)
  return ChatService(engine, served.VideoCache(spec, dtype), media, max_new_tokens, spec.model_dir.name)


class RunningServer:
  """A uvicorn server on its own thread (tests and benchmarks); `url` is where it listens."""

  def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
    import threading  # pylint: disable=g-import-not-at-top
    import uvicorn  # pylint: disable=g-import-not-at-top

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", http=http_protocol())
    self._server = uvicorn.Server(config)
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
