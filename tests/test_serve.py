"""`serve`: continuous batching gives every request its one-at-a-time answer, over real HTTP on localhost.

References: `Answerer.answer` (the `chat` path, itself checked against HF `generate` in
test_inference_cli.py) and HF greedy `generate`. The load test counts decode steps rather than
timing them (wall-clock figures come from `vtimellm-jax bench serve`, docs/performance.md).
Streaming is driven by the official `openai` client; where a test needs the engine to be at a given
point (text sent before the answer ends, a client leaving mid-answer), a gate holds the engine
before a decode step instead of relying on timing.
"""

import concurrent.futures
import dataclasses
from http import client as http_client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request

import jax
import numpy as np
import openai
import pytest

from inference_fixtures import tiny_vtimellm, write_features  # noqa: F401
from vtimellm_jax import cli
from vtimellm_jax.inference import batching, generate, prompts, served, server

KEY = "test-key"
_WORDS = "the a man woman dog is counting money walks runs jumps into pool kitchen cooking video".split()


def _question(rng) -> str:
  return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 40))) + "?"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
  """A media root with feature files, and a folder outside it with a file of its own."""
  base = tmp_path_factory.mktemp("serve")
  root, outside = base / "media", base / "outside"
  arrays = write_features(root, [f"v{i}" for i in range(4)])
  write_features(outside, ["secret"])
  os.symlink(outside / "secret.npy", root / "link.npy")
  return root, outside, arrays


@pytest.fixture(scope="module")
def service(tiny_vtimellm, media):  # noqa: F811
  root, _, _ = media
  svc = server.load_service(str(tiny_vtimellm.model_dir), None, slots=16, context=512, media_roots=[str(root)],
                            max_new_tokens=12, max_waiting=256)
  yield svc
  svc.engine.close()


@pytest.fixture(scope="module")
def http(service):
  running = server.RunningServer(server.create_app(service, api_key=KEY))
  yield running
  running.close()


def _post(http, body, key=KEY, raw: bytes | None = None):
  headers = {"Content-Type": "application/json"}
  if key is not None:
    headers["Authorization"] = f"Bearer {key}"
  data = raw if raw is not None else json.dumps(body).encode()
  request = urllib.request.Request(http.url + "/v1/chat/completions", data=data, headers=headers)
  try:
    with urllib.request.urlopen(request, timeout=300) as response:
      return response.status, json.loads(response.read())
  except urllib.error.HTTPError as e:
    return e.code, json.loads(e.read())


def _post_oversized(http, size: int):
  """Returns (status, reply) for a request that declares a `size`-byte body and waits to be asked for it.

  `Expect: 100-continue`: the server refuses on the declared length before any body byte is sent.
  Sending the body itself races the server's early close (a broken pipe on a loaded machine).
  """
  host, port = http.url.removeprefix("http://").rsplit(":", 1)
  conn = http_client.HTTPConnection(host, int(port), timeout=300)
  try:
    conn.putrequest("POST", "/v1/chat/completions")
    for name, value in (("Content-Type", "application/json"), ("Authorization", f"Bearer {KEY}"),
                        ("Content-Length", str(size)), ("Expect", "100-continue")):
      conn.putheader(name, value)
    conn.endheaders()
    response = conn.getresponse()
    return response.status, json.loads(response.read())
  finally:
    conn.close()


def _client(http) -> openai.OpenAI:
  return openai.OpenAI(base_url=http.url + "/v1", api_key=KEY, max_retries=0, timeout=300)


def _streamed(client, model: str, body) -> tuple[str, list]:
  """Returns (the text of a streamed answer, its chunks), usage asked for."""
  chunks = list(client.chat.completions.create(model=model, stream=True, stream_options={"include_usage": True},
                                               **body))
  return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


