"""Training: losses fall in every stage, sharding and accumulation do not change the math, runs
resume exactly after SIGKILL, one compile per bucket, and the stage-3 merge is the hand-computed one."""

import contextlib
import gc
import io
import json
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from training_fixtures import logged_losses as _losses, make_dataset, stage_config as _config
from vtimellm_jax.errors import UserError
from vtimellm_jax.models import llama, lora
from vtimellm_jax.models.llama import LlamaForCausalLM
from vtimellm_jax.training import checkpointing, config_loading, model_setup, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_dataset(tmp_path_factory.mktemp("data"))



def _quiet(_):
  pass


@pytest.mark.slow
def test_three_stages_learn_and_hand_off(dataset, tmp_path):
  common = ["--config.epochs=40", "--config.max_steps=50", "--config.global_batch=8", "--config.micro_batch=4",
            "--config.mesh.devices=1"]
  s1 = trainer.train(_config("stage1", dataset, *common), tmp_path / "s1", log=_quiet)
  # Stage 2/3's recipe lr (1e-4) is for 7B; a rank-8 LoRA on a random tiny model needs more to move in 50 steps.
  common += ["--config.optim.lr=3e-3"]
  s2 = trainer.train(_config("stage2", dataset, *common, f"--config.load.adapter={tmp_path / 's1'}"),
                     tmp_path / "s2", log=_quiet)
  s3 = trainer.train(_config("stage3", dataset, *common, f"--config.load.adapter={tmp_path / 's1'}",
                             f"--config.load.merge_lora={tmp_path / 's2'}"), tmp_path / "s3", log=_quiet)
  for summary, name in ((s1, "s1"), (s2, "s2"), (s3, "s3")):
    losses = _losses(tmp_path / name)
    assert summary["steps"] == 50 == len(losses)
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), (name, losses[:5], losses[-5:])
  # Stage 1 trains only the adapter; stages 2 and 3 only LoRA.
  assert set(checkpointing.restore_params(tmp_path / "s1")) == {"mm_projector"}
  s2_params = checkpointing.restore_params(tmp_path / "s2")
  up = s2_params["model"]["layers"]["mlp"]["up_proj"]  # every layer's factors, stacked
  assert "mm_projector" not in s2_params and up["lora_a"].shape == (2, 64, 8) and up["lora_b"].shape == (2, 8, 176)

  # Stage 3's base = stage-2 LoRA merged by hand into the random base, with the stage-1 adapter.
  base = model_setup.build_base(_config("stage2", dataset))
  merged = model_setup.build_base(_config("stage3", dataset, f"--config.load.adapter={tmp_path / 's1'}",
                                          f"--config.load.merge_lora={tmp_path / 's2'}"))
  factors = s2_params["model"]["layers"]["self_attn"]["v_proj"]
  scaling = 16.0 / 8  # tiny LoRA: alpha 16, rank 8
  for layer in range(2):
    by_hand = (np.asarray(base.model.layers.self_attn.v_proj.kernel[...][layer])
               + scaling * factors["lora_a"][layer] @ factors["lora_b"][layer])
    np.testing.assert_allclose(np.asarray(merged.model.layers.self_attn.v_proj.kernel[...][layer]), by_hand,
                               rtol=1e-6, atol=1e-6)
  s1_params = checkpointing.restore_params(tmp_path / "s1")
  np.testing.assert_array_equal(np.asarray(merged.mm_projector.kernel[...]), s1_params["mm_projector"]["kernel"])
  assert not any(l.has_lora for _, l in lora.lora_layers(merged))


def test_sharded_equals_unsharded(dataset, tmp_path):
  common = ["--config.max_steps=5", "--config.epochs=5", "--config.global_batch=16"]
  single = trainer.train(_config("stage2", dataset, *common, "--config.micro_batch=16", "--config.mesh.devices=1"),
                         tmp_path / "one", log=_quiet)
  sharded = trainer.train(_config("stage2", dataset, *common, "--config.micro_batch=4", "--config.mesh.data=2",
                                  "--config.mesh.fsdp=2", "--config.mesh.tensor=2"), tmp_path / "eight", log=_quiet)
  assert single["steps"] == sharded["steps"] == 5
  np.testing.assert_allclose(_losses(tmp_path / "eight"), _losses(tmp_path / "one"), rtol=1e-5)


