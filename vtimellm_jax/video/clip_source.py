"""The CLIP a `--clip` argument names: a converted directory, a checkpoint converted on the fly, or a random tiny one."""

from __future__ import annotations

import pathlib
import sys

from vtimellm_jax.errors import UserError

TINY_RANDOM = "tiny-random"
# Random tiny CLIPs by name: (image size, patch size). The 64-px one reads the quickstart's 64-px
# videos without upsampling them to 224 px, several times faster (docs/synthetic.md).
TINY_RANDOM_SIZES = {TINY_RANDOM: (224, 32), "tiny-random-64": (64, 8)}


# JAX and the models are imported on use: `extract-features --help` reads the names above without them.


def compute_dtype(name: str):
  """Returns the jnp dtype for --dtype, resolving 'auto' by the default backend."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  if name == "auto":
    name = {"gpu": "float16", "tpu": "bfloat16"}.get(jax.default_backend(), "float32")
  return jnp.dtype(name)


def load_clip(spec: str, dtype, seed: int = 0):
  """Returns a ClipVision from a model directory, a convertible source, or a `TINY_RANDOM_SIZES` name."""
  from vtimellm_jax import model_io  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.convert import clip as convert_clip  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.models import clip as clip_model, load  # pylint: disable=g-import-not-at-top

  if spec in TINY_RANDOM_SIZES:
    return load.random_clip(clip_model.tiny(*TINY_RANDOM_SIZES[spec]), seed, dtype=dtype)
  path = pathlib.Path(spec)
  if (path / model_io.MODEL_JSON).is_file():
    return load.load_model(path, dtype=dtype)
  if not path.exists():
    raise UserError(f"--clip {spec}: not found (a converted CLIP directory, a CLIP checkpoint, or one of "
                    f"{', '.join(TINY_RANDOM_SIZES)})")
  print(f"converting {spec} on the fly (save time next run with `vtimellm-jax convert clip`)", file=sys.stderr)
  cfg, params, _ = convert_clip.convert(path)
  return load.clip_from_params(cfg, params, dtype=dtype, source=spec)
