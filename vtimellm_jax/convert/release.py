"""The released VTimeLLM checkpoints (LLM + mm_projector.bin + peft LoRA folders) -> one model dir.

The release has two families (`Family`): Vicuna (HF LLaMA names, the adapter `model.mm_projector`)
and ChatGLM3-6B (ChatGLM's original names `transformer.encoder.layers.N...`, the adapter
`transformer.mm_projector`; a base in HF Glm layout is renamed into them, convert/chatglm.py). The
base's config.json (or model.json, for a base we converted) says which. The release's loader
builds its model in this order, and so does `convert_release`:
  1. the LLM base;
  2. `mm_projector.bin`: every key containing `mm_projector.` gives the adapter's weight or bias;
  3. per LoRA stage (stage 2, then stage 3): `non_lora_trainables.bin` is loaded over the model
     (prefixes `base_model.` and a doubled `model.` stripped; keys the model lacks are ignored,
     as the release loads it with strict=False; ChatGLM's keys keep a `model.` prefix its model
     lacks, so there they are all ignored), then the peft adapter is applied and merged:
     W += scaling * B @ A, scaling = lora_alpha / r (/ sqrt(r) with use_rslora), and peft's
     `modules_to_save` copies replace their modules.
Everything happens in the family's PyTorch names while the base streams through one tensor at a
time, in float32, so a 7B model never needs more than its converted copy in memory. Every problem
found in any of the files is reported together in one `ConversionError`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections.abc import Iterator

import jax
import numpy as np

from vtimellm_jax import model_io
from vtimellm_jax.convert import chatglm, llama, table, torch_files
from vtimellm_jax.errors import ConversionError, UserError
from vtimellm_jax.models import chatglm as chatglm_model
from vtimellm_jax.models import families
from vtimellm_jax.models import lora as lora_lib
from vtimellm_jax.models.llama import LlamaConfig
from vtimellm_jax.models.vtimellm import VTimeLLM


def projector_table(prefix: str) -> tuple[table.Rule, ...]:
  """Returns the adapter's rules under `prefix` (the release's `mm_projector`, nn.Linear 768 -> d)."""
  return ((f"{prefix}.weight", "mm_projector/kernel", table.transpose),
          (f"{prefix}.bias", "mm_projector/bias", table.identity))


# The adapter in HF names, as the release's `VTimeLLMLlamaModel.mm_projector`.
PROJECTOR_TABLE = projector_table("model.mm_projector")
RELEASE_TABLE = llama.LLAMA_TABLE + PROJECTOR_TABLE
# peft's names of the LoRA factors of our `Linear.lora_a` [in, r] / `lora_b` [r, out].
PEFT_PREFIX = "base_model.model."
PEFT_LORA_TABLE: tuple[table.Rule, ...] = tuple(
    (f"{PEFT_PREFIX}model.layers.{{layer}}.{block}.{{proj}}.lora_{theirs}.weight",
     f"model/layers/{block}/{{proj}}/lora_{ours}", table.transpose)
    for block in ("self_attn", "mlp") for theirs, ours in (("A", "a"), ("B", "b")))


def peft_lora_table(rules: tuple[table.Rule, ...]) -> tuple[table.Rule, ...]:
  """Returns peft's names of the LoRA factors of every Linear of `rules` (`x.weight` -> `x.lora_A.weight`)."""
  return tuple((f"{PEFT_PREFIX}{source[:-len('.weight')]}.lora_{theirs}.weight",
                f"{ours[:-len('kernel')]}lora_{mine}", table.transpose)
               for source, ours, _ in rules if source.endswith(".weight") and ours.endswith("/kernel")
               for theirs, mine in (("A", "a"), ("B", "b")))