class _DecodeGate:
  """Lets the engine run `after` decode steps, then holds it before the next one until `release`."""

  def __init__(self, monkeypatch, after: int):
    self.left = after
    self.reached, self._open = threading.Event(), threading.Event()
    real = batching.Engine._program  # pylint: disable=protected-access

    def program(engine, *key):  # a decode step waits at the gate; a row move or a prefill does not
      compiled = real(engine, *key)

      def step(*args):
        if self.left == 0 and not self._open.is_set():
          self.reached.set()
          self._open.wait(timeout=300)
        self.left -= 1
        return compiled(*args)

      return compiled if key[0] in ("move", "prefill") else step

    monkeypatch.setattr(batching.Engine, "_program", program)

  def release(self) -> None:
    self._open.set()


def _until(condition, what: str) -> None:
  """Waits for `condition()` (the engine's thread gets there on its own); fails after a minute."""
  deadline = time.monotonic() + 60
  while not condition():
    assert time.monotonic() < deadline, f"never: {what}"
    time.sleep(0.01)


def _body(path, question, history=(), **extra):
  """Returns a request body; a pathlib path is sent as a file:// URL, a string as it is."""
  url = path if isinstance(path, str) else f"file://{path}"
  messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                           {"type": "text", "text": history[0][0] if history else question}]}]
  if history:
    for k, (asked, answered) in enumerate(history):
      if k:
        messages.append({"role": "user", "content": asked})
      messages.append({"role": "assistant", "content": answered})
    messages.append({"role": "user", "content": question})
  return {"messages": messages, **extra}


def test_engine_answers_equal_the_chat_path_greedy_and_sampled(service, media, tiny_vtimellm):  # noqa: F811
  """Twelve conversations at once on 16 slots and on 3 (refilled) equal `Answerer.answer` one by one."""
  _, _, arrays = media
  bot, rng = service.engine.bot, np.random.RandomState(0)
  cases = []
  for i in range(12):
    history = [] if i % 4 != 1 else [(prompts.chat_question(_question(rng)), "from 10 to 20 a man walks.")]
    question = _question(rng)
    question = prompts.chat_question(question) if not history else question
    config = generate.GenerationConfig(max_new_tokens=int(rng.randint(3, 12)),
                                       temperature=[0.0, 0.8, 1.3][i % 3], top_p=[1.0, 1.0, 0.9, 0.7][i % 4])
    cases.append((history, question, arrays[f"v{i % 4}"].astype(np.float32), config, i))
  expected = []
  for history, question, feats, config, seed in cases:
    key = jax.random.fold_in(jax.random.key(seed), len(history))
    answer, = bot.answer([(history, question)], [feats], config, key[None])
    expected.append(list(answer.token_ids))
  # The chat path is HF's greedy answer (test_inference_cli.py); one case checks that chain here too.
  greedy = [k for k, c in enumerate(cases) if c[3].greedy and not c[0]][0]
  prompt = prompts.conversation_prompt([], cases[greedy][1])
  assert expected[greedy] == tiny_vtimellm.hf_greedy(prompt, cases[greedy][2], cases[greedy][3].max_new_tokens)

  small = batching.Engine(bot, slots=3, context=512)
  try:
    for engine in (service.engine, small):
      futures = [engine.submit(batching.Request(tuple(bot.prompt_ids(h, q)), f, c.max_new_tokens, c.temperature,
                                                c.top_p, jax.random.fold_in(jax.random.key(s), len(h))))
                 for h, q, f, c, s in cases]
      assert [f.result(timeout=300) for f in futures] == expected
    # A prompt shape compiles its prefill once: an engine's first prefill, into the cache as
    # created, runs the program of the later ones (an engine of a size no other test uses).
    fresh = batching.Engine(bot, slots=2, context=384)
    h, q, f, _, _ = cases[0]
    for _ in range(2):
      fresh.submit(batching.Request(tuple(bot.prompt_ids(h, q)), f, 2)).result(timeout=300)
    fresh.close()
    prefills = [k for k in fresh._programs if k[0] == "prefill"]  # pylint: disable=protected-access
    assert len(prefills) == 1 and prefills[0][1] == 1, prefills
  finally:
    small.close()
  assert small.stats.prefills == 12 and small.stats.completed == 12


