"""The feature-extraction pipeline: list inputs, decode in CPU threads, preprocess and encode in jitted batches, save.

Decoding runs in a thread pool (FFmpeg releases the GIL), a bounded window of videos ahead of the
encoder. The host only decodes the sampled frames to uint8 and slices the window the crop reads
(`preprocess.source_window`); resize, crop and normalisation run on the device, inside the encoder's
jit (`preprocess.device_pixels`). The main thread packs whole videos into batches of a fixed
number of videos, padded to a size bucket, so a corpus of mixed resolutions compiles one program
per bucket, and writes each `{id}.npy` atomically (`model_io.write_atomic`: temp file + rename, or
one whole object on a gs:// bucket), so an interrupted run resumes by skipping the ids already
written. Unreadable inputs are recorded in `failures.jsonl`
with the reason and the run goes on.

Every caller encodes through `BatchEncoder` (`extract-features`, `chat --video` / `eval --videos`
through `inference/features.py`, `bench clip`), so there is one preprocessing path.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import sys
from collections.abc import Callable, Iterator
from concurrent import futures

import numpy as np
from etils import epath

from vtimellm_jax import model_io
from vtimellm_jax.errors import UserError
from vtimellm_jax.video import decode, preprocess, sampling

IMAGE_EXTENSIONS = frozenset(".jpg .jpeg .png .bmp .webp .gif .tif .tiff".split())
LIST_EXTENSIONS = frozenset({".txt", ".lst"})
FAILURES = "failures.jsonl"


@dataclasses.dataclass(frozen=True)
class Item:
  id: str
  path: pathlib.Path


@dataclasses.dataclass
class Failure:
  id: str
  path: str
  reason: str


def list_inputs(spec: str | pathlib.Path, images: bool) -> tuple[list[Item], list[Failure]]:
  """Returns (inputs, failures) for a directory (searched recursively), a file, or a .txt list of paths.

  The id of a file is its name without extension; a second file with the same id is a failure.
  Paths in a list file are relative to the list file's folder.
  """
  spec = pathlib.Path(spec)
  extensions = IMAGE_EXTENSIONS if images else frozenset(decode.VIDEO_EXTENSIONS)
  if spec.is_dir():
    paths = sorted(p for p in spec.rglob("*") if p.is_file() and p.suffix.lower() in extensions
                   and not p.name.startswith("."))
  elif spec.is_file() and spec.suffix.lower() in LIST_EXTENSIONS:
    try:
      lines = spec.read_text().splitlines()
    except UnicodeDecodeError as e:
      raise UserError(f"{spec}: a list file must be UTF-8 text, one path a line ({e})") from e
    paths = [(spec.parent / line.strip()) for line in lines if line.strip() and not line.strip().startswith("#")]
  elif spec.is_file():
    paths = [spec]
  else:
    raise UserError(f"{spec}: no such file or directory")
  items: list[Item] = []
  failures: list[Failure] = []
  seen: dict[str, pathlib.Path] = {}
  for path in paths:
    vid = path.stem
    if vid in seen:
      failures.append(Failure(vid, str(path), f"duplicate id: {seen[vid]} has the same name"))
    elif not path.is_file():
      failures.append(Failure(vid, str(path), "file not found"))
    else:
      seen[vid] = path
      items.append(Item(vid, path))
  if not items and not failures:
    kind = "image" if images else "video"
    raise UserError(f"{spec}: no {kind} files found (extensions: {' '.join(sorted(extensions))})")
  return items, failures


def shard(items: list[Item], failures: list[Failure], index: int, count: int) -> tuple[list[Item], list[Failure]]:
  """Returns shard `index` (from 0) of `count`: positions index, index + count, ... of the inputs sorted by (id, path).

  Failures found while listing (duplicate ids, missing files) are inputs too, so each is reported
  by exactly one shard. The split depends only on the inputs, so every machine computes the same one.
  """
  entries = sorted([(item.id, str(item.path), item) for item in items] +
                   [(failure.id, failure.path, failure) for failure in failures], key=lambda e: e[:2])
  mine = [entry for k, (_, _, entry) in enumerate(entries) if k % count == index]
  return [e for e in mine if isinstance(e, Item)], [e for e in mine if isinstance(e, Failure)]


def select(items: list[Item], failures: list[Failure], ids: list[str], source: str) -> tuple[list[Item], list[Failure]]:
  """Returns the inputs whose id is in `ids` (a data file's), and a failure for each id no input has.

  Listing failures of other ids are dropped: the data file does not use them.
  """
  wanted = set(ids)
  found = {item.id for item in items} | {failure.id for failure in failures}
  missing = [Failure(vid, "", f"used by {source}, but no input has this id") for vid in ids if vid not in found]
  return ([item for item in items if item.id in wanted],
          [failure for failure in failures if failure.id in wanted] + missing)


def process_shard(explicit: tuple[int, int] | None) -> tuple[int, int] | None:
  """Returns the shard this process extracts: `explicit` (`--shard`), else (process index, process
  count) in a multi-process run (`jax.distributed`), else None (everything)."""
  import jax

  if jax.process_count() > 1:
    if explicit is not None:
      raise UserError("--shard splits the inputs by hand; a multi-process run splits them by process already")
    return jax.process_index(), jax.process_count()
  return explicit


def merge_failures(out_dir: epath.Path, count: int) -> epath.Path:
  """Waits for every process of a multi-process run, then process 0 writes `failures.jsonl`: the
  shards' failure files in shard order (each input belongs to one shard, so each is listed once)."""
  import jax
  from jax.experimental import multihost_utils

  multihost_utils.sync_global_devices("extract-features: every shard written")
  merged = out_dir / FAILURES
  if jax.process_index() == 0:
    lines = []
    for index in range(count):
      part = out_dir / failures_file_name((index, count))
      lines += part.read_text().splitlines() if part.exists() else []
    model_io.write_atomic(merged, lambda f: f.write("".join(line + "\n" for line in lines)), mode="w")
  return merged


def failures_file_name(shard_spec: tuple[int, int] | None = None) -> str:
  """Returns the failures file of a run: `failures.jsonl`, or `failures.{i}-of-{n}.jsonl` for shard i of n."""
  return FAILURES if shard_spec is None else f"failures.{shard_spec[0]}-of-{shard_spec[1]}.jsonl"


def save_npy_atomic(path: epath.Path, array: np.ndarray) -> None:
  """Writes `array` to `path` so that `path` is never half-written (local or gs://)."""
  model_io.write_atomic(path, lambda f: np.save(f, array))


class BatchEncoder:
  """Preprocesses and encodes whole inputs (`preprocess.Window`s) in fixed-size, data-parallel jitted batches.

  A batch is `items_per_batch` inputs of `frames_per_item` frames each (videos, or images with 1),
  rounded up to the device count and split over `devices` (default: the local ones). The jitted
  program depends on the bucket of the batch's windows only; `programs` counts the ones traced so far.
  """

  def __init__(self, model, batch_size: int, frames_per_item: int = 1, devices=None):
    import jax
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.local_devices() if devices is None else list(devices)
    self.frames_per_item = frames_per_item
    items = max(1, batch_size // frames_per_item)
    self.items_per_batch = -(-items // len(devices)) * len(devices)
    self.batch_size = self.items_per_batch * frames_per_item  # frames per call
    mesh = Mesh(np.asarray(devices), ("data",))
    self.in_sharding = NamedSharding(mesh, PartitionSpec("data"))
    graphdef, state = nnx.split(model)
    self.state = jax.device_put(state, NamedSharding(mesh, PartitionSpec()))
    self.output_dim = model.cfg.output_dim
    self.image_size = model.cfg.image_size  # what frames are resized and cropped to
    self.programs = 0

    @jax.jit
    def encode(state, frames, rows, cols):
      self.programs += 1  # runs while tracing: once per bucket
      pixels = preprocess.device_pixels(frames, rows, cols)  # [V, N, S, S, 3]
      v, n = pixels.shape[:2]
      features = nnx.merge(graphdef, state).encode_image(pixels.reshape((v * n,) + pixels.shape[2:]))
      return features.reshape(v, n, -1)

    self._encode = encode
    self._jax = jax

  def __call__(self, windows: list[preprocess.Window]):
    """Starts encoding up to items_per_batch windows; returns a function giving float32[len(windows), N, D]."""
    for win in windows:
      if win.frames.shape[0] != self.frames_per_item or win.rows.shape[0] != self.image_size:
        raise ValueError(f"expected windows of {self.frames_per_item} frame(s) preprocessed to {self.image_size} px, "
                         f"got {win.frames.shape[0]} frame(s) to {win.rows.shape[0]} px")
    arrays = preprocess.pack(windows, self.items_per_batch)
    out = self._encode(self.state, *(self._jax.device_put(a, self.in_sharding) for a in arrays))
    n = len(windows)
    return lambda: np.asarray(out)[:n]


@dataclasses.dataclass(frozen=True)
class Loaded:
  """An input read for the encoder."""

  window: preprocess.Window
  front_to_back: str | None = None  # why a video had to be decoded front to back (logged), None if not


def load_video(item: Item, split, num_frames: int, size: int = preprocess.SIZE, limits: dict | None = None
               ) -> Loaded:
  """Returns the uint8 window of a video's sampled frames that the release's resize and crop read.

  `limits`: `decode.read_frames`'s time_limit and max_bytes.
  """
  sampled = decode.read_frames(item.path, split, num_frames, **(limits or {}))
  return Loaded(preprocess.source_window(sampled.frames, size), sampled.front_to_back)


def load_image(item: Item, size: int = preprocess.SIZE) -> Loaded:
  """Returns one image, resized and cropped on the host (PIL) as uint8[1, size, size, 3]."""
  return Loaded(preprocess.source_window(preprocess.read_image(item.path, size)[None], size))


@dataclasses.dataclass
class Summary:
  done: int = 0
  skipped: int = 0
  failed: int = 0
  replaced: int = 0  # of `done`: outputs that existed but were unreadable or of another shape
  front_to_back: int = 0  # of `done`: videos that had to be decoded front to back (each logged)


def complete_output(path: epath.Path, shape: tuple[int, ...]) -> bool:
  """Returns whether `path` is a whole float16 `.npy` of `shape`: its header says so and the data is all there.

  Only the header is read, and the size from the file system, so resuming a corpus on a bucket
  does not download it.
  """
  try:
    with path.open("rb") as f:
      version = np.lib.format.read_magic(f)
      read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
      saved_shape, _, dtype = read_header(f)
      data_start = f.tell()
  except (OSError, ValueError):
    return False
  nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(np.float16).itemsize
  return (tuple(saved_shape) == tuple(shape) and dtype == np.float16
          and path.stat().length == data_start + nbytes)


def _loaded(items: list[Item], load: Callable[[Item], Loaded], workers: int
            ) -> Iterator[tuple[Item, Loaded | None, str | None]]:
  """Yields (item, what was read or None, failure reason or None) in input order, decoding `workers` at a time."""
  with futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
    window: collections.deque = collections.deque()
    pending = iter(items)
    # Two videos per worker in flight keeps every worker busy without holding many decoded videos.
    for item in pending:
      window.append((item, pool.submit(load, item)))
      if len(window) >= 2 * workers:
        break
    while window:
      item, future = window.popleft()
      nxt = next(pending, None)
      if nxt is not None:
        window.append((nxt, pool.submit(load, nxt)))
      try:
        yield item, future.result(), None
      except (decode.DecodeError, sampling.SamplingError) as e:
        yield item, None, str(e)
      except Exception as e:  # a bad file must not stop a long run; the reason names the error
        yield item, None, f"unexpected {type(e).__name__}: {e}"


def extract(items: list[Item], prior_failures: list[Failure], out_dir: epath.Path, encoder: BatchEncoder,
            *, images: bool, splits: dict | None = None, workers: int = 4,
            num_frames: int = sampling.NUM_FRAMES, progress: bool = True, failures_name: str = FAILURES,
            limits: dict | None = None) -> Summary:
  """Returns what happened; writes `{id}.npy` float16 ([num_frames, D], or [D] for images) per input.

  `limits` (videos): a video that decodes past `time_limit` seconds or whose sampled frames take
  more than `max_bytes` decoded is a failure (`decode.read_frames`).

  This run's failures go to `out_dir / failures_name`, one JSON object a line. `out_dir` is local or
  on a bucket (`model_io.storage_path`).

  Frames are preprocessed to the encoder's image size (224 for the release's CLIP), on the device.
  """
  from tqdm import tqdm

  out_dir.mkdir(parents=True, exist_ok=True)
  summary = Summary()
  # A finished id is skipped only if its file is whole and of the expected shape; anything else
  # (a file cut short by a full disk, another model's features) is extracted again.
  shape = (encoder.output_dim,) if images else (num_frames, encoder.output_dim)
  todo = [item for item in items if not complete_output(out_dir / f"{item.id}.npy", shape)]
  summary.skipped = len(items) - len(todo)
  summary.replaced = sum((out_dir / f"{item.id}.npy").exists() for item in todo)
  splits = splits or {}
  size = encoder.image_size
  if images:
    load = lambda item: load_image(item, size)
  else:
    load = lambda item: load_video(item, splits.get(item.id), num_frames, size, limits)
  per_item = 1 if images else num_frames
  if encoder.frames_per_item != per_item:
    raise ValueError(f"the encoder takes {encoder.frames_per_item} frame(s) an input, not {per_item}")
  videos_per_batch = encoder.items_per_batch

  # The failures file describes the latest run: ids that failed before are retried.
  with (out_dir / failures_name).open("w") as failures_file, \
       tqdm(total=len(todo), unit="video" if not images else "image", disable=not progress,
            dynamic_ncols=True, file=sys.stderr) as bar:

    def fail(failure: Failure) -> None:
      failures_file.write(json.dumps(dataclasses.asdict(failure)) + "\n")
      failures_file.flush()
      summary.failed += 1
      bar.set_postfix(failed=summary.failed)

    def finish(batch_items: list[Item], result) -> None:
      features = result().astype(np.float16)  # [items, frames, D]
      for item, item_features in zip(batch_items, features):
        save_npy_atomic(out_dir / f"{item.id}.npy", item_features[0] if images else item_features)
      summary.done += len(batch_items)
      bar.update(len(batch_items))

    for failure in prior_failures:
      fail(failure)
    batch_items: list[Item] = []
    batch_windows: list[preprocess.Window] = []
    in_flight = None  # (items, result): encoding on the device while the next batch is packed
    for item, loaded, reason in _loaded(todo, load, workers):
      if reason is not None:
        fail(Failure(item.id, str(item.path), reason))
        bar.update(1)
        continue
      if loaded.front_to_back:
        summary.front_to_back += 1
        bar.write(f"{item.path}: decoded front to back, since {loaded.front_to_back}", file=sys.stderr)
      batch_items.append(item)
      batch_windows.append(loaded.window)
      if len(batch_items) == videos_per_batch:
        started = (batch_items, encoder(batch_windows))
        if in_flight is not None:
          finish(*in_flight)
        in_flight, batch_items, batch_windows = started, [], []
    if batch_items:
      started = (batch_items, encoder(batch_windows))
      if in_flight is not None:
        finish(*in_flight)
      in_flight = started
    if in_flight is not None:
      finish(*in_flight)
  return summary
