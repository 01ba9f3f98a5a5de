"""LoRA equals peft's: same A/B give the same logits and loss; merge and fresh-LoRA behave."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import peft
import torch
from flax import nnx

from hf_reference import hf_llama, jax_from_hf, random_batch
from vtimellm_jax.models import llama, lora
from vtimellm_jax.training import step as step_lib

RANK, ALPHA = 4, 8.0


def _peft_model(hf, targets):
  # get_peft_model rewrites `hf` in place, so read its base weights before calling this.
  model = peft.get_peft_model(hf, peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(targets)))
  torch.manual_seed(1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "lora_B" in name:
        p.copy_(0.05 * torch.randn_like(p))  # peft starts B at 0; a non-zero B tests the math
  return model.eval()


def _copy_peft_factors(ours, peft_model):
  """Copies peft's per-layer factors into our stacked ones; returns how many per-layer pairs were copied."""
  state = {k: v.detach().numpy() for k, v in peft_model.state_dict().items()}
  copied = 0
  for path, layer in lora.lora_layers(ours):
    if not layer.has_lora:
      continue
    block, proj = path[-2:]
    a, b = [], []
    for i in range(layer.stack_shape[0]):
      prefix = f"base_model.model.model.layers.{i}.{block}.{proj}"
      a.append(state[prefix + ".lora_A.default.weight"].T)
      b.append(state[prefix + ".lora_B.default.weight"].T)
      copied += 1
    layer.lora_a[...] = jnp.asarray(np.stack(a))
    layer.lora_b[...] = jnp.asarray(np.stack(b))
  return copied


def _setup(targets=lora.ALL_TARGETS):
  config = llama.tiny()
  hf = hf_llama(config)
  ours = jax_from_hf(hf, config)
  peft_model = _peft_model(hf, targets)
  n = lora.attach_lora(ours, lora.LoraConfig(rank=RANK, alpha=ALPHA, dropout=0.0, targets=tuple(targets)), nnx.Rngs(3))
  assert n == config.num_layers * len(targets)
  assert _copy_peft_factors(ours, peft_model) == n
  return config, peft_model, ours


def test_lora_logits_and_loss_match_peft():
  config, peft_model, ours = _setup()
  ids, mask = random_batch(config.vocab_size, 2, 12, [12, 8])
  labels = np.where(mask == 1, ids, -100)
  labels[:, :3] = -100
  with torch.no_grad():
    ref = peft_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), labels=torch.tensor(labels))
  logits = ours(jnp.asarray(ids), jnp.asarray(mask))
  valid = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(logits)[valid], ref.logits.numpy()[valid], rtol=1e-4, atol=1e-4)
  total, count = step_lib.nll_sum(logits, jnp.asarray(labels))  # what the training step sums
  assert int(count) == int((labels[:, 1:] != -100).sum())
  np.testing.assert_allclose(float(total / count), float(ref.loss), rtol=1e-5)


def test_lora_subset_of_targets_matches_peft():
  config, peft_model, ours = _setup(targets=("q_proj", "v_proj", "down_proj"))
  ids, mask = random_batch(config.vocab_size, 1, 9, [9])
  with torch.no_grad():
    ref = peft_model(input_ids=torch.tensor(ids)).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours(jnp.asarray(ids))), ref, rtol=1e-4, atol=1e-4)
  assert not ours.model.layers.self_attn.k_proj.has_lora and ours.model.layers.self_attn.q_proj.has_lora


