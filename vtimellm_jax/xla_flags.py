"""XLA flags the answering commands (chat, eval, serve, demo, their benchmarks) set before JAX starts.

Greedy decoding is matrix-vector work: each token reads every weight once. On GPU, XLA fuses those
matmuls into Triton GEMM kernels by default, which are slower than cuBLAS on matrix-vector shapes,
so the answering commands leave the matmuls to cuBLAS. The flag only concerns GPU compiles; CPU and
TPU ignore it. Training and feature extraction keep XLA's default: their matmuls are large and
square, where Triton's fusions are the faster. The measured rates of both, with and without the
flag (`bench/device_suite.sh`, steps decode, decode_triton, clip and clip_cublas), are in
docs/performance.md ("Measured on one H200").
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

TRITON_GEMM = "xla_gpu_enable_triton_gemm"
ANSWERING_FLAGS = (f"--{TRITON_GEMM}=false",)


def use_answering_flags(environ: MutableMapping[str, str] = os.environ) -> list[str]:
  """Adds ANSWERING_FLAGS to XLA_FLAGS, except a flag the user's XLA_FLAGS already sets; returns those added.

  XLA reads XLA_FLAGS when JAX creates its backend (the first computation or device query), so this
  runs at the start of a command, before any of that.
  """
  current = environ.get("XLA_FLAGS", "")
  named = {word.lstrip("-").split("=", 1)[0] for word in current.split()}
  added = [flag for flag in ANSWERING_FLAGS if flag.lstrip("-").split("=", 1)[0] not in named]
  if added:
    environ["XLA_FLAGS"] = " ".join([*current.split(), *added])
  return added
