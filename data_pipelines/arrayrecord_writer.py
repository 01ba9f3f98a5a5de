"""Write a release JSON + feature folder as the `vtimellm_data` TFDS dataset in ArrayRecord files.

  python -m vtimellm_jax.data_pipelines.arrayrecord_writer --data stage2.json --features stage2_feat \\
      --out DATA_DIR --config stage2 [--shards 16] [--skip-bad-records]

writes `DATA_DIR/vtimellm_data/stage2/1.0.0/` (ArrayRecord shards, `dataset_info.json`,
`features.json`), which `tfds.data_source("vtimellm_data/stage2", data_dir=DATA_DIR)` and
`vtimellm_jax.data_pipelines.arrayrecord_source.ArrayRecordSource` read without TensorFlow. Records keep the
JSON's order (shard k holds a contiguous range), so the pipeline plans the same batches from either
source. Uses the array_record package directly (no Beam, no TensorFlow).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from . import vtimellm_data

log = logging.getLogger(__name__)


def dataset_dir(data_dir: str | os.PathLike, config: str) -> str:
  """Returns the TFDS version directory of `config` under `data_dir`."""
  return os.path.join(os.fspath(data_dir), vtimellm_data.NAME, config, vtimellm_data.VERSION)


def write_dataset(data_path: str | os.PathLike, feature_dir: str | os.PathLike,
                  data_dir: str | os.PathLike, *, config: str = "stage2", num_shards: int = 1,
                  skip_bad_records: bool = False) -> tuple[str, dict[str, int]]:
  """Returns (dataset directory, counts) after writing the dataset.

  Raises:
    UserError: a record cannot be used (named by file, index and id), unless `skip_bad_records`,
      in which case it is left out and counted.
  """
  # pylint: disable=g-import-not-at-top
  from array_record.python import array_record_module
  import tensorflow_datasets as tfds
  from vtimellm_jax import errors
  from vtimellm_jax.data import records
  # pylint: enable=g-import-not-at-top

  if config not in vtimellm_data.CONFIGS:
    raise errors.UserError(f"unknown config {config!r}; choose one of {vtimellm_data.CONFIGS}")
  raw_records = records.load_json_records(data_path)
  features = vtimellm_data.features_spec()
  counts = {"records": len(raw_records), "written": 0, "skipped": 0}
  out = dataset_dir(data_dir, config)
  os.makedirs(out, exist_ok=True)
  # Shard k holds the contiguous index range [bounds[k], bounds[k+1]); records are streamed, never
  # all held in memory (a stage-2 corpus is about 20 GB of features).
  num_shards = max(1, min(num_shards, len(raw_records)))
  bounds = [len(raw_records) * k // num_shards for k in range(num_shards + 1)]
  shard_lengths, num_bytes = [], 0
  for k in range(num_shards):
    path = os.path.join(out, f"{vtimellm_data.NAME}-train.array_record-{k:05d}-of-{num_shards:05d}")
    # group_size 1: every record is its own chunk, the fastest random access.
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    written = 0
    for index in range(bounds[k], bounds[k + 1]):
      raw = raw_records[index]
      try:
        prepared, faults = records.prepare(raw)
        if prepared is None:
          raise errors.UserError("; ".join(f"{f.kind}: {f.message}" for f in faults))
        feats = records.load_features(records.feature_path(feature_dir, prepared.id),
                                      prepared.is_image)
      except errors.UserError as e:
        message = f"{data_path}: {records.record_name(raw, index)}: {e}"
        if not skip_bad_records:
          writer.close()
          raise errors.UserError(message) from None
        log.warning("skipping %s", message)
        counts["skipped"] += 1
        continue
      blob = features.serialize_example(vtimellm_data.example(index, raw, feats))
      writer.write(blob)
      num_bytes += len(blob)
      written += 1
    writer.close()
    shard_lengths.append(written)
  counts["written"] = sum(shard_lengths)
  if not counts["written"]:
    raise errors.UserError(f"{data_path}: no usable record to write")
  split = tfds.core.SplitInfo(name="train", shard_lengths=shard_lengths, num_bytes=num_bytes)
  # check_data=False: checking reads the data back through tf.data, which needs TensorFlow.
  tfds.folder_dataset.write_metadata(data_dir=out, features=features, split_infos=[split],
                                     filename_template=None, check_data=False)
  return out, counts


def main(argv: list[str] | None = None) -> int:
  from vtimellm_jax import errors  # pylint: disable=g-import-not-at-top

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", required=True, help="release data JSON")
  parser.add_argument("--features", required=True, help="folder of {id}.npy feature files")
  parser.add_argument("--out", required=True, help="TFDS data_dir to write into")
  parser.add_argument("--config", default="stage2", choices=vtimellm_data.CONFIGS)
  parser.add_argument("--shards", type=int, default=1, help="number of ArrayRecord files")
  parser.add_argument("--skip-bad-records", action="store_true")
  args = parser.parse_args(argv)
  try:
    out, counts = write_dataset(args.data, args.features, args.out, config=args.config,
                                num_shards=args.shards, skip_bad_records=args.skip_bad_records)
  except errors.UserError as e:
    print(f"arrayrecord_writer: error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {counts['written']} of {counts['records']} records "
        f"({counts['skipped']} skipped) to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
