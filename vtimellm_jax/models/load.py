"""One loader for every model kind (LLaMA, VTimeLLM, CLIP): modules built abstractly, arrays born in their shards.

  load_model(directory)            a model directory -> its module (the documented API)
  sharded_model(build, mesh, ...)  the general form: the module `build()` makes, its variables taken
                                   from sources in order of priority, the rest initialised
  save_model(model, directory)     a LLaMA / VTimeLLM -> a model directory

No module ever holds real weights before its arrays are placed: `nnx.eval_shape(build)` gives the
structure, the logical-axis rules give each variable's NamedSharding on the mesh, every source
restores straight into those shardings (a model directory reads one array at a time, and in a
multi-process run only the shards of this process's devices), and whatever no source holds (a
fresh adapter, fresh LoRA, dropout streams, a random model) comes from one jitted `build` whose
outputs are born sharded. LoRA kept unmerged in a directory is merged on the sharded arrays.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from vtimellm_jax import model_io, sharding
from vtimellm_jax.errors import UserError
from vtimellm_jax.models import clip, lora, quant
from vtimellm_jax.models.llama import LlamaConfig, LlamaForCausalLM
from vtimellm_jax.models.vtimellm import VTimeLLM

KINDS = {"llama": LlamaForCausalLM, "vtimellm": VTimeLLM, "clip": clip.ClipVision}
CLIP_OPTIONS = ("dtype", "param_dtype", "attention_impl")

Path = model_io.Path


class Source(Protocol):
  """Where variables come from: what it holds (shapes only), then the arrays asked for, placed."""

  name: str

  def available(self) -> dict[Path, jax.ShapeDtypeStruct]:
    ...

  def restore(self, targets: dict[Path, jax.ShapeDtypeStruct]) -> dict[Path, jax.Array]:
    ...


@dataclasses.dataclass
class DirectorySource:
  """The parameters of a model directory (or any orbax tree under `directory/params`)."""

  directory: str | pathlib.Path
  name: str = ""
  # Only the paths this accepts are offered (e.g. the adapter of a stage-1 run).
  keep: Callable[[Path], bool] = lambda path: True

  def __post_init__(self):
    self.name = self.name or str(self.directory)

  def available(self) -> dict[Path, jax.ShapeDtypeStruct]:
    return {p: s for p, s in model_io.saved_arrays(self.directory).items() if self.keep(p)}

  def restore(self, targets):
    return model_io.restore_arrays(self.directory, targets)


@dataclasses.dataclass
class ArraySource:
  """Arrays in memory (host or device) by path; placed into their targets' shardings."""

  arrays: dict[Path, jax.Array]
  name: str = "arrays"

  def available(self):
    return {p: jax.ShapeDtypeStruct(tuple(a.shape), a.dtype) for p, a in self.arrays.items()}

  def restore(self, targets):
    return {path: _place(self.arrays[path], target) for path, target in targets.items()}


@dataclasses.dataclass
class JoinedSource:
  """Another source with groups of its arrays offered joined along their last axis, one path a group.

  How a CLIP directory saved with separate q/k/v projections loads into the fused `qkv_proj`.
  """

  inner: Source
  groups: dict[Path, tuple[Path, ...]]
  name: str = ""

  def __post_init__(self):
    self.name = self.name or self.inner.name

  def available(self):
    saved = self.inner.available()
    parts = {p for group in self.groups.values() for p in group}
    out = {p: s for p, s in saved.items() if p not in parts}
    for path, group in self.groups.items():
      first = saved[group[0]]
      out[path] = jax.ShapeDtypeStruct((*first.shape[:-1], sum(saved[p].shape[-1] for p in group)), first.dtype)
    return out

  def restore(self, targets):
    saved = self.inner.available()
    wanted = {p: t for p, t in targets.items() if p not in self.groups}
    for path in targets.keys() & self.groups.keys():
      # Each part whole on every device, in the target's dtype; joined below, then placed as the target is sharded.
      whole = jax.sharding.NamedSharding(targets[path].sharding.mesh, jax.sharding.PartitionSpec())
      wanted.update({p: jax.ShapeDtypeStruct(saved[p].shape, targets[path].dtype, sharding=whole)
                     for p in self.groups[path]})
    arrays = self.inner.restore(wanted)
    return {path: _place(jnp.concatenate([arrays.pop(p) for p in self.groups[path]], axis=-1), target)
            if path in self.groups else arrays[path] for path, target in targets.items()}