@dataclasses.dataclass(frozen=True)
class Family:
  """The release's checkpoint names of one LLM family (models/families.py): its PyTorch names, where its
  adapter lives, what LoRA targets."""

  name: str
  llm_rules: tuple[table.Rule, ...]  # the LLM's PyTorch names <-> ours
  projector_prefix: str  # the adapter's module name in the release's model
  peft_rules: tuple[table.Rule, ...]  # peft's LoRA factor names <-> ours
  lora_modules: tuple[str, ...]  # Linear names a kept (unmerged) LoRA may sit on
  ignored: tuple[str, ...]  # buffers in the base's files that the model recomputes

  @property
  def rules(self) -> tuple[table.Rule, ...]:
    """Returns the whole VTimeLLM's rules: the LLM's and the adapter's."""
    return self.llm_rules + projector_table(self.projector_prefix)

  def projector_names(self) -> tuple[str, str]:
    return f"{self.projector_prefix}.weight", f"{self.projector_prefix}.bias"


VICUNA = Family(families.VICUNA.name, llama.LLAMA_TABLE, "model.mm_projector", PEFT_LORA_TABLE, lora_lib.ALL_TARGETS, llama.IGNORED)
CHATGLM = Family(families.CHATGLM3.name, chatglm.CHATGLM_TABLE, "transformer.mm_projector", peft_lora_table(chatglm.CHATGLM_TABLE),
                 tuple(chatglm_model.RELEASE_LORA_TARGETS), chatglm.IGNORED)


def family_of(config: LlamaConfig) -> Family:
  """Returns the family whose names a model of `config` exports under (ChatGLM3: fused projections)."""
  return CHATGLM if config.fused_projections else VICUNA


def _model_dir_tensors(base: pathlib.Path, family: Family) -> Iterator[tuple[str, str, np.ndarray]]:
  """Yields (file, PyTorch name, array) of a model directory's arrays, one array restored at a time."""
  sharding = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
  for parts, struct in model_io.saved_arrays(base).items():
    target = jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=sharding)
    (array,) = model_io.restore_arrays(base, {parts: target}).values()
    array = np.asarray(array)
    items = table.unstack("/".join(parts), array, family.rules)
    yield from (((str(base), name, value) for name, value in items) if items is not None else
                [(str(base), "/".join(parts), array)])  # a path without a name: reported as unexpected


def read_base(base: str | pathlib.Path, dtype: str, problems: list[str]):
  """Returns (config, family, tensors) of a base LLM: tensors yields (file, name, array) in the family's names.

  `base` is an HF Vicuna directory, a ChatGLM3 directory (original names or HF Glm, renamed on the
  way, appending problems to `problems`) or one of our model directories (`convert llama` /
  `convert chatglm` output) without unmerged LoRA.
  """
  base = pathlib.Path(base)
  if (base / model_io.MODEL_JSON).is_file():
    meta = model_io.read_model_json(base)
    if meta["kind"] not in ("llama", "vtimellm"):
      raise UserError(f"--base {base}: holds a '{meta['kind']}' model, not an LLM")
    if meta.get("lora"):
      raise UserError(f"--base {base}: holds unmerged LoRA; merge it first (vtimellm-jax export --model {base} "
                      "--out <dir>)")
    if chatglm.was_regrouped(meta):
      raise chatglm.regrouped_error(base / model_io.MODEL_JSON, meta.get("source"))
    config = LlamaConfig.from_architecture(meta["config"], param_dtype=dtype)
    family = family_of(config)
    return config, family, _model_dir_tensors(base, family)
  hf, path = chatglm.load_config_json(base)
  if chatglm.is_chatglm(hf):
    if chatglm.was_regrouped(hf):  # exported (`export --format chatglm`) from a regrouped model
      raise chatglm.regrouped_error(path, None)
    config, layout = chatglm.read_config(base, param_dtype=dtype)
    return config, CHATGLM, chatglm.iter_original(base, config, layout, problems)
  config = LlamaConfig.from_hf_file(base, param_dtype=dtype)
  return config, VICUNA, ((str(file), name, array) for file, name, array in torch_files.iter_checkpoint(base))


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")  # peft prefers safetensors
NON_LORA_TRAINABLES = "non_lora_trainables.bin"
_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<factor>A|B)(?:\.(?P<adapter>[\w-]+))?\.weight")


