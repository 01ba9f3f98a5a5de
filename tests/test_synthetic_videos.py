"""Synthetic corpus, pixel side: real decodable mp4s whose frames show what the annotations say.

References here are independent of the generator: colour words are checked against the textbook hue
of the word (red 0 degrees, yellow 60, ...), not against the generator's palette, and the 100
sampled frames are computed from the release's rule (`linspace(0, T - 1, 100)` truncated).
"""

import colorsys
import hashlib
import json
import pathlib
import re

import av
import numpy as np
import pytest
from PIL import Image

from vtimellm_jax.data_pipelines import synthetic

FPS, SIZE = 8, 64
HUES = {"red": 0, "yellow": 60, "green": 120, "cyan": 180, "blue": 240, "magenta": 300}
COLOUR_WORD = re.compile(r"\b(" + "|".join(HUES) + r")\b")


def _generate(out: pathlib.Path, seed: int = 3, **kw) -> dict:
  args = {"num_train_videos": 5, "num_eval_videos": 3, "seed": seed, "size": SIZE, "fps": FPS, "min_seconds": 6,
          "max_seconds": 10}
  args.update(kw)
  return synthetic.generate_corpus(out, **args)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  return _generate(tmp_path_factory.mktemp("synthetic"))


def _decode(path: pathlib.Path) -> tuple[np.ndarray, float, float]:
  """Returns (uint8[T, H, W, 3] frames, average fps, container duration in seconds)."""
  with av.open(str(path)) as container:
    stream = container.streams.video[0]
    frames = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(stream)])
    return frames, float(stream.average_rate), container.duration / 1e6


def _visible_colour(frame: np.ndarray) -> tuple[str | None, float]:
  """Returns (colour word whose hue is within 20 degrees of the shape's, share of frame covered)."""
  lit = frame.max(axis=-1) > 80
  if lit.mean() < 0.01:
    return None, float(lit.mean())
  r, g, b = (frame[lit].astype(np.float64).mean(axis=0) / 255).tolist()
  hue = colorsys.rgb_to_hsv(r, g, b)[0] * 360
  for word, ref in HUES.items():
    if min(abs(hue - ref), 360 - abs(hue - ref)) < 20:
      return word, float(lit.mean())
  return f"hue {hue:.0f}", float(lit.mean())


def _all_videos(corpus) -> dict[str, pathlib.Path]:
  return {p.stem: p for p in sorted(corpus["videos"].rglob("*.mp4"))}


def test_videos_decode_with_the_annotated_length(corpus):
  ev = json.loads(corpus["eval"].read_text())
  metas = {r["id"]: r["meta"] for r in json.loads(corpus["stage2"].read_text())}
  durations = {vid: a["duration"] for vid, a in ev.items()} | {vid: m["duration"] for vid, m in metas.items()}
  videos = _all_videos(corpus)
  assert set(videos) == set(durations) and len(videos) == 8
  for vid, path in videos.items():
    frames, fps, seconds = _decode(path)
    assert frames.shape[1:] == (SIZE, SIZE, 3)
    assert fps == FPS
    assert len(frames) == round(durations[vid] * FPS), vid
    assert seconds == pytest.approx(durations[vid], abs=1 / FPS), vid
    assert 6 <= durations[vid] <= 10


def test_event_midpoints_show_the_sentence_colour_and_gaps_are_empty(corpus):
  ev = json.loads(corpus["eval"].read_text())
  for vid, ann in ev.items():
    frames, _, _ = _decode(corpus["eval_videos"] / f"{vid}.mp4")
    for (s, e), sentence in zip(ann["timestamps"], ann["sentences"]):
      word, share = _visible_colour(frames[int((s + e) / 2 * FPS)])
      assert word == COLOUR_WORD.search(sentence.lower()).group(1), (vid, sentence)
      assert share > 0.03, "an event must be clearly visible"
    bounds = [0.0] + [t for span in ann["timestamps"] for t in span] + [ann["duration"]]
    for gap_start, gap_end in zip(bounds[0::2], bounds[1::2]):
      if gap_end - gap_start >= 2 / FPS:
        frame = frames[int((gap_start + gap_end) / 2 * FPS)]
        assert frame.max() < 40, (vid, gap_start, gap_end)