@dataclasses.dataclass
class QuantizingSource:
  """Another source with the float kernels of quantised layers offered as their quantised parts.

  `layers` maps a quantised `lora.Linear`'s path to the (abstract) layer. Each kernel is restored on
  its own, in its shards (the float kernel's sharding on the mesh of its codes), and quantised there
  before the next is read, so the full-precision base is never held: the quantised model plus one
  float kernel at most.
  """

  inner: Source
  layers: dict[Path, lora.Linear]
  name: str = ""

  def __post_init__(self):
    self.name = self.name or self.inner.name

  def _kernel(self, prefix: Path) -> Path:
    return (*prefix, "kernel")

  def available(self):
    saved = self.inner.available()
    out = {p: s for p, s in saved.items() if p[:-1] not in self.layers or p[-1] != "kernel"}
    for prefix, layer in self.layers.items():
      kernel = saved.get(self._kernel(prefix))
      if kernel is None:
        continue
      q = jax.eval_shape(functools.partial(quant.quantize_kernel, qtype=layer.quant,
                                           double_quant=layer.kernel_scales2 is not None), kernel)
      out.update({(*prefix, name): part for name, part in zip(lora.QUANT_PARTS, (q.codes, q.scales, q.scales2, q.offset))
                  if part is not None})
    return out

  def restore(self, targets):
    by_layer: dict[Path, dict[Path, jax.ShapeDtypeStruct]] = {}
    plain = {}
    for path, target in targets.items():
      if path[:-1] in self.layers and path[-1] in lora.QUANT_PARTS:
        by_layer.setdefault(path[:-1], {})[path] = target
      else:
        plain[path] = target
    out = self.inner.restore(plain) if plain else {}
    for prefix, parts in by_layer.items():
      layer = self.layers[prefix]
      mesh = parts[(*prefix, "kernel_codes")].sharding.mesh
      axes, shape = (*layer.stack_axes, *layer.axes), (*layer.stack_shape, layer.in_features, layer.out_features)
      target = jax.ShapeDtypeStruct(shape, layer.param_dtype,
                                    sharding=jax.sharding.NamedSharding(mesh, sharding.spec_for(axes, shape, mesh)))
      kernel = self.inner.restore({self._kernel(prefix): target})[self._kernel(prefix)]
      q = lora.sharded_quantize(kernel, layer.quant, (*prefix, "kernel_scales2") in parts,
                                lora.quant_axes(layer.axes, layer.stack_axes))
      del kernel
      out.update({(*prefix, name): part for name, part in zip(lora.QUANT_PARTS, (q.codes, q.scales, q.scales2, q.offset))
                  if part is not None})
    return out


def _place(array, target: jax.ShapeDtypeStruct) -> jax.Array:
  """Returns `array` in the target's dtype and sharding (itself when it already is)."""
  if array.dtype != target.dtype:
    array = array.astype(target.dtype)
  if isinstance(array, jax.Array) and array.sharding == target.sharding:
    return array
  if target.sharding.is_fully_addressable:
    return jax.device_put(array, target.sharding)
  # In a multi-process run each process supplies the shards of its own devices.
  if jnp.issubdtype(array.dtype, jax.dtypes.prng_key):
    data = _place(jax.random.key_data(array), jax.ShapeDtypeStruct(jax.random.key_data(array).shape,
                                                                   jax.random.key_data(array).dtype,
                                                                   sharding=target.sharding))
    return jax.random.wrap_key_data(data, impl=jax.random.key_impl(array))
  host = jax.device_get(array) if isinstance(array, jax.Array) else array
  return jax.make_array_from_callback(host.shape, target.sharding, lambda index: host[index])


def module_arrays(module: nnx.Module) -> ArraySource:
  """Returns a source of a built module's own arrays (reused in place, not copied)."""
  return ArraySource({_key(path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(module))},
                     name="the model built so far")


def _key(path) -> Path:
  return tuple(str(k) for k in path)


def _name(path: Path) -> str:
  return "/".join(path)


def abstract_targets(module: nnx.Module, mesh) -> dict[Path, jax.ShapeDtypeStruct]:
  """Returns {path: ShapeDtypeStruct carrying its NamedSharding} of every variable of a (possibly abstract) module."""
  out = {}
  for path, variable in nnx.to_flat_state(nnx.state(module)):
    value = variable.get_value()
    out[_key(path)] = jax.ShapeDtypeStruct(value.shape, value.dtype,
                                           sharding=sharding.variable_sharding(variable, mesh, _name(_key(path))))
  return out


