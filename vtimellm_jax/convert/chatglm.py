"""ChatGLM3 weights <-> our parameter tree: its original names and HF's `GlmForCausalLM` layout.

A ChatGLM3 directory comes in one of two layouts, told apart by its config.json:
  original  `model_type: chatglm` (THUDM's checkpoint and the release's): `transformer.embedding...`,
            `transformer.encoder.layers.N.self_attention.query_key_value` (q, k, v fused),
            `...mlp.dense_h_to_4h` ([gate | up]), `transformer.output_layer`; fields `num_layers`,
            `ffn_hidden_size`, `kv_channels`, `multi_query_group_num`, `padded_vocab_size`, ...
  hf        `model_type: glm` (transformers' `GlmForCausalLM`): LLaMA's names with separate
            `q_proj` / `k_proj` / `v_proj` and a fused `mlp.gate_up_proj` ([gate | up]).
The original names are the working names: `CHATGLM_TABLE` maps them to ours (models/chatglm.py
holds the full name table), HF tensors are renamed into them on the way in (q, k and v of a layer
fused once all three arrived) and out of them on export. The release's LoRA folders and
non_lora_trainables use the original names too, so `convert release` merges in them.

query_key_value's rows are [q | k | v] when config.json says `multi_query_attention: true` (every
ChatGLM2/3 checkpoint); with `false` (the default of ChatGLM's configuration class) its
modeling_chatglm.py reads them per head, [q_0 k_0 v_0 | q_1 k_1 v_1 | ...], and `convert chatglm`
regroups them (`regroup_qkv`), recording that in model.json (`QKV_REGROUPED`): `convert release`
refuses such a model as its base as it refuses the folder. Exports always write
`multi_query_attention: true` with one group per key/value head, which reads [q | k | v] whatever
the grouping.

ChatGLM3's tokenizer and model classes are remote code: .py files beside the weights, named by the
`auto_map` of config.json and tokenizer_config.json. The project ships none of them; an export
copies the user's own from the ChatGLM3 folder the model was converted from (`code_source`,
`copy_remote_code`), or says which files to copy from where.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
from collections.abc import Iterable, Iterator

import jax
import numpy as np

from vtimellm_jax import model_io
from vtimellm_jax.convert import llama, table, torch_files
from vtimellm_jax.errors import ConversionError, UserError
from vtimellm_jax.models import chatglm as chatglm_model
from vtimellm_jax.models.llama import LlamaConfig

_LAYER = "transformer.encoder.layers.{layer}"
# (ChatGLM3 original name, our path, transform), read forwards on import and backwards on export.
CHATGLM_TABLE: tuple[table.Rule, ...] = (
    ("transformer.embedding.word_embeddings.weight", "model/embed_tokens", table.identity),
    ("transformer.encoder.final_layernorm.weight", "model/norm/weight", table.identity),
    ("transformer.output_layer.weight", "lm_head/kernel", table.transpose),
    (f"{_LAYER}.{{norm}}.weight", "model/layers/{norm}/weight", table.identity),
    (f"{_LAYER}.self_attention.query_key_value.weight", "model/layers/self_attn/qkv_proj/kernel", table.transpose),
    (f"{_LAYER}.self_attention.query_key_value.bias", "model/layers/self_attn/qkv_proj/bias", table.identity),
    (f"{_LAYER}.self_attention.dense.weight", "model/layers/self_attn/o_proj/kernel", table.transpose),
    (f"{_LAYER}.mlp.dense_h_to_4h.weight", "model/layers/mlp/gate_up_proj/kernel", table.transpose),
    (f"{_LAYER}.mlp.dense_4h_to_h.weight", "model/layers/mlp/down_proj/kernel", table.transpose),
)
# (HF Glm name, original name) of every tensor but q/k/v, which `hf_to_original` fuses.
HF_RENAMES: tuple[table.Rule, ...] = tuple((hf, original, table.identity) for hf, original in (
    ("model.embed_tokens.weight", "transformer.embedding.word_embeddings.weight"),
    ("model.norm.weight", "transformer.encoder.final_layernorm.weight"),
    ("lm_head.weight", "transformer.output_layer.weight"),
    ("model.layers.{layer}.{norm}.weight", f"{_LAYER}.{{norm}}.weight"),
    ("model.layers.{layer}.self_attn.o_proj.weight", f"{_LAYER}.self_attention.dense.weight"),
    ("model.layers.{layer}.mlp.gate_up_proj.weight", f"{_LAYER}.mlp.dense_h_to_4h.weight"),
    ("model.layers.{layer}.mlp.down_proj.weight", f"{_LAYER}.mlp.dense_4h_to_h.weight"),
))
_HF_QKV = re.compile(r"model\.layers\.(?P<layer>\d+)\.self_attn\.(?P<part>[qkv])_proj\.(?P<kind>weight|bias)")
_QKV = re.compile(r"transformer\.encoder\.layers\.(?P<layer>\d+)\.self_attention\.query_key_value\."
                  r"(?P<kind>weight|bias)")
# Buffers the model recomputes (ChatGLM's rope table; older HF checkpoints' inv_freq).
IGNORED = (r"transformer\.rotary_pos_emb\.inv_freq", r".*rotary_emb\.inv_freq")
LAYOUTS = ("original", "hf")
# The record that `convert chatglm` regrouped a per-head query_key_value: LoRA folders of the model it
# came from change those rows in the per-head order. model.json carries it, and so do the model
# directories and ChatGLM3 config.json files exported from such a model (`was_regrouped`).
QKV_REGROUPED = "qkv_regrouped_from_per_head"
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")
_ORIGINAL_TYPES = ("chatglm", "VTimeLLM_ChatGLM")
# The remote-code classes THUDM's ChatGLM3-6B config.json names (module.Class, module = file name).
AUTO_MAP = {
    "AutoConfig": "configuration_chatglm.ChatGLMConfig",
    "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
    "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
}
# What `AutoTokenizer.from_pretrained(..., trust_remote_code=True)` (the release's loader) imports,
# whether or not the folder's tokenizer_config.json names it.
TOKENIZER_CODE = "tokenization_chatglm.py"
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import\s", re.MULTILINE)


def load_config_json(src: pathlib.Path) -> tuple[dict, pathlib.Path]:
  """Returns (the parsed config.json of a directory, its path), or raises UserError."""
  path = src / "config.json" if src.is_dir() else src
  if not path.is_file():
    raise UserError(f"{path}: config.json not found")
  try:
    return json.loads(path.read_text()), path
  except json.JSONDecodeError as e:
    raise UserError(f"{path}: invalid JSON ({e})") from e


def is_chatglm(hf: dict) -> bool:
  """Returns whether a config.json dict describes a ChatGLM3 model, in either layout."""
  return hf.get("model_type") in (*_ORIGINAL_TYPES, "glm") or "padded_vocab_size" in hf


def layout_of(hf: dict, source: str = "config.json") -> str:
  """Returns 'original' (ChatGLM3's names) or 'hf' (GlmForCausalLM) of a config.json dict, or raises UserError."""
  model_type = hf.get("model_type")
  if model_type in _ORIGINAL_TYPES or (model_type is None and "padded_vocab_size" in hf):
    return "original"
  if model_type == "glm":
    return "hf"
  raise UserError(f"{source}: model_type {model_type!r} is not a ChatGLM3 checkpoint: expected 'chatglm' "
                  "(its original names, transformer.encoder.layers.N...) or 'glm' (HF GlmForCausalLM)")


def was_regrouped(meta: dict) -> bool:
  """Returns whether a model.json or config.json dict records `QKV_REGROUPED`."""
  return bool(meta.get(QKV_REGROUPED))


def regrouped_error(path: str | pathlib.Path, source: str | None) -> UserError:
  """Returns the refusal of a base whose `path` records `QKV_REGROUPED` (LoRA folders would mix its heads)."""
  origin = f" (multi_query_attention false in {source})" if source else ""
  return UserError(f"--base {path}: {QKV_REGROUPED} is true: `convert chatglm` regrouped query_key_value from "
                   f"per head{origin}, and the LoRA folders of such a model change its rows per head, so merging "
                   "them here would mix heads; give --base a multi-query ChatGLM3 checkpoint "
                   "(multi_query_attention: true, as THUDM's) or a model converted from one")


def qkv_per_head(hf: dict) -> bool:
  """Returns whether an original-layout config.json's query_key_value rows are grouped per head.

  ChatGLM's modeling code splits [q | k | v] only under `multi_query_attention` (absent means
  false, its configuration class's default); otherwise it reads each head's q, k and v side by side.
  """
  return not hf.get("multi_query_attention", False)


def _original_config(hf: dict, source: str, **overrides) -> LlamaConfig:
  problems = [f"missing key {k!r}" for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                            "padded_vocab_size") if k not in hf]
  for key, wanted in (("rmsnorm", True), ("post_layer_norm", True), ("add_bias_linear", False),
                      ("apply_residual_connection_post_layernorm", False), ("pre_seq_len", None)):
    if hf.get(key, wanted) != wanted:
      problems.append(f"{key}={hf[key]!r} is not ChatGLM3's ({wanted!r})")
  if hf.get("rope_ratio", 1) != 1:
    problems.append(f"rope_ratio={hf['rope_ratio']} (a long-context variant) is not supported: the release's "
                    "modeling_chatglm.py rotates with base 10000")
  if hf.get("tie_word_embeddings"):
    problems.append("tie_word_embeddings=true: ChatGLM3's output layer is untied")
  if problems:
    raise UserError(f"{source}: not a supported ChatGLM3 config:\n" + "\n".join(f"  - {p}" for p in problems))
  heads = hf["num_attention_heads"]
  return chatglm_model.chatglm3_6b(
      vocab_size=hf["padded_vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["ffn_hidden_size"],
      num_layers=hf["num_layers"], num_heads=heads,
      num_kv_heads=hf.get("multi_query_group_num", 1) if hf.get("multi_query_attention") else heads,
      head_dim=hf.get("kv_channels") or hf["hidden_size"] // heads, rms_norm_eps=hf.get("layernorm_epsilon", 1e-5),
      max_position_embeddings=hf.get("seq_length", 2048), qkv_bias=bool(hf.get("add_qkv_bias", False)), **overrides)


def _hf_glm_config(hf: dict, source: str, **overrides) -> LlamaConfig:
  rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
  problems = [f"missing key {k!r}" for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                            "num_attention_heads") if k not in hf]
  if rope.get("rope_type", rope.get("type", "default")) != "default":
    problems.append(f"rope {rope} is not supported (default rope only)")
  if hf.get("hidden_act", "silu") != "silu":
    problems.append(f"hidden_act {hf.get('hidden_act')!r}, expected 'silu'")
  if hf.get("tie_word_embeddings"):
    problems.append("tie_word_embeddings=true: ChatGLM3's output layer is untied")
  if problems:
    raise UserError(f"{source}: not a supported GlmForCausalLM config:\n" + "\n".join(f"  - {p}" for p in problems))
  return chatglm_model.chatglm3_6b(
      vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
      num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
      head_dim=hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"],
      rms_norm_eps=hf.get("rms_norm_eps", 1e-5), max_position_embeddings=hf.get("max_position_embeddings", 8192),
      qkv_bias=bool(hf.get("attention_bias", True)),
      rope_theta=float(hf.get("rope_theta", rope.get("rope_theta", 10000.0))),
      partial_rotary_factor=float(hf.get("partial_rotary_factor", rope.get("partial_rotary_factor", 0.5))),
      **overrides)


