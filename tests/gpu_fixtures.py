"""Tests that compile for a GPU without one, through the CUDA plugin's compile-only client."""

from __future__ import annotations

import importlib.util

import pytest


def has_cuda_plugin() -> bool:
  """Returns whether the CUDA plugin (the cuda and test extras) is installed."""
  try:
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:  # no jax_plugins package at all
    return False


# Marks a test that compiles for a compile-only H100. CI installs the test extra only (the cuda
# extra's CUDA libraries are gigabytes), so these run where `pip install -e ".[cuda,test]"` was run.
needs_cuda_plugin = pytest.mark.skipif(not has_cuda_plugin(),
                                       reason="needs the CUDA plugin: pip install -e \".[cuda,test]\" (CI leaves it out)")
