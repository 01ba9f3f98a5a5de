"""The training loop shared by every stage: data, sharded state, compiled step, checkpoints, logs.

`train(config, workdir)` runs a stage to the end, resuming from the workdir's newest readable
checkpoint on the exact next batch (an unreadable one is named and moved to
`{workdir}/unreadable_checkpoints/`). A rerun must keep the settings of run.json
(`run_record.py`). SIGTERM or SIGINT stops it after the current step with a checkpoint of that step
(`preemption.py`). One compiled step per bucket length; memory analysis printed before step 1.
"""

from __future__ import annotations

import math
import pathlib
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from vtimellm_jax import device_peaks, model_io, sharding
from vtimellm_jax.data import records
from vtimellm_jax.errors import UserError
from vtimellm_jax.models import quant
from vtimellm_jax.training import checkpointing, model_setup, preemption, run_record, step as step_lib
from vtimellm_jax.training.metrics_log import MetricsLog

UNREADABLE_DIR = "unreadable_checkpoints"


def _tokenizer(config):
  from vtimellm_jax.data import tokenizer as tokenizer_lib

  path = config.data.tokenizer or config.model.base
  if not path:
    raise UserError("config.data.tokenizer is empty and there is no model.base to take the tokenizer from")
  return tokenizer_lib.load_encoder(path)


def build_data(config, shard_index: int, shard_count: int):
  """Returns the planned Grain pipeline of this host for the stage's data."""
  from vtimellm_jax.data import pipeline

  if not config.data.json:
    raise UserError("config.data.json is empty: pass --config.data.json=<annotations.json>")
  source = pipeline.JsonSource(config.data.json, config.data.features)
  return pipeline.build_pipeline(
      source, _tokenizer(config), template=config.data.template, batch_size=config.global_batch // shard_count,
      seed=config.seed, num_buckets=config.data.num_buckets, num_epochs=config.epochs,
      shard_index=shard_index, shard_count=shard_count, skip_bad_records=config.data.skip_bad_records,
      worker_count=config.data.workers, max_length=config.data.max_length)


def accumulation_steps(global_batch: int, micro_batch: int, data_parallel: int) -> int:
  """Returns how many micro-batches make the global batch on this mesh; refuses uneven splits."""
  per_micro = micro_batch * data_parallel
  if global_batch % per_micro:
    raise UserError(f"global_batch {global_batch} is not a multiple of micro_batch {micro_batch} x "
                    f"{data_parallel} data-parallel devices; change --config.micro_batch or the mesh")
  return global_batch // per_micro


class TrainState:
  """The sharded model split into what trains and what stays frozen, plus its optimizer."""

  def __init__(self, config, mesh, vocab_size: int | None, total_steps: int, abstract: bool = False):
    """`abstract=True` holds only ShapeDtypeStructs that carry their shardings (for AOT compiles).

    Otherwise every array is created in its shards (`model_setup.build_train_model`): the base is
    restored straight into them, fresh variables come from a jitted init with sharded outputs.
    """
    if abstract:
      model = nnx.eval_shape(model_setup.train_structure(config, vocab_size))
    else:
      model = model_setup.build_train_model(config, vocab_size, mesh)
    self.model_config = model.config
    trainable_filter = nnx.All(nnx.Param, model_setup.trainable_filter(config.trainable))
    self.graphdef, trainable, frozen = nnx.split(model, trainable_filter, ...)
    del model
    if not jax.tree.leaves(trainable):
      raise UserError(f"config.trainable={config.trainable!r} selects no parameter of this model")
    self.trainable_sharding = sharding.state_shardings(trainable, mesh)
    self.frozen_sharding = sharding.state_shardings(frozen, mesh)
    # Trainable parameters and the optimizer state live in fp32 whatever the base's dtype.
    to_f32 = lambda tree: jax.tree.map(lambda x: x.astype(jnp.float32), tree)  # noqa: E731
    if abstract:
      self.trainable = _abstract(jax.eval_shape(to_f32, trainable), self.trainable_sharding)
      self.frozen = _abstract(frozen, self.frozen_sharding)
    else:
      self.trainable = jax.jit(to_f32, out_shardings=self.trainable_sharding)(trainable)
      self.frozen = frozen
    del trainable, frozen
    self.tx, self.schedule = step_lib.make_optimizer(config.optim, total_steps)
    # Optimizer moments are sharded like their parameters; counters are replicated.
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.opt_sharding = optax.tree_map_params(
        self.tx, lambda _, s: s, jax.eval_shape(self.tx.init, self.trainable), self.trainable_sharding,
        transform_non_params=lambda _: replicated, is_leaf=lambda x: isinstance(x, nnx.Variable))
    if abstract:
      self.opt_state = _abstract(jax.eval_shape(self.tx.init, self.trainable), self.opt_sharding)
    else:
      self.opt_state = jax.jit(self.tx.init, out_shardings=self.opt_sharding)(self.trainable)
    self.has_dropout = config.trainable == "lora" and config.lora.dropout > 0
    if config.model.loss_chunk < 0:
      raise UserError(f"config.model.loss_chunk must be >= 0 (0: full logits), got {config.model.loss_chunk}")
    self.loss_chunk = config.model.loss_chunk
    self.mesh = mesh
    self.num_trainable = sum(x.size for x in jax.tree.leaves(self.trainable))
    self.num_frozen = _parameter_count(self.frozen)

  def jit_step(self):
    """Returns the jitted step(trainable, opt_state, frozen, batch, step, key) with this state's shardings."""
    step = step_lib.make_train_step(self.graphdef, self.tx, self.has_dropout, self.loss_chunk)
    abstract_mesh = self.mesh.abstract_mesh

    # Traced under the mesh so that the model sees its target platform (attention "auto") and
    # kernels that need it (splash attention) can shard_map over it.
    def step_on_mesh(*args):
      with jax.sharding.use_abstract_mesh(abstract_mesh):
        return step(*args)

    return jax.jit(step_on_mesh,
                   in_shardings=(self.trainable_sharding, self.opt_sharding, self.frozen_sharding, None, None, None),
                   out_shardings=(self.trainable_sharding, self.opt_sharding, None), donate_argnums=(0, 1))


