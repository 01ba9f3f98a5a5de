"""Batched autoregressive generation: a jitted prefill, then a `while_loop` decode over a static KV cache.

The prompt arrives as embeddings (`float[B, T, D]`, right-padded, real lengths `int[B]`), so the
same code serves plain LLaMA ids (`model.model.embed`) and VTimeLLM prompts with spliced frame
features (`model.embed_inputs`). Programs compile per batch size, prompt length, cache length,
number of new tokens and sampling kind (greedy, or sampled with or without top-p and with its
top-k); the temperature, top-p and the eos and stop ids are traced values:

  prefill  all T prompt positions of every row are written to a cache of at least
           T + max_new_tokens slots (the prompt attends to itself through the model's attention
           kernel); each row's first new token comes from the hidden state at its own last real
           position.
  decode   new token i (from 0) of row b is fed back at rope position lengths[b] + i and written
           at cache slot T + i, after the padded prompts (one shared slot per step for all rows);
           it attends to its row's prompt and the row's tokens before it, never to the prompt
           padding, so rows of different lengths decode together without left padding. The loop
           runs in stretches (`decode_segments`), each a compiled while loop reading only the first
           slots of the cache that its steps can have written, rounded up to a power of two
           (`kv_cache.decode_window`).

A row stops at its first `eos_id` or `stop_ids` token (ChatGLM3 also stops at `<|user|>`, the turn
that would follow), which is not part of the answer; the loop ends when every row has stopped or after
`max_new_tokens`. Sampling follows HF's order (temperature, then top-k, then top-p); every row draws
from its own key folded with the step number, so a row's tokens do not depend on what it is batched
with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vtimellm_jax.errors import UserError
from vtimellm_jax.models import kv_cache
from vtimellm_jax.models.kv_cache import CacheStep, KVCache

EOS_ID = 2
RELEASE_TEMPERATURE = 0.05  # the release samples with this temperature at inference
RELEASE_MAX_NEW_TOKENS = 1024


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """Decoding settings."""

  max_new_tokens: int = RELEASE_MAX_NEW_TOKENS
  temperature: float = RELEASE_TEMPERATURE  # 0: greedy (argmax)
  top_p: float = 1.0  # 1: no nucleus filtering
  top_k: int = 0  # 0: no top-k filtering (HF generate's default is 50; see docs/inference.md)
  eos_id: int = EOS_ID  # a negative id never matches: always max_new_tokens tokens
  stop_ids: tuple[int, ...] = ()  # more ids that end a row as eos does

  def __post_init__(self):
    if self.max_new_tokens < 1:
      raise UserError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
    if not self.temperature >= 0:
      raise UserError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
    # top_k picks the compiled program (a static shape), so it must be a plain integer.
    if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
      raise UserError(f"top_k must be an integer >= 0 (0 is off), got {self.top_k!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0

  @property
  def static_top_k(self) -> int:
    """The top-k of the compiled program: 0 when greedy (unused), a plain int (a jit static)."""
    return 0 if self.greedy else int(self.top_k)


def top_k_filter(logits_bv: jax.Array, top_k: int) -> jax.Array:
  """Returns logits with every token below the `top_k`-th largest logit of its row set to -inf.

  HF's `TopKLogitsWarper`: tokens tied with the k-th largest logit all stay, so more than k can
  remain; k beyond the vocabulary keeps everything. `top_k` is static (it sets a shape).
  """
  top_k = min(top_k, logits_bv.shape[-1])
  kth_largest = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]
  return jnp.where(logits_bv < kth_largest, -jnp.inf, logits_bv)


def top_p_filter(logits_bv: jax.Array, top_p: jax.Array | float) -> jax.Array:
  """Returns logits with every token outside the nucleus of mass `top_p` set to -inf.

  The nucleus is the smallest set of most probable tokens whose probability reaches `top_p`
  (HF's `TopPLogitsWarper`: a token stays if the mass strictly before it is below `top_p`); the
  most probable token always stays.
  """
  order = jnp.argsort(-logits_bv, axis=-1)
  sorted_logits = jnp.take_along_axis(logits_bv, order, axis=-1)
  probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = (mass_before < top_p).at[:, 0].set(True)
  # Scatter the decision back to vocabulary order (ties keep their own decisions).
  keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits_bv.shape[0])[:, None], order].set(keep_sorted)
  return jnp.where(keep, logits_bv, -jnp.inf)


def _choose(logits_bv, keys_b, temperature, top_p, *, greedy: bool, nucleus: bool, top_k: int):
  """Returns int32[B] tokens; `greedy`, `nucleus` and `top_k` are static, temperature and top_p traced."""
  logits_bv = logits_bv.astype(jnp.float32)
  if greedy:
    return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  logits_bv = logits_bv / temperature
  if top_k:
    logits_bv = top_k_filter(logits_bv, top_k)
  if nucleus:
    logits_bv = top_p_filter(logits_bv, top_p)
  return jax.vmap(jax.random.categorical)(keys_b, logits_bv).astype(jnp.int32)


_choose_jit = jax.jit(_choose, static_argnames=("greedy", "nucleus", "top_k"))


def next_token(logits_bv: jax.Array, keys_b: jax.Array, config: GenerationConfig) -> jax.Array:
  """Returns int32[B]: the chosen token of each row (argmax, or a draw with its own key)."""
  return _choose_jit(logits_bv, keys_b, config.temperature, config.top_p, greedy=config.greedy,
                     nucleus=config.top_p < 1, top_k=config.static_top_k)


def prefill(model, embeds_btd: jax.Array, lengths_b: jax.Array, cache: KVCache, row0=0):
  """Returns (cache, float[B, V] logits at each row's last real position) after writing the prompts.

  Row b of the batch fills cache row row0 + b from position 0; the prompt attends only to itself.
  """
  b, t, _ = embeds_btd.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  hidden, cache, _ = model.model(embeds_btd, positions, lengths_b, cache=cache, cache_step=CacheStep(row0=row0))
  # Only each row's last real position is projected to the vocabulary.
  return cache, model.lm_head(hidden[jnp.arange(b), lengths_b - 1])


def decode_step(model, cache: KVCache, tokens_b: jax.Array, step: CacheStep):
  """Returns (cache, float[B, V] logits): token b fed at rope position step.positions_bt[b, 0].

  It is written and attends as `step` says (`kv_cache.CacheStep`), reading only the first
  `step.window` (static) slots of the cache.
  """
  positions_bt = step.positions_bt
  h, cache, _ = model.model(model.model.embed(tokens_b[:, None]), positions_bt, positions_bt[:, 0] + 1, cache=cache,
                            cache_step=step)
  return cache, model.lm_head(h[:, 0])


def decode_segments(prompt_len: int, max_new_tokens: int, cache_len: int) -> list[tuple[int, int]]:
  """Returns (end, window) per stretch of the decode loop: iterations up to `end` (exclusive) read `window` slots.

  Iteration i (from 1) writes token i - 1 of every row at slot prompt_len + i - 1, so it reads
  prompt_len + i slots; each stretch reads the smallest window (`kv_cache.decode_window`) that
  covers its last iteration.
  """
  segments, start = [], 1
  window = kv_cache.decode_window(prompt_len + 1, cache_len)
  while start < max_new_tokens:
    end = min(max_new_tokens, window - prompt_len + 1)
    segments.append((end, window))
    start, window = end, kv_cache.decode_window(window + 1, cache_len)
  return segments


def _stops(token_b, eos_id, stop_ids_k):
  return (token_b == eos_id) | jnp.any(token_b[:, None] == stop_ids_k[None], axis=-1)


def _step_keys(keys_b, i):
  return jax.vmap(jax.random.fold_in, (0, None))(keys_b, i)


def _start(graphdef, state, embeds_btd, lengths_b, keys_b, temperature, top_p, eos_id, stop_ids_k, *,
           cache_len: int, max_new_tokens: int, greedy: bool, nucleus: bool, top_k: int):
  """Returns (tokens int32[B, max_new_tokens] holding each row's first token, done bool[B], cache)."""
  model = nnx.merge(graphdef, state)
  b = embeds_btd.shape[0]
  cache, logits = prefill(model, embeds_btd, lengths_b, model.init_cache(b, cache_len))
  first = _choose(logits, _step_keys(keys_b, 0), temperature, top_p, greedy=greedy, nucleus=nucleus, top_k=top_k)
  tokens = jnp.full((b, max_new_tokens), eos_id, jnp.int32).at[:, 0].set(first)
  return tokens, _stops(first, eos_id, stop_ids_k), cache


def _continue(graphdef, state, cache, tokens, done, i, end, prompt_len, lengths_b, keys_b, temperature, top_p, eos_id,
              stop_ids_k, *, window: int, greedy: bool, nucleus: bool, top_k: int):
  """Returns (i, tokens, done, cache) after decode iterations i .. end - 1, or until every row stops."""
  model = nnx.merge(graphdef, state)

  def cond(carry):
    i, _, done, _ = carry
    return (i < end) & ~jnp.all(done)

  def body(carry):
    i, tokens, done, cache = carry
    # Every row writes its token at slot prompt_len + i - 1, past the padded prompts; its rope
    # position follows its own prompt.
    step = CacheStep(positions_bt=(lengths_b + i - 1)[:, None], window=window, slot=prompt_len + i - 1,
                     prompt_lengths_b=lengths_b, prompt_len=prompt_len)
    cache, logits = decode_step(model, cache, tokens[:, i - 1], step)
    chosen = _choose(logits, _step_keys(keys_b, i), temperature, top_p, greedy=greedy, nucleus=nucleus, top_k=top_k)
    token = jnp.where(done, eos_id, chosen)
    return i + 1, tokens.at[:, i].set(token), done | _stops(token, eos_id, stop_ids_k), cache

  return jax.lax.while_loop(cond, body, (i, tokens, done, cache))


_SAMPLING = ("greedy", "nucleus", "top_k")
# The prefill compiles per (model, batch, prompt length, cache length, max_new_tokens, sampling
# kind); a stretch of the decode loop per (model, batch, cache length, max_new_tokens, window,
# sampling kind). The cache length is rounded up (`kv_cache.cache_length`), so prompts of nearby
# lengths share the decode programs; prompt lengths, temperature, top-p, eos and stop ids are traced.
_start_jit = jax.jit(_start, static_argnums=(0,), static_argnames=("cache_len", "max_new_tokens") + _SAMPLING)
_continue_jit = jax.jit(_continue, static_argnums=(0,), static_argnames=("window",) + _SAMPLING,
                        donate_argnums=(2, 3))


@dataclasses.dataclass(frozen=True)
class Generated:
  """Generated tokens of a batch: `tokens[b, :lengths[b]]` is row b's answer (eos excluded)."""

  tokens: np.ndarray  # int32[B, max_new_tokens]
  lengths: np.ndarray  # int32[B]
  steps: int  # decode iterations run (max over rows, eos included)

  def rows(self) -> list[list[int]]:
    """Returns every row's token ids, without the prompt and without the eos."""
    return [self.tokens[b, :n].tolist() for b, n in enumerate(self.lengths)]


def generate(model, embeds_btd: jax.Array, lengths_b: jax.Array | Sequence[int], config: GenerationConfig,
             keys_b: jax.Array | None = None, *, seed: int = 0) -> Generated:
  """Returns the tokens generated after each right-padded prompt of `embeds_btd`.

  Args:
    model: a `LlamaForCausalLM` or `VTimeLLM`.
    embeds_btd: float[B, T, D] prompt embeddings, right-padded.
    lengths_b: int[B] real prompt lengths (>= 1, <= T).
    config: decoding settings.
    keys_b: one PRNG key per row (`jax.random.split(key, B)`); default from `seed`. Unused if greedy.
    seed: seed of the default keys.
  """
  b, t, _ = embeds_btd.shape
  lengths = np.asarray(lengths_b, np.int32)
  if lengths.shape != (b,) or lengths.min() < 1 or lengths.max() > t:
    raise UserError(f"prompt lengths {lengths.tolist()} must be {b} values in [1, {t}]")
  limit = model.config.max_position_embeddings
  if t + config.max_new_tokens > limit:
    raise UserError(f"prompt of {t} positions + {config.max_new_tokens} new tokens exceeds the model's "
                    f"{limit} positions; lower --max-new-tokens")
  if keys_b is None:
    keys_b = jax.random.split(jax.random.key(seed), b)
  graphdef, state = nnx.split(model)
  n = config.max_new_tokens
  cache_len = kv_cache.cache_length(t + n)
  sampling = dict(greedy=config.greedy, nucleus=config.top_p < 1, top_k=config.static_top_k)
  traced = (keys_b, jnp.float32(max(config.temperature, 1e-6)), jnp.float32(config.top_p), jnp.int32(config.eos_id),
            jnp.asarray(config.stop_ids, jnp.int32).reshape(-1))
  lengths_b = jnp.asarray(lengths)
  tokens, done, cache = _start_jit(graphdef, state, embeds_btd, lengths_b, *traced, cache_len=cache_len,
                                   max_new_tokens=n, **sampling)
  # The decode loop runs in stretches, each reading the cache up to its own window (a row's step
  # costs the slots written so far, rounded up, not the whole cache); a stretch is compiled when
  # first reached, and none runs once every row has stopped.
  steps = 1
  for end, window in decode_segments(t, n, cache_len):
    if bool(jnp.all(done)):
      break
    steps, tokens, done, cache = _continue_jit(graphdef, state, cache, tokens, done, jnp.int32(steps), jnp.int32(end),
                                               jnp.int32(t), lengths_b, *traced, window=window, **sampling)
    steps = int(steps)
  tokens = np.asarray(tokens)
  stopped = (tokens == config.eos_id) | np.isin(tokens, config.stop_ids)
  answer_lengths = np.where(stopped.any(-1), stopped.argmax(-1), tokens.shape[1]).astype(np.int32)
  return Generated(tokens, answer_lengths, int(steps))


@nnx.jit
def _embed_ids(model, ids_bt):
  """Returns float[B, T, D] token embeddings."""
  return model.model.embed(ids_bt)


def generate_from_ids(model, prompts: Sequence[Sequence[int]], config: GenerationConfig, *,
                      pad_multiple: int = 16, **kwargs) -> Generated:
  """Returns the tokens generated after each prompt of token ids (plain LLaMA, no features)."""
  ids, lengths = pad_right(prompts, multiple=pad_multiple)
  return generate(model, _embed_ids(model, jnp.asarray(ids)), lengths, config, **kwargs)


def pad_right(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Returns (int32[B, T] ids right-padded with `pad_id`, int32[B] lengths); T rounds up to `multiple`.

  Rounding T up lets prompts of nearby lengths share one compiled program.
  """
  if not prompts or any(len(p) == 0 for p in prompts):
    raise UserError("every prompt needs at least one token")
  lengths = np.asarray([len(p) for p in prompts], np.int32)
  t = -(-int(lengths.max()) // multiple) * multiple
  ids = np.full((len(prompts), t), pad_id, np.int32)
  for row, prompt in enumerate(prompts):
    ids[row, :len(prompt)] = prompt
  return ids, lengths
