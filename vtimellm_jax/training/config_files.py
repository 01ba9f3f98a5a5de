"""Config files (`configs/stage2.py`, `topologies.py`, a user's own) loaded by path.

A config file is executed as a module of a private package standing for its directory, so it
imports its siblings relatively (`from . import common`) wherever it lies: in a checkout's
`configs/`, in an installed wheel's `vtimellm_jax/configs/`, or in a user's own directory. The
library reads config files only through this module, never by importing them.

`CONFIGS_DIR` is the copy that comes with the package: `vtimellm_jax/configs` is a link to the
repository's top-level `configs/` in a checkout (and so in an editable install), and a directory of
the same files in a wheel. A `--config` path that does not exist, written bare (`stage2.py`) or as
`configs/NAME.py`, names the file of that name there, so `--config configs/stage2.py:7b` works from
any directory once the package is installed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.machinery
import importlib.util
import pathlib
import sys
import types

from vtimellm_jax.errors import UserError

CONFIGS_DIR = pathlib.Path(__file__).resolve().parents[1] / "configs"


def resolve(path_text: str) -> pathlib.Path:
  """Returns the config file `path_text` names: the file itself, else the bundled one of that name."""
  path = pathlib.Path(path_text)
  if path.is_file():
    return path
  bundled = CONFIGS_DIR / path.name
  if path.parent in (pathlib.Path("."), pathlib.Path("configs")) and path.suffix == ".py" and bundled.is_file():
    return bundled
  raise UserError(f"config file {path} not found (bundled configs: "
                  f"{', '.join(sorted(p.name for p in CONFIGS_DIR.glob('*.py') if p.stem != '__init__'))} "
                  f"in {CONFIGS_DIR})")


def load_module(path: str | pathlib.Path) -> types.ModuleType:
  """Executes the config file at `path` afresh and returns it as a module.

  `from . import NAME` in it imports `NAME.py` beside it (once per process, like any import).
  """
  path = pathlib.Path(path).absolute()
  package = _directory_package(path.parent)
  name = f"{package}.{path.stem}"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # as an import would: dataclasses and pickle look modules up there
  try:
    exec(compile(path.read_bytes(), str(path), "exec"), module.__dict__)  # no bytecode cache: edits always count
  except ImportError as e:
    sys.modules.pop(name, None)
    raise UserError(f"{path}: {e}. A config file imports the files beside it relatively "
                    "(`from . import common`), or the bundled ones by package (`from vtimellm_jax.configs "
                    "import common`)") from e
  except BaseException:
    sys.modules.pop(name, None)
    raise
  return module


@functools.cache
def bundled(name: str) -> types.ModuleType:
  """Returns the bundled config module `name` (`topologies`, `common`), loaded once."""
  return load_module(CONFIGS_DIR / f"{name}.py")


def _directory_package(directory: pathlib.Path) -> str:
  """Returns the name of a package (created on first use) whose modules are the files in `directory`."""
  digest = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
  name = f"_vtimellm_configs_{digest}"
  if name not in sys.modules:
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [str(directory)]
    sys.modules[name] = importlib.util.module_from_spec(spec)
  return name
