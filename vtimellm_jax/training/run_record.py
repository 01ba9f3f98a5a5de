"""`{workdir}/run.json`: the settings a training run was started with, and what a rerun may change.

Rerunning a workdir resumes its checkpoint, so the rerun must go on training the same thing the same
way. Settings that only say how the run executes (`RUN_ONLY`: mesh, micro-batch, remat, attention
kernel, loss chunk, loader workers, logging and checkpoint cadence) may differ between reruns. Any
other difference (model, LoRA, what trains, data, batch, schedule, seed) is refused with the list
of differences while the workdir holds a checkpoint, unless the rerun says `allow_changes`
(`train --allow-config-change`). run.json is never overwritten in place: when it changes, the
previous one is kept as `run.{n}.json`.

A run.json written by another version of vtimellm-jax may lack a field today's config has (added
since) or hold one it no longer has. Only the fields both have are compared: a missing field is
named in one line and takes today's value (a field is added with the default that keeps the old
behaviour), an unknown one is named in one line and ignored.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import ml_collections
from etils import epath

from vtimellm_jax.errors import UserError

RUN_JSON = "run.json"

# Dotted keys (or prefixes ending in ".") whose change leaves what is trained, and how, as it was.
RUN_ONLY = ("mesh.", "micro_batch", "model.remat", "model.attention_impl", "model.loss_chunk", "data.workers",
            "log_every", "checkpoint.")
# Settings that set the run's length, and with it the learning-rate schedule: changing one is how a
# run is extended, which the refusal explains.
LENGTH = ("max_steps", "epochs")

# There is no flag that extends a run; the refusal of a new length names the two ways there are.
_EXTEND_HINT = (
    "\nTo train this run for longer on purpose: pass --allow-config-change with the new max_steps (or "
    "epochs). It resumes the newest checkpoint's parameters, optimizer state and data position, and the "
    "learning-rate schedule is recomputed for the new length, so the rate changes at the resumed step "
    "(warmup and cosine stretch to the new total). For a fresh schedule instead, export the run "
    "(vtimellm-jax export --workdir {workdir} --out DIR) and train into a new --workdir with "
    "--config.model.base=DIR: the exported model (LoRA merged) is the new run's base, and its data "
    "starts from the beginning.")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for key, value in tree.items():
    out.update(_flat(value, f"{prefix}{key}." if isinstance(value, dict) else f"{prefix}{key}"))
  return out


def is_run_only(key: str) -> bool:
  return any(key.startswith(p) if p.endswith(".") else key == p for p in RUN_ONLY)


def differences(saved: dict, current: dict) -> list[tuple[str, Any, Any]]:
  """Returns (dotted key, saved value, current value) for every setting both have that differs."""
  before, after = _flat(saved), _flat(current)
  return [(key, before[key], after[key]) for key in sorted(before.keys() & after.keys()) if before[key] != after[key]]


def record_run(workdir: epath.Path, config: ml_collections.ConfigDict, *, has_checkpoint: bool,
               allow_changes: bool = False, write: bool = True, log: Callable[[str], None] = print) -> None:
  """Checks a (re)run's config against the workdir's run.json and records it there.

  Fields only one of them has (another version wrote run.json) are named in the log, one line for
  those run.json lacks and one for those it has in excess, and are not compared.

  Raises:
    UserError: the workdir holds a checkpoint trained with other settings (not `RUN_ONLY`) and
      `allow_changes` is off; the message lists each difference, and how to extend the run on
      purpose when its length (`LENGTH`) is among them.
  """
  path = workdir / RUN_JSON
  current = json.loads(config.to_json())
  if path.exists():
    try:
      saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise UserError(f"{path}: not readable JSON ({e}); move it away to start the run afresh") from None
    before, after = _flat(saved), _flat(current)
    missing, unknown = sorted(after.keys() - before.keys()), sorted(before.keys() - after.keys())
    changes = differences(saved, current)
    if not (changes or missing or unknown):
      return
    binding = [c for c in changes if not is_run_only(c[0])]
    if binding and has_checkpoint and not allow_changes:
      shown = "\n".join(f"  - {key}: {json.dumps(old)} in run.json, {json.dumps(new)} now" for key, old, new in binding)
      raise UserError(f"{workdir}: this rerun would resume a checkpoint trained with other settings:\n{shown}\n"
                      "Train into a new --workdir, rerun with the settings in run.json, or pass "
                      "--allow-config-change to resume with these (run.json is kept as run.N.json)."
                      + (_EXTEND_HINT.format(workdir=workdir) if any(key in LENGTH for key, _, _ in binding) else ""))
    if write:
      if missing:
        log(f"{path} predates config field(s) {', '.join(missing)} (an older vtimellm-jax wrote it); "
            f"taking today's: {', '.join(f'{key}={json.dumps(after[key])}' for key in missing)}")
      if unknown:
        log(f"{path} has config field(s) this vtimellm-jax no longer has, ignored: "
            f"{', '.join(f'{key}={json.dumps(before[key])}' for key in unknown)}")
      n = 1
      while (workdir / f"run.{n}.json").exists():
        n += 1
      path.rename(workdir / f"run.{n}.json")
      what = (f"settings changed since the last run ({', '.join(key for key, _, _ in changes)})" if changes
              else "run.json rewritten with today's config fields")
      log(f"{what}; the previous run.json is kept as run.{n}.json")
  if write:
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_json(indent=2))