def _index(t: float, duration: float) -> int:
  return min(round(t / duration * 100), 99)


def test_time_tokens_point_at_the_frames_that_show_the_event(corpus):
  """Each `<sK>/<eK>` pair, rendered as the release renders it, covers the sampled frames of one colour."""
  records = json.loads(corpus["stage2"].read_text()) + json.loads(corpus["stage3"].read_text())
  videos, checked = _all_videos(corpus), 0
  for vid in sorted({r["id"] for r in records}):
    meta = next(r["meta"] for r in records if r["id"] == vid)
    frames, _, _ = _decode(videos[vid])
    sampled = frames[np.linspace(0, len(frames) - 1, 100).astype(np.int32)]
    colours = [_visible_colour(f)[0] for f in sampled]
    spans = [(_index(meta["token"][f"<s{k}>"], meta["duration"]), _index(meta["token"][f"<e{k}>"], meta["duration"]))
             for k in range(len(meta["token"]) // 2)]
    inside = set()
    for s, e in spans:
      inner = {colours[i] for i in range(s + 1, e - 1)}
      assert len(inner) == 1 and None not in inner, (vid, s, e, inner)
      inside |= set(range(s - 1, e + 2))
    assert all(colours[i] is None for i in range(100) if i not in inside), vid
    # Text side: every sentence tied to <sK>/<eK> names the colour those frames show.
    for record in (r for r in records if r["id"] == vid):
      turns = [c["value"] for c in record["conversations"]]
      for q, a in zip(turns[0::2], turns[1::2]):
        for k, rest in re.findall(r"[Ff]rom <s(\d)> to <e\1>, (?:a|an) (\w+)", a):
          assert rest == colours[(spans[int(k)][0] + spans[int(k)][1]) // 2], (vid, a)
          checked += 1
        grounded = re.fullmatch(r"In (\w+) <s(\d)> to <e\2>\.", a)
        if grounded:
          shown = colours[(spans[int(grounded[2])][0] + spans[int(grounded[2])][1]) // 2]
          # Both the question and the colour the answer restates name what those frames show.
          assert COLOUR_WORD.search(q).group(1) == grounded[1] == shown, (vid, q, a)
          checked += 1
  assert checked >= 5


def test_stills_show_their_caption(corpus):
  for record in json.loads(corpus["stage1"].read_text()):
    image = np.asarray(Image.open(corpus["stills"] / record["image"]).convert("RGB"))
    assert image.shape == (SIZE, SIZE, 3)
    assert record["id"] == pathlib.Path(record["image"]).stem  # features are looked up as {id}.npy
    word, share = _visible_colour(image)
    assert word == COLOUR_WORD.search(record["conversations"][1]["value"].lower()).group(1)
    assert share > 0.03


def _digest(root: pathlib.Path) -> dict[str, str]:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_corpus(tmp_path):
  kw = {"num_train_videos": 2, "num_eval_videos": 1}
  a, b, c = (_digest(_generate(tmp_path / n, seed=s, **kw)["videos"].parent) for n, s in
             (("a", 5), ("b", 5), ("c", 6)))
  assert a == b
  assert len(a) == len(b) > 5 and not any(name.endswith(".tmp") for name in a)
  assert a["eval.json"] != c["eval.json"]
  assert a["videos/train/syn_train_00000.mp4"] != c["videos/train/syn_train_00000.mp4"]


def test_eval_videos_are_held_out(corpus):
  ev = json.loads(corpus["eval"].read_text())
  train_files = {p.stem for p in corpus["train_videos"].glob("*.mp4")}
  used = {r["id"] for stage in ("stage2", "stage3") for r in json.loads(corpus[stage].read_text())}
  stills = {r["id"] for r in json.loads(corpus["stage1"].read_text())}
  assert used == train_files and not used & set(ev)
  assert not any(still.startswith(tuple(ev)) for still in stills)
  # Not only other names: no eval video repeats a train video's sequence of events.
  plans = json.loads(corpus["plans"].read_text())
  train_stories = {tuple(e["sentence"] for e in plans[vid]["events"]) for vid in train_files}
  assert len(train_stories) == 5
  for ann in ev.values():
    assert tuple(ann["sentences"]) not in train_stories