@dataclasses.dataclass
class Stage:
  """One peft LoRA folder, read and checked: what it changes, in HF weight names."""

  folder: pathlib.Path
  # weight name -> (A float32[r, in], B float32[out, r], scaling)
  lora: dict[str, tuple[np.ndarray, np.ndarray, float]] = dataclasses.field(default_factory=dict)
  # weight name -> replacement (non_lora_trainables first, then peft's modules_to_save copies)
  overrides: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

  def apply(self, name: str, weight: np.ndarray, merge: bool = True) -> np.ndarray:
    """Returns `weight` (HF layout) after this stage: replaced if overridden, plus the LoRA delta."""
    if name in self.overrides:
      weight = self.overrides[name]
    if merge and name in self.lora:
      a, b, scaling = self.lora[name]
      weight = weight.astype(np.float32) + np.float32(scaling) * (b @ a)
    return weight


def hf_shapes(config: LlamaConfig, family: Family = VICUNA) -> dict[str, tuple[int, ...]]:
  """Returns {PyTorch name: torch-layout shape} of every VTimeLLM weight (projector included)."""
  shapes = {}
  for path, struct in llama.abstract_params(config, VTimeLLM).items():
    for name, layer, transform in table.to_source(path, family.rules, struct.shape[0]):
      slot = struct.shape[1:] if layer is not None else struct.shape
      shapes[name] = transform(np.empty(slot, np.int8)).shape
  return shapes


def _peft_module_name(key: str) -> str:
  """Returns the weight name a non-LoRA peft key saves: a `modules_to_save` copy, a bias, or the base
  weight of a targeted output layer (newer peft saves `<module>.base_layer.weight` for an embedding
  or output layer it puts LoRA on, as the ChatGLM release's `output_layer`; loading writes it back)."""
  name = key[len(PEFT_PREFIX):]
  return re.sub(r"\.(modules_to_save(\.[\w-]+)?|base_layer)\.", ".", name)


def _pattern_value(patterns: dict, module: str, default):
  """Returns peft's per-module `rank_pattern` / `alpha_pattern` value for `module`, else `default`."""
  for pattern, value in (patterns or {}).items():
    if re.match(rf"(.*\.)?({pattern})$", module):
      return value
  return default


def _targeted(target_modules, module: str) -> bool:
  """Returns whether peft's `target_modules` (a list of names or one regex) selects `module`."""
  if target_modules is None:
    return False
  if isinstance(target_modules, str):
    if target_modules == "all-linear":
      return not module.endswith("lm_head")
    return re.fullmatch(target_modules, module) is not None
  return any(module == t or module.endswith("." + t) for t in target_modules)


def _read_config(folder: pathlib.Path, problems: list[str]) -> dict | None:
  path = folder / ADAPTER_CONFIG
  if not path.is_file():
    problems.append(f"{path}: missing (a peft LoRA folder holds {ADAPTER_CONFIG})")
    return None
  try:
    config = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    problems.append(f"{path}: invalid JSON ({e})")
    return None
  before = len(problems)
  if config.get("peft_type", "LORA") != "LORA":
    problems.append(f"{path}: peft_type {config.get('peft_type')!r}, only LORA adapters are supported")
  for key in ("r", "lora_alpha"):
    if not isinstance(config.get(key), (int, float)) or config.get(key) <= 0:
      problems.append(f"{path}: {key} must be a positive number, got {config.get(key)!r}")
  if config.get("use_dora"):
    problems.append(f"{path}: use_dora=true (DoRA) is not supported")
  return config if len(problems) == before else None


def _weights_file(folder: pathlib.Path, problems: list[str]) -> pathlib.Path | None:
  found = [folder / name for name in ADAPTER_WEIGHTS if (folder / name).is_file()]
  if not found:
    problems.append(f"{folder}: no adapter weights ({' or '.join(ADAPTER_WEIGHTS)})")
    return None
  return found[0]


def _load(path: pathlib.Path, problems: list[str]) -> dict[str, np.ndarray]:
  try:
    return torch_files.load_weight_file(path)
  except UserError as e:
    problems.append(str(e))
    return {}


