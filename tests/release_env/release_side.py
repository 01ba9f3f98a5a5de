"""The release's half of check_chatglm_export.py: runs the release's own ChatGLM code under transformers 4.31.0.

Run by check_chatglm_export.py with the scratch environment's python, never by pytest, and never
with this project installed: it imports only torch, transformers 4.31.0, peft and the release's
`vtimellm` package extracted from its repository into the work folder (`<work>/release`).

  make   writes the user's side: two ChatGLM3-shaped folders of random weights saved by the
         release's ChatGLMForConditionalGeneration (`chatglm3-src`, multi-query with 2 groups, and
         `chatglm3-src-mha`, `multi_query_attention: false`), each with the release's remote-code
         files and the tokenizer the driver trained; a projector and stage-2/3 peft LoRA folders
         on the release's targets; and the release's logits on the driver's inputs
         (`reference.npz`).
  check  loads each folder the driver exported: strict state dict into the release's model, a
         plain forward after `from_pretrained`, and the release's `load_pretrained_model`
         (tokenizer with trust_remote_code, projector, LoRA merged); writes `loaded.npz` and
         `loaded.json`.
"""

from __future__ import annotations

import json
import pathlib
import shutil
import sys
import types

import numpy as np
import torch

# The small shape of ChatGLM3-6B: 4 query heads of 16 in 2 key/value groups, rope on half of each head.
SHAPE = dict(num_layers=2, padded_vocab_size=512, hidden_size=64, ffn_hidden_size=96, kv_channels=16,
             num_attention_heads=4, multi_query_group_num=2, seq_length=256, layernorm_epsilon=1e-5, rmsnorm=True,
             post_layer_norm=True, add_bias_linear=False, add_qkv_bias=True, original_rope=True,
             apply_residual_connection_post_layernorm=False, torch_dtype="float32", tie_word_embeddings=False,
             use_cache=True, eos_token_id=2, pad_token_id=0)
# As THUDM's folders name their remote code (written into the source folders' config.json).
AUTO_MAP = {"AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration"}
REMOTE_CODE = ("tokenization_chatglm.py", "configuration_chatglm.py", "modeling_chatglm.py", "quantization.py")
TARGETS = ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h", "output_layer"]


def _release(work: pathlib.Path):
  sys.path.insert(0, str(work / "release"))
  from vtimellm.model import VTimeLLMChatGLMForCausalLM  # noqa: F401  (registers the release's classes)
  from vtimellm.model.builder import load_pretrained_model
  from vtimellm.model.chatglm import ChatGLMConfig, ChatGLMForConditionalGeneration

  return types.SimpleNamespace(load_pretrained_model=load_pretrained_model, ChatGLMConfig=ChatGLMConfig,
                               ChatGLMForConditionalGeneration=ChatGLMForConditionalGeneration,
                               VTimeLLMChatGLMForCausalLM=VTimeLLMChatGLMForCausalLM)


