"""argparse types for numeric flags, so that a value out of range is a usage error naming the flag.

argparse reports a type's `ArgumentTypeError` as `argument --batch-size: must be >= 1, got 0` and
exits with status 2, before any work starts.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

# The floating-point types a model computes or stores in, by name (every --dtype and config dtype).
DTYPES = ("float32", "bfloat16", "float16")
# With "auto": the command chooses (float32 on a CPU, the accelerator's 16-bit type elsewhere).
DTYPES_OR_AUTO = ("auto", *DTYPES)
# Weight-only quantisation of the decoder projections for answering (`--quant`; models/quant.py).
ANSWER_QUANTS = ("none", "int8", "nf4", "fp4")


def add_quant_argument(parser: argparse.ArgumentParser) -> None:
  """Adds `--quant` (the answering commands' weight-only quantisation) to `parser`."""
  parser.add_argument("--quant", choices=ANSWER_QUANTS, default="none",
                      help="hold the decoder projections quantised, LoRA merged first: int8 (block scales in float32), "
                           "nf4 or fp4 (the QLoRA types, doubly quantised scales); lm_head and the embeddings stay "
                           "in --dtype (default: %(default)s)")


def int_at_least(lo: int) -> Callable[[str], int]:
  """Returns an argparse type accepting integers >= `lo`."""
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < lo:
      raise argparse.ArgumentTypeError(f"must be >= {lo}, got {value}")
    return value
  return parse


def number_in(lo: float, hi: float = math.inf, *, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
  """Returns an argparse type accepting finite numbers in the interval from `lo` to `hi` (open ends as given)."""
  interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open or hi == math.inf else ']'}"

  def parse(text: str) -> float:
    try:
      value = float(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    inside = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    if not (math.isfinite(value) and inside):
      raise argparse.ArgumentTypeError(f"must be in {interval}, got {text}")
    return value
  return parse


def shard(text: str) -> tuple[int, int]:
  """argparse type for `i/n`: shard i (from 0) of n; returns (i, n)."""
  index, sep, count = text.partition("/")
  try:
    index, count = int(index), int(count)
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected i/n (shard i of n, i from 0), got {text!r}") from None
  if not sep or count < 1 or not 0 <= index < count:
    raise argparse.ArgumentTypeError(f"expected i/n with 0 <= i < n, got {text!r}")
  return index, count