def read_non_lora_trainables(path: pathlib.Path, shapes: dict, problems: list[str], notes: list[str]) -> dict:
  """Returns {HF name: array} of a `non_lora_trainables.bin`, keys normalised as the release does."""
  tensors = _load(path, problems)
  tensors = {(k[len("base_model."):] if k.startswith("base_model.") else k): v for k, v in tensors.items()}
  if any(k.startswith("model.model.") for k in tensors):
    tensors = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in tensors.items()}
  out = {}
  for name, value in tensors.items():
    if name not in shapes:
      notes.append(f"{path}: {name} is not a weight of the model; ignored (the release loads this file non-strictly)")
    elif tuple(value.shape) != shapes[name]:
      problems.append(f"{path}: {name} has shape {tuple(value.shape)}, the model's is {shapes[name]}")
    else:
      out[name] = value
  return out


def read_stage(folder: str | pathlib.Path, shapes: dict, problems: list[str], notes: list[str]) -> Stage:
  """Returns one peft LoRA folder as a `Stage`, appending every problem found to `problems`."""
  folder = pathlib.Path(folder)
  stage = Stage(folder)
  if not folder.is_dir():
    problems.append(f"{folder}: not a folder (expected a peft LoRA folder with {ADAPTER_CONFIG})")
    return stage
  if (folder / NON_LORA_TRAINABLES).is_file():
    stage.overrides.update(read_non_lora_trainables(folder / NON_LORA_TRAINABLES, shapes, problems, notes))
  config, weights = _read_config(folder, problems), _weights_file(folder, problems)
  if config is None or weights is None:
    return stage
  if config.get("fan_in_fan_out"):
    notes.append(f"{folder / ADAPTER_CONFIG}: fan_in_fan_out=true does not apply to nn.Linear; peft uses false, so do we")
  factors: dict[str, dict[str, np.ndarray]] = {}
  for key, value in _load(weights, problems).items():
    match = _LORA_KEY.fullmatch(key)
    if match:
      factors.setdefault(match["module"], {})[match["factor"]] = value.astype(np.float32)
    elif "lora_" in key:
      problems.append(f"{weights}: {key} is a kind of LoRA tensor this converter does not support")
    elif key.startswith(PEFT_PREFIX) and _peft_module_name(key) in shapes:
      name = _peft_module_name(key)  # a modules_to_save copy (or a trained bias): replaces the weight
      if tuple(value.shape) != shapes[name]:
        problems.append(f"{weights}: {key} has shape {tuple(value.shape)}, {name} is {shapes[name]}")
      else:
        stage.overrides[name] = value
    else:
      problems.append(f"{weights}: unexpected tensor {key} (not a LoRA factor of a model weight)")
  targets = config.get("target_modules")
  for module, pair in sorted(factors.items()):
    name = module + ".weight"
    where = f"{weights}: {module}"
    if name not in shapes or len(shapes[name]) != 2:
      problems.append(f"{where}: not a linear layer of the model")
      continue
    if not _targeted(targets, module):
      problems.append(f"{where}: has LoRA weights but {ADAPTER_CONFIG}'s target_modules {targets} does not "
                      "select it (peft would silently drop them)")
      continue
    if set(pair) != {"A", "B"}:
      problems.append(f"{where}: lora_{'B' if 'A' in pair else 'A'} is missing")
      continue
    a, b = pair["A"], pair["B"]
    rank = _pattern_value(config.get("rank_pattern"), module, config["r"])
    alpha = _pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"])
    out_dim, in_dim = shapes[name]
    if a.shape != (rank, in_dim) or b.shape != (out_dim, rank):
      problems.append(f"{where}: lora_A {a.shape} / lora_B {b.shape}, expected ({rank}, {in_dim}) / ({out_dim}, {rank}) "
                      f"for r={rank}")
      continue
    scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    stage.lora[name] = (a, b, scaling)
  if isinstance(targets, list):
    # A listed target with no weights in the file means a truncated or mismatched adapter.
    hit = {t for t in targets for module in factors if _targeted([t], module)}
    for target in sorted(set(targets) - hit):
      problems.append(f"{folder / ADAPTER_CONFIG}: target_modules names {target!r} but {weights.name} has no "
                      "LoRA weights for it")
  if not stage.lora and not stage.overrides and not factors:
    notes.append(f"{folder}: holds no weights that change the model")
  return stage


