"""`convert release` and `export --format release|hf` against PyTorch doing what the release does.

Release-format files are made here with torch, transformers and peft (tiny random models): an HF
LLaMA directory, `mm_projector.bin`, a stage-2 peft folder (.bin, rsLoRA) and a stage-3 one
(.safetensors, other rank) with a `non_lora_trainables.bin` that retrains the projector bias. The
reference follows the release's loader: LLaMA + projector, per stage the non-LoRA weights loaded
non-strictly, peft `from_pretrained` and `merge_and_unload`, then the projected features spliced
into `inputs_embeds` where `<video>` stood.
"""

import dataclasses
import fractions
import json
import pathlib
import random
import shutil

import numpy as np
import peft
import pytest
import torch

from hf_reference import hf_llama
from inference_fixtures import SYSTEM, TinyVTimeLLM
from vtimellm_jax import cli, model_io
from vtimellm_jax.models.llama import LlamaConfig
from vtimellm_jax.models import llama
from vtimellm_jax.models.load import load_model
from vtimellm_jax.models.vtimellm import VIDEO_TOKEN_INDEX

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FRAMES = 5


def _corpus(seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  words = "the a man dog is counting money walks into pool from to during which frames describe video".split()
  return [SYSTEM, "USER: ASSISTANT: </s>"] + [" ".join(rng.choice(words) for _ in range(8)) for _ in range(150)]


def _randomize_lora(model: torch.nn.Module, seed: int) -> None:
  """Gives every LoRA factor random values (peft starts B at zero, which would hide a wrong merge)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_" in name:
        p.copy_(0.2 * torch.randn(p.shape, generator=gen))


def _load_non_lora(model: torch.nn.Module, folder: pathlib.Path) -> None:
  """The release's stage loading, step 1: non-LoRA weights over the model, non-strictly."""
  state = torch.load(folder / "non_lora_trainables.bin", weights_only=True)
  state = {k.removeprefix("base_model."): v for k, v in state.items()}
  if any(k.startswith("model.model.") for k in state):
    state = {k.removeprefix("model."): v for k, v in state.items()}
  model.load_state_dict(state, strict=False)


def _merge_stage(model, folder):
  """The release's stage loading: non-LoRA weights, then peft LoRA loaded and merged."""
  _load_non_lora(model, folder)
  return peft.PeftModel.from_pretrained(model, str(folder)).merge_and_unload()


@dataclasses.dataclass
class Release:
  root: pathlib.Path
  base: pathlib.Path
  projector: pathlib.Path
  stage2: pathlib.Path
  stage3: pathlib.Path
  config: LlamaConfig
  reference: torch.nn.Module  # HF LLaMA with model.mm_projector, both stages merged
  stage2_merged: torch.nn.Module  # the same after stage 2 only
  sp: object


def _with_projector(hf, projector_state):
  hf.model.mm_projector = torch.nn.Linear(768, hf.config.hidden_size)
  hf.model.mm_projector.load_state_dict(projector_state)
  return hf


@pytest.fixture(scope="module")
def release(tmp_path_factory) -> Release:
  import sentencepiece
  from vtimellm_jax.data import tokenizer as tokenizer_lib

  root = tmp_path_factory.mktemp("release")
  base = root / "vicuna"
  tokenizer_lib.train_tokenizer(_corpus(), base, vocab_size=300)
  sp = sentencepiece.SentencePieceProcessor(model_file=str(base / "tokenizer.model"))
  config = llama.tiny(vocab_size=sp.get_piece_size(), num_kv_heads=2, hidden_size=32, intermediate_size=80,
                            num_heads=4)
  hf = hf_llama(config, seed=1)
  hf.save_pretrained(base)
  torch.manual_seed(2)
  proj = torch.nn.Linear(768, config.hidden_size)
  projector = root / "stage1" / "mm_projector.bin"
  projector.parent.mkdir()
  torch.save({"model.mm_projector.weight": proj.weight.detach().clone(),
              "model.mm_projector.bias": proj.bias.detach().clone()}, projector)

  # Stage 2: LoRA on the base, saved as .bin, rsLoRA scaling; an empty non_lora_trainables.bin.
  stage2 = root / "stage2"
  model = peft.get_peft_model(hf_llama(config, seed=1), peft.LoraConfig(
      r=4, lora_alpha=8, target_modules=TARGETS, use_rslora=True, lora_dropout=0.05, task_type="CAUSAL_LM"))
  _randomize_lora(model, 3)
  model.save_pretrained(stage2, safe_serialization=False)
  torch.save({}, stage2 / "non_lora_trainables.bin")
  # Stage 3: trained on the merged stage-2 model, saved as .safetensors, rank 8; the projector bias
  # was trained too (saved under the PeftModel's names) and one stray key the release ignores.
  stage2_merged = _merge_stage(_with_projector(hf_llama(config, seed=1), proj.state_dict()), stage2)
  stage3 = root / "stage3"
  model = peft.get_peft_model(stage2_merged, peft.LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                             task_type="CAUSAL_LM"))
  _randomize_lora(model, 4)
  model.save_pretrained(stage3)
  new_bias = torch.randn(config.hidden_size, generator=torch.Generator().manual_seed(5))
  torch.save({"base_model.model.model.mm_projector.bias": new_bias, "base_model.model.stray.weight": torch.ones(2)},
             stage3 / "non_lora_trainables.bin")
  stage2_merged = _merge_stage(_with_projector(hf_llama(config, seed=1), proj.state_dict()), stage2)
  reference = _merge_stage(_merge_stage(_with_projector(hf_llama(config, seed=1), proj.state_dict()), stage2), stage3)
  assert torch.equal(reference.model.mm_projector.bias, new_bias)
  return Release(root, base, projector, stage2, stage3, config, reference.eval(), stage2_merged.eval(), sp)


