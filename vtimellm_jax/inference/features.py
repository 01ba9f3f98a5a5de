"""Frame features for inference: stored `.npy` files, or CLIP run on a video file on the spot.

A stored feature file is what `extract-features` (or the release) writes: float16 [100, 768] for
a video, [768] or [1, 768] for an image. Features computed from a video here go through the same
pipeline (100 sampled frames, the release's preprocessing, CLIP `encode_image`) and are rounded to
float16, as stored files are, so a video and its stored features give the same answers.
"""

from __future__ import annotations

import os
import pathlib
import sys

import numpy as np

from vtimellm_jax.data import records
from vtimellm_jax.errors import UserError
from vtimellm_jax.video import decode


def video_duration(path: str | os.PathLike) -> float:
  """Returns a video's length in seconds: its frame count over its average frame rate."""
  try:
    index = decode.probe(path)
  except (OSError, decode.DecodeError) as e:
    raise UserError(f"{path}: cannot read the video ({e})") from None
  if index.fps <= 0 or index.total_frames == 0:
    raise UserError(f"{path}: the video has no frames or no frame rate")
  return index.total_frames / index.fps


class ClipFeaturizer:
  """Computes a video's [100, 768] features with a CLIP model directory (loaded on first use)."""

  def __init__(self, clip_spec: str, dtype: str = "auto", seed: int = 0, stats: str | os.PathLike | None = None):
    """`seed` is a random CLIP's (`tiny-random*`); `stats` a `standardize.npz` the features go through
    (the quickstart's, whose training features were standardised the same way)."""
    from vtimellm_jax.video import standardize  # pylint: disable=g-import-not-at-top

    self.clip_spec = clip_spec
    self.dtype = dtype
    self.seed = seed
    self.stats = None if stats is None else standardize.load_stats(stats)
    self._encode = None

  def _load(self):
    import jax  # pylint: disable=g-import-not-at-top
    from vtimellm_jax.video import clip_source, extract, sampling  # pylint: disable=g-import-not-at-top

    model = clip_source.load_clip(self.clip_spec, clip_source.compute_dtype(self.dtype), self.seed)
    # extract-features' encoder, one video a call on one device: the same device preprocessing.
    self._encode = extract.BatchEncoder(model, sampling.NUM_FRAMES, frames_per_item=sampling.NUM_FRAMES,
                                        devices=jax.devices()[:1])

  def __call__(self, video_path: str | os.PathLike) -> np.ndarray:
    """Returns float32[100, 768] features of a video file (values rounded through float16, as stored)."""
    from vtimellm_jax.video import extract, sampling, standardize  # pylint: disable=g-import-not-at-top

    path = pathlib.Path(video_path)
    if not path.is_file():
      raise UserError(f"{path}: video file not found")
    if self._encode is None:
      self._load()
    try:
      window = extract.load_video(extract.Item(path.stem, path), None, sampling.NUM_FRAMES,
                                  self._encode.image_size).window
    except (OSError, decode.DecodeError) as e:
      raise UserError(f"{path}: cannot decode the video ({e})") from None
    features = self._encode([window])()[0].astype(np.float16)  # as extract-features stores them
    if self.stats is not None:
      features = standardize.apply(features, *self.stats).astype(np.float16)  # as standardize_dir stores them
    return features.astype(np.float32)


class FeatureSource:
  """Finds a video's features: `{features_dir}/{id}.npy` first, else `{videos_dir}/{id}.{mp4,mkv,webm,...}` + CLIP.

  This is the release's lookup order in its eval.py (which stops at webm; `decode.VIDEO_EXTENSIONS`
  goes on with every other extension extraction reads). Recently used videos stay in memory, because
  an evaluation asks many queries about each video in a row.
  """

  def __init__(self, features_dir: str | None, videos_dir: str | None, clip_spec: str | None,
               feature_dim: int, dtype: str = "auto", keep: int = 64):
    if features_dir is None and videos_dir is None:
      raise UserError("give --features (a folder of {id}.npy files) or --videos with --clip")
    if videos_dir is not None and clip_spec is None:
      raise UserError("--videos needs --clip (a CLIP model directory) to compute features")
    for flag, folder in (("--features", features_dir), ("--videos", videos_dir)):
      if folder is not None and not pathlib.Path(folder).is_dir():
        raise UserError(f"{flag} {folder}: not a folder")
    self.features_dir = None if features_dir is None else pathlib.Path(features_dir)
    self.videos_dir = None if videos_dir is None else pathlib.Path(videos_dir)
    self.featurizer = None if clip_spec is None else ClipFeaturizer(clip_spec, dtype)
    self.feature_dim = feature_dim
    self._keep = keep
    self._cache: dict[str, np.ndarray] = {}

  def locate(self, video_id: str) -> pathlib.Path | None:
    """Returns the file the features of `video_id` come from (a .npy or a video), None if there is none."""
    if self.features_dir is not None:
      path = self.features_dir / f"{video_id}.npy"
      if path.is_file():
        return path
    if self.videos_dir is not None:
      for ext in decode.VIDEO_EXTENSIONS:
        path = self.videos_dir / f"{video_id}{ext}"
        if path.is_file():
          return path
    return None

  def describe_lookup(self, video_id: str) -> str:
    """Returns the paths tried for `video_id`, for error messages."""
    tried = []
    if self.features_dir is not None:
      tried.append(str(self.features_dir / f"{video_id}.npy"))
    if self.videos_dir is not None:
      tried.append(str(self.videos_dir / f"{video_id}.{{{','.join(e.lstrip('.') for e in decode.VIDEO_EXTENSIONS)}}}"))
    return " or ".join(tried)

  def __call__(self, video_id: str) -> np.ndarray:
    """Returns float32[N, feature_dim] features of `video_id`; UserError if it has none."""
    if video_id in self._cache:
      return self._cache[video_id]
    path = self.locate(video_id)
    if path is None:
      raise UserError(f"video {video_id!r}: no features ({self.describe_lookup(video_id)} not found)")
    if path.suffix == ".npy":
      features = records.read_features(path, self.feature_dim)
    else:
      print(f"computing CLIP features of {path}", file=sys.stderr)
      features = self.featurizer(path)
    if len(self._cache) >= self._keep:
      self._cache.pop(next(iter(self._cache)))
    self._cache[video_id] = features
    return features
