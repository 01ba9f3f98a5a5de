"""`serve`: continuous batching gives every request its one-at-a-time answer, over real HTTP on localhost.

References: `Answerer.answer` (the `chat` path, itself checked against HF `generate` in
test_inference_cli.py) and HF greedy `generate`. The load test counts decode steps rather than
timing them (wall-clock figures come from `vtimellm-jax bench serve`, docs/performance.md).
"""

import concurrent.futures
from http import client as http_client
import json
import os
import urllib.error
import urllib.request

import jax
import numpy as np
import pytest

from inference_fixtures import tiny_vtimellm, write_features  # noqa: F401
from vtimellm_jax import cli
from vtimellm_jax.inference import answerer, batching, generate, prompts, server

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
    programs = batching._prefill_jit._cache_size()  # pylint: disable=protected-access
    fresh = batching.Engine(bot, slots=2, context=384)
    h, q, f, _, _ = cases[0]
    for _ in range(2):
      fresh.submit(batching.Request(tuple(bot.prompt_ids(h, q)), f, 2)).result(timeout=300)
    fresh.close()
    assert batching._prefill_jit._cache_size() == programs + 1  # pylint: disable=protected-access
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
  before = stats.decode_steps
  with concurrent.futures.ThreadPoolExecutor(64) as pool:
    together = list(pool.map(lambda body: _post(http, body), bodies))
  concurrent_steps = stats.decode_steps - before
  assert all(status == 200 for status, _ in alone), alone[:2]
  answers = lambda results: [(r["choices"][0]["message"]["content"], r["usage"]) for _, r in results]  # noqa: E731
  assert answers(together) == answers(alone)
  # 64 requests on 16 slots: each step advances up to 16 answers instead of one.
  assert concurrent_steps * 5 <= one_at_a_time_steps, (concurrent_steps, one_at_a_time_steps)


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


def test_bad_requests_get_their_4xx_and_the_server_goes_on(http, service, media, tmp_path):
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
  (tmp_path / "junk.npy").write_bytes(b"not an array")
  service.media.roots.append(str(tmp_path.resolve()))
  try:
    refused(_body(tmp_path / "junk.npy", "hi"), 400, says="junk.npy")
  finally:
    service.media.roots.pop()
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
  from vtimellm_jax.inference import served

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
