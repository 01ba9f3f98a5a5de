"""Training logs: a progress bar with ETA, a console line every K steps, TensorBoard and JSON lines.

`{workdir}/metrics.jsonl` holds one line per step ({"step", "loss", "lr", ...}), each step once: a
run resumed from the checkpoint of step S first drops the lines after S (steps run after that
checkpoint, before the run was stopped, which it runs again). TensorBoard event files go to
`{workdir}/tensorboard/`. Only process 0 writes.
"""

from __future__ import annotations

import json
import os
import pathlib
from tqdm import tqdm


def _drop_steps_after(path: pathlib.Path, step: int) -> None:
  """Rewrites a step log without its lines after `step` (and without a torn last line)."""
  if not path.exists():
    return
  kept, dropped = [], 0
  for line in path.read_text().splitlines(keepends=True):
    try:
      keep = line.endswith("\n") and json.loads(line)["step"] <= step
    except (json.JSONDecodeError, KeyError, TypeError):
      keep = False
    kept += [line] if keep else []
    dropped += not keep
  if dropped:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


class MetricsLog:
  """Receives per-step metrics and writes them to the console, TensorBoard and metrics.jsonl."""

  def __init__(self, workdir: pathlib.Path, total_steps: int, start_step: int, every: int, enabled: bool = True):
    self.enabled, self.every = enabled, max(1, every)
    self.window: list[dict] = []
    if not enabled:
      return
    path = pathlib.Path(workdir) / "metrics.jsonl"
    _drop_steps_after(path, start_step)
    self.jsonl = open(path, "a")
    self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
    try:
      from tensorboardX import SummaryWriter
      self.writer = SummaryWriter(str(pathlib.Path(workdir) / "tensorboard"))
    except ImportError:  # TensorBoard files are a convenience; the JSON lines always exist
      self.writer = None

  def record(self, step: int, metrics: dict[str, float]) -> None:
    if not self.enabled:
      return
    self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self.jsonl.flush()
    if self.writer is not None:
      for name, value in metrics.items():
        self.writer.add_scalar(f"train/{name}", value, step)
    self.window.append(metrics)
    self.bar.update(1)
    self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")
    if step % self.every == 0:
      mean = lambda k: sum(m[k] for m in self.window) / len(self.window)  # noqa: E731
      self.bar.write(f"step {step}: loss {mean('loss'):.4f}  lr {metrics['lr']:.3g}  grad_norm {mean('grad_norm'):.3f}  "
                     f"{mean('tokens_per_s'):,.0f} tokens/s  {mean('step_time'):.3f} s/step  "
                     f"{mean('tflops_per_s'):.2f} TFLOP/s  MFU {100 * mean('mfu'):.1f}%  padding {100 * mean('padding'):.1f}%")
      self.window = []

  def close(self) -> None:
    if not self.enabled:
      return
    self.bar.close()
    self.jsonl.close()
    if self.writer is not None:
      self.writer.close()
