"""`vtimellm-jax chat`: ask a model about one video, once (--query) or in a multi-turn session.

  vtimellm-jax chat --model ckpt/vtimellm-7b --video demo.mp4 --clip ckpt/clip-vit-l14 \\
      --query "Describe the video in detail."
  vtimellm-jax chat --model ckpt/vtimellm-7b --features feat/v_x.npy --duration 73.1 --json \\
      --query "During which frames can we see a man jumping?"
  vtimellm-jax chat --model ckpt/vtimellm-7b --features feat/v_x.npy     # then type questions

The first user message is "<video>\\n" + the question in the Vicuna v1 prompt; later questions of a
session are appended as further rounds, with every earlier answer, as the model was trained. The
release samples with temperature 0.05; `--temperature 0` is greedy. Moments "from SS to EE" are
also shown in seconds when the video's length is known (from --video, or --duration).
"""

from __future__ import annotations

import argparse
import json
import sys

from vtimellm_jax import cli_types, xla_flags
from vtimellm_jax.errors import UserError

QUIT_WORDS = ("exit", "quit")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from vtimellm_jax.inference import generate  # pylint: disable=g-import-not-at-top

  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.epilog = __doc__.split("\n\n", 1)[1]
  parser.add_argument("--model", required=True, help="VTimeLLM model directory (model.json, params/, tokenizer files)")
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--video", help="video file; its features are computed with --clip")
  source.add_argument("--features", help="stored features .npy: float16 [100, 768] (a video) or [768] (an image)")
  parser.add_argument("--clip", help="CLIP model directory (with --video), a source `convert clip --src` "
                                     "accepts, or 'tiny-random' (random tiny CLIP, smoke tests)")
  parser.add_argument("--query", help="one question; without it, read questions from stdin, one a line, "
                                      "keeping the conversation (empty line skipped, 'exit' or EOF ends)")
  parser.add_argument("--temperature", type=cli_types.number_in(0), default=generate.RELEASE_TEMPERATURE,
                      help="sampling temperature; 0 = greedy (default: the release's %(default)s)")
  parser.add_argument("--top-p", type=cli_types.number_in(0, 1, lo_open=True), default=1.0, help="nucleus sampling mass (default: %(default)s, off)")
  parser.add_argument("--top-k", type=cli_types.int_at_least(0), default=0,
                      help="sample among the k most likely tokens, before --top-p (default: %(default)s, off)")
  parser.add_argument("--max-new-tokens", type=cli_types.int_at_least(1), default=generate.RELEASE_MAX_NEW_TOKENS,
                      help="most tokens per answer (default: %(default)s)")
  parser.add_argument("--duration", type=cli_types.number_in(0, lo_open=True), help="video length in seconds (to show moments in seconds "
                                                     "with --features; --video measures it)")
  parser.add_argument("--json", action="store_true",
                      help='one JSON line per answer: {"answer", "token_ids", "moments" (seconds, null '
                           'without a duration), "frames" (the moments as frame indices)}')
  parser.add_argument("--seed", type=cli_types.int_at_least(0), default=0, help="sampling seed (default: %(default)s)")
  parser.add_argument("--dtype", choices=cli_types.DTYPES_OR_AUTO, default="auto",
                      help="compute/storage dtype; auto: the dtype the model directory stores (default)")
  cli_types.add_quant_argument(parser)


def _video_inputs(args, feature_dim: int):
  """Returns (float32[N, feature_dim] features, duration in seconds or None)."""
  from vtimellm_jax.data import records  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.inference import features  # pylint: disable=g-import-not-at-top

  if args.features is not None:
    return records.read_features(args.features, feature_dim), args.duration
  duration = args.duration if args.duration is not None else features.video_duration(args.video)
  return features.ClipFeaturizer(args.clip, args.dtype)(args.video), duration


def _questions(args):
  """Yields the user's questions: --query, or stdin lines."""
  if args.query is not None:
    if not args.query.strip():
      raise UserError("--query is empty")
    yield args.query
    return
  interactive = sys.stdin.isatty()
  while True:
    if interactive:
      print("USER: ", end="", file=sys.stderr, flush=True)
    line = sys.stdin.readline()
    if not line:
      return
    line = line.strip()
    if line.lower() in QUIT_WORDS:
      return
    if line:
      yield line


def run(args: argparse.Namespace) -> int:
  xla_flags.use_answering_flags()
  import jax  # pylint: disable=g-import-not-at-top

  from vtimellm_jax.inference import answerer, generate, moments, prompts  # pylint: disable=g-import-not-at-top

  config = generate.GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                     top_p=args.top_p, top_k=args.top_k)
  if args.clip is not None and args.video is None:
    raise UserError("--clip is only used with --video")
  if args.video is not None and args.clip is None:
    raise UserError("--video needs --clip (a CLIP model directory) to compute the video's features")
  bot = answerer.load_answerer(args.model, args.dtype, args.quant)
  feats, duration = _video_inputs(args, bot.feature_dim)
  history: list[tuple[str, str]] = []
  key = jax.random.key(args.seed)
  for turn, text in enumerate(_questions(args)):
    question = prompts.chat_question(text) if not history else text
    answer, = bot.answer([(history, question)], [feats], config, jax.random.fold_in(key, turn)[None])
    history.append((question, answer.text))
    if args.json:
      found = moments.find_moments(answer.text)
      print(json.dumps({"answer": answer.text, "token_ids": list(answer.token_ids),
                        "moments": moments.moments_in_seconds(answer.text, duration),
                        "frames": [[m.start, m.end] for m in found]}), flush=True)
    else:
      print(("ASSISTANT: " if args.query is None else "") + moments.annotate(answer.text, duration), flush=True)
  return 0
