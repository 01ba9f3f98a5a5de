"""Stage 0 (quickstart only): pretrain a tiny LLaMA on the corpus text, standing in for Vicuna.

Every parameter trains; records are plain-template samples whose "caption" is corpus text: the
stage-1 captions with their stills' features, the stage-2/3 dialogues with a zero feature, so the
same data path and train step serve and the LLM learns to read its visual token, as Vicuna reads
the adapter's output (docs/synthetic.md, "Stages"). Real runs start from Vicuna (`convert llama`)
and skip this stage.
"""

from . import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg)
  c = common.recipe(args["size"], args["family"])
  c.stage = "stage0"
  c.trainable = "all"
  c.data.template = common.plain_template(c)
  c.epochs = 1
  c.optim.lr = 1e-3
  return c
