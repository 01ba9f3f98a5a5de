"""Benchmarks (run as modules: `python -m vtimellm_jax.bench.<name>`); JSON lines on stdout."""
