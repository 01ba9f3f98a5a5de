"""Loader benchmark: samples/s of the training pipeline from JSON + `.npy` folders.

  python -m vtimellm_jax.data.bench [--data stage2.json --features feat/] [--tokenizer DIR] \\
      [--workers 4] [--batch-size 8] [--records 3000] [--batches 1500]

Without `--data` it writes a stage-2-like dataset (random float16 [100, 768] features, the release's
20% dense-captioning / 80% multi-turn grounding mix) into a temporary folder; without `--tokenizer`
it trains a small LLaMA-like one there. Prints one JSON line: planning time, samples/s after a
warm-up, padding fraction and bucket lengths. Results are in docs/data.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import random
import sys
import tempfile
import time

import numpy as np

_WORDS = ("the a man woman dog person counting money walks runs jumps into pool kitchen cooking "
          "ball table car street people hands camera water field stage music plays").split()


def _sentence(rng: random.Random, lo: int, hi: int) -> str:
  return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def synthetic_stage2(root: pathlib.Path, n: int, seed: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
  """Returns (json, feature dir) of `n` stage-2-like records written under `root`."""
  rng, nprng = random.Random(seed), np.random.default_rng(seed)
  feat = root / "feat"
  feat.mkdir(parents=True, exist_ok=True)
  records = []
  for k in range(n):
    duration = round(rng.uniform(10, 120), 1)
    events = rng.randint(2, 7)
    times = sorted(round(rng.uniform(0, duration), 1) for _ in range(2 * events))
    token = {f"<{se}{e}>": times[2 * e + (se == "e")] for e in range(events) for se in "se"}
    if rng.random() < 0.2:
      convs = [{"from": "human", "value": "<video>\nCould you please describe the events in the video?"},
               {"from": "gpt", "value": " ".join(f"From <s{e}> to <e{e}>, {_sentence(rng, 5, 20)}."
                                                 for e in range(events))}]
    else:
      convs = []
      for e in range(events):
        q = ("<video>\n" if e == 0 else "") + f"During which frames can we see {_sentence(rng, 4, 12)}?"
        convs += [{"from": "human", "value": q}, {"from": "gpt", "value": f"From <s{e}> to <e{e}>."}]
    rid = f"v{k:06d}"
    records.append({"source": "internvid", "id": rid, "conversations": convs,
                    "meta": {"split": [0, duration], "duration": duration, "token": token}})
    np.save(feat / f"{rid}.npy", nprng.standard_normal((100, 768)).astype(np.float16))
  path = root / "data.json"
  path.write_text(json.dumps(records))
  return path, feat


def main(argv: list[str] | None = None) -> int:
  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.data import pipeline
  from vtimellm_jax.data import tokenizer as tokenizer_lib
  # pylint: enable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data")
  parser.add_argument("--features")
  parser.add_argument("--tokenizer")
  parser.add_argument("--template", default="v1", choices=("v1", "plain"))
  parser.add_argument("--workers", type=int, default=4)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--records", type=int, default=3000, help="synthetic records (no --data)")
  parser.add_argument("--batches", type=int, default=1500, help="batches timed after warm-up")
  parser.add_argument("--warmup", type=int, default=50)
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.WARNING)

  with tempfile.TemporaryDirectory() as tmp:
    root = pathlib.Path(tmp)
    if args.data:
      data, feat = pathlib.Path(args.data), pathlib.Path(args.features)
    else:
      data, feat = synthetic_stage2(root, args.records)
    if args.tokenizer:
      tok_dir = args.tokenizer
    else:
      texts = [c["value"].replace("<video>", "") for r in json.loads(data.read_text())[:2000]
               for c in r["conversations"]]
      tok_dir = tokenizer_lib.train_tokenizer(texts, root / "tok", vocab_size=2000)
    tok = tokenizer_lib.load_tokenizer(tok_dir)
    start = time.perf_counter()
    pipe = pipeline.build_pipeline(pipeline.JsonSource(data, feat), tok, template=args.template,
                                   batch_size=args.batch_size, num_epochs=100, shard_index=0,
                                   shard_count=1, worker_count=args.workers)
    plan_s = time.perf_counter() - start
    it = pipe.iterator()
    for _ in range(args.warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(args.batches):
      next(it)
    elapsed = time.perf_counter() - start
  print(json.dumps({
      "workers": args.workers, "batch_size": args.batch_size, "records": pipe.stats["records"],
      "plan_s": round(plan_s, 2), "samples_per_s": round(args.batches * args.batch_size / elapsed, 1),
      "padding_fraction": round(pipe.padding_fraction, 4), "buckets": list(pipe.bucket_lengths)}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
