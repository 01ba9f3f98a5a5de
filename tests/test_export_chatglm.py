"""`export --format chatglm` (and the release format's `chatglm3-base/`): what the release's ChatGLM code reads.

config.json carries every field of THUDM's ChatGLM3-6B config.json (`use_cache` among them, which
ChatGLM's forward reads from the config), with this model's values. The tokenizer's remote code
(tokenization_chatglm.py) and the files config.json's `auto_map` names are the user's own: the
export copies them from the ChatGLM3 folder the model was converted from, as its model.json
records it, and names the files to copy, and from where, when it cannot. The remote code here is
stand-in text; tests/release_env/check_chatglm_export.py loads a real export in the release's code.
"""

import json
import shutil

import pytest
import torch
from flax import nnx

from vtimellm_jax import cli, model_io
from vtimellm_jax.convert import chatglm as chatglm_convert
from vtimellm_jax.models import chatglm, load
from vtimellm_jax.models.llama import LlamaForCausalLM

CONFIG = chatglm.tiny(vocab_size=128, num_layers=1)
# The keys of THUDM's chatglm3-6b config.json, less `_name_or_path` and `transformers_version`
# (what transformers' save_pretrained says about itself).
THUDM_FIELDS = (
    "model_type", "architectures", "auto_map", "add_bias_linear", "add_qkv_bias", "apply_query_key_layer_scaling",
    "apply_residual_connection_post_layernorm", "attention_dropout", "attention_softmax_in_fp32",
    "bias_dropout_fusion", "ffn_hidden_size", "fp32_residual_connection", "hidden_dropout", "hidden_size",
    "kv_channels", "layernorm_epsilon", "multi_query_attention", "multi_query_group_num", "num_attention_heads",
    "num_layers", "original_rope", "padded_vocab_size", "post_layer_norm", "rmsnorm", "seq_length", "use_cache",
    "torch_dtype", "tie_word_embeddings", "eos_token_id", "pad_token_id",
)
# The remote code a ChatGLM3 folder holds; modeling_chatglm.py imports quantization.py inside a method.
REMOTE_CODE = {
    "tokenization_chatglm.py": "# stand-in tokenizer code\n",
    "configuration_chatglm.py": "# stand-in config code\n",
    "modeling_chatglm.py": "# stand-in model code\ndef quantize(model):\n    from .quantization import quantize\n",
    "quantization.py": "# stand-in quantization code\n",
}
TOKENIZER_CONFIG = {"tokenizer_class": "ChatGLMTokenizer",
                    "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}}


def _export(model, out, fmt: str = "chatglm", *extra) -> None:
  assert cli.main(["export", "--model", str(model), "--format", fmt, "--out", str(out), "--dtype", "float32",
                   *extra]) == 0


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  """Returns (a model directory with no recorded source, a ChatGLM3 folder of the same weights with remote code)."""
  root = tmp_path_factory.mktemp("glm_export")
  load.save_model(LlamaForCausalLM(CONFIG, nnx.Rngs(0)), root / "random")
  _export(root / "random", root / "chatglm3-6b")
  for name, text in REMOTE_CODE.items():
    (root / "chatglm3-6b" / name).write_text(text)
  (root / "chatglm3-6b" / "helper.py").write_text("# named by nothing: stays behind\n")
  (root / "chatglm3-6b" / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
  return root / "random", root / "chatglm3-6b"


def test_config_json_has_every_field_of_thudms_with_the_models_values(folders, tmp_path):
  random, _ = folders
  _export(random, tmp_path / "glm")
  written = json.loads((tmp_path / "glm" / "config.json").read_text())
  assert set(THUDM_FIELDS) <= set(written), sorted(set(THUDM_FIELDS) - set(written))
  assert written["use_cache"] is True and written["model_type"] == "chatglm"
  assert {key: written[key] for key in ("num_layers", "padded_vocab_size", "hidden_size", "ffn_hidden_size",
                                        "kv_channels", "num_attention_heads", "multi_query_attention",
                                        "multi_query_group_num", "seq_length", "layernorm_epsilon", "add_qkv_bias",
                                        "torch_dtype", "pre_seq_len", "quantization_bit")} == {
      "num_layers": 1, "padded_vocab_size": 128, "hidden_size": 64, "ffn_hidden_size": 96, "kv_channels": 16,
      "num_attention_heads": 4, "multi_query_attention": True, "multi_query_group_num": 2, "seq_length": 2048,
      "layernorm_epsilon": 1e-5, "add_qkv_bias": True, "torch_dtype": "float32", "pre_seq_len": None,
      "quantization_bit": 0}
  assert written["auto_map"]["AutoModel"] == "modeling_chatglm.ChatGLMForConditionalGeneration"
  # Read back, the same architecture.
  config, layout = chatglm_convert.read_config(tmp_path / "glm")
  assert layout == "original" and config.architecture() == CONFIG.architecture()


def test_remote_code_comes_from_the_folder_the_model_was_converted_from(folders, tmp_path, capsys):
  _, source = folders
  assert cli.main(["convert", "chatglm", "--src", str(source), "--out", str(tmp_path / "ours")]) == 0
  assert not list((tmp_path / "ours").glob("*.py"))  # the model directory holds no code
  capsys.readouterr()
  _export(tmp_path / "ours", tmp_path / "glm")
  out = capsys.readouterr().out
  assert f"ChatGLM3's remote code copied from {source}" in out and "copy " not in out
  for name, text in REMOTE_CODE.items():
    assert (tmp_path / "glm" / name).read_text() == text, name
  assert not (tmp_path / "glm" / "helper.py").exists()
  assert json.loads((tmp_path / "glm" / "tokenizer_config.json").read_text()) == TOKENIZER_CONFIG


@pytest.mark.slow  # a conversion and an export end to end (CI's second run)
def test_release_base_gets_the_remote_code_through_a_converted_base(folders, tmp_path):
  # convert release records its --base, here a `convert chatglm` output, which records the ChatGLM3 folder.
  _, source = folders
  assert cli.main(["convert", "chatglm", "--src", str(source), "--out", str(tmp_path / "ours")]) == 0
  torch.save({"transformer.mm_projector.weight": torch.zeros(CONFIG.hidden_size, 768),
              "transformer.mm_projector.bias": torch.zeros(CONFIG.hidden_size)}, tmp_path / "mm_projector.bin")
  assert cli.main(["convert", "release", "--base", str(tmp_path / "ours"), "--projector",
                   str(tmp_path / "mm_projector.bin"), "--out", str(tmp_path / "vtimellm")]) == 0
  assert chatglm_convert.code_source(tmp_path / "vtimellm") == source.absolute()
  _export(tmp_path / "vtimellm", tmp_path / "release", "release", "--with-base")
  for name, text in REMOTE_CODE.items():
    assert (tmp_path / "release" / "chatglm3-base" / name).read_text() == text, name


@pytest.mark.slow  # a conversion and an export end to end (CI's second run)
def test_a_runs_export_finds_the_folder_through_the_runs_base(folders, tmp_path, capsys):
  # A run's model directory records its workdir; the run's base records the ChatGLM3 folder.
  random, source = folders
  assert cli.main(["convert", "chatglm", "--src", str(source), "--out", str(tmp_path / "ours")]) == 0
  (tmp_path / "run").mkdir()
  (tmp_path / "run" / "run.json").write_text(json.dumps({"family": "chatglm3", "size": "tiny",
                                                         "model": {"base": str(tmp_path / "ours")}}))
  load.save_model(load.load_model(random), tmp_path / "trained", source_workdir=str(tmp_path / "run"), stage=2)
  capsys.readouterr()
  _export(tmp_path / "trained", tmp_path / "glm")
  assert f"ChatGLM3's remote code copied from {source}" in capsys.readouterr().out
  assert {p.name for p in (tmp_path / "glm").glob("*.py")} == set(REMOTE_CODE)


def test_missing_remote_code_is_named_with_where_to_copy_it_from(folders, tmp_path, capsys):
  random, source = folders
  # Not recorded: a model directory with no source. The export is written all the same.
  _export(random, tmp_path / "unknown")
  out = capsys.readouterr().out
  assert (tmp_path / "unknown" / "model.safetensors").is_file() and not list((tmp_path / "unknown").glob("*.py"))
  assert (f"{tmp_path / 'unknown'}: copy tokenization_chatglm.py, configuration_chatglm.py, modeling_chatglm.py "
          "into it from your ChatGLM3-6B folder (THUDM's chatglm3-6b): the ChatGLM3 folder this model's LLM came "
          "from is not recorded") in out
  # Recorded, but the folder lacks one file: that one is named, with the folder; the rest are copied.
  partial = tmp_path / "partial-chatglm3"
  assert cli.main(["convert", "chatglm", "--src", str(source), "--out", str(tmp_path / "ours")]) == 0
  meta = model_io.read_model_json(tmp_path / "ours")
  shutil.copytree(source, partial)
  (partial / "modeling_chatglm.py").unlink()
  (tmp_path / "ours" / model_io.MODEL_JSON).write_text(json.dumps({**meta, "source": str(partial)}))
  capsys.readouterr()
  _export(tmp_path / "ours", tmp_path / "glm")
  out = capsys.readouterr().out
  assert (f"{tmp_path / 'glm'}: copy modeling_chatglm.py into it from your ChatGLM3-6B folder (THUDM's "
          f"chatglm3-6b): they are not in {partial}, the folder this model's LLM came from") in out
  assert {p.name for p in (tmp_path / "glm").glob("*.py")} == {"tokenization_chatglm.py", "configuration_chatglm.py"}
