"""`convert chatglm`, `convert release` and `export` for ChatGLM3, against torch models with the same weights.

The ChatGLM3 files are written here from a tiny HF `GlmForCausalLM` with random weights: in
ChatGLM3's original names (renamed and q/k/v fused by this file's own table, config.json in
ChatGLM's fields) as sharded `.bin` and as safetensors, and in HF's layout. The release's ChatGLM
set (mm_projector.bin, stage-2 and stage-3 peft folders) is made with peft on the HF Glm rewired to
one fused `query_key_value` Linear per layer, as the release's ChatGLM has; its saved keys and
target_modules are renamed to the release's names. The reference merges the stages with peft as the
release's loader does. A folder with `multi_query_attention: false` holds query_key_value per head,
as ChatGLM's modeling code reads it then (tests/release_env/check_chatglm_export.py checks that
layout against the release's own code).
"""

import json
import re
import shutil

import jax.numpy as jnp
import numpy as np
import peft
import pytest
import safetensors.torch
import torch
import transformers

from hf_reference import fuse_glm_qkv, hf_glm, hf_greedy, random_batch, rel_err
from vtimellm_jax import cli, model_io
from vtimellm_jax.convert import chatglm as chatglm_convert
from vtimellm_jax.convert import release as release_convert
from vtimellm_jax.errors import UserError
from vtimellm_jax.inference import generate as gen
from vtimellm_jax.models import chatglm
from vtimellm_jax.models.load import load_model
from vtimellm_jax.models.vtimellm import VIDEO_TOKEN_INDEX
from vtimellm_jax.training import export as training_export

CONFIG = chatglm.tiny(vocab_size=128, num_layers=2)
FRAMES = 4
# HF Glm / rewired module names -> ChatGLM3's (models/chatglm.py's table), the q/k/v fusion aside.
RENAMES = (
    (r"model\.embed_tokens\.", "transformer.embedding.word_embeddings."),
    (r"model\.norm\.", "transformer.encoder.final_layernorm."),
    (r"lm_head\.", "transformer.output_layer."),
    (r"model\.layers\.(\d+)\.self_attn\.query_key_value\.",
     r"transformer.encoder.layers.\1.self_attention.query_key_value."),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.", r"transformer.encoder.layers.\1.self_attention.dense."),
    (r"model\.layers\.(\d+)\.mlp\.gate_up_proj\.", r"transformer.encoder.layers.\1.mlp.dense_h_to_4h."),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.", r"transformer.encoder.layers.\1.mlp.dense_4h_to_h."),
    (r"model\.layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.", r"transformer.encoder.layers.\1.\2."),
)
RELEASE_TARGETS = {"query_key_value": "query_key_value", "o_proj": "dense", "gate_up_proj": "dense_h_to_4h",
                   "down_proj": "dense_4h_to_h", "lm_head": "output_layer"}


def _rename(name: str) -> str:
  for pattern, repl in RENAMES:
    name, count = re.subn("^" + pattern, repl, name, count=1)
    if count:
      return name
  raise KeyError(name)


def original_state(hf, config=CONFIG, per_head: bool = False) -> dict[str, torch.Tensor]:
  """Returns the HF Glm model's weights in ChatGLM3's names: q/k/v fused into query_key_value, plus the rope buffer.

  query_key_value is [q | k | v], or with `per_head` (ChatGLM without multi-query attention, one
  key/value head per head) each head's q, k and v rows side by side, as ChatGLM's modeling code
  splits them then: [q_0 k_0 v_0 | q_1 k_1 v_1 | ...].
  """
  sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
  out = {}
  for i in range(config.num_layers):
    for kind in ("weight", "bias"):
      parts = [sd.pop(f"model.layers.{i}.self_attn.{p}_proj.{kind}") for p in "qkv"]
      if per_head:  # [N * H, ...] each -> [N, 3, H, ...] -> rows
        fused = torch.stack([p.reshape(config.num_heads, config.head_size, *p.shape[1:]) for p in parts], dim=1)
        fused = fused.reshape(-1, *parts[0].shape[1:])
      else:
        fused = torch.cat(parts)
      out[f"transformer.encoder.layers.{i}.self_attention.query_key_value.{kind}"] = fused
  out.update({_rename(k): v for k, v in sd.items()})
  half = config.head_size // 2
  out["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, half, 2).float() / half))
  return out


def original_config(config=CONFIG, multi_query: bool = True) -> dict:
  """Returns ChatGLM3's config.json (its configuration_chatglm.py fields) of `config`."""
  return {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "num_layers": config.num_layers,
          "padded_vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
          "ffn_hidden_size": config.intermediate_size, "kv_channels": config.head_size,
          "num_attention_heads": config.num_heads, "multi_query_attention": multi_query,
          "multi_query_group_num": config.num_kv_heads, "seq_length": config.max_position_embeddings,
          "layernorm_epsilon": config.rms_norm_eps, "rmsnorm": True, "add_qkv_bias": True, "add_bias_linear": False,
          "post_layer_norm": True, "apply_residual_connection_post_layernorm": False, "original_rope": True,
          "torch_dtype": "float32", "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"}}


