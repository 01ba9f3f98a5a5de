"""The attention kernels equal the XLA path on real tokens: splash (TPU Pallas kernel, run here in
interpret mode) and per_head (the CPU path)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from vtimellm_jax.models import llama, per_head_attention
from vtimellm_jax import sharding

# Head dim 128 (splash's lane width); 4 query heads over 2 kv heads; T = 200 (splash pads it to 256).
CONFIG = llama.tiny(hidden_size=512, num_heads=4, num_kv_heads=2, head_dim=128, attention_impl="xla")
B, T = 2, 200
LENGTHS = jnp.array([150, 200])
REAL = jnp.arange(T)[None, :, None] < LENGTHS[:, None, None]  # [B, T, 1]: rows' real positions


def _inputs():
  x = jax.random.normal(jax.random.key(1), (B, T, CONFIG.hidden_size))
  cos, sin = llama.rope_tables(jnp.broadcast_to(jnp.arange(T), (B, T)), CONFIG.head_size, CONFIG.rope_theta)
  return x, cos, sin


def _attention(impl):
  return llama.LlamaAttention(CONFIG.replace(attention_impl=impl), nnx.Rngs(0))  # same seed: same weights


def _loss_and_grads(impl):
  graphdef, params = nnx.split(_attention(impl))
  x, cos, sin = _inputs()

  def loss(params, x):
    out, _ = nnx.merge(graphdef, params)(x, cos, sin, LENGTHS)
    # Padding queries' outputs are left out: the two paths may differ there.
    return jnp.sum(jnp.where(REAL, out, 0.0) ** 2), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x)


@pytest.mark.parametrize("impl", ["splash", "per_head"])
def test_kernel_equals_xla_on_real_tokens_with_gradients(impl):
  (want, want_out), want_grads = _loss_and_grads("xla")
  (got, got_out), got_grads = _loss_and_grads(impl)
  assert bool(jnp.isfinite(got_out).all())  # padding queries too: they feed later layers
  np.testing.assert_allclose(np.where(REAL, got_out, 0), np.where(REAL, want_out, 0), atol=2e-5)
  np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
  for (path, g), w in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(np.abs(w).max()), err_msg=jax.tree_util.keystr(path))


def test_splash_under_a_mesh_runs_per_batch_shard():
  mesh = sharding.make_mesh(data=2, fsdp=1, tensor=1, devices=jax.devices()[:2])
  x, cos, sin = _inputs()
  graphdef, params = nnx.split(_attention("splash"))

  def apply(params, x, cos, sin, lengths):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return nnx.merge(graphdef, params)(x, cos, sin, lengths)[0]

  rows = NamedSharding(mesh, P("data"))
  sharded = jax.jit(apply, in_shardings=(NamedSharding(mesh, P()), rows, rows, rows, rows))
  assert "shard_map" in str(jax.make_jaxpr(apply)(params, x, cos, sin, LENGTHS))
  got = sharded(params, x, cos, sin, LENGTHS)
  want, _ = _attention("xla")(x, cos, sin, LENGTHS)
  np.testing.assert_allclose(np.where(REAL, got, 0), np.where(REAL, want, 0), atol=2e-5)


@pytest.mark.parametrize("platform, dtype, want", [
    ("tpu", "bfloat16", "splash"), ("tpu", "float32", "xla"), ("gpu", "bfloat16", "cudnn"), ("gpu", "float32", "xla"),
    ("cpu", "bfloat16", "per_head"), ("cpu", "float32", "per_head"),
])
def test_auto_picks_the_platforms_kernel(monkeypatch, platform, dtype, want):
  monkeypatch.setattr(llama, "target_platform", lambda: platform)
  assert llama.attention_impl(CONFIG.replace(attention_impl="auto", dtype=dtype)) == want
  assert llama.attention_impl(CONFIG.replace(attention_impl="xla", dtype=dtype)) == "xla"


def test_platform_is_the_context_meshs():
  # An AOT compile for a TPU from this CPU host traces under the TPU mesh: "auto" must see a TPU.
  from jax._src.mesh import AbstractDevice  # pylint: disable=g-import-not-at-top

  assert sharding.target_platform() == "cpu"
  tpu_mesh = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=AbstractDevice("TPU v5 lite", None, "tpu"))
  with jax.sharding.use_abstract_mesh(tpu_mesh):
    assert sharding.target_platform() == "tpu"


def test_unknown_attention_impl_is_refused():
  with pytest.raises(ValueError, match="attention_impl"):
    CONFIG.replace(attention_impl="flash")


def test_per_head_equals_xla_with_padding_queries_and_one_kv_head():
  # Padding queries too (they see the row's real keys on both paths), a length-1 row, multi-query kv.
  b, t, n, h = 3, 37, 4, 16
  keys = jax.random.split(jax.random.key(2), 4)
  q = jax.random.normal(keys[0], (b, t, n, h))
  k, v = (jax.random.normal(key, (b, t, 1, h)) for key in keys[1:3])
  lengths = jnp.array([37, 20, 1])
  weights = jax.random.normal(keys[3], (b, t, n, h))

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * weights)

  def xla(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, key_value_seq_lengths=lengths)

  def ours(q, k, v):
    return per_head_attention.per_head_attention(q, k, v, lengths)

  np.testing.assert_allclose(jax.jit(ours)(q, k, v), xla(q, k, v), atol=1e-5)
  got = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2)))(q, k, v)
  want = jax.grad(loss(xla), argnums=(0, 1, 2))(q, k, v)
  for name, g, w in zip("qkv", got, want):
    np.testing.assert_allclose(g, w, atol=1e-4, err_msg=name)