def test_merge_equals_unmerged_and_fresh_lora_starts_from_merged():
  config, _, ours = _setup()
  ids, mask = random_batch(config.vocab_size, 2, 10, [10, 6])
  before = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
  layer = ours.model.layers.mlp.up_proj  # every layer's kernel, stacked [L, in, out]
  by_hand = np.asarray(layer.kernel[...]) + (ALPHA / RANK) * np.asarray(layer.lora_a[...]) @ np.asarray(layer.lora_b[...])
  assert by_hand.shape == (config.num_layers, 64, 176)
  assert len(nnx.state(ours, nnx.LoRAParam)) > 0
  assert lora.merge_lora(ours) == config.num_layers * 7
  assert len(jax.tree.leaves(nnx.state(ours, nnx.LoRAParam))) == 0
  np.testing.assert_allclose(np.asarray(layer.kernel[...]), by_hand, rtol=1e-6, atol=1e-7)
  merged = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_allclose(merged, before, rtol=1e-4, atol=1e-4)
  # Stage 3: a fresh LoRA (B = 0) leaves the merged model's outputs unchanged and is what trains.
  lora.attach_lora(ours, lora.LoraConfig(rank=8, alpha=16.0, dropout=0.05), nnx.Rngs(7))
  ours.eval()
  fresh = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
  np.testing.assert_allclose(fresh, merged, rtol=1e-6, atol=1e-6)
  trainable = nnx.state(ours, nnx.LoRAParam)
  frozen = nnx.state(ours, lora.BASE_PARAMS)
  n_lora = sum(x.size for x in jax.tree.leaves(trainable))
  expected = config.num_layers * 8 * sum(
      i + o for i, o in [(64, 64)] * 4 + [(64, 176), (64, 176), (176, 64)])
  assert n_lora == expected
  assert not any(isinstance(v, nnx.LoRAParam) for v in jax.tree.leaves(frozen, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def test_lora_dropout_is_active_only_in_training():
  config = llama.tiny()
  from vtimellm_jax.models.llama import LlamaForCausalLM
  model = LlamaForCausalLM(config, nnx.Rngs(0))
  lora.attach_lora(model, lora.LoraConfig(rank=4, alpha=8.0, dropout=0.5), nnx.Rngs(1))
  for _, layer in lora.lora_layers(model):
    layer.lora_b[...] = jnp.ones_like(layer.lora_b[...]) * 0.1
  ids = jnp.arange(3, 11)[None]
  model.train()
  a, b = model(ids), model(ids)
  assert not np.allclose(np.asarray(a), np.asarray(b))
  model.eval()
  np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(model(ids)))


def test_saved_lora_model_loads_whole(tmp_path):
  from vtimellm_jax.models.load import load_model, save_model
  from vtimellm_jax.models.vtimellm import VTimeLLM
  config = llama.tiny(num_layers=1)
  model = VTimeLLM(config, nnx.Rngs(0))
  lora.attach_lora(model, lora.LoraConfig(rank=4, alpha=16.0, dropout=0.0, targets=("q_proj", "up_proj")), nnx.Rngs(1))
  for _, layer in lora.lora_layers(model):
    if layer.has_lora:
      layer.lora_b[...] = jnp.full_like(layer.lora_b[...], 0.01)
  save_model(model, tmp_path / "m")
  loaded = load_model(tmp_path / "m")
  assert isinstance(loaded, VTimeLLM) and loaded.model.layers.self_attn.q_proj.lora_scaling == 4.0
  ids = jnp.array([[1, -200, 5, 6]])
  feats = jnp.ones((1, 2, 768))
  np.testing.assert_array_equal(np.asarray(loaded(ids, jnp.ones_like(ids), feats)[0]),
                                np.asarray(model(ids, jnp.ones_like(ids), feats)[0]))


def _threshold(rate):
  return round((1 - rate) * 2**32)


def _reference_keep(key, shape, rate):
  """The mask rule, written independently in numpy: element (row, j) of [..., width] (row: the
  leading indices flattened) is kept when lowbias32(lowbias32(row * 0x9E3779B9 + k0) ^
  lowbias32(j * 0x85EBCA6B + k1)) < round((1 - rate) * 2^32), all mod 2^32."""
  mask32 = (1 << 32) - 1

  def mix(h):
    h ^= h >> 16
    h = (h * 0x7FEB352D) & mask32
    h ^= h >> 15
    h = (h * 0x846CA68B) & mask32
    return h ^ (h >> 16)

  k0, k1 = (int(w) for w in np.asarray(jax.random.key_data(key)).reshape(-1)[:2])
  *lead, width = shape
  rows = np.arange(int(np.prod(lead)), dtype=np.uint64).reshape(*lead, 1)
  cols = np.arange(width, dtype=np.uint64)
  h = mix((rows * 0x9E3779B9 + k0) & mask32)
  h = mix(h ^ mix((cols * 0x85EBCA6B + k1) & mask32))
  return h < _threshold(rate)


def _dropout_branch_reference(x, a, b, key, scaling, rate):
  """The LoRA branch with that mask and plain autodiff: scaling * dropout(x) @ a @ b."""
  if key is None:
    return (x @ a) @ b * scaling
  dropped = jnp.where(_reference_keep(key, x.shape, rate), x, 0.0) / (_threshold(rate) / 2**32)
  return (dropped @ a) @ b * scaling


def test_keep_probability_is_quantised_to_thirty_two_bits():
  assert lora.keep_probability(0.05) == round(0.95 * 2**32) / 2**32
  assert abs(lora.keep_probability(0.05) - 0.95) < 2**-32
  assert lora.keep_probability(0.3) == _threshold(0.3) / 2**32


def test_lora_delta_value_and_gradients_equal_autodiff_of_the_dropout_branch():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((2, 5, 16)), jnp.float32)
  a = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)
  b = jnp.asarray(rng.standard_normal((4, 12)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((2, 5, 12)), jnp.float32)
  for key, rate in ((jax.random.key(3), 0.3), (None, 0.0)):
    ours, ours_vjp = jax.vjp(lambda x, a, b: lora.lora_delta(x, a, b, key, 2.0, rate), x, a, b)
    ref, ref_vjp = jax.vjp(lambda x, a, b: _dropout_branch_reference(x, a, b, key, 2.0, rate), x, a, b)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-5)
    for got, want in zip(ours_vjp(g), ref_vjp(g)):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
  # With dropout some inputs get no gradient through the branch, and which ones follows the key.
  dx = jax.grad(lambda x: lora.lora_delta(x, a, b, jax.random.key(3), 2.0, 0.3).sum())(x)
  dropped = np.asarray(dx) == 0
  assert 0.1 < dropped.mean() < 0.5
  dx_other = jax.grad(lambda x: lora.lora_delta(x, a, b, jax.random.key(4), 2.0, 0.3).sum())(x)
  assert not np.array_equal(dropped, np.asarray(dx_other) == 0)