def sharded_model(build: Callable[[], nnx.Module], mesh=None, sources: Sequence[Source] = (),
                  may_initialise: Callable[[Path], bool] = lambda path: True, what: str = "the model") -> nnx.Module:
  """Returns the module `build()` makes, each variable created directly in its shards on `mesh`.

  Each variable comes from the first source that holds it; a source's array must fit its shape
  and every array a source offers must have a place in the module. Variables no source holds are
  initialised as `build()` initialises them, in one jitted call with sharded outputs, if
  `may_initialise(path)`; otherwise they are missing. All problems are reported in one UserError.
  `mesh` defaults to the first device alone.
  """
  mesh = mesh or sharding.single_device_mesh()
  abstract = nnx.eval_shape(build)
  graphdef, state = nnx.split(abstract)
  targets = abstract_targets(abstract, mesh)
  plan: list[tuple[Source, dict]] = []
  problems, taken = [], set()
  for source in sources:
    mine = {}
    for path, saved in source.available().items():
      target = targets.get(path)
      if target is None:
        problems.append(f"{source.name}: unexpected {_name(path)} {tuple(saved.shape)} (the model has no such variable)")
      elif tuple(saved.shape) != tuple(target.shape):
        problems.append(f"{source.name}: {_name(path)} has shape {tuple(saved.shape)}, the model's is {tuple(target.shape)}")
      elif path not in taken:
        mine[path] = target
        taken.add(path)
    plan.append((source, mine))
  rest = {path: target for path, target in targets.items() if path not in taken}
  problems += [f"missing {_name(path)} {tuple(t.shape)}" for path, t in rest.items() if not may_initialise(path)]
  if problems:
    raise UserError(f"parameters do not fit {what}:\n" + "\n".join(f"  - {p}" for p in problems))
  values = {}
  for source, mine in plan:
    if mine:
      values.update(source.restore(mine))
  if rest:
    values.update(_initialise(build, rest))
  flat = [(path, variable.replace(values[_key(path)])) for path, variable in nnx.to_flat_state(state)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _initialise(build: Callable[[], nnx.Module], targets: dict[Path, jax.ShapeDtypeStruct]) -> dict[Path, jax.Array]:
  """Returns the named variables as `build()` initialises them, computed by one jit with sharded outputs."""
  paths = list(targets)

  def init():
    flat = {_key(path): variable.get_value() for path, variable in nnx.to_flat_state(nnx.state(build()))}
    return [flat[path] for path in paths]

  arrays = jax.jit(init, out_shardings=[targets[path].sharding for path in paths])()
  return dict(zip(paths, arrays))


def model_builder(meta: dict, model_cls=None, seed: int = 0, **overrides) -> Callable[[], nnx.Module]:
  """Returns a function building the (randomly initialised) module a model.json describes.

  A LLaMA directory may be built as a VTimeLLM (`model_cls`): its adapter is then new. `overrides`
  replace config fields (LLaMA: e.g. dtype="bfloat16", remat="full"; CLIP: dtype, param_dtype,
  attention_impl). LoRA recorded in the directory is attached (without dropout).
  """
  kind = meta.get("kind")
  if kind not in KINDS:
    raise UserError(f"unknown model kind {kind!r} in {model_io.MODEL_JSON}; known: {sorted(KINDS)}")
  if kind == "clip":
    unknown = sorted(set(overrides) - set(CLIP_OPTIONS))
    if unknown or (model_cls not in (None, clip.ClipVision)):
      raise ValueError(f"a CLIP directory takes only {CLIP_OPTIONS}, got {unknown or model_cls}")
    cfg = clip.ClipVisionConfig.from_dict(meta["config"], source=model_io.MODEL_JSON)
    dtype = jnp.dtype(overrides.get("dtype", "float32"))
    options = dict(dtype=dtype, param_dtype=jnp.dtype(overrides.get("param_dtype") or dtype),
                   attention_impl=overrides.get("attention_impl", "auto"))
    return lambda: clip.ClipVision(cfg, **options, rngs=nnx.Rngs(seed))
  model_cls = model_cls or KINDS[kind]
  config = LlamaConfig.from_architecture(meta["config"], **overrides)
  spec = meta.get("lora")

  def build():
    model = model_cls(config, nnx.Rngs(params=seed, dropout=seed + 1))
    if spec:
      lora.attach_lora(model, stored_lora(spec), nnx.Rngs(0))
    return model

  return build


def stored_lora(spec: dict) -> lora.LoraConfig:
  """Returns the LoraConfig of model.json's "lora" entry (no dropout: it is for inference or merging)."""
  return lora.LoraConfig(rank=spec["rank"], alpha=spec["alpha"], dropout=0.0, targets=tuple(spec["targets"]))


def load_model(directory: str | pathlib.Path, model_cls=None, *, mesh=None, seed: int = 0, merge_lora: bool = False,
               **overrides):
  """Returns the model stored in a model directory, its arrays restored straight into their shardings.

  `model_cls` defaults to the directory's kind; a LLaMA directory opened as a `VTimeLLM` gets a new
  adapter, initialised from `seed`. `mesh` (default: the first device) decides where every array
  lives. `merge_lora` folds LoRA stored unmerged into the base kernels. `overrides` set run settings
  (`LlamaConfig.RUN_SETTINGS`, e.g. dtype="bfloat16", remat="full"; by default a LLaMA / VTimeLLM
  computes and stores in the dtype of its stored arrays; a CLIP directory takes dtype, param_dtype
  and attention_impl).
  """
  meta = model_io.read_model_json(directory)
  if meta.get("kind") != "clip":
    stored = stored_dtype(directory)
    overrides = {"dtype": stored, "param_dtype": stored, **overrides}
  qtype = overrides.get("quant")
  if qtype and merge_lora and meta.get("lora"):
    # LoRA merges into the full-precision kernels; the merged ones are then quantised, one at a time.
    model = load_model(directory, model_cls, mesh=mesh, seed=seed, merge_lora=True, **{**overrides, "quant": ""})
    lora.quantize_projections(model, qtype, overrides.get("double_quant", True))
    return model
  build = model_builder(meta, model_cls, seed, **overrides)
  new_adapter = meta["kind"] == "llama" and model_cls is VTimeLLM
  source = DirectorySource(directory)
  if meta["kind"] == "clip":
    source = _fused_qkv(source)
  if qtype:
    source = QuantizingSource(source, lora.quantized_layers(nnx.eval_shape(build)))
  model = sharded_model(build, mesh, [source], what=f"{directory}",
                        may_initialise=lambda path: new_adapter and path[0] == "mm_projector")
  if merge_lora:
    lora.merge_lora(model)
  return model


def _fused_qkv(source: Source) -> Source:
  """Returns `source` with separate CLIP q/k/v projections (older directories) offered as `qkv_proj`."""
  split = lambda name: tuple(name.split("/"))  # noqa: E731
  groups = clip.separate_qkv(_name(path) for path in source.available())
  if not groups:
    return source
  return JoinedSource(source, {split(fused): tuple(map(split, parts)) for fused, parts in groups.items()})


def stored_dtype(directory: str | pathlib.Path) -> str:
  """Returns the dtype a LLaMA / VTimeLLM directory stores its token embeddings in (read from metadata)."""
  arrays = model_io.saved_arrays(directory)
  embed = arrays.get(("model", "embed_tokens"))
  if embed is None:
    raise UserError(f"{directory}: no model/embed_tokens array; not a LLaMA or VTimeLLM model directory")
  return jnp.dtype(embed.dtype).name


def save_model(model: LlamaForCausalLM, directory: str | pathlib.Path, **extra) -> None:
  """Writes `model` (LoRA factors included, if attached) to a model directory."""
  kind = "vtimellm" if isinstance(model, VTimeLLM) else "llama"
  quantized = lora.quantized_layers(model)
  if quantized:
    layer = next(iter(quantized.values()))
    raise UserError(f"this model's projections are held quantised ({layer.quant}); a model directory holds "
                    "full-precision weights, which a quantised kernel no longer has: save the full-precision model "
                    "(load it without quantisation) instead")
  attached = list(lora.lora_layers(model))
  if attached:
    # The scaling is static module state, not a parameter: it travels in model.json.
    layer = attached[0][1]
    rank = layer.lora_a.shape[-1]
    extra["lora"] = {"rank": rank, "alpha": layer.lora_scaling * rank,
                     "targets": sorted({str(path[-1]) for path, _ in attached})}
  model_io.save_model_dir(directory, kind=kind, config=model.config.architecture(), params=params_tree(model),
                          **extra)


def params_tree(module: nnx.Module) -> dict:
  """Returns the module's parameters as the nested {name: ...: array} dict a model directory stores."""
  return model_io.nest({_name(_key(path)): var.get_value()
                        for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))})


def clip_from_params(cfg: clip.ClipVisionConfig, params: dict, *, mesh=None, source: str = "params",
                     **options) -> clip.ClipVision:
  """Returns a ClipVision holding `params` (flat '/'-joined names or nested), every name and shape checked.

  `options`: dtype (compute; default float32), param_dtype (storage; default dtype), attention_impl.
  """
  build = model_builder({"kind": "clip", "config": dataclasses.asdict(cfg)}, **options)
  flat = clip.flatten(params) if any(isinstance(v, dict) for v in params.values()) else dict(params)
  arrays = ArraySource({tuple(name.split("/")): value for name, value in flat.items()}, name=source)
  return sharded_model(build, mesh, [arrays], may_initialise=lambda path: False, what=f"CLIP {cfg}")


def random_clip(cfg: clip.ClipVisionConfig, seed: int = 0, **options) -> clip.ClipVision:
  """Returns a ClipVision with `clip.random_params(cfg, seed)` (for `--clip tiny-random` and tests)."""
  return clip_from_params(cfg, clip.random_params(cfg, seed), source=f"random(seed={seed})", **options)
