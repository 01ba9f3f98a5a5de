"""CLIP vision tower and its converters: parity with HF / open_clip torch models built with random weights."""

import collections
import dataclasses
import importlib.machinery
import importlib.util
import json
import re
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gpu_fixtures import needs_cuda_plugin
from vtimellm_jax import cli, model_io, sharding
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


def test_hf_separate_qkv_fill_the_fused_projection(tmp_path):
  model = _hf_model(seed=7)
  model.save_pretrained(tmp_path / "hf")
  _, params, _ = convert_clip.convert(tmp_path / "hf")
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  attn = "vision_model.encoder.layers.1.self_attn"
  np.testing.assert_array_equal(params["encoder/layers/1/self_attn/qkv_proj/kernel"],
                                np.concatenate([sd[f"{attn}.{p}_proj.weight"].T for p in "qkv"], axis=1))
  np.testing.assert_array_equal(params["encoder/layers/1/self_attn/qkv_proj/bias"],
                                np.concatenate([sd[f"{attn}.{p}_proj.bias"] for p in "qkv"]))
  assert not any(re.search(r"/[qkv]_proj/", name) for name in params)


def test_openai_in_proj_fills_the_fused_projection(tmp_path):
  sd = _openai_state_dict(_hf_model(seed=8))
  torch.save(sd, tmp_path / "vit.pt")
  _, params, _ = convert_clip.convert(tmp_path / "vit.pt", heads=HEADS)
  np.testing.assert_array_equal(params["encoder/layers/0/self_attn/qkv_proj/kernel"],
                                sd["visual.transformer.resblocks.0.attn.in_proj_weight"].numpy().T)
  np.testing.assert_array_equal(params["encoder/layers/0/self_attn/qkv_proj/bias"],
                                sd["visual.transformer.resblocks.0.attn.in_proj_bias"].numpy())


def test_hf_qkv_problems_reported_with_every_key(tmp_path):
  from safetensors.torch import load_file, save_file

  model = _hf_model(seed=9)
  model.save_pretrained(tmp_path / "hf")
  weights = tmp_path / "hf" / "model.safetensors"
  sd = load_file(weights)
  attn = "vision_model.encoder.layers.0.self_attn"
  del sd[f"{attn}.v_proj.bias"]
  sd[f"{attn}.k_proj.weight"] = torch.zeros(WIDTH, WIDTH + 1)
  save_file(sd, weights)
  with pytest.raises(ConversionError) as e:
    convert_clip.convert(tmp_path / "hf")
  text = str(e.value)
  assert "2 problem(s)" in text  # q_proj and k_proj.bias are used, not also "unexpected"
  assert f"missing key {attn}.v_proj.bias (for encoder/layers/0/self_attn/qkv_proj/bias (384,))" in text
  assert (f"{attn}.q_proj.weight, {attn}.k_proj.weight, {attn}.v_proj.weight: shape (128, 128), (128, 129), "
          "(128, 128) cannot be joined for encoder/layers/0/self_attn/qkv_proj/kernel, expected (128, 384)") in text


def _separate_qkv_layout(params: dict) -> dict:
  """Our flat params as model directories stored them before q/k/v were fused."""
  out = {}
  for name, value in params.items():
    if m := re.fullmatch(r"(.*/self_attn)/qkv_proj/(kernel|bias)", name):
      out.update({f"{m[1]}/{p}_proj/{m[2]}": part for p, part in zip("qkv", np.split(value, 3, axis=-1))})
    else:
      out[name] = value
  return out


@pytest.mark.slow
def test_model_dir_with_separate_qkv_loads_fused(tmp_path):
  model = _hf_model(seed=10)
  model.save_pretrained(tmp_path / "hf")
  cfg, params, _ = convert_clip.convert(tmp_path / "hf")
  older = _separate_qkv_layout(params)
  assert clip_model.fuse_qkv(older).keys() == params.keys()
  model_io.save_model_dir(tmp_path / "older", kind="clip", config=dataclasses.asdict(cfg), params=clip_model.nest(older))
  loaded = load.load_model(tmp_path / "older")
  attn = loaded.encoder.layers[1].self_attn
  np.testing.assert_array_equal(np.asarray(attn.qkv_proj.kernel[...]), params["encoder/layers/1/self_attn/qkv_proj/kernel"])
  pixels = _pixels(seed=10)
  embeds = np.asarray(loaded.encode_image(jnp.asarray(pixels)))
  np.testing.assert_array_equal(embeds, _ours(cfg, params, pixels))
  np.testing.assert_allclose(embeds, _hf_embeds(model, pixels), atol=1e-4, rtol=0)
  # In float16 too (the parts are cast as the fused target is), and on a mesh of 8 devices.
  half = load.load_model(tmp_path / "older", dtype="float16", mesh=sharding.make_mesh(-1, 2, 1))
  kernel = half.encoder.layers[0].self_attn.qkv_proj.kernel[...]
  assert kernel.dtype == jnp.float16 and len(kernel.sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(kernel), params["encoder/layers/0/self_attn/qkv_proj/kernel"].astype(np.float16))
  # An incomplete triple is not fused: the separate names stay unexpected and the fused one missing.
  del older["encoder/layers/0/self_attn/v_proj/bias"]
  model_io.save_model_dir(tmp_path / "broken", kind="clip", config=dataclasses.asdict(cfg), params=clip_model.nest(older))
  with pytest.raises(UserError) as e:
    load.load_model(tmp_path / "broken")
  text = str(e.value)
  assert "unexpected encoder/layers/0/self_attn/q_proj/bias (128,)" in text
  assert "missing encoder/layers/0/self_attn/qkv_proj/bias (384,)" in text
  assert "layers/1/self_attn/q_proj" not in text  # the complete triple of layer 1 was fused


