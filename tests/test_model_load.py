"""One loader: stacked layers on disk, every problem of a directory reported at once, old layouts refused."""

import json

import numpy as np
import pytest
from flax import nnx

from vtimellm_jax import model_io, sharding
from vtimellm_jax.convert import llama as llama_convert
from vtimellm_jax.convert import table
from vtimellm_jax.errors import UserError
from vtimellm_jax.models import llama, load
from vtimellm_jax.models.llama import LlamaConfig, LlamaForCausalLM
from vtimellm_jax.models.vtimellm import VTimeLLM

CONFIG = llama.tiny(num_layers=3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  directory = tmp_path_factory.mktemp("llama")
  model = LlamaForCausalLM(CONFIG, nnx.Rngs(4))
  load.save_model(model, directory)
  return directory, model


def test_layers_are_stored_stacked_and_load_back_equal(saved):
  directory, model = saved
  meta = model_io.read_model_json(directory)
  assert meta["format"] == model_io.FORMAT
  arrays = model_io.saved_arrays(directory)
  assert arrays[("model", "layers", "mlp", "up_proj", "kernel")].shape == (3, 64, 176)
  assert not any(path[2].isdigit() for path in arrays if path[:2] == ("model", "layers"))
  loaded = load.load_model(directory)
  for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(loaded)), nnx.to_flat_state(nnx.state(model))):
    np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
  # Layers were initialised from their own keys, not copies of one another.
  kernel = np.asarray(loaded.model.layers.self_attn.q_proj.kernel[...])
  assert not np.allclose(kernel[0], kernel[1])
  assert loaded.model.layers.self_attn.q_proj.kernel.get_metadata()["out_sharding"] == ("layers", "embed", "q_heads")


def test_model_json_holds_the_architecture_and_loads_in_the_stored_dtype(tmp_path):
  model = LlamaForCausalLM(CONFIG.replace(dtype="bfloat16", param_dtype="bfloat16", remat="full"), nnx.Rngs(2))
  load.save_model(model, tmp_path / "bf16")
  stored = json.loads((tmp_path / "bf16" / "model.json").read_text())["config"]
  assert not set(stored) & set(LlamaConfig.RUN_SETTINGS)
  assert stored == CONFIG.architecture() and stored["num_layers"] == 3
  loaded = load.load_model(tmp_path / "bf16")
  assert (loaded.config.dtype, loaded.config.param_dtype, loaded.config.remat) == ("bfloat16", "bfloat16", "none")
  assert loaded.model.layers.mlp.up_proj.kernel[...].dtype == np.dtype("bfloat16")
  assert load.load_model(tmp_path / "bf16", dtype="float32", param_dtype="float32").config.param_dtype == "float32"
  # Run settings an earlier version wrote into model.json belong to that run: ignored.
  meta = json.loads((tmp_path / "bf16" / "model.json").read_text())
  meta["config"] |= {"dtype": "float32", "param_dtype": "float32", "remat": "full", "attention_impl": "xla"}
  (tmp_path / "bf16" / "model.json").write_text(json.dumps(meta))
  old = load.load_model(tmp_path / "bf16")
  assert (old.config.param_dtype, old.config.remat, old.config.attention_impl) == ("bfloat16", "none", "auto")


def test_loading_onto_a_mesh_splits_every_kernel(saved):
  directory, _ = saved
  mesh = sharding.make_mesh(data=1, fsdp=8, tensor=1)
  model = load.load_model(directory, mesh=mesh)
  kernel = model.model.layers.mlp.down_proj.kernel[...]  # [L, mlp, embed]: embed split 8 ways
  assert tuple(kernel.sharding.spec)[0] is None and tuple(kernel.sharding.spec)[2] == "fsdp"
  assert {s.data.shape for s in kernel.addressable_shards} == {(3, 176, 8)}


def test_a_llama_directory_opened_as_vtimellm_gets_a_new_adapter(saved):
  directory, model = saved
  vtimellm = load.load_model(directory, VTimeLLM, seed=1)
  np.testing.assert_array_equal(np.asarray(vtimellm.lm_head.kernel[...]), np.asarray(model.lm_head.kernel[...]))
  assert vtimellm.mm_projector.kernel[...].shape == (768, 64) and np.abs(vtimellm.mm_projector.kernel[...]).sum() > 0


def test_every_problem_of_a_directory_is_reported_at_once(saved, tmp_path):
  directory, model = saved
  params = load.params_tree(model)
  params["model"]["layers"]["mlp"]["up_proj"]["kernel"] = np.zeros((3, 64, 5), np.float32)
  del params["model"]["norm"]
  params["extra"] = {"kernel": np.zeros((2,), np.float32)}
  model_io.save_model_dir(tmp_path / "bad", "llama", json.loads((directory / "model.json").read_text())["config"],
                          params)
  with pytest.raises(UserError) as e:
    load.load_model(tmp_path / "bad")
  message = str(e.value)
  assert "model/layers/mlp/up_proj/kernel has shape (3, 64, 5), the model's is (3, 64, 176)" in message
  assert "missing model/norm/weight (64,)" in message and "unexpected extra/kernel (2,)" in message


def test_a_directory_with_layers_one_by_one_is_refused_with_how_to_recreate_it(saved, tmp_path):
  directory, _ = saved
  meta = json.loads((directory / "model.json").read_text())
  del meta["format"]
  meta["source"] = "/data/vicuna-7b-v1.5"
  (tmp_path / "old").mkdir()
  (tmp_path / "old" / "model.json").write_text(json.dumps(meta))
  with pytest.raises(UserError, match="stored the decoder's layers one by one") as e:
    load.load_model(tmp_path / "old")
  assert "vtimellm-jax convert llama --src /data/vicuna-7b-v1.5 --out <dir>" in str(e.value)


def test_conversion_table_stacks_and_unstacks_the_same_names():
  name = "model.layers.2.mlp.down_proj.weight"
  path, layer, transform = table.to_ours(name, llama_convert.LLAMA_TABLE)
  assert (path, layer, transform) == ("model/layers/mlp/down_proj/kernel", 2, table.transpose)
  names = table.to_source(path, llama_convert.LLAMA_TABLE, layers=3)
  assert [n for n, _, _ in names] == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(3)]
  assert table.to_ours("model.norm.weight", llama_convert.LLAMA_TABLE)[1] is None
  stacked = np.arange(3 * 4 * 5).reshape(3, 4, 5)
  unstacked = dict(table.unstack(path, stacked, llama_convert.LLAMA_TABLE))
  np.testing.assert_array_equal(unstacked[name], stacked[2].T)