def test_forward_and_backward_draw_the_same_mask():
  # With A and B the identity the branch is scaling * dropout(x): the forward's output is zero exactly
  # where its mask dropped, and the input gradient exactly where the backward's mask dropped.
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.uniform(1.0, 2.0, (4, 64, 32)), jnp.float32)
  g = jnp.asarray(rng.uniform(1.0, 2.0, (4, 64, 32)), jnp.float32)
  eye = jnp.eye(32, dtype=jnp.float32)
  key = jax.random.key(11)

  @jax.jit
  def forward_and_dx(x, g):
    y, vjp = jax.vjp(lambda x: lora.lora_delta(x, eye, eye, key, 1.0, 0.25), x)
    return y, vjp(g)[0]

  y, dx = forward_and_dx(x, g)
  forward_kept, backward_kept = np.asarray(y) != 0, np.asarray(dx) != 0
  assert 0.6 < forward_kept.mean() < 0.9
  np.testing.assert_array_equal(forward_kept, backward_kept)
  np.testing.assert_array_equal(forward_kept, _reference_keep(key, x.shape, 0.25))


def test_keep_rate_is_within_a_thousandth_of_one_minus_p_over_ten_million_draws():
  rate = 0.05
  x = jnp.ones((10, 1000, 1000), jnp.float32)
  a, b = jnp.ones((1000, 1), jnp.float32), jnp.ones((1, 1), jnp.float32)
  # Every input feature reaches the output, so the input gradient is non-zero exactly where kept.
  dx = jax.jit(jax.grad(lambda x: lora.lora_delta(x, a, b, jax.random.key(0), 1.0, rate).sum()))(x)
  kept = np.asarray(dx) != 0
  assert kept.size == 10**7
  assert abs(kept.mean() - (1 - rate)) < 1e-3, kept.mean()


