"""The VTimeLLM recipe shared by every stage. Stage files change only what differs.

Two LLM families, as the release has: Vicuna v1.5 (sizes `tiny` for CPU tests and the quickstart,
`7b`, `13b`) and ChatGLM3 (`chatglm3` = ChatGLM3-6B; `chatglm3,tiny` for CPU tests). The release's
`_glm.sh` stage scripts use the same hyperparameters as the Vicuna ones; what differs is the model,
its LoRA targets (every Linear of ChatGLM3, its output layer included) and the prompt: with a
ChatGLM tokenizer the release builds every stage's samples with `preprocess_glm` (template `glm`).
Those differences live in the family registry (models/families.py); this file only asks it.
Global batch 128 = micro_batch x accumulation x data-parallel ranks; accumulation is derived at run
time from the device count, so the global batch stays 128 on any mesh.
"""

from __future__ import annotations

import ml_collections

from vtimellm_jax.models import families


def parse_arg(arg: str | None) -> dict[str, str]:
  """Returns {"family": ..., "size": ...} of a big_vision-style argument.

  `tiny`, `7b`, `13b` (Vicuna), `chatglm3` (ChatGLM3-6B), `chatglm3,tiny`, or the keys
  `family=`/`size=`; "" is the tiny Vicuna. Anything else is refused, listing what is known, so a
  mistyped size never trains the tiny model.
  """
  out = {}
  problems = []
  for part in filter(None, (arg or "").split(",")):
    key, sep, value = part.partition("=")
    if not sep:
      key, value = ("family", key) if key in families.FAMILIES else ("size", key)
    if key == "family" and value in families.FAMILIES:
      out["family"] = value
    elif key == "family":
      problems.append(f"unknown family {value!r}; choose from {', '.join(families.FAMILIES)}")
    elif key == "size" and value in families.SIZES:
      out["size"] = value
    elif key == "size":
      problems.append(f"unknown size {value!r}; choose from {', '.join(families.SIZES)}")
    else:
      problems.append(f"unknown argument {part!r} (known: family, size, or one of them alone)")
  family = families.get(out.setdefault("family", families.VICUNA.name))
  size = out.setdefault("size", family.default_size)
  if not problems and size not in family.sizes:
    problems.append(f"{family.name} has no size {size!r}; choose from {', '.join(family.sizes)}")
  if problems:
    raise ValueError("; ".join(problems))
  return out


def plain_template(c: ml_collections.ConfigDict) -> str:
  """Returns the template of the caption-only stages (0, 1) of the config's family (`plain`, `glm`)."""
  return families.get(c.family).caption_template


def recipe(size: str, family: str = families.VICUNA.name) -> ml_collections.ConfigDict:
  """Returns the hyperparameters common to all stages for `family` and `size`."""
  tiny = size == "tiny"
  fam = families.get(family)
  c = ml_collections.ConfigDict()
  c.stage = ""
  c.family = family
  c.size = size
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.preset = fam.preset_name(size)
  c.model.base = ""  # model directory (convert llama / an export); "" = random init of the preset
  c.model.vocab_size = 0  # 0: the base's or the preset's
  # 0 keeps the preset's value; the quickstart widens `tiny` with these.
  c.model.hidden_size = 0
  c.model.intermediate_size = 0
  c.model.num_layers = 0
  c.model.num_heads = 0
  c.model.rope_theta = 0.0
  c.model.dtype = "float32" if tiny else "bfloat16"  # compute
  c.model.param_dtype = "float32" if tiny else "bfloat16"  # frozen base weights
  # What the backward pass recomputes of each layer (llama.remat_policy): none | full (everything; the
  # release checkpoints) | save_dots | lora (keeps every frozen matmul's output: only norms, rope, LoRA's
  # x @ A and silu(gate) * up are recomputed; memory and step times in docs/performance.md).
  c.model.remat = "none" if tiny else "full"
  c.model.attention_impl = "auto"  # auto | xla | cudnn | splash | per_head; auto: cuDNN on GPU, splash on TPU
  # (16-bit), per_head on CPU
  # > 0: the loss runs lm_head over this many positions at a time and recomputes them in the
  # backward pass, so fp32 [B, T, 32000] logits are never held whole. 0: full logits (same loss).
  # On a v5e-16 AOT compile of 7B stage 2 it saved little (bench/results/history.md).
  # ChatGLM3's LoRA covers lm_head with dropout (as the release trains it), which the chunked loss
  # cannot recompute (config_loading refuses it): full logits there.
  c.model.loss_chunk = 0 if tiny or fam.lora_on_output else 512
  # > 0: video tokens carry a frame-time code and the pieces 00-99 start from it (models/time_code.py).
  # Random init only (a base keeps its own). Off by default and for Vicuna; the quickstart's tiny
  # model uses it (docs/synthetic.md).
  c.model.time_code = 0.0
  # QLoRA: the frozen decoder projections held as nf4 | fp4 | int8 ("" keeps them in param_dtype), made at
  # load, one kernel at a time; with double_quant their block scales are quantised too (the release's
  # --bits 4 --quant_type nf4 --double_quant). lm_head, the embeddings, LoRA and the adapter stay float.
  c.model.quant = ""
  c.model.double_quant = True

  c.trainable = "lora"  # adapter | lora | all
  c.lora = ml_collections.ConfigDict(dict(rank=64, alpha=128.0, dropout=0.05, targets=fam.lora_targets))
  if tiny:
    c.lora.rank, c.lora.alpha = 8, 16.0

  c.load = ml_collections.ConfigDict()
  c.load.adapter = ""  # a stage-1 workdir (or model dir) whose mm_projector is loaded
  c.load.merge_lora = ""  # a stage-2 workdir whose LoRA is merged into the base before training

  c.data = ml_collections.ConfigDict()
  c.data.json = ""
  c.data.features = ""
  c.data.tokenizer = ""  # "" = the tokenizer files of model.base
  c.data.template = fam.template
  c.data.max_length = 2048
  c.data.num_buckets = 8
  c.data.skip_bad_records = False
  c.data.workers = 0 if tiny else 4

  c.global_batch = 16 if tiny else 128
  c.micro_batch = 4 if tiny else 8  # rows per data-parallel rank per micro-step
  c.epochs = 2
  c.max_steps = 0  # > 0 stops early (smoke runs)

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 1e-4
  c.optim.warmup_ratio = 0.03
  c.optim.weight_decay = 0.0
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.max_grad_norm = 1.0

  # -1: all remaining devices. devices > 0 uses only the first that many devices.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, devices=0))

  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=50 if tiny else 500, keep=2, async_save=True))
  c.log_every = 5 if tiny else 10
  return c