def _parameter_count(state: nnx.State) -> int:
  """Returns how many parameters a state holds: a quantised kernel's elements, not its codes' bytes."""
  count = 0
  for path, variable in nnx.to_flat_state(state):
    value = variable.get_value()
    if isinstance(variable, quant.QuantizedWeight):
      # Codes hold two 4-bit elements a byte; scales and the rest are not parameters of the model.
      count += value.size * (2 if value.dtype == jnp.uint8 else 1) if path[-1] == "kernel_codes" else 0
    else:
      count += getattr(value, "size", 0)
  return count


class CheckpointMismatch(UserError):
  """A readable checkpoint of another model: an error, never a reason to fall back to an older one."""


def _check_resumable(workdir, step: int, state: TrainState) -> None:
  """Raises UserError unless the checkpoint's trained parameters have this run's names and shapes."""
  saved = model_io.saved_arrays(workdir / checkpointing.CHECKPOINT_DIR / str(step))
  expected = {tuple(str(k) for k in path): v.get_value().shape for path, v in nnx.to_flat_state(state.trainable)}
  problems = [f"{'/'.join(p)}: {tuple(saved[p].shape)} saved, {shape} expected" for p, shape in expected.items()
              if p in saved and tuple(saved[p].shape) != tuple(shape)]
  problems += [f"{'/'.join(p)}: not in the checkpoint" for p in expected if p not in saved]
  problems += [f"{'/'.join(p)}: saved, but this run has no such parameter" for p in saved if p not in expected]
  if problems:
    shown = "\n".join(f"  - {p}" for p in problems[:10]) + (f"\n  ... {len(problems) - 10} more" if len(problems) > 10 else "")
    raise CheckpointMismatch(f"{workdir}: its checkpoint (step {step}) does not fit this run's model; it was trained with "
                    f"another model, LoRA or trainable setting, or by an older vtimellm-jax that stored the layers "
                    f"one by one. Resume with that run's config, or train into a new --workdir:\n{shown}")


def _restore_newest_readable(ckpt, workdir, state: TrainState, log) -> tuple[int, tuple] | None:
  """Returns (step, restored state) of the newest checkpoint that reads whole, or None when there is none.

  Each unreadable checkpoint is named in the log and moved to `{workdir}/unreadable_checkpoints/`
  (kept for inspection; its step is then free to be saved again).
  """
  unreadable = []
  for step in sorted(ckpt.manager.all_steps(), reverse=True):
    try:
      _check_resumable(workdir, step, state)
      restored = ckpt.restore(
          step, _abstract(state.trainable.to_pure_dict(), state.trainable_sharding.to_pure_dict()),
          _abstract(state.opt_state, state.opt_sharding))
    except CheckpointMismatch:
      raise
    except Exception as e:  # pylint: disable=broad-except  # a torn file: orbax, tensorstore, json each raise their own
      log(f"checkpoint {workdir / checkpointing.CHECKPOINT_DIR / str(step)} is unreadable ({_first_cause(e)}); "
          "trying an older one")
      unreadable.append(step)
      continue
    if unreadable:
      if jax.process_index() == 0:
        (workdir / UNREADABLE_DIR).mkdir(parents=True, exist_ok=True)
        for bad in unreadable:
          (workdir / checkpointing.CHECKPOINT_DIR / str(bad)).rename(workdir / UNREADABLE_DIR / f"{bad}-{time.time_ns()}")
        log(f"moved unreadable checkpoint(s) {unreadable} to {workdir / UNREADABLE_DIR}")
      if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("unreadable checkpoints moved")
      ckpt.manager.reload()
    return step, restored
  if unreadable:
    raise UserError(f"{workdir}: no checkpoint is readable (steps {unreadable}); move {checkpointing.CHECKPOINT_DIR}/ "
                    "away to start over")
  return None