def _convert(release: Release, out: pathlib.Path, *extra) -> None:
  argv = ["convert", "release", "--base", release.base, "--projector", release.projector, "--stage2", release.stage2,
          "--stage3", release.stage3, "--out", out, "--dtype", "float32", *extra]
  assert cli.main([str(a) for a in argv]) == 0


def _batch(vocab: int, seed: int = 0):
  """Returns ids int[2, 12] with one placeholder per row (positions 3 and 6), mask (row 1 padded), features."""
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, vocab, (2, 12))
  ids[0, 3] = ids[1, 6] = VIDEO_TOKEN_INDEX
  mask = np.ones_like(ids)
  mask[1, 9:] = 0
  return ids, mask, rng.normal(size=(2, FRAMES, 768)).astype(np.float32)


def _reference_logits(hf, ids, mask, feats) -> list[np.ndarray]:
  """Per row: logits of the release's splice (text embeds, projected frames at `<video>`), no padding."""
  rows = []
  with torch.no_grad():
    for row, row_mask, row_feats in zip(ids, mask, feats):
      tokens = torch.tensor(row[row_mask == 1])
      p = int((tokens == VIDEO_TOKEN_INDEX).nonzero())
      embed = hf.get_input_embeddings()
      embeds = torch.cat([embed(tokens[:p]), hf.model.mm_projector(torch.tensor(row_feats)), embed(tokens[p + 1:])])
      rows.append(hf(inputs_embeds=embeds[None]).logits[0].numpy())
  return rows


def _check_model_dir(model_dir, hf, vocab, atol=1e-4):
  import jax.numpy as jnp

  ids, mask, feats = _batch(vocab)
  got, _ = load_model(model_dir)(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(feats))
  for b, ref in enumerate(_reference_logits(hf, ids, mask, feats)):
    np.testing.assert_allclose(np.asarray(got)[b, :len(ref)], ref, rtol=1e-4, atol=atol)


@pytest.fixture(scope="module")
def converted(release, tmp_path_factory):
  import transformers

  root = tmp_path_factory.mktemp("converted")
  clip = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14,
      projection_dim=16, hidden_act="quick_gelu"))
  clip.save_pretrained(root / "clip_hf")
  _convert(release, root / "model", "--clip", root / "clip_hf")
  return root / "model"


@pytest.fixture(scope="module")
def kept(release, tmp_path_factory):
  out = tmp_path_factory.mktemp("kept") / "model"
  _convert(release, out, "--keep-lora")
  return out


def test_convert_release_equals_release_loader(release, converted):
  assert (converted / "tokenizer.model").is_file()
  assert model_io.read_model_json(converted)["kind"] == "vtimellm"
  clip = model_io.read_model_json(converted / "clip")
  assert clip["kind"] == "clip" and clip["config"]["width"] == 32
  _check_model_dir(converted, release.reference, release.config.vocab_size)


@pytest.mark.slow
def test_keep_lora_equals_merged(release, kept):
  meta = model_io.read_model_json(kept)
  assert meta["lora"]["rank"] == 8 and sorted(meta["lora"]["targets"]) == sorted(TARGETS)
  _check_model_dir(kept, release.reference, release.config.vocab_size)


def test_chat_greedy_equals_torch_generate(release, converted, tmp_path, capsys):
  feats = np.random.RandomState(7).normal(size=(100, 768)).astype(np.float16)
  np.save(tmp_path / "v.npy", feats)
  query = "describe the video"
  code = cli.main(["chat", "--model", str(converted), "--features", str(tmp_path / "v.npy"), "--query", query,
                   "--json", "--temperature", "0", "--max-new-tokens", "6"])
  out = capsys.readouterr().out
  assert code == 0, out
  got = json.loads(out.strip().splitlines()[-1])["token_ids"]
  projector = release.reference.model.mm_projector
  ref = TinyVTimeLLM(converted, release.reference, projector.weight.detach().numpy().T,
                     projector.bias.detach().numpy(), release.sp)
  prompt = SYSTEM + " USER: <video>\n" + query + " ASSISTANT:"
  assert got == ref.hf_greedy(prompt, feats, 6)


