"""Continuous batching: concurrent requests share one KV cache of fixed slots and one decode step.

The cache holds `slots` rows of `context` positions. A waiting request is prefilled into the lowest
free row (its prompt padded to a multiple of `answerer.PAD_MULTIPLE` tokens, the frame features
spliced in at its placeholder) and yields its first token; requests that wait together are
prefilled together into free rows that lie together (a power-of-two count, padded to the longest).
After that each decode step advances every busy row at once, each writing at its own position (as
`generate` does for rows of different lengths). A row that reaches its eos or its token budget frees
its slot, and the next waiting request is prefilled into it before the next step.

A decode step costs what its batch and its window hold, not what the cache holds: it runs on the
first `batch_bucket(busy, slots)` rows (the smallest power of two that holds the busy rows) and
reads them only up to the busiest row's position, rounded up to a power of two
(`kv_cache.decode_window`). The busy rows are kept within that bucket: before a step, a busy row
beyond it moves (its whole cache row, once) into a free row below, so a lone request decodes at
batch 1 however many slots the engine has. One compiled decode program serves each (batch bucket,
window, nucleus) triple, compiled when a step first needs it or ahead by `precompile`. Free rows
inside the bucket run through the step too; what they write is never read, since a prefill writes
its row from position 0 and attention only sees positions before a row's own.

A row's tokens depend on nothing but its own request: in a prefill or a decode step rows never mix
and the positions past a row's own (its padding included) weigh exactly zero, so an answer is
the same whether its request came alone or among many (on CPU bit for bit; on a GPU another window,
batch bucket or prefill batch may sum the same terms in another order: the last bit of a logit).
Sampling draws token i of a request with its key folded with i, as `generate` does, so a request
with the key `chat` uses gets `chat`'s tokens.

All device work runs on the engine's own thread; `submit` may be called from any thread and returns
a `concurrent.futures.Future` of the generated token ids. A request may also name a listener that
the engine hands each new token as soon as its step has decoded it (streaming), and `cancel` frees a
request's slot before the next step (a client that went away stops costing a row).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import os
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from vtimellm_jax.errors import UserError
from vtimellm_jax.inference import answerer as answerer_lib
from vtimellm_jax.inference import generate as generate_lib
from vtimellm_jax.models import kv_cache
from vtimellm_jax.models.kv_cache import CacheStep


class QueueFull(Exception):
  """Raised by `submit` when `max_waiting` requests already wait for a slot."""


class Cancelled(Exception):
  """The outcome of a request stopped by `Engine.cancel` before its answer was complete."""


@dataclasses.dataclass(frozen=True)
class Request:
  """One prompt to answer: token ids with one placeholder, its features, and its decoding settings."""

  prompt_ids: tuple[int, ...]
  features: np.ndarray  # float32[N, feature_dim]
  max_new_tokens: int
  temperature: float = 0.0  # 0: greedy
  top_p: float = 1.0
  key: jax.Array | None = None  # a typed PRNG key (sampling); token i draws with fold_in(key, i)


# Called on the engine thread with a request's newly decoded token ids (eos never among them); it must
# return at once (hand the ids to another thread or loop), and an exception it raises fails its request.
TokenListener = Callable[[list[int]], None]


@dataclasses.dataclass
class _Row:
  """A busy slot: its request, its future, where its next token goes, and what it has generated."""

  request: Request
  future: concurrent.futures.Future
  length: int  # prompt positions (features spliced in)
  key_data: np.ndarray  # uint32 data of the request's key
  tokens: list
  listener: TokenListener | None


def _pick(logits_bv, key_data_b, steps_b, temperature_b, top_p_b, *, nucleus: bool):
  """Returns int32[B]: per row, the argmax where its temperature is 0, else a draw as `generate` makes it."""
  logits_bv = logits_bv.astype(jnp.float32)
  greedy = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(key_data_b), steps_b)
  scaled = logits_bv / jnp.maximum(temperature_b, 1e-6)[:, None]
  if nucleus:  # rows with top_p 1 keep every token, as `generate` without nucleus filtering
    scaled = jnp.where((top_p_b < 1)[:, None], generate_lib.top_p_filter(scaled, top_p_b[:, None]), scaled)
  sampled = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
  return jnp.where(temperature_b == 0, greedy, sampled)


def _prefill(graphdef, state, cache, row0, ids_kt, mask_kt, features_knf, key_data_k, temperature_k, top_p_k, *,
             nucleus: bool):
  """Returns (cache with rows row0 .. row0 + K - 1 holding the K prompts, int32[K] first tokens,
  int32[K] prompt lengths)."""
  model = nnx.merge(graphdef, state)
  embeds, mask, _ = model.embed_inputs(ids_kt, mask_kt, features_knf)
  lengths = mask.sum(-1).astype(jnp.int32)
  cache, logits = generate_lib.prefill(model, embeds, lengths, cache, row0=row0)
  tokens = _pick(logits, key_data_k, jnp.zeros(lengths.shape, jnp.int32), temperature_k, top_p_k, nucleus=nucleus)
  return cache, tokens, lengths


def _decode(graphdef, state, cache, tokens_s, positions_s, steps_s, key_data_s, temperature_s, top_p_s, *,
            window: int, nucleus: bool):
  """Returns (cache, int32[S] next tokens): every row's token fed at its own position, reading `window` slots."""
  model = nnx.merge(graphdef, state)
  step = CacheStep(positions_bt=positions_s[:, None], window=window)
  cache, logits = generate_lib.decode_step(model, cache, tokens_s, step)
  return cache, _pick(logits, key_data_s, steps_s, temperature_s, top_p_s, nucleus=nucleus)


