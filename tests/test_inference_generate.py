"""Generation equals HF `generate` on the same weights; batching, stopping and sampling behave."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from hf_reference import hf_llama, jax_from_hf
from vtimellm_jax.errors import UserError
from vtimellm_jax.inference import generate as gen
from vtimellm_jax.models.llama import LlamaConfig

CONFIG = LlamaConfig.tiny(num_kv_heads=2)
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


def _hf_greedy(hf, prompt, max_new_tokens, eos_id=2):
  with torch.no_grad():
    out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                      max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos_id, pad_token_id=0)
  ids = out[0, len(prompt):].tolist()
  return ids[:ids.index(eos_id)] if eos_id in ids else ids


def test_greedy_batch_equals_hf_generate_per_row(models):
  hf, ours = models
  prompts = _prompts([9, 3, 6])
  rows = gen.generate_from_ids(ours, prompts, GREEDY).rows()
  for prompt, row in zip(prompts, rows):
    assert row == _hf_greedy(hf, prompt, NEW)
  assert all(len(r) == NEW for r in rows)


def test_stops_at_eos_per_row(models):
  hf, ours = models
  prompts = _prompts([5, 8, 4], seed=1)
  # Make row 0's fourth greedy token the stop token: row 0 must stop there, the others go on.
  eos = _hf_greedy(hf, prompts[0], 6, eos_id=-1)[3]
  config = gen.GenerationConfig(max_new_tokens=NEW, temperature=0, eos_id=eos)
  out = gen.generate_from_ids(ours, prompts, config)
  rows = out.rows()
  assert len(rows[0]) == 3 and eos not in rows[0]
  for prompt, row in zip(prompts, rows):
    assert row == _hf_greedy(hf, prompt, NEW, eos_id=eos)
  # Tokens after a row's stop are eos filler, never new text.
  assert (out.tokens[0, 3:] == eos).all()


def test_all_rows_stopped_ends_the_loop(models):
  hf, ours = models
  prompt = _prompts([4], seed=2)[0]
  first = _hf_greedy(hf, prompt, 1, eos_id=-1)[0]
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
  for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(max_new_tokens=0)):
    with pytest.raises(UserError):
      gen.GenerationConfig(**bad)


def test_prompt_plus_new_tokens_beyond_positions_is_a_user_error(models):
  _, ours = models
  with pytest.raises(UserError, match="max-new-tokens"):
    gen.generate_from_ids(ours, _prompts([10]), gen.GenerationConfig(max_new_tokens=CONFIG.max_position_embeddings))
