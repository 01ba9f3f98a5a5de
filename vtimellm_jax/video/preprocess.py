"""CLIP pixel preprocessing as the release did it, in numpy: resize, center crop, normalise.

Video frames (the release's path): uint8 RGB / 255 as float, torchvision's tensor `Resize(224,
BICUBIC)` of late 2023 -- not antialiased, bicubic with a = -0.75 and half-pixel centres, values
left unclamped -- then `CenterCrop(224)` and CLIP's mean/std. Only the cropped window is
interpolated, so a 4-tap gather per axis is all the work.

Still images (`extract-features --images`): OpenAI CLIP's own preprocess, a PIL bicubic resize
(PIL antialiases), center crop, then the same normalisation.
"""

from __future__ import annotations

import pathlib

import numpy as np

from vtimellm_jax.video.decode import DecodeError

SIZE = 224
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
CUBIC_A = -0.75  # PyTorch's (and OpenCV's) bicubic coefficient
# Up to this input side a dense resize matrix (BLAS) beats 4-tap gathers on a CPU, measured:
# 100 frames of 64x64 take 0.14-0.19 s dense vs 0.46 s gathered; of 360x640 1.44 s vs 0.63-0.84 s
# (docs/vision.md has the benchmark command).
DENSE_MAX_SIDE = 256


def resized_size(height: int, width: int, size: int = SIZE) -> tuple[int, int]:
  """Returns torchvision's `Resize(size)` output (height, width): shorter side -> size, longer truncated."""
  short, long = (width, height) if width <= height else (height, width)
  new_long = int(size * long / short)
  return (new_long, size) if width <= height else (size, new_long)


def crop_offset(resized: int, size: int = SIZE) -> int:
  """Returns torchvision's CenterCrop offset: Python's round (half to even) of the margin / 2."""
  return int(round((resized - size) / 2.0))


def _cubic_weights(t: np.ndarray) -> np.ndarray:
  """Returns float[..., 4]: weights of taps floor(x) - 1 .. floor(x) + 2 at fractional offset t."""
  a = t.dtype.type(CUBIC_A)

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def bicubic_taps(in_size: int, out_size: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
  """Returns (int[count, 4] source indices, float32[count, 4] weights) for outputs start..start+count.

  align_corners=False: output o samples source coordinate (o + 0.5) * in / out - 0.5; taps
  outside the image are clamped to the border pixel, as PyTorch's upsample_bicubic2d does.
  """
  # float32 throughout, as PyTorch computes coordinates and weights for float images: at large
  # downscales float32 coordinates differ from exact ones by ~1e-4 of a pixel, which shows.
  f32 = np.float32
  scale = f32(in_size) / f32(out_size)
  src = scale * (np.arange(start, start + count, dtype=f32) + f32(0.5)) - f32(0.5)
  base = np.floor(src)
  weights = _cubic_weights(src - base).astype(f32)
  taps = base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :]
  return np.clip(taps, 0, in_size - 1), weights


def _resize_axis(x: np.ndarray, axis: int, taps: np.ndarray, weights: np.ndarray) -> np.ndarray:
  shape = [1] * x.ndim
  shape[axis] = taps.shape[0]
  out = None
  for k in range(4):
    term = np.take(x, taps[:, k], axis=axis) * weights[:, k].reshape(shape)
    out = term if out is None else out + term
  return out


def resize_matrix(taps: np.ndarray, weights: np.ndarray, in_size: int) -> np.ndarray:
  """Returns float32[count, in_size]: the bicubic taps as a dense matrix (clamped taps add up)."""
  matrix = np.zeros((taps.shape[0], in_size), np.float32)
  np.add.at(matrix, (np.arange(taps.shape[0])[:, None], taps), weights)
  return matrix


def normalize(x: np.ndarray) -> np.ndarray:
  """Returns (x - CLIP mean) / CLIP std over the last (RGB) axis."""
  return (x - MEAN) / STD