def read_projector(path: str | pathlib.Path, shapes: dict, problems: list[str], notes: list[str],
                   family: Family = VICUNA) -> dict:
  """Returns {PyTorch name: array} of a stage-1 `mm_projector.bin`, read as the release reads it."""
  path = pathlib.Path(path)
  found: dict[str, np.ndarray] = {}
  before = len(problems)
  for key, value in _load(path, problems).items():
    if "mm_projector." not in key:
      notes.append(f"{path}: {key} ignored (the release keeps only keys containing 'mm_projector')")
      continue
    suffix = key.split("mm_projector.")[1]
    name = f"{family.projector_prefix}.{suffix}"
    if name not in shapes:
      problems.append(f"{path}: {key} is not a weight of the projector (Linear: weight, bias)")
    elif name in found:
      problems.append(f"{path}: {key} repeats the projector's {suffix}")
    elif tuple(value.shape) != shapes[name]:
      problems.append(f"{path}: {key} has shape {tuple(value.shape)}, expected {shapes[name]}")
    else:
      found[name] = value
  if len(problems) == before:
    problems += [f"{path}: no {n} (key ending in mm_projector.{n.rsplit('.', 1)[1]})"
                 for n in family.projector_names() if n not in found]
  return found


def _kept_lora(stage: Stage, config: LlamaConfig, problems: list[str], family: Family = VICUNA) -> tuple[dict, dict]:
  """Returns (our {path: array} of the unmerged LoRA factors, layers stacked; model.json's "lora" entry)."""
  slots: dict[str, dict[int | None, tuple[np.ndarray, np.ndarray]]] = {}  # our layer path -> {layer: (A, B)}
  scalings, targets = set(), set()
  for name, (a, b, scaling) in stage.lora.items():
    mapped = table.to_ours(name, family.llm_rules)
    module = name.rsplit(".", 2)[-2]
    if mapped is None or not mapped[0].endswith("/kernel") or module not in family.lora_modules:
      problems.append(f"{stage.folder}: --keep-lora supports LoRA on {', '.join(family.lora_modules)} only, not {name}")
      continue
    kernel_path, layer, _ = mapped
    slots.setdefault(kernel_path.rsplit("/", 1)[0], {})[layer] = (a, b)
    scalings.add((a.shape[0], scaling))
    targets.add(kernel_path.split("/")[-2])  # our name of the Linear: q_proj, qkv_proj, lm_head, ...
  if len(scalings) > 1:
    problems.append(f"{stage.folder}: --keep-lora needs one rank and alpha for every layer, found {sorted(scalings)}")
  missing = sorted(f"{layer}/{path.rsplit('/', 1)[1]}" for path, held in slots.items() if None not in held
                   for layer in range(config.num_layers) if layer not in held)
  if missing:
    problems.append(f"{stage.folder}: --keep-lora needs LoRA on every layer of each target; missing "
                    f"{', '.join(missing)} (layer/target)")
  if not stage.lora:
    problems.append(f"{stage.folder}: --keep-lora, but this folder holds no LoRA factors to keep")
  if not slots or problems:
    return {}, {}
  params = {}
  for path, held in slots.items():
    # peft's A [r, in] and B [out, r] become our lora_a [L, in, r] and lora_b [L, r, out] (no L unstacked).
    for k, factor in enumerate("ab"):
      params[f"{path}/lora_{factor}"] = (table.transpose(held[None][k]) if None in held else
                                         np.stack([table.transpose(held[i][k]) for i in range(config.num_layers)]))
  rank, scaling = scalings.pop()
  return params, {"rank": rank, "alpha": scaling * rank, "targets": sorted(targets)}


