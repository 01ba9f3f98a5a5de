"""Per-dimension standardisation of CLIP features, for the random CLIPs of the quickstart.

A randomly initialised CLIP maps every image to nearly the same embedding: over the synthetic
corpus's frames the part every frame shares has RMS 1.0 and the part that varies 0.16. Frame tokens
made from such features are mostly that shared part, and a small LLaMA trained for minutes does not
learn to find the asked event among them (docs/synthetic.md, "Sixth session"). Subtracting the
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

from vtimellm_jax.errors import UserError

STATS_FILE = "standardize.npz"
# A dimension that barely varies over the training frames is divided by at least this share of the
# average deviation, so that held-out frames which do vary there are not blown up.
MIN_STD_SHARE = 1e-3


def _load(path: pathlib.Path, dim: int | None) -> np.ndarray:
  """Returns the file's array, [frames, dim] or [dim], or raises UserError naming the file."""
  try:
    array = np.load(path)
  except (OSError, ValueError) as e:
    raise UserError(f"{path}: not a readable .npy feature file ({e})") from e
  if array.ndim not in (1, 2) or (dim is not None and array.shape[-1] != dim):
    want = f"[frames, {dim}]" if dim else "[frames, dim]"
    raise UserError(f"{path}: features of shape {list(array.shape)}, expected {want}")
  if not np.isfinite(array).all():
    raise UserError(f"{path}: features hold NaN or infinite values")
  return array


def _frames(array: np.ndarray) -> np.ndarray:
  return array.reshape(-1, array.shape[-1]).astype(np.float64)


def feature_stats(files: Iterable[pathlib.Path]) -> tuple[np.ndarray, np.ndarray]:
  """Returns (mean, std), float32[dim] each, over every frame of every file."""
  total = squares = None
  count = 0
  for path in files:
    frames = _frames(_load(pathlib.Path(path), None if total is None else total.shape[0]))
    if total is None:
      total, squares = np.zeros(frames.shape[1]), np.zeros(frames.shape[1])
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
  """Writes `(x - mean) / std` of every `src/*.npy` to `dst` under the same name; returns the count."""
  src, dst = pathlib.Path(src), pathlib.Path(dst)
  files = sorted(src.glob("*.npy"))
  if not files:
    raise UserError(f"{src}: no .npy feature files to standardise")
  dst.mkdir(parents=True, exist_ok=True)
  for path in files:
    array = _load(path, mean.shape[0])
    out = ((_frames(array) - mean) / std).astype(array.dtype).reshape(array.shape)
    tmp = dst / f".{path.name}.tmp"
    with open(tmp, "wb") as f:
      np.save(f, out)
    tmp.replace(dst / path.name)  # a rerun after an interruption never reads half a file
  return len(files)


def save_stats(path: str | pathlib.Path, mean: np.ndarray, std: np.ndarray) -> None:
  np.savez(path, mean=mean, std=std)