def test_64_concurrent_requests_get_their_one_at_a_time_answers_in_far_fewer_steps(http, service, media):
  root, _, _ = media
  rng = np.random.RandomState(1)
  bodies = []
  for i in range(64):
    history = [(_question(rng), "from 05 to 30 the dog runs.")] if i % 4 == 0 else ()
    bodies.append(_body(root / f"v{i % 4}.npy", _question(rng), history, temperature=0,
                        max_tokens=int(rng.randint(2, 12))))
  stats = service.engine.stats
  before = stats.decode_steps
  alone = [_post(http, body) for body in bodies]
  one_at_a_time_steps = stats.decode_steps - before
  assert all(status == 200 for status, _ in alone), alone[:2]
  client = _client(http)

  def answer(reply):
    return reply["choices"][0]["message"]["content"], reply["usage"]

  def ask(i):  # every other request streams: both kinds share the engine's steps
    if i % 2:
      text, chunks = _streamed(client, service.model_name, bodies[i])
      return text, chunks[-1].usage.model_dump(exclude_none=True)
    return answer(_post(http, bodies[i])[1])

  before, calls = stats.decode_steps, sum(stats.prefill_batches.values())
  with concurrent.futures.ThreadPoolExecutor(64) as pool:
    together = list(pool.map(ask, range(64)))
  concurrent_steps = stats.decode_steps - before
  assert together == [answer(reply) for _, reply in alone]
  # 64 requests on 16 slots: each step advances up to 16 answers instead of one, and requests that
  # wait together are prefilled together.
  assert concurrent_steps * 5 <= one_at_a_time_steps, (concurrent_steps, one_at_a_time_steps)
  assert sum(stats.prefill_batches.values()) - calls < 64 and max(stats.prefill_batches) > 1, stats.prefill_batches


def test_moments_come_back_in_seconds_and_frames(http, service, media):
  root, _, arrays = media
  tokens = service.engine.bot.encoder.tokenizer.encode("from 05 to 20.", add_special_tokens=False)
  reply = service.completion(tokens, 100, 50, duration=40.0)
  assert reply["choices"][0]["message"]["content"] == "from 05 to 20."
  assert reply["moments"] == [{"start": 2.0, "end": 8.0, "start_frame": 5, "end_frame": 20}]
  assert service.completion(tokens, 100, 50, duration=None)["moments"][0]["start"] is None
  body = {"messages": [{"role": "user", "content": [
      {"type": "video_url", "video_url": {"url": str(root / "v0.npy"), "duration": 12.5}},
      {"type": "text", "text": "what happens?"}]}], "temperature": 0, "max_tokens": 3}
  status, reply = _post(http, body)
  assert status == 200 and reply["duration"] == 12.5 and reply["usage"]["completion_tokens"] <= 3