def _randomize(model: torch.nn.Module, seed: int, lora: bool = False) -> None:
  """Gives biases and norm scales (or, with `lora`, only the LoRA factors) random values.

  A zero bias, a unit norm or peft's zero B would hide a misplaced tensor.
  """
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if lora:
        if "lora_" in name:
          p.copy_(0.1 * torch.randn(p.shape, generator=gen))
      elif name.endswith("layernorm.weight"):
        p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
      elif name.endswith(".bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def _text_logits(model, inputs) -> np.ndarray:
  with torch.no_grad():
    return model(input_ids=torch.tensor(inputs["text_ids"])).logits.float().numpy()


def _video_logits(model, inputs) -> np.ndarray:
  """The release's multimodal forward: `<video>` (-200) in the ids, features [B, N, 768] as `images`."""
  ids = torch.tensor(inputs["video_ids"])
  with torch.no_grad():
    return model(input_ids=ids, attention_mask=torch.ones_like(ids), images=torch.tensor(inputs["features"])
                 ).logits.float().numpy()


def _args(base: pathlib.Path, projector: pathlib.Path):
  """The two fields of the release's inference arguments that `load_pretrained_model` reads."""
  return types.SimpleNamespace(model_base=str(base), pretrain_mm_mlp_adapter=str(projector))


def make(work: pathlib.Path) -> None:
  release = _release(work)
  inputs = dict(np.load(work / "inputs.npz"))
  code = work / "release" / "vtimellm" / "model" / "chatglm"
  reference = {}
  for name, multi_query, seed in (("chatglm3-src", True, 0), ("chatglm3-src-mha", False, 1)):
    torch.manual_seed(seed)
    config = release.ChatGLMConfig(**SHAPE, multi_query_attention=multi_query)
    model = release.ChatGLMForConditionalGeneration(config, empty_init=False).eval()
    _randomize(model, seed)
    folder = work / name
    model.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**saved, "auto_map": AUTO_MAP}, indent=2))
    for file_name in REMOTE_CODE:  # the user's own remote code, as a THUDM folder holds it
      shutil.copy2(code / file_name, folder / file_name)
    for file_name in ("tokenizer.model", "tokenizer_config.json"):
      shutil.copy2(work / "tokenizer" / file_name, folder / file_name)
    reference[f"text:{name}"] = _text_logits(release.ChatGLMForConditionalGeneration.from_pretrained(folder).eval(),
                                             inputs)
  # The release's ChatGLM set on the multi-query folder: projector, stage 2 and stage 3 LoRA.
  import peft

  torch.manual_seed(2)
  projector = torch.nn.Linear(768, SHAPE["hidden_size"])
  torch.save({"transformer.mm_projector.weight": projector.weight.detach().clone(),
              "transformer.mm_projector.bias": projector.bias.detach().clone()}, work / "mm_projector.bin")
  model = release.VTimeLLMChatGLMForCausalLM.from_pretrained(work / "chatglm3-src")
  for stage, rank, seed in (("stage2", 4, 3), ("stage3", 8, 4)):
    lora = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                      lora_dropout=0.0, task_type="CAUSAL_LM"))
    _randomize(lora, seed, lora=True)
    lora.save_pretrained(work / stage)
    torch.save({}, work / stage / "non_lora_trainables.bin")  # nothing but LoRA trained
    model = lora.merge_and_unload()
  _, merged, _ = release.load_pretrained_model(_args(work / "chatglm3-src", work / "mm_projector.bin"),
                                               str(work / "stage2"), str(work / "stage3"))
  reference["video:release-set"] = _video_logits(merged.eval(), inputs)
  np.savez(work / "reference.npz", **reference)


def check(work: pathlib.Path) -> None:
  from safetensors.torch import load_file

  release = _release(work)
  inputs = dict(np.load(work / "inputs.npz"))
  plan = json.loads((work / "plan.json").read_text())
  logits, report = {}, {}
  for folder in map(pathlib.Path, plan["strict"]):
    # Strict: the export's tensors are exactly the release model's state dict (names, shapes, every one).
    config = release.ChatGLMConfig.from_pretrained(folder)
    model = release.ChatGLMForConditionalGeneration(config, empty_init=False).eval()
    model.load_state_dict(load_file(folder / "model.safetensors"), strict=True)
    logits[f"strict:{folder.name}"] = _text_logits(model, inputs)
    logits[f"plain:{folder.name}"] = _text_logits(
        release.ChatGLMForConditionalGeneration.from_pretrained(folder).eval(), inputs)
    report[folder.name] = {"strict": "ok"}
  for key, (base, projector, lora) in plan["loader"].items():
    tokenizer, model, context = release.load_pretrained_model(_args(pathlib.Path(base), pathlib.Path(projector)),
                                                              lora)
    model.eval()
    exported = load_file(pathlib.Path(base) / "model.safetensors")
    state = model.state_dict()
    # Every weight the model holds came from the files (from_pretrained leaves a missing one uninitialised).
    missing = sorted(k for k in state if k not in exported and "mm_projector" not in k)
    unequal = sorted(k for k, v in exported.items() if not torch.equal(state[k], v)) if lora is None else []
    logits[f"loader:{key}"] = _video_logits(model, inputs)
    report[key] = {"tokenizer": type(tokenizer).__name__, "tokenizer_ids": tokenizer("hello world")["input_ids"],
                   "missing": missing, "unequal": unequal, "context_len": context}
  np.savez(work / "loaded.npz", **logits)
  (work / "loaded.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
  {"make": make, "check": check}[sys.argv[1]](pathlib.Path(sys.argv[2]))