def convert_release(base: str | pathlib.Path, projector: str | pathlib.Path, out: str | pathlib.Path,
                    stage2: str | pathlib.Path | None = None, stage3: str | pathlib.Path | None = None,
                    dtype: str = "bfloat16", keep_lora: bool = False) -> tuple[LlamaConfig, list[str]]:
  """Writes the release's model (base + projector + merged LoRA stages) to `out`; returns (config, notes).

  `base` is an HF Vicuna directory, a ChatGLM3 one (original names or HF Glm layout) or either
  converted (`read_base`). With `keep_lora` the last stage's LoRA stays unmerged (model.json's
  "lora"), so training continues from it. Raises `ConversionError` listing every problem of every
  file.
  """
  base = pathlib.Path(base)
  if dtype not in ("bfloat16", "float32"):
    raise UserError(f"--dtype must be bfloat16 or float32, got {dtype!r}")
  if keep_lora and stage2 is None and stage3 is None:
    raise UserError("--keep-lora needs a LoRA folder (--stage2 or --stage3) to keep")
  problems, notes = [], []
  config, family, base_tensors = read_base(base, dtype, problems)
  shapes = hf_shapes(config, family)
  proj = read_projector(projector, shapes, problems, notes, family)
  projector_ok = len(problems) == 0
  stages = [read_stage(s, shapes, problems, notes) for s in (stage2, stage3) if s is not None]
  kept, lora_meta = _kept_lora(stages[-1], config, problems, family) if keep_lora else ({}, {})
  merged_stages = stages[:-1] if keep_lora else stages

  def llm_tensors() -> Iterator[tuple[str, str, np.ndarray]]:
    for file, name, array in base_tensors:
      if "mm_projector" in name:
        notes.append(f"{pathlib.Path(file).name}: {name} ignored (the projector comes from {projector})")
        continue
      yield file, name, through(name, array)

  def through(name: str, array: np.ndarray) -> np.ndarray:
    for stage in merged_stages:
      array = stage.apply(name, array)
    return stages[-1].apply(name, array, merge=False) if keep_lora else array

  expected = llama.abstract_params(config, VTimeLLM)
  in_projector = {path: s for path, s in expected.items() if path.startswith("mm_projector/")}
  in_llm = {path: s for path, s in expected.items() if path not in in_projector}
  flat: dict[str, np.ndarray] = {}
  # The adapter stays float32 whatever the LLM's storage dtype (VTimeLLM builds it so).
  for source, items, wanted, dtype_ in ((str(base), llm_tensors(), in_llm, jax.numpy.dtype(config.storage_dtype)),
                                        (str(projector), ((str(projector), n, through(n, a)) for n, a in proj.items()),
                                         in_projector, np.float32)):
    try:
      flat.update(llama.convert_tensors(items, wanted, dtype_, source, rules=family.rules, ignored=family.ignored))
    except ConversionError as e:
      # A projector file with problems is already reported in full by `read_projector`.
      if wanted is in_llm or projector_ok:
        problems += [f"{source}: {p}" for p in e.problems]
  if problems:
    raise ConversionError("the release checkpoint", problems)
  extra = {"source": {"base": str(base.absolute()), "projector": str(pathlib.Path(projector).absolute()),
                      "stage2": str(pathlib.Path(stage2).absolute()) if stage2 else None,
                      "stage3": str(pathlib.Path(stage3).absolute()) if stage3 else None,
                      "merged": [str(s.folder.absolute()) for s in merged_stages],
                      "unmerged": str(stages[-1].folder.absolute()) if keep_lora else None}}
  if lora_meta:
    extra["lora"] = lora_meta
  flat.update(kept)
  model_io.save_model_dir(out, kind="vtimellm", config=config.architecture(), params=model_io.nest(flat), **extra)
  if family is CHATGLM:
    chatglm.copy_tokenizer(base, out)
  else:
    llama.copy_tokenizer(base, out)
  return config, notes
