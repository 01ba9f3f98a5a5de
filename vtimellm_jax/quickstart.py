"""`vtimellm-jax quickstart`: the whole recipe on a synthetic corpus, from video files to metrics.

Steps (each through the project's own commands, each resumable by rerunning):
  1. a synthetic corpus of real mp4 videos with 2-4 events each (data_pipelines/synthetic);
  2. a sentencepiece tokenizer trained on its text, chat frame included;
  3. CLIP features of every video and still (`extract-features`, a random tiny CLIP at 64 px),
     standardised per dimension with the training videos' statistics (video/standardize.py);
  4. stage 0: a tiny LLaMA pretrained on the corpus text (standing in for Vicuna), its captions
     with their stills' features so that it learns to read the visual token;
  5. stages 1, 2, 3 (`train --config configs/stageN.py:tiny`; stage 2 of the tiny model trains every
     parameter and stage 3 starts from its export), then `export`;
  6. `eval` (grounding and dense captioning) on held-out videos and `metrics`, next to a
     constant-answer baseline; a timeline plot.
With `--size 7b --base <vicuna model dir> --clip <clip dir>` the same steps run the real-size model
on the synthetic corpus (a smoke test of a GPU/TPU machine). `--family chatglm3` runs the release's
ChatGLM3 variant instead: a ChatGLM3-style tokenizer, a tiny ChatGLM3-shaped model (or `--size 6b
--base <converted ChatGLM3-6B>`), the `configs/stageN.py:chatglm3,...` recipe with its `glm`
template, and the same evaluation.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import numpy as np

from vtimellm_jax import cli_types
from vtimellm_jax.models import families
from vtimellm_jax.data import records

ACCEPTS_CONFIG_OVERRIDES = True

# The tiny preset widened so the quickstart model can learn the task in minutes on a CPU, with a
# frame-time code (models/time_code.py) and a short RoPE period: the position sense Vicuna brings.
QUICKSTART_MODEL = {"hidden_size": 128, "intermediate_size": 344, "num_layers": 4, "num_heads": 4}
QUICKSTART_RANDOM_INIT = ["--config.model.time_code=1.0", "--config.model.rope_theta=500.0"]
# Per-stage schedule of the tiny run: steps and peak lr sized for a CPU budget (the recipe's 7B
# values are in the configs), few bucket lengths (few compiles). Stage 2 trains every parameter of
# the minutes-old LLaMA, not a LoRA on it: the query learns to find its frames only after several
# hundred steps (docs/synthetic.md, "Stages"); stage 3 then
# starts from its export instead of merging a LoRA, and trains a fresh LoRA as the recipe does, for
# as many steps as valid dense-captioning JSON takes.
_BATCH_8 = ["--config.global_batch=8", "--config.micro_batch=8"]
# Stage 0, 2 and 3 texts vary in length (captions to 300-token dialogues; 2-4 events): four buckets.
_BUCKETS_4 = ["--config.data.num_buckets=4"]
QUICKSTART_STAGES = {
    "stage0": ["--config.max_steps=250", "--config.optim.lr=2e-3", *_BUCKETS_4],
    "stage1": ["--config.max_steps=1000", "--config.optim.lr=3e-3"],
    "stage2": ["--config.max_steps=800", "--config.optim.lr=1e-3", "--config.trainable=all", *_BUCKETS_4, *_BATCH_8],
    "stage3": ["--config.max_steps=200", "--config.optim.lr=1e-3", *_BUCKETS_4, *_BATCH_8],
}
# The quickstart tokenizer's size. 1,024 pieces hold the corpus's words and the JSON answer's
# punctuation whole ('▁slides', '"},'); at 512, after 259 byte pieces and the 100 time pieces, only
# ~150 merges were left: words were spelt in letters, every sequence was twice as long, and JSON
# answers (twice as many pieces too) broke after their first event (docs/synthetic.md, "Tokenizer").
QUICKSTART_VOCAB = 1024
# A dense-captioning answer in JSON is 36-79 pieces of that tokenizer on the held-out videos; the
# budget leaves room for a model that lists an event twice before it closes the bracket.
EVAL_MAX_NEW_TOKENS = 256
# Stage 0's conversations have no picture: their visual token is this zero feature.
BLANK_ID = "blank"
QUICKSTART_COMMON = ["--config.epochs=100", "--config.data.num_buckets=2", "--config.lora.rank=64",
                     "--config.lora.alpha=128.0", "--config.lora.dropout=0.0", "--config.checkpoint.every_steps=100"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--workdir", default="quickstart", help="everything goes here (default: %(default)s)")
  parser.add_argument("--seed", type=cli_types.int_at_least(0), default=0)
  parser.add_argument("--train-videos", type=cli_types.int_at_least(1), default=1000)
  parser.add_argument("--eval-videos", type=cli_types.int_at_least(1), default=30)
  parser.add_argument("--steps", type=cli_types.int_at_least(0), default=0, help="steps of every stage (0: the quickstart's own per stage)")
  parser.add_argument("--stage-steps", default="", metavar="STAGE=N,...",
                      help="steps of single stages, e.g. stage0=100,stage2=300 (overrides --steps for those)")
  parser.add_argument("--family", default=families.VICUNA.name, choices=tuple(families.FAMILIES),
                      help="the LLM family: Vicuna (LLaMA) or ChatGLM3, as the release has (default: %(default)s)")
  parser.add_argument("--size", default="tiny", choices=families.SIZES,
                      help="tiny (trained here), or a real size with --base: 7b/13b (Vicuna), 6b (ChatGLM3)")
  parser.add_argument("--base", default="", help="with a real --size: a converted Vicuna / ChatGLM3 model directory")
  parser.add_argument("--clip", default="tiny-random-64",
                      help="CLIP for extract-features (default: a random tiny CLIP at the videos' 64 px)")
  parser.add_argument("--quant", default="none", choices=cli_types.ANSWER_QUANTS,
                      help="QLoRA: stage 3 trains its LoRA on this quantised base (config model.quant) and the "
                           "evaluation answers with it (eval --quant); the exported model keeps the float base "
                           "(default: %(default)s)")


def _cli(args: list[str]) -> None:
  from vtimellm_jax import cli

  code = cli.main(args)
  if code:
    from vtimellm_jax.errors import UserError
    raise UserError(f"quickstart step failed (exit {code}): vtimellm-jax {' '.join(args)}")


def parse_stage_steps(text: str) -> dict[str, int]:
  """Returns {stage: steps} from "stage0=100,stage2=300", or raises UserError saying what is wrong."""
  from vtimellm_jax.errors import UserError

  steps = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    name, _, value = item.partition("=")
    if name not in QUICKSTART_STAGES or not value.isdigit() or int(value) < 1:
      raise UserError(f"--stage-steps: {item!r} is not STAGE=N with STAGE one of {', '.join(QUICKSTART_STAGES)} "
                      "and N a positive whole number")
    steps[name] = int(value)
  return steps


def stage0_records(corpus: dict[str, pathlib.Path]) -> list[dict]:
  """Returns plain-template records over the corpus text: every caption with its still (record id the
  still's), and every stage-2/3 conversation written in the v1 chat frame with the blank feature (id
  BLANK_ID), so the pretrained LLM knows both formats the later stages use and reads the visual token."""
  from vtimellm_jax.data import templates

  def record(record_id: str, text: str) -> dict:
    return {"id": record_id, "image": f"{record_id}.png",
            "conversations": [{"from": "human", "value": "<image>\n"}, {"from": "gpt", "value": text}]}

  out = [record(pathlib.Path(r["image"]).stem, r["conversations"][1]["value"])
         for r in json.loads(corpus["stage1"].read_text())]
  for name in ("stage2", "stage3"):
    for raw in json.loads(corpus[name].read_text()):
      prepared, _ = records.prepare(raw)
      if prepared is None:
        continue
      turns = [(role, text.replace(templates.VIDEO_TAG + "\n", "").replace(templates.VIDEO_TAG, ""))
               for role, text in prepared.turns]
      out.append(record(BLANK_ID, templates.v1_prompt(turns)))
  return out


def stage0_features(stills: pathlib.Path, out: pathlib.Path, stage0_data: list[dict]) -> None:
  """Writes stage 0's feature folder: the blank (zero) feature and a copy of every caption's still."""
  import shutil

  out.mkdir(parents=True, exist_ok=True)
  np.save(out / f"{BLANK_ID}.npy", np.zeros(records.FEATURE_DIM, np.float16))
  for record in stage0_data:
    if record["id"] != BLANK_ID and not (out / f"{record['id']}.npy").is_file():
      shutil.copyfile(stills / f"{record['id']}.npy", out / f"{record['id']}.npy")


def constant_baseline(annotations_path: pathlib.Path, stage2_path: pathlib.Path, out: pathlib.Path) -> None:
  """Writes an answer log that gives every query the same answer: the training set's mean span."""
  from vtimellm_jax.inference import evaluate
  from vtimellm_jax.evaluation import annotations as annotations_lib

  spans = []
  for record in json.loads(stage2_path.read_text()):
    meta = record.get("meta") or {}
    tokens, duration = meta.get("token", {}), meta.get("duration")
    for k in range(8):
      if f"<s{k}>" in tokens and duration:
        spans.append((tokens[f"<s{k}>"] / duration * 100, tokens[f"<e{k}>"] / duration * 100))
  start, end = (int(min(round(v), 99)) for v in np.mean(spans, axis=0))
  annotations = annotations_lib.read_annotations(annotations_path)
  answers = {"grounding": f"From {start:02d} to {end:02d}.",
             "captioning": json.dumps([{"event": "a shape moves.", "timestamps": f"from {start:02d} to {end:02d}"}])}
  with open(out, "w") as f:
    for query in evaluate.build_queries(annotations, "all"):
      f.write(evaluate.log_line(query, answers[query.task], annotations) + "\n")


