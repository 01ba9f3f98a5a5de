"""Serving under load: requests answered one after another against all at once, over HTTP on localhost.

  vtimellm-jax bench serve --size tiny                         # CPU: 64 requests on 16 slots
  vtimellm-jax bench serve --size tiny --stream                # the same requests streamed
  vtimellm-jax bench serve --size 7b --requests 64 --slots 64   # GPU: random Vicuna-7B in bfloat16, no files
  vtimellm-jax bench serve --model quickstart                   # the quickstart's trained model

Starts `serve`'s app (server.create_app) on 127.0.0.1, sends `--requests` chat completions with
grounding questions of mixed lengths (some with an earlier round) about random float16 [100, 768]
feature files, each with its own max_tokens, greedily. First one at a time, then all at once from
as many client threads; with `--stream` every request asks for `stream: true` and reads its
server-sent events as they come. Nothing is compiled while the clock runs: the engine compiles
every decode and prefill program the requests can reach ahead (`Engine.precompile`: each batch
bucket and window, each count of prompts prefilled together and prompt shape), and one warm-up
request per prompt shape goes through the server. A random model hardly ever
emits </s>, so its answers are max_tokens long.

One JSON line per mode (total seconds, requests/s, p50 and p99 latency, with `--stream` the p50
and p99 time to first token, `ttft`: until the first chunk that carries text; decode steps, and
`weight_gb_per_s`: the weights every decode step reads, per second, with `hbm_fraction`, that over
the device's HBM bandwidth where its kind is known, a lower bound on what the steps read), then one
with the speedup (one-at-a-time seconds over concurrent seconds) and whether every concurrent
answer equals its one-at-a-time answer.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import pathlib
import tempfile
import time
import urllib.request

import numpy as np

from vtimellm_jax import cli_types, device_peaks, xla_flags

_WORDS = "the a man woman dog person walks runs jumps into pool kitchen cooking counting money red blue".split()


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="vtimellm-jax bench serve", description=__doc__.splitlines()[0])
  parser.add_argument("--model", help="a model directory or quickstart workdir (default: random weights of --size)")
  parser.add_argument("--size", default="tiny", choices=("tiny", "7b", "13b"), help="random model's LLaMA preset")
  parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                      help="auto: a model directory's own dtype; a random model's bfloat16 on GPU/TPU, float32 on CPU")
  parser.add_argument("--requests", type=cli_types.int_at_least(1), default=64, help="(default: %(default)s)")
  parser.add_argument("--slots", type=cli_types.int_at_least(1), default=16, help="(default: %(default)s)")
  parser.add_argument("--context", type=cli_types.int_at_least(2), default=1024, help="(default: %(default)s)")
  parser.add_argument("--max-tokens", type=cli_types.int_at_least(4), default=32,
                      help="largest max_tokens of a request; each draws one in [max/4, max] (default: %(default)s)")
  parser.add_argument("--seed", type=cli_types.int_at_least(0), default=0)
  parser.add_argument("--stream", action="store_true",
                      help="every request streams its answer (stream: true); each mode also reports the time to "
                           "first token (the first chunk with text)")
  return parser.parse_args(argv)


def _bodies(args, media: pathlib.Path) -> list[dict]:
  from vtimellm_jax.data import templates  # pylint: disable=g-import-not-at-top

  rng = np.random.RandomState(args.seed)
  # The release's grounding question without its "<video>\n": the server adds that to the first message.
  question = lambda: templates.GROUNDING_QUERY.format(  # noqa: E731
      templates.grounding_sentence(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(2, 30)))))
  bodies = []
  for i in range(args.requests):
    messages = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"file://{media / f'v{i % 8}.npy'}"}},
        {"type": "text", "text": question()}]}]
    if i % 4 == 0:
      messages += [{"role": "assistant", "content": f"From {rng.randint(0, 50):02d} to {rng.randint(50, 99):02d}."},
                   {"role": "user", "content": question()}]
    max_tokens = int(rng.randint(max(1, args.max_tokens // 4), args.max_tokens + 1))
    bodies.append({"messages": messages, "temperature": 0, "max_tokens": max_tokens})
  return bodies


def _post(url: str, body: dict) -> tuple[float, None, str]:
  """Returns (latency in seconds, None, answer text) of one request; raises on a non-200 answer."""
  start = time.perf_counter()
  request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(request, timeout=3600) as response:
    reply = json.loads(response.read())
  return time.perf_counter() - start, None, reply["choices"][0]["message"]["content"]


def _post_streamed(url: str, body: dict) -> tuple[float, float, str]:
  """Returns (latency, seconds to the first text, answer text) of one streamed request; raises on an error."""
  start = time.perf_counter()
  request = urllib.request.Request(url + "/v1/chat/completions", data=json.dumps(body | {"stream": True}).encode(),
                                   headers={"Content-Type": "application/json"})
  first, texts, done = None, [], False
  with urllib.request.urlopen(request, timeout=3600) as response:
    for line in response:  # server-sent events: `data: {chunk}` lines, then `data: [DONE]`
      if done := line.strip() == b"data: [DONE]":
        break
      if not line.startswith(b"data: "):
        continue
      chunk = json.loads(line[len(b"data: "):])
      if "error" in chunk:
        raise RuntimeError(f"the stream failed: {chunk['error']['message']}")
      if chunk["choices"] and (text := chunk["choices"][0]["delta"].get("content")):
        first = time.perf_counter() - start if first is None else first
        texts.append(text)
  if not done:
    raise RuntimeError("the stream ended before its `data: [DONE]`")
  latency = time.perf_counter() - start
  return latency, latency if first is None else first, "".join(texts)


def _summary(mode: str, replies: list[tuple], total: float, decode_steps: int, weight_bytes: int, device) -> dict:
  """Returns a mode's JSON line from its (latency, time to first text or None, text) replies."""
  latencies, firsts = [r[0] for r in replies], [r[1] for r in replies if r[1] is not None]
  weights_per_s = decode_steps * weight_bytes / total
  percentiles = lambda name, xs: {f"{name}_p{q}_s": round(float(np.percentile(xs, q)), 4)  # noqa: E731
                                  for q in (50, 99)} if xs else {}
  return {"bench": "serve", "mode": mode, "requests": len(replies), "total_s": round(total, 3),
          "requests_per_s": round(len(replies) / total, 3),
          "p50_s": round(float(np.percentile(latencies, 50)), 4),
          "p99_s": round(float(np.percentile(latencies, 99)), 4), **percentiles("ttft", firsts),
          "decode_steps": decode_steps, "weight_gb_per_s": round(weights_per_s / 1e9, 1),
          **device_peaks.fractions(device, bytes_per_s=weights_per_s)}


