"""What the demo and the server load: a model, the CLIP that makes its features, and a video cache.

`--model` names a VTimeLLM model directory (model.json, params/, tokenizer files) or a quickstart
workdir. A quickstart workdir holds `serving.json`, written by `quickstart` once its model is
exported: where the model is, which CLIP (and random seed) made its training features, and the
standardisation statistics those features went through (video/standardize.py). A video asked about
through a quickstart workdir goes through the same CLIP and statistics, so the demo and the server
answer about it as `eval` does about its stored features.

`VideoCache` computes a video's features once and keeps them (keyed by the file's real path, size
and modification time), so every question about one video after the first costs no CLIP pass.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import pathlib
import threading

import numpy as np

from vtimellm_jax import model_io
from vtimellm_jax.errors import UserError

SERVING_JSON = "serving.json"


@dataclasses.dataclass(frozen=True)
class ServedModel:
  """Where a served model's parts are."""

  model_dir: pathlib.Path
  clip: str | None  # a `--clip` spec (directory, checkpoint, or tiny-random name); None: features only
  clip_seed: int = 0  # a random CLIP's seed
  stats: pathlib.Path | None = None  # standardize.npz the features go through


def write_serving_json(workdir: str | os.PathLike, model_dir: str, clip: str, clip_seed: int,
                       stats: str | None) -> pathlib.Path:
  """Writes a quickstart workdir's serving.json (paths relative to the workdir); returns its path."""
  path = pathlib.Path(workdir) / SERVING_JSON
  record = {"model": model_dir, "clip": clip, "clip_seed": clip_seed, "standardize": stats}
  path.write_text(json.dumps(record, indent=2) + "\n")
  return path


def resolve(model: str | os.PathLike, clip: str | None = None) -> ServedModel:
  """Returns the ServedModel of `--model` (a model directory or a quickstart workdir) and `--clip`."""
  path = pathlib.Path(model)
  record_path = path / SERVING_JSON
  if record_path.is_file():
    try:
      record = json.loads(record_path.read_text())
      model_dir = path / record["model"]
      stats = None if record.get("standardize") is None else path / record["standardize"]
      served = ServedModel(model_dir, record["clip"], int(record.get("clip_seed", 0)), stats)
    except (ValueError, KeyError, TypeError) as e:
      raise UserError(f"{record_path}: not a serving record (model, clip, clip_seed, standardize): {e}") from None
    if clip is not None and clip != served.clip:
      raise UserError(f"--model {model} is a quickstart workdir whose model was trained on features of CLIP "
                      f"{served.clip!r}; drop --clip {clip}")
  elif (path / model_io.MODEL_JSON).is_file():
    served = ServedModel(path, clip)
  else:
    raise UserError(f"--model {model}: neither a model directory ({model_io.MODEL_JSON}) nor a quickstart "
                    f"workdir ({SERVING_JSON}; `quickstart` writes it once its model is exported)")
  if not (served.model_dir / model_io.MODEL_JSON).is_file():
    raise UserError(f"{served.model_dir}: no {model_io.MODEL_JSON} (named by {record_path})")
  if served.stats is not None and not served.stats.is_file():
    raise UserError(f"{served.stats}: standardisation statistics not found (named by {record_path})")
  return served


class VideoCache:
  """A video file's (float32[100, 768] features, duration in seconds), computed once per file.

  Thread-safe: concurrent requests for one video wait for a single CLIP pass. Keeps the `keep` most
  recently used videos.
  """

  def __init__(self, served: ServedModel, dtype: str = "auto", keep: int = 32):
    from vtimellm_jax.inference import features  # pylint: disable=g-import-not-at-top

    self._featurizer = None
    if served.clip is not None:
      self._featurizer = features.ClipFeaturizer(served.clip, dtype, served.clip_seed, served.stats)
    self._keep = keep
    self._entries: collections.OrderedDict = collections.OrderedDict()
    self._lock = threading.Lock()

  @property
  def can_encode(self) -> bool:
    return self._featurizer is not None

  def __call__(self, video_path: str | os.PathLike) -> tuple[np.ndarray, float]:
    from vtimellm_jax.inference import features  # pylint: disable=g-import-not-at-top

    if self._featurizer is None:
      raise UserError("this model was loaded without --clip: videos cannot be encoded, only stored features")
    path = pathlib.Path(video_path)
    try:
      stat = path.stat()
    except OSError:
      raise UserError(f"{path}: video file not found") from None
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    with self._lock:  # one CLIP pass at a time; a second request for the same video finds it cached
      if key in self._entries:
        self._entries.move_to_end(key)
        return self._entries[key]
      value = (self._featurizer(path), features.video_duration(path))
      self._entries[key] = value
      while len(self._entries) > self._keep:
        self._entries.popitem(last=False)
      return value
