"""The answering commands' XLA flags: added once, never over the user's own setting."""

from vtimellm_jax import xla_flags


def test_flag_is_added_to_empty_and_existing_flags():
  environ = {}
  assert xla_flags.use_answering_flags(environ) == ["--xla_gpu_enable_triton_gemm=false"]
  assert environ["XLA_FLAGS"] == "--xla_gpu_enable_triton_gemm=false"
  environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  xla_flags.use_answering_flags(environ)
  assert environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=8", "--xla_gpu_enable_triton_gemm=false"]


def test_second_call_adds_nothing():
  environ = {}
  xla_flags.use_answering_flags(environ)
  assert xla_flags.use_answering_flags(environ) == []
  assert environ["XLA_FLAGS"].split().count("--xla_gpu_enable_triton_gemm=false") == 1


def test_user_setting_wins():
  for own in ("--xla_gpu_enable_triton_gemm=true", "xla_gpu_enable_triton_gemm=true", "--xla_gpu_enable_triton_gemm"):
    environ = {"XLA_FLAGS": own}
    assert xla_flags.use_answering_flags(environ) == []
    assert environ["XLA_FLAGS"] == own