def test_bad_requests_get_their_4xx_and_the_server_goes_on(http, service, media, tmp_path, tiny_vtimellm):  # noqa: F811
  root, outside, _ = media
  good = _body(root / "v1.npy", "what happens?", temperature=0, max_tokens=4)

  def refused(body=None, status=None, *, key=KEY, raw=None, says=""):
    code, reply = _post(http, body, key=key, raw=raw)
    assert code == status, (code, reply)
    assert says in reply["error"]["message"], reply
    return reply["error"]["message"]

  refused(good, 401, key=None, says="API key")
  refused(good, 401, key="wrong", says="API key")
  refused(raw=b"{not json", status=400, says="not JSON")
  refused(raw=b"[1, 2]", status=400, says="JSON object")
  code, reply = _post_oversized(http, (2 << 20) + 16)
  assert code == 413 and "bytes" in reply["error"]["message"], (code, reply)
  refused({"messages": []}, 400, says="messages")
  refused({"messages": [{"role": "system", "content": "be brief"}] + good["messages"]}, 400, says="system")
  refused({"messages": [{"role": "user", "content": "no video here"}]}, 400, says="video_url")
  refused(good | {"temperature": -1}, 400, says="temperature")
  refused(good | {"max_tokens": 100000}, 400, says="positions")
  refused(_body(root / "v1.npy", "word " * 600), 400, says="positions")
  refused(_body("relative/v1.npy", "hi"), 400, says="absolute")
  refused(_body(root / "v1.npy", "hi") | {"messages": [{"role": "user", "content": [
      {"type": "video_url", "video_url": {"url": "http://example.com/x.mp4"}}, {"type": "text", "text": "hi"}]}]},
          400, says="only files")
  refused(_body(root / "missing.npy", "hi"), 404, says="no such file")
  # Outside the roots: an absolute path, a `..` walk out of a root, a symlink inside a root pointing
  # out, and a path that does not exist there at all get one and the same answer.
  messages = [refused(_body(path, "hi"), 403, says="not under a media root")
              for path in (outside / "secret.npy", f"{root}/../outside/secret.npy", root / "link.npy",
                           outside / "no-such-file.npy")]
  assert len({m.replace(str(root / "link.npy"), "X").split(": ", 1)[1] for m in messages}) == 1
  for name in ("junk.npy", "junk.mp4", "notes.txt"):
    (tmp_path / name).write_bytes(b"not an array, nor a video")
  service.media.roots.append(str(tmp_path.resolve()))
  videos = service.videos
  try:
    # A reader's message names the file; the server adds no second name.
    assert refused(_body(tmp_path / "junk.npy", "hi"), 400, says="junk.npy").count("junk.npy") == 1
    refused(_body(tmp_path / "notes.txt", "hi"), 400, says="not a video")
    refused(_body(tmp_path / "junk.mp4", "hi"), 400, says="without --clip")
    service.videos = served.VideoCache(served.ServedModel(tiny_vtimellm.model_dir, "tiny-random-64"))
    message = refused(_body(tmp_path / "junk.mp4", "hi"), 400, says="cannot decode the video")
    assert message.startswith(f"{(tmp_path / 'junk.mp4').resolve()}: cannot decode the video ("), message
  finally:
    service.media.roots.pop()
    service.videos = videos
  service.engine.max_waiting = 0
  try:
    refused(good, 503, says="full")
  finally:
    service.engine.max_waiting = 256
  status, reply = _post(http, good)
  assert status == 200 and reply["choices"][0]["message"]["content"] is not None
  with urllib.request.urlopen(http.url + "/health", timeout=30) as response:
    assert json.loads(response.read())["status"] == "ok"


def test_serve_cli_refuses_bad_settings_before_loading(tmp_path, capsys):
  assert cli.main(["serve", "--model", str(tmp_path)]) == 2
  assert "neither a model directory" in capsys.readouterr().err
  parser, parsers = cli._build_parser(["serve"])  # pylint: disable=protected-access
  assert parsers[("serve",)].parse_args(["--model", "m"]).host == "127.0.0.1"
  del parser


def test_served_model_resolution_names_what_is_wrong(tiny_vtimellm, tmp_path):  # noqa: F811
  from vtimellm_jax.errors import UserError

  assert served.resolve(tiny_vtimellm.model_dir).model_dir == tiny_vtimellm.model_dir
  (tmp_path / "serving.json").write_text("{not json")
  with pytest.raises(UserError, match="serving.json: not a serving record"):
    served.resolve(tmp_path)
  served.write_serving_json(tmp_path, "models/vtimellm", "tiny-random-64", 0, "features/standardize.npz")
  with pytest.raises(UserError, match="no model.json"):
    served.resolve(tmp_path)
  (tmp_path / "models").mkdir()
  (tmp_path / "models" / "vtimellm").symlink_to(tiny_vtimellm.model_dir)
  with pytest.raises(UserError, match="standardisation statistics not found"):
    served.resolve(tmp_path)
  served.write_serving_json(tmp_path, "models/vtimellm", "tiny-random-64", 3, None)
  spec = served.resolve(tmp_path)
  assert (spec.clip, spec.clip_seed, spec.stats) == ("tiny-random-64", 3, None)
  with pytest.raises(UserError, match="without --clip"):
    served.VideoCache(served.ServedModel(tiny_vtimellm.model_dir, None))(tmp_path / "x.mp4")


