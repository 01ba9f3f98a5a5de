"""The logical-axis rule table: a dimension its mesh axes do not divide is an error naming it, except on an
axis declared to replicate then (ChatGLM3's 2 key/value groups on tensor >= 4); every family's real sizes
shard on every topology preset."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, NamedSharding
from jax.sharding import PartitionSpec as P

from vtimellm_jax import cli, sharding
from vtimellm_jax.configs import topologies
from vtimellm_jax.errors import UserError
from vtimellm_jax.models import families, llama
from vtimellm_jax.training import config_loading, model_setup

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _mesh(data=1, fsdp=1, tensor=1) -> AbstractMesh:
  return AbstractMesh((data, fsdp, tensor), sharding.MESH_AXES)


def test_a_dimension_the_mesh_does_not_divide_is_an_error_naming_it():
  with pytest.raises(UserError, match=r"an array \('vocab', 'embed'\) of shape \(515, 64\): logical axis 'vocab' "
                                      r"has size 515, which mesh axis 'tensor' of size 2 does not divide"):
    sharding.spec_for(("vocab", "embed"), (515, 64), _mesh(fsdp=4, tensor=2))
  with pytest.raises(UserError, match=r"logical axis 'batch' has size 3, which mesh axes 'data' \(2\) x 'fsdp' \(2\) "
                                      r"= 4 does not divide"):
    sharding.spec_for(("batch", None, None), (3, 16, 64), _mesh(data=2, fsdp=2, tensor=2))
  # Vicuna-13B's 40 query heads cannot split over 16 tensor devices (splash attention splits heads).
  with pytest.raises(UserError, match="logical axis 'q_heads' has size 40"):
    sharding.spec_for(("batch", None, "q_heads", None), (16, 2048, 40, 128), _mesh(tensor=16))
  assert sharding.spec_for(("vocab", "embed"), (512, 64), _mesh(fsdp=4, tensor=2)) == P("tensor", "fsdp")


def test_key_value_heads_replicate_where_tensor_does_not_divide_them():
  # ChatGLM3-6B: 32 query heads in 2 key/value groups; on tensor 4 and 8 each device holds both groups.
  assert "kv_heads" in sharding.REPLICATED_WHEN_UNEVEN
  for tensor in (4, 8):
    mesh = _mesh(fsdp=8 // tensor, tensor=tensor)
    assert sharding.spec_for(("batch", None, "kv_heads", None), (8, 16, 2, 128), mesh) == P(("data", "fsdp"), None,
                                                                                             None, None)
    assert sharding.spec_for(("batch", None, "q_heads", None), (8, 16, 32, 128), mesh)[2] == "tensor"
  assert sharding.spec_for(("batch", None, "kv_heads", None), (8, 16, 2, 128), _mesh(fsdp=4, tensor=2))[2] == "tensor"


def test_state_shardings_names_every_parameter_the_mesh_does_not_divide():
  model = nnx.eval_shape(lambda: llama.LlamaForCausalLM(llama.tiny(vocab_size=515), nnx.Rngs(0)))
  with pytest.raises(UserError) as error:
    sharding.state_shardings(nnx.state(model), _mesh(fsdp=4, tensor=2))
  message = str(error.value)
  assert message.startswith("the mesh {'data': 1, 'fsdp': 4, 'tensor': 2} does not fit this model:")
  assert "parameter model/embed_tokens ('vocab', 'embed') of shape (515, 64): logical axis 'vocab' has size 515" in message
  assert "parameter lm_head/kernel ('embed', 'vocab') of shape (64, 515)" in message


def test_a_layout_that_does_not_fit_is_a_message_not_a_traceback(tmp_path, capsys):
  code = cli.main(["train", "--config", str(ROOT / "configs/stage2.py") + ":tiny", "--workdir", str(tmp_path / "w"),
                   "--dry-run", "--seq-len", "160", "--num-features", "4", "--config.mesh.data=1",
                   "--config.mesh.fsdp=4", "--config.mesh.tensor=2", "--config.model.vocab_size=515"])
  err = capsys.readouterr().err
  assert code == 2, err
  assert "parameter model/embed_tokens ('vocab', 'embed') of shape (515, 64)" in err and "Traceback" not in err


CASES = [(family.name, size) for family in families.FAMILIES.values() for size in family.sizes if size != "tiny"]


@pytest.mark.parametrize("family, size", CASES)
def test_every_real_size_shards_on_every_topology_preset(family, size):
  """Abstract arrays and meshes: every parameter of the stage-2 model, on each preset's mesh and on
  tensor 2, 4 and 8; the attention activations of splash attention too."""
  config = config_loading.load_config(f"stage2.py:family={family},size={size}")
  state = nnx.state(nnx.eval_shape(model_setup.train_structure(config, None)))
  preset = families.preset(config.model.preset)
  meshes = [_mesh(**t.mesh) for t in topologies.PRESETS.values()]
  meshes += [_mesh(fsdp=8 // tensor, tensor=tensor) for tensor in (2, 4, 8)]
  for mesh in meshes:
    shardings = dict(nnx.to_flat_state(sharding.state_shardings(state, mesh)))
    (embed,) = [v.get_value() for path, v in shardings.items() if path[-1] == "embed_tokens"]
    assert embed.spec == P("tensor", "fsdp")
    rows = 8 * mesh.shape["data"] * mesh.shape["fsdp"]
    q = sharding.spec_for(("batch", None, "q_heads", None), (rows, 256, preset.num_heads, preset.head_size), mesh)
    kv = sharding.spec_for(("batch", None, "kv_heads", None), (rows, 256, preset.num_kv_heads, preset.head_size), mesh)
    assert q[2] == "tensor"
    if preset.num_kv_heads % mesh.shape["tensor"]:
      assert family == "chatglm3" and kv[2] is None  # the declared fallback, and only there


def test_splash_attention_with_two_kv_groups_on_four_tensor_devices_equals_xla():
  # ChatGLM3's layout in small: 4 query heads in 2 kv groups, tensor 4. The kv heads replicate, so splash
  # splits no heads (query and kv heads would split differently) and runs per batch shard.
  config = llama.tiny(hidden_size=512, num_heads=4, num_kv_heads=2, head_dim=128, attention_impl="xla")
  b, t = 2, 200
  lengths = jnp.array([150, 200])
  real = jnp.arange(t)[None, :, None] < lengths[:, None, None]
  x = jax.random.normal(jax.random.key(1), (b, t, config.hidden_size))
  cos, sin = llama.rope_tables(jnp.broadcast_to(jnp.arange(t), (b, t)), config.head_size, config.rope_theta)
  mesh = sharding.make_mesh(data=2, fsdp=1, tensor=4)
  graphdef, params = nnx.split(llama.LlamaAttention(config.replace(attention_impl="splash"), nnx.Rngs(0)))

  def apply(params, x, cos, sin, lengths):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return nnx.merge(graphdef, params)(x, cos, sin, lengths)[0]

  rows = NamedSharding(mesh, P("data"))
  got = jax.jit(apply, in_shardings=(NamedSharding(mesh, P()), rows, rows, rows, rows))(params, x, cos, sin, lengths)
  want, _ = llama.LlamaAttention(config, nnx.Rngs(0))(x, cos, sin, lengths)
  np.testing.assert_allclose(np.where(real, got, 0), np.where(real, want, 0), atol=2e-5)