@pytest.mark.slow  # an export read back through peft (CI's second run)
def test_export_release_loads_in_peft_and_round_trips(release, kept, tmp_path):
  out = tmp_path / "torch"
  assert cli.main(["export", "--model", str(kept), "--format", "release", "--out", str(out)]) == 0
  assert (out / "lora" / "adapter_model.bin").is_file()
  # PyTorch side: the stage-2-merged base + the exported projector + peft loading the exported LoRA.
  model = release.stage2_merged
  saved_proj = {k: v.clone() for k, v in model.model.mm_projector.state_dict().items()}
  try:
    exported = torch.load(out / "mm_projector.bin", weights_only=True)
    model.model.mm_projector.load_state_dict({k.split("mm_projector.")[1]: v for k, v in exported.items()})
    _load_non_lora(model, out / "lora")
    peft_model = peft.PeftModel.from_pretrained(model, str(out / "lora")).eval()
    ids, mask, feats = _batch(release.config.vocab_size, seed=1)
    for got, ref in zip(_reference_logits(peft_model.base_model.model, ids, mask, feats),
                        _reference_logits(release.reference, ids, mask, feats)):
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    peft_model.unload()
  finally:
    model.model.mm_projector.load_state_dict(saved_proj)
  # Back to JAX from the exported files: the same parameters.
  back = tmp_path / "back"
  assert cli.main([str(a) for a in ["convert", "release", "--base", release.base, "--projector", out / "mm_projector.bin",
                                    "--stage2", release.stage2, "--stage3", out / "lora", "--out", back,
                                    "--dtype", "float32", "--keep-lora"]]) == 0
  a, b = model_io.load_params(kept), model_io.load_params(back)
  assert model_io.read_model_json(back)["lora"] == model_io.read_model_json(kept)["lora"]
  for (path, x), (_, y) in zip(sorted(_flat(a)), sorted(_flat(b))):
    np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=0, atol=1e-6, err_msg=path)
  assert sorted(p for p, _ in _flat(a)) == sorted(p for p, _ in _flat(b))


def _flat(tree, prefix=""):
  for k, v in tree.items():
    yield from (_flat(v, f"{prefix}{k}/") if isinstance(v, dict) else [(prefix + k, v)])


@pytest.mark.slow
def test_export_hf_loads_in_transformers(release, kept, tmp_path):
  import transformers

  out = tmp_path / "hf"
  assert cli.main(["export", "--model", str(kept), "--format", "hf", "--out", str(out), "--dtype", "float32"]) == 0
  hf = transformers.LlamaForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  state = torch.load(out / "mm_projector.bin", weights_only=True)
  hf.model.mm_projector = torch.nn.Linear(768, release.config.hidden_size)
  hf.model.mm_projector.load_state_dict({k.split("mm_projector.")[1]: v for k, v in state.items()})
  assert (out / "tokenizer.model").is_file()
  ids, mask, feats = _batch(release.config.vocab_size, seed=2)
  for got, ref in zip(_reference_logits(hf, ids, mask, feats), _reference_logits(release.reference, ids, mask, feats)):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_broken_release_lists_every_problem(release, tmp_path, capsys):
  stage2 = shutil.copytree(release.stage2, tmp_path / "stage2")
  (stage2 / "adapter_model.bin").unlink()
  stage3 = shutil.copytree(release.stage3, tmp_path / "stage3")
  config = json.loads((stage3 / "adapter_config.json").read_text())
  config["target_modules"] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "lm_head"]
  (stage3 / "adapter_config.json").write_text(json.dumps(config))
  projector = tmp_path / "mm_projector.bin"
  torch.save({"model.mm_projector.weight": torch.zeros(7, 768), "model.mm_projector.bias": torch.zeros(7)}, projector)
  code = cli.main([str(a) for a in ["convert", "release", "--base", release.base, "--projector", projector,
                                    "--stage2", stage2, "--stage3", stage3, "--out", tmp_path / "out"]])
  err = capsys.readouterr().err
  assert code == 2
  assert "Traceback" not in err
  assert f"{stage2}: no adapter weights" in err
  assert "down_proj: has LoRA weights but adapter_config.json's target_modules" in err
  assert "target_modules names 'lm_head'" in err
  assert "model.mm_projector.weight has shape (7, 768)" in err and "model.mm_projector.bias has shape (7,)" in err


def test_pickle_needing_code_is_refused(release, tmp_path, capsys):
  projector = tmp_path / "mm_projector.bin"
  # fractions.Fraction is importable but not a tensor type: a weights-only load must refuse it.
  torch.save({"model.mm_projector.weight": torch.zeros(2), "extra": fractions.Fraction(1, 3)}, projector)
  code = cli.main([str(a) for a in ["convert", "release", "--base", release.base, "--projector", projector,
                                    "--out", tmp_path / "out"]])
  err = capsys.readouterr().err
  assert code == 2 and "Pickles that need code to load are never executed" in err and "Traceback" not in err
