"""CLIP pixel preprocessing as the release did it: resize, center crop, normalise, on the accelerator.

Video frames (the release's path): uint8 RGB / 255 as float, torchvision's tensor `Resize(224,
BICUBIC)` of late 2023 -- not antialiased, bicubic with a = -0.75 and half-pixel centres, values
left unclamped (no rounding to uint8) -- then `CenterCrop(224)` and CLIP's mean/std.

The work is split so that the host only decodes and slices:

- host (`source_window`): the resize restricted to the crop is two small matrices, float32
  [224, h] for the rows and [224, w] for the columns (`bicubic_taps` -> `resize_matrix`, computed in
  float32 as PyTorch does). Only the source rows and columns they touch are kept (the crop window
  plus the kernel's reach), so a 16:9 frame ships about a square of uint8 pixels.
- host (`pack`): a batch of windows is zero-padded to one bucket (each side rounded up to a multiple
  of `BUCKET`, the batch taking the largest), and each matrix gets zero columns for the padded pixels,
  so the padding never reaches the output. The program depends only on the bucket: a corpus of mixed
  resolutions compiles one program per bucket, not one per video.
- device (`device_pixels`, inside the encoder's jit): two float32 matmuls at HIGHEST precision per
  frame and channel, / 255, then (x - mean) / std.

Still images (`extract-features --images`): OpenAI CLIP's own preprocess, a PIL bicubic resize
(PIL antialiases, and rounds to uint8) and center crop on the host; the device path then only
normalises (its matrices select the pixels as they are).

Nothing in the library resizes in numpy; `tests/numpy_preprocess.py` keeps the former numpy
implementation as the tests' reference.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np

from vtimellm_jax.video.decode import DecodeError

SIZE = 224
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
CUBIC_A = -0.75  # PyTorch's (and OpenCV's) bicubic coefficient
# Bucket granularity of the uint8 windows sent to the device, per side: 1080p pads 1080 rows to
# 1088; the padding costs transfer and matmul work only, a small part of the encoder's.
BUCKET = 64


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


def resize_matrix(taps: np.ndarray, weights: np.ndarray, in_size: int) -> np.ndarray:
  """Returns float32[count, in_size]: the bicubic taps as a dense matrix (clamped taps add up)."""
  matrix = np.zeros((taps.shape[0], in_size), np.float32)
  np.add.at(matrix, (np.arange(taps.shape[0])[:, None], taps), weights)
  return matrix


@dataclasses.dataclass(frozen=True)
class Window:
  """The uint8 source pixels a crop reads, with the resize of that crop as two matrices.

  frames: uint8[N, h, w, 3]; rows: float32[S, h]; cols: float32[S, w] (S: the output size).
  Output pixel (i, j) of frame n, before / 255 and normalisation, is rows[i] @ frames[n, :, :, c] @ cols[j].
  """
  frames: np.ndarray
  rows: np.ndarray
  cols: np.ndarray


def _axis_matrix(in_size: int, resized: int, size: int) -> np.ndarray:
  """Returns float32[size, in_size]: torchvision's resize of one axis to `resized`, cropped to `size`."""
  start = crop_offset(resized, size)
  if resized == in_size:  # no resize on this axis: the crop selects pixels as they are
    matrix = np.zeros((size, in_size), np.float32)
    matrix[np.arange(size), start + np.arange(size)] = 1
    return matrix
  return resize_matrix(*bicubic_taps(in_size, resized, start, size), in_size)


def _span(matrix: np.ndarray) -> slice:
  """Returns the slice of source indices with a nonzero weight."""
  used = np.flatnonzero(matrix.any(axis=0))
  return slice(int(used[0]), int(used[-1]) + 1)


def source_window(frames: np.ndarray, size: int = SIZE) -> Window:
  """Returns the window of uint8[N, H, W, 3] frames that the release's Resize(size)/CenterCrop(size) reads.

  torchvision returns an image untouched when the resize would not change its size; then the
  matrices only select the crop (both sides keep their size or neither: only when the shorter side
  is `size` already).
  """
  if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
    raise ValueError(f"expected uint8[N, H, W, 3] frames, got {frames.dtype}{list(frames.shape)}")
  _, h, w, _ = frames.shape
  new_h, new_w = resized_size(h, w, size)
  rows, cols = _axis_matrix(h, new_h, size), _axis_matrix(w, new_w, size)
  r, c = _span(rows), _span(cols)
  # A copy, so the decoded full frames can be freed while the window waits for its batch.
  return Window(np.ascontiguousarray(frames[:, r, c]), np.ascontiguousarray(rows[:, r]),
                np.ascontiguousarray(cols[:, c]))