def read_config(src: str | pathlib.Path, **overrides) -> tuple[LlamaConfig, str]:
  """Returns (our config, layout 'original' | 'hf') of a ChatGLM3 directory's config.json."""
  hf, path = load_config_json(pathlib.Path(src))
  layout = layout_of(hf, str(path))
  try:
    build = _original_config if layout == "original" else _hf_glm_config
    return build(hf, str(path), **overrides), layout
  except ValueError as e:  # LlamaConfig's own checks (head counts, rotary dims)
    raise UserError(f"{path}: {e}") from e


def to_original_dict(config: LlamaConfig) -> dict:
  """Returns ChatGLM3's own config.json dict (original names) of a ChatGLM-family config.

  Every field THUDM's ChatGLM3-6B config.json has, plus the rest of the fields its configuration
  class reads, so ChatGLM's modeling code finds each attribute it asks for (its forward reads
  `use_cache` from the config). Values are this model's; the switches are ChatGLM3's (RMSNorm,
  pre-norm, bias on query_key_value only, no prefix tuning or quantization). `multi_query_attention`
  is always true, with one group per key/value head: with false ChatGLM would read query_key_value
  per head, which is not how these weights are laid out. `torch_dtype` is the writer's
  (`export_formats.write_hf_dir`); `_name_or_path` and `transformers_version`, which
  transformers' `save_pretrained` adds about itself, are left out.
  """
  if not (config.fused_projections and config.rope_interleaved and config.partial_rotary_factor == 0.5):
    raise ValueError("not a ChatGLM3 architecture (fused projections, interleaved rope on half of each head)")
  if config.rope_theta != 10000.0:
    raise ValueError(f"ChatGLM3's config has no rope base; this model's is {config.rope_theta}, not 10000")
  return {
      "architectures": ["ChatGLMModel"], "model_type": "chatglm", "auto_map": dict(AUTO_MAP),
      "num_layers": config.num_layers, "padded_vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
      "ffn_hidden_size": config.intermediate_size, "kv_channels": config.head_size,
      "num_attention_heads": config.num_heads, "multi_query_attention": True,
      "multi_query_group_num": config.num_kv_heads, "seq_length": config.max_position_embeddings,
      "layernorm_epsilon": config.rms_norm_eps, "rmsnorm": True, "post_layer_norm": True,
      "apply_residual_connection_post_layernorm": False, "add_bias_linear": False,
      "add_qkv_bias": config.qkv_bias, "original_rope": True, "tie_word_embeddings": False,
      "hidden_dropout": 0.0, "attention_dropout": 0.0, "classifier_dropout": None,
      "apply_query_key_layer_scaling": True, "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
      "fp32_residual_connection": False, "quantization_bit": 0, "pre_seq_len": None, "prefix_projection": False,
      "use_cache": True, "eos_token_id": 2, "pad_token_id": 0,
  }


