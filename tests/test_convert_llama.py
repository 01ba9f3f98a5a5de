"""`convert llama`: HF safetensors and sharded .bin directories -> our checkpoint -> HF's logits."""

import json
import pickle

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from hf_reference import hf_llama, random_batch, state_dict_numpy
from vtimellm_jax import cli
from vtimellm_jax.convert import llama as llama_convert
from vtimellm_jax.convert import torch_files
from vtimellm_jax.errors import UserError
from vtimellm_jax.models.load import load_model
from vtimellm_jax.models import llama


@pytest.fixture(scope="module")
def hf_model():
  return hf_llama(llama.tiny(num_kv_heads=2, num_layers=2), seed=4)


def _write_bin_shards(model, directory, n_shards=2):
  """Writes the state dict as `pytorch_model-0000k-of-0000n.bin` shards plus their index."""
  directory.mkdir(parents=True, exist_ok=True)
  names = list(model.state_dict())
  weight_map = {}
  for k in range(n_shards):
    file_name = f"pytorch_model-{k + 1:05d}-of-{n_shards:05d}.bin"
    part = {n: model.state_dict()[n].clone() for n in names[k::n_shards]}
    torch.save(part, directory / file_name)
    weight_map.update({n: file_name for n in part})
  (directory / torch_files.BIN_INDEX).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  model.config.save_pretrained(directory)


def _check_logits(model_dir, hf_model):
  ours = load_model(model_dir)
  ids, mask = random_batch(ours.config.vocab_size, 2, 9, [9, 4])
  with torch.no_grad():
    ref = hf_model(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  got = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
  valid = mask.astype(bool)
  np.testing.assert_allclose(got[valid], ref[valid], rtol=1e-4, atol=1e-4)


def test_sharded_safetensors_round_trip(tmp_path, hf_model):
  src = tmp_path / "hf"
  hf_model.save_pretrained(src, max_shard_size="100KB")
  assert (src / torch_files.SAFETENSORS_INDEX).is_file()
  (src / "tokenizer_config.json").write_text("{}")
  assert cli.main(["convert", "llama", "--src", str(src), "--out", str(tmp_path / "jax"), "--dtype", "float32"]) == 0
  assert (tmp_path / "jax" / "tokenizer_config.json").is_file()
  _check_logits(tmp_path / "jax", hf_model)
  # `export --format hf`, the table's other direction, gives back the original tensors.
  assert cli.main(["export", "--model", str(tmp_path / "jax"), "--format", "hf", "--out", str(tmp_path / "back"),
                   "--dtype", "float32"]) == 0
  back = {name: array for _, name, array in torch_files.iter_checkpoint(tmp_path / "back")}
  original = state_dict_numpy(hf_model)
  assert set(back) == set(original)
  for name, value in original.items():
    np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_sharded_bin_round_trip(tmp_path, hf_model):
  _write_bin_shards(hf_model, tmp_path / "hf")
  llama_convert.convert_llama(tmp_path / "hf", tmp_path / "jax", dtype="float32")
  _check_logits(tmp_path / "jax", hf_model)


def test_bfloat16_conversion_stores_bfloat16(tmp_path, hf_model):
  hf_model.save_pretrained(tmp_path / "hf")
  llama_convert.convert_llama(tmp_path / "hf", tmp_path / "jax", dtype="bfloat16")
  ours = load_model(tmp_path / "jax")
  assert ours.model.layers.mlp.up_proj.kernel[...].dtype == jnp.bfloat16
  ref = hf_model.state_dict()["model.layers.0.mlp.up_proj.weight"].to(torch.bfloat16).float().numpy().T
  np.testing.assert_array_equal(np.asarray(ours.model.layers.mlp.up_proj.kernel[...][0], np.float32), ref)


def test_broken_inputs_report_every_problem(tmp_path, hf_model, capsys):
  src = tmp_path / "hf"
  _write_bin_shards(hf_model, src)
  # One shard: a wrong shape, an unexpected tensor and a dropped tensor.
  shard = src / "pytorch_model-00001-of-00002.bin"
  state = torch.load(shard, weights_only=True)
  state["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
  state["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
  dropped = next(n for n in state if n.endswith("post_attention_layernorm.weight"))
  del state[dropped]
  torch.save(state, shard)
  code = cli.main(["convert", "llama", "--src", str(src), "--out", str(tmp_path / "out")])
  err = capsys.readouterr().err
  assert code == 2
  assert "3 problem(s)" in err
  assert "model.layers.0.mlp.up_proj.weight: shape (3, 3)" in err
  assert "unexpected tensor model.layers.0.self_attn.extra.weight" in err
  assert f"missing tensor {dropped} (for " in err
  assert "Traceback" not in err


def test_missing_shard_and_wrong_architecture(tmp_path, hf_model):
  src = tmp_path / "hf"
  _write_bin_shards(hf_model, src, n_shards=3)
  (src / "pytorch_model-00002-of-00003.bin").unlink()
  with pytest.raises(UserError, match="pytorch_model-00002-of-00003.bin"):
    llama_convert.convert_llama(src, tmp_path / "out")
  config = json.loads((src / "config.json").read_text())
  config.update(model_type="mistral", architectures=["MistralForCausalLM"])
  (src / "config.json").write_text(json.dumps(config))
  with pytest.raises(UserError, match="mistral"):
    llama_convert.convert_llama(src, tmp_path / "out")


class _Payload:
  def __reduce__(self):
    return (print, ("this must never run",))


def test_pickles_that_need_code_are_refused(tmp_path):
  path = tmp_path / "pytorch_model.bin"
  with open(path, "wb") as f:
    pickle.dump({"model.norm.weight": _Payload()}, f)
  with pytest.raises(UserError, match="never executed"):
    torch_files.load_weight_file(path)
