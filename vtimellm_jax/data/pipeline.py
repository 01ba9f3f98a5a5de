"""The training input pipeline: release records -> bucketed, sharded, resumable Grain batches.

Contract (what the model and trainer rely on):

- A tokenized sample (`templates.tokenize`): `input_ids` int32[T] with exactly one
  `VIDEO_TOKEN_INDEX` (-200); `labels` int32[T], `IGNORE_INDEX` (-100) where not trained and at
  the placeholder; `features` float16[N, 768] (N = 100 for videos, 1 for stage-1 images).
- A batch (one host's rows): `input_ids` int32[B, T] right-padded with the pad id (= unk = 0);
  `labels` int32[B, T] (-100 on padding); `attention_mask` int32[B, T] (1 on real tokens);
  `features` float16[B, N, 768]; `valid` int32[B] (0 for the dummy rows that pad the last batch or
  stand for a record skipped at load time; their labels are all -100); `index` int64[B] (each
  row's record index in the source, -1 for a dummy row; `Pipeline.row_names` names them).
  T is a bucket length, the same on every host for a given step, with T - 1 + N <= max_length (the
  model splices N features in place of the placeholder).
- `build_pipeline(...)` returns a `Pipeline` (stats, padding fraction); its `iterator()` is a Grain
  `DatasetIterator`, whose `get_state()/set_state()` resume on the exact next batch (the trainer
  stores that state in its checkpoint).

How batches are planned (all at build time, in the main process, so it is deterministic and cheap
to checkpoint): every record is prepared and tokenized once to learn its length and faults; each
epoch shuffles the usable records with `seed` and the epoch number, sorts windows of
`SORT_WINDOW` global batches by length, cuts them into global batches, and shuffles the batch
order. Each global batch gets the smallest bucket length that holds its longest row, and host `p`
of `P` takes rows `[p * B, (p + 1) * B)`, so hosts see disjoint records and equal shapes.

Bad records: text faults and feature-file faults (header and size; no data is read) are found
while planning; each is an error naming the file, record index and id, or with `skip_bad_records`
is left out and counted (`Pipeline.stats`, logged). A feature that fails later, when loaded (NaN
or inf values are found only then: planning reads headers), is an error too, or with
`skip_bad_records` becomes a dummy row (`valid` 0). No record is ever replaced by another.
Samples the release would drop (its length-count check) stay in, with all labels ignored as in the
release, and are counted (`stats['release_dropped']`).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any, Protocol, Sequence

import grain
import numpy as np

from vtimellm_jax import errors
from vtimellm_jax.data import audit
from vtimellm_jax.data import records as records_lib
from vtimellm_jax.data import templates
from vtimellm_jax.data import tokenizer as tokenizer_lib

log = logging.getLogger(__name__)

# Global batches per length-sorting window: larger windows pad less and shuffle less.
SORT_WINDOW = 64
# Batches loaded ahead by threads, in this process or in each worker. Grain's default read-ahead is
# 500 elements; ours are whole batches (a 128-row stage-2 batch holds 20 MB of features).
PREFETCH_BATCHES = 4


class RecordSource(Protocol):
  """Random access to raw records and their features (JSON + folder, or ArrayRecord)."""
  name: str

  def __len__(self) -> int: ...

  def record(self, index: int) -> Any: ...

  def features(self, index: int, prepared: records_lib.Prepared) -> np.ndarray: ...

  def feature_faults(self, index: int, prepared: records_lib.Prepared) -> list[records_lib.Fault]: ...


class JsonSource:
  """Records of a release JSON file, features from `{feature_dir}/{id}.npy`.

  The parsed JSON is not pickled into Grain workers; each process reads the file once on first use.
  """

  def __init__(self, data_path: str | os.PathLike, feature_dir: str | os.PathLike):
    self.data_path = os.fspath(data_path)
    self.feature_dir = os.fspath(feature_dir)
    self.name = self.data_path
    self._records: list[Any] | None = None

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k != "_records"} | {"_records": None}

  def _all(self) -> list[Any]:
    if self._records is None:
      self._records = records_lib.load_json_records(self.data_path)
    return self._records

  def __len__(self) -> int:
    return len(self._all())

  def record(self, index: int) -> Any:
    return self._all()[index]

  def features(self, index: int, prepared: records_lib.Prepared) -> np.ndarray:
    return records_lib.load_features(records_lib.feature_path(self.feature_dir, prepared.id),
                                     prepared.is_image)

  def feature_faults(self, index: int, prepared: records_lib.Prepared) -> list[records_lib.Fault]:
    return records_lib.check_feature_file(
        records_lib.feature_path(self.feature_dir, prepared.id), prepared.is_image)


@dataclasses.dataclass(frozen=True)
class BatchPlan:
  """One step: global record indices (-1 = dummy row) and the bucket length T."""
  indices: np.ndarray  # int64[global_batch]
  length: int


@dataclasses.dataclass
class Pipeline:
  """A planned pipeline: the Grain dataset of this host's batches and what planning found."""
  dataset: grain.IterDataset  # of batch dicts
  plans: list[BatchPlan]
  stats: dict[str, int]
  bucket_lengths: tuple[int, ...]
  padding_fraction: float  # padded share of the text positions of all batches
  num_features: int
  source: RecordSource

  def row_names(self, indices: np.ndarray, most: int = 8) -> str:
    """Names the records of a batch's `index` rows (dummy rows, -1, left out): file, index and id."""
    rows = [int(i) for i in np.asarray(indices).reshape(-1) if i >= 0]
    names = [records_lib.record_name(self.source.record(i), i) for i in rows[:most]]
    more = f" and {len(rows) - most} more" if len(rows) > most else ""
    return f"{self.source.name}: " + ", ".join(names) + more if rows else "no records (every row is a dummy)"

  def iterator(self):
    """Returns a fresh Grain `DatasetIterator` (with `get_state()` / `set_state()`)."""
    return iter(self.dataset)

  def __len__(self) -> int:
    return len(self.plans)