def _qkv_widths(config: LlamaConfig) -> tuple[int, int, int]:
  q, kv = config.num_heads * config.head_size, config.num_kv_heads * config.head_size
  return q, kv, kv


def hf_to_original(tensors: Iterable[tuple[str, str, np.ndarray]], config: LlamaConfig,
                   problems: list[str]) -> Iterator[tuple[str, str, np.ndarray]]:
  """Yields (file, original name, array) of HF Glm (file, name, array) triples: renamed, q/k/v fused.

  A layer's q, k and v are held until all three arrived; a part of the wrong shape, or one missing
  at the end, is appended to `problems` under its HF name. Other names pass through unchanged (the
  caller reports them as unexpected).
  """
  widths = _qkv_widths(config)
  pending: dict[tuple[int, str], dict[str, tuple[str, np.ndarray]]] = {}
  for file_name, name, array in tensors:
    match = _HF_QKV.fullmatch(name)
    if match is None:
      mapped = table.to_ours(name, HF_RENAMES)
      yield file_name, (mapped[0] if mapped else name), array
      continue
    layer, part, kind = int(match["layer"]), match["part"], match["kind"]
    width = widths["qkv".index(part)]
    want = (width, config.hidden_size) if kind == "weight" else (width,)
    where = f"{name} (in {pathlib.Path(file_name).name})"
    parts = pending.setdefault((layer, kind), {})
    if part in parts:
      problems.append(f"tensor {name} appears twice")
      continue
    parts[part] = (file_name, array)
    if tuple(array.shape) != want:
      problems.append(f"{where}: shape {tuple(array.shape)}, expected {want}")
      parts[part] = (file_name, None)  # seen: not reported missing, and the layer's fused tensor is not built
    if len(parts) == 3 and all(a is not None for _, a in parts.values()):
      del pending[(layer, kind)]
      fused = np.concatenate([parts[p][1] for p in "qkv"], axis=0)
      yield file_name, f"transformer.encoder.layers.{layer}.self_attention.query_key_value.{kind}", fused
  for (layer, kind), parts in sorted(pending.items()):
    if len(parts) == 3:
      continue  # a part had the wrong shape, reported above
    present = ", ".join(f"{p}_proj in {pathlib.Path(parts[p][0]).name}" for p in sorted(parts))
    problems += [f"missing tensor model.layers.{layer}.self_attn.{p}_proj.{kind} (have {present})"
                 for p in "qkv" if p not in parts]