def _move(cache, src, dst):
  """Returns the cache with row `dst` holding row `src`'s keys and values, every layer and position."""

  def move(c):
    rows = c.ndim - 4  # [L, B, ...] stacked layers, or [B, ...] a layer's own buffer (kv_cache.KVCache)
    return jax.lax.dynamic_update_index_in_dim(c, jax.lax.dynamic_index_in_dim(c, src, rows), dst, rows)

  return jax.tree.map(move, cache)


# The cache is donated: each call updates it in place. Decode steps are compiled ahead of time by the
# engine (`Engine._program`), one per (batch bucket, window, nucleus); a prefill per (rows, prompt shape).
_prefill_jit = jax.jit(_prefill, static_argnums=(0,), static_argnames=("nucleus",), donate_argnums=(2,))
_decode_jit = jax.jit(_decode, static_argnums=(0,), static_argnames=("window", "nucleus"), donate_argnums=(2,))
_move_jit = jax.jit(_move, donate_argnums=(0,))


def batch_bucket(busy: int, slots: int) -> int:
  """Returns the rows a decode step runs: the smallest power of two >= `busy` (at least 1), at most `slots`."""
  return min(1 << max(busy - 1, 0).bit_length(), slots)


@dataclasses.dataclass
class Stats:
  """Counters of an engine's work (read by /health and the benchmark)."""

  completed: int = 0
  cancelled: int = 0  # requests stopped by `cancel`, waiting or running
  decode_steps: int = 0
  prefills: int = 0  # requests prefilled
  prefill_batches: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # calls per size
  busy_slot_steps: int = 0  # sum over decode steps of the rows that were busy
  batch_steps: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # steps per batch
  moves: int = 0  # busy rows moved down into a smaller batch bucket