def write_original(state: dict, directory, fmt: str, shards: int = 2, config_json: dict | None = None):
  """Writes `state` as a ChatGLM3 directory: .bin shards + index, or one model.safetensors; tokenizer files too."""
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "config.json").write_text(json.dumps(config_json or original_config()))
  for name in ("tokenizer.model", "tokenizer_config.json", "tokenization_chatglm.py", "modeling_chatglm.py"):
    (directory / name).write_text(f"stand-in {name}\n")
  if fmt == "safetensors":
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, directory / "model.safetensors")
    return directory
  names, weight_map = list(state), {}
  for k in range(shards):
    file_name = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
    torch.save({n: state[n] for n in names[k::shards]}, directory / file_name)
    weight_map.update({n: file_name for n in names[k::shards]})
  (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
  return directory


def _convert(src, out, *extra) -> None:
  assert cli.main(["convert", "chatglm", "--src", str(src), "--out", str(out), "--dtype", "float32", *extra]) == 0


def _check_logits(model_dir, hf, config=CONFIG) -> None:
  ours = load_model(model_dir)
  ids, mask = random_batch(config.vocab_size, 3, 12, [12, 9, 4])
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  assert rel_err(ours(jnp.asarray(ids), jnp.asarray(mask)), ref, mask.astype(bool)) < 1e-4


@pytest.fixture(scope="module")
def hf():
  return hf_glm(CONFIG, seed=2)


@pytest.fixture(scope="module")
def converted(hf, tmp_path_factory):
  root = tmp_path_factory.mktemp("chatglm")
  write_original(original_state(hf), root / "bin", "bin")
  _convert(root / "bin", root / "ours")
  return root / "ours"


def test_original_bin_shards_convert_to_the_same_logits(hf, converted):
  meta = model_io.read_model_json(converted)
  assert meta["kind"] == "llama" and meta["layout"] == "original" and meta[chatglm_convert.QKV_REGROUPED] is False
  assert meta["config"]["fused_projections"] and meta["config"]["num_kv_heads"] == 2
  # The tokenizer's data files come along, never the folder's Python code.
  assert (converted / "tokenizer.model").is_file() and (converted / "tokenizer_config.json").is_file()
  assert not list(converted.glob("*.py"))
  _check_logits(converted, hf)


def test_original_safetensors_and_hf_layout_convert(hf, tmp_path):
  write_original(original_state(hf), tmp_path / "st", "safetensors")
  _convert(tmp_path / "st", tmp_path / "from_st")
  _check_logits(tmp_path / "from_st", hf)
  hf.save_pretrained(tmp_path / "hf")
  _convert(tmp_path / "hf", tmp_path / "from_hf")
  assert model_io.read_model_json(tmp_path / "from_hf")["layout"] == "hf"
  _check_logits(tmp_path / "from_hf", hf)


def test_export_round_trips_in_both_layouts(hf, converted, tmp_path):
  # ours -> original names: the same tensors under the same names -> ours again, equal.
  assert cli.main(["export", "--model", str(converted), "--format", "chatglm", "--out", str(tmp_path / "glm")]) == 0
  exported = safetensors.torch.load_file(tmp_path / "glm" / "model.safetensors")
  reference = original_state(hf)
  assert set(exported) == set(reference)
  for name, value in reference.items():
    torch.testing.assert_close(exported[name], value, rtol=1e-6, atol=1e-7, msg=name)
  assert json.loads((tmp_path / "glm" / "config.json").read_text())["multi_query_group_num"] == 2
  _convert(tmp_path / "glm", tmp_path / "again")
  first, again = (model_io.flatten(model_io.load_params(p)) for p in (converted, tmp_path / "again"))
  assert set(first) == set(again)
  for path in first:
    np.testing.assert_array_equal(np.asarray(first[path]), np.asarray(again[path]), err_msg=path)
  # ours -> HF Glm: transformers loads it and gives the same logits.
  assert cli.main(["export", "--model", str(converted), "--format", "hf", "--out", str(tmp_path / "hf")]) == 0
  loaded = transformers.GlmForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
  ids, mask = random_batch(CONFIG.vocab_size, 2, 10, [10, 6])
  with torch.no_grad():
    ref = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
    got = loaded(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits
  torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


PER_HEAD = chatglm.tiny(vocab_size=128, num_layers=2, num_kv_heads=4)  # every head its own key/value head


def test_per_head_query_key_value_converts_regroups_and_exports_as_multi_query(tmp_path):
  # ChatGLM's config without multi-query attention: its modeling code reads query_key_value per head.
  hf = hf_glm(PER_HEAD, seed=3)
  config_json = original_config(PER_HEAD, multi_query=False)
  write_original(original_state(hf, PER_HEAD, per_head=True), tmp_path / "glm", "safetensors", config_json=config_json)
  _convert(tmp_path / "glm", tmp_path / "ours")
  assert model_io.read_model_json(tmp_path / "ours")["config"]["num_kv_heads"] == 4
  _check_logits(tmp_path / "ours", hf, PER_HEAD)
  # The export says multi-query with one group per head, which reads [q | k | v]: the same weights come back.
  assert cli.main(["export", "--model", str(tmp_path / "ours"), "--format", "chatglm", "--out",
                   str(tmp_path / "chatglm-out")]) == 0
  exported = json.loads((tmp_path / "chatglm-out" / "config.json").read_text())
  assert exported["multi_query_attention"] is True and exported["multi_query_group_num"] == 4
  assert exported[chatglm_convert.QKV_REGROUPED] is True  # the regrouping travels with the export
  written = safetensors.torch.load_file(tmp_path / "chatglm-out" / "model.safetensors")
  for name, value in original_state(hf, PER_HEAD).items():
    torch.testing.assert_close(written[name], value, rtol=0, atol=0, msg=name)
  _convert(tmp_path / "chatglm-out", tmp_path / "again")
  _check_logits(tmp_path / "again", hf, PER_HEAD)
  assert model_io.read_model_json(tmp_path / "again")[chatglm_convert.QKV_REGROUPED] is True


def test_release_refuses_a_per_head_base_as_a_folder_or_converted(tmp_path, capsys):
  # The release's LoRA folders of such a model would change query_key_value's rows per head too.
  hf = hf_glm(PER_HEAD, seed=3)
  base = write_original(original_state(hf, PER_HEAD, per_head=True), tmp_path / "glm", "safetensors",
                        config_json={**original_config(PER_HEAD), "multi_query_attention": False})
  torch.save({"transformer.mm_projector.weight": torch.zeros(PER_HEAD.hidden_size, 768),
              "transformer.mm_projector.bias": torch.zeros(PER_HEAD.hidden_size)}, tmp_path / "mm_projector.bin")
  with pytest.raises(UserError, match=r"glm/config\.json: multi_query_attention is False, so query_key_value holds "
                                      r"q, k and v per head"):
    release_convert.convert_release(base, tmp_path / "mm_projector.bin", tmp_path / "out", dtype="float32")
  # Converted first, the same model is refused too: its model.json records the regrouping.
  _convert(base, tmp_path / "ours")
  assert model_io.read_model_json(tmp_path / "ours")[chatglm_convert.QKV_REGROUPED] is True
  assert cli.main(["convert", "release", "--base", str(tmp_path / "ours"), "--projector",
                   str(tmp_path / "mm_projector.bin"), "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert f"--base {tmp_path / 'ours' / 'model.json'}: qkv_regrouped_from_per_head is true" in err
  assert "multi_query_attention: true" in err and "Traceback" not in err
  assert not (tmp_path / "out").exists()
  # Exported in ChatGLM3's names, and a run trained from it, carry the record and are refused as well.
  assert cli.main(["export", "--model", str(tmp_path / "ours"), "--format", "chatglm", "--out",
                   str(tmp_path / "exported")]) == 0
  with pytest.raises(UserError, match=r"exported/config\.json: qkv_regrouped_from_per_head is true"):
    release_convert.convert_release(tmp_path / "exported", tmp_path / "mm_projector.bin", tmp_path / "out",
                                    dtype="float32")
  assert training_export._carried_records(str(tmp_path / "ours")) == {chatglm_convert.QKV_REGROUPED: True}


# --- the release's ChatGLM set ---------------------------------------------------------------------


def fused_glm(seed: int = 2):
  """Returns the HF Glm model rewired as ChatGLM: one `query_key_value` Linear per layer."""
  hf = hf_glm(CONFIG, seed=seed)
  fuse_glm_qkv(hf, CONFIG)
  return hf


def _peft_stage(model, folder, rank: int, alpha: float, seed: int, fmt: str):
  """Returns the peft model with random LoRA on the release's targets, saved to `folder` in the release's names."""
  model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, task_type="CAUSAL_LM",
                                                     target_modules=list(RELEASE_TARGETS)))
  gen_ = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(0.1 * torch.randn(p.shape, generator=gen_))
  tmp = folder.with_name(folder.name + "_hf")
  model.save_pretrained(tmp, safe_serialization=fmt == "safetensors")
  folder.mkdir()
  weights = next(tmp.glob("adapter_model.*"))
  state = (safetensors.torch.load_file(weights) if weights.suffix == ".safetensors"
           else torch.load(weights, weights_only=True))
  prefix = "base_model.model."
  renamed = {prefix + _rename(k[len(prefix):]): v for k, v in state.items()}
  if fmt == "safetensors":
    safetensors.torch.save_file(renamed, folder / weights.name)
  else:
    torch.save(renamed, folder / weights.name)
  config = json.loads((tmp / "adapter_config.json").read_text())
  config["target_modules"] = sorted(RELEASE_TARGETS[t] for t in config["target_modules"])
  (folder / "adapter_config.json").write_text(json.dumps(config))
  return model


@pytest.fixture(scope="module")
def release(tmp_path_factory):
  root = tmp_path_factory.mktemp("glm_release")
  base = write_original(original_state(hf_glm(CONFIG, seed=2)), root / "chatglm3-6b", "bin")
  torch.manual_seed(5)
  projector = torch.nn.Linear(768, CONFIG.hidden_size)
  (root / "stage1").mkdir()
  torch.save({"transformer.mm_projector.weight": projector.weight.detach().clone(),
              "transformer.mm_projector.bias": projector.bias.detach().clone()}, root / "stage1" / "mm_projector.bin")
  stage2 = _peft_stage(fused_glm(), root / "stage2", rank=4, alpha=8, seed=6, fmt="bin").merge_and_unload()
  torch.save({}, root / "stage2" / "non_lora_trainables.bin")
  reference = _peft_stage(stage2, root / "stage3", rank=8, alpha=16, seed=7, fmt="safetensors").merge_and_unload()
  # The release strips `base_model.` only, so ChatGLM's saved projector key never matches its model: ignored.
  torch.save({"base_model.model.transformer.mm_projector.bias": torch.ones(CONFIG.hidden_size)},
             root / "stage3" / "non_lora_trainables.bin")
  return root, base, reference.eval(), projector


def _convert_release(root, base, out, *extra):
  argv = ["convert", "release", "--base", base, "--projector", root / "stage1" / "mm_projector.bin",
          "--stage2", root / "stage2", "--stage3", root / "stage3", "--out", out, "--dtype", "float32", *extra]
  assert cli.main([str(a) for a in argv]) == 0


def _video_prompts():
  """Returns ids int[3, 8] (`<video>` at a different place in each row) and features float[3, FRAMES, 768]."""
  rng = np.random.RandomState(3)
  ids = rng.randint(3, CONFIG.vocab_size, (3, 8))
  ids[0, 2] = ids[1, 6] = ids[2, 0] = VIDEO_TOKEN_INDEX
  return ids, rng.normal(size=(3, FRAMES, 768)).astype(np.float32)


def _torch_greedy(model, projector, ids, feats, steps):
  """The release's generation: projected frames spliced at `<video>` into the text embeddings, greedy."""
  ids = torch.tensor(ids)
  p = int((ids == VIDEO_TOKEN_INDEX).nonzero())
  embed = model.get_input_embeddings()
  with torch.no_grad():
    embeds = torch.cat([embed(ids[:p]), projector(torch.tensor(feats)), embed(ids[p + 1:])])[None]
    out = model.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                         max_new_tokens=steps, do_sample=False, eos_token_id=-1, pad_token_id=0)
  return out[0].tolist()


GREEDY = gen.GenerationConfig(max_new_tokens=6, temperature=0, eos_id=-1)


@pytest.mark.parametrize("keep_lora", [False, True])
def test_release_set_generates_as_the_torch_model(release, tmp_path, capsys, keep_lora):
  root, base, reference, projector = release
  _convert_release(root, base, tmp_path / "model", *(["--keep-lora"] if keep_lora else []))
  assert "transformer.mm_projector.bias is not a weight of the model; ignored" in capsys.readouterr().out
  meta = model_io.read_model_json(tmp_path / "model")
  assert meta["kind"] == "vtimellm"
  if keep_lora:
    assert meta["lora"] == {"rank": 8, "alpha": 16.0, "targets": sorted(chatglm.LORA_TARGETS)}
  model = load_model(tmp_path / "model")
  # With video: the three rows in one batch (one compiled program), each equal to torch's greedy.
  ids, feats = _video_prompts()
  embeds, mask, _ = model.embed_inputs(jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32), jnp.asarray(feats))
  rows = gen.generate(model, embeds, mask.sum(-1), GREEDY).rows()
  assert rows == [_torch_greedy(reference, projector, i, f, 6) for i, f in zip(ids, feats)]
  # Text only, right-padded batch of two lengths.
  rng = np.random.RandomState(4)
  prompts = [rng.randint(3, CONFIG.vocab_size, n).tolist() for n in (3, 8)]
  expected = [hf_greedy(reference, p, 6, eos_id=-1) for p in prompts]
  assert gen.generate_from_ids(model, prompts, GREEDY).rows() == expected