def build_pipeline(source: RecordSource, tokenizer, *, template: str, batch_size: int, seed: int = 0,
                   bucket_boundaries: Sequence[int] | None = None, num_buckets: int = 8,
                   num_epochs: int = 1, shard_index: int | None = None,
                   shard_count: int | None = None, skip_bad_records: bool = False,
                   worker_count: int = 0, max_length: int = templates.MAX_LENGTH) -> Pipeline:
  """Returns the planned pipeline of `source` for this host.

  Args:
    source: a `JsonSource` (or any `RecordSource`, e.g. the ArrayRecord one of data_pipelines/).
    tokenizer: a tokenizer folder, an encoder (`tokenizer.Encoder`, as `tokenizer.load_encoder`
      gives), or a transformers LLaMA tokenizer.
    template: one the encoder's family trains with (`templates.check_encoder`): 'plain' (stage 1)
      or 'v1' (stages 2, 3) with a LLaMA tokenizer; 'glm' (every stage) with a ChatGLM3 tokenizer.
    batch_size: rows per host and step (the global batch is batch_size * shard_count).
    seed: shuffling seed; epoch e shuffles with (seed, e).
    bucket_boundaries: allowed T values; None picks `num_buckets` from the length quantiles.
    num_epochs: epochs planned back to back.
    shard_index, shard_count: this host and the host count (default: jax.process_index/count).
    skip_bad_records: leave unusable records out (counted) instead of raising.
    worker_count: Grain worker processes (0: load in this process).
    max_length: model sequence limit; text is cut so that T - 1 + N <= max_length.
  """
  if batch_size < 1 or num_epochs < 1:
    raise errors.UserError(f"batch_size ({batch_size}) and num_epochs ({num_epochs}) must be >= 1")
  if shard_count is None or shard_index is None:
    import jax  # pylint: disable=g-import-not-at-top
    shard_index, shard_count = jax.process_index(), jax.process_count()
  if not 0 <= shard_index < shard_count:
    raise errors.UserError(f"shard index {shard_index} is not in [0, {shard_count})")
  if isinstance(tokenizer, (str, os.PathLike)):
    enc = tokenizer_lib.load_encoder(tokenizer)
  elif isinstance(tokenizer, tokenizer_lib.Encoder):
    enc = tokenizer
  else:
    enc = tokenizer_lib.ReleaseEncoder(tokenizer)
  templates.check_encoder(template, enc)

  lengths, num_features, stats = _measure(source, enc, template, max_length, skip_bad_records)
  usable = np.flatnonzero(lengths > 0)
  if usable.size == 0:
    raise errors.UserError(f"{source.name}: no usable record")
  budget = templates.text_budget(max_length, num_features)
  if bucket_boundaries is None:
    bounds = auto_boundaries(lengths[usable], num_buckets, budget)
  else:
    bounds = tuple(sorted({min(int(b), budget) for b in bucket_boundaries}))
    if bounds[-1] < lengths.max():
      bounds = bounds + (budget,)
  global_batch = batch_size * shard_count
  plans = []
  for epoch in range(num_epochs):
    plans.extend(plan_epoch(usable, lengths, global_batch, bounds, seed=seed, epoch=epoch))
  real = sum(int(lengths[p.indices[p.indices >= 0]].sum()) for p in plans)
  padded = sum(global_batch * p.length for p in plans)
  stats["batches"] = len(plans)
  log.info("%s: %d usable records, %d batches of %d x %d hosts, buckets %s, padding %.1f%%, %s",
           source.name, usable.size, len(plans), batch_size, shard_count, bounds,
           100 * (1 - real / padded), dict(stats))

  loader = BatchLoader(source, enc, template, max_length, num_features, shard_index, batch_size,
                       skip_bad_records)
  read = grain.ReadOptions(num_threads=PREFETCH_BATCHES, prefetch_buffer_size=PREFETCH_BATCHES)
  dataset = grain.MapDataset.source(plans).map(loader).to_iter_dataset(read)
  if worker_count > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    # Grain's worker start reads absl flags; outside an absl app nobody parsed them (defaults do).
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
  return Pipeline(dataset, plans, stats, bounds, 1 - real / padded, num_features, source)


