"""ArrayRecord + TFDS: written without TensorFlow, read by tfds.data_source, same batches as JSON."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_fixtures import tiny_tokenizer_dir, write_stage2  # noqa: F401  pylint: disable=unused-import
from vtimellm_jax import errors
from vtimellm_jax.data import pipeline
from vtimellm_jax.data import tokenizer as tokenizer_lib
from vtimellm_jax.data_pipelines import arrayrecord_source
from vtimellm_jax.data_pipelines import arrayrecord_writer
from vtimellm_jax.data_pipelines import vtimellm_data  # noqa: F401  registers the builder


@pytest.fixture(scope="module")
def written(tmp_path_factory):
  root = tmp_path_factory.mktemp("ar")
  data, feat = write_stage2(root, 40, seed=7)
  out, counts = arrayrecord_writer.write_dataset(data, feat, root / "tfds", config="stage2",
                                                 num_shards=3)
  return data, feat, root / "tfds", out, counts


def test_tfds_data_source_reads_every_record_in_order(written):
  data, feat, data_dir, _, counts = written
  assert counts == {"records": 40, "written": 40, "skipped": 0}
  assert "tensorflow" not in sys.modules
  ds = tfds.data_source("vtimellm_data/stage2", data_dir=str(data_dir), split="train")
  raw = json.loads(data.read_text())
  assert len(ds) == len(raw)
  for k in (0, 13, 39):
    item = ds[k]
    assert json.loads(item["record"]) == raw[k] and int(item["index"]) == k
    np.testing.assert_array_equal(item["features"], np.load(feat / f"{raw[k]['id']}.npy"))
    assert item["features"].dtype == np.float16
  assert "tensorflow" not in sys.modules


def test_arrayrecord_and_json_give_identical_batches(written, tiny_tokenizer_dir):  # noqa: F811
  data, feat, _, out, _ = written
  tok = tokenizer_lib.load_tokenizer(tiny_tokenizer_dir)
  args = dict(template="v1", batch_size=3, seed=11, num_epochs=2, shard_index=1, shard_count=2)
  from_json = list(pipeline.build_pipeline(pipeline.JsonSource(data, feat), tok, **args).iterator())
  from_ar = list(pipeline.build_pipeline(arrayrecord_source.ArrayRecordSource(out), tok,
                                         **args).iterator())
  assert len(from_json) == len(from_ar) > 0
  for a, b in zip(from_json, from_ar):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])


def test_writer_names_a_bad_record_or_skips_it(tmp_path):
  data, feat = write_stage2(tmp_path, 5, seed=8)
  victim = json.loads(data.read_text())[3]["id"]
  (feat / f"{victim}.npy").unlink()
  with pytest.raises(errors.UserError, match=rf"record 3 \(id '{victim}'\): missing feature file"):
    arrayrecord_writer.write_dataset(data, feat, tmp_path / "out")
  _, counts = arrayrecord_writer.write_dataset(data, feat, tmp_path / "out2", skip_bad_records=True)
  assert counts == {"records": 5, "written": 4, "skipped": 1}
  ds = tfds.data_source("vtimellm_data/stage2", data_dir=str(tmp_path / "out2"), split="train")
  assert [int(ds[k]["index"]) for k in range(len(ds))] == [0, 1, 2, 4]


def test_builder_prepares_from_the_manual_dir(tmp_path):
  data, feat = write_stage2(tmp_path / "manual", 4, seed=9)
  data.rename(tmp_path / "manual" / "data.json")
  feat.rename(tmp_path / "manual" / "features")
  builder = tfds.builder("vtimellm_data/stage3", data_dir=str(tmp_path / "prepared"),
                         file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "manual")))
  ds = builder.as_data_source(split="train")
  raw = json.loads((tmp_path / "manual" / "data.json").read_text())
  assert [json.loads(ds[k]["record"]) for k in range(len(ds))] == raw
