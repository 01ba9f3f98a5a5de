"""The tests' reference for the device preprocessing: the release's frame preprocessing in numpy.

This was the library's host-side implementation before resizing moved into the encoder's jit: the
same float32 taps and weights (`preprocess.bicubic_taps`), applied as 4-tap gathers on frames / 255,
no rounding or clamping, then CLIP's mean/std.
"""

import numpy as np

from vtimellm_jax.video import preprocess


def _resize_axis(x, axis, taps, weights):
  shape = [1] * x.ndim
  shape[axis] = taps.shape[0]
  out = None
  for k in range(4):
    term = np.take(x, taps[:, k], axis=axis) * weights[:, k].reshape(shape)
    out = term if out is None else out + term
  return out


def preprocess_frames(frames: np.ndarray, size: int = preprocess.SIZE) -> np.ndarray:
  """Returns float32[N, size, size, 3]: Resize(size, bicubic, no antialias), CenterCrop, Normalize of uint8 frames."""
  n, h, w, _ = frames.shape
  new_h, new_w = preprocess.resized_size(h, w, size)
  x = frames.astype(np.float32) / np.float32(255.0)
  if (new_h, new_w) == (h, w):  # torchvision returns the image untouched when no resize is needed
    top, left = preprocess.crop_offset(h, size), preprocess.crop_offset(w, size)
    return (x[:, top:top + size, left:left + size] - preprocess.MEAN) / preprocess.STD
  taps_h, weights_h = preprocess.bicubic_taps(h, new_h, preprocess.crop_offset(new_h, size), size)
  taps_w, weights_w = preprocess.bicubic_taps(w, new_w, preprocess.crop_offset(new_w, size), size)
  x = _resize_axis(_resize_axis(x, 1, taps_h, weights_h), 2, taps_w, weights_w)
  return (x - preprocess.MEAN) / preprocess.STD
