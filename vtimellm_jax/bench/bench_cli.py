"""`vtimellm-jax bench {train,decode,eval,clip,load,extract,serve} [options]`: benchmarks, one JSON line per result.

Each benchmark is also a module (`python -m vtimellm_jax.bench.train --help`). train, decode, eval
(grounding questions answered one at a time against in batches) and clip use random weights and
need no files; load measures loading a model directory (or converting an HF LLaMA); extract the
host CPU per video of feature extraction, ours beside the release's; serve the HTTP server's
requests/s and latency with requests sent one at a time and all at once. Recorded
results and their commands: docs/performance.md.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = ("train", "decode", "eval", "clip", "load", "extract", "serve")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("benchmark", choices=BENCHMARKS)
  parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options (see its --help)")


def run(args: argparse.Namespace) -> int:
  module = importlib.import_module(f"vtimellm_jax.bench.{args.benchmark}")
  return int(module.main(args.options) or 0)
