"""Test harness: 8 fake CPU devices so sharding tests never skip, and exact fp32 matmuls."""

import os

# Must be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the whole run: many tests compile the same tiny programs
# again (a fresh jit per CLI call, per subprocess, per pytest-xdist worker), and a cache hit skips
# XLA. The folder is made by the first process (pytest's controller under -n) and inherited through
# the environment by xdist workers and the subprocesses tests start; it is removed at exit. A cache
# only skips compiling: what each program computes is unchanged.
if "VTIMELLM_TEST_JAX_CACHE" not in os.environ:
  import atexit
  import shutil
  import tempfile

  os.environ["VTIMELLM_TEST_JAX_CACHE"] = tempfile.mkdtemp(prefix="vtimellm-test-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["VTIMELLM_TEST_JAX_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["VTIMELLM_TEST_JAX_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "vtimellm_official"


@pytest.fixture(scope="session")
def official_fixtures() -> pathlib.Path:
  """The release's real files (tests/fixtures/README.md says what each is)."""
  return FIXTURES
