"""Third-party messages that do not apply to a user of this project, silenced once at the start of a command.

`setup()` (called first by `cli.main`) silences each at its source and nothing else, so real
warnings and errors of the same libraries still come through:

- transformers' "PyTorch was not found ..." on import: only its tokenizers and configs are used
  here, which need no PyTorch. transformers' own switch for its advisory messages
  (`TRANSFORMERS_NO_ADVISORY_WARNINGS`, which this message alone uses) is set in the environment,
  so processes a command starts inherit it.
- orbax's "Metadata file does not exist: .../{step}/{item}/_CHECKPOINT_METADATA" (absl logger)
  when a training checkpoint's item is read on its own (resume checks, exports, a stage reading
  the one before): a `CheckpointManager` keeps that file one level up, in the step's directory.
  A model directory missing its own metadata is still reported.
- The leftovers of a checkpoint read that failed (a torn file, which resume reports in one line
  and falls back past): orbax gathers the reads of every array at once and closes its event loop
  when the first fails, so the reads still in flight end later, each printing a traceback as an
  "unraisable" exception: orbax's coroutines raise again as they are closed, and TensorStore's
  completion callbacks find their loop closed ("RuntimeError: Event loop is closed"). The
  operation's own error has been raised by then. The hook drops exactly those two kinds and hands
  every other one to the previous hook.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import types

NO_ADVISORY_ENV = "TRANSFORMERS_NO_ADVISORY_WARNINGS"
# An item directory of a CheckpointManager step: {checkpoints}/{step}/{item}/_CHECKPOINT_METADATA.
_ITEM_METADATA = re.compile(r"[/\\]\d+[/\\][^/\\]+[/\\]_CHECKPOINT_METADATA$")
_done = False


def setup() -> None:
  """Installs the filters above (once per process; later calls do nothing)."""
  global _done
  if _done:
    return
  _done = True
  os.environ.setdefault(NO_ADVISORY_ENV, "1")
  # absl's logger must be made by absl (an ABSLLogger), so absl is imported before it is looked up.
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  absl_logging.get_absl_logger().addFilter(keep_absl_record)
  sys.unraisablehook = _UnraisableFilter(sys.unraisablehook)


def keep_absl_record(record: logging.LogRecord) -> bool:
  """Returns False for orbax's missing-metadata warning about a training checkpoint's item."""
  if record.msg == "Metadata file does not exist: %s" and record.args:
    return not _ITEM_METADATA.search(str(record.args[0]))
  return True


def is_failed_read_leftover(unraisable) -> bool:
  """Returns whether an unraisable exception (`sys.UnraisableHookArgs`) is the leftover of a failed orbax read."""
  obj = unraisable.object
  if isinstance(obj, (types.CoroutineType, types.AsyncGeneratorType)):
    code = getattr(obj, "cr_code", None) or getattr(obj, "ag_code", None)
    return code is not None and _in_orbax(code.co_filename)
  if obj is None and unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
    # Raised by asyncio when a callback from outside Python (TensorStore) reaches a closed loop.
    frames = [tb.tb_frame.f_code.co_name for tb in _tracebacks(unraisable.exc_traceback)]
    return frames[:1] == ["call_soon_threadsafe"] and frames[-1:] == ["_check_closed"]
  return False


class _UnraisableFilter:
  """A `sys.unraisablehook` that drops failed-read leftovers and passes everything else on."""

  def __init__(self, previous):
    self.previous = previous

  def __call__(self, unraisable) -> None:
    if not is_failed_read_leftover(unraisable):
      self.previous(unraisable)


def _in_orbax(filename: str) -> bool:
  orbax = sys.modules.get("orbax.checkpoint")  # a coroutine of orbax's exists only once orbax is imported
  return orbax is not None and filename.startswith(os.path.dirname(orbax.__file__) + os.sep)


def _tracebacks(tb):
  while tb is not None:
    yield tb
    tb = tb.tb_next
