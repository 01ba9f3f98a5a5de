"""CLIP vision weights: OpenAI TorchScript / state dict, HF directories, open_clip -> our ClipVision.

Each source layout is a table of (our parameter regex, source key template(s), transform). A rule
with several source keys hands all their arrays to its transform: HF's separate q/k/v weights make
our one fused `qkv_proj`. The table is filled into the `abstract_params` skeleton: every one of our
parameters must be found, every shape must match, and every source key must be used or knowingly
ignored (the text tower, the logit scale, ...). All problems are collected and raised together as
one `ConversionError`.

Layouts:
  openai  keys `visual.conv1.weight`, `visual.transformer.resblocks.N.attn.in_proj_weight`, ...
          OpenAI's `ViT-L-14.pt` (a TorchScript archive: what the release ships), its plain state
          dict, and open_clip's ViT state dicts (open_clip kept OpenAI's names).
  hf      keys `vision_model.encoder.layers.N.self_attn.q_proj.weight`, `visual_projection.weight`:
          `CLIPVisionModelWithProjection` and `CLIPModel` directories (config.json + weights).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
import zipfile
from collections.abc import Callable

import jax.numpy as jnp
import numpy as np

from vtimellm_jax import model_io
from vtimellm_jax.convert import torch_files
from vtimellm_jax.errors import ConversionError, UserError
from vtimellm_jax.models import clip as clip_model

Transform = Callable[..., np.ndarray]  # one array per source key -> our array
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")


def _same(x: np.ndarray) -> np.ndarray:
  return x


def _linear(x: np.ndarray) -> np.ndarray:
  # torch Linear weight [out, in] -> kernel [in, out].
  return x.T


def _conv(x: np.ndarray) -> np.ndarray:
  # torch conv weight [D, C, ph, pw] -> kernel [ph, pw, C, D].
  return x.transpose(2, 3, 1, 0)


def _joined_linear(*weights: np.ndarray) -> np.ndarray:
  # torch Linear weights [out_j, in] stacked along out, as one [in, sum out_j] kernel.
  return np.concatenate(weights, axis=0).T


def _joined(*vectors: np.ndarray) -> np.ndarray:
  return np.concatenate(vectors, axis=0)


@dataclasses.dataclass(frozen=True)
class Rule:
  target: str  # regex over our '/'-joined names; `(?P<i>\d+)` captures the layer
  source: str | tuple[str, ...]  # source key(s), formatted with the regex's groups; the transform's arguments
  transform: Transform

  def keys(self, groups: dict[str, str]) -> tuple[str, ...]:
    """Returns the source keys this rule reads for a match with these regex groups."""
    templates = (self.source,) if isinstance(self.source, str) else self.source
    return tuple(t.format(**groups) for t in templates)


def _ln(ours: str, theirs: str) -> list[Rule]:
  return [Rule(rf"{ours}/scale", f"{theirs}.weight", _same), Rule(rf"{ours}/bias", f"{theirs}.bias", _same)]


def _dense(ours: str, theirs: str) -> list[Rule]:
  return [Rule(rf"{ours}/kernel", f"{theirs}.weight", _linear), Rule(rf"{ours}/bias", f"{theirs}.bias", _same)]


_L = r"encoder/layers/(?P<i>\d+)"

HF_RULES: list[Rule] = [
    Rule(r"embeddings/class_embedding", "vision_model.embeddings.class_embedding", _same),
    Rule(r"embeddings/patch_embedding/kernel", "vision_model.embeddings.patch_embedding.weight", _conv),
    Rule(r"embeddings/position_embedding/embedding", "vision_model.embeddings.position_embedding.weight", _same),
    *_ln(r"pre_layrnorm", "vision_model.pre_layrnorm"),
    # Our qkv_proj is HF's q_proj, k_proj and v_proj side by side (columns [q | k | v]).
    Rule(rf"{_L}/self_attn/qkv_proj/kernel",
         tuple(f"vision_model.encoder.layers.{{i}}.self_attn.{p}_proj.weight" for p in "qkv"), _joined_linear),
    Rule(rf"{_L}/self_attn/qkv_proj/bias",
         tuple(f"vision_model.encoder.layers.{{i}}.self_attn.{p}_proj.bias" for p in "qkv"), _joined),
    *_dense(rf"{_L}/self_attn/out_proj", "vision_model.encoder.layers.{i}.self_attn.out_proj"),
    *_ln(rf"{_L}/layer_norm1", "vision_model.encoder.layers.{i}.layer_norm1"),
    *_ln(rf"{_L}/layer_norm2", "vision_model.encoder.layers.{i}.layer_norm2"),
    *_dense(rf"{_L}/mlp/fc1", "vision_model.encoder.layers.{i}.mlp.fc1"),
    *_dense(rf"{_L}/mlp/fc2", "vision_model.encoder.layers.{i}.mlp.fc2"),
    *_ln(r"post_layernorm", "vision_model.post_layernorm"),
    Rule(r"visual_projection/kernel", "visual_projection.weight", _linear),
]
# A CLIPModel directory also holds the text tower; the position ids are a buffer, not a weight.
HF_IGNORED = re.compile(r"text_model\..*|text_projection\..*|logit_scale|logit_bias|vision_model\.embeddings\.position_ids")

_R = "visual.transformer.resblocks.{i}"
OPENAI_RULES: list[Rule] = [
    Rule(r"embeddings/class_embedding", "visual.class_embedding", _same),
    Rule(r"embeddings/patch_embedding/kernel", "visual.conv1.weight", _conv),
    Rule(r"embeddings/position_embedding/embedding", "visual.positional_embedding", _same),
    *_ln(r"pre_layrnorm", "visual.ln_pre"),
    # OpenAI's in_proj is already fused: weight [3D, D] with rows [q; k; v].
    Rule(rf"{_L}/self_attn/qkv_proj/kernel", f"{_R}.attn.in_proj_weight", _linear),
    Rule(rf"{_L}/self_attn/qkv_proj/bias", f"{_R}.attn.in_proj_bias", _same),
    *_dense(rf"{_L}/self_attn/out_proj", f"{_R}.attn.out_proj"),
    *_ln(rf"{_L}/layer_norm1", f"{_R}.ln_1"),
    *_ln(rf"{_L}/layer_norm2", f"{_R}.ln_2"),
    *_dense(rf"{_L}/mlp/fc1", f"{_R}.mlp.c_fc"),
    *_dense(rf"{_L}/mlp/fc2", f"{_R}.mlp.c_proj"),
    *_ln(r"post_layernorm", "visual.ln_post"),
    Rule(r"visual_projection/kernel", "visual.proj", _same),
]
# Everything outside `visual.` is the text tower or bookkeeping (logit_scale, input_resolution, ...).
OPENAI_IGNORED = re.compile(r"(?!visual\.).*")

RULES = {"openai": (OPENAI_RULES, OPENAI_IGNORED), "hf": (HF_RULES, HF_IGNORED)}


def apply_rules(cfg: clip_model.ClipVisionConfig, tensors: dict[str, np.ndarray], layout: str,
                source: str, dtype=np.float32) -> dict[str, np.ndarray]:
  """Returns our flat {name: array} filled from `tensors`; raises ConversionError listing every problem."""
  rules, ignored = RULES[layout]
  skeleton = clip_model.abstract_params(cfg)
  problems: list[str] = []
  used: set[str] = set()
  out: dict[str, np.ndarray] = {}
  for name, spec in skeleton.items():
    match = next(((rule, m) for rule in rules if (m := re.fullmatch(rule.target, name))), None)
    if match is None:
      problems.append(f"no conversion rule for our parameter {name}")
      continue
    rule, m = match
    keys = rule.keys(m.groupdict())
    missing = [k for k in keys if k not in tensors]
    problems += [f"missing key {k} (for {name} {tuple(spec.shape)})" for k in missing]
    used.update(keys)
    if missing:
      continue
    try:
      value = rule.transform(*(np.asarray(tensors[k]) for k in keys))
      fits, gives = tuple(value.shape) == tuple(spec.shape), f"gives {tuple(value.shape)}"
    except ValueError:  # parts whose other dimensions differ cannot be joined
      fits, gives = False, "cannot be joined"
    if not fits:
      shapes = ", ".join(str(tuple(np.shape(tensors[k]))) for k in keys)
      problems.append(f"{', '.join(keys)}: shape {shapes} {gives} for {name}, expected {tuple(spec.shape)}")
      continue
    out[name] = np.ascontiguousarray(value, dtype=dtype)
  unexpected = sorted(k for k in tensors if k not in used and not ignored.fullmatch(k))
  problems += [f"unexpected key {k} {tuple(np.shape(tensors[k]))}" for k in unexpected]
  if problems:
    raise ConversionError(source, problems)
  return out


# --- configs ---


def openai_config(tensors: dict[str, np.ndarray], source: str, act: str = "quick_gelu",
                  head_width: int = 64) -> clip_model.ClipVisionConfig:
  """Returns the ViT config implied by an OpenAI-layout state dict (heads = width / head_width)."""
  needed = ["visual.conv1.weight", "visual.positional_embedding", "visual.proj",
            "visual.transformer.resblocks.0.mlp.c_fc.weight"]
  missing = [k for k in needed if k not in tensors]
  if missing:
    hint = " (a ResNet CLIP? only ViT towers are supported)" if "visual.layer1.0.conv1.weight" in tensors else ""
    raise ConversionError(source, [f"missing key {k}{hint}" for k in missing])
  width, _, patch, _ = tensors["visual.conv1.weight"].shape
  positions = tensors["visual.positional_embedding"].shape[0]
  grid = math.isqrt(positions - 1)
  if grid * grid != positions - 1:
    raise ConversionError(source, [f"visual.positional_embedding has {positions} rows, not 1 + a square grid"])
  layers = 1 + max(int(m.group(1)) for k in tensors if (m := re.match(r"visual\.transformer\.resblocks\.(\d+)\.", k)))
  return clip_model.ClipVisionConfig(
      image_size=grid * patch, patch_size=patch, width=width, layers=layers, heads=max(1, width // head_width),
      mlp_ratio=tensors["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width,
      output_dim=tensors["visual.proj"].shape[1], act=act)


def hf_config(directory: pathlib.Path) -> clip_model.ClipVisionConfig:
  """Returns the config of an HF CLIP directory (CLIPModel or CLIPVisionModel[WithProjection])."""
  from transformers import CLIPVisionConfig

  # transformers fills the defaults that config.json leaves out, and takes `vision_config` out
  # of a CLIPModel's config.
  try:
    hf = CLIPVisionConfig.from_pretrained(str(directory))
    top = json.loads((directory / "config.json").read_text())
  except Exception as e:
    raise UserError(f"{directory / 'config.json'}: not a readable CLIP config ({type(e).__name__}: {e})") from e
  act = {"quick_gelu": "quick_gelu", "gelu": "gelu"}.get(hf.hidden_act)
  if act is None:
    raise UserError(f"{directory / 'config.json'}: hidden_act {hf.hidden_act!r} is not supported (quick_gelu, gelu)")
  # A CLIPModel keeps projection_dim at the top level, a CLIPVisionModelWithProjection in its own config.
  projection_dim = top.get("projection_dim", hf.projection_dim)
  return clip_model.ClipVisionConfig(
      image_size=hf.image_size, patch_size=hf.patch_size, width=hf.hidden_size, layers=hf.num_hidden_layers,
      heads=hf.num_attention_heads, mlp_ratio=hf.intermediate_size / hf.hidden_size, output_dim=projection_dim,
      act=act, layer_norm_eps=hf.layer_norm_eps)


# --- sources ---


def is_torchscript(path: pathlib.Path) -> bool:
  """Returns whether `path` is a TorchScript archive (a zip with code/ and constants.pkl)."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as z:
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in z.namelist())