def auto_boundaries(lengths: np.ndarray, num_buckets: int, budget: int,
                    multiple: int = 16) -> tuple[int, ...]:
  """Returns up to `num_buckets` bucket lengths at the length quantiles, multiples of `multiple`."""
  qs = np.quantile(lengths, np.arange(1, num_buckets + 1) / num_buckets, method="higher")
  bounds = {min(int(-(-q // multiple) * multiple), budget) for q in qs}
  return tuple(sorted(bounds))


def plan_epoch(usable: np.ndarray, lengths: np.ndarray, global_batch: int, bounds: Sequence[int], *,
               seed: int, epoch: int) -> list[BatchPlan]:
  """Returns one epoch's global batches: shuffled, length-sorted within windows, bucketed.

  The last batch may be partial: dummy rows (-1) fill it.
  """
  rng = np.random.default_rng([seed, epoch])
  order = rng.permutation(usable)
  window = global_batch * SORT_WINDOW
  batches = []
  for start in range(0, order.size, window):
    chunk = order[start:start + window]
    chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
    batches.extend(chunk[k:k + global_batch] for k in range(0, chunk.size, global_batch))
  plans = []
  for k in rng.permutation(len(batches)):
    rows = batches[k]
    longest = int(lengths[rows].max())
    length = next(b for b in bounds if b >= longest)
    plans.append(BatchPlan(np.concatenate([rows, np.full(global_batch - rows.size, -1)]), length))
  return plans


def _measure(source: RecordSource, enc, template: str, max_length: int,
             skip: bool) -> tuple[np.ndarray, int, dict[str, int]]:
  """Returns per-record text lengths (0 = left out), N, and counts; raises on a bad record."""
  lengths = np.zeros(len(source), np.int64)
  stats = collections.Counter(records=len(source))
  kinds = set()
  for index in range(len(source)):
    raw = source.record(index)
    check = lambda prepared, index=index: source.feature_faults(index, prepared)  # noqa: E731
    found = audit.audit_record(raw, feature_faults=check, enc=enc, template=template,
                               max_length=max_length)
    if not found.usable:
      message = (f"{source.name}: {records_lib.record_name(raw, index)}: "
                 + "; ".join(f"{f.kind}: {f.message}" for f in found.faults))
      if not skip:
        raise errors.UserError(message + " (set skip_bad_records to leave such records out)")
      log.warning("skipping %s", message)
      stats["skipped"] += 1
      stats.update(f"skipped: {f.kind}" for f in found.faults)
      continue
    kinds.add(found.prepared.is_image)
    lengths[index] = len(found.tokenized.input_ids)
    stats["release_dropped"] += int(found.tokenized.release_dropped)
    stats["truncated"] += int(found.tokenized.truncated)
  if len(kinds) > 1:
    raise errors.UserError(f"{source.name}: mixes image records (<image>) and video records; "
                           "a dataset must hold one kind (N is a static shape)")
  num_features = 1 if kinds == {True} else records_lib.NUM_FRAMES
  if stats["release_dropped"]:
    log.warning("%s: the release would drop %d sample(s) (tokenization length mismatch); they stay "
                "with all labels ignored", source.name, stats["release_dropped"])
  return lengths, num_features, dict(stats)


class BatchLoader(grain.transforms.Map):
  """Grain map: a `BatchPlan` -> this host's batch dict (see the module docstring)."""

  def __init__(self, source: RecordSource, enc, template: str, max_length: int, num_features: int,
               shard_index: int, batch_size: int, skip_bad_records: bool):
    self.source, self.enc, self.template = source, enc, template
    self.max_length, self.num_features = max_length, num_features
    self.rows = slice(shard_index * batch_size, (shard_index + 1) * batch_size)
    self.skip = skip_bad_records

  def __repr__(self) -> str:
    # Grain names a transform in its logs; without a repr it inspects the source, which parses
    # Python in a worker thread (a CPython 3.11 parser race, "AST constructor recursion depth").
    return f"BatchLoader({self.source.name}, {self.template})"

  def map(self, plan: BatchPlan) -> dict[str, np.ndarray]:
    indices = plan.indices[self.rows]
    b, t = indices.size, plan.length
    batch = {
        "input_ids": np.full((b, t), self.enc.pad_id, np.int32),
        "labels": np.full((b, t), templates.IGNORE_INDEX, np.int32),
        "attention_mask": np.zeros((b, t), np.int32),
        "features": np.zeros((b, self.num_features, records_lib.FEATURE_DIM), np.float16),
        "valid": np.zeros((b,), np.int32),
        "index": np.full((b,), -1, np.int64),  # the record of each row, -1 for a dummy row
    }
    for row, index in enumerate(indices):
      if index < 0:
        continue
      sample = self.load(int(index))
      if sample is None:
        continue
      ids, labels, feats = sample
      n = len(ids)
      if n > t:
        # Workers re-read the data; a file edited after planning must not bend the batch shapes.
        name = records_lib.record_name(self.source.record(int(index)), int(index))
        raise errors.UserError(f"{self.source.name}: {name}: {n} tokens now, planned for at most "
                               f"{t}: the data changed after the pipeline was built")
      batch["input_ids"][row, :n] = ids
      batch["labels"][row, :n] = labels
      batch["attention_mask"][row, :n] = 1
      batch["features"][row] = feats
      batch["valid"][row] = 1
      batch["index"][row] = index
    return batch

  def load(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """Returns (input_ids, labels, features) of record `index`; None if skipped at load time."""
    raw = self.source.record(index)
    try:
      prepared, faults = records_lib.prepare(raw)
      if prepared is None:
        raise errors.UserError("; ".join(f"{f.kind}: {f.message}" for f in faults))
      tok = templates.tokenize(prepared.turns, self.template, self.enc, max_length=self.max_length,
                               num_features=prepared.num_features)
      feats = self.source.features(index, prepared)
    except errors.UserError as e:
      message = f"{self.source.name}: {records_lib.record_name(raw, index)}: {e}"
      if not self.skip:
        # A plain UserError: it crosses Grain's worker boundary intact (pickles by message).
        raise errors.UserError(message) from None
      log.warning("skipping at load time (dummy row, valid=0): %s", message)
      return None
    return tok.input_ids, tok.labels, feats