def original_to_hf(tensors: Iterable[tuple[str, np.ndarray]], config: LlamaConfig) -> Iterator[tuple[str, np.ndarray]]:
  """Yields (HF Glm name, array) of (original name, array) pairs: renamed, query_key_value split into q/k/v."""
  q, k, _ = _qkv_widths(config)
  for name, array in tensors:
    match = _QKV.fullmatch(name)
    if match:
      prefix = f"model.layers.{match['layer']}.self_attn"
      for part, piece in zip("qkv", np.split(array, [q, q + k], axis=0)):
        yield f"{prefix}.{part}_proj.{match['kind']}", piece
      continue
    hf = table.to_source(name, HF_RENAMES)
    if hf is None:
      raise ValueError(f"no HF Glm name for {name}")
    yield hf[0][0], array


def regroup_qkv(tensors: Iterable[tuple[str, str, np.ndarray]],
                config: LlamaConfig) -> Iterator[tuple[str, str, np.ndarray]]:
  """Yields the (file, original name, array) triples with each query_key_value regrouped from per head to [q | k | v].

  Per head, rows are [q_h, k_h, v_h] of `head_size` each (ChatGLM without multi-query attention,
  every head its own key/value head); a tensor of another row count passes unchanged, for the
  converter to report its shape.
  """
  heads, size = config.num_heads, config.head_size
  for file_name, name, array in tensors:
    if _QKV.fullmatch(name) and array.shape[0] == 3 * heads * size:
      rest = array.shape[1:]
      array = np.ascontiguousarray(array.reshape(heads, 3, size, *rest).swapaxes(0, 1)).reshape(3 * heads * size, *rest)
    yield file_name, name, array


