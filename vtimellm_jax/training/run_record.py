"""`{workdir}/run.json`: the settings a training run was started with, and what a rerun may change.

Rerunning a workdir resumes its checkpoint, so the rerun must go on training the same thing the same
way. Settings that only say how the run executes (`RUN_ONLY`: mesh, micro-batch, remat, attention
kernel, loss chunk, loader workers, logging and checkpoint cadence) may differ between reruns. Any
other difference (model, LoRA, what trains, data, batch, schedule, seed) is refused with the list
of differences while the workdir holds a checkpoint, unless the rerun says `allow_changes`
(`train --allow-config-change`). run.json is never overwritten in place: when it changes, the
previous one is kept as `run.{n}.json`.
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
  """Returns (dotted key, saved value, current value) for every setting that differs."""
  before, after = _flat(saved), _flat(current)
  missing = object()
  return [(key, before.get(key, missing), after.get(key, missing)) for key in sorted(before.keys() | after.keys())
          if before.get(key, missing) != after.get(key, missing)]


def _show(value) -> str:
  return "(absent)" if not isinstance(value, (str, int, float, bool, list, type(None))) else json.dumps(value)


def record_run(workdir: epath.Path, config: ml_collections.ConfigDict, *, has_checkpoint: bool,
               allow_changes: bool = False, write: bool = True, log: Callable[[str], None] = print) -> None:
  """Checks a (re)run's config against the workdir's run.json and records it there.

  Raises:
    UserError: the workdir holds a checkpoint trained with other settings (not `RUN_ONLY`) and
      `allow_changes` is off; the message lists each difference.
  """
  path = workdir / RUN_JSON
  current = json.loads(config.to_json())
  if path.exists():
    try:
      saved = json.loads(path.read_text())
    except (OSError, ValueError) as e:
      raise UserError(f"{path}: not readable JSON ({e}); move it away to start the run afresh") from None
    changes = differences(saved, current)
    if not changes:
      return
    binding = [c for c in changes if not is_run_only(c[0])]
    if binding and has_checkpoint and not allow_changes:
      shown = "\n".join(f"  - {key}: {_show(old)} in run.json, {_show(new)} now" for key, old, new in binding)
      raise UserError(f"{workdir}: this rerun would resume a checkpoint trained with other settings:\n{shown}\n"
                      "Train into a new --workdir, rerun with the settings in run.json, or pass "
                      "--allow-config-change to resume with these (run.json is kept as run.N.json).")
    if write:
      n = 1
      while (workdir / f"run.{n}.json").exists():
        n += 1
      path.rename(workdir / f"run.{n}.json")
      log(f"settings changed since the last run ({', '.join(key for key, _, _ in changes)}); "
          f"the previous run.json is kept as run.{n}.json")
  if write:
    workdir.mkdir(parents=True, exist_ok=True)
    path.write_text(config.to_json(indent=2))