def _greedy_tokens(service, question: str, feats, max_new: int) -> list[int]:
  """Returns the engine's greedy ids of a one-question conversation, as the server would ask for them."""
  ids = tuple(service.engine.bot.prompt_ids([], prompts.chat_question(question)))
  return service.engine.submit(batching.Request(ids, feats, max_new)).result(timeout=300)


def test_text_deltas_add_up_to_the_answer_under_byte_fallback(service):
  """Random answers, byte-fallback tokens frequent: the deltas always join to the decoded answer.

  The tiny tokenizer decodes a run of byte tokens as one byte string, so a byte that cannot end a
  character turns the run's earlier bytes into U+FFFD too: decoding each prefix and sending its new
  suffix alone would send text the answer does not have.
  """
  encoder, rng = service.engine.bot.encoder, np.random.RandomState(0)
  pieces = encoder.pieces(range(len(encoder)))
  byte_ids = [i for i, p in enumerate(pieces) if p.startswith("<0x")]
  text_ids = [i for i, p in enumerate(pieces) if not p.startswith("<") and not p.startswith("\u2581<")]
  # Special tokens the answer drops (a random model emits them): bytes on either side decode together.
  # Ids past the tokenizer's pieces (a model's padded vocabulary) are dropped as well.
  dropped_ids = [i for i, p in enumerate(pieces) if p.startswith("<") and i not in byte_ids and i != encoder.eos_id]
  dropped_ids += [len(encoder), len(encoder) + 3]
  assert len(byte_ids) == 256 and text_ids and dropped_ids
  naive_differs = 0
  for _ in range(300):
    kinds = [byte_ids, text_ids, dropped_ids]
    ids = [int(rng.choice(kinds[rng.choice(3, p=[0.55, 0.35, 0.1])])) for _ in range(rng.randint(1, 30))]
    # Endings the settled text must wait on: a space (stripped), a lead byte, "</s>" spelled out (cut).
    ending = [[], ["<0x20>"], ["<0xE3>"], ["<0x3C>", "<0x2F>", "<0x73>", "<0x3E>"]][rng.randint(4)]
    ids += [encoder.tokenizer.convert_tokens_to_ids(p) for p in ending]
    deltas, sent = service.text_deltas(), []
    for n in range(1, len(ids) + 1):
      sent.append(deltas.push(ids[:n]))
      assert service.decode(ids).startswith("".join(sent)), (ids, n)
    assert "".join(sent) + deltas.finish(service.decode(ids)) == service.decode(ids)
    naive = "".join(service.decode(ids[:n])[len(service.decode(ids[:n - 1])):] for n in range(1, len(ids) + 1))
    naive_differs += naive != service.decode(ids)
  assert naive_differs, "the cases never needed holding back"


def test_engine_hands_out_tokens_as_decoded_and_cancel_frees_the_slot(service, media, monkeypatch):
  engine, (_, _, arrays) = service.engine, media
  feats = arrays["v2"].astype(np.float32)
  ids = tuple(engine.bot.prompt_ids([], prompts.chat_question("what is the man doing?")))
  full = engine.submit(batching.Request(ids, feats, 10)).result(timeout=300)
  # The listener gets each id while the answer is still running, in order.
  heard, future = [], None

  def listen(new):
    heard.append((list(new), future.done()))

  future = engine.submit(batching.Request(ids, feats, 10), listen)
  assert future.result(timeout=300) == full
  assert heard == [([t], False) for t in full], heard
  # A running request cancelled after 3 ids: the engine decodes no 4th, and its slot is free.
  before = dataclasses.replace(engine.stats)
  heard.clear()

  def cancel_after_three(new):
    heard.extend(new)
    if len(heard) == 3:
      engine.cancel(future)

  future = engine.submit(batching.Request(ids, feats, 10), cancel_after_three)
  with pytest.raises(batching.Cancelled):
    future.result(timeout=300)
  assert len(full) > 3 and heard == full[:3]
  assert engine.stats.decode_steps == before.decode_steps + 2 and engine.stats.cancelled == before.cancelled + 1
  assert engine.stats.completed == before.completed and engine.busy == 0
  # A waiting request cancelled leaves the queue without a prefill.
  gate = _DecodeGate(monkeypatch, after=0)
  try:
    running = engine.submit(batching.Request(ids, feats, 10))
    assert gate.reached.wait(timeout=300)
    prefills = engine.stats.prefills
    waiting = engine.submit(batching.Request(ids, feats, 10))
    assert engine.waiting == 1
    engine.cancel(waiting)
    assert engine.waiting == 0 and isinstance(waiting.exception(timeout=0), batching.Cancelled)
  finally:
    gate.release()
  assert running.result(timeout=300) == full and engine.stats.prefills == prefills


