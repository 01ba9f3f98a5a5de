"""Preprocessing on the device (inside the encoder's jit) equals the numpy reference; buckets share programs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import numpy_preprocess
from vtimellm_jax.models import clip as clip_model, load
from vtimellm_jax.video import decode, extract, preprocess


@functools.cache
def _model(size):
  return load.random_clip(clip_model.tiny(size, 32 if size == 224 else 8), seed=0)


@nnx.jit
def _encode(model, pixels):
  return model.encode_image(pixels)


def _reference(frames, size):
  """(pixels, features) of uint8 frames through the numpy resize and the plain encoder."""
  pixels = numpy_preprocess.preprocess_frames(frames, size)
  return pixels, np.asarray(_encode(_model(size), jnp.asarray(pixels)))


def _max_relative_error(ours, reference):
  """The largest, over frames, of max |ours - reference| / max |reference| within the frame."""
  axes = tuple(range(1, reference.ndim))
  return float((np.abs(ours - reference).max(axis=axes) / np.abs(reference).max(axis=axes)).max())


def _frames(n, height, width, seed):
  """Random 4x4-pixel blocks: steep edges everywhere, the resize's hard case."""
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, 256, (n, -(-height // 4), -(-width // 4), 3), dtype=np.uint8)
  return np.ascontiguousarray(blocks.repeat(4, 1).repeat(4, 2)[:, :height, :width])


def _check(frames, size):
  encoder = extract.BatchEncoder(_model(size), len(frames), frames_per_item=len(frames), devices=jax.devices()[:1])
  window = preprocess.source_window(frames, size)
  features = encoder([window])()[0]
  pixels = preprocess.to_pixels(frames, size)
  ref_pixels, ref_features = _reference(frames, size)
  assert pixels.shape == ref_pixels.shape == (len(frames), size, size, 3)
  assert _max_relative_error(pixels, ref_pixels) <= 1e-3
  np.testing.assert_allclose(pixels, ref_pixels, atol=1e-4, rtol=0)
  assert features.shape == ref_features.shape
  assert _max_relative_error(features, ref_features) <= 1e-3


def test_demo_video_equals_the_numpy_path(official_fixtures):
  item = extract.Item("demo", official_fixtures / "demo.mp4")
  window = extract.load_video(item, None, 100).window
  # The host decodes and slices; it does not resize: uint8 source pixels, at most the frame's size.
  assert window.frames.dtype == np.uint8 and window.frames.shape[0] == 100
  assert window.frames.shape[1:] == (408, 406, 3)  # 720x406 portrait: the crop reads a near-square
  frames = decode.read_frames(item.path, None, 100).frames
  top = next(t for t in range(720 - 408 + 1) if np.array_equal(window.frames[:3], frames[:3, t:t + 408]))
  np.testing.assert_array_equal(window.frames, frames[:, top:top + 408])
  # The rows left out are the ones the release's resize and crop do not read.
  scrambled = frames.copy()
  scrambled[:, :top] = 255 - scrambled[:, :top]
  scrambled[:, top + 408:] = 255 - scrambled[:, top + 408:]
  np.testing.assert_array_equal(numpy_preprocess.preprocess_frames(scrambled[:4]),
                                numpy_preprocess.preprocess_frames(frames[:4]))
  _check(frames, 224)


@pytest.mark.parametrize("shape, size", [((720, 1280), 224), ((64, 64), 224), ((48, 64), 64), ((64, 96), 64),
                                         ((300, 224), 224)])
def test_synthetic_clips_equal_the_numpy_path(shape, size):
  # 720p (downscale), 64 px to 224 (upscale), 48x64 to a 64-px CLIP, and two with the shorter side
  # at the CLIP's size already (torchvision leaves them unresized: only the crop).
  _check(_frames(4, *shape, seed=sum(shape)), size)


def test_one_program_per_bucket():
  encoder = extract.BatchEncoder(_model(224), 4, frames_per_item=2, devices=jax.devices()[:1])
  assert encoder.items_per_batch == 2
  a, b, c = (_frames(2, h, w, seed=h) for h, w in [(400, 700), (410, 720), (720, 1280)])
  windows = [preprocess.source_window(x) for x in (a, b, c)]
  assert windows[0].frames.shape[1:3] != windows[1].frames.shape[1:3]
  assert preprocess.bucket(windows[:1]) == preprocess.bucket(windows[1:2]) == (448, 448)
  alone = [encoder([w])()[0] for w in windows[:2]]
  together = encoder(windows[:2])()
  assert encoder.programs == 1  # two resolutions, alone and mixed in one batch: one program
  for frames, ours, mixed in zip((a, b), alone, together):
    _, reference = _reference(frames, 224)
    assert _max_relative_error(ours, reference) <= 1e-3
    np.testing.assert_allclose(mixed, ours, atol=1e-5, rtol=1e-5)  # zero padding does not leak
  encoder([windows[2]])()
  assert encoder.programs == 2  # 720p: the (768, 768) bucket


def test_pack_pads_with_zeros_and_checks_the_windows():
  window = preprocess.source_window(_frames(2, 100, 150, seed=0))
  frames, rows, cols = preprocess.pack([window], 3)
  h, w = window.frames.shape[1:3]
  assert h == 100 and 64 < w < 128  # the shorter side whole, the longer only where the crop reads
  assert frames.shape == (3, 2, 128, 128, 3) and rows.shape == cols.shape == (3, 224, 128)
  assert [preprocess.bucket_side(n) for n in (1, 64, 65, 720, 1080)] == [64, 64, 128, 768, 1088]
  np.testing.assert_array_equal(frames[0, :, :h, :w], window.frames)
  assert not frames[0, :, h:].any() and not frames[0, :, :, w:].any() and not frames[1:].any()
  assert not rows[0, :, h:].any() and not cols[0, :, w:].any() and not rows[1:].any()
  other = preprocess.source_window(_frames(3, 100, 150, seed=0))
  with pytest.raises(ValueError, match="share frame count"):
    preprocess.pack([window, other], 3)
  with pytest.raises(ValueError, match="uint8"):
    preprocess.source_window(np.zeros((1, 8, 8, 3), np.float32))
