"""The quantised base (QLoRA) wired into the model: layers, loading, training, answering, refusals.

The block formats themselves are checked against bitsandbytes in tests/test_model_quant.py; here a
quantised projection must compute with exactly the kernel `quant.dequantize` gives back, load the
same whether quantised as it is read or after, shard as declared, train LoRA on it, and be refused
where it cannot work.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gpu_fixtures import needs_cuda_plugin
from inference_fixtures import tiny_vtimellm  # noqa: F401
from training_fixtures import logged_losses as _losses, make_dataset, stage_config as _config
from vtimellm_jax import cli, sharding
from vtimellm_jax.errors import UserError
from vtimellm_jax.inference import answerer
from vtimellm_jax.models import families, load, lora, quant
from vtimellm_jax.models.vtimellm import VTimeLLM
from vtimellm_jax.training import config_loading, model_setup, trainer

ROOT = pathlib.Path(__file__).resolve().parents[1]
QTYPES = ("nf4", "fp4", "int8")


def _linear(stacked: int = 0, in_features: int = 128, out_features: int = 96, seed: int = 0) -> lora.Linear:
  make = lambda rngs: lora.Linear(in_features, out_features, axes=("embed", "mlp"), rngs=rngs)  # noqa: E731
  if not stacked:
    return make(nnx.Rngs(seed))
  split = nnx.split_rngs(splits=stacked)(nnx.vmap(make, in_axes=(0,), out_axes=0, axis_size=stacked,
                                                  transform_metadata={nnx.PARTITION_NAME: "layers"}))
  return split(nnx.Rngs(seed))


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("stacked", (0, 3))
def test_quantised_projection_computes_with_the_dequantised_kernel(qtype, stacked):
  layer = _linear(stacked)
  kernel = layer.kernel[...]
  x = jax.random.normal(jax.random.key(1), (5, 128))
  expected_q = quant.quantize(jnp.swapaxes(kernel, -1, -2), qtype, batch_dims=kernel.ndim - 2)
  layer.quantize(qtype)
  assert layer.kernel is None and layer.kernel_codes[...].dtype in (jnp.uint8, jnp.int8)
  assert layer.stack_shape == ((stacked,) if stacked else ())
  w = quant.dequantize(expected_q)  # [*L, out, in]
  for i in range(stacked or 1):
    one = jax.tree.map(lambda a: a[i], nnx.state(layer)) if stacked else nnx.state(layer)
    sub = nnx.merge(nnx.graphdef(layer), one) if stacked else layer
    np.testing.assert_allclose(sub(x), x @ (w[i] if stacked else w).T, rtol=1e-5, atol=1e-5)
  # And it is not the float kernel's product (the quantisation did something).
  assert not np.allclose(sub(x), x @ (kernel[-1] if stacked else kernel), atol=1e-3)


@pytest.mark.parametrize("stacked", (0, 3))
def test_decoded_scales_give_the_same_kernel(stacked):
  layer = _linear(stacked)
  layer.quantize("nf4")
  x = jax.random.normal(jax.random.key(1), (5, 128))
  doubly = quant.dequantize(layer.quantized_kernel())
  y = None if stacked else layer(x)  # a stacked layer runs under the layer scan
  assert layer.decode_scales() and layer.kernel_scales2 is None and layer.kernel_offset is None
  assert layer.kernel_scales[...].dtype == jnp.float32 and not layer.decode_scales()
  np.testing.assert_array_equal(quant.dequantize(layer.quantized_kernel()), doubly)
  if not stacked:
    np.testing.assert_array_equal(layer(x), y)
  int8 = _linear(stacked)
  int8.quantize("int8", double_quant=False)
  assert not int8.decode_scales()


def test_gcd_blocks_for_widths_that_64_does_not_divide():
  layer = _linear(in_features=176, out_features=64)  # the tiny model's down_proj width
  layer.quantize("nf4")
  assert layer.kernel_scales.shape == (64, 176 // 16)  # gcd(176, 64) = 16 elements a block
  assert layer.quantized_kernel().blocksize == 16


def test_lora_trains_on_a_quantised_kernel_and_cannot_merge_into_it():
  layer = _linear()
  layer.quantize("nf4")
  layer.attach_lora(lora.LoraConfig(rank=4, dropout=0.0), nnx.Rngs(2))
  layer.lora_b.set_value(jnp.full(layer.lora_b.shape, 0.01))
  x = jax.random.normal(jax.random.key(3), (4, 128))
  graphdef, trained, rest = nnx.split(layer, nnx.LoRAParam, ...)

  def loss(trained):
    return jnp.sum(nnx.merge(graphdef, trained, rest)(x) ** 2)

  grads = jax.grad(loss)(trained)
  assert {k for k, _ in nnx.to_flat_state(grads)} == {("lora_a",), ("lora_b",)}
  assert all(float(jnp.abs(g.get_value()).max()) > 0 for _, g in nnx.to_flat_state(grads))
  with pytest.raises(ValueError, match="merge it into the full-precision base, then quantise"):
    layer.merge_lora()
  with pytest.raises(ValueError, match="already quantised"):
    layer.quantize("int8")


def _logits(model, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, 500, (2, 40))
  ids[:, 3] = -200
  feats = rng.normal(size=(2, 100, 768)).astype(np.float32)
  out = model(jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32), jnp.asarray(feats))
  return out[0] if isinstance(out, tuple) else out


# Root-mean-square difference of a random tiny model's logits from the float32 model's, over the
# logits' standard deviation (docs/models.md, "Quantized base"): int8 is close, the 4-bit types
# coarse on random (Gaussian) weights, nf4 closer than fp4 as the QLoRA paper finds.
LOGIT_TOLERANCE = {"int8": 0.03, "nf4": 0.3, "fp4": 0.4}


def test_tiny_model_logits_stay_within_the_documented_tolerance():
  cfg = families.preset("tiny")
  reference = _logits(VTimeLLM(cfg, nnx.Rngs(params=0, dropout=1)))
  errors = {}
  for qtype in QTYPES:
    model = VTimeLLM(cfg, nnx.Rngs(params=0, dropout=1))
    assert lora.quantize_projections(model, qtype, double_quant=qtype != "int8") == 7 * cfg.num_layers
    assert model.lm_head.kernel is not None and not model.lm_head.quant  # the output layer stays float
    diff = _logits(model) - reference
    errors[qtype] = float(jnp.sqrt(jnp.mean(diff**2)) / jnp.std(reference))
    assert 0 < errors[qtype] <= LOGIT_TOLERANCE[qtype], (qtype, errors)
  assert errors["int8"] < errors["nf4"] < errors["fp4"], errors


class _Spy:
  """A source that records which arrays each restore call asks for."""

  def __init__(self, inner):
    self.inner, self.name, self.calls = inner, inner.name, []

  def available(self):
    return self.inner.available()

  def restore(self, targets):
    self.calls.append(sorted(targets))
    return self.inner.restore(targets)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp("tiny") / "model"
  load.save_model(VTimeLLM(families.preset("tiny"), nnx.Rngs(params=0, dropout=1)), directory)
  return directory


@pytest.mark.parametrize("qtype", ("nf4",))
def test_quantised_as_read_equals_quantised_after_and_shards_as_declared(tiny_dir, qtype):
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  read = load.load_model(tiny_dir, VTimeLLM, mesh=mesh, quant=qtype)
  after = load.load_model(tiny_dir, VTimeLLM, mesh=mesh)
  lora.quantize_projections(after, qtype)
  flat_read, flat_after = (dict(nnx.to_flat_state(nnx.state(m, nnx.Not(nnx.RngState)))) for m in (read, after))
  assert flat_read.keys() == flat_after.keys()
  assert not any(path[-1] == "kernel" and "layers" in path for path in flat_read)
  for path, variable in flat_read.items():
    np.testing.assert_array_equal(variable.get_value(), flat_after[path].get_value(), err_msg=str(path))
  down = read.model.layers.mlp.down_proj  # kernel [L, mlp, embed]: codes [L, embed, mlp / 2]
  assert down.kernel_codes.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")
  assert down.kernel_scales.get_value().sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)


def test_quantising_source_reads_one_float_kernel_at_a_time(tiny_dir):
  model_cls_build = load.model_builder(json.loads((tiny_dir / "model.json").read_text()), VTimeLLM, quant="nf4")
  layers = lora.quantized_layers(nnx.eval_shape(model_cls_build))
  spy = _Spy(load.DirectorySource(tiny_dir))
  model = load.sharded_model(model_cls_build, None, [load.QuantizingSource(spy, layers)])
  kernel_calls = [call for call in spy.calls if any(path[-1] == "kernel" and path[:-1] in layers for path in call)]
  assert len(kernel_calls) == len(layers) == 7 and all(len(call) == 1 for call in kernel_calls)
  assert len(lora.quantized_layers(model)) == 7


def test_a_quantised_model_is_not_saved(tiny_dir, tmp_path):
  model = load.load_model(tiny_dir, VTimeLLM, quant="nf4")
  with pytest.raises(UserError, match="held quantised"):
    load.save_model(model, tmp_path / "out")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return make_dataset(tmp_path_factory.mktemp("data"))



@pytest.mark.slow
def test_qlora_stages_learn_and_stage_3_quantises_the_merged_base(dataset, tmp_path, capsys):
  common = ["--config.epochs=40", "--config.max_steps=30", "--config.global_batch=8", "--config.micro_batch=4",
            "--config.mesh.devices=1", "--config.optim.lr=3e-3", "--config.model.quant=nf4"]
  state = trainer.TrainState(_config("stage2", dataset, *common), sharding.single_device_mesh(), None, 1)
  frozen = dict(nnx.to_flat_state(state.frozen))
  assert ("model", "layers", "mlp", "up_proj", "kernel_codes") in frozen
  assert not any(path[-1] == "kernel" and "layers" in path for path in frozen)
  del state
  # A random base is created in float and then quantised, one projection at a time.
  _assert_quantised_after_the_float_base(_config("stage2", dataset, *common))
  trainer.train(_config("stage2", dataset, *common), tmp_path / "s2", log=lambda _: None)
  losses = _losses(tmp_path / "s2")
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses

  # Stage 3: the stage-2 LoRA merges into the float base, then the merged kernels are quantised.
  s3 = _config("stage3", dataset, *common, f"--config.load.merge_lora={tmp_path / 's2'}")
  _assert_quantised_after_the_float_base(s3)
  trainer.train(s3, tmp_path / "s3", log=lambda _: None)
  assert len(_losses(tmp_path / "s3")) == 30

  # Its export holds the full-precision base (the release's way with a --bits 4 run) and says so.
  assert cli.main(["export", "--model", str(tmp_path / "s3"), "--out", str(tmp_path / "exported")]) == 0
  assert "trained on a base quantised to nf4" in capsys.readouterr().out
  exported = load.load_model(tmp_path / "exported", VTimeLLM)
  assert not lora.quantized_layers(exported) and exported.model.layers.mlp.up_proj.kernel is not None


def _assert_quantised_after_the_float_base(config) -> None:
  """The quantised base `build_base` makes equals its float base quantised by hand, bit for bit."""
  base = model_setup.build_base(config)
  float_config = config.copy_and_resolve_references()
  float_config.model.quant = ""
  by_hand = model_setup.build_base(float_config)
  lora.quantize_projections(by_hand, config.model.quant)
  ours, theirs = (dict(nnx.to_flat_state(nnx.state(m, quant.QuantizedWeight))) for m in (base, by_hand))
  assert ours.keys() == theirs.keys() and len(ours) >= 7 * 2
  for path, variable in ours.items():
    np.testing.assert_array_equal(variable.get_value(), theirs[path].get_value(), err_msg=str(path))


def test_config_refuses_unknown_types_and_quantised_trainables():
  base = config_loading.load_config(str(ROOT / "configs/stage2.py") + ":tiny")
  config_loading.check_config(base)
  for overrides, message in ((["--config.model.quant=nf3"], "model.quant = 'nf3'"),
                             (["--config.model.quant=int8", "--config.trainable=all"], "a quantised kernel is frozen")):
    with pytest.raises(UserError, match=message):
      config_loading.load_config(str(ROOT / "configs/stage2.py") + ":tiny", overrides)


@pytest.mark.parametrize("family,size", [("vicuna", "7b"), ("vicuna", "13b"), ("chatglm3", "6b")])
def test_real_sizes_hold_at_most_40_percent_of_the_float_frozen_weights(family, size):
  """Per-device bytes of the frozen state of stage 2's step on one device, from abstract arrays."""
  from vtimellm_jax.configs import common

  def frozen_bytes(qtype):
    config = common.recipe(size, family)
    config.model.quant = qtype
    state = trainer.TrainState(config, sharding.single_device_mesh(), None, 1, abstract=True)
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.frozen) if hasattr(x, "dtype"))

  bf16, nf4 = frozen_bytes(""), frozen_bytes("nf4")
  assert bf16 > 1e10 and nf4 <= 0.4 * bf16, (bf16, nf4)


