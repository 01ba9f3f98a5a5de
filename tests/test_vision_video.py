"""Frame sampling, seeking decode and pixel preprocessing against the release's rules and torch."""

import json
import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vtimellm_jax.errors import UserError
from vtimellm_jax.video import decode, preprocess, sampling

MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


def make_video(path, frames=90, width=64, height=48, fps=25, gop=6, b_frames=2):
  """Writes an H.264 mp4 whose frame i is identifiable by its intensity; keyframes every `gop`."""
  container = av.open(str(path), "w")
  stream = container.add_stream("libx264", rate=fps)
  stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
  stream.codec_context.gop_size = gop
  stream.codec_context.max_b_frames = b_frames
  rng = np.random.default_rng(frames)
  for i in range(frames):
    image = np.full((height, width, 3), (i * 37) % 256, np.uint8)
    image[: height // 2, : width // 2] = rng.integers(0, 256, 3, dtype=np.uint8)
    for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
      container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()


def full_decode(path):
  """Every frame, decoded front to back without seeking (the independent reference)."""
  with av.open(str(path)) as container:
    stream = container.streams.video[0]
    return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)]), float(stream.average_rate)


def torch_reference(frames_uint8: np.ndarray) -> np.ndarray:
  """torchvision's tensor Resize(224, BICUBIC, antialias=False), CenterCrop(224), Normalize, as torch ops.

  torchvision does not import beside this CPU torch; its tensor resize is this interpolate call.
  """
  x = torch.from_numpy(frames_uint8).permute(0, 3, 1, 2).float() / 255.0
  h, w = x.shape[-2:]
  short, long = min(h, w), max(h, w)
  new_short, new_long = 224, int(224 * long / short)
  size = (new_long, new_short) if w <= h else (new_short, new_long)
  if size != (h, w):
    x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=False)
  top, left = int(round((size[0] - 224) / 2.0)), int(round((size[1] - 224) / 2.0))
  x = x[..., top:top + 224, left:left + 224]
  x = (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
  return x.permute(0, 2, 3, 1).numpy()


def release_indices(total, fps, split=None, n=100):
  start, end = 0, total - 1
  if split is not None:
    start, end = max(int(fps * split[0]), 0), min(int(fps * split[1]), total - 1)
  return np.linspace(start, end, n, dtype=np.int32)


@pytest.fixture(scope="module")
def demo(official_fixtures):
  path = official_fixtures / "demo.mp4"
  frames, fps = full_decode(path)
  return path, frames, fps


@pytest.mark.parametrize("split", [None, [3.3, 7.9], [0.0, 100.0], [14.0, 14.9]])
def test_demo_indices_and_frames_follow_the_release_rule(demo, split):
  path, all_frames, fps = demo
  sampled = decode.read_frames(path, split)
  frames, indices = sampled.frames, sampled.indices
  expected = release_indices(len(all_frames), fps, split)
  np.testing.assert_array_equal(indices, expected)
  np.testing.assert_array_equal(frames, all_frames[expected])


def test_demo_matches_decord_when_available(demo):
  decord = pytest.importorskip("decord")
  path, _, _ = demo
  reader = decord.VideoReader(str(path))
  index = decode.probe(path)
  assert index.total_frames == len(reader) and index.fps == pytest.approx(reader.get_avg_fps())
  sampled = decode.read_frames(path, [2.0, 9.5])
  frames, indices = sampled.frames, sampled.indices
  np.testing.assert_array_equal(frames, reader.get_batch(indices).asnumpy())


def test_demo_pixels_match_torchvision_resize(demo):
  path, _, _ = demo
  frames = decode.read_frames(path).frames
  ours = preprocess.to_pixels(frames)
  reference = torch_reference(frames)
  assert ours.shape == (100, 224, 224, 3) and ours.dtype == np.float32
  # Within 1/255 in [0, 1] pixel units (the bar); in practice float rounding only.
  np.testing.assert_allclose(ours * np.float32(STD), reference * np.float32(STD), atol=1 / 255, rtol=0)
  np.testing.assert_allclose(ours, reference, atol=1e-3, rtol=0)


def test_overshoot_is_not_clamped():
  # Sharp black/white edges: the bicubic kernel's negative lobes overshoot [0, 1], and the
  # release's float pipeline keeps those values.
  frames = np.zeros((1, 40, 60, 3), np.uint8)
  frames[:, :, 30:] = 255
  pixels = preprocess.to_pixels(frames) * np.float32(STD) + np.float32(MEAN)
  assert pixels.max() > 1.01 and pixels.min() < -0.01


@pytest.mark.parametrize("shape", [(48, 64), (64, 48), (224, 300), (300, 224), (500, 500), (31, 47), (720, 406), (1080, 1920)])
def test_preprocess_matches_torch_on_shapes(shape):
  frames = np.random.default_rng(sum(shape)).integers(0, 256, (2, *shape, 3), dtype=np.uint8)
  # Random noise is the worst case (steep gradients everywhere): PyTorch's float32 source
  # coordinates round differently (e.g. fused multiply-add) by ~1 ulp, ~3e-5 of a grey level here.
  np.testing.assert_allclose(preprocess.to_pixels(frames), torch_reference(frames), atol=5e-4, rtol=0)


def test_sampling_rule_matches_numpy_linspace():
  rng = np.random.default_rng(0)
  for _ in range(300):
    total = int(rng.integers(1, 5000))
    fps = float(rng.choice([23.976, 25.0, 29.97, 30.0, 59.94, 12.5]))
    s = float(rng.uniform(0, total / fps))
    split = None if rng.random() < 0.3 else [s, float(s + rng.uniform(0, 30))]
    if split is not None and int(fps * split[0]) > total - 1:
      with pytest.raises(sampling.SamplingError):
        sampling.frame_indices(total, fps, split)
      continue
    got = sampling.frame_indices(total, fps, split)
    np.testing.assert_array_equal(got, release_indices(total, fps, split))
    assert got.dtype == np.int32 and len(got) == 100


@pytest.mark.parametrize("split", [None, [0.5, 1.2], [2.9, 3.6], [0.0, 0.4]])
def test_seeking_decode_equals_full_decode(tmp_path, split):
  path = tmp_path / "gop.mp4"
  make_video(path, frames=90, gop=6, b_frames=2)
  all_frames, fps = full_decode(path)
  sampled = decode.read_frames(path, split, num_frames=17)
  frames, indices = sampled.frames, sampled.indices
  expected = release_indices(len(all_frames), fps, split, n=17)
  np.testing.assert_array_equal(indices, expected)
  np.testing.assert_array_equal(frames, all_frames[expected])


def test_frames_nothing_needs_are_not_decoded(tmp_path, monkeypatch):
  """Sparse samples of a video with B-frames: the unwanted non-reference frames are dropped by the
  decoder (fewer frames come out than a full decode gives), the sampled ones are the same pixels."""
  # One keyframe (no seek skips anything) and smooth motion, so the encoder makes most frames B-frames.
  path = tmp_path / "bframes.mp4"
  container = av.open(str(path), "w")
  stream = container.add_stream("libx264", rate=25)
  stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
  stream.codec_context.gop_size, stream.codec_context.max_b_frames = 120, 3
  base = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
  for i in range(120):
    for packet in stream.encode(av.VideoFrame.from_ndarray(np.roll(base, i, axis=1), format="rgb24")):
      container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()
  all_frames, fps = full_decode(path)
  decoded = []
  frames_of = decode._frames  # pylint: disable=protected-access

  def counting(*args):
    for frame in frames_of(*args):
      decoded.append(frame.pts)
      yield frame

  monkeypatch.setattr(decode, "_frames", counting)
  frames = decode.read_frames(path, None, num_frames=30, threads=1).frames
  np.testing.assert_array_equal(frames, all_frames[release_indices(len(all_frames), fps, None, n=30)])
  # Decoding everything up to the last sample would give ~120 frames.
  assert len(decoded) < 0.75 * len(all_frames), (len(decoded), len(all_frames))


def test_broken_inputs_raise_decode_errors(tmp_path):
  good = tmp_path / "good.mp4"
  make_video(good, frames=30)
  truncated = tmp_path / "truncated.mp4"
  truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
  text = tmp_path / "text.mp4"
  text.write_text("not a video")
  for path in (truncated, text, tmp_path / "absent.mp4"):
    with pytest.raises(decode.DecodeError) as error:
      decode.read_frames(path)
    assert path.name not in str(error.value)  # the caller names the file, once
  with pytest.raises(decode.DecodeError, match="outside the video"):
    decode.read_frames(good, [100.0, 200.0])


def test_load_splits_forms(tmp_path):
  (tmp_path / "a.json").write_text('{"v1": [1, 2.5]}')
  assert sampling.load_splits(tmp_path / "a.json") == {"v1": (1.0, 2.5)}
  (tmp_path / "b.json").write_text('[{"id": "v1", "meta": {"split": [129.8, 184.0]}}, {"id": "v2"}]')
  assert sampling.load_splits(tmp_path / "b.json") == {"v1": (129.8, 184.0)}
  (tmp_path / "c.json").write_text('{"v1": [3, 1]}')
  with pytest.raises(UserError, match="v1"):
    sampling.load_splits(tmp_path / "c.json")


def test_load_data_file_parses_once_for_ids_and_splits(tmp_path, monkeypatch):
  records = [{"id": "b", "meta": {"split": [1, 2]}}, {"id": "a"}, {"id": "b", "meta": {"split": [1, 2]}}, {"id": 7}]
  (tmp_path / "d.json").write_text(json.dumps(records))
  reads = []
  read = sampling._read_json  # pylint: disable=protected-access
  monkeypatch.setattr(sampling, "_read_json", lambda path: reads.append(path) or read(path))
  assert sampling.load_data_file(tmp_path / "d.json") == (["b", "a", "7"], {"b": (1.0, 2.0)})
  assert len(reads) == 1
  (tmp_path / "e.json").write_text(json.dumps([{"id": "a"}, ["not", "a", "record"]]))
  with pytest.raises(UserError, match="e.json, record 1: expected an object with an 'id'"):
    sampling.load_data_file(tmp_path / "e.json")
  with pytest.raises(UserError, match="expected a stage-2/3 data file"):
    (tmp_path / "f.json").write_text('{"a": [1, 2]}')
    sampling.load_data_file(tmp_path / "f.json")
