"""`chat --video` and `eval --videos`: features computed from real mp4s must equal `extract-features`' files.

The references are the `.npy` files `extract-features` writes for the same videos with the same CLIP
model directory: answering from a video must give the same tokens as answering from its stored
features, and those tokens are checked once more against HF `generate` on the stored values.
"""

import dataclasses
import json
import shutil

import numpy as np
import pytest

from inference_fixtures import SYSTEM, tiny_vtimellm  # noqa: F401
from vtimellm_jax import cli, model_io
from vtimellm_jax.data import tokenizer as tokenizer_lib
from vtimellm_jax.data_pipelines.synthetic.render import write_mp4
from vtimellm_jax.models import clip as clip_model

FPS, FRAMES, SIZE = 8, 24, 32  # 3-second videos: decoding and the tiny CLIP stay fast
DURATION = FRAMES / FPS
QUERY = "During which frames can we see a man walks?"
GARBAGE = b"\x00\x01 not a video " * 50


def _run(argv, capsys):
  code = cli.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


def _v1(question):
  """Returns the one-round Vicuna v1 prompt of a first question (the release's conversation format)."""
  return SYSTEM + " USER: <video>\n" + question + " ASSISTANT:"


def _frames(seed):
  """uint8[FRAMES, SIZE, SIZE, 3]: 8x8-pixel random blocks, so CLIP sees different content per video."""
  rng = np.random.default_rng(seed)
  blocks = rng.integers(0, 256, (FRAMES, SIZE // 8, SIZE // 8, 3), dtype=np.uint8)
  return blocks.repeat(8, 1).repeat(8, 2)


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
  root = tmp_path_factory.mktemp("videos")
  for seed, video_id in enumerate(("v1", "v2"), start=1):
    write_mp4(root / f"{video_id}.mp4", _frames(seed), FPS)
  return root


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
  """A tiny CLIP model directory, written as `convert clip` writes one.

  Not `--clip tiny-random` itself: its features are large (norm ~27 per frame, mostly a part common
  to every image) and swamp the tiny LLM's prompt, so it gives the same answer for any video. A 10x
  smaller projection brings them near the scale of the other inference tests' random features,
  where the answers depend on the frames, so a wrong feature path can fail these tests.
  """
  cfg = clip_model.tiny()
  params = clip_model.random_params(cfg, seed=0)
  params["visual_projection/kernel"] *= 0.1
  folder = tmp_path_factory.mktemp("clip")
  model_io.save_model_dir(folder, kind="clip", config=dataclasses.asdict(cfg), params=clip_model.nest(params))
  return folder


@pytest.fixture(scope="module")
def extracted(videos, clip_dir, tmp_path_factory):
  """The folder of `{id}.npy` that `extract-features` writes for `videos` with `clip_dir`."""
  out = tmp_path_factory.mktemp("feat")
  code = cli.main(["extract-features", "--videos", str(videos), "--clip", str(clip_dir), "--out", str(out),
                   "--workers", "1", "--no-progress"])
  assert code == 0 and sorted(p.name for p in out.glob("*.npy")) == ["v1.npy", "v2.npy"]
  return out


def _chat(tiny, capsys, *source):
  return _run(["chat", "--model", tiny.model_dir, *source, "--query", QUERY, "--temperature", "0",
               "--max-new-tokens", "6", "--json"], capsys)


@pytest.mark.slow
def test_chat_video_equals_chat_on_extracted_features(tiny_vtimellm, videos, clip_dir, extracted, capsys):
  code, out, err = _chat(tiny_vtimellm, capsys, "--video", videos / "v1.mp4", "--clip", clip_dir)
  assert code == 0, err
  from_video = json.loads(out)
  # The stored file, with the duration `--video` measures (24 frames at 8 fps).
  code, out, err = _chat(tiny_vtimellm, capsys, "--features", extracted / "v1.npy", "--duration", DURATION)
  assert code == 0, err
  assert from_video == json.loads(out)  # answer, token ids, moments in seconds, frames
  stored = np.load(extracted / "v1.npy")
  assert from_video["token_ids"] == tiny_vtimellm.hf_greedy(_v1(QUERY), stored, 6)
  # The answer depends on the frames (so the equalities above could not hold with other features).
  assert from_video["token_ids"] != tiny_vtimellm.hf_greedy(_v1(QUERY), np.load(extracted / "v2.npy"), 6)


@pytest.mark.parametrize("content", ["garbage", pytest.param("truncated", marks=pytest.mark.slow),
                                     pytest.param("missing", marks=pytest.mark.slow)])
def test_chat_unreadable_video_is_a_user_error(tiny_vtimellm, videos, tmp_path, capsys, content):
  path = tmp_path / "broken.mp4"
  if content == "garbage":
    path.write_bytes(GARBAGE)
  elif content == "truncated":
    good = (videos / "v1.mp4").read_bytes()
    path.write_bytes(good[:len(good) // 2])
  code, out, err = _chat(tiny_vtimellm, capsys, "--video", path, "--clip", "tiny-random")
  assert code == 2 and str(path) in err and "Traceback" not in err and out == ""


def test_chat_video_needs_clip(tiny_vtimellm, videos, capsys):
  code, _, err = _chat(tiny_vtimellm, capsys, "--video", videos / "v1.mp4")
  assert code == 2 and "--clip" in err


def _annotations(path, video_ids=("v1", "v2")):
  sentences = {"v1": ["A man walks into the kitchen.", "The dog jumps."], "v2": ["woman is counting money"],
               "v3": ["Cooking.", "runs."]}
  data = {vid: {"duration": DURATION, "timestamps": [[0.0, 1.5], [1.0, 3.0]][:len(sentences[vid])],
                "sentences": sentences[vid]} for vid in video_ids}
  path.write_text(json.dumps(data))
  return path


def _eval(tiny, data, out, capsys, *source):
  return _run(["eval", "--model", tiny.model_dir, "--data", data, *source, "--task", "grounding", "--out", out,
               "--temperature", "0", "--max-new-tokens", "4", "--batch-size", "2", "--no-progress"], capsys)


@pytest.mark.slow
def test_eval_videos_equals_eval_on_extracted_features(tiny_vtimellm, videos, clip_dir, extracted, tmp_path, capsys):
  data = _annotations(tmp_path / "ann.json")
  from_videos, from_features, mixed = tmp_path / "videos.jsonl", tmp_path / "features.jsonl", tmp_path / "mixed.jsonl"
  code, _, err = _eval(tiny_vtimellm, data, from_videos, capsys, "--videos", videos, "--clip", clip_dir)
  assert code == 0, err
  # Each video is decoded and encoded once, though v1 has two queries.
  assert err.count("computing CLIP features of") == 2
  code, _, err = _eval(tiny_vtimellm, data, from_features, capsys, "--features", extracted)
  assert code == 0 and "computing CLIP features" not in err, err
  records = [json.loads(line) for line in from_videos.read_text().splitlines()]
  assert [(r["video_id"], r["info"]["sentence_id"]) for r in records] == [("v1", 0), ("v1", 1), ("v2", 0)]
  assert from_videos.read_text() == from_features.read_text()
  decode = lambda ids: tokenizer_lib.load_tokenizer(tiny_vtimellm.model_dir).decode(ids, skip_special_tokens=True).strip()
  question = "During which frames can we see a man walks into the kitchen?"
  reference = tiny_vtimellm.hf_greedy(_v1(question), np.load(extracted / "v1.npy"), 4)
  assert records[0]["answer"] == decode(reference)
  assert reference != tiny_vtimellm.hf_greedy(_v1(question), np.load(extracted / "v2.npy"), 4)  # frames matter

  # The release's lookup order: a stored .npy first, the video only for an id without one.
  partial = tmp_path / "partial"
  partial.mkdir()
  shutil.copy(extracted / "v1.npy", partial / "v1.npy")
  code, _, err = _eval(tiny_vtimellm, data, mixed, capsys, "--features", partial, "--videos", videos,
                       "--clip", clip_dir)
  assert code == 0, err
  assert [line for line in err.splitlines() if "computing CLIP features of" in line] == [
      f"computing CLIP features of {videos / 'v2.mp4'}"]
  assert mixed.read_text() == from_features.read_text()


@pytest.mark.slow
def test_eval_missing_and_corrupt_videos(tiny_vtimellm, videos, tmp_path, capsys):
  data = _annotations(tmp_path / "ann.json", ("v1", "v2", "v3"))
  folder = tmp_path / "videos"
  folder.mkdir()
  shutil.copy(videos / "v1.mp4", folder / "v1.mp4")
  (folder / "v2.mp4").write_bytes(GARBAGE)  # v3 has no video at all
  log = tmp_path / "log.jsonl"
  source = ("--videos", folder, "--clip", "tiny-random")  # also a --clip that chat and eval accept
  # A video that is missing stops the run before any generation, naming the paths tried.
  code, _, err = _eval(tiny_vtimellm, data, log, capsys, *source)
  assert code == 2 and "1 video(s) have no features" in err and str(folder / "v3.{mp4,mkv,webm,") in err
  assert not log.exists() or log.read_text() == ""
  # --skip-missing skips v3; a video that exists but cannot be decoded is still an error naming it,
  # after the batches before it were logged.
  code, _, err = _eval(tiny_vtimellm, data, log, capsys, *source, "--skip-missing")
  assert code == 2 and str(folder / "v2.mp4") in err and "cannot decode" in err and "Traceback" not in err
  assert [json.loads(line)["video_id"] for line in log.read_text().splitlines()] == ["v1", "v1"]
  # Fixed, a rerun answers only what is left.
  shutil.copy(videos / "v2.mp4", folder / "v2.mp4")
  code, _, err = _eval(tiny_vtimellm, data, log, capsys, *source, "--skip-missing")
  assert code == 0 and "1 answered now, 2 already logged" in err and "skipped 1 video" in err, err
  records = [json.loads(line) for line in log.read_text().splitlines()]
  assert [(r["video_id"], r["info"]["sentence_id"]) for r in records] == [("v1", 0), ("v1", 1), ("v2", 0)]
