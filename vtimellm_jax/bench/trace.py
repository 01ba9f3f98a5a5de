"""A `jax.profiler` trace of exactly one call, written as two flat files a device run can bring back.

`jax.profiler.trace(dir)` writes `dir/plugins/profile/<date>/<host>.xplane.pb` (TensorBoard's and
xprof's format) and, asked to, a `perfetto_trace.json.gz` (https://ui.perfetto.dev opens it). The
benchmarks' `--profile-dir DIR` traces one warm call into a scratch folder and moves the two files to
`DIR/<name>.xplane.pb` and `DIR/<name>.perfetto.json.gz`: one level down, named in plain letters,
which is what a device run's output folder returns.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile
import time
from collections.abc import Callable


def trace_one_call(fn: Callable[[], object], profile_dir: str | os.PathLike, name: str) -> dict:
  """Returns {"trace_s": seconds traced, "trace_files": [paths]} of one call of `fn` under the profiler.

  Warm `fn` up first (a compile would fill the trace), and have it block until its device work is
  done (`jax.block_until_ready`), so the trace holds all of it.
  """
  import jax  # pylint: disable=g-import-not-at-top

  out = pathlib.Path(profile_dir)
  out.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=out, prefix=f".{name}-") as scratch:
    start = time.perf_counter()
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0  # every Python call of the run would be most of the file
    with jax.profiler.trace(scratch, create_perfetto_trace=True, profiler_options=options):
      fn()
    seconds = time.perf_counter() - start
    found = {path.name: path for path in pathlib.Path(scratch).rglob("*") if path.is_file()}
    written = []
    for source, suffix in ((next((p for n, p in found.items() if n.endswith(".xplane.pb")), None), "xplane.pb"),
                           (found.get("perfetto_trace.json.gz"), "perfetto.json.gz")):
      if source is not None:
        target = out / f"{name}.{suffix}"
        shutil.move(source, target)
        written.append(str(target))
  return {"trace_s": round(seconds, 4), "trace_files": written}
