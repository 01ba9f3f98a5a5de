"""Read the `vtimellm_data` ArrayRecord dataset as a pipeline `RecordSource` (no TensorFlow).

  source = ArrayRecordSource("DATA_DIR/vtimellm_data/stage2/1.0.0")
  pipe = vtimellm_jax.data.pipeline.build_pipeline(source, tokenizer, template="v1", ...)

Reading goes through TFDS's `as_data_source` (ArrayRecord random access + TFDS's numpy example
parser), the same path `tfds.data_source` users take, so local paths and whatever etils/TFDS can
open (gs://) both work. Given the same records in the same order as a JSON + feature folder, the
pipeline plans and yields identical batches from either source.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from vtimellm_jax import errors
from vtimellm_jax.data import records


class ArrayRecordSource:
  """Random access to the records and features of one split of a `vtimellm_data` directory."""

  def __init__(self, dataset_dir: str | os.PathLike, split: str = "train"):
    self.dataset_dir = os.fspath(dataset_dir)
    self.split = split
    self.name = f"{self.dataset_dir}[{split}]"
    self._source = None
    self._last: tuple[int, dict] | None = None

  def __getstate__(self):
    # Grain workers open their own readers.
    return self.__dict__ | {"_source": None, "_last": None}

  def _data(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      try:
        builder = tfds.builder_from_directory(self.dataset_dir)
        self._source = builder.as_data_source(split=self.split)
      except Exception as e:  # TFDS raises many kinds; all mean "not a readable dataset here".
        raise errors.UserError(f"{self.name}: not a readable vtimellm_data dataset: {e}") from e
    return self._source

  def _example(self, index: int) -> dict:
    # The loader asks for the record, then its features: decode each example once.
    if self._last is None or self._last[0] != index:
      self._last = (index, self._data()[index])
    return self._last[1]

  def __len__(self) -> int:
    return len(self._data())

  def record(self, index: int) -> Any:
    text = self._example(index)["record"]
    return json.loads(text.decode() if isinstance(text, bytes) else text)

  def original_index(self, index: int) -> int:
    """Returns the record's position in the JSON it was written from."""
    return int(self._example(index)["index"])

  def _array(self, index: int, prepared: records.Prepared) -> np.ndarray:
    array = np.asarray(self._example(index)["features"])
    # Stored as [N, 768]; a stage-1 vector was [768] or [1, 768] in its .npy, both fine.
    return array.reshape(-1) if prepared.is_image and array.shape == (1, 768) else array

  def features(self, index: int, prepared: records.Prepared) -> np.ndarray:
    array = self._array(index, prepared)
    faults = records.check_feature_array(array, prepared.is_image)
    if faults:
      raise records.FeatureError(faults[0])
    return array.reshape(-1, records.FEATURE_DIM)

  def feature_faults(self, index: int, prepared: records.Prepared) -> list[records.Fault]:
    return records.check_feature_array(self._array(index, prepared), prepared.is_image)