def test_answering_with_a_quantised_base(tiny_vtimellm, tmp_path, capsys):  # noqa: F811
  bot = answerer.load_answerer(tiny_vtimellm.model_dir, quant="int8")
  layers = lora.quantized_layers(bot.model)
  assert len(layers) == 2 * 4  # per layer: qkv, o, gate_up, down (the answering layout fuses them)
  assert {layer.quant for layer in layers.values()} == {"int8"}
  assert all(layer.kernel_scales2 is None for layer in layers.values())  # int8 keeps float32 block scales
  features = tmp_path / "v.npy"
  np.save(features, np.random.RandomState(0).normal(size=(100, 768)).astype(np.float16))
  code = cli.main(["chat", "--model", str(tiny_vtimellm.model_dir), "--features", str(features), "--query",
                   "When does it happen?", "--json", "--temperature", "0", "--max-new-tokens", "4", "--quant", "nf4"])
  assert code == 0
  assert len(json.loads(capsys.readouterr().out)["token_ids"]) >= 1
  with pytest.raises(UserError, match="--quant must be one of"):
    answerer.load_answerer(tiny_vtimellm.model_dir, quant="int4")



@needs_cuda_plugin
@pytest.mark.parametrize("qtype", ("int8", "nf4"))
def test_one_row_reads_the_codes_in_place_on_an_h100(qtype):
  """A decode step's projection (one row, 7B's gate/up width) compiled for an H100: no dequantised
  kernel in memory, which a dot would make XLA write for its GEMM (a float kernel's bytes and more)."""
  from vtimellm_jax.training import aot

  device = aot.target_devices(aot.resolve("1xH100"))[0]
  placed = jax.sharding.SingleDeviceSharding(device)
  q = jax.eval_shape(lambda: quant.quantize(jnp.zeros((22016, 4096), jnp.bfloat16), qtype, double_quant=qtype != "int8"))
  kernel_bytes = 22016 * 4096 * 2

  def temp_bytes(rows):
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=placed),
                        (jax.ShapeDtypeStruct((rows, 4096), jnp.bfloat16), q))
    matmul = lambda x, q: quant.quantized_matmul(x, q, jnp.bfloat16)  # noqa: E731
    return jax.jit(matmul).lower(*args).compile().memory_analysis().temp_size_in_bytes

  assert temp_bytes(1) < kernel_bytes / 10
  assert temp_bytes(16) >= kernel_bytes  # many rows: dequantise once, then one GEMM