def _metrics(log: pathlib.Path, data: pathlib.Path, task: str, plot: pathlib.Path | None = None) -> dict:
  import contextlib
  import io

  buffer = io.StringIO()
  args = ["metrics", "--log", str(log), "--data", str(data), "--task", task, "--json"]
  args += ["--plot", str(plot)] if plot else []
  with contextlib.redirect_stdout(buffer):
    _cli(args)
  return json.loads(buffer.getvalue().strip().splitlines()[-1])


def run(args: argparse.Namespace) -> int:
  from vtimellm_jax.data import chatglm_tokenizer, tokenizer as tokenizer_lib
  from vtimellm_jax.data_pipelines.synthetic import corpus as synthetic
  from vtimellm_jax.evaluation import coco_java
  from vtimellm_jax.inference import served
  from vtimellm_jax.errors import UserError
  from vtimellm_jax.models import time_code
  from vtimellm_jax.training import config_files
  from vtimellm_jax.video import standardize
  from vtimellm_jax.video.clip_source import TINY_RANDOM_SIZES

  family = families.get(getattr(args, "family", families.VICUNA.name))
  if args.size not in family.sizes:
    raise UserError(f"--family {family.name} has sizes {', '.join(family.sizes)}, not {args.size}")
  if args.size != "tiny" and not args.base:
    raise UserError(f"--size {args.size} needs --base <converted model directory> (and usually --clip)")
  config_arg = f"family={family.name},size={args.size}"
  stage_steps = parse_stage_steps(args.stage_steps)  # before minutes of work, not after
  wd = pathlib.Path(args.workdir)
  wd.mkdir(parents=True, exist_ok=True)
  t_start = time.perf_counter()
  say = lambda text: print(f"[quickstart {time.perf_counter() - t_start:6.0f}s] {text}", flush=True)  # noqa: E731

  say("1/6 synthetic corpus")
  corpus = synthetic.generate_corpus(wd / "corpus", num_train_videos=args.train_videos,
                                     num_eval_videos=args.eval_videos, seed=args.seed)
  # Stage 0's records (the corpus text in the chat frame) also train the tokenizer.
  stage0_data = [] if args.base else stage0_records(corpus)
  tokenizer_dir = wd / "tokenizer"
  if args.base:
    tokenizer_dir = pathlib.Path(args.base)
  elif not (tokenizer_dir / "tokenizer.model").is_file():
    say("2/6 tokenizer")
    # The corpus text names the chat frame once; stage 0's texts carry it in every turn, so the
    # tokenizer learns "USER"/"ASSISTANT" as pieces instead of spelling them in letters: sequences
    # ~30% shorter, and fewer tokens between a question and its answer.
    lines = corpus["corpus"].read_text().splitlines()
    lines += [record["conversations"][1]["value"] for record in stage0_data]
    train = {"sentencepiece": tokenizer_lib.train_tokenizer,
             "chatglm": chatglm_tokenizer.train_chatglm_tokenizer}[family.tokenizer]
    train(lines, tokenizer_dir, vocab_size=QUICKSTART_VOCAB, pieces=time_code.TIME_PIECES)

  say("3/6 features (extract-features)")
  features, stills = wd / "features" / "videos", wd / "features" / "stills"
  random_clip = args.clip in TINY_RANDOM_SIZES
  # A random CLIP's raw features go to features/clip/ and are standardised into features/ (below).
  raw = wd / "features" / "clip" if random_clip else wd / "features"
  _cli(["extract-features", "--videos", str(corpus["videos"]), "--clip", args.clip, "--out", str(raw / "videos"),
        "--seed", str(args.seed), "--no-progress"])
  _cli(["extract-features", "--videos", str(corpus["stills"]), "--images", "--clip", args.clip,
        "--out", str(raw / "stills"), "--seed", str(args.seed), "--no-progress"])
  if random_clip:
    # A random CLIP's embedding is nearly the same for every image; standardised with the training
    # videos' statistics, what tells frames apart is what the frame tokens are made of
    # (video/standardize.py).
    train_ids = sorted(path.stem for path in corpus["train_videos"].glob("*.mp4"))
    mean, std = standardize.feature_stats(raw / "videos" / f"{vid}.npy" for vid in train_ids)
    standardize.save_stats(wd / "features" / standardize.STATS_FILE, mean, std)
    for name in ("videos", "stills"):
      standardize.standardize_dir(raw / name, wd / "features" / name, mean, std)

  common = [f"--config.data.tokenizer={tokenizer_dir}", f"--config.seed={args.seed}"]
  if args.size == "tiny":
    common += [f"--config.model.{k}={v}" for k, v in QUICKSTART_MODEL.items()] + QUICKSTART_COMMON
  # Later flags win: the stage's own schedule, then --steps, the user's --config overrides, --stage-steps.
  user = [f"--config.max_steps={args.steps}"] if args.steps else []
  user += list(getattr(args, "config_overrides", []) or [])
  configs = config_files.CONFIGS_DIR
  runs, models = wd / "runs", wd / "models"

  def train(stage: str, data: pathlib.Path, feats: pathlib.Path, *extra: str) -> None:
    say(f"training {stage}")
    schedule = QUICKSTART_STAGES[stage] if args.size == "tiny" else []
    steps = [f"--config.max_steps={stage_steps[stage]}"] if stage in stage_steps else []
    _cli(["train", "--config", f"{configs / stage}.py:{config_arg}", "--workdir", str(runs / stage),
          f"--config.data.json={data}", f"--config.data.features={feats}", *common, *schedule, *user, *steps, *extra])

  base = args.base
  if not base:
    say("4/6 stage 0: pretraining the tiny LLaMA on the corpus text")
    # Captions come with their stills: with a zero feature in every sample the LLM never learnt to
    # read its visual token, stage 1's adapter could hardly teach it, and stage 2 often kept
    # answering with the wrong event (docs/synthetic.md, "Stages").
    stage0_feats = wd / "features" / "stage0"
    stage0_features(stills, stage0_feats, stage0_data)
    stage0_json = wd / "stage0.json"
    stage0_json.write_text(json.dumps(stage0_data))
    train("stage0", stage0_json, stage0_feats, *(QUICKSTART_RANDOM_INIT if args.size == "tiny" else []))
    _cli(["export", "--workdir", str(runs / "stage0"), "--out", str(models / "stage0")])
    base = str(models / "stage0")

  say("5/6 stages 1-3")
  train("stage1", corpus["stage1"], stills, f"--config.model.base={base}")
  train("stage2", corpus["stage2"], features, f"--config.model.base={base}", f"--config.load.adapter={runs / 'stage1'}")
  if args.size == "tiny":
    # Stage 2 trained every parameter (QUICKSTART_STAGES): its export, adapter included, is stage 3's base.
    _cli(["export", "--workdir", str(runs / "stage2"), "--out", str(models / "stage2")])
    stage3_from = [f"--config.model.base={models / 'stage2'}"]
  else:
    stage3_from = [f"--config.model.base={base}", f"--config.load.adapter={runs / 'stage1'}",
                   f"--config.load.merge_lora={runs / 'stage2'}"]
  qlora = [f"--config.model.quant={args.quant}"] if args.quant != "none" else []
  train("stage3", corpus["stage3"], features, *stage3_from, *qlora)
  _cli(["export", "--workdir", str(runs / "stage3"), "--out", str(models / "vtimellm")])
  # `demo`/`serve --model <workdir>` read the model, its CLIP and its feature statistics from here.
  stats = f"features/{standardize.STATS_FILE}" if random_clip else None
  clip = args.clip if random_clip else str(pathlib.Path(args.clip).resolve())
  served.write_serving_json(wd, "models/vtimellm", clip, args.seed, stats)

  say("6/6 evaluation on held-out videos")
  eval_dir = wd / "eval"
  eval_dir.mkdir(exist_ok=True)
  _cli(["eval", "--model", str(models / "vtimellm"), "--data", str(corpus["eval"]), "--features", str(features),
        "--task", "all", "--out", str(eval_dir / "answers.jsonl"), "--temperature", "0", "--batch-size", "32",
        "--max-new-tokens", str(EVAL_MAX_NEW_TOKENS), "--no-progress", "--quant", args.quant])
  constant_baseline(corpus["eval"], corpus["stage2"], eval_dir / "constant_baseline.jsonl")
  task = "all"
  try:
    coco_java.java_command()
  except coco_java.JavaMissingError as e:
    task = "grounding"  # captioning metrics run METEOR, a Java program; grounding needs nothing more
    say(f"note: {e}")
  ours = _metrics(eval_dir / "answers.jsonl", corpus["eval"], task, eval_dir / "timeline.png")
  baseline = _metrics(eval_dir / "constant_baseline.jsonl", corpus["eval"], task)
  (eval_dir / "metrics.json").write_text(json.dumps({"model": ours, "constant_baseline": baseline}, indent=2) + "\n")
  print(f"\n{'metric':<10}{'model':>10}{'constant':>10}")
  for key in ("R1@0.3", "R1@0.5", "R1@0.7", "mIoU", "soda_c", "METEOR", "CIDEr"):
    if key in ours:
      print(f"{key:<10}{ours[key]:>10.2f}{baseline.get(key, float('nan')):>10.2f}")
  say(f"done: metrics in {eval_dir / 'metrics.json'}, timeline plot {eval_dir / 'timeline.png'}")
  sys.stdout.flush()
  return 0