def iter_original(src: str | pathlib.Path, config: LlamaConfig, layout: str, problems: list[str],
                  regroup_per_head: bool = False) -> Iterator[tuple[str, str, np.ndarray]]:
  """Yields (file, original name, array) of every tensor of a ChatGLM3 directory in either layout.

  query_key_value comes as [q | k | v]. A checkpoint whose config.json lays it out per head
  (`qkv_per_head`) is regrouped when `regroup_per_head`, else refused: a caller that also reads
  LoRA folders of that model (`convert release`) would add their deltas in the other order.
  """
  tensors = ((str(file), name, array) for file, name, array in torch_files.iter_checkpoint(src))
  if layout != "original":
    return hf_to_original(tensors, config, problems)
  hf, path = load_config_json(pathlib.Path(src))
  if not qkv_per_head(hf):
    return tensors
  if not regroup_per_head:
    raise UserError(f"{path}: multi_query_attention is {hf.get('multi_query_attention', 'absent')!r}, so "
                    "query_key_value holds q, k and v per head, and the LoRA folders of such a model would too; "
                    "only multi-query ChatGLM3 checkpoints (multi_query_attention: true, as THUDM's) are read "
                    "here (`vtimellm-jax convert chatglm` converts the model alone)")
  return regroup_qkv(tensors, config)


