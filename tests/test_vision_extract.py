"""`extract-features` end to end: good and broken videos, resume, splits, images mode, gs:// output."""

import contextlib
import functools
import json

import av
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from etils.epath import testing as epath_testing
from flax import nnx
from PIL import Image

import numpy_preprocess
from vtimellm_jax import cli
from vtimellm_jax.models import clip as clip_model, load
from vtimellm_jax.video import preprocess


def _write_video(path, frames, width, height, fps=24):
  container = av.open(str(path), "w")
  stream = container.add_stream("libx264", rate=fps)
  stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
  stream.codec_context.gop_size = 8
  rng = np.random.default_rng(frames * width)
  for i in range(frames):
    image = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
      container.mux(packet)
  for packet in stream.encode():
    container.mux(packet)
  container.close()


def _reference_features(path, split=None):
  """The tiny-random CLIP's features, from a plain front-to-back decode and the release's index rule."""
  with av.open(str(path)) as container:
    stream = container.streams.video[0]
    fps = float(stream.average_rate)
    frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
  start, end = 0, len(frames) - 1
  if split is not None:
    start, end = max(int(fps * split[0]), 0), min(int(fps * split[1]), len(frames) - 1)
  pixels = numpy_preprocess.preprocess_frames(frames[np.linspace(start, end, 100, dtype=np.int32)])
  return _tiny_random_encode(pixels)


@functools.cache
def _tiny_random_model():
  return load.random_clip(clip_model.tiny(), seed=0)


@nnx.jit
def _encode(model, pixels):
  return model.encode_image(pixels)


def _tiny_random_encode(pixels):
  return np.asarray(_encode(_tiny_random_model(), jnp.asarray(pixels)))


