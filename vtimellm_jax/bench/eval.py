"""Grounding-eval throughput: queries answered one at a time against in batches (queries/s, speedup).

  python -m vtimellm_jax.bench.eval --size 7b                     # GPU: 32 queries, batch 1 vs 16, 64 tokens
  python -m vtimellm_jax.bench.eval --size 7b --queries 16 --alone-queries 2 --max-new-tokens 1024   # the release's budget
  python -m vtimellm_jax.bench.eval --size tiny --queries 4 --batch-size 2 --max-new-tokens 4   # CPU smoke test

Each query is the release's grounding question ("During which frames can we see ...?") in the v1
conversation, with random float[100, 768] features, answered greedily by `inference.answerer.Answerer`
as `vtimellm-jax eval` answers it. Weights are random and the tokenizer is a small one trained on the
fly (its ids are a subset of the model's vocabulary): speed depends on neither, so no files are needed.
No id ends an answer here (the tokenizer's eos is replaced by one that never matches), so every
answer is exactly --max-new-tokens long, whatever the random model emits; each line says so
(`answer_tokens`). One at a time, the first --alone-queries queries are timed (at 1,024 tokens a
query takes seconds: a few give the rate); batched, all --queries.

One JSON line per batch size (each timed after a compiling warm-up call): queries/s, tokens/s, and
`read_gb_per_s`, the bytes a call must read (every weight once per token, each row's KV cache up to
its position; `bench.decode.decode_bytes`) per second, with `hbm_fraction`, that over the device's
HBM bandwidth, where its kind is known. Then one line with the speedup: batched queries/s over
one-at-a-time queries/s.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import numpy as np

from vtimellm_jax import cli_types, device_peaks, xla_flags

_WORDS = ("the a man woman dog person is walks runs jumps into pool kitchen cooking counting money "
          "during which frames can we see describe video events from to").split()


def _parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(prog="python -m vtimellm_jax.bench.eval", description=__doc__.splitlines()[0])
  parser.add_argument("--size", default="7b", choices=("tiny", "7b", "13b"), help="LLaMA preset")
  parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                      help="weights and compute; auto: bfloat16 on GPU/TPU, float32 on CPU")
  parser.add_argument("--queries", type=cli_types.int_at_least(1), default=32, help="grounding queries answered (default: %(default)s)")
  parser.add_argument("--alone-queries", type=cli_types.int_at_least(1),
                      help="of those, how many are timed one at a time (default: all)")
  parser.add_argument("--batch-size", type=cli_types.int_at_least(1), default=16, help="queries per call when batched (default: %(default)s)")
  parser.add_argument("--max-new-tokens", type=cli_types.int_at_least(1), default=64,
                      help="tokens per answer, every answer this long (default: %(default)s; the release's: 1024)")
  return parser.parse_args(argv)


def _questions(n: int) -> list[str]:
  """Returns `n` grounding questions whose prompts all tokenize to the same length.

  The sentences differ only in a zero-padded number (split_digits makes every digit one token), so
  every call pads to one shape and the warm-up compiles the only program the timed loop runs.
  """
  from vtimellm_jax.data import templates  # pylint: disable=g-import-not-at-top

  return [templates.grounding_question(f"Person {i:04d} walks into the kitchen.") for i in range(n)]


class _NeverStops:
  """A tokenizer whose answers never end early: eos is an id no token has, and there are no other stop ids."""

  eos_id = -1
  stop_ids = ()

  def __init__(self, encoder):
    self._encoder = encoder

  def __getattr__(self, name):
    return getattr(self._encoder, name)

  def __len__(self) -> int:
    return len(self._encoder)


def random_answerer(size: str, dtype: str, tokenizer_dir: str, *, stops: bool = True):
  """Returns an Answerer of a random VTimeLLM of preset `size` and a small tokenizer trained into `tokenizer_dir`.

  With `stops` False no token ends an answer: every answer is max_new_tokens long.
  """
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.data import templates, tokenizer  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.inference import answerer  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.models import load  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.models import families
  from vtimellm_jax.models.vtimellm import VTimeLLM  # pylint: disable=g-import-not-at-top

  rng = random.Random(0)
  corpus = [templates.SYSTEM, "USER: ASSISTANT: </s>", *_questions(20)]
  corpus += [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) + f" from {rng.randint(0, 99):02d}."
             for _ in range(200)]
  encoder = tokenizer.ReleaseEncoder(tokenizer.load_tokenizer(tokenizer.train_tokenizer(corpus, tokenizer_dir,
                                                                                        vocab_size=400)))
  config = families.preset(families.preset_of_size(size), dtype=dtype, param_dtype=dtype)
  # A jitted init builds the weights on the device, without a host copy of 13 GB.
  model = load.sharded_model(lambda: VTimeLLM(config, nnx.Rngs(0)), what="the benchmark model")
  return answerer.Answerer(model, encoder if stops else _NeverStops(encoder))


def bench(answerer, questions: list[str], features: list[np.ndarray], batch: int, max_new_tokens: int) -> dict:
  """Returns the timing of answering every question in calls of `batch` queries, after a compiling warm-up."""
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.bench import decode  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.inference import evaluate, generate  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.models import kv_cache  # pylint: disable=g-import-not-at-top

  config = generate.GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.0)

  def answer(start: int) -> list:
    rows = range(start, min(start + batch, len(questions)))
    # A short last batch is filled up to `batch` rows, as `vtimellm-jax eval` does: one shape.
    return answerer.answer([((), questions[i]) for i in rows], [features[i] for i in rows], config, batch_size=batch)

  start = time.perf_counter()
  answer(0)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  answers = [a for first in range(0, len(questions), batch) for a in answer(first)]
  seconds = time.perf_counter() - start
  tokens = sum(len(a.token_ids) for a in answers)
  model = answerer.model
  positions = evaluate.prompt_positions(answerer, questions)
  weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  calls = -(-len(questions) // batch)
  read = calls * decode.decode_bytes(weight_bytes, kv_cache.bytes_per_position(model.config), batch, positions,
                                     max_new_tokens)
  device = jax.devices()[0]
  return dict(what="jax_grounding_eval", size=None, batch=batch, queries=len(answers), max_new_tokens=max_new_tokens,
              answer_tokens=sorted({len(a.token_ids) for a in answers}), prompt_positions=positions,
              s=round(seconds, 4), queries_per_s=round(len(answers) / seconds, 3),
              tokens_per_s=round(tokens / seconds, 1), mean_answer_tokens=round(tokens / len(answers), 1),
              read_gb_per_s=round(read / seconds / 1e9, 1),
              **device_peaks.fractions(device, bytes_per_s=read / seconds),
              dtype=model.config.dtype, compile_s=round(compile_s, 1), device=str(device.device_kind))


def main(argv=None) -> int:
  args = _parse_args(argv)
  xla_flags.use_answering_flags()  # what eval runs with
  import jax  # pylint: disable=g-import-not-at-top

  from vtimellm_jax.data import records  # pylint: disable=g-import-not-at-top

  dtype = args.dtype if args.dtype != "auto" else ("float32" if jax.default_backend() == "cpu" else "bfloat16")
  with tempfile.TemporaryDirectory() as tokenizer_dir:
    answerer = random_answerer(args.size, dtype, tokenizer_dir, stops=False)
  questions = _questions(args.queries)
  rng = np.random.default_rng(0)
  features = [rng.standard_normal((records.NUM_FRAMES, records.FEATURE_DIM), np.float32) for _ in questions]
  alone = min(args.alone_queries or args.queries, args.queries)
  rates = {}
  for batch, count in [(1, alone)] + ([(args.batch_size, args.queries)] if args.batch_size > 1 else []):
    record = bench(answerer, questions[:count], features[:count], batch, args.max_new_tokens)
    record |= dict(size=args.size, xla_flags=os.environ.get("XLA_FLAGS", ""))
    rates[batch] = record["queries_per_s"]
    print(json.dumps(record), flush=True)
  print(json.dumps(dict(what="jax_grounding_eval_speedup", size=args.size, batch=args.batch_size,
                        queries=args.queries, alone_queries=alone, max_new_tokens=args.max_new_tokens,
                        speedup=round(rates[args.batch_size] / rates[1], 2))), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