@pytest.mark.parametrize("base_kind", ["hf", "converted"])
def test_release_on_an_hf_glm_or_converted_base(release, converted, tmp_path, base_kind):
  root, _, reference, _ = release
  if base_kind == "hf":
    hf_glm(CONFIG, seed=2).save_pretrained(tmp_path / "glm-hf")
  base = tmp_path / "glm-hf" if base_kind == "hf" else converted  # the same weights as the original-names base
  _convert_release(root, base, tmp_path / "model")
  ids, mask = random_batch(CONFIG.vocab_size, 2, 9, [9, 5])
  with torch.no_grad():
    ref = reference(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  model = load_model(tmp_path / "model")
  logits = model.lm_head(model.model(model.model.embed(jnp.asarray(ids)), jnp.broadcast_to(jnp.arange(9), (2, 9)),
                                     jnp.asarray(mask.sum(-1), jnp.int32))[0])
  assert rel_err(logits, ref, mask.astype(bool)) < 1e-4


def test_export_release_writes_the_release_names(release, tmp_path):
  root, base, _, projector = release
  _convert_release(root, base, tmp_path / "kept", "--keep-lora")
  out = tmp_path / "torch"
  assert cli.main(["export", "--model", str(tmp_path / "kept"), "--format", "release", "--out", str(out),
                   "--with-base", "--dtype", "float32"]) == 0
  saved = torch.load(out / "mm_projector.bin", weights_only=True)
  assert set(saved) == {"transformer.mm_projector.weight", "transformer.mm_projector.bias"}
  torch.testing.assert_close(saved["transformer.mm_projector.weight"], projector.weight.detach())
  config = json.loads((out / "lora" / "adapter_config.json").read_text())
  assert sorted(config["target_modules"]) == sorted(RELEASE_TARGETS.values()) and config["r"] == 8
  # The stage-3 folder's LoRA comes back: the same keys in the release's names, the same factors. (Its
  # output_layer.base_layer.weight, which newer peft saves beside LoRA on an output layer, is not LoRA.)
  theirs = safetensors.torch.load_file(root / "stage3" / "adapter_model.safetensors")
  theirs = {k: v for k, v in theirs.items() if "lora_" in k}
  ours = torch.load(out / "lora" / "adapter_model.bin", weights_only=True)
  assert set(ours) == set(theirs)
  for key, value in theirs.items():
    torch.testing.assert_close(ours[key], value, msg=key)
  # The base (stage 2 merged) in ChatGLM3's names, where the release's loader looks for a ChatGLM base.
  assert json.loads((out / "chatglm3-base" / "config.json").read_text())["model_type"] == "chatglm"
  _convert(out / "chatglm3-base", tmp_path / "base_again")


# --- broken inputs -----------------------------------------------------------------------------------


def test_broken_checkpoints_name_the_tensor_and_file(hf, tmp_path, capsys):
  state = original_state(hf)
  del state["transformer.encoder.layers.1.post_attention_layernorm.weight"]
  state["transformer.encoder.layers.0.mlp.dense_4h_to_h.weight"] = torch.zeros(3, 3)
  state["transformer.encoder.layers.0.extra.weight"] = torch.zeros(2)
  write_original(state, tmp_path / "bad", "bin")
  assert cli.main(["convert", "chatglm", "--src", str(tmp_path / "bad"), "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert "3 problem(s)" in err and "Traceback" not in err
  assert "missing tensor transformer.encoder.layers.1.post_attention_layernorm.weight" in err
  assert "transformer.encoder.layers.0.mlp.dense_4h_to_h.weight: shape (3, 3)" in err
  assert re.search(r"unexpected tensor transformer\.encoder\.layers\.0\.extra\.weight \(in pytorch_model-0000\d", err)


def test_hf_layout_missing_or_misshaped_qkv_part_is_named(hf, tmp_path):
  hf.save_pretrained(tmp_path / "hf")
  state = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
  del state["model.layers.1.self_attn.k_proj.weight"]
  state["model.layers.0.self_attn.v_proj.bias"] = torch.zeros(5)
  safetensors.torch.save_file(state, tmp_path / "hf" / "model.safetensors")
  with pytest.raises(UserError) as info:
    chatglm_convert.convert_chatglm(tmp_path / "hf", tmp_path / "out")
  message = str(info.value)
  assert "missing tensor model.layers.1.self_attn.k_proj.weight (have q_proj in model.safetensors" in message
  assert "model.layers.0.self_attn.v_proj.bias (in model.safetensors): shape (5,), expected (32,)" in message


def test_unknown_layout_and_unsupported_config_are_refused(hf, tmp_path):
  src = write_original(original_state(hf), tmp_path / "glm", "safetensors")
  config = json.loads((src / "config.json").read_text())
  (src / "config.json").write_text(json.dumps({**config, "model_type": "bert"}))
  with pytest.raises(UserError, match=r"config\.json: model_type 'bert' is not a ChatGLM3 checkpoint"):
    chatglm_convert.convert_chatglm(src, tmp_path / "out")
  (src / "config.json").write_text(json.dumps({**config, "rope_ratio": 50}))
  with pytest.raises(UserError, match="rope_ratio=50"):
    chatglm_convert.convert_chatglm(src, tmp_path / "out")
  shutil.rmtree(src)
  with pytest.raises(UserError, match="config.json not found"):
    chatglm_convert.convert_chatglm(src, tmp_path / "out")


def test_export_chatglm_format_refuses_a_llama_model(tmp_path, capsys):
  from flax import nnx

  from vtimellm_jax.models import llama, load
  from vtimellm_jax.models.llama import LlamaForCausalLM

  load.save_model(LlamaForCausalLM(llama.tiny(num_layers=1), nnx.Rngs(0)), tmp_path / "llama")
  argv = ["export", "--model", str(tmp_path / "llama"), "--format", "chatglm", "--out", str(tmp_path / "o")]
  assert cli.main(argv) == 2
  assert "--format chatglm writes ChatGLM3's names; this is a LLaMA model" in capsys.readouterr().err