class Engine:
  """Answers `Request`s concurrently on `slots` rows of one KV cache (module docstring)."""

  def __init__(self, bot: answerer_lib.Answerer, slots: int = 8, context: int | None = None,
               max_waiting: int = 256):
    if slots < 1:
      raise UserError(f"--slots must be at least 1, got {slots}")
    limit = bot.model.config.max_position_embeddings
    context = context or limit
    if not 1 < context <= limit:
      raise UserError(f"--context must be in [2, {limit}] (the model's positions), got {context}")
    self.bot = bot
    self.slots = slots
    self.context = context
    self.max_waiting = max_waiting
    self.stop_ids = frozenset(bot.stop_ids)
    self.stats = Stats()
    self._graphdef, self._state = nnx.split(bot.model)
    # The cache starts on the model's mesh, as every step returns it, so that the first prefill
    # compiles the program all later ones run (a cache without the mesh is another input type).
    sharding = jax.tree.leaves(self._state)[0].sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
      sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
    self._cache = jax.device_put(bot.model.init_cache(slots, context), sharding)
    self._cache_spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                    self._cache)
    self._key_shape = jax.random.key_data(jax.random.key(0)).shape
    self._programs: dict[tuple, jax.stages.Compiled] = {}  # keys: `_lower`
    self._rows: list[_Row | None] = [None] * slots
    self._waiting: collections.deque = collections.deque()  # (request, future, listener)
    self._cancelled: set[concurrent.futures.Future] = set()  # running requests to stop before the next step
    self._wake = threading.Condition()
    self._stopping = False
    self._thread = threading.Thread(target=self._loop, name="vtimellm-engine", daemon=True)
    self._thread.start()

  def prompt_positions(self, prompt_ids, num_frames: int) -> int:
    """Returns the cache positions a prompt takes: its padded text with the placeholder replaced by frames."""
    return -(-len(prompt_ids) // answerer_lib.PAD_MULTIPLE) * answerer_lib.PAD_MULTIPLE - 1 + num_frames

  def precompile(self, up_to: int | None = None, prompt_lengths=(), num_frames: int = 100) -> int:
    """Returns how many programs it compiled ahead of the steps that will run them: the row move and
    the decode step of every batch bucket at every window up to the one a row at position `up_to`
    reads (default: the whole context), and the prefill of every power-of-two count of prompts of
    each of `prompt_lengths` (token ids, the placeholder included) with `num_frames` frames each;
    all for requests with top_p 1 (greedy or sampled).

    May be called from any thread while the engine serves: it lowers here, compiles on worker
    threads, and touches no buffer of the engine.
    """
    last = kv_cache.decode_window(up_to or self.context, self.context)
    windows = [kv_cache.decode_window(1, self.context)]
    while windows[-1] < last:
      windows.append(kv_cache.decode_window(windows[-1] + 1, self.context))
    buckets = sorted({batch_bucket(1 << k, self.slots) for k in range(self.slots.bit_length() + 1)})
    padded = sorted({-(-n // answerer_lib.PAD_MULTIPLE) * answerer_lib.PAD_MULTIPLE for n in prompt_lengths})
    prefills = [("prefill", b, t, num_frames, False) for b in buckets for t in padded]
    keys = [k for k in [("move",), *((b, w, False) for b in buckets for w in windows), *prefills]
            if k not in self._programs]
    lowered = [self._lower(key) for key in keys]  # tracing holds the GIL: one at a time
    with concurrent.futures.ThreadPoolExecutor(min(len(keys), os.cpu_count() or 1) or 1) as pool:
      for key, program in zip(keys, pool.map(lambda x: x.compile(), lowered)):
        self._programs.setdefault(key, program)
    return len(keys)

  def _lower(self, key: tuple) -> jax.stages.Lowered:
    """Returns the lowered decode step of key (batch, window, nucleus), the row move for ("move",), or
    the prefill of ("prefill", prompts, padded length, frames, nucleus)."""
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    if key == ("move",):
      return _move_jit.lower(self._cache_spec, i32, i32)
    if key[0] == "prefill":
      _, k, t, n, nucleus = key
      ids = jax.ShapeDtypeStruct((k, t), jnp.int32)
      return _prefill_jit.lower(self._graphdef, self._state, self._cache_spec, i32, ids, ids,
                                jax.ShapeDtypeStruct((k, n, self.bot.feature_dim), jnp.float32),
                                jax.ShapeDtypeStruct((k, *self._key_shape), jnp.uint32),
                                jax.ShapeDtypeStruct((k,), jnp.float32), jax.ShapeDtypeStruct((k,), jnp.float32),
                                nucleus=nucleus)
    batch, window, nucleus = key
    rows_i32, rows_f32 = (jax.ShapeDtypeStruct((batch,), t) for t in (jnp.int32, jnp.float32))
    key_data = jax.ShapeDtypeStruct((batch, *self._key_shape), jnp.uint32)
    return _decode_jit.lower(self._graphdef, self._state, self._cache_spec, rows_i32, rows_i32, rows_i32, key_data,
                             rows_f32, rows_f32, window=window, nucleus=nucleus)

  def _program(self, *key) -> jax.stages.Compiled:
    """Returns the compiled program of `key` (`_lower`), compiling it now if no step needed it before."""
    program = self._programs.get(key)
    if program is None:
      program = self._programs.setdefault(key, self._lower(key).compile())
    return program

  def submit(self, request: Request, listener: TokenListener | None = None) -> concurrent.futures.Future:
    """Queues a request; returns the Future of its generated ids (eos excluded).

    `listener`, if given, receives the ids as they are decoded, all of them before the Future is
    done. Raises UserError if the prompt and its token budget do not fit the context, QueueFull if
    `max_waiting` requests already wait.
    """
    positions = self.prompt_positions(request.prompt_ids, request.features.shape[0])
    if positions + request.max_new_tokens > self.context:
      raise UserError(f"the prompt takes {positions} positions and max_tokens is {request.max_new_tokens}: "
                      f"more than the server's context of {self.context}")
    future = concurrent.futures.Future()
    with self._wake:
      if self._stopping:
        raise QueueFull("the server is shutting down")
      if len(self._waiting) >= self.max_waiting:
        raise QueueFull(f"{len(self._waiting)} requests are already waiting")
      self._waiting.append((request, future, listener))
      self._wake.notify()
    return future

  def cancel(self, future: concurrent.futures.Future) -> None:
    """Stops the request of `future` (from `submit`); its Future fails with `Cancelled`.

    A waiting request leaves the queue now; a running one's slot is freed before the next decode
    step, so the row stops costing the others at once. A request already done is left as it is.
    """
    with self._wake:
      for entry in self._waiting:
        if entry[1] is future:
          self._waiting.remove(entry)
          self.stats.cancelled += 1
          future.set_exception(Cancelled("the request was cancelled while it waited for a slot"))
          return
      if not future.done():
        self._cancelled.add(future)

  @property
  def waiting(self) -> int:
    return len(self._waiting)

  @property
  def busy(self) -> int:
    return sum(row is not None for row in self._rows)

  def close(self) -> None:
    """Stops the engine thread; requests still waiting or running get an error."""
    with self._wake:
      self._stopping = True
      self._wake.notify()
    self._thread.join()

  def _loop(self) -> None:
    try:
      while True:
        with self._wake:
          while not self._stopping and not self._waiting and not self.busy:
            self._wake.wait()
          if self._stopping:
            break
        self._drop_cancelled()
        self._admit()
        if self.busy:
          self._step()
    except BaseException as e:  # pylint: disable=broad-except
      # A failure on the device is the engine's end: every request learns it, none hangs.
      self._fail_all(RuntimeError(f"the generation engine stopped: {e!r}"))
      raise
    self._fail_all(RuntimeError("the server is shutting down"))

  def _fail_all(self, error: Exception) -> None:
    with self._wake:
      self._stopping = True
      pending = [future for _, future, _ in self._waiting] + [row.future for row in self._rows if row]
      self._waiting.clear()
      self._rows = [None] * self.slots
    for future in pending:
      if not future.done():
        future.set_exception(error)

  def _drop_cancelled(self) -> None:
    """Frees the slots of the running requests `cancel` named."""
    # The set only names requests that had left the queue: each is in a row now, or already done
    # (admission pops and prefills on this thread, so none is in between).
    dropped = []
    with self._wake:
      for slot, row in enumerate(self._rows):
        if row is not None and row.future in self._cancelled:
          self._rows[slot] = None
          self.stats.cancelled += 1
          dropped.append(row)
      self._cancelled.clear()
    for row in dropped:
      row.future.set_exception(Cancelled(f"the request was cancelled after {len(row.tokens)} tokens"))

  def _admit(self) -> None:
    """Prefills waiting requests into free slots, several at once where free rows lie together."""
    while True:
      free = [slot for slot in range(self.slots) if self._rows[slot] is None]
      if not free:
        return
      run = 1  # free rows from the lowest one on
      while run < len(free) and free[run] == free[0] + run:
        run += 1
      batch = []
      with self._wake:
        # A power-of-two count (fewer prefill programs) of requests whose frames stack.
        count = 1 << (min(run, len(self._waiting)).bit_length() - 1) if self._waiting else 0
        while self._waiting and len(batch) < count:
          if batch and self._waiting[0][0].features.shape != batch[0][0].features.shape:
            break
          batch.append(self._waiting.popleft())
      if not batch:
        return
      batch = [entry for entry in batch if entry[1].set_running_or_notify_cancel()]
      try:
        if batch:
          self._prefill(free[0], batch)
      except Exception as e:  # pylint: disable=broad-except
        for _, future, _ in batch:  # these requests fail; the others go on
          if not future.done():
            future.set_exception(e)

  def _prefill(self, row0: int, batch: list[tuple[Request, concurrent.futures.Future, TokenListener | None]]) -> None:
    """Prefills the requests of `batch` together into rows row0, row0 + 1, ...; each takes its first token."""
    requests = [request for request, _, _ in batch]
    ids, lengths = generate_lib.pad_right([r.prompt_ids for r in requests], self.bot.encoder.pad_id,
                                          answerer_lib.PAD_MULTIPLE)
    mask = (np.arange(ids.shape[1])[None] < lengths[:, None]).astype(np.int32)
    key_data = np.stack([np.asarray(jax.random.key_data(r.key if r.key is not None else jax.random.key(0)))
                         for r in requests])
    features = np.stack([r.features for r in requests]).astype(np.float32)
    program = self._program("prefill", len(requests), ids.shape[1], features.shape[1],
                            any(r.top_p < 1 for r in requests))
    self._cache, tokens, lengths = program(
        self._state, self._cache, np.int32(row0), ids, mask, features, key_data,
        np.asarray([r.temperature for r in requests], np.float32), np.asarray([r.top_p for r in requests], np.float32))
    tokens, lengths = np.asarray(tokens), np.asarray(lengths)
    self.stats.prefills += len(batch)
    self.stats.prefill_batches[len(batch)] += 1
    for k, (request, future, listener) in enumerate(batch):
      self._rows[row0 + k] = _Row(request, future, int(lengths[k]), key_data[k], [], listener)
      self._take(row0 + k, int(tokens[k]))

  def _take(self, slot: int, token: int) -> None:
    """Appends a row's new token, hands it to the row's listener, and frees the slot once the row is done."""
    row = self._rows[slot]
    row.tokens.append(token)
    stopped = token in self.stop_ids
    if row.listener is not None and not stopped:
      try:
        row.listener([token])
      except Exception as e:  # pylint: disable=broad-except
        self._rows[slot] = None  # the listener's request fails; the others go on
        row.future.set_exception(e)
        return
    if stopped or len(row.tokens) >= row.request.max_new_tokens:
      tokens = row.tokens[:-1] if stopped else row.tokens
      self._rows[slot] = None
      self.stats.completed += 1
      row.future.set_result(tokens)

  def _compact(self, batch: int) -> None:
    """Moves the busy rows at or beyond row `batch` into free rows below it."""
    free = (slot for slot in range(batch) if self._rows[slot] is None)
    for slot in range(batch, self.slots):
      if self._rows[slot] is not None:
        target = next(free)
        self._cache = self._program("move")(self._cache, np.int32(slot), np.int32(target))
        with self._wake:
          self._rows[target], self._rows[slot] = self._rows[slot], None
        self.stats.moves += 1

  def _step(self) -> None:
    """One decode step of the busy rows, run on the smallest batch bucket that holds them; each takes its token."""
    s = batch_bucket(self.busy, self.slots)
    self._compact(s)
    tokens, positions, steps = np.zeros(s, np.int32), np.zeros(s, np.int32), np.zeros(s, np.int32)
    temperature, top_p = np.zeros(s, np.float32), np.ones(s, np.float32)
    key_data = np.zeros((s, *self._key_shape), np.uint32)
    busy = [slot for slot in range(s) if self._rows[slot] is not None]
    for slot in busy:
      row = self._rows[slot]
      n = len(row.tokens)
      tokens[slot], positions[slot], steps[slot] = row.tokens[-1], row.length + n - 1, n
      temperature[slot], top_p[slot], key_data[slot] = row.request.temperature, row.request.top_p, row.key_data
    # Slots at or past the busiest row's position are never read: the window covers the live rows.
    window = kv_cache.decode_window(int(positions.max()) + 1, self.context)
    program = self._program(s, window, bool((top_p < 1).any()))
    self._cache, new = program(self._state, self._cache, tokens, positions, steps, key_data, temperature, top_p)
    new = np.asarray(new)
    self.stats.decode_steps += 1
    self.stats.batch_steps[s] += 1
    self.stats.busy_slot_steps += len(busy)
    for slot in busy:
      self._take(slot, int(new[slot]))