def convert_chatglm(src: str | pathlib.Path, out: str | pathlib.Path,
                    dtype: str = "bfloat16") -> tuple[LlamaConfig, str]:
  """Converts a ChatGLM3 directory (original or HF Glm layout) into a model directory; returns (config, layout)."""
  src = pathlib.Path(src)
  if dtype not in ("bfloat16", "float32"):
    raise UserError(f"--dtype must be bfloat16 or float32, got {dtype!r}")
  config, layout = read_config(src, param_dtype=dtype)
  expected = llama.abstract_params(config)
  problems: list[str] = []
  try:
    flat = llama.convert_tensors(iter_original(src, config, layout, problems, regroup_per_head=True), expected,
                                 jax.numpy.dtype(config.storage_dtype), str(src), rules=CHATGLM_TABLE, ignored=IGNORED)
  except ConversionError as e:
    raise ConversionError(str(src), problems + e.problems) from None
  if problems:
    raise ConversionError(str(src), problems)
  hf = load_config_json(src)[0]
  regrouped = (layout == "original" and qkv_per_head(hf)) or was_regrouped(hf)
  model_io.save_model_dir(out, kind="llama", config=config.architecture(), params=model_io.nest(flat),
                          source=str(src.absolute()), layout=layout, **{QKV_REGROUPED: regrouped})
  copy_tokenizer(src, out)
  return config, layout


def copy_tokenizer(src: str | pathlib.Path, out: str | pathlib.Path) -> list[str]:
  """Copies ChatGLM3's tokenizer data files present in `src` (never its .py code) to `out`; returns their names."""
  return llama.copy_tokenizer(src, out, names=TOKENIZER_FILES)


def code_source(model_dir: str | pathlib.Path) -> pathlib.Path | None:
  """Returns the ChatGLM3 folder a model directory was converted from, as its model.json records it, or None.

  `convert chatglm` records the folder (`source`), `convert release` its `--base` (`source.base`),
  which may be a `convert chatglm` output: followed until a folder without model.json. The folder
  is returned even if it is gone, so a message can name it. None: nothing recorded (a run's
  export, a random model).
  """
  path, seen = pathlib.Path(model_dir), set()
  while (path / model_io.MODEL_JSON).is_file():
    if path.resolve() in seen:
      return None
    seen.add(path.resolve())
    try:
      source = json.loads((path / model_io.MODEL_JSON).read_text()).get("source")
    except json.JSONDecodeError:
      return None
    if isinstance(source, dict):
      source = source.get("base")
    if not isinstance(source, str) or not source:
      return None
    path = pathlib.Path(source)
  return path


def remote_code_names(folder: str | pathlib.Path) -> list[str]:
  """Returns the .py files that `folder`'s tokenizer_config.json and config.json `auto_map` name, tokenizer's first.

  `tokenization_chatglm.py` is always among them: the release's loader asks for the tokenizer
  with trust_remote_code.
  """
  names = [TOKENIZER_CODE]
  for file_name in ("tokenizer_config.json", "config.json"):
    try:
      auto_map = json.loads((pathlib.Path(folder) / file_name).read_text()).get("auto_map") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
      continue
    for ref in auto_map.values():
      for item in ref if isinstance(ref, list) else [ref]:
        if isinstance(item, str) and "." in item:
          # "module.Class", or "owner/repo--module.Class" for code kept in another hub repository
          names.append(item.split("--")[-1].rsplit(".", 1)[0] + ".py")
  return list(dict.fromkeys(names))


def copy_remote_code(src: str | pathlib.Path | None, out: str | pathlib.Path) -> tuple[list[str], list[str]]:
  """Copies the remote code `out`'s configs name (`remote_code_names`) from the folder `src`; returns (copied, missing).

  The modules a copied file imports relatively (modeling_chatglm.py's `from .quantization import`)
  come too, as transformers asks for them when it loads the file. With `src` None every named file
  is missing.
  """
  out = pathlib.Path(out)
  wanted, copied, missing = remote_code_names(out), [], []
  while wanted:
    name = wanted.pop(0)
    if name in copied or name in missing:
      continue
    file = pathlib.Path(src) / name if src is not None else None
    if file is None or not file.is_file():
      missing.append(name)
      continue
    shutil.copy2(file, out / name)
    copied.append(name)
    wanted += [f"{module}.py" for module in _RELATIVE_IMPORT.findall(file.read_text(errors="replace"))]
  return copied, missing