def _first_cause(error: BaseException) -> str:
  """Returns the first line of the innermost cause of `error` (what was torn: orbax's own message
  only names the array index, then dumps the TensorStore spec)."""
  while error.__cause__ is not None:
    error = error.__cause__
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]


def _abstract(tree, shardings):
  """Returns the ShapeDtypeStructs of `tree`, each carrying its sharding."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _host_batch_to_global(batch: dict[str, np.ndarray], accum: int, mesh) -> dict[str, jax.Array]:
  out = {}
  for key in step_lib.BATCH_KEYS:
    local = np.asarray(batch[key])
    local = local.reshape((accum, local.shape[0] // accum) + local.shape[1:])
    global_shape = (accum, local.shape[1] * jax.process_count()) + local.shape[2:]
    out[key] = jax.make_array_from_process_local_data(sharding.batch_sharding(mesh, local.ndim, 1), local, global_shape)
  return out


def _abstract_batch(rows: int, length: int, num_features: int, accum: int, mesh):
  shapes = {"input_ids": ((accum, rows // accum, length), jnp.int32),
            "labels": ((accum, rows // accum, length), jnp.int32),
            "attention_mask": ((accum, rows // accum, length), jnp.int32),
            "features": ((accum, rows // accum, num_features, records.FEATURE_DIM), jnp.float16)}
  return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding.batch_sharding(mesh, len(s), 1)) for k, (s, d) in shapes.items()}


def _format_memory(compiled) -> str:
  analysis = compiled.memory_analysis()
  if analysis is None:
    return "memory analysis unavailable on this backend"
  gib = lambda b: b / 2**30  # noqa: E731
  return (f"per device: arguments {gib(analysis.argument_size_in_bytes):.3f} GiB, outputs "
          f"{gib(analysis.output_size_in_bytes):.3f} GiB, temporaries {gib(analysis.temp_size_in_bytes):.3f} GiB, "
          f"code {gib(analysis.generated_code_size_in_bytes):.3f} GiB")


def train(config: ml_collections.ConfigDict, workdir: str | pathlib.Path, dry_run: bool = False,
          log: Callable[[str], None] = print, on_step: Callable[[int], None] | None = None,
          allow_config_change: bool = False) -> dict[str, Any]:
  """Runs (or resumes) a stage; returns a summary {steps, final_loss, compiled, stopped_by, ...}.

  `on_step(step)` is called after each step's checkpoint decision (tests use it to kill a run).
  `stopped_by` is the name of the signal that stopped the run early (a checkpoint of its last step
  is saved), else None. `allow_config_change` resumes a checkpoint trained with other settings.
  """
  sharding.maybe_initialize_distributed()
  workdir = checkpointing.workdir_path(workdir)
  mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor,
                            sharding.first_devices(config.mesh.devices))
  dp = sharding.data_parallel_size(mesh)
  accum = accumulation_steps(config.global_batch, config.micro_batch, dp)
  if not dry_run:  # before any data is read: a refused rerun costs nothing
    workdir.mkdir(parents=True, exist_ok=True)
    run_record.record_run(workdir, config, has_checkpoint=checkpointing.latest_step(workdir) is not None,
                          allow_changes=allow_config_change, write=jax.process_index() == 0, log=log)
  data = build_data(config, jax.process_index(), jax.process_count())
  total_steps = len(data) if config.max_steps <= 0 else min(config.max_steps, len(data))
  log(f"[{config.stage}] mesh {dict(mesh.shape)}, global batch {config.global_batch} = micro {config.micro_batch} x "
      f"accumulation {accum} x data-parallel {dp}; {total_steps} steps; buckets {data.bucket_lengths}; "
      f"padding {100 * data.padding_fraction:.1f}%; data {dict(data.stats)}")

  state = TrainState(config, mesh, len(_tokenizer(config)), total_steps)
  held = f", decoder projections held as {config.model.quant}" if config.model.get("quant") else ""
  log(f"[{config.stage}] trainable parameters: {state.num_trainable:,} ({config.trainable}); frozen: {state.num_frozen:,}"
      f"{held}")
  step_fn = state.jit_step()
  key = jax.random.key(config.seed + 3)
  compiled: dict[int, Any] = {}

  def compile_for(length: int):
    if length not in compiled:
      batch = _abstract_batch(config.global_batch, length, data.num_features, accum, mesh)
      compiled[length] = step_fn.lower(state.trainable, state.opt_state, state.frozen, batch,
                                       jnp.int32(0), key).compile()
      log(f"[{config.stage}] compiled step for text length {length}: {_format_memory(compiled[length])}")
    return compiled[length]

  if dry_run:
    for length in data.bucket_lengths:
      compile_for(length)
    return {"steps": 0, "compiled": len(compiled), "dry_run": True}

  ckpt = checkpointing.TrainCheckpointer(workdir, config.checkpoint.every_steps, config.checkpoint.keep,
                                         config.checkpoint.async_save)
  iterator = data.iterator()
  start = 0
  resumed = _restore_newest_readable(ckpt, workdir, state, log)
  if resumed is not None:
    start, (params, opt_state, data_state, _) = resumed
    nnx.replace_by_pure_dict(state.trainable, params)
    state.opt_state = opt_state
    iterator.set_state(data_state)
    log(f"[{config.stage}] resumed from step {start}")

  # Logs are appended line by line, which buckets do not allow: a remote workdir logs locally.
  log_dir = pathlib.Path(str(workdir)) if "://" not in str(workdir) else pathlib.Path("logs") / workdir.name
  log_dir.mkdir(parents=True, exist_ok=True)
  peak_tflops = device_peaks.peak_tflops(jax.devices())
  metrics_log = MetricsLog(log_dir, total_steps, start, config.log_every, enabled=jax.process_index() == 0)
  summary: dict[str, Any] = {"steps": start, "compiled": 0, "stopped_by": None}
  step_index, last_loss = start, math.nan

  def save_checkpoint(force: bool) -> bool:
    # Parameters are saved as a plain nested dict (what `export` and stage hand-offs read).
    return ckpt.save(step_index, state.trainable.to_pure_dict(), state.opt_state, iterator.get_state(),
                     {"step": step_index, "stage": config.stage}, force=force)

  with preemption.StopOnSignal() as stop:
    try:
      while step_index < total_steps:
        host_batch = next(iterator)
        length = host_batch["input_ids"].shape[1]
        batch = _host_batch_to_global(host_batch, accum, mesh)
        step_executable = compile_for(length)
        t0 = time.perf_counter()
        new_trainable, new_opt, metrics = step_executable(state.trainable, state.opt_state, state.frozen, batch,
                                                              jnp.int32(step_index), key)
        loss = float(metrics["loss"])
        seconds = time.perf_counter() - t0
        if not math.isfinite(loss):
          last = ckpt.latest_step()
          kept = (f"the last good checkpoint (step {last}) is intact in {workdir / checkpointing.CHECKPOINT_DIR}"
                  if last is not None else "no checkpoint has been written yet")
          raise UserError(f"[{config.stage}] loss is {loss} at step {step_index + 1}; stopping ({kept}). "
                          f"This process's rows of the batch: {data.row_names(host_batch['index'])}")
        state.trainable, state.opt_state = new_trainable, new_opt
        step_index += 1
        last_loss = loss
        real = int(host_batch["attention_mask"].sum()) + (data.num_features - 1) * int(host_batch["valid"].sum())
        tflops = step_lib.training_flops_per_token(state.model_config, length - 1 + data.num_features,
                                                   config.trainable == "all") * real * jax.process_count() / seconds / 1e12
        metrics_log.record(step_index, {
            "loss": loss, "lr": float(state.schedule(step_index - 1)), "grad_norm": float(metrics["grad_norm"]),
            "step_time": seconds, "tokens_per_s": real * jax.process_count() / seconds,
            "padding": 1 - real / (host_batch["input_ids"].shape[0] * (length - 1 + data.num_features)),
            "tflops_per_s": tflops, "mfu": tflops / peak_tflops if peak_tflops else 0.0,
            "labelled_tokens": int(metrics["tokens"]), "bucket": length})
        saved = save_checkpoint(force=step_index == total_steps)
        if on_step is not None:
          on_step(step_index)
        if step_index < total_steps:
          summary["stopped_by"] = stop.requested()
        if summary["stopped_by"]:
          if not saved:
            save_checkpoint(force=True)
          break
    finally:
      ckpt.wait()
      ckpt.close()
      metrics_log.close()
  summary.update(steps=step_index, final_loss=last_loss, compiled=len(compiled))
  if summary["stopped_by"]:
    log(f"[{config.stage}] stopped by {summary['stopped_by']} after step {step_index} of {total_steps}: checkpoint "
        f"saved in {workdir / checkpointing.CHECKPOINT_DIR}; rerun the same command to resume")
  else:
    log(f"[{config.stage}] done: {step_index} steps, last loss {last_loss:.4f}, checkpoints in "
        f"{workdir / checkpointing.CHECKPOINT_DIR}")
  return summary
