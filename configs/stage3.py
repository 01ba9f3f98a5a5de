"""Stage 3, instruction tuning: the stage-2 LoRA is merged into the LLM, then a fresh LoRA trains.

vtimellm-jax train --config configs/stage3.py:7b --config.model.base=<vicuna dir> \
  --config.load.adapter=<stage-1 workdir> --config.load.merge_lora=<stage-2 workdir> \
  --config.data.json=stage3.json --config.data.features=<feature dir> --workdir <dir>
"""

from . import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg)
  c = common.recipe(args["size"], args["family"])
  c.stage = "stage3"
  c.trainable = "lora"
  return c