@needs_cuda_plugin
def test_a_7b_nf4_decode_step_decodes_no_scales_into_memory_on_an_h100():
  """The whole 7B decode step as answering holds nf4 (scales decoded once): its temporaries stay far
  below the 0.41 GB of decoded scales that decoding them inside the step made XLA write."""
  from vtimellm_jax.bench import decode
  from vtimellm_jax.training import aot

  cost = decode.step_cost("7b", "bfloat16", "nf4", device=aot.target_devices(aot.resolve("1xH100"))[0])
  assert cost["temp_bytes"] < 32 * 2**20, cost
  assert cost["weight_bytes"] < 0.32 * 13.4e9, cost  # about 4.5 bits a weight


def test_serve_and_demo_load_a_quantised_base(tiny_vtimellm):  # noqa: F811
  from vtimellm_jax.inference import demo_cli, serve_cli, server
  import argparse

  for module in (serve_cli, demo_cli):
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    assert parser.parse_args(["--model", "m", "--quant", "nf4"]).quant == "nf4"
  service = server.load_service(str(tiny_vtimellm.model_dir), None, slots=1, context=None, media_roots=[],
                                max_new_tokens=4, max_waiting=1, quant="nf4")
  layers = lora.quantized_layers(service.engine.bot.model).values()
  assert {layer.quant for layer in layers} == {"nf4"} and all(layer.kernel_scales2 is None for layer in layers)
