"""Readers for the release's data: stage-1 LLaVA JSON, stage-2/3 JSON with `meta`, feature `.npy`.

A record is the release's JSON object: `id`, `conversations` (a list of `{"from", "value"}`), for
stage 1 an `image` field and `<image>` in the first human turn, for stages 2/3 optionally `meta`
(`duration`, `token` = {"<s0>": seconds, ...}, `split`). `prepare` turns one into the conversation
the templates tokenize, applying the release's rewrites in the release's order:

1. `<image>` in the first turn -> `<video>`, and the sample is an image (1 feature row) instead of
   a video (100 rows);
2. every `meta.token` key is replaced, in every turn, by `min(round(t / duration * 100), 99)` with
   two digits (Python's round: halves go to the even neighbour, as in the release).

Problems are reported as `Fault`s (kind + message) so that `data check` can list all of them and the
pipeline can raise or skip with a message naming file, record index and id.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import threading
from typing import Any

import numpy as np

from vtimellm_jax import errors

FEATURE_DIM = 768
NUM_FRAMES = 100
VIDEO_TAG, IMAGE_TAG = "<video>", "<image>"
_TIME_TOKEN = re.compile(r"<[se]\d+>")

# Fault kinds, as `data check` names them.
MISSING_FEATURE = "missing feature file"
UNREADABLE_FEATURE = "unreadable feature file"
BAD_SHAPE = "wrong feature shape"
BAD_DTYPE = "wrong feature dtype"
NON_FINITE_FEATURE = "non-finite feature values"
MISSING_META_TOKEN = "missing meta token"
BAD_TIMESTAMP = "timestamp outside [0, duration]"
NO_VIDEO = "no <video>"
MANY_VIDEOS = "more than one <video>"
EMPTY_ANSWER = "empty answer"
BAD_FORMAT = "malformed record"
OVER_LENGTH = "over-length"
RELEASE_DROP = "release drops it (tokenization length mismatch)"


@dataclasses.dataclass(frozen=True)
class Fault:
  """One problem of one record."""
  kind: str
  message: str


@dataclasses.dataclass(frozen=True)
class Prepared:
  """A record ready for the templates: turns as (role, text) after the release's rewrites."""
  id: str
  turns: tuple[tuple[str, str], ...]
  is_image: bool

  @property
  def num_features(self) -> int:
    return 1 if self.is_image else NUM_FRAMES


def load_json_records(path: str | os.PathLike) -> list[dict[str, Any]]:
  """Returns the list of records of a release data JSON file."""
  path = pathlib.Path(path)
  try:
    with open(path, "rb") as f:
      data = json.load(f)
  except FileNotFoundError as e:
    raise errors.UserError(f"{path}: data file not found") from e
  except (OSError, ValueError) as e:
    raise errors.UserError(f"{path}: not readable JSON: {e}") from e
  if not isinstance(data, list):
    raise errors.UserError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
  return data


def record_name(record: Any, index: int) -> str:
  """Returns 'record <index> (id <id>)' for messages."""
  rid = record.get("id") if isinstance(record, dict) else None
  return f"record {index} (id {rid!r})" if rid is not None else f"record {index}"


def timestamp_text(seconds: float, duration: float) -> str:
  """Returns the release's two-digit frame index of a time `seconds` in a clip of `duration`."""
  x = str(min(round(seconds / duration * 100), 99))
  return "0" + x if len(x) == 1 else x


