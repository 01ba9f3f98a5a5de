"""`vtimellm-jax eval`: answer the release's grounding / dense-captioning queries into an answer log.

  vtimellm-jax eval --model ckpt/vtimellm-7b --data val_2.json --features feat/ \\
      --task all --out log/anet.jsonl
  vtimellm-jax metrics --log log/anet.jsonl --data val_2.json

The log has the release's format and order, so `metrics` (or the release's metric.py) scores it.
Queries are batched, one task per batch (--batch-size per generate call; auto: as many as the
device's free memory holds); the run is resumable: rerun the same command and it skips the queries
already logged. An answer is cut at --max-new-tokens, a grounding one at --grounding-max-new-tokens
(by default the smaller of 128 and --max-new-tokens); the summary counts the answers cut. Features
are `{--features}/{id}.npy`, else CLIP is run on `{--videos}/{id}.{mp4,mkv,webm,...}` (the release's
lookup order, then the other extensions extraction reads). A video with neither is an error naming
it, or skipped and counted with --skip-missing (the release skips it silently).
"""

from __future__ import annotations

import argparse
import sys

from vtimellm_jax import cli_types, xla_flags
from vtimellm_jax.errors import UserError


# A grounding answer is "From 12 to 34." (about 10 tokens) or, from a model that first echoes the
# sentence, that sentence and the moment: ActivityNet's longest sentences are under 60 tokens. The
# metric reads the first "NN to NN", so a cut at 128 changes it only for an answer that runs on for
# twice that before naming a moment; the summary counts every answer cut.
GROUNDING_MAX_NEW_TOKENS = 128


def _batch_size(text: str) -> int | None:
  """Returns the --batch-size: None for auto, else a whole number >= 1."""
  if text == "auto":
    return None
  if not text.strip().lstrip("+-").isdigit():
    raise argparse.ArgumentTypeError(f"expected auto or an integer, got {text!r}")
  return cli_types.int_at_least(1)(text)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from vtimellm_jax.inference import evaluate, generate  # pylint: disable=g-import-not-at-top

  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.epilog = __doc__.split("\n\n", 1)[1]
  parser.add_argument("--model", required=True, help="VTimeLLM model directory (model.json, params/, tokenizer files)")
  parser.add_argument("--data", required=True, help="annotations: ActivityNet-style JSON (e.g. val_2.json), or "
                                                    "Charades-STA .txt with --durations")
  parser.add_argument("--durations", help="video durations for a Charades-STA --data (CSV or JSON)")
  parser.add_argument("--features", help="folder of {video_id}.npy features (float16 [100, 768])")
  parser.add_argument("--videos", help="folder of {video_id}.mp4/.mkv/.webm (or another video extension), used when a .npy is missing")
  parser.add_argument("--clip", help="CLIP model directory (with --videos), a source `convert clip --src` "
                                     "accepts, or 'tiny-random' (random tiny CLIP, smoke tests)")
  parser.add_argument("--task", choices=("grounding", "captioning", "all"), default="all",
                      help="which queries (default: %(default)s)")
  parser.add_argument("--out", required=True, help="answer log (JSON lines); appended to, resumable")
  parser.add_argument("--batch-size", type=_batch_size, default="auto",
                      help="queries per generate call; auto (default): the largest power of two up to "
                           f"{evaluate.MAX_AUTO_BATCH_SIZE} whose KV cache fits the device's free memory, "
                           f"{evaluate.CPU_BATCH_SIZE} on a CPU")
  parser.add_argument("--max-new-tokens", type=cli_types.int_at_least(1), default=generate.RELEASE_MAX_NEW_TOKENS,
                      help="most tokens per answer (default: the release's %(default)s)")
  parser.add_argument("--grounding-max-new-tokens", type=cli_types.int_at_least(1),
                      help=f"most tokens per grounding answer (default: the smaller of {GROUNDING_MAX_NEW_TOKENS} and "
                           "--max-new-tokens; the release gives every query 1024). An answer cut here changes the "
                           "metric only if its first 'NN to NN' comes later")
  parser.add_argument("--temperature", type=cli_types.number_in(0), default=generate.RELEASE_TEMPERATURE,
                      help="sampling temperature, 0 = greedy (default: the release's %(default)s)")
  parser.add_argument("--top-p", type=cli_types.number_in(0, 1, lo_open=True), default=1.0, help="nucleus sampling mass (default: %(default)s, off)")
  parser.add_argument("--top-k", type=cli_types.int_at_least(0), default=0,
                      help="sample among the k most likely tokens, before --top-p (default: %(default)s, off)")
  parser.add_argument("--seed", type=cli_types.int_at_least(0), default=0, help="sampling seed (default: %(default)s)")
  parser.add_argument("--skip-missing", action="store_true", help="skip and count videos without features")
  parser.add_argument("--max-batches", type=cli_types.int_at_least(1), help="stop after this many batches (rerun to continue)")
  parser.add_argument("--dtype", choices=cli_types.DTYPES_OR_AUTO, default="auto",
                      help="compute/storage dtype; auto: the dtype the model directory stores (default)")
  cli_types.add_quant_argument(parser)
  parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
  xla_flags.use_answering_flags()
  import jax  # pylint: disable=g-import-not-at-top

  from vtimellm_jax.evaluation import annotations as annotations_lib  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.inference import answerer, evaluate, features, generate  # pylint: disable=g-import-not-at-top

  if args.max_batches is not None and args.max_batches < 1:
    raise UserError(f"--max-batches must be at least 1, got {args.max_batches}")
  config = generate.GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_p=args.top_p, top_k=args.top_k)
  grounding = args.grounding_max_new_tokens or min(GROUNDING_MAX_NEW_TOKENS, args.max_new_tokens)
  budgets = {"grounding": grounding, "captioning": args.max_new_tokens}
  annotations = annotations_lib.read_annotations(args.data, args.durations)
  bot = answerer.load_answerer(args.model, args.dtype, args.quant)
  # Read after the model is loaded: what is free is what the answers' KV caches can take.
  batch_sizes, why = evaluate.choose_batch_sizes(bot, annotations, args.task, budgets, args.batch_size,
                                                 jax.devices()[0].memory_stats())
  print(f"eval: {why}", file=sys.stderr)
  source = features.FeatureSource(args.features, args.videos, args.clip, bot.feature_dim, args.dtype)
  summary = evaluate.run_eval(bot, annotations, source, args.task, args.out, config,
                              batch_size=batch_sizes, max_new_tokens=budgets, seed=args.seed,
                              skip_missing=args.skip_missing, max_batches=args.max_batches,
                              progress=not args.no_progress)
  notes = []
  if summary.torn_line_removed:
    notes.append("removed a torn last line (interrupted write)")
  if summary.skipped_videos:
    notes.append(f"skipped {len(summary.skipped_videos)} video(s) without features")
  cut = sum(summary.truncated.values())
  if summary.answered:
    notes.append(f"{cut} answer(s) cut at their token budget without an eos" +
                 (" (" + ", ".join(f"{t} {n} at {budgets[t]} tokens" for t, n in summary.truncated.items()) + ")"
                  if cut else ""))
  print(f"{args.out}: {summary.answered} answered now, {summary.already_done} already logged, "
        f"{summary.remaining} left of {summary.total}" + "".join(f"; {n}" for n in notes), file=sys.stderr)
  return 0