def bucket_side(n: int) -> int:
  """Returns `n` rounded up to a multiple of BUCKET: the padded side of a window in a batch."""
  return -(-n // BUCKET) * BUCKET


def bucket(windows: list[Window]) -> tuple[int, int]:
  """Returns the (height, width) every window of one batch is padded to."""
  return (bucket_side(max(win.frames.shape[1] for win in windows)),
          bucket_side(max(win.frames.shape[2] for win in windows)))


def pack(windows: list[Window], slots: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Returns (uint8[slots, N, Hb, Wb, 3], float32[slots, S, Hb], float32[slots, S, Wb]) for `device_pixels`.

  Windows (all of N frames and output size S) are zero-padded to the batch's bucket, their matrices
  with zero columns; slots past the windows are all zeros (their outputs are dropped).
  """
  if not 0 < len(windows) <= slots:
    raise ValueError(f"cannot pack {len(windows)} window(s) into {slots} slot(s)")
  n, size = windows[0].frames.shape[0], windows[0].rows.shape[0]
  for win in windows:
    if win.frames.shape[0] != n or win.rows.shape[0] != size or win.cols.shape[0] != size:
      raise ValueError(f"windows of one batch must share frame count and size: {win.frames.shape[0]} frames, "
                       f"size {win.rows.shape[0]} against {n} frames, size {size}")
  hb, wb = bucket(windows)
  frames = np.zeros((slots, n, hb, wb, 3), np.uint8)
  rows = np.zeros((slots, size, hb), np.float32)
  cols = np.zeros((slots, size, wb), np.float32)
  for k, win in enumerate(windows):
    _, h, w, _ = win.frames.shape
    frames[k, :, :h, :w] = win.frames
    rows[k, :, :h] = win.rows
    cols[k, :, :w] = win.cols
  return frames, rows, cols


def device_pixels(frames, rows, cols):
  """Returns float32[V, N, S, S, 3]: normalised pixels of `pack`'s uint8 windows, computed with JAX.

  Meant to run inside a jit (the encoder's); HIGHEST precision keeps the matmuls in true float32
  (no TF32 / bfloat16 passes on GPU / TPU), as the numpy reference computes.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  highest = jax.lax.Precision.HIGHEST
  x = frames.astype(jnp.float32)
  if frames.shape[2] >= frames.shape[3]:  # reduce the longer side first: the smaller intermediate
    x = jnp.einsum("vsh,vnhwc->vnswc", rows, x, precision=highest)
    x = jnp.einsum("vtw,vnswc->vnstc", cols, x, precision=highest)
  else:
    x = jnp.einsum("vtw,vnhwc->vnhtc", cols, x, precision=highest)
    x = jnp.einsum("vsh,vnhtc->vnstc", rows, x, precision=highest)
  return (x / jnp.float32(255.0) - MEAN) / STD


_jitted_device_pixels = None


def to_pixels(frames: np.ndarray, size: int = SIZE) -> np.ndarray:
  """Returns float32[N, size, size, 3]: the release's preprocessing of uint8[N, H, W, 3] frames, one call.

  `source_window` + `pack` + `device_pixels` for one set of frames (tests, benchmarks, one-off
  use); the extraction pipeline runs `device_pixels` inside its encoder instead.
  """
  global _jitted_device_pixels
  if _jitted_device_pixels is None:
    import jax  # pylint: disable=g-import-not-at-top
    _jitted_device_pixels = jax.jit(device_pixels)
  return np.asarray(_jitted_device_pixels(*pack([source_window(frames, size)], 1)))[0]


def read_image(path: str | pathlib.Path, size: int = SIZE) -> np.ndarray:
  """Returns uint8[size, size, 3]: OpenAI CLIP's preprocess up to normalisation (PIL bicubic resize, crop)."""
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
  return np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[top:top + size, left:left + size])
