"""`vtimellm-jax bench {train,decode,clip} [options]`: throughput benchmarks, one JSON line per result.

Each benchmark is also a module (`python -m vtimellm_jax.bench.train --help`); random weights, no
files needed. Recorded results and their commands: docs/performance.md.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = ("train", "decode", "clip")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("benchmark", choices=BENCHMARKS)
  parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options (see its --help)")


def run(args: argparse.Namespace) -> int:
  module = importlib.import_module(f"vtimellm_jax.bench.{args.benchmark}")
  return int(module.main(args.options) or 0)