def test_random_params_keep_their_values_across_the_fusion():
  # `--clip tiny-random*` features extracted before q/k/v were fused stay valid: the draw is the same.
  params = clip_model.random_params(clip_model.tiny(64, 8), seed=0)
  q0 = params["encoder/layers/0/self_attn/qkv_proj/kernel"][0, :3]
  k1, v1 = (params["encoder/layers/1/self_attn/qkv_proj/kernel"][0, 64 * n:64 * n + 3] for n in (1, 2))
  np.testing.assert_array_equal(q0, np.float32([0.10334362834692001, -0.07462918758392334, -0.05965414270758629]))
  np.testing.assert_array_equal(k1, np.float32([-0.20921070873737335, -0.0518912635743618, -0.18516398966312408]))
  np.testing.assert_array_equal(v1, np.float32([-0.02349238283932209, 0.008774946443736553, 0.10955611616373062]))


@pytest.mark.parametrize("platform, dtype, head_dim, expected", [
    ("gpu", jnp.float16, 64, "cudnn"),
    ("gpu", jnp.bfloat16, 64, "cudnn"),
    ("cuda", jnp.float16, 64, "cudnn"),
    ("gpu", jnp.float32, 64, "xla"),  # fp32: the exact path
    ("gpu", jnp.float16, 12, "xla"),  # head dim not a multiple of 8: cuDNN would refuse
    ("gpu", jnp.float16, 256, "xla"),  # beyond the head dim cuDNN takes on every GPU
    ("tpu", jnp.bfloat16, 64, "xla"),
    ("cpu", jnp.float16, 64, "xla"),
    ("cpu", jnp.float32, 64, "xla"),
])
def test_auto_attention_kernel_per_platform(monkeypatch, platform, dtype, head_dim, expected):
  monkeypatch.setattr(clip_model, "target_platform", lambda: platform)
  assert clip_model.attention_kernel("auto", dtype, head_dim) == expected
  assert clip_model.attention_kernel("xla", dtype, head_dim) == "xla"
  assert clip_model.attention_kernel("cudnn", dtype, head_dim) == "cudnn"


def test_attention_impl_default_and_validation():
  assert clip_model.attention_kernel("auto", jnp.float16, 64) == "xla"  # this process compiles for its CPU
  model = load.random_clip(clip_model.tiny(64, 8), seed=0)
  assert model.encoder.layers[0].self_attn.attention_impl == "auto"
  with pytest.raises(UserError, match="attention_impl must be one of"):
    load.random_clip(clip_model.tiny(64, 8), seed=0, attention_impl=None)


def test_flops_per_image_counts_the_matmuls():
  cfg = clip_model.tiny(64, 8)  # 65 tokens, width 64, MLP 256, 2 layers, 768-d out
  t, d = 65, 64
  expected = 2 * 64 * (8 * 8 * 3) * d + 2 * (2 * t * (4 * d * d + 2 * d * 256) + 4 * t * t * d) + 2 * d * 768
  assert clip_model.flops_per_image(cfg) == expected
  assert round(clip_model.flops_per_image(clip_model.clip_vit_l14()) / 1e9, 1) == 162.0


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


# --- the GPU program, compiled ahead of time for a compile-only H100 (the CUDA plugin, no GPU) ---



@needs_cuda_plugin
def test_gpu_compile_has_cudnn_attention_and_no_score_buffer():
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  from vtimellm_jax.training import aot

  # JAX starts no CUDA client (conftest: JAX_PLATFORMS=cpu); the plugin still compiles for an H100.
  devices = aot.target_devices(aot.resolve("1xH100"))
  mesh = jax.sharding.Mesh(np.asarray(devices), ("data",))
  replicated = NamedSharding(mesh, PartitionSpec())
  batch, cfg = 8, clip_model.clip_vit_l14()
  model = nnx.eval_shape(lambda: clip_model.ClipVision(cfg, dtype=jnp.float16, param_dtype=jnp.float16,
                                                       rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  state = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), state)
  pixels = jax.ShapeDtypeStruct((batch, cfg.image_size, cfg.image_size, 3), jnp.float32, sharding=replicated)
  encode = jax.jit(lambda state, pixels: nnx.merge(graphdef, state).encode_image(pixels),
                   in_shardings=(replicated, replicated), out_shardings=replicated)
  # Traced under the target's mesh, "auto" resolves for the GPU rather than this CPU host.
  with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
    compiled = encode.lower(state, pixels).compile()
  text = compiled.as_text()
  calls = re.findall(r'custom_call_target="(__cudnn\$fmha[^"]*)"', text)
  assert len(calls) == cfg.layers, sorted(set(re.findall(r'custom_call_target="([^"]+)"', text)))
  t = cfg.num_positions
  assert not re.search(rf"\[{batch},{cfg.heads},{t},{t}\]", text)  # no score tensor in memory, f32 or other