def _extract(videos, out, *extra):
  return cli.main(["extract-features", "--videos", str(videos), "--clip", "tiny-random", "--out", str(out),
                   "--batch-size", "200", "--workers", "2", "--no-progress", *extra])


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("videos")
  _write_video(root / "alpha.mp4", 40, 32, 32)
  _write_video(root / "beta.mp4", 130, 48, 32)
  (root / "nested").mkdir()
  _write_video(root / "nested" / "gamma.mkv", 25, 32, 48)
  good = (root / "beta.mp4").read_bytes()
  (root / "truncated.mp4").write_bytes(good[: len(good) // 2])
  (root / "garbage.mp4").write_bytes(b"\x00\x01 not a video " * 50)
  (root / "notes.json").write_text("{}")  # not a video extension: not an input
  return root


def test_good_videos_extracted_bad_ones_listed(video_dir, tmp_path, capsys):
  out = tmp_path / "feat"
  assert _extract(video_dir, out) == 1
  assert "2 input(s) failed" in capsys.readouterr().err
  failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
  assert sorted(f["id"] for f in failures) == ["garbage", "truncated"]
  assert all(f["reason"] for f in failures)
  assert sorted(p.name for p in out.glob("*.npy")) == ["alpha.npy", "beta.npy", "gamma.npy"]
  for name, path in [("alpha", video_dir / "alpha.mp4"), ("beta", video_dir / "beta.mp4"),
                     ("gamma", video_dir / "nested" / "gamma.mkv")]:
    features = np.load(out / f"{name}.npy")
    assert features.shape == (100, 768) and features.dtype == np.float16
    np.testing.assert_allclose(features.astype(np.float32), _reference_features(path), atol=5e-3, rtol=5e-3)
  assert not list(out.glob(".*tmp"))


def test_resume_skips_finished_ids(video_dir, tmp_path, capsys):
  out = tmp_path / "feat"
  _extract(video_dir, out)
  (out / "alpha.npy").unlink()
  kept = {name: (out / name).stat().st_mtime_ns for name in ("beta.npy", "gamma.npy")}
  assert _extract(video_dir, out) == 1
  assert "1 extracted, 2 already done, 2 failed" in capsys.readouterr().err
  assert (out / "alpha.npy").exists()
  assert {name: (out / name).stat().st_mtime_ns for name in kept} == kept


def test_resume_replaces_unreadable_or_wrong_shaped_outputs(video_dir, tmp_path, capsys):
  out = tmp_path / "feat"
  _extract(video_dir, out)
  whole = np.load(out / "alpha.npy")
  (out / "alpha.npy").write_bytes((out / "alpha.npy").read_bytes()[:1000])  # cut short (a full disk)
  np.save(out / "beta.npy", np.zeros((100, 512), np.float16))  # another model's features
  kept = (out / "gamma.npy").stat().st_mtime_ns
  assert _extract(video_dir, out) == 1
  assert "2 extracted (2 replacing unreadable or wrong-shaped files), 1 already done" in capsys.readouterr().err
  np.testing.assert_array_equal(np.load(out / "alpha.npy"), whole)
  assert np.load(out / "beta.npy").shape == (100, 768)
  assert (out / "gamma.npy").stat().st_mtime_ns == kept


@contextlib.contextmanager
def _fake_bucket(root):
  """Serves gs:// paths from `root` through etils.epath's backend, as gcsfs would, with no rename.

  Only epath's own operations reach the fake bucket: a builtin open() or os.replace() of a gs://
  path fails, as it would on a real one; and a bucket has no atomic rename, so none is offered.
  """
  local = lambda path: str(path).replace("gs://", f"{root}/", 1)  # noqa: E731
  redirect = lambda fn, path, *args, **kwargs: fn(local(path), *args, **kwargs)  # noqa: E731

  def no_rename(fn, path, dst, *args, **kwargs):
    del fn, args, kwargs
    raise AssertionError(f"renamed {path} to {dst} on a bucket")

  with epath_testing.mock_epath(open=redirect, exists=redirect, isdir=redirect, listdir=redirect, glob=redirect,
                                makedirs=redirect, mkdir=redirect, remove=redirect, rmtree=redirect, stat=redirect,
                                walk=redirect, rename=no_rename, replace=no_rename):
    yield


def test_output_on_a_bucket_equals_local_output_and_resumes(video_dir, tmp_path, capsys):
  local = tmp_path / "local"
  assert _extract(video_dir, local) == 1
  capsys.readouterr()
  with _fake_bucket(tmp_path / "fake"):
    assert _extract(video_dir, "gs://bucket/feat") == 1
    bucket = tmp_path / "fake" / "bucket" / "feat"
    assert sorted(p.name for p in bucket.iterdir()) == ["alpha.npy", "beta.npy", "failures.jsonl", "gamma.npy"]
    for name in ("alpha", "beta", "gamma"):
      np.testing.assert_array_equal(np.load(bucket / f"{name}.npy"), np.load(local / f"{name}.npy"))
    assert (bucket / "failures.jsonl").read_text() == (local / "failures.jsonl").read_text()
    assert "-> gs://bucket/feat" in capsys.readouterr().err
    # Resuming reads each finished file's header and size from the bucket.
    (bucket / "beta.npy").write_bytes((bucket / "beta.npy").read_bytes()[:500])
    assert _extract(video_dir, "gs://bucket/feat") == 1
    assert "1 extracted (1 replacing unreadable or wrong-shaped files), 2 already done" in capsys.readouterr().err
    np.testing.assert_array_equal(np.load(bucket / "beta.npy"), np.load(local / "beta.npy"))
    assert epath.Path("gs://bucket/feat/alpha.npy").exists()


def test_list_file_and_splits(video_dir, tmp_path):
  (video_dir / "list.txt").write_text("beta.mp4\n\n# a comment\nnested/gamma.mkv\n")
  (tmp_path / "splits.json").write_text(json.dumps([{"id": "beta", "meta": {"split": [1.0, 3.5]}}, {"id": "gamma"}]))
  out = tmp_path / "feat"
  assert _extract(video_dir / "list.txt", out, "--splits", str(tmp_path / "splits.json")) == 0
  assert (out / "failures.jsonl").read_text() == ""
  np.testing.assert_allclose(np.load(out / "beta.npy").astype(np.float32),
                             _reference_features(video_dir / "beta.mp4", [1.0, 3.5]), atol=5e-3, rtol=5e-3)
  np.testing.assert_allclose(np.load(out / "gamma.npy").astype(np.float32),
                             _reference_features(video_dir / "nested" / "gamma.mkv"), atol=5e-3, rtol=5e-3)


def test_data_file_selects_its_ids_and_splits(video_dir, tmp_path, capsys):
  records = [{"id": "beta", "meta": {"split": [1.0, 3.5]}}, {"id": "gamma"}, {"id": "delta"}, {"id": "beta"}]
  (tmp_path / "stage2.json").write_text(json.dumps(records))
  out = tmp_path / "feat"
  assert _extract(video_dir, out, "--data", str(tmp_path / "stage2.json")) == 1  # delta has no video
  assert sorted(p.name for p in out.glob("*.npy")) == ["beta.npy", "gamma.npy"]  # not alpha, nor the broken ones
  failures = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
  assert [(f["id"], "no input has this id" in f["reason"]) for f in failures] == [("delta", True)]
  np.testing.assert_allclose(np.load(out / "beta.npy").astype(np.float32),
                             _reference_features(video_dir / "beta.mp4", [1.0, 3.5]), atol=5e-3, rtol=5e-3)
  capsys.readouterr()
  assert _extract(video_dir, out, "--data", str(tmp_path / "stage2.json"), "--splits", str(tmp_path / "stage2.json")) == 2
  assert "not with --splits" in capsys.readouterr().err


@pytest.mark.parametrize("limit,reason", [(("--max-video-gb", "0.0002"), "above the limit of"),
                                          (("--time-limit", "1e-9"), "past the time limit")])
def test_videos_over_the_memory_or_time_limit_are_failures(video_dir, tmp_path, limit, reason):
  # alpha: 100 frames of 32x32 take 0.29 MiB decoded, above 0.0002 GiB (0.2 MiB); beta and gamma too.
  out = tmp_path / "feat"
  assert _extract(video_dir / "alpha.mp4", out, *limit) == 1
  [failure] = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
  assert failure["id"] == "alpha" and reason in failure["reason"] and not (out / "alpha.npy").exists()
  assert _extract(video_dir / "alpha.mp4", out, "--max-video-gb", "0.001") == 0  # 1 MiB is enough


def test_images_mode(tmp_path):
  images = tmp_path / "images"
  images.mkdir()
  rng = np.random.default_rng(0)
  for name, size in [("a.png", (300, 200)), ("b.jpg", (224, 224))]:
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(images / name)
  (images / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
  out = tmp_path / "feat"
  assert _extract(images, out, "--images") == 1
  assert [json.loads(line)["id"] for line in (out / "failures.jsonl").read_text().splitlines()] == ["broken"]
  for name in ("a.png", "b.jpg"):
    # OpenAI CLIP's image preprocess: PIL bicubic resize (shorter side 224), center crop, normalise.
    with Image.open(images / name) as image:
      w, h = image.size
      scale = 224 / min(w, h)
      image = image.convert("RGB").resize((max(224, int(w * scale)), max(224, int(h * scale))), Image.BICUBIC)
    arr = np.asarray(image, np.float32) / 255
    top, left = int(round((arr.shape[0] - 224) / 2)), int(round((arr.shape[1] - 224) / 2))
    pixels = (arr[top:top + 224, left:left + 224] - preprocess.MEAN) / preprocess.STD
    expected = _tiny_random_encode(pixels[None])[0]
    features = np.load(out / name.replace(".png", ".npy").replace(".jpg", ".npy"))
    assert features.shape == (768,) and features.dtype == np.float16
    np.testing.assert_allclose(features.astype(np.float32), expected, atol=5e-3, rtol=5e-3)


def test_bad_arguments_are_user_errors(tmp_path, capsys):
  assert _extract(tmp_path / "missing", tmp_path / "out") == 2
  assert "no such file or directory" in capsys.readouterr().err
  (tmp_path / "empty").mkdir()
  assert _extract(tmp_path / "empty", tmp_path / "out") == 2
  assert "no video files found" in capsys.readouterr().err


@pytest.mark.slow
def test_a_clip_directory_sets_the_input_size(video_dir, tmp_path):
  # A small CLIP (here 32 px) gets frames preprocessed to its own size, not the release's 224.
  import dataclasses

  from vtimellm_jax import model_io

  cfg = dataclasses.replace(clip_model.tiny(), image_size=32, patch_size=8)
  params = clip_model.random_params(cfg, seed=3)
  model_io.save_model_dir(tmp_path / "clip32", kind="clip", config=dataclasses.asdict(cfg),
                          params=clip_model.nest(params))
  out = tmp_path / "feat"
  code = cli.main(["extract-features", "--videos", str(video_dir / "alpha.mp4"), "--clip", str(tmp_path / "clip32"),
                   "--out", str(out), "--workers", "1", "--no-progress"])
  assert code == 0
  with av.open(str(video_dir / "alpha.mp4")) as container:
    frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])
  pixels = numpy_preprocess.preprocess_frames(frames[np.linspace(0, len(frames) - 1, 100, dtype=np.int32)], 32)
  expected = np.asarray(_encode(load.random_clip(cfg, seed=3), jnp.asarray(pixels)))
  np.testing.assert_allclose(np.load(out / "alpha.npy").astype(np.float32), expected, atol=5e-3, rtol=5e-3)


def test_tiny_random_64_is_the_tiny_clip_at_64_px(video_dir, tmp_path):
  # For the synthetic corpus's 64-px videos: read at their own size (no 224-px upsampling).
  out = tmp_path / "feat"
  assert cli.main(["extract-features", "--videos", str(video_dir / "alpha.mp4"), "--clip", "tiny-random-64",
                   "--seed", "2", "--out", str(out), "--workers", "1", "--no-progress"]) == 0
  with av.open(str(video_dir / "alpha.mp4")) as container:
    frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(container.streams.video[0])])
  pixels = numpy_preprocess.preprocess_frames(frames[np.linspace(0, len(frames) - 1, 100, dtype=np.int32)], 64)
  expected = np.asarray(_encode(load.random_clip(clip_model.tiny(64, 8), seed=2), jnp.asarray(pixels)))
  np.testing.assert_allclose(np.load(out / "alpha.npy").astype(np.float32), expected, atol=5e-3, rtol=5e-3)


