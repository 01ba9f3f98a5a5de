"""Name-mapping tables read in both directions: `source.{layer}.name` <-> `our/{layer}/path`.

A rule is (source template, our template, transform). Templates name their variable parts in
braces; `FIELDS` says what each part may match. The same rule maps a source name to our path on
import and our path back to the source name on export; transforms are involutions (identity or
transpose), so one function serves both ways.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Sequence

import numpy as np

FIELDS = {
    "layer": r"\d+",
    "proj": r"[a-z]+_proj",
    "norm": r"input_layernorm|post_attention_layernorm",
}


def identity(w: np.ndarray) -> np.ndarray:
  return w


def transpose(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] <-> our kernel [in, out]."""
  return np.ascontiguousarray(np.swapaxes(w, -1, -2))


Rule = tuple[str, str, Callable[[np.ndarray], np.ndarray]]


@functools.lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern:
  parts = re.split(r"(\{\w+\})", template)
  regex = "".join(f"(?P<{p[1:-1]}>{FIELDS[p[1:-1]]})" if p.startswith("{") else re.escape(p) for p in parts)
  return re.compile(regex)


def translate(name: str, rules: Sequence[Rule], reverse: bool = False) -> tuple[str, Callable] | None:
  """Returns (translated name, transform) for the first rule matching `name`, or None."""
  for source, ours, transform in rules:
    match_from, write_to = (ours, source) if reverse else (source, ours)
    match = _pattern(match_from).fullmatch(name)
    if match:
      return write_to.format(**match.groupdict()), transform
  return None
