"""Name-mapping tables read in both directions: `source.{layer}.name` <-> `our/path`.

A rule is (source template, our template, transform). Templates name their variable parts in
braces; `FIELDS` says what each part may match. The same rule maps a source name to our path on
import and our path back to the source names on export; transforms are involutions (identity or
transpose), so one function serves both ways.

Stacking: a `{layer}` field that the source template has and our template lacks is the index along
our array's leading (layers) axis. Import puts `model.layers.3.mlp.up_proj.weight` into slot 3 of
`model/layers/mlp/up_proj/kernel` [L, in, out]; export reads slot 3 back out under that name.
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
LAYER = "layer"


def identity(w: np.ndarray) -> np.ndarray:
  return w


def transpose(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] <-> our kernel [in, out] (a view)."""
  return np.swapaxes(w, -1, -2)


Transform = Callable[[np.ndarray], np.ndarray]
Rule = tuple[str, str, Transform]


@functools.lru_cache(maxsize=None)
def _pattern(template: str) -> re.Pattern:
  parts = re.split(r"(\{\w+\})", template)
  regex = "".join(f"(?P<{p[1:-1]}>{FIELDS[p[1:-1]]})" if p.startswith("{") else re.escape(p) for p in parts)
  return re.compile(regex)


def _stacked(source: str, ours: str) -> bool:
  field = "{" + LAYER + "}"
  return field in source and field not in ours


def to_ours(name: str, rules: Sequence[Rule]) -> tuple[str, int | None, Transform] | None:
  """Returns (our path, slot along its layers axis or None, transform) for the first rule matching `name`."""
  for source, ours, transform in rules:
    match = _pattern(source).fullmatch(name)
    if match:
      fields = match.groupdict()
      layer = int(fields.pop(LAYER)) if _stacked(source, ours) else None
      return ours.format(**fields), layer, transform
  return None


def to_source(path: str, rules: Sequence[Rule], layers: int = 0) -> list[tuple[str, int | None, Transform]] | None:
  """Returns [(source name, slot of our array or None, transform)] of our `path`, or None if no rule matches.

  A stacked path gives one name per slot of its leading axis (`layers` of them).
  """
  for source, ours, transform in rules:
    match = _pattern(ours).fullmatch(path)
    if match:
      fields = match.groupdict()
      if _stacked(source, ours):
        return [(source.format(**fields, **{LAYER: i}), i, transform) for i in range(layers)]
      return [(source.format(**fields), None, transform)]
  return None


def unstack(path: str, array, rules: Sequence[Rule]):
  """Yields (source name, array in the source layout) of one of our arrays, a layer at a time; None if unmapped."""
  names = to_source(path, rules, array.shape[0] if np.ndim(array) else 0)
  if names is None:
    return None
  return ((name, transform(np.asarray(array if layer is None else array[layer]))) for name, layer, transform in names)
