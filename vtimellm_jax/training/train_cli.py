"""`vtimellm-jax train --config configs/stageN.py:SIZE --workdir DIR [--config.a.b=value ...]`."""

from __future__ import annotations

import argparse

ACCEPTS_CONFIG_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, help="config file and argument, e.g. configs/stage2.py:7b")
  parser.add_argument("--workdir", required=True, help="checkpoints, logs and the run's config go here; rerun to resume")
  parser.add_argument("--dry-run", action="store_true", help="compile the step for every bucket, print memory, do not train")
  parser.epilog = "Any config field can be overridden: --config.optim.lr=2e-4 --config.data.json=train.json"


def run(args: argparse.Namespace) -> int:
  from vtimellm_jax.training import config_loading, trainer

  config = config_loading.load_config(args.config, args.config_overrides)
  trainer.train(config, args.workdir, dry_run=args.dry_run)
  return 0