def test_remat_with_lora_dropout_changes_no_number(dataset, tmp_path):
  # Sharded, LoRA dropout on: the rematerialised scan recomputes each layer's masks from its own stream.
  common = ["--config.max_steps=3", "--config.epochs=3", "--config.global_batch=16", "--config.micro_batch=4",
            "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
  plain = _config("stage2", dataset, *common, "--config.model.remat=none")
  assert plain.lora.dropout > 0
  trainer.train(plain, tmp_path / "none", log=_quiet)
  want = checkpointing.restore_params(tmp_path / "none")
  for mode in ("full", "lora"):
    trainer.train(_config("stage2", dataset, *common, f"--config.model.remat={mode}"), tmp_path / mode, log=_quiet)
    np.testing.assert_allclose(_losses(tmp_path / mode), _losses(tmp_path / "none"), rtol=1e-5, err_msg=mode)
    for x, y in zip(jax.tree.leaves(checkpointing.restore_params(tmp_path / mode)), jax.tree.leaves(want)):
      np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6, err_msg=mode)


def _frozen_matmuls_and_saved_values(remat: str):
  """Returns (x @ W products of frozen kernels in the gradient's jaxpr, saved-residual lines) of one
  LoRA decoder layer (XLA attention, dropout on) under the policy of `remat`."""
  config = llama.tiny(attention_impl="xla", remat=remat)
  layer = llama.LlamaDecoderLayer(config, nnx.Rngs(0))
  lora.attach_lora(layer, lora.LoraConfig(rank=4, alpha=8.0, dropout=0.1), nnx.Rngs(1))
  graphdef, factors, streams, frozen = nnx.split(layer, nnx.LoRAParam, nnx.RngState, ...)
  b, t = 2, 16
  cos, sin = llama.rope_tables(jnp.broadcast_to(jnp.arange(t), (b, t)), config.rotary_dim, config.rope_theta)
  lengths = jnp.full((b,), t, jnp.int32)

  def loss(x, factors, streams):
    def body(x, factors, streams):
      return nnx.merge(graphdef, factors, streams, frozen)(x, cos, sin, lengths)[0]
    return jax.checkpoint(body, policy=llama.remat_policy(config))(x, factors, streams).sum()

  x = jnp.ones((b, t, config.hidden_size), jnp.float32)
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1)))(x, factors, streams)
  kernels = {tuple(v.shape) for v in jax.tree.leaves(frozen) if getattr(v, "ndim", 0) == 2}
  assert kernels == {(64, 64), (64, 176), (176, 64)}

  def count(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        (_, rhs_contract), _ = eqn.params["dimension_numbers"]
        n += tuple(eqn.invars[1].aval.shape) in kernels and tuple(rhs_contract) == (0,)
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if hasattr(sub, "eqns") or hasattr(sub, "jaxpr"):
            n += count(getattr(sub, "jaxpr", sub))
    return n

  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    jax.ad_checkpoint.print_saved_residuals(loss, x, factors, streams)
  return count(jaxpr.jaxpr), out.getvalue()


def test_lora_remat_policy_saves_every_frozen_matmul_output():
  forward_only, _ = _frozen_matmuls_and_saved_values("none")
  assert forward_only == 7  # q, k, v, o, gate, up, down: each x @ W once
  full, _ = _frozen_matmuls_and_saved_values("full")
  assert full > forward_only  # full remat recomputes them in the backward pass
  saved_by_lora, residuals = _frozen_matmuls_and_saved_values("lora")
  assert saved_by_lora == forward_only, residuals
  for name in ("query", "key", "value", "attention_out", "post_attention_hidden", "mlp_gate", "mlp_up"):
    assert f"named '{name}'" in residuals, (name, residuals)


def test_lora_dropout_masks_differ_between_layers():
  # One key per stacked layer: reseeding splits the step's key, so layers do not share masks.
  model = LlamaForCausalLM(llama.tiny(num_layers=3), nnx.Rngs(0))
  lora.attach_lora(model, lora.LoraConfig(rank=2, alpha=4.0, dropout=0.5), nnx.Rngs(1))
  nnx.reseed(model, dropout=jax.random.key(7), policy="match_shape")
  keys = jax.random.key_data(model.model.layers.mlp.up_proj.lora_dropout.rngs.key[...])
  assert keys.shape[0] == 3 and len({tuple(np.asarray(k).ravel()) for k in keys}) == 3


def test_trainer_model_is_born_sharded(dataset, tmp_path, monkeypatch):
  from vtimellm_jax import model_io, sharding
  from vtimellm_jax.models import load
  from vtimellm_jax.models.vtimellm import VTimeLLM

  # An unusual width, so no other test's arrays share these shapes.
  base_config = llama.tiny(vocab_size=400, hidden_size=72, intermediate_size=200, num_layers=3, num_heads=4,
                                 num_kv_heads=4)
  save_model_dir = tmp_path / "base"
  load.save_model(VTimeLLM(base_config, nnx.Rngs(5)), save_model_dir)
  stacked = {(3, 72, 72), (3, 72, 200), (3, 200, 72)}
  whole = stacked | {s[1:] for s in stacked} | {(400, 72), (72, 400), (768, 72)}

  def offenders():
    gc.collect()
    return [(a.shape, a.sharding) for a in jax.live_arrays() if tuple(a.shape) in whole and
            (len(a.sharding.device_set) == 1 or a.sharding.is_fully_replicated)]

  # Looked at after every restore and every initialisation while the model is assembled, and at the end.
  seen = []

  def spy(fn):
    def wrapped(*args, **kwargs):
      out = fn(*args, **kwargs)
      seen.append(offenders())
      return out
    return wrapped

  monkeypatch.setattr(model_io, "restore_arrays", spy(model_io.restore_arrays))
  monkeypatch.setattr(load, "_initialise", spy(load._initialise))
  config = _config("stage2", dataset, f"--config.model.base={save_model_dir}", "--config.mesh.data=1",
                   "--config.mesh.fsdp=8", "--config.global_batch=8", "--config.micro_batch=1")
  state = trainer.TrainState(config, sharding.make_mesh(data=1, fsdp=8, tensor=1), None, total_steps=1)
  assert len(seen) == 2 and seen == [[], []]  # the base's files, then the new adapter and fresh LoRA
  kernels = {path: v.get_value() for path, v in nnx.to_flat_state(state.frozen) if path[-1] in ("kernel", "embed_tokens")}
  assert len(kernels) == 1 + 1 + 7 + 1  # embeddings, lm_head, the 7 stacked projections, the adapter
  for path, array in kernels.items():
    assert len(array.sharding.device_set) == 8 and not array.sharding.is_fully_replicated, path
  assert not offenders()


def test_gradient_accumulation_gives_the_same_update(dataset, tmp_path):
  common = ["--config.max_steps=2", "--config.epochs=2", "--config.global_batch=16", "--config.mesh.devices=1",
            "--config.lora.dropout=0.0"]
  trainer.train(_config("stage2", dataset, *common, "--config.micro_batch=16"), tmp_path / "a", log=_quiet)
  trainer.train(_config("stage2", dataset, *common, "--config.micro_batch=4"), tmp_path / "b", log=_quiet)
  a, b = checkpointing.restore_params(tmp_path / "a"), checkpointing.restore_params(tmp_path / "b")
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(_losses(tmp_path / "a"), _losses(tmp_path / "b"), rtol=1e-5)


_KILLED_RUN = textwrap.dedent("""
    import os, signal, sys, time
    sys.path.insert(0, {tests!r})
    import conftest  # the same 8 fake devices and precision as the parent
    from vtimellm_jax.training import config_loading, trainer
    config = config_loading.load_config({config!r}, {overrides!r})
    def kill(step):
      if step == {kill_at}:
        time.sleep(1.0)  # let the asynchronous save of step 3 land; step 5 has no checkpoint
        os.kill(os.getpid(), signal.SIGKILL)
    trainer.train(config, {workdir!r}, on_step=kill, log=lambda _: None)
""")


def test_exact_resume_after_sigkill(dataset, tmp_path):
  overrides = [f"--config.data.json={dataset['stage2']}", f"--config.data.features={dataset['features']}",
               f"--config.data.tokenizer={dataset['tokenizer']}", "--config.max_steps=8", "--config.epochs=8",
               "--config.checkpoint.every_steps=3", "--config.mesh.devices=1", "--config.global_batch=8"]
  config_spec = str(ROOT / "configs/stage2.py") + ":tiny"
  script = _KILLED_RUN.format(tests=str(ROOT / "tests"), config=config_spec, overrides=overrides, kill_at=5,
                              workdir=str(tmp_path / "killed"))
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert checkpointing.latest_step(tmp_path / "killed") == 3
  steps = lambda w: [json.loads(line)["step"] for line in open(w / "metrics.jsonl")]  # noqa: E731
  assert steps(tmp_path / "killed") == [1, 2, 3, 4, 5]
  logs = []
  trainer.train(config_loading.load_config(config_spec, overrides), tmp_path / "killed", log=logs.append)
  assert any("resumed from step 3" in line for line in logs)
  trainer.train(config_loading.load_config(config_spec, overrides), tmp_path / "straight", log=_quiet)
  resumed, straight = checkpointing.restore_params(tmp_path / "killed"), checkpointing.restore_params(tmp_path / "straight")
  for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight)):
    np.testing.assert_array_equal(x, y)
  # Steps 4 and 5 ran twice; the step log holds each step once, as the uninterrupted run's.
  assert steps(tmp_path / "killed") == steps(tmp_path / "straight") == list(range(1, 9))
  np.testing.assert_array_equal(_losses(tmp_path / "killed"), _losses(tmp_path / "straight"))


