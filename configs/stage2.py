"""Stage 2, boundary perception: a fresh LoRA trains on template QA; the stage-1 adapter is loaded.

vtimellm-jax train --config configs/stage2.py:7b --config.model.base=<vicuna dir> \
  --config.load.adapter=<stage-1 workdir> --config.data.json=stage2.json \
  --config.data.features=<feature dir> --workdir <dir>
"""

from . import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg)
  c = common.recipe(args["size"], args["family"])
  c.stage = "stage2"
  c.trainable = "lora"
  return c