def test_decode_steps_run_on_the_smallest_batch_that_holds_the_busy_rows(service, media, monkeypatch):
  """16 slots: a lone request decodes at batch 1; three at once at batch 4, then 2 and 1 as rows end,
  the busy rows moved down, with their listeners, cancel and answers as they are alone."""
  engine, (_, _, arrays) = service.engine, media
  monkeypatch.setattr(engine, "stop_ids", frozenset())  # every answer runs to its budget: the batches are known
  feats = arrays["v1"].astype(np.float32)
  ids = tuple(engine.bot.prompt_ids([], prompts.chat_question("when does the dog jump into the pool?")))

  def since(before: batching.Stats) -> tuple[dict, int]:
    steps = {b: n - before.batch_steps.get(b, 0) for b, n in engine.stats.batch_steps.items()}
    return {b: n for b, n in steps.items() if n}, engine.stats.moves - before.moves

  before = dataclasses.replace(engine.stats, batch_steps=engine.stats.batch_steps.copy())
  full = engine.submit(batching.Request(ids, feats, 12)).result(timeout=300)
  assert engine.slots == 16 and len(full) == 12 and since(before) == ({1: 11}, 0)  # the prefill gives token 1

  # Budgets 2, 12, 6 in rows 0, 1, 2 (admitted together: the engine waits on its lock). Step 1 runs
  # batch 4 and ends row 0; row 2 moves to row 0 and two steps run batch 2; the moved row's listener
  # cancels it after its 4th token, and row 1 moves to row 0 for its last 8 steps at batch 1.
  heard, futures = {1: [], 2: []}, []

  def listener(k):
    def hear(new):
      heard[k].extend(new)
      if k == 2 and len(heard[2]) == 4:
        engine.cancel(futures[2])
    return hear

  before = dataclasses.replace(engine.stats, batch_steps=engine.stats.batch_steps.copy())
  with engine._wake:  # pylint: disable=protected-access
    futures += [engine.submit(batching.Request(ids, feats, n), listener(k) if k else None)
                for k, n in enumerate((2, 12, 6))]
  assert futures[0].result(timeout=300) == full[:2] and futures[1].result(timeout=300) == full
  with pytest.raises(batching.Cancelled):
    futures[2].result(timeout=300)
  assert heard == {1: full, 2: full[:4]}
  assert since(before) == ({4: 1, 2: 2, 1: 8}, 2) and engine.busy == 0


