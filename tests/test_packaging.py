"""The wheel installs one top-level package, `vtimellm_jax`, carrying the configs and data pipelines
under its name, and no data files."""

import pathlib
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _sources(directory: pathlib.Path) -> set[str]:
  return {p.relative_to(directory).as_posix() for p in directory.rglob("*.py") if "__pycache__" not in p.parts}


def test_wheel_has_only_vtimellm_jax_at_top_level_with_configs_and_pipelines_inside(tmp_path):
  # Built from a copy: an in-tree build would leave build/ and *.egg-info in the checkout.
  src = tmp_path / "src"
  src.mkdir()
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(ROOT / name, src)
  for name in ("vtimellm_jax", "configs", "data_pipelines"):
    shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
  subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
                  "--wheel-dir", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
  [wheel] = (tmp_path / "dist").glob("vtimellm_jax-*.whl")
  names = zipfile.ZipFile(wheel).namelist()
  assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {"vtimellm_jax"}
  for name in ("configs", "data_pipelines"):
    packed = {n.removeprefix(f"vtimellm_jax/{name}/") for n in names if n.startswith(f"vtimellm_jax/{name}/")}
    assert packed == _sources(ROOT / name) and "__init__.py" in packed
  assert "vtimellm_jax/data_pipelines/synthetic/corpus.py" in names
  # Only code and text: the release's demo video (CC BY-NC-ND) stays a test fixture, outside the wheel.
  assert not [n for n in names if n.endswith((".mp4", ".npy", ".json"))]
