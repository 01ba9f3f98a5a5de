"""`vtimellm-jax serve`: answer chat completions about videos over HTTP, concurrent requests batched.

  vtimellm-jax serve --model ckpt/vtimellm-7b --clip ckpt/clip-vit-l14 --media-root /data/videos
  vtimellm-jax serve --model quickstart --media-root quickstart/corpus     # right after `quickstart`

  curl -s localhost:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{"messages": [
    {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "file:///data/videos/x.mp4"}},
                                 {"type": "text", "text": "During which frames can we see a dog?"}]}],
    "temperature": 0}'

The answer is an OpenAI chat completion plus "moments" (every "from SS to EE" of the answer, in
frames and seconds); with "stream": true it comes as OpenAI's server-sent events, token by token,
and GET /v1/models lists the served model, so the `openai` client works as it is. --slots
requests decode together (continuous batching: a finished answer's slot goes to the next waiting
request at once); each slot holds a KV cache of --context positions.
It binds 127.0.0.1 unless --host says otherwise, reads media only under --media-root folders, and
with --api-key (or VTIMELLM_API_KEY) every /v1 request needs "Authorization: Bearer <key>".
docs/serving.md has the request format and the figures of `vtimellm-jax bench serve`.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from vtimellm_jax import cli_types, xla_flags
from vtimellm_jax.errors import UserError

API_KEY_ENV = "VTIMELLM_API_KEY"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from vtimellm_jax.inference import generate  # pylint: disable=g-import-not-at-top

  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.epilog = __doc__.split("\n\n", 1)[1]
  parser.add_argument("--model", required=True, help="VTimeLLM model directory, or a quickstart workdir")
  parser.add_argument("--clip", help="CLIP model directory for video files (a quickstart workdir brings its own); "
                                     "without it only features .npy are taken")
  parser.add_argument("--media-root", action="append", default=[], metavar="DIR",
                      help="a folder requests may read videos and features from (repeatable); none: no media")
  parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
  parser.add_argument("--port", type=cli_types.int_at_least(0), default=8000, help="(default: %(default)s)")
  parser.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV} if set)")
  parser.add_argument("--slots", type=cli_types.int_at_least(1), default=8,
                      help="requests decoded together (KV-cache rows; default: %(default)s)")
  parser.add_argument("--context", type=cli_types.int_at_least(2),
                      help="positions per slot: prompt + answer (default: the model's maximum)")
  parser.add_argument("--max-new-tokens", type=cli_types.int_at_least(1), default=generate.RELEASE_MAX_NEW_TOKENS,
                      help="answer budget of requests without max_tokens (default: %(default)s)")
  parser.add_argument("--max-waiting", type=cli_types.int_at_least(0), default=256,
                      help="requests that may wait for a slot; more get 503 (default: %(default)s)")
  parser.add_argument("--dtype", choices=cli_types.DTYPES_OR_AUTO, default="auto",
                      help="compute/storage dtype; auto: the dtype the model directory stores (default)")
  cli_types.add_quant_argument(parser)


def _is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def run(args: argparse.Namespace) -> int:
  xla_flags.use_answering_flags()
  try:
    import starlette  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
    import uvicorn  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise UserError(f"serve needs its extra: pip install 'vtimellm-jax[serve]' ({e})") from None
  from vtimellm_jax.inference import server  # pylint: disable=g-import-not-at-top

  api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
  if not _is_loopback(args.host) and api_key is None:
    print(f"warning: listening on {args.host} without an API key: anyone who reaches it may ask questions "
          f"about the files under --media-root", file=sys.stderr)
  if not args.media_root:
    print("warning: no --media-root: requests can name no video or features file", file=sys.stderr)
  service = server.load_service(args.model, args.clip, slots=args.slots, context=args.context,
                                media_roots=args.media_root, max_new_tokens=args.max_new_tokens,
                                max_waiting=args.max_waiting, dtype=args.dtype, quant=args.quant)
  app = server.create_app(service, api_key)
  uvicorn.run(app, host=args.host, port=args.port, log_level="info", http=server.http_protocol())
  return 0