def test_the_openai_client_lists_the_model_and_streams_the_whole_answer(http, service, media):
  root, _, _ = media
  client = _client(http)
  assert [m.id for m in client.models.list()] == [service.model_name]
  assert client.models.retrieve(service.model_name).owned_by == server.OWNER
  with pytest.raises(openai.NotFoundError):
    client.models.retrieve("gpt-4")
  rng = np.random.RandomState(3)
  for i in range(6):
    history = [(_question(rng), "from 05 to 30 the dog runs.")] if i % 3 == 2 else ()
    body = _body(root / f"v{i % 4}.npy", _question(rng), history, temperature=0, max_tokens=int(rng.randint(4, 24)))
    if i == 0:
      body["messages"][0]["content"][0]["video_url"]["duration"] = 40.0
    whole = client.chat.completions.create(model=service.model_name, **body)
    text, chunks = _streamed(client, service.model_name, body)
    assert text == whole.choices[0].message.content
    first, finish, usage = chunks[0], chunks[-2], chunks[-1]
    assert first.choices[0].delta.role == "assistant" and {c.id for c in chunks} == {first.id}
    assert all(c.object == "chat.completion.chunk" and c.model == service.model_name for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 2) + [
        whole.choices[0].finish_reason]
    assert finish.model_extra["moments"] == whole.model_extra["moments"]
    assert finish.model_extra["duration"] == whole.model_extra["duration"] == (40.0 if i == 0 else None)
    assert usage.choices == [] and usage.usage == whole.usage
  # Without stream_options the stream has no usage chunk; it still ends with the finish chunk.
  chunks = list(client.chat.completions.create(model=service.model_name, stream=True, **body))
  assert chunks[-1].choices[0].finish_reason is not None and chunks[-1].usage is None