def prepare(record: Any) -> tuple[Prepared | None, list[Fault]]:
  """Returns the prepared record (None when unusable) and every text-side fault found in it."""
  faults: list[Fault] = []
  if not isinstance(record, dict):
    return None, [Fault(BAD_FORMAT, f"a record must be a JSON object, found {type(record).__name__}")]
  rid = record.get("id")
  convs = record.get("conversations")
  if rid is None or not isinstance(rid, (str, int)):
    faults.append(Fault(BAD_FORMAT, "no 'id' (a string or an integer)"))
  if not isinstance(convs, list) or not convs or not all(
      isinstance(c, dict) and isinstance(c.get("value"), str) and c.get("from") in ("human", "gpt")
      for c in convs):
    faults.append(Fault(BAD_FORMAT, "'conversations' must be a non-empty list of "
                        "{'from': 'human'|'gpt', 'value': str}"))
    return None, faults
  values = [c["value"] for c in convs]
  roles = [c["from"] for c in convs]
  is_image = IMAGE_TAG in values[0]
  if is_image:
    values[0] = values[0].replace(IMAGE_TAG, VIDEO_TAG)

  meta = record.get("meta")
  if meta is not None:
    meta_faults, replacements = _meta_replacements(meta)
    faults.extend(meta_faults)
    for key, text in replacements:
      values = [v.replace(key, text) for v in values]
  left = sorted({m for v in values for m in _TIME_TOKEN.findall(v)})
  if left:
    faults.append(Fault(MISSING_META_TOKEN, f"time token(s) {', '.join(left)} have no value in "
                        f"meta.token" + ("" if meta is not None else " (the record has no meta)")))

  # The release drops a leading assistant turn, then expects human/gpt alternation.
  if roles[0] == "gpt":
    roles, values = roles[1:], values[1:]
  if not roles or any(r != ("human", "gpt")[k % 2] for k, r in enumerate(roles)):
    faults.append(Fault(BAD_FORMAT, "turns must alternate human, gpt, human, ..."))
  n_video = sum(v.count(VIDEO_TAG) for v in values)
  if n_video == 0:
    faults.append(Fault(NO_VIDEO, "no <video> (or <image>) in the conversation"))
  elif n_video > 1:
    faults.append(Fault(MANY_VIDEOS, f"{n_video} <video> tags; exactly one is supported"))
  answers = [v for r, v in zip(roles, values) if r == "gpt"]
  if not answers or any(not a.strip() for a in answers):
    faults.append(Fault(EMPTY_ANSWER, "no answer, or an answer that is empty"))
  if faults:
    return None, faults
  return Prepared(str(rid), tuple(zip(roles, values)), is_image), []


def _meta_replacements(meta: Any) -> tuple[list[Fault], list[tuple[str, str]]]:
  faults = []
  if not isinstance(meta, dict) or not isinstance(meta.get("token", {}), dict):
    return [Fault(BAD_FORMAT, "'meta' must be an object with a 'token' object")], []
  tokens = meta.get("token", {})
  duration = meta.get("duration")
  if not tokens:
    return [], []
  if not isinstance(duration, (int, float)) or isinstance(duration, bool) or duration <= 0:
    return [Fault(BAD_FORMAT, f"meta.duration must be a positive number, found {duration!r}")], []
  replacements = []
  for key, t in tokens.items():
    if not isinstance(t, (int, float)) or isinstance(t, bool):
      faults.append(Fault(BAD_FORMAT, f"meta.token[{key!r}] is not a number: {t!r}"))
      continue
    if not 0 <= t <= duration:
      # Still substituted (as the release would), so it is not reported a second time as missing.
      faults.append(Fault(BAD_TIMESTAMP, f"meta.token[{key!r}] = {t} is outside [0, {duration}]"))
    replacements.append((key, timestamp_text(t, duration)))
  return faults, replacements


def feature_path(feature_dir: str | os.PathLike, record_id: str) -> str:
  """Returns the release's feature file path `{feature_dir}/{id}.npy`."""
  return os.path.join(os.fspath(feature_dir), f"{record_id}.npy")


def expected_shapes(is_image: bool) -> tuple[tuple[int, ...], ...]:
  """Returns the stored shapes the release accepts for an image or a video."""
  return ((FEATURE_DIM,), (1, FEATURE_DIM)) if is_image else ((NUM_FRAMES, FEATURE_DIM),)


def check_feature_array(array: np.ndarray, is_image: bool) -> list[Fault]:
  """Returns the faults of a loaded feature array (empty when it is usable)."""
  faults = []
  shapes = expected_shapes(is_image)
  if array.shape not in shapes:
    faults.append(Fault(BAD_SHAPE, f"shape {list(array.shape)}, expected "
                        f"{' or '.join(str(list(s)) for s in shapes)}"))
  if array.dtype != np.float16:
    faults.append(Fault(BAD_DTYPE, f"dtype {array.dtype}, expected float16"))
  elif not faults:
    faults.extend(non_finite_faults(array))
  return faults


def non_finite_faults(array: np.ndarray, where: str = "") -> list[Fault]:
  """Returns a fault if any value of a float feature array is NaN or inf (one would poison the loss)."""
  bad = ~np.isfinite(array)
  if not bad.any():
    return []
  row = int(np.nonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0][0]) if bad.ndim > 1 else 0
  return [Fault(NON_FINITE_FEATURE, f"{where}NaN or inf in {int(bad.sum())} of {bad.size} values "
                                     f"(the first in row {row})")]


# numpy parses `.npy` headers with `ast.literal_eval`; CPython 3.11's parser is not thread-safe
# ("SystemError: AST constructor recursion depth mismatch" under Grain's prefetch threads), so
# header parsing is serialized. Reading the data itself stays parallel.
_HEADER_LOCK = threading.Lock()


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
  with _HEADER_LOCK:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
      return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
      return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f".npy format version {version} is not supported")