def preprocess_frames(frames: np.ndarray, size: int = SIZE, chunk: int = 16) -> np.ndarray:
  """Returns float32[N, size, size, 3]: the release's Resize/CenterCrop/Normalize of uint8[N, H, W, 3].

  Values may overshoot the normalised [0, 1] range, as the non-antialiased bicubic does.
  """
  if frames.ndim != 4 or frames.shape[-1] != 3:
    raise ValueError(f"expected uint8[N, H, W, 3] frames, got {frames.shape}")
  n, h, w, _ = frames.shape
  new_h, new_w = resized_size(h, w, size)
  taps_h, weights_h = bicubic_taps(h, new_h, crop_offset(new_h, size), size)
  taps_w, weights_w = bicubic_taps(w, new_w, crop_offset(new_w, size), size)
  out = np.empty((n, size, size, 3), dtype=np.float32)
  if (new_h, new_w) == (h, w):  # torchvision returns the image untouched when no resize is needed
    top, left = crop_offset(h, size), crop_offset(w, size)
    for s in range(0, n, chunk):
      out[s:s + chunk] = normalize(frames[s:s + chunk, top:top + size, left:left + size].astype(np.float32) / 255.0)
    return out
  if max(h, w) <= DENSE_MAX_SIDE:
    return _resize_dense(frames, out, taps_h, weights_h, taps_w, weights_w, chunk)
  # The 1/255 is folded into the first axis' weights: the gathers then read uint8 directly.
  passes = [(1, taps_h, weights_h), (2, taps_w, weights_w)]
  if w > h:  # interpolate the longer axis last, so the intermediate is the smaller one
    passes.reverse()
  (axis1, taps1, weights1), (axis2, taps2, weights2) = passes
  weights1 = weights1 / np.float32(255.0)
  # Chunks keep the float intermediates small.
  for s in range(0, n, chunk):
    x = _resize_axis(frames[s:s + chunk], axis1, taps1, weights1)
    out[s:s + chunk] = normalize(_resize_axis(x, axis2, taps2, weights2))
  return out


def _resize_dense(frames, out, taps_h, weights_h, taps_w, weights_w, chunk):
  """Returns `out` filled with the resized, normalised frames, as two matmuls per frame and channel.

  BLAS at the same weights (only the float32 summation order differs, < 1e-6); the 1/255 and the
  per-channel 1/std are folded into the row matrix, the mean into a bias.
  """
  n, h, w, _ = frames.shape
  rows = resize_matrix(taps_h, weights_h, h)[None] / (np.float32(255.0) * STD[:, None, None])  # [3, size, h]
  cols = resize_matrix(taps_w, weights_w, w).T  # [w, size]
  bias = (-MEAN / STD)[:, None, None]
  for s in range(0, n, chunk):  # chunks keep the float intermediates small
    x = frames[s:s + chunk].astype(np.float32).transpose(0, 3, 1, 2)  # [n, 3, h, w]
    x = rows @ (x @ cols) if w >= h else (rows @ x) @ cols  # the smaller intermediate first
    x += bias
    out[s:s + chunk] = x.transpose(0, 2, 3, 1)
  return out


def read_image(path: str | pathlib.Path, size: int = SIZE) -> np.ndarray:
  """Returns float32[size, size, 3]: OpenAI CLIP's preprocess (PIL bicubic resize, crop, normalise)."""
  from PIL import Image, UnidentifiedImageError

  try:
    with Image.open(path) as image:
      image = image.convert("RGB")
  except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
    raise DecodeError(f"cannot read image: {type(e).__name__}: {e}") from e
  w, h = image.size
  new_h, new_w = resized_size(h, w, size)
  if (new_h, new_w) != (h, w):
    image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
  top, left = crop_offset(new_h, size), crop_offset(new_w, size)
  pixels = np.asarray(image, dtype=np.float32)[top:top + size, left:left + size] / 255.0
  return normalize(pixels)