def test_a_stream_sends_text_before_its_answer_ends(http, service, media, monkeypatch):
  """The engine is held before a decode step; the text of the tokens before it has already arrived."""
  root, _, arrays = media
  client = _client(http)
  for question in ("what does the woman do?", "describe the video in detail", "when does the dog jump?"):
    tokens = _greedy_tokens(service, question, arrays["v3"].astype(np.float32), 24)
    deltas = service.text_deltas()
    settled = next((n for n in range(1, len(tokens)) if deltas.push(tokens[:n])), None)  # ids whose text shows
    if settled is not None:
      break
  assert settled is not None, "no answer shows text before its last token"
  body = _body(root / "v3.npy", question, temperature=0, max_tokens=24)
  expected = client.chat.completions.create(model=service.model_name, **body).choices[0].message.content
  # The prefill gives id 1 of `settled`, each decode step one more: hold the step after them.
  gate = _DecodeGate(monkeypatch, after=settled - 1)
  try:
    stream = iter(client.chat.completions.create(model=service.model_name, stream=True, **body))
    text = ""
    while not text:
      text = next(stream).choices[0].delta.content or ""
    assert text == deltas.sent and gate.reached.wait(timeout=300) and service.engine.busy == 1
  finally:
    gate.release()
  assert text + "".join(c.choices[0].delta.content or "" for c in stream) == expected


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_goes_away_frees_its_slot(http, service, media, monkeypatch, stream):
  """The engine is held at the request's first decode step while the client closes its connection."""
  root, _, _ = media
  engine = service.engine
  cancelled, real_cancel = threading.Event(), engine.cancel

  def cancel(future):
    real_cancel(future)
    cancelled.set()

  monkeypatch.setattr(engine, "cancel", cancel)
  body = _body(root / "v0.npy", "what happens in the kitchen?", temperature=0, max_tokens=200)
  gate = _DecodeGate(monkeypatch, after=0)
  before = dataclasses.replace(engine.stats)
  try:
    if stream:
      chunks = _client(http).chat.completions.create(model=service.model_name, stream=True, **body)
      assert next(iter(chunks)).choices[0].delta.role == "assistant"
      assert gate.reached.wait(timeout=300)
      chunks.close()
    else:
      host, port = http.url.removeprefix("http://").rsplit(":", 1)
      conn = http_client.HTTPConnection(host, int(port), timeout=300)
      conn.request("POST", "/v1/chat/completions", json.dumps(body),
                   {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
      assert gate.reached.wait(timeout=300)
      conn.close()
    assert cancelled.wait(timeout=60), "the server never noticed the client leave"
    assert engine.busy == 1  # held inside its first step: the slot is freed before the next one
  finally:
    gate.release()
  _until(lambda: engine.busy == 0, "the slot freed")
  assert engine.stats.cancelled == before.cancelled + 1 and engine.stats.completed == before.completed
  assert engine.stats.decode_steps == before.decode_steps + 1  # the held step, then no other
  with urllib.request.urlopen(http.url + "/health", timeout=30) as response:
    assert json.loads(response.read())["busy"] == 0


def _raw_reply(http, request: bytes) -> tuple[int, dict]:
  """Returns (status, JSON body) of raw bytes sent on a fresh connection (read until the server closes)."""
  host, port = http.url.removeprefix("http://").rsplit(":", 1)
  with socket.create_connection((host, int(port)), timeout=60) as sock:
    sock.sendall(request)
    reply = b""
    while chunk := sock.recv(65536):
      reply += chunk
  head, _, body = reply.partition(b"\r\n\r\n")
  assert b"application/json" in head.lower(), reply
  return int(head.split()[1]), json.loads(body)


def test_every_bad_number_and_deep_nesting_gets_a_400_before_any_work(http, service, media):
  root, _, _ = media
  good = _body(root / "v1.npy", "what happens?", temperature=0, max_tokens=4)
  good["messages"][0]["content"][0]["video_url"]["duration"] = "@duration@"
  good_raw = json.dumps(good)

  def raw(field: str | None = None, token: str = "", duration: str = "20") -> bytes:
    """Returns the good body with `"field": token` last (of a key given twice, JSON's last counts)."""
    text = good_raw.replace('"@duration@"', duration)
    return (text[:-1] + f', "{field}": {token}}}' if field else text).encode()

  cases = [(raw(duration=d), "duration") for d in ("0", "-3", "1e300", '"9"')]
  cases += [(raw(duration=d), d) for d in ("1e999", "NaN", "Infinity", "-Infinity")]
  cases += [(raw("temperature", t), "temperature") for t in ("1e308", "2.5", "-0.1", "true", "[0]")]
  cases += [(raw("temperature", t), t) for t in ("NaN", "Infinity", "-Infinity", "1e999")]
  cases += [(raw("top_p", t), "top_p") for t in ("0", "1.5", "-1", '"1"')] + [(raw("top_p", "NaN"), "NaN")]
  cases += [(raw("max_tokens", t), "max_tokens") for t in ("0", "2.5", '"3"', "-1", str(10**400))]
  cases += [(raw("max_completion_tokens", "0"), "max_completion_tokens"), (raw("max_tokens", "1e999"), "1e999")]
  cases += [(raw("seed", t), "seed") for t in ("-1", str(2**31), "1.5")]
  cases += [(raw("n", t), "n must") for t in ("2", "true", "0")]
  cases += [(raw("presence_penalty", "0.5"), "presence_penalty"), (raw("frequency_penalty", "-2"), "frequency")]
  cases += [(raw("stream", '"yes"'), "stream"), (raw("stream_options", '{"include_usage": true}'), "stream_options"),
            (raw("stream", 'true, "stream_options": {"include_usage": 1}'), "include_usage")]
  cases += [(b"[" * 100_000 + b"]" * 100_000, "deeper"), (raw("extra", "[" * 40 + "]" * 40), "deeper"),
            (b'{"messages": "\xff"}', "UTF-8"), (b'"' + b'\\"' * 100_000, "not JSON")]
  prefills = service.engine.stats.prefills
  for data, says in cases:
    status, reply = _post(http, None, raw=data)
    assert status == 400 and says in reply["error"]["message"], (data[:120], status, reply)
    assert set(reply["error"]) == {"message", "type", "code"} and reply["error"]["code"] == 400
  assert service.engine.stats.prefills == prefills  # refused before any work
  # uvicorn's own refusal of what is not HTTP comes in the same shape.
  status, reply = _raw_reply(http, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
  assert status == 400 and reply["error"]["code"] == 400 and "HTTP" in reply["error"]["message"]
  # Brackets inside strings are text, not nesting; a 0 penalty, n 1 and stream false are what the defaults are.
  status, reply = _post(http, None, raw=raw("presence_penalty", '0, "n": 1, "stream": false, "frequency_penalty": 0'))
  assert status == 200, reply
  status, reply = _post(http, _body(root / "v1.npy", "[" * 200 + " what?", temperature=0, max_tokens=2))
  assert status == 200, reply
  with urllib.request.urlopen(http.url + "/health", timeout=30) as response:
    assert json.loads(response.read())["status"] == "ok"