def _open_npy(path: str):
  """Returns (open file positioned at the data, shape, fortran_order, dtype, data bytes on disk)."""
  f = open(path, "rb")
  try:
    shape, fortran, dtype = _read_header(f)
    if dtype.hasobject:
      raise ValueError("object arrays are not feature arrays")
    available = os.fstat(f.fileno()).st_size - f.tell()
  except BaseException:
    f.close()
    raise
  return f, shape, fortran, dtype, available


def check_feature_file(path: str, is_image: bool, *, values: bool = False) -> list[Fault]:
  """Returns the faults of a feature file, reading only its header and size, or with `values` the data too.

  Only reading the data finds NaN or inf values; planning a pipeline reads headers (fast at corpus
  scale) and such values are found when a batch loads the file.
  """
  if values:
    try:
      load_features(path, is_image)
    except FeatureError as e:
      return [e.fault]
    return []
  try:
    f, shape, _, dtype, available = _open_npy(path)
  except FileNotFoundError:
    return [Fault(MISSING_FEATURE, f"{path} does not exist")]
  except (OSError, ValueError, SyntaxError, EOFError) as e:
    return [Fault(UNREADABLE_FEATURE, f"{path}: {e}")]
  f.close()
  needed = int(np.prod(shape)) * dtype.itemsize
  if available < needed:
    return [Fault(UNREADABLE_FEATURE, f"{path}: {available} data bytes, the header needs {needed}")]
  # A zero-stride view carries the header's shape and dtype without reading or allocating data.
  view = np.lib.stride_tricks.as_strided(np.zeros((), dtype), shape=shape, strides=(0,) * len(shape))
  return check_feature_array(view, is_image)


def load_features(path: str, is_image: bool) -> np.ndarray:
  """Returns float16[N, 768] features of one record (a stage-1 [768] vector becomes [1, 768]).

  Raises:
    FeatureError: the file is missing, unreadable, has the wrong shape or dtype, or holds NaN or inf.
  """
  try:
    f, shape, fortran, dtype, available = _open_npy(path)
  except FileNotFoundError as e:
    raise FeatureError(Fault(MISSING_FEATURE, f"{path} does not exist")) from e
  except (OSError, ValueError, SyntaxError, EOFError) as e:
    raise FeatureError(Fault(UNREADABLE_FEATURE, f"{path}: {e}")) from e
  with f:
    view = np.lib.stride_tricks.as_strided(np.zeros((), dtype), shape=shape,
                                           strides=(0,) * len(shape))
    faults = check_feature_array(view, is_image)
    if faults:
      raise FeatureError(faults[0])
    array = np.empty(shape[::-1] if fortran else shape, dtype)
    if f.readinto(memoryview(array).cast("B")) != array.nbytes:
      raise FeatureError(Fault(UNREADABLE_FEATURE, f"{path}: {available} data bytes, the header "
                               f"needs {array.nbytes}"))
  if fortran:
    array = array.T
  faults = non_finite_faults(array, f"{path}: ")
  if faults:
    raise FeatureError(faults[0])
  return array.reshape(1, FEATURE_DIM) if array.ndim == 1 else array


def read_features(path: str | os.PathLike, feature_dim: int) -> np.ndarray:
  """Returns float32[N, feature_dim] frame features from a `.npy` file ([feature_dim] -> N = 1)."""
  path = pathlib.Path(path)
  try:
    array = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise errors.UserError(f"{path}: feature file not found") from None
  except (OSError, ValueError) as e:
    raise errors.UserError(f"{path}: not a readable .npy feature file ({e})") from None
  if array.ndim == 1:
    array = array[None]
  if array.ndim != 2 or array.shape[-1] != feature_dim or array.shape[0] < 1:
    raise errors.UserError(f"{path}: features of shape {list(np.shape(array))}; expected [N, {feature_dim}] "
                    f"(a video: [100, {feature_dim}]) or [{feature_dim}] (an image)")
  if not np.issubdtype(array.dtype, np.floating):
    raise errors.UserError(f"{path}: features of dtype {array.dtype}; expected floating point (float16 as stored)")
  array = array.astype(np.float32)
  if not np.isfinite(array).all():
    raise errors.UserError(f"{path}: features hold NaN or infinite values")
  return array


class FeatureError(errors.UserError):
  """A feature file that cannot be used; carries its `Fault`."""

  def __init__(self, fault: Fault):
    self.fault = fault
    super().__init__(f"{fault.kind}: {fault.message}")
