"""Per-dimension standardisation of feature files (video/standardize.py)."""

import numpy as np
import pytest

from vtimellm_jax.errors import UserError
from vtimellm_jax.video import standardize


def _write(directory, name, array):
  directory.mkdir(parents=True, exist_ok=True)
  np.save(directory / f"{name}.npy", array)
  return directory / f"{name}.npy"


def test_stats_and_output_match_numpy(tmp_path):
  rng = np.random.default_rng(0)
  # A large shared part and a small varying one, as a random CLIP gives.
  shared = rng.normal(size=16) * 5
  videos = {f"v{i}": (shared + 0.1 * rng.normal(size=(10 + i, 16))).astype(np.float16) for i in range(4)}
  still = (shared + 0.1 * rng.normal(size=16)).astype(np.float16)
  files = [_write(tmp_path / "raw", name, a) for name, a in videos.items()]
  _write(tmp_path / "raw_stills", "s0", still)

  mean, std = standardize.feature_stats(files[:3], 16)  # the last video plays a held-out one
  frames = np.concatenate([videos[f"v{i}"] for i in range(3)]).astype(np.float64)
  np.testing.assert_allclose(mean, frames.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(std, frames.std(0), rtol=1e-4)

  assert standardize.standardize_dir(tmp_path / "raw", tmp_path / "out", mean, std) == 4
  assert standardize.standardize_dir(tmp_path / "raw_stills", tmp_path / "out_stills", mean, std) == 1
  for name, array in videos.items():
    out = np.load(tmp_path / "out" / f"{name}.npy")
    assert out.shape == array.shape and out.dtype == array.dtype
    np.testing.assert_allclose(out, (array.astype(np.float64) - mean) / std, atol=2e-2, rtol=1e-2)
  out_still = np.load(tmp_path / "out_stills" / "s0.npy")
  assert out_still.shape == (16,)
  train = np.concatenate([np.load(tmp_path / "out" / f"v{i}.npy") for i in range(3)]).astype(np.float64)
  np.testing.assert_allclose(train.mean(0), 0, atol=1e-2)
  np.testing.assert_allclose(train.std(0), 1, atol=1e-2)
  assert not list((tmp_path / "out").glob(".*"))  # no temporary file left behind

  standardize.save_stats(tmp_path / standardize.STATS_FILE, mean, std)
  saved = np.load(tmp_path / standardize.STATS_FILE)
  np.testing.assert_array_equal(saved["mean"], mean)


def test_constant_dimension_gets_a_floor(tmp_path):
  train = np.ones((20, 4), np.float32)
  train[:, 1:] = np.random.default_rng(1).normal(size=(20, 3))
  mean, std = standardize.feature_stats([_write(tmp_path / "raw", "t", train)], 4)
  # Dimension 0 never varies in training: divided by a share of the average deviation, not by ~0.
  assert std[0] == pytest.approx(standardize.MIN_STD_SHARE * train.std(0).mean(), rel=1e-3)
  _write(tmp_path / "raw", "h", np.full((3, 4), 1.5, np.float32))
  standardize.standardize_dir(tmp_path / "raw", tmp_path / "out", mean, std)
  np.testing.assert_allclose(np.load(tmp_path / "out" / "h.npy")[:, 0], 0.5 / std[0], rtol=1e-3)


def test_bad_files_are_named(tmp_path):
  good = _write(tmp_path / "raw", "good", np.zeros((5, 8), np.float32))
  wrong_dim = _write(tmp_path / "raw", "wrong_dim", np.zeros((5, 6), np.float32))
  with pytest.raises(UserError, match=r"wrong_dim\.npy: features of shape \[5, 6\]; expected \[N, 8\]"):
    standardize.feature_stats([good, wrong_dim], 8)
  nan = np.zeros((5, 8), np.float32)
  nan[2, 3] = np.nan
  with pytest.raises(UserError, match=r"nan\.npy: features hold NaN"):
    standardize.feature_stats([good, _write(tmp_path / "other", "nan", nan)], 8)
  broken = tmp_path / "other" / "broken.npy"
  broken.write_bytes(b"not numpy")
  with pytest.raises(UserError, match=r"broken\.npy: not a readable"):
    standardize.feature_stats([broken], 8)
  with pytest.raises(UserError, match="no feature files"):
    standardize.feature_stats([], 8)
  with pytest.raises(UserError, match=r"empty: no \.npy"):
    standardize.standardize_dir(tmp_path / "empty", tmp_path / "out", np.zeros(8), np.ones(8))
  with pytest.raises(UserError, match=r"wrong_dim\.npy"):
    standardize.standardize_dir(tmp_path / "raw", tmp_path / "out", np.zeros(8), np.ones(8))
