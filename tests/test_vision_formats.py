"""Every kind of video file gives the release's frames: containers without an index, edit lists,
repeated timestamps, rotation, odd sizes.

Each synthetic video's frame i shows the number i in black and white bands, so a decoded frame says
which source frame it is. The truth is a plain front-to-back decode (every frame the decoder
shows, in order); decord, the release's decoder, is checked beside it where it is installed, and
where it is wrong the test says how (docs/vision.md has the same evidence).
"""

import struct

import av
import numpy as np
import pytest

from vtimellm_jax.video import decode, extract, sampling

WIDTH, HEIGHT, BITS, FRAMES = 128, 96, 7, 96


def numbered(i: int, width: int = WIDTH, height: int = HEIGHT) -> np.ndarray:
  """Frame i: bit b of i as band b of the left half (white = 1); the right half a grey ramp."""
  image = np.zeros((height, width, 3), np.uint8)
  for b in range(BITS):
    if (i >> b) & 1:
      image[b * height // BITS:(b + 1) * height // BITS, : width // 2] = 255
  image[:, width // 2:] = (i * 29) % 256
  return image


def number(frame: np.ndarray) -> int:
  """The frame number a decoded (upright) frame shows."""
  height, width = frame.shape[:2]
  rows = [b * height // BITS + height // (2 * BITS) for b in range(BITS)]
  return sum(1 << b for b, row in enumerate(rows) if frame[row, width // 4].mean() > 128)


def write(path, codec, container_format=None, frames=FRAMES, gop=12, b_frames=2, options=None):
  with av.open(str(path), "w", format=container_format) as out:
    stream = out.add_stream(codec, rate=25, options=options or {})
    stream.width, stream.height, stream.pix_fmt = WIDTH, HEIGHT, "yuv420p"
    stream.codec_context.gop_size = gop
    if b_frames is not None:
      stream.codec_context.max_b_frames = b_frames
    for i in range(frames):
      for packet in stream.encode(av.VideoFrame.from_ndarray(numbered(i), format="rgb24")):
        out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)


def cut_copy(source, path, first_shown: int):
  """Copies `source` from the keyframe before frame `first_shown`, hiding the frames before it with
  an edit list: what `ffmpeg -ss ... -c copy` writes."""
  with av.open(str(source)) as src, av.open(str(path), "w") as out:
    stream = src.streams.video[0]
    copy = out.add_stream_from_template(stream)
    packets = [p for p in src.demux(stream) if p.size]
    start = sorted(p.pts for p in packets)[first_shown]
    key = max(p.pts for p in packets if p.is_keyframe and p.pts <= start)
    keeping = False
    for packet in packets:
      keeping = keeping or (packet.is_keyframe and packet.pts == key)
      if keeping:
        packet.pts, packet.dts, packet.stream = packet.pts - start, packet.dts - start, copy
        out.mux(packet)


# Display matrices (16.16 fixed point, as the tkhd box stores them) that turn the picture clockwise
# by this many degrees on screen (x' = a x + c y, y' = b x + d y, y pointing down).
_MATRICES = {90: (0, 1, 0, -1, 0, 0), 180: (-1, 0, 0, 0, -1, 0), 270: (0, -1, 0, 1, 0, 0)}


def rotate_tag(source, path, degrees: int):
  """Copies an mp4 with its track's display matrix set to turn it (a phone's portrait video)."""
  data = bytearray(source.read_bytes())
  at = data.find(b"tkhd")
  version = data[at + 4]
  # version/flags, creation/modification times, track id, reserved, duration, reserved, layer,
  # alternate group, volume, reserved: then the 3x3 matrix.
  offset = at + 4 + 4 + (32 if version == 1 else 20) + 8 + 8
  a, b, u, c, d, v = _MATRICES[degrees]
  matrix = (a << 16, b << 16, u, c << 16, d << 16, v, 0, 0, 1 << 30)
  data[offset:offset + 36] = struct.pack(">9i", *matrix)
  path.write_bytes(bytes(data))


def truth(path) -> list[int]:
  """The frame numbers a plain front-to-back decode shows, in order."""
  with av.open(str(path)) as container:
    return [number(f.to_ndarray(format="rgb24")) for f in container.decode(container.streams.video[0])]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  folder = tmp_path_factory.mktemp("formats")
  write(folder / "h264.mp4", "libx264")
  write(folder / "mpeg2.mpg", "mpeg2video", "mpeg")
  write(folder / "mpeg1.mpg", "mpeg1video", "mpeg")
  write(folder / "mpeg1_120.mpg", "mpeg1video", "mpeg", frames=120)  # its last two packets share one timestamp
  write(folder / "mpeg2.ts", "mpeg2video", "mpegts")
  write(folder / "h264.ts", "libx264", "mpegts")
  write(folder / "bframes.avi", "mpeg4", "avi")
  write(folder / "h264.avi", "libx264", "avi")  # AVI stores no presentation times: H.264's B-frames lose theirs
  write(folder / "opengop.mp4", "libx264", b_frames=3,
        options={"x264-params": "open-gop=1:keyint=12:min-keyint=12:scenecut=0"})
  cut_copy(folder / "h264.mp4", folder / "cut.mp4", first_shown=30)
  for degrees in _MATRICES:
    rotate_tag(folder / "h264.mp4", folder / f"rot{degrees}.mp4", degrees)
  return folder


@pytest.mark.parametrize("name, front_to_back", [
    ("h264.mp4", None),
    ("opengop.mp4", None),
    ("mpeg2.mpg", "no frame index"),
    ("mpeg1.mpg", "no frame index"),
    ("mpeg2.ts", "no frame index"),
    ("h264.ts", "no frame index"),
    ("bframes.avi", None),  # its index is in decode time: seeks by presentation time land past
    ("h264.avi", "timestamps are in decode order and the stream has B-frames"),
])
@pytest.mark.parametrize("split", [None, [0.5, 2.9]])
def test_sampled_frames_are_the_decoders_frames(corpus, name, front_to_back, split):
  path = corpus / name
  shown = truth(path)
  assert shown == list(range(FRAMES))  # the encoder kept every frame, in order
  sampled = decode.read_frames(path, split)
  np.testing.assert_array_equal(sampled.indices, sampling.frame_indices(FRAMES, 25.0, split))
  assert [number(f) for f in sampled.frames] == [shown[i] for i in sampled.indices]
  if front_to_back is None:
    assert sampled.front_to_back is None
  else:
    assert front_to_back in sampled.front_to_back


def test_seeks_that_land_past_their_frame_fall_back_to_front_to_back(corpus, monkeypatch):
  """With only the presentation-time seek allowed, the AVI's seeks land past their frames; the
  frames then come from a front-to-back decode, and say so."""
  path = corpus / "bframes.avi"
  monkeypatch.setattr(decode, "_SEEK_TRIES", 1)
  sampled = decode.read_frames(path)
  assert "landed past" in sampled.front_to_back
  assert [number(f) for f in sampled.frames] == sampling.frame_indices(FRAMES, 25.0).tolist()


def test_repeated_timestamps_are_read_not_refused(corpus):
  path = corpus / "mpeg1_120.mpg"
  with av.open(str(path)) as container:
    pts = [p.pts for p in container.demux(container.streams.video[0]) if p.size]
  assert len(set(pts)) < len(pts)  # the case under test is there
  assert decode.probe(path).total_frames == 120
  sampled = decode.read_frames(path)
  assert [number(f) for f in sampled.frames] == sampling.frame_indices(120, 25.0).tolist()


def test_frames_an_edit_list_hides_are_not_frames(corpus):
  path = corpus / "cut.mp4"
  shown = truth(path)
  assert shown == list(range(30, FRAMES))
  index = decode.probe(path)
  assert index.total_frames == FRAMES - 30 and index.front_to_back is None
  sampled = decode.read_frames(path)
  assert [number(f) for f in sampled.frames] == [shown[i] for i in sampling.frame_indices(FRAMES - 30, 25.0)]


@pytest.mark.parametrize("degrees", sorted(_MATRICES))
def test_display_rotation_is_applied(corpus, degrees):
  upright = decode.read_frames(corpus / "h264.mp4").frames
  turned = decode.read_frames(corpus / f"rot{degrees}.mp4").frames
  np.testing.assert_array_equal(turned, np.rot90(upright, -degrees // 90, axes=(1, 2)))  # rot90 turns anticlockwise


@pytest.mark.parametrize("name", ["h264.mp4", "opengop.mp4", "mpeg2.mpg", "mpeg1.mpg", "bframes.avi",
                                  "rot90.mp4", "rot180.mp4", "rot270.mp4"])
def test_same_frames_as_decord(corpus, name):
  decord = pytest.importorskip("decord")
  path = corpus / name
  reader = decord.VideoReader(str(path))
  index = decode.probe(path)
  assert index.total_frames == len(reader)
  sampled = decode.read_frames(path)
  np.testing.assert_array_equal(sampled.frames, reader.get_batch(sampled.indices).asnumpy())


def test_where_decord_is_wrong(corpus):
  """decord's frames of MPEG-TS files, of open-GOP H.264 read from mid-video and of H.264 in AVI are
  other frames than the index asked for, and it counts the packets an edit list hides as frames: the release's
  features of such files came from other frames than its rule names. We give the true ones."""
  decord = pytest.importorskip("decord")
  for name in ("mpeg2.ts", "h264.ts"):
    reader = decord.VideoReader(str(corpus / name))
    got = [number(f) for f in reader.get_batch(list(range(0, FRAMES, 12))).asnumpy()]
    assert got != list(range(0, FRAMES, 12)), name
  assert len(decord.VideoReader(str(corpus / "cut.mp4"))) > FRAMES - 30
  # Open-GOP H.264 (frames after a keyframe predicted from the GOP before it): decord's frames of a
  # split that starts mid-video are other frames.
  ours = decode.read_frames(corpus / "opengop.mp4", [0.5, 2.9])
  theirs = decord.VideoReader(str(corpus / "opengop.mp4")).get_batch(ours.indices).asnumpy()
  assert [number(f) for f in ours.frames] == ours.indices.tolist()
  assert sum(number(f) != i for f, i in zip(theirs, ours.indices.tolist())) > 0
  # H.264 in AVI with B-frames: read in order decord's frames are right; read sparsely (it seeks),
  # most are other frames.
  reader = decord.VideoReader(str(corpus / "h264.avi"))
  assert [number(reader[i].asnumpy()) for i in range(len(reader))] == list(range(FRAMES))
  sparse = list(range(0, FRAMES, 7))
  assert sum(number(f) != i for f, i in zip(reader.get_batch(sparse).asnumpy(), sparse)) > len(sparse) // 2
  ours = decode.read_frames(corpus / "h264.avi", [0.5, 2.9])
  assert [number(f) for f in ours.frames] == ours.indices.tolist()


class _ZeroEncoder:
  """Stands in for the CLIP encoder: extraction's logging is under test, not features."""

  output_dim, image_size, frames_per_item, items_per_batch = 4, 224, sampling.NUM_FRAMES, 2

  def __call__(self, windows):
    return lambda: np.zeros((len(windows), self.frames_per_item, self.output_dim), np.float32)


def test_extraction_logs_front_to_back_decodes(corpus, tmp_path, capsys):
  from etils import epath  # pylint: disable=g-import-not-at-top

  items = [extract.Item(name.split(".")[0] + name.split(".")[1], corpus / name)
           for name in ("h264.mp4", "mpeg2.ts", "cut.mp4")]
  summary = extract.extract(items, [], epath.Path(tmp_path), _ZeroEncoder(), images=False, progress=False)
  err = capsys.readouterr().err
  assert summary.done == 3 and summary.failed == 0 and summary.front_to_back == 1
  assert err.count("decoded front to back") == 1 and f"{corpus / 'mpeg2.ts'}: decoded front to back" in err
  assert "mpegts" in err


def test_one_list_of_video_extensions(corpus, tmp_path):
  """`extract-features` lists, and `chat` / `eval --videos` / `serve` find, the same extensions."""
  from vtimellm_jax.inference import features  # pylint: disable=g-import-not-at-top

  for ext in decode.VIDEO_EXTENSIONS:
    (tmp_path / f"v{ext.lstrip('.')}{ext}").write_bytes(b"")
  items, _ = extract.list_inputs(tmp_path, images=False)
  assert sorted(item.path.suffix for item in items) == sorted(decode.VIDEO_EXTENSIONS)
  source = features.FeatureSource(None, str(tmp_path), "tiny-random", 768)
  for ext in decode.VIDEO_EXTENSIONS:
    assert source.locate(f"v{ext.lstrip('.')}") == tmp_path / f"v{ext.lstrip('.')}{ext}"
  assert decode.VIDEO_EXTENSIONS[:3] == (".mp4", ".mkv", ".webm")  # the release's eval.py's order
