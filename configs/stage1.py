"""Stage 1, feature alignment: only the adapter trains, on image-caption pairs (`plain` template).

vtimellm-jax train --config configs/stage1.py:7b --config.model.base=<vicuna dir> \
  --config.data.json=blip_laion_cc_sbu_558k.json --config.data.features=<feature dir> --workdir <dir>
"""

from . import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg)
  c = common.recipe(args["size"], args["family"])
  c.stage = "stage1"
  c.trainable = "adapter"
  c.data.template = common.plain_template(c)
  c.epochs = 1
  c.optim.lr = 1e-3
  return c
