"""TFDS registration of VTimeLLM data: `vtimellm_data/{stage1,stage2,stage3}` as ArrayRecord.

Importing this module registers the builder, so that with data written by
`vtimellm_jax.data_pipelines.arrayrecord_writer` (or prepared by this builder) users can load it with

  tfds.data_source("vtimellm_data/stage2", data_dir=DATA_DIR, split="train")   # random access
  tfds.builder("vtimellm_data/stage2", data_dir=DATA_DIR).as_data_source("train")

Neither needs TensorFlow. Preparing through the builder (`download_and_prepare`) reads the release's
JSON and feature folder from the manual dir (`data.json` and `features/`) and, with TFDS 4.9.10, also
runs without TensorFlow; older TFDS versions may need it: `pip install vtimellm-jax[tfds-prepare]`.

One example per release record, in the JSON's order (shuffling is the pipeline's job, per epoch):
  index     int64        position of the record in the JSON list (for error messages)
  id        text         the record's `id`
  record    text         the record as JSON, untouched (the templates apply the release's rewrites)
  features  float16[N, 768]  N = 100 (videos) or 1 (stage-1 images, stored [768] or [1, 768])
"""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow_datasets as tfds

NAME = "vtimellm_data"
VERSION = "1.0.0"
CONFIGS = ("stage1", "stage2", "stage3")
FEATURE_DIM = 768


def features_spec() -> tfds.features.FeaturesDict:
  """Returns the TFDS features of one example (see the module docstring)."""
  return tfds.features.FeaturesDict({
      "index": tfds.features.Scalar(dtype=np.int64),
      "id": tfds.features.Text(),
      "record": tfds.features.Text(),
      # BYTES keeps float16 exact and allows the dynamic first axis.
      "features": tfds.features.Tensor(shape=(None, FEATURE_DIM), dtype=np.float16,
                                       encoding=tfds.features.Encoding.BYTES),
  })


def example(index: int, record: dict, features: np.ndarray) -> dict:
  """Returns the TFDS example of one record and its (validated) float16[N, 768] features."""
  return {"index": index, "id": str(record["id"]), "record": json.dumps(record, ensure_ascii=False),
          "features": np.asarray(features, np.float16).reshape(-1, FEATURE_DIM)}


class VtimellmData(tfds.core.GeneratorBasedBuilder):
  """VTimeLLM stage 1-3 training data: release records with their CLIP features."""

  VERSION = tfds.core.Version(VERSION)
  RELEASE_NOTES = {str(VERSION): "Release records + float16 CLIP ViT-L/14 features, ArrayRecord."}
  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=name, description=f"VTimeLLM {name} data")
                     for name in CONFIGS]
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Put the release's JSON as `data.json` and its feature folder ({id}.npy files) as "
      "`features/` in the manual dir.")
  def _info(self) -> tfds.core.DatasetInfo:
    # Keys are record indices: no shuffling keeps the JSON's order (see the module docstring).
    return tfds.core.DatasetInfo(builder=self, description=__doc__.splitlines()[0],
                                 features=features_spec(), disable_shuffling=True,
                                 homepage="https://github.com/huangb23/VTimeLLM")

  def _split_generators(self, dl_manager):
    manual = os.fspath(dl_manager.manual_dir)
    return {"train": self._generate_examples(os.path.join(manual, "data.json"),
                                             os.path.join(manual, "features"))}

  def _generate_examples(self, data_path: str, feature_dir: str):
    # pylint: disable=g-import-not-at-top
    from vtimellm_jax import errors
    from vtimellm_jax.data import records
    # pylint: enable=g-import-not-at-top
    for index, raw in enumerate(records.load_json_records(data_path)):
      prepared, faults = records.prepare(raw)
      if prepared is None:
        raise errors.UserError(f"{data_path}: {records.record_name(raw, index)}: "
                               + "; ".join(f"{f.kind}: {f.message}" for f in faults))
      feats = records.load_features(records.feature_path(feature_dir, prepared.id),
                                    prepared.is_image)
      yield index, example(index, raw, feats)
