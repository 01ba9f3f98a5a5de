"""`vtimellm-jax demo`: a web page to chat with a model about a video, its moments clickable.

  vtimellm-jax quickstart --workdir quickstart
  vtimellm-jax demo --model quickstart            # then open http://127.0.0.1:7860
  vtimellm-jax demo --model quickstart --example my_video.mp4
  vtimellm-jax demo --model ckpt/vtimellm-7b --clip ckpt/clip-vit-l14 --dtype bfloat16

--model is a model directory (with --clip) or a quickstart workdir (its serving.json names the CLIP
and the feature statistics the model was trained on). The page binds 127.0.0.1: --host 0.0.0.0
shows it to the network, with no authentication. Without --example, a checkout of the repository
lists the release's demo video (a test fixture there); an installed package lists none. Needs
gradio: pip install 'vtimellm-jax[demo]'.
"""

from __future__ import annotations

import argparse
import pathlib

from vtimellm_jax import cli_types, xla_flags

# The checkout this file would sit in (vtimellm_jax/inference/ under it). The release's demo video is
# a test fixture there (CC BY-NC-ND, its licence note in tests/fixtures/README.md) that the package
# does not ship; the command, not the library, looks for it, and only in a checkout.
_CHECKOUT = pathlib.Path(__file__).resolve().parents[2]
CHECKOUT_DEMO_VIDEO = _CHECKOUT / "tests" / "fixtures" / "vtimellm_official" / "demo.mp4"


def checkout_examples() -> list[pathlib.Path]:
  """Returns the default examples: the release's demo video when this runs from a checkout, else none.

  A checkout is told by its pyproject.toml beside tests/: an installed package's parent folder
  (site-packages) has none, whatever else was installed there.
  """
  in_checkout = (_CHECKOUT / "pyproject.toml").is_file() and CHECKOUT_DEMO_VIDEO.is_file()
  return [CHECKOUT_DEMO_VIDEO] if in_checkout else []


def add_arguments(parser: argparse.ArgumentParser) -> None:
  from vtimellm_jax.inference import demo, generate  # pylint: disable=g-import-not-at-top

  parser.formatter_class = argparse.RawDescriptionHelpFormatter
  parser.epilog = __doc__.split("\n\n", 1)[1]
  parser.add_argument("--model", required=True, help="VTimeLLM model directory, or a quickstart workdir (serving.json)")
  parser.add_argument("--clip", help="CLIP model directory (or a source `convert clip --src` accepts) that encodes "
                                     "the videos; a quickstart workdir names its own")
  parser.add_argument("--host", default=demo.DEFAULT_HOST, help="address to bind (default: %(default)s, this machine only)")
  parser.add_argument("--port", type=cli_types.int_at_least(1), default=demo.DEFAULT_PORT, help="port (default: %(default)s)")
  parser.add_argument("--dtype", choices=cli_types.DTYPES_OR_AUTO, default="auto",
                      help="compute/storage dtype; auto: the dtype the model directory stores (default)")
  cli_types.add_quant_argument(parser)
  parser.add_argument("--example", action="append", default=[], metavar="VIDEO",
                      help="a video listed under the player as an example (repeatable; default: the release's "
                           "demo video when run from a checkout, which keeps it in tests/fixtures)")
  parser.add_argument("--max-new-tokens", type=cli_types.int_at_least(1), default=generate.RELEASE_MAX_NEW_TOKENS,
                      help="most tokens per answer (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
  xla_flags.use_answering_flags()
  from vtimellm_jax.inference import demo  # pylint: disable=g-import-not-at-top

  demo.serve(args.model, args.clip, args.host, args.port, args.dtype, args.max_new_tokens,
             args.example or checkout_examples(), quant=args.quant)
  return 0
