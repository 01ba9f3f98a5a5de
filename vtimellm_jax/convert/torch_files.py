"""Reading PyTorch / safetensors weight files safely, one file at a time.

`.bin` / `.pt` pickles are opened with `torch.load(weights_only=True)`: a pickle that needs code to
load is refused with a message naming the file, never executed. torch is imported only here, so the
training path never needs it.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Iterator

import ml_dtypes
import numpy as np

from vtimellm_jax.errors import UserError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


def _to_numpy(tensor) -> np.ndarray:
  import torch

  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    # numpy has no native bfloat16: reinterpret the bits as ml_dtypes' bfloat16 (no widening).
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()


def _torch_state_dict(path: pathlib.Path) -> dict:
  try:
    import torch
  except ImportError as e:
    raise UserError(f"{path}: reading PyTorch files needs torch: pip install 'vtimellm-jax[torch]'") from e
  if not path.is_file():
    raise UserError(f"{path}: file not found")
  try:
    # mmap keeps tensors on disk until each one is converted (zip-format files only).
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
  except Exception as e:  # UnpicklingError, RuntimeError, EOFError... depending on the payload
    first_line = str(e).splitlines()[0] if str(e) else ""
    raise UserError(
        f"{path}: refused or unreadable as a weights-only PyTorch file ({type(e).__name__}: {first_line}). "
        "Pickles that need code to load are never executed."
    ) from e
  if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
    state = state["state_dict"]
  if not isinstance(state, dict):
    raise UserError(f"{path}: expected a state dict (name -> tensor), found {type(state).__name__}")
  return state


def _is_zip(path: pathlib.Path) -> bool:
  with open(path, "rb") as f:
    return f.read(4) == b"PK\x03\x04"


def iter_tensors(path: str | pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (name, array) of a `.safetensors`, `.bin` or `.pt` file one tensor at a time.

  bfloat16 stays bfloat16 (ml_dtypes). Safetensors are read tensor by tensor with plain reads, not
  memory-mapped, so pages of tensors already converted do not stay resident in this process.
  """
  path = pathlib.Path(path)
  if path.suffix == ".safetensors":
    yield from _iter_safetensors(path)
    return
  for name, value in _torch_state_dict(path).items():
    if hasattr(value, "detach"):
      yield name, _to_numpy(value)


# safetensors' dtype names -> numpy.
_SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


def _safetensors_header(path: pathlib.Path, f) -> tuple[dict, int]:
  """Returns (header {name: {dtype, shape, data_offsets}}, byte offset of the data) of an open file."""
  size = path.stat().st_size
  prefix = f.read(8)
  if len(prefix) < 8:
    raise UserError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
  length = int.from_bytes(prefix, "little")
  if length > size - 8:
    raise UserError(f"{path}: not a safetensors file (header length {length} exceeds the file's {size} bytes)")
  try:
    header = json.loads(f.read(length))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f"{path}: unreadable safetensors header ({e})") from None
  if not isinstance(header, dict):
    raise UserError(f"{path}: unreadable safetensors header (not a JSON object)")
  header.pop("__metadata__", None)
  return header, 8 + length


def _iter_safetensors(path: pathlib.Path) -> Iterator[tuple[str, np.ndarray]]:
  if not path.is_file():
    raise UserError(f"{path}: file not found")
  size = path.stat().st_size
  with open(path, "rb") as f:
    header, data_start = _safetensors_header(path, f)
    for name, info in header.items():
      try:
        dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
        shape = tuple(int(d) for d in info["shape"])
        begin, end = (int(v) for v in info["data_offsets"])
      except (KeyError, TypeError, ValueError):
        raise UserError(f"{path}: tensor {name}: unsupported or malformed entry {info!r} "
                        f"(dtypes read: {', '.join(_SAFETENSORS_DTYPES)})") from None
      count = int(np.prod(shape, dtype=np.int64))
      if end - begin != count * dtype.itemsize or data_start + end > size:
        raise UserError(f"{path}: tensor {name}: its bytes [{begin}, {end}) do not hold {info['dtype']} {list(shape)} "
                        "within the file (truncated?)")
      f.seek(data_start + begin)
      yield name, np.fromfile(f, dtype=dtype, count=count).reshape(shape)


def load_weight_file(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """Returns {name: array} of a whole weight file (for small files: projectors, LoRA adapters)."""
  return dict(iter_tensors(path))


def checkpoint_shards(directory: str | pathlib.Path) -> tuple[list[pathlib.Path], dict[str, str] | None]:
  """Returns the weight files of an HF model directory and the index's {tensor: file} map, if any.

  Prefers safetensors over `.bin`. Missing shards named by an index are an error listing all of them.
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise UserError(f"{directory}: not a directory")
  for index_name, single in ((SAFETENSORS_INDEX, "model.safetensors"), (BIN_INDEX, "pytorch_model.bin")):
    index_path = directory / index_name
    if index_path.is_file():
      try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
      except (json.JSONDecodeError, KeyError) as e:
        raise UserError(f"{index_path}: not a valid index file (needs a 'weight_map'): {e}") from e
      files = sorted(set(weight_map.values()))
      missing = [f for f in files if not (directory / f).is_file()]
      if missing:
        raise UserError(f"{index_path}: {len(missing)} shard(s) named in the index are missing: {', '.join(missing)}")
      return [directory / f for f in files], weight_map
    if (directory / single).is_file():
      return [directory / single], None
  raise UserError(
      f"{directory}: no weights found (expected {SAFETENSORS_INDEX}, model.safetensors, {BIN_INDEX} or pytorch_model.bin)"
  )


def iter_checkpoint(directory: str | pathlib.Path) -> Iterator[tuple[pathlib.Path, str, np.ndarray]]:
  """Yields (file, name, array) over every shard of an HF model directory, one tensor at a time."""
  files, _ = checkpoint_shards(directory)
  for path in files:
    for name, array in iter_tensors(path):
      yield path, name, array