def test_masks_need_no_threefry_and_look_independent():
  # The cost: the mask is integer arithmetic on the element's index, no threefry call (bernoulli's
  # is one hash of 20 rounds per element).
  shape = (8, 256, 4096)
  key = jax.random.key(0)
  x = jax.ShapeDtypeStruct(shape, jnp.bfloat16)
  a, b = jax.ShapeDtypeStruct((4096, 64), jnp.bfloat16), jax.ShapeDtypeStruct((64, 4096), jnp.bfloat16)
  step = lambda x, a, b: jax.vjp(lambda *p: lora.lora_delta(*p, key, 2.0, 0.05), x, a, b)[1](  # noqa: E731
      jnp.ones(shape, jnp.bfloat16))
  assert "threefry" not in jax.jit(step).lower(x, a, b).as_text()
  assert "threefry" in jax.jit(lambda k: jax.random.bernoulli(k, 0.95, shape)).lower(key).as_text()
  # Neighbours along either axis, and the masks of two keys, agree no more than chance does.
  keep = _reference_keep(jax.random.key(1), (1000, 1000), 0.5).astype(np.float64)
  other = _reference_keep(jax.random.key(2), (1000, 1000), 0.5).astype(np.float64)
  centred = lambda m: m - m.mean()  # noqa: E731
  for left, right in ((keep[:, 1:], keep[:, :-1]), (keep[1:], keep[:-1]), (keep, other)):
    correlation = (centred(left) * centred(right)).mean() / (left.std() * right.std())
    assert abs(correlation) < 0.01, correlation


def test_mask_does_not_depend_on_sharding():
  # The index hashed is the element's global one: a batch split over 8 devices draws the same mask.
  mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))  # as the trainer's mesh
  x = jnp.ones((8, 6, 10), jnp.float32)
  split = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  mask = jax.jit(lambda x: lora._keep(jax.random.key(4), x, 0.3))  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(mask(split)), np.asarray(mask(x)))
  np.testing.assert_array_equal(np.asarray(mask(x)), _reference_keep(jax.random.key(4), x.shape, 0.3))


def test_linear_draws_its_key_from_the_stream_as_nnx_dropout_does():
  layer = lora.Linear(16, 12, axes=(None, None), rngs=nnx.Rngs(0))
  layer.attach_lora(lora.LoraConfig(rank=4, alpha=8.0, dropout=0.4), nnx.Rngs(1))
  layer.lora_b[...] = jnp.ones_like(layer.lora_b[...]) * 0.1
  x = jnp.asarray(np.random.default_rng(2).standard_normal((2, 3, 16)), jnp.float32)
  for _ in range(2):  # the stream advances per call, as nnx.Dropout's does
    # The key nnx.Dropout would draw now: the module's own mask is its Bernoulli draw from that key.
    stream = nnx.clone(layer.lora_dropout)
    key = nnx.clone(stream).rngs()
    want_bernoulli = jax.random.bernoulli(key, 0.6, x.shape)
    np.testing.assert_array_equal(np.asarray(stream(x) != 0), np.asarray(want_bernoulli))
    keep = _reference_keep(key, x.shape, 0.4)
    dropped = jnp.where(keep, x, 0.0) / lora.keep_probability(0.4)
    want = x @ layer.kernel[...] + (dropped @ layer.lora_a[...]) @ layer.lora_b[...] * layer.lora_scaling
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(want), rtol=1e-5, atol=1e-5)
  layer.lora_dropout.deterministic = True
  np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(
      x @ layer.kernel[...] + (x @ layer.lora_a[...]) @ layer.lora_b[...] * layer.lora_scaling), rtol=1e-5, atol=1e-5)


def test_lora_config_refuses_a_dropout_outside_zero_to_one():
  for rate in (-0.1, 1.0):
    try:
      lora.LoraConfig(dropout=rate)
    except ValueError as e:
      assert "dropout" in str(e)
    else:
      raise AssertionError(f"dropout {rate} was accepted")