def test_shards_split_the_sorted_inputs(video_dir, tmp_path, capsys):
  # All inputs sorted by id: alpha beta gamma garbage truncated; shard i of 2 takes positions i, i + 2, ...
  out = tmp_path / "feat"
  assert _extract(video_dir, out, "--shard", "0/2") == 1
  assert "of 3 input(s) of shard 0/2" in capsys.readouterr().err
  assert sorted(p.name for p in out.glob("*.npy")) == ["alpha.npy", "gamma.npy"]
  assert _extract(video_dir, out, "--shard", "1/2") == 1
  assert f"reasons in {out / 'failures.1-of-2.jsonl'}" in capsys.readouterr().err
  assert sorted(p.name for p in out.glob("*.npy")) == ["alpha.npy", "beta.npy", "gamma.npy"]
  ids = lambda name: [json.loads(line)["id"] for line in (out / name).read_text().splitlines()]  # noqa: E731
  assert ids("failures.0-of-2.jsonl") == ["truncated"] and ids("failures.1-of-2.jsonl") == ["garbage"]
  assert not (out / "failures.jsonl").exists()
  np.testing.assert_allclose(np.load(out / "beta.npy").astype(np.float32),
                             _reference_features(video_dir / "beta.mp4"), atol=5e-3, rtol=5e-3)
  for bad in ("2/2", "1", "a/b", "0/0"):
    with pytest.raises(SystemExit) as exit_info:
      _extract(video_dir, out, "--shard", bad)
    assert exit_info.value.code == 2 and "argument --shard: expected i/n" in capsys.readouterr().err
