"""`vtimellm-jax train --config configs/stageN.py:SIZE --workdir DIR [--config.a.b=value ...]`."""

from __future__ import annotations

import argparse

from vtimellm_jax import cli_types

ACCEPTS_CONFIG_OVERRIDES = True


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--config", required=True, help="config file and argument, e.g. configs/stage2.py:7b")
  parser.add_argument("--workdir", required=True, help="checkpoints, logs and the run's config go here; rerun to resume")
  parser.add_argument("--dry-run", action="store_true", help="compile the step for every bucket, print memory, do not train")
  parser.add_argument("--topology", default="", help="a preset of configs/topologies.py (v5e-16, 8xH100, cpu-8, ...): "
                      "sets the mesh and micro-batch; with --dry-run, compiles for it without its hardware or data")
  parser.add_argument("--seq-len", type=cli_types.int_at_least(0), default=0, help="with --dry-run: compile one step of this sequence length "
                      "from shapes alone (no data files); default with --topology: config.data.max_length")
  parser.add_argument("--num-features", type=cli_types.int_at_least(1), default=100, help="with --seq-len: feature rows per sample "
                      "(100 video frames; 1 for stage-1 images)")
  parser.add_argument("--allow-config-change", action="store_true", help="resume a workdir whose checkpoint was "
                      "trained with other settings than these (run.json lists them; it is kept as run.N.json)")
  parser.epilog = ("Any config field can be overridden: --config.optim.lr=2e-4 --config.data.json=train.json. "
                   "Exit status: 0 done, 1 or 2 an error, 143 (SIGTERM) or 130 (SIGINT) stopped after a step with "
                   "a checkpoint of it: rerun to resume.")


def run(args: argparse.Namespace) -> int:
  from vtimellm_jax.training import config_files, config_loading, trainer

  topologies = config_files.bundled("topologies")

  config = config_loading.load_config(args.config, args.config_overrides)
  # A preset sets the micro-batch, but one given on the command line wins (e.g. to find what fits).
  micro_batch = config.micro_batch if any(o.startswith("--config.micro_batch=") for o in args.config_overrides) else 0
  if args.dry_run and (args.topology or args.seq_len):
    from vtimellm_jax.training import aot

    report = aot.compile_step(config, args.topology, args.seq_len, args.num_features, micro_batch=micro_batch)
    return 1 if report.fits is False else 0
  if args.topology:
    from vtimellm_jax.training import aot

    topologies.apply(config, aot.resolve(args.topology))
    config.micro_batch = micro_batch or config.micro_batch
  from vtimellm_jax.training import preemption

  summary = trainer.train(config, args.workdir, dry_run=args.dry_run, allow_config_change=args.allow_config_change)
  return preemption.EXIT_STATUS.get(summary.get("stopped_by"), 0)
