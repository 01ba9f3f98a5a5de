"""The device mesh and the one table that maps logical axis names to mesh axes.

Parameters carry logical names (`("embed", "mlp")`, see models/); the decoder's stacked layers
lead with "layers"; activations' batch axis is "batch". A dimension whose size its mesh axes do not
divide is a UserError naming the axis, its size and the mesh axis, unless its logical axis is in
`REPLICATED_WHEN_UNEVEN`: replicating it silently would hide a layout that runs slow or out of memory.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vtimellm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes). FSDP shards the frozen base along "embed"; tensor
# parallelism splits heads, MLP width and vocabulary.
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "mlp": "tensor",
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "norm": None,
    # The leading axis of the stacked decoder layers: every device holds its share of every layer,
    # and the scan over layers gathers one layer at a time.
    "layers": None,
}

# Logical axes held whole on every device where their mesh axes do not divide them. Any other axis
# that does not divide is an error: that layout is a mistake to be told about, not to run slow.
REPLICATED_WHEN_UNEVEN = frozenset({
    # ChatGLM3-6B's multi-query attention has 2 key/value groups: on tensor >= 4 each device holds
    # both whole (and splash attention, seeing query and kv heads split differently, splits neither:
    # models/llama.py).
    "kv_heads",
})


def first_devices(count: int) -> list:
  """Returns the first `count` of this job's devices (all of them for 0); refuses more than there are."""
  devices = jax.devices()
  if count > len(devices):
    raise UserError(f"mesh.devices = {count} but this job has {len(devices)} {devices[0].platform} device(s)")
  return devices[:count] if count > 0 else devices


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices=None) -> Mesh:
  """Returns a (data, fsdp, tensor) mesh over `devices` (default: all); -1 fills the rest."""
  devices = list(devices if devices is not None else jax.devices())
  sizes = [data, fsdp, tensor]
  known = int(np.prod([s for s in sizes if s != -1]))
  if sizes.count(-1) > 1 or known == 0 or len(devices) % known:
    raise UserError(f"mesh data={data} fsdp={fsdp} tensor={tensor} does not fit {len(devices)} devices")
  sizes = [len(devices) // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != len(devices):
    raise UserError(f"mesh data*fsdp*tensor = {int(np.prod(sizes))} but there are {len(devices)} devices")
  return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
  return mesh.shape["data"] * mesh.shape["fsdp"]


def _mesh_axes(logical, dim: int, mesh, where: str):
  target = LOGICAL_RULES.get(logical) if logical is not None else None
  if target is None:
    return None
  axes = target if isinstance(target, tuple) else (target,)
  size = int(np.prod([mesh.shape[a] for a in axes]))
  if dim % size == 0:
    return target
  if logical in REPLICATED_WHEN_UNEVEN:
    return None
  if len(axes) == 1:
    mesh_axes = f"mesh axis {axes[0]!r} of size {size}"
  else:
    mesh_axes = "mesh axes " + " x ".join(f"{a!r} ({mesh.shape[a]})" for a in axes) + f" = {size}"
  raise UserError(f"{where}: logical axis {logical!r} has size {dim}, which {mesh_axes} does not divide; "
                  "choose mesh sizes that divide it (--config.mesh.*)")


def spec_for(logical_axes, shape, mesh: Mesh, what: str | None = None) -> P:
  """Returns the mesh PartitionSpec of an array with these logical axes and shape.

  Raises UserError where a mesh axis does not divide its dimension (see `REPLICATED_WHEN_UNEVEN`);
  the message names the array as `what`, else by its logical axes and shape.
  """
  if not logical_axes:
    return P()
  where = what or f"an array {tuple(logical_axes)} of shape {tuple(shape)}"
  return P(*(_mesh_axes(logical, dim, mesh, where) for logical, dim in zip(logical_axes, shape)))


def variable_sharding(variable: nnx.Variable, mesh: Mesh, name: str | None = None) -> NamedSharding:
  """Returns the NamedSharding of one variable (called `name` in errors), from its `out_sharding` logical names."""
  names = variable.get_metadata().get("out_sharding")
  shape = variable.get_value().shape
  where = f"{f'parameter {name}' if name else 'a parameter'} {tuple(names or ())} of shape {tuple(shape)}"
  return NamedSharding(mesh, spec_for(names, shape, mesh, where))


def state_shardings(state: nnx.State, mesh: Mesh):
  """Returns a NamedSharding pytree matching `state` (from each variable's `out_sharding` names).

  Every variable a mesh axis does not divide is named in one UserError.
  """
  problems = []

  def one(path, variable):
    if not isinstance(variable, nnx.Variable):
      return NamedSharding(mesh, P())
    try:
      return variable.replace(variable_sharding(variable, mesh, "/".join(str(getattr(k, "key", k)) for k in path)))
    except UserError as e:
      problems.append(str(e))
      return variable

  out = jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  if problems:
    raise UserError(f"the mesh {dict(mesh.shape)} does not fit this model:\n" + "\n".join(f"  - {p}" for p in problems))
  return out


def target_platform() -> str:
  """Returns the platform being compiled for: the context mesh's, else the default backend's.

  The trainer traces its step under its mesh, so an AOT compile for a TPU from a CPU host sees "tpu".
  """
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def single_device_mesh(device=None) -> Mesh:
  """Returns a (1, 1, 1) mesh over one device (default: this process's first), where every array lives whole."""
  return Mesh(np.asarray([device or jax.local_devices()[0]]).reshape(1, 1, 1), MESH_AXES)


def maybe_initialize_distributed() -> None:
  """Joins a multi-process run when the environment describes one (launch scripts set these)."""
  if jax.distributed.is_initialized():
    return
  coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if coordinator:
    jax.distributed.initialize(coordinator_address=coordinator,
                               num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
                               process_id=int(os.environ["JAX_PROCESS_ID"]))
  elif "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()  # jax reads the SLURM environment itself
  elif os.environ.get("VTIMELLM_DISTRIBUTED") == "auto":
    jax.distributed.initialize()  # Cloud TPU slices: jax finds the workers itself (launch/tpu sets this)


def constrain(x: jax.Array, logical_axes) -> jax.Array:
  """Returns `x` constrained to the sharding of its logical axes on the current (abstract) mesh; as is without one.

  Model code calls this where the partitioner would otherwise have to guess, e.g. the carry of the
  scan over layers, whose layout must be the same in every iteration.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(logical_axes, x.shape, mesh)))


def batch_sharding(mesh: Mesh, ndim: int, batch_axis: int = 0) -> NamedSharding:
  """Returns the sharding of a batch array whose `batch_axis` is split over the data axes."""
  spec = [None] * ndim
  spec[batch_axis] = LOGICAL_RULES["batch"]
  return NamedSharding(mesh, P(*spec))
