"""Generation equals HF `generate` on the same weights; batching, stopping and sampling behave."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_reference import hf_greedy, hf_llama, jax_from_hf
from vtimellm_jax.errors import UserError
from vtimellm_jax.inference import generate as gen
from vtimellm_jax.models import llama

CONFIG = llama.tiny(num_kv_heads=2)
# Tests share batch 3, prompts padded to 16 and 8 new tokens, so they share compiled programs.
NEW = 8
GREEDY = gen.GenerationConfig(max_new_tokens=NEW, temperature=0)
SAMPLED = gen.GenerationConfig(max_new_tokens=NEW, temperature=1.0, top_p=0.9)


@pytest.fixture(scope="module")
def models():
  hf = hf_llama(CONFIG, seed=3)
  return hf, jax_from_hf(hf, CONFIG)


def _prompts(lengths, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(3, CONFIG.vocab_size, n).tolist() for n in lengths]


def test_greedy_batch_equals_hf_generate_per_row(models):
  hf, ours = models
  prompts = _prompts([9, 3, 6])
  rows = gen.generate_from_ids(ours, prompts, GREEDY).rows()
  for prompt, row in zip(prompts, rows):
    assert row == hf_greedy(hf, prompt, NEW)
  assert all(len(r) == NEW for r in rows)


def test_stops_at_eos_per_row(models):
  hf, ours = models
  prompts = _prompts([5, 8, 4], seed=1)
  # Make row 0's fourth greedy token the stop token: row 0 must stop there, the others go on.
  eos = hf_greedy(hf, prompts[0], 6, eos_id=-1)[3]
  config = gen.GenerationConfig(max_new_tokens=NEW, temperature=0, eos_id=eos)
  out = gen.generate_from_ids(ours, prompts, config)
  rows = out.rows()
  assert len(rows[0]) == 3 and eos not in rows[0]
  for prompt, row in zip(prompts, rows):
    assert row == hf_greedy(hf, prompt, NEW, eos_id=eos)
  # Tokens after a row's stop are eos filler, never new text.
  assert (out.tokens[0, 3:] == eos).all()


def test_stop_ids_end_a_row_as_eos_does(models):
  hf, ours = models
  prompts = _prompts([5, 8, 4], seed=1)
  # Row 1's third greedy token is a stop id (as ChatGLM3's <|user|>), row 0's fourth the eos.
  stop = hf_greedy(hf, prompts[1], 6, eos_id=-1)[2]
  eos = hf_greedy(hf, prompts[0], 6, eos_id=-1)[3]
  config = gen.GenerationConfig(max_new_tokens=NEW, temperature=0, eos_id=eos, stop_ids=(stop,))
  out = gen.generate_from_ids(ours, prompts, config)
  rows = out.rows()
  assert len(rows[1]) <= 2 and stop not in rows[1] and eos not in rows[0]
  for prompt, row in zip(prompts, rows):
    assert row == hf_greedy(hf, prompt, NEW, eos_id=[eos, stop])
  assert gen.generate_from_ids(ours, prompts, dataclasses.replace(config, stop_ids=())).rows()[1][2] == stop


def test_all_rows_stopped_ends_the_loop(models):
  hf, ours = models
  prompt = _prompts([4], seed=2)[0]
  first = hf_greedy(hf, prompt, 1, eos_id=-1)[0]
  config = gen.GenerationConfig(max_new_tokens=NEW, temperature=0, eos_id=first)
  out = gen.generate_from_ids(ours, [prompt] * 3, config)
  assert out.rows() == [[], [], []]
  assert out.steps == 1  # the decode loop never ran


def test_batched_equals_unbatched_when_sampling(models):
  # (Greedy rows already equal HF's unbatched generate above.) With one key per row, a sampled
  # row does not depend on its batch either.
  _, ours = models
  prompts = _prompts([7, 2, 5], seed=4)
  keys = jax.random.split(jax.random.key(7), 3)
  batched = gen.generate_from_ids(ours, prompts, SAMPLED, keys_b=keys).rows()
  for b, prompt in enumerate(prompts):
    assert gen.generate_from_ids(ours, [prompt], SAMPLED, keys_b=keys[b:b + 1]).rows()[0] == batched[b]


def test_sampling_is_reproducible_and_seeded(models):
  _, ours = models
  prompts = _prompts([6, 6, 3], seed=5)
  first = gen.generate_from_ids(ours, prompts, SAMPLED, seed=11).rows()
  assert gen.generate_from_ids(ours, prompts, SAMPLED, seed=11).rows() == first
  assert gen.generate_from_ids(ours, prompts, SAMPLED, seed=12).rows() != first
  assert first != gen.generate_from_ids(ours, prompts, GREEDY).rows()  # it really samples


@pytest.mark.parametrize("top_p", [0.05, 0.3, 0.6, 0.9, 0.99])
def test_top_p_filter_matches_hf_warper(top_p):
  rng = np.random.RandomState(0)
  logits = (rng.normal(0, 2, (6, 50))).astype(np.float32)
  ours = np.asarray(gen.top_p_filter(jnp.asarray(logits), top_p))
  ref = transformers.generation.TopPLogitsWarper(top_p)(None, torch.tensor(logits)).numpy()
  np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
  np.testing.assert_array_equal(ours[~np.isinf(ours)], logits[~np.isinf(ref)])


def _tied_logits(seed=0):
  """float32[6, 50] logits with many exact ties (a few distinct values), so top-k ties matter."""
  rng = np.random.RandomState(seed)
  return rng.randint(-4, 5, (6, 50)).astype(np.float32) * 0.75


@pytest.mark.parametrize("top_k", [1, 2, 5, 17, 50, 80])
@pytest.mark.parametrize("tied", [False, True])
def test_top_k_filter_matches_hf_warper(top_k, tied):
  logits = _tied_logits() if tied else np.random.RandomState(1).normal(0, 2, (6, 50)).astype(np.float32)
  ours = np.asarray(gen.top_k_filter(jnp.asarray(logits), top_k))
  ref = transformers.generation.TopKLogitsWarper(top_k)(None, torch.tensor(logits)).numpy()
  np.testing.assert_array_equal(ours, ref)  # same -inf mask, kept logits untouched
  if tied and top_k == 5:
    assert (~np.isinf(ours)).sum(-1).max() > 5  # ties at the k-th value really kept more than k


@pytest.mark.parametrize("top_k,top_p", [(3, 0.5), (10, 0.9), (10, 0.3), (1, 0.9), (60, 0.6)])
@pytest.mark.parametrize("tied", [False, True])
def test_sampling_filters_match_hf_chain(top_k, top_p, tied):
  # HF's sampling order: temperature, then top-k, then top-p; `_choose` draws from what is left.
  logits = _tied_logits(2) if tied else np.random.RandomState(3).normal(0, 2, (6, 50)).astype(np.float32)
  temperature = 0.7
  chain = transformers.generation.LogitsProcessorList([
      transformers.generation.TemperatureLogitsWarper(temperature),
      transformers.generation.TopKLogitsWarper(top_k),
      transformers.generation.TopPLogitsWarper(top_p)])
  ref = chain(None, torch.tensor(logits)).numpy()
  ours = np.asarray(gen.top_p_filter(gen.top_k_filter(jnp.asarray(logits) / temperature, top_k), top_p))
  if tied:
    # Which of several equal logits at the nucleus' edge stay is the sort's choice (torch's CPU
    # sort is not stable), so compare what stays per row: the same values, as many times.
    for row_ours, row_ref in zip(ours, ref):
      np.testing.assert_allclose(np.sort(row_ours[~np.isinf(row_ours)]), np.sort(row_ref[~np.isinf(row_ref)]),
                                 rtol=1e-6)
  else:
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[~np.isinf(ours)], ref[~np.isinf(ref)], rtol=1e-6)
  # The draws of `next_token` stay among the tokens the filters keep.
  config = gen.GenerationConfig(max_new_tokens=1, temperature=temperature, top_p=top_p, top_k=top_k)
  for seed in range(5):
    drawn = np.asarray(gen.next_token(jnp.asarray(logits), jax.random.split(jax.random.key(seed), 6), config))
    assert not np.isinf(ours[np.arange(6), drawn]).any()


def test_top_k_one_is_greedy(models):
  logits = jnp.asarray(np.random.RandomState(4).normal(0, 1, (8, 50)), jnp.float32)
  keys = jax.random.split(jax.random.key(0), 8)
  top1 = gen.GenerationConfig(max_new_tokens=NEW, temperature=1.0, top_k=1)
  assert np.asarray(gen.next_token(logits, keys, top1)).tolist() == np.argmax(logits, -1).tolist()
  _, ours = models
  prompts = _prompts([9, 3, 6])
  assert gen.generate_from_ids(ours, prompts, top1, seed=5).rows() == gen.generate_from_ids(ours, prompts, GREEDY).rows()
  # Without top-k the same seed samples something else (so the equality above is top-k's doing).
  unfiltered = gen.GenerationConfig(max_new_tokens=NEW, temperature=1.0)
  assert gen.generate_from_ids(ours, prompts, unfiltered, seed=5).rows() != gen.generate_from_ids(ours, prompts, GREEDY).rows()


def test_top_p_samples_only_from_the_nucleus():
  probs = np.array([0.05, 0.5, 0.15, 0.3])  # nucleus of 0.7: tokens 1 and 3 (0.5 + 0.3)
  logits = jnp.asarray(np.log(probs)[None].repeat(400, 0), jnp.float32)
  keys = jax.random.split(jax.random.key(0), 400)
  config = gen.GenerationConfig(max_new_tokens=1, temperature=1.0, top_p=0.7)
  drawn = np.asarray(gen.next_token(logits, keys, config))
  assert set(drawn.tolist()) == {1, 3}
  # Within the nucleus the draw follows the renormalised probabilities (0.625 / 0.375).
  assert 0.5 < (drawn == 1).mean() < 0.75
  unfiltered = np.asarray(gen.next_token(logits, keys, gen.GenerationConfig(max_new_tokens=1, temperature=1.0)))
  assert set(unfiltered.tolist()) == {0, 1, 2, 3}


def test_temperature_zero_is_argmax_and_bad_settings_are_user_errors():
  logits = jnp.asarray([[0.1, 3.0, 2.9], [5.0, -1.0, 4.0]])
  keys = jax.random.split(jax.random.key(0), 2)
  assert np.asarray(gen.next_token(logits, keys, gen.GenerationConfig(temperature=0))).tolist() == [1, 0]
  for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_new_tokens=0), dict(top_k=-1),
              dict(top_k=2.5), dict(top_k=True)):
    with pytest.raises(UserError):
      gen.GenerationConfig(**bad)


def test_prompt_plus_new_tokens_beyond_positions_is_a_user_error(models):
  _, ours = models
  with pytest.raises(UserError, match="max-new-tokens"):
    gen.generate_from_ids(ours, _prompts([10]), gen.GenerationConfig(max_new_tokens=CONFIG.max_position_embeddings))
