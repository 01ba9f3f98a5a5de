"""CLIP vision tower and its converters: parity with HF / open_clip torch models built with random weights."""

import collections
import importlib.machinery
import json
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from vtimellm_jax import cli
from vtimellm_jax.convert import clip as convert_clip
from vtimellm_jax.errors import ConversionError, UserError
from vtimellm_jax.models import clip as clip_model, load

IMAGE, PATCH, WIDTH, LAYERS, HEADS, MLP, PROJ = 32, 8, 128, 2, 2, 512, 24


def _hf_vision_config(act="quick_gelu"):
  from transformers import CLIPVisionConfig

  return CLIPVisionConfig(hidden_size=WIDTH, intermediate_size=MLP, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                          image_size=IMAGE, patch_size=PATCH, projection_dim=PROJ, hidden_act=act)


def _hf_model(act="quick_gelu", seed=0):
  from transformers import CLIPVisionModelWithProjection

  torch.manual_seed(seed)
  model = CLIPVisionModelWithProjection(_hf_vision_config(act)).eval()
  # Random init leaves LayerNorms at identity and biases at zero; perturb them so they are tested.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def _pixels(n=3, seed=0):
  return np.random.default_rng(seed).normal(size=(n, IMAGE, IMAGE, 3)).astype(np.float32)


def _ours(cfg, params, pixels):
  return np.asarray(load.clip_from_params(cfg, params).encode_image(jnp.asarray(pixels)))


def _hf_embeds(model, pixels):
  with torch.no_grad():
    return model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2)).image_embeds.numpy()


