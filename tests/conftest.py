"""Test harness: 8 fake CPU devices so sharding tests never skip, and exact fp32 matmuls."""

import os

# Must be set before jax is imported anywhere.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import pathlib  # noqa: E402

import pytest  # noqa: E402

FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "vtimellm_official"


@pytest.fixture(scope="session")
def official_fixtures() -> pathlib.Path:
  """The release's real files (tests/fixtures/README.md says what each is)."""
  return FIXTURES