def main(argv=None) -> int:
  args = _parse_args(argv)
  xla_flags.use_answering_flags()  # what serve runs with
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top

  from vtimellm_jax.bench import eval as eval_bench  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.inference import answerer, batching, chat_request, served, server  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    media = tmp / "media"
    media.mkdir()
    rng = np.random.RandomState(args.seed)
    for i in range(8):
      np.save(media / f"v{i}.npy", rng.normal(0, 0.2, (100, 768)).astype(np.float16))
    if args.model:
      spec = served.resolve(args.model)
      bot = answerer.load_answerer(spec.model_dir, args.dtype)
    else:
      spec = served.ServedModel(tmp, None)
      dtype = args.dtype if args.dtype != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
      bot = eval_bench.random_answerer(args.size, dtype, str(tmp / "tokenizer"))
    engine = batching.Engine(bot, slots=args.slots, context=args.context, max_waiting=args.requests)
    service = server.ChatService(engine, served.VideoCache(spec), server.MediaRoots([media]), args.max_tokens,
                                 args.model or f"random-{args.size}")
    running = server.RunningServer(server.create_app(service))
    ask = _post_streamed if args.stream else _post
    try:
      bodies = _bodies(args, media)
      shapes, lengths = {}, set()  # padded prompt positions -> one body of that prompt shape; id counts
      for body in bodies:
        parsed = chat_request.parse_chat_request(body)
        ids = bot.prompt_ids(parsed.history, parsed.question)
        shapes.setdefault(engine.prompt_positions(ids, 100), body)
        lengths.add(len(ids))
      # Every decode program a step can reach (the rows stand below the longest prompt plus the largest
      # max_tokens) and every prefill (each power-of-two count of prompts of each length; waiting
      # requests are prefilled together), then one request per prompt shape through the server.
      engine.precompile(max(shapes) + args.max_tokens, prompt_lengths=sorted(lengths), num_frames=100)
      for body in shapes.values():
        ask(running.url, body | {"max_tokens": 2})
      device = jax.devices()[0]
      weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(bot.model, nnx.Param)))
      about = {"slots": args.slots, "size": None if args.model else args.size, "dtype": bot.model.config.dtype,
               "device": device.device_kind, "stream": args.stream}
      steps = engine.stats.decode_steps
      start = time.perf_counter()
      alone = [ask(running.url, body) for body in bodies]
      alone_total = time.perf_counter() - start
      print(json.dumps(_summary("one_at_a_time", alone, alone_total, engine.stats.decode_steps - steps, weight_bytes,
                                device) | about), flush=True)
      steps = engine.stats.decode_steps
      start = time.perf_counter()
      with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        together = list(pool.map(lambda body: ask(running.url, body), bodies))
      total = time.perf_counter() - start
      print(json.dumps(_summary("concurrent", together, total, engine.stats.decode_steps - steps, weight_bytes,
                                device) | about), flush=True)
      print(json.dumps({"bench": "serve", "speedup": round(alone_total / total, 2),
                        "identical": [r[2] for r in alone] == [r[2] for r in together], "stream": args.stream,
                        "decode_steps": engine.stats.decode_steps, "prompt_shapes": len(shapes)}), flush=True)
    finally:
      running.close()
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