def test_one_compile_per_bucket(dataset, tmp_path):
  # Stage-2 answers are short; giving the records varied lengths yields several buckets.
  records = json.loads(pathlib.Path(dataset["stage2"]).read_text())
  for i, record in enumerate(records):
    record["conversations"][1]["value"] += " It moves." * (i % 6) * 3
  data = tmp_path / "varied.json"
  data.write_text(json.dumps(records))
  summary = trainer.train(_config("stage2", dataset, f"--config.data.json={data}", "--config.data.num_buckets=3",
                                  "--config.epochs=4", "--config.global_batch=4", "--config.micro_batch=4",
                                  "--config.mesh.devices=1"), tmp_path / "w", log=_quiet)
  buckets = {json.loads(line)["bucket"] for line in open(tmp_path / "w" / "metrics.jsonl")}
  assert len(buckets) >= 2 and summary["steps"] > 2 * len(buckets)
  assert summary["compiled"] == len(buckets)


def test_non_finite_loss_stops_with_checkpoint_intact(dataset, tmp_path):
  config = _config("stage2", dataset, "--config.optim.lr=1e30", "--config.optim.max_grad_norm=1e30",
                   "--config.optim.warmup_ratio=0.0", "--config.max_steps=30", "--config.epochs=30",
                   "--config.checkpoint.every_steps=1", "--config.mesh.devices=1", "--config.global_batch=8")
  with pytest.raises(UserError, match="loss is (nan|inf)") as e:
    trainer.train(config, tmp_path / "w", log=_quiet)
  good = checkpointing.latest_step(tmp_path / "w")
  assert f"step {good})" in str(e.value)
  assert f"This process's rows of the batch: {dataset['stage2']}: record " in str(e.value)
  params = checkpointing.restore_params(tmp_path / "w")
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_resuming_with_another_lora_rank_is_refused_naming_the_parameters(dataset, tmp_path):
  common = ["--config.max_steps=1", "--config.epochs=1", "--config.mesh.devices=1", "--config.global_batch=8"]
  trainer.train(_config("stage2", dataset, *common), tmp_path / "w", log=_quiet)
  with pytest.raises(UserError, match="lora.rank: 8 in run.json, 4 now"):
    trainer.train(_config("stage2", dataset, *common, "--config.lora.rank=4", "--config.max_steps=2"), tmp_path / "w",
                  log=_quiet)
  with pytest.raises(UserError, match="does not fit this run's model") as e:
    trainer.train(_config("stage2", dataset, *common, "--config.lora.rank=4", "--config.max_steps=2"), tmp_path / "w",
                  log=_quiet, allow_config_change=True)
  assert "model/layers/mlp/up_proj/lora_a: (2, 64, 8) saved, (2, 64, 4) expected" in str(e.value)
