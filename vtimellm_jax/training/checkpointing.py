"""Training checkpoints: what trains, its optimizer state, the step and the data iterator's state.

One orbax `CheckpointManager` per workdir (`{workdir}/checkpoints/{step}/`) with four items:
`params` (trainable parameters only; the frozen base is referenced by the run's config),
`opt_state`, `data` (the Grain iterator state, so a resumed run continues on the exact next batch)
and `meta` (step, config). Saves are asynchronous and atomic: a run killed mid-save leaves the
previous checkpoint as the latest.
"""

from __future__ import annotations

import pathlib
from typing import Any

import orbax.checkpoint as ocp
from etils import epath

from vtimellm_jax import model_io
from vtimellm_jax.errors import UserError
from vtimellm_jax.models import load

CHECKPOINT_DIR = "checkpoints"


def workdir_path(workdir: str | pathlib.Path) -> epath.Path:
  """Returns the workdir as a path that may be local or on a bucket (gs://...), made absolute."""
  path = epath.Path(workdir)
  return path if "://" in str(workdir) else path.resolve()


class TrainCheckpointer:
  """Saves and restores the training state of one workdir."""

  def __init__(self, workdir: str | pathlib.Path, every_steps: int, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=every_steps, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(workdir_path(workdir) / CHECKPOINT_DIR, options=options,
                                         item_names=("params", "opt_state", "data", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, params: Any, opt_state: Any, data_state: dict, meta: dict, force: bool = False) -> bool:
    """Saves when `step` is due (or `force`); returns whether a save started."""
    return self.manager.save(step, args=ocp.args.Composite(
        params=ocp.args.StandardSave(params), opt_state=ocp.args.StandardSave(opt_state),
        data=ocp.args.JsonSave(data_state), meta=ocp.args.JsonSave(meta)), force=force)

  def restore(self, step: int, abstract_params: Any, abstract_opt_state: Any) -> tuple[Any, Any, dict, dict]:
    """Returns (params, opt_state, data_state, meta) of `step`, placed like the abstract targets."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params), opt_state=ocp.args.StandardRestore(abstract_opt_state),
        data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    return restored.params, restored.opt_state, restored.data, restored.meta

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def latest_step(workdir: str | pathlib.Path) -> int | None:
  """Returns the newest checkpoint step of a workdir, or None when it has none.

  Read from the directory listing as the training manager reads it (finished saves only), without
  a manager: a read-only one warns about each option it overrides and about being read-only, on
  every resume, export and stage that reads an earlier one.
  """
  directory = workdir_path(workdir) / CHECKPOINT_DIR
  if not directory.is_dir():
    return None
  latest = ocp.step.latest_step_metadata(directory, ocp.step.standard_name_format())
  return None if latest is None else latest.step


def params_source(workdir: str | pathlib.Path, step: int | None = None, keep=lambda path: True,
                  what: str = "trained parameters") -> load.DirectorySource:
  """Returns the trained parameters of a workdir's latest (or given) checkpoint as a loader source.

  Only paths `keep` accepts are offered. UserError when the workdir has no such checkpoint.
  """
  step = latest_step(workdir) if step is None else step
  step_dir = workdir_path(workdir) / CHECKPOINT_DIR / str(step)
  if step is None or not step_dir.is_dir():
    raise UserError(f"{workdir}: no checkpoint{'' if step is None else f' at step {step}'} found")
  return load.DirectorySource(step_dir, name=f"{workdir} ({what}, step {step})", keep=keep)


def restore_params(workdir: str | pathlib.Path, step: int | None = None) -> dict | None:
  """Returns the trained parameters (nested dict of host arrays) of a workdir's latest (or given) checkpoint, or None."""
  step = latest_step(workdir) if step is None else step
  if step is None:
    return None
  return model_io.load_params(workdir_path(workdir) / CHECKPOINT_DIR / str(step))
