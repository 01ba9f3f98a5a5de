"""`generate_corpus`: a seeded corpus of real mp4 videos, stills and all annotation files.

  python -m vtimellm_jax.data_pipelines.synthetic --out /tmp/syn --train 120 --eval 30 --seed 0

Layout of `out_dir` (the dict returned has these keys):

  videos/train/{id}.mp4, videos/eval/{id}.mp4   "videos" (both), "train_videos", "eval_videos"
  stills/{id}.png                               "stills": one per event of every train video
  stage1.json, stage2.json, stage3.json         the three training stages' data
  eval.json                                     held-out videos, ActivityNet annotation format
  corpus.txt                                    every training text (tokenizer / stage-0 text)
  plans.json                                    what was drawn: per video its frames and events

The same arguments give the same files, byte for byte.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
from typing import Any

import numpy as np

from . import annotations, render, vocabulary
from vtimellm_jax.data import templates
from vtimellm_jax.errors import UserError

# Stream ids of the generators, so that the annotation texts and the plans never share draws.
_STILL_STREAM, _STAGE2_STREAM, _STAGE3_STREAM = 2, 3, 4
# The shortest gap (6% of a video) must stay at least two frames wide after snapping to frames.
MIN_FRAMES = 40


def _check_arguments(num_train_videos: int, num_eval_videos: int, size: int, fps: int, min_seconds: float,
                     max_seconds: float, stage2_per_video: int, stage3_per_video: int) -> None:
  """Returns None; raises one UserError listing every bad argument."""
  problems = []
  if num_train_videos < 1 or num_eval_videos < 1:
    problems.append(f"need at least one train and one eval video, got {num_train_videos} and {num_eval_videos}")
  if size < 32 or size % 2:
    problems.append(f"size must be even and >= 32 (H.264 4:2:0 needs even sides), got {size}")
  if not isinstance(fps, int) or not 1 <= fps <= 60:
    problems.append(f"fps must be an integer in [1, 60], got {fps}")
  if not 0 < min_seconds <= max_seconds:
    problems.append(f"need 0 < min_seconds <= max_seconds, got {min_seconds} and {max_seconds}")
  elif min_seconds * fps < MIN_FRAMES:
    problems.append(f"min_seconds * fps = {min_seconds * fps:g} frames; need at least {MIN_FRAMES}")
  if stage2_per_video < 1 or stage3_per_video < 1:
    problems.append("stage2_per_video and stage3_per_video must be >= 1")
  if problems:
    raise UserError("generate_corpus: " + "; ".join(problems))


def _write_json(path: pathlib.Path, data: Any) -> None:
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(data, indent=1) + "\n")
  tmp.replace(path)


def _plan_json(plan: vocabulary.VideoPlan) -> dict[str, Any]:
  return {"num_frames": plan.num_frames, "fps": plan.fps, "duration": plan.duration,
          "events": [dataclasses.asdict(e) | {"sentence": e.caption} for e in plan.events]}


def generate_corpus(out_dir: str | pathlib.Path, *, num_train_videos: int = 120, num_eval_videos: int = 30,
                    seed: int = 0, size: int = 64, fps: int = 10, min_seconds: float = 6,
                    max_seconds: float = 20, stage2_per_video: int = 2, stage3_per_video: int = 1,
                    progress: bool = False) -> dict[str, pathlib.Path]:
  """Returns the paths of a freshly written synthetic corpus (see the module docstring for the keys).

  Args:
    out_dir: folder to write into (created; files of an earlier run are overwritten).
    num_train_videos, num_eval_videos: videos per split; eval videos never repeat a train video's
      (shape, colour, motion) sequence.
    seed: fixes every plan, pixel and text.
    size: frame side in pixels (even); fps: frames per second (integer, constant rate).
    min_seconds, max_seconds: range of video lengths.
    stage2_per_video, stage3_per_video: records per train video (each drawn anew from the templates).
    progress: print a one-line summary to stderr.
  """
  _check_arguments(num_train_videos, num_eval_videos, size, fps, min_seconds, max_seconds,
                   stage2_per_video, stage3_per_video)
  t0 = time.perf_counter()
  out = pathlib.Path(out_dir)
  paths = {"videos": out / "videos", "train_videos": out / "videos" / "train", "eval_videos": out / "videos" / "eval",
           "stills": out / "stills", "stage1": out / "stage1.json", "stage2": out / "stage2.json",
           "stage3": out / "stage3.json", "eval": out / "eval.json", "corpus": out / "corpus.txt",
           "plans": out / "plans.json"}
  for key in ("train_videos", "eval_videos", "stills"):
    paths[key].mkdir(parents=True, exist_ok=True)

  train, evals = vocabulary.plan_corpus(seed, num_train=num_train_videos, num_eval=num_eval_videos, fps=fps,
                                        min_seconds=min_seconds, max_seconds=max_seconds)
  for folder, plans in ((paths["train_videos"], train), (paths["eval_videos"], evals)):
    for plan in plans:
      render.write_mp4(folder / f"{plan.id}.mp4", render.render_video(plan, size), fps)

  stage1 = []
  for i, plan in enumerate(train):
    rng = np.random.default_rng([seed, _STILL_STREAM, i])
    for k, event in enumerate(plan.events):
      still_id = f"{plan.id}_e{k}"
      render.write_png(paths["stills"] / f"{still_id}.png", render.render_still(event, size))
      stage1.append(annotations.still_record(rng, still_id, f"{still_id}.png", event))

  dense = annotations.dense_choice(np.random.default_rng([seed, _STAGE2_STREAM]), len(train) * stage2_per_video)
  stage2 = [annotations.stage2_record(np.random.default_rng([seed, _STAGE2_STREAM, i, j]), plan,
                                      bool(dense[i * stage2_per_video + j]))
            for i, plan in enumerate(train) for j in range(stage2_per_video)]
  stage3 = [annotations.stage3_record(np.random.default_rng([seed, _STAGE3_STREAM, i, j]), plan)
            for i, plan in enumerate(train) for j in range(stage3_per_video)]
  _write_json(paths["stage1"], stage1)
  _write_json(paths["stage2"], stage2)
  _write_json(paths["stage3"], stage3)
  _write_json(paths["eval"], {plan.id: annotations.eval_entry(plan) for plan in evals})
  _write_json(paths["plans"], {plan.id: _plan_json(plan) for plan in train + evals})

  # The tokenizer must also know the chat frame every stage-2/3 sample and query is wrapped in.
  lines = [templates.SYSTEM, "USER: ASSISTANT:"] + annotations.corpus_lines(stage1 + stage2 + stage3)
  tmp = paths["corpus"].with_name("corpus.txt.tmp")
  tmp.write_text("\n".join(lines) + "\n")
  tmp.replace(paths["corpus"])
  if progress:
    frames = sum(p.num_frames for p in train + evals)
    print(f"synthetic corpus: {len(train)} train + {len(evals)} eval videos ({frames} frames), {len(stage1)} stills, "
          f"{len(stage2)} + {len(stage3)} stage-2/3 records in {time.perf_counter() - t0:.1f} s -> {out}",
          file=sys.stderr)
  return paths


def main(argv: list[str] | None = None) -> int:
  """Returns the exit status of `python -m vtimellm_jax.data_pipelines.synthetic`."""
  parser = argparse.ArgumentParser(prog="python -m vtimellm_jax.data_pipelines.synthetic",
                                   description="Write a seeded synthetic multi-event video corpus with "
                                               "VTimeLLM stage-1/2/3 and evaluation annotations.")
  parser.add_argument("--out", required=True, help="output folder")
  parser.add_argument("--train", type=int, default=120, help="training videos")
  parser.add_argument("--eval", type=int, default=30, help="held-out evaluation videos")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--size", type=int, default=64, help="frame side in pixels (even)")
  parser.add_argument("--fps", type=int, default=10)
  parser.add_argument("--min-seconds", type=float, default=6)
  parser.add_argument("--max-seconds", type=float, default=20)
  parser.add_argument("--stage2-per-video", type=int, default=2, help="stage-2 records per train video")
  parser.add_argument("--stage3-per-video", type=int, default=1, help="stage-3 dialogues per train video")
  args = parser.parse_args(argv)
  try:
    paths = generate_corpus(args.out, num_train_videos=args.train, num_eval_videos=args.eval, seed=args.seed,
                            size=args.size, fps=args.fps, min_seconds=args.min_seconds,
                            max_seconds=args.max_seconds, stage2_per_video=args.stage2_per_video,
                            stage3_per_video=args.stage3_per_video, progress=True)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(json.dumps({k: str(v) for k, v in paths.items()}, indent=1))
  return 0
