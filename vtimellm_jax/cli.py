"""The `vtimellm-jax` command: one entry point, one module per subcommand.

Each subcommand module exposes `add_arguments(parser)` and `run(args) -> int`. Modules are imported
only when their command runs (a parser stub is built from `_COMMANDS`), so `vtimellm-jax --help`
stays fast and a missing optional dependency only affects its own command.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from vtimellm_jax import errors, quiet

# command path -> (module, one-line help)
_COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("quickstart",): ("vtimellm_jax.quickstart", "the whole recipe on a synthetic corpus: videos in, metrics out"),
    ("convert", "llama"): ("vtimellm_jax.convert.llama_cli", "HF LLaMA/Vicuna directory -> JAX checkpoint"),
    ("convert", "chatglm"): ("vtimellm_jax.convert.chatglm_cli", "ChatGLM3 directory (original or HF Glm names) -> JAX checkpoint"),
    ("convert", "clip"): ("vtimellm_jax.convert.clip_cli", "OpenAI / HF / open_clip CLIP -> JAX checkpoint"),
    ("convert", "release"): ("vtimellm_jax.convert.release_cli", "released VTimeLLM (Vicuna or ChatGLM3 + projector + LoRA folders) -> JAX model"),
    ("extract-features",): ("vtimellm_jax.video.extract_cli", "videos or images -> CLIP feature .npy files"),
    ("data", "preview"): ("vtimellm_jax.data.preview_cli", "show one record's prompt, tokens and labels"),
    ("data", "check"): ("vtimellm_jax.data.check_cli", "report every unusable record of a dataset"),
    ("train",): ("vtimellm_jax.training.train_cli", "train a stage from a config file (resumes from --workdir)"),
    ("export",): ("vtimellm_jax.training.export_cli", "a training workdir -> one inference model directory"),
    ("bench",): ("vtimellm_jax.bench.bench_cli", "throughput benchmarks: train, decode, clip (JSON lines)"),
    ("metrics",): ("vtimellm_jax.evaluation.metrics_cli", "grounding and dense-captioning metrics of an answer log"),
    ("chat",): ("vtimellm_jax.inference.chat_cli", "ask a model about a video (one question or a session)"),
    ("eval",): ("vtimellm_jax.inference.eval_cli", "answer the release's grounding/captioning queries into a log"),
    ("serve",): ("vtimellm_jax.inference.serve_cli", "HTTP chat completions about videos, concurrent requests batched"),
    ("demo",): ("vtimellm_jax.inference.demo_cli", "a web page to chat about a video, its moments clickable"),
}


def _build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, dict]:
  parser = argparse.ArgumentParser(prog="vtimellm-jax", description=__doc__.splitlines()[0], allow_abbrev=False)
  subparsers = {(): parser.add_subparsers(dest="command", metavar="COMMAND", required=True)}
  parsers = {}
  for path, (module_name, help_text) in _COMMANDS.items():
    for depth in range(1, len(path)):
      prefix = path[:depth]
      if prefix not in parsers:
        group = subparsers[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} subcommands")
        parsers[prefix] = group
        subparsers[prefix] = group.add_subparsers(dest="_".join(prefix), metavar="SUBCOMMAND", required=True)
    leaf = subparsers[path[:-1]].add_parser(path[-1], help=help_text, description=help_text)
    leaf.set_defaults(_module=module_name)
    parsers[path] = leaf
  # Only the chosen command's module is imported, to add its real arguments.
  words = [w for w in argv if not w.startswith("-")]
  for path, (module_name, _) in _COMMANDS.items():
    if tuple(words[: len(path)]) == path:
      importlib.import_module(module_name).add_arguments(parsers[path])
  return parser, parsers


def main(argv: list[str] | None = None) -> int:
  quiet.setup()  # before any command imports the libraries it quiets
  argv = list(sys.argv[1:] if argv is None else argv)
  parser, _ = _build_parser(argv)
  args, extra = parser.parse_known_args(argv)
  module = importlib.import_module(args._module)
  # Commands that take a config accept `--config.a.b=value` overrides; anything else is an error.
  if extra and not (getattr(module, "ACCEPTS_CONFIG_OVERRIDES", False) and all(e.startswith("--config.") for e in extra)):
    parser.error(f"unrecognized arguments: {' '.join(extra)}")
  args.config_overrides = extra
  try:
    return int(module.run(args) or 0)
  except errors.UserError as e:
    # Bad input is reported, not dumped as a traceback.
    print(f"vtimellm-jax: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    # A second Ctrl-C during training, or one during any other command: every command's output is
    # written whole or not at all, and a rerun resumes.
    print("vtimellm-jax: interrupted", file=sys.stderr)
    return 130


if __name__ == "__main__":
  sys.exit(main())