def load_torchscript(path: pathlib.Path) -> dict[str, np.ndarray]:
  """Returns the tensors of a TorchScript archive such as OpenAI's ViT-L-14.pt."""
  import torch

  try:
    # TorchScript archives hold TorchScript code, not Python pickles of arbitrary classes; this
    # is how OpenAI's own `clip.load` reads them.
    state = torch.jit.load(str(path), map_location="cpu").state_dict()
  except Exception as e:
    raise UserError(f"{path}: unreadable TorchScript archive ({type(e).__name__}: {str(e).splitlines()[0]})") from e
  return {k: torch_files._to_numpy(v) for k, v in state.items()}


def _strip_module_prefix(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  # Checkpoints saved from DistributedDataParallel prefix every key with "module.".
  if tensors and all(k.startswith("module.") for k in tensors):
    return {k[len("module."):]: v for k, v in tensors.items()}
  return tensors


def _open_clip_act(config_path: pathlib.Path) -> tuple[str, int]:
  try:
    model_cfg = json.loads(config_path.read_text()).get("model_cfg", {})
  except json.JSONDecodeError as e:
    raise UserError(f"{config_path}: not valid JSON ({e})") from e
  head_width = model_cfg.get("vision_cfg", {}).get("head_width", 64)
  return ("quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"), head_width


def convert(src: str | pathlib.Path, *, act: str | None = None, heads: int | None = None,
            dtype=np.float32) -> tuple[clip_model.ClipVisionConfig, dict[str, np.ndarray], str]:
  """Returns (config, flat params, what the source was) for a CLIP file or directory.

  `act` overrides the activation of OpenAI-layout state dicts: OpenAI's checkpoints use QuickGELU
  but open_clip's own trainings use GELU, and the weights cannot tell. An `open_clip_config.json`
  beside the weights is read when present. `heads` overrides width / 64.
  """
  src = pathlib.Path(src)
  if not src.exists():
    raise UserError(f"{src}: not found")
  if src.is_dir():
    if (src / "config.json").is_file():
      cfg = hf_config(src)
      tensors = {name: array for _, name, array in torch_files.iter_checkpoint(src)}
      cfg = _override_heads(cfg, heads)
      return cfg, apply_rules(cfg, tensors, "hf", str(src), dtype), "hf"
    weights = next((src / w for w in OPEN_CLIP_WEIGHTS if (src / w).is_file()), None)
    if (src / OPEN_CLIP_CONFIG).is_file() and weights is not None:
      oc_act, head_width = _open_clip_act(src / OPEN_CLIP_CONFIG)
      tensors = _strip_module_prefix(torch_files.load_weight_file(weights))
      cfg = openai_config(tensors, str(weights), act or oc_act, head_width)
      cfg = _override_heads(cfg, heads)
      return cfg, apply_rules(cfg, tensors, "openai", str(weights), dtype), "open_clip"
    raise UserError(f"{src}: expected an HF CLIP directory (config.json + weights) or an open_clip one "
                    f"({OPEN_CLIP_CONFIG} + {' or '.join(OPEN_CLIP_WEIGHTS)})")
  if is_torchscript(src):
    tensors, kind = load_torchscript(src), "openai_torchscript"
  else:
    tensors, kind = _strip_module_prefix(torch_files.load_weight_file(src)), "state_dict"
  if "vision_model.embeddings.patch_embedding.weight" in tensors:
    raise UserError(f"{src}: an HF CLIP state dict; pass its directory (with config.json) instead of the file")
  if kind == "openai_torchscript" and act not in (None, "quick_gelu"):
    raise UserError(f"{src}: OpenAI's TorchScript CLIP uses quick_gelu; --act {act} would give wrong features")
  cfg = _override_heads(openai_config(tensors, str(src), act or "quick_gelu"), heads)
  return cfg, apply_rules(cfg, tensors, "openai", str(src), dtype), kind


def convert_to_directory(src: str | pathlib.Path, out: str | pathlib.Path, *, act: str | None = None,
                         heads: int | None = None, dtype: str = "float32") -> str:
  """Converts a CLIP file or directory (see `convert`) into a model directory; returns a one-line summary."""
  cfg, params, kind = convert(src, act=act, heads=heads, dtype=np.dtype(jnp.dtype(dtype)))
  model_io.save_model_dir(out, kind="clip", config=dataclasses.asdict(cfg), params=clip_model.nest(params),
                          source=str(src), source_format=kind)
  count = sum(int(np.prod(v.shape)) for v in params.values())
  return (f"converted {src} ({kind}) -> {out}: {cfg.layers} layers, width {cfg.width}, "
          f"{cfg.image_size}px/{cfg.patch_size}, {cfg.act}, {count / 1e6:.1f}M parameters, {dtype}")


def _override_heads(cfg: clip_model.ClipVisionConfig, heads: int | None) -> clip_model.ClipVisionConfig:
  return cfg if heads is None else dataclasses.replace(cfg, heads=heads)