def _openai_state_dict(hf_model) -> dict[str, torch.Tensor]:
  """OpenAI's key names, written here from OpenAI's published layout (fused q/k/v in_proj)."""
  sd = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
  out = {
      "visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
      "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
      "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
      "visual.ln_pre.weight": sd["vision_model.pre_layrnorm.weight"],
      "visual.ln_pre.bias": sd["vision_model.pre_layrnorm.bias"],
      "visual.ln_post.weight": sd["vision_model.post_layernorm.weight"],
      "visual.ln_post.bias": sd["vision_model.post_layernorm.bias"],
      "visual.proj": sd["visual_projection.weight"].T.contiguous(),
  }
  for i in range(LAYERS):
    hf, oa = f"vision_model.encoder.layers.{i}.", f"visual.transformer.resblocks.{i}."
    out[oa + "attn.in_proj_weight"] = torch.cat([sd[hf + f"self_attn.{p}_proj.weight"] for p in "qkv"])
    out[oa + "attn.in_proj_bias"] = torch.cat([sd[hf + f"self_attn.{p}_proj.bias"] for p in "qkv"])
    for ours, theirs in [("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]:
      out[oa + ours + ".weight"] = sd[hf + theirs + ".weight"]
      out[oa + ours + ".bias"] = sd[hf + theirs + ".bias"]
  # The text tower and bookkeeping entries of a full OpenAI checkpoint, which must be ignored.
  out["positional_embedding"] = torch.randn(7, 16)
  out["token_embedding.weight"] = torch.randn(10, 16)
  out["logit_scale"] = torch.tensor(4.6)
  return out


def test_hf_vision_with_projection_dir_parity(tmp_path):
  model = _hf_model()
  model.save_pretrained(tmp_path / "hf")
  cfg, params, kind = convert_clip.convert(tmp_path / "hf")
  assert kind == "hf" and cfg.heads == HEADS and cfg.act == "quick_gelu" and cfg.image_size == IMAGE
  pixels = _pixels()
  np.testing.assert_allclose(_ours(cfg, params, pixels), _hf_embeds(model, pixels), atol=1e-4, rtol=0)


def test_hf_clipmodel_dir_gelu_parity_and_patch_tokens(tmp_path):
  from transformers import CLIPConfig, CLIPModel

  torch.manual_seed(1)
  text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=50,
              max_position_embeddings=16)
  config = CLIPConfig(text_config=text, vision_config=_hf_vision_config("gelu").to_dict(), projection_dim=PROJ)
  model = CLIPModel(config).eval()
  model.save_pretrained(tmp_path / "clipmodel")
  cfg, params, _ = convert_clip.convert(tmp_path / "clipmodel")
  assert cfg.act == "gelu" and cfg.output_dim == PROJ
  pixels = _pixels(seed=1)
  with torch.no_grad():
    vision = model.vision_model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
    expected = model.visual_projection(vision.pooler_output).numpy()
  out = load.clip_from_params(cfg, params)(jnp.asarray(pixels))
  np.testing.assert_allclose(np.asarray(out.image_embeds), expected, atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(out.last_hidden_state), vision.last_hidden_state.numpy(), atol=1e-4, rtol=0)


def test_openai_state_dict_parity(tmp_path):
  model = _hf_model(seed=2)
  torch.save(_openai_state_dict(model), tmp_path / "vit.pt")
  cfg, params, kind = convert_clip.convert(tmp_path / "vit.pt", heads=HEADS)
  assert kind == "state_dict" and cfg.layers == LAYERS and cfg.mlp_ratio == MLP / WIDTH
  pixels = _pixels(seed=2)
  np.testing.assert_allclose(_ours(cfg, params, pixels), _hf_embeds(model, pixels), atol=1e-4, rtol=0)


class _Holder(torch.nn.Module):
  """Registers tensors under dotted OpenAI names, so a scripted module's state_dict has those keys."""

  def __init__(self, tensors: dict):
    super().__init__()
    children = collections.defaultdict(dict)
    for name, value in tensors.items():
      head, _, rest = name.partition(".")
      if rest:
        children[head][rest] = value
      else:
        self.register_parameter(head, torch.nn.Parameter(value, requires_grad=False))
    for head, sub in children.items():
      self.add_module(head, _Holder(sub))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x


def test_openai_torchscript_fp16_parity(tmp_path):
  model = _hf_model(seed=3)
  # The release's ViT-L-14.pt holds float16 weights: round the reference's weights the same way.
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(p.half().float())
  tensors = {k: v.half() for k, v in _openai_state_dict(model).items()}
  torch.jit.script(_Holder(tensors)).save(str(tmp_path / "ViT-L-14.pt"))
  assert convert_clip.is_torchscript(tmp_path / "ViT-L-14.pt")
  cfg, params, kind = convert_clip.convert(tmp_path / "ViT-L-14.pt", heads=HEADS)
  assert kind == "openai_torchscript" and params["visual_projection/kernel"].dtype == np.float32
  pixels = _pixels(seed=3)
  np.testing.assert_allclose(_ours(cfg, params, pixels), _hf_embeds(model, pixels), atol=1e-4, rtol=0)


def test_all_problems_reported_at_once(tmp_path):
  sd = _openai_state_dict(_hf_model())
  del sd["visual.ln_post.bias"]
  sd["visual.transformer.resblocks.0.mlp.c_fc.bias"] = torch.zeros(MLP + 1)
  sd["visual.surprise"] = torch.zeros(3)
  torch.save(sd, tmp_path / "broken.pt")
  with pytest.raises(ConversionError) as e:
    convert_clip.convert(tmp_path / "broken.pt", heads=HEADS)
  text = str(e.value)
  assert "3 problem(s)" in text
  assert "missing key visual.ln_post.bias" in text
  assert "visual.transformer.resblocks.0.mlp.c_fc.bias: shape (513,)" in text
  assert "unexpected key visual.surprise" in text
  with pytest.raises(UserError, match="not found"):
    convert_clip.convert(tmp_path / "nothing.pt")


def test_convert_cli_writes_a_loadable_model_dir(tmp_path, capsys):
  model = _hf_model(seed=4)
  model.save_pretrained(tmp_path / "hf")
  assert cli.main(["convert", "clip", "--src", str(tmp_path / "hf"), "--out", str(tmp_path / "out")]) == 0
  meta = json.loads((tmp_path / "out" / "model.json").read_text())
  assert meta["kind"] == "clip" and meta["config"]["width"] == WIDTH
  loaded = load.load_model(tmp_path / "out")
  pixels = _pixels(seed=4)
  np.testing.assert_allclose(np.asarray(loaded.encode_image(jnp.asarray(pixels))), _hf_embeds(model, pixels),
                             atol=1e-4, rtol=0)
  assert cli.main(["convert", "clip", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
  assert "not found" in capsys.readouterr().err


def test_presets():
  assert clip_model.num_params(clip_model.clip_vit_l14()) == 303_966_208  # OpenAI ViT-L/14's visual tower
  model = load.random_clip(clip_model.tiny(), seed=0)
  assert model.encode_image(jnp.zeros((2, 224, 224, 3))).shape == (2, 768)


# --- open_clip (its import needs torchvision, which does not load beside the CPU torch used here) ---


def _import_open_clip(monkeypatch):
  try:
    import torchvision  # noqa: F401
  except Exception:
    # open_clip imports torchvision's transforms at module level but its model code never uses
    # them; stand-in modules let the genuine model classes load. They leave sys.modules when the
    # test ends (monkeypatch), so a later test in this process still finds torchvision absent.
    class _Anything(type):
      def __getattr__(cls, name):
        return name

    def stub(name):
      module = types.ModuleType(name)
      module.__path__ = []
      module.__spec__ = importlib.machinery.ModuleSpec(name, None)

      def getattr_(attr):
        if attr.startswith("__"):
          raise AttributeError(attr)
        return _Anything(attr, (), {})

      module.__getattr__ = getattr_
      return module

    for name in ("torchvision", "torchvision.transforms", "torchvision.transforms.functional", "torchvision.ops",
                 "torchvision.ops.misc"):
      if name not in sys.modules:
        monkeypatch.setitem(sys.modules, name, stub(name))
  return pytest.importorskip("open_clip")


def _open_clip_model(monkeypatch, quick_gelu: bool, seed: int):
  open_clip = _import_open_clip(monkeypatch)
  from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg

  torch.manual_seed(seed)
  vision = CLIPVisionCfg(layers=LAYERS, width=WIDTH, head_width=WIDTH // HEADS, patch_size=PATCH, image_size=IMAGE)
  text = CLIPTextCfg(context_length=8, vocab_size=50, width=32, heads=2, layers=1)
  model = CLIP(embed_dim=PROJ, vision_cfg=vision, text_cfg=text, quick_gelu=quick_gelu).eval()
  with torch.no_grad():
    for name, p in model.visual.named_parameters():
      if "ln" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return open_clip, model


def _open_clip_embeds(model, pixels):
  with torch.no_grad():
    return model.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2)).numpy()


def test_open_clip_state_dict_parity(tmp_path, monkeypatch):
  _, model = _open_clip_model(monkeypatch, quick_gelu=True, seed=5)
  torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "epoch_1.pt")
  cfg, params, _ = convert_clip.convert(tmp_path / "epoch_1.pt", heads=HEADS)
  pixels = _pixels(seed=5)
  np.testing.assert_allclose(_ours(cfg, params, pixels), _open_clip_embeds(model, pixels), atol=1e-4, rtol=0)


def test_open_clip_dir_with_config_gelu_parity(tmp_path, monkeypatch):
  from safetensors.torch import save_file

  _, model = _open_clip_model(monkeypatch, quick_gelu=False, seed=6)
  (tmp_path / "oc").mkdir()
  save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "oc" / "open_clip_model.safetensors")
  model_cfg = {"embed_dim": PROJ, "quick_gelu": False,
               "vision_cfg": {"layers": LAYERS, "width": WIDTH, "head_width": WIDTH // HEADS, "patch_size": PATCH}}
  (tmp_path / "oc" / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
  cfg, params, kind = convert_clip.convert(tmp_path / "oc")
  assert kind == "open_clip" and cfg.act == "gelu" and cfg.heads == HEADS
  pixels = _pixels(seed=6)
  np.testing.assert_allclose(_ours(cfg, params, pixels), _open_clip_embeds(model, pixels), atol=1e-4, rtol=0)
