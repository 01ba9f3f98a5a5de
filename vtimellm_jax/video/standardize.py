"""Per-dimension standardisation of CLIP features, for the random CLIPs of the quickstart.

A randomly initialised CLIP maps every image to nearly the same embedding: over the synthetic
corpus's frames the part every frame shares has RMS 1.0 and the part that varies 0.16. Frame tokens
made from such features are mostly that shared part, and a small LLaMA trained for minutes does not
learn to find the asked event among them (docs/synthetic.md, "Features"). Subtracting the
training frames' mean and dividing by their standard deviation, per dimension, leaves what tells
frames apart at unit scale. Trained CLIPs (the release's ViT-L/14) need none of this, and the
release's checkpoints expect raw features, so only `quickstart` with a random CLIP uses it.

The statistics come from training videos only (no held-out frame leaks into them) and are applied
to every file alike, so a feature file means the same thing in every stage and in evaluation.
"""

from __future__ import annotations

import pathlib
from collections.abc import Iterable

import numpy as np

from vtimellm_jax.data import records
from vtimellm_jax.errors import UserError

STATS_FILE = "standardize.npz"
# A dimension that barely varies over the training frames is divided by at least this share of the
# average deviation, so that held-out frames which do vary there are not blown up.
MIN_STD_SHARE = 1e-3


def feature_stats(files: Iterable[pathlib.Path],
                  feature_dim: int = records.FEATURE_DIM) -> tuple[np.ndarray, np.ndarray]:
  """Returns (mean, std), float32[feature_dim] each, over every frame of every file."""
  total, squares, count = np.zeros(feature_dim), np.zeros(feature_dim), 0
  for path in files:
    frames = records.read_features(path, feature_dim).astype(np.float64)
    total += frames.sum(0)
    squares += np.square(frames).sum(0)
    count += frames.shape[0]
  if not count:
    raise UserError("no feature files to compute standardisation statistics from")
  mean = total / count
  std = np.sqrt(np.maximum(squares / count - np.square(mean), 0.0))
  std = np.maximum(std, MIN_STD_SHARE * std.mean() + 1e-12)
  return mean.astype(np.float32), std.astype(np.float32)


def standardize_dir(src: str | pathlib.Path, dst: str | pathlib.Path, mean: np.ndarray, std: np.ndarray) -> int:
  """Writes `(x - mean) / std` of every `src/*.npy` to `dst` under the same name, in the file's own
  dtype and shape ([frames, dim] or [dim]); returns the count."""
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  files = sorted(src.glob("*.npy"))
  if not files:
    raise UserError(f"{src}: no .npy feature files to standardise")
  dst.mkdir(parents=True, exist_ok=True)
  for path in files:
    frames = records.read_features(path, mean.shape[0])  # checked, float32 [frames, dim]
    stored = np.load(path, mmap_mode="r")  # the header only: the dtype and shape to write back
    out = apply(frames, mean, std).astype(stored.dtype).reshape(stored.shape)
    tmp = dst / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
      np.save(f, out)
    tmp.replace(dst / path.name)  # a rerun after an interruption never reads half a file
  return len(files)


def apply(frames: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
  """Returns float64 `(frames - mean) / std` (the caller rounds it to the dtype it stores)."""
  return (frames.astype(np.float64) - mean) / std


def save_stats(path: str | pathlib.Path, mean: np.ndarray, std: np.ndarray) -> None:
  np.savez(path, mean=mean, std=std)


def load_stats(path: str | pathlib.Path) -> tuple[np.ndarray, np.ndarray]:
  """Returns (mean, std) saved by `save_stats`; UserError naming the file if it is not such a file."""
  try:
    with np.load(path) as stats:
      mean, std = stats["mean"].astype(np.float32), stats["std"].astype(np.float32)
  except (OSError, ValueError, KeyError) as e:
    raise UserError(f"{path}: not a standardisation statistics file (mean, std) ({e})") from None
  if mean.shape != std.shape or mean.ndim != 1 or not (std > 0).all():
    raise UserError(f"{path}: mean and std must be two equal-length vectors with std > 0")
  return mean, std
