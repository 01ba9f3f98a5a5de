"""A fixed sinusoidal code of frame time, for small models that have no sense of position of their own.

VTimeLLM reads a moment's frame indices off the sequence position of the video tokens, a skill
Vicuna brings from pretraining. A LLaMA of a million parameters trained for minutes (the
quickstart's) does not acquire it from RoPE in its budget (docs/synthetic.md). With
`LlamaConfig.time_code = s > 0`:

- video token i of N gets `s * rms(token) * code(i * 100 / N)` added after the adapter, so a frame
  carries its place on the release's 00-99 grid (images, N = 1, get nothing);
- a randomly initialised model whose tokenizer has the 100 index pieces ("▁00".."▁99", or the bare
  "00".."99") starts those pieces' input embeddings and output rows from the same code
  (`init_time_pieces`), so copying a frame's code to the answer names its index from the first step.

The release's checkpoints and the 7B/13B configs keep `time_code = 0`: nothing changes for them.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

GRID = 100  # the release's frame indices 00-99
# With the word-start marker, so that "red 05" is two tokens and the word before an index predicts it
# (the space is otherwise a token of its own between them, docs/synthetic.md). Tokenizers with the
# bare "00".."99" also work (training/model_setup.py looks up either).
TIME_PIECES = tuple(f"\u2581{i:02d}" for i in range(GRID))
# Output rows start at this many times the unit-RMS code over sqrt(d): a final hidden state equal to
# a frame's code then scores its own index about 1.5 sqrt(d) above an orthogonal one.
OUTPUT_SCALE = 1.5
EMBED_STD = 0.02  # the LLaMA embedding initialiser's scale


def code(positions, dim: int) -> jnp.ndarray:
  """Returns float32[len(positions), dim]: sin/cos of positions (0..100) at dim/2 frequencies, unit RMS."""
  half = dim // 2
  f = jnp.asarray(positions, jnp.float32)[:, None] / GRID
  # Periods from 4 grids down to 4 / half of one: the slowest orders the whole video, the fastest
  # tells neighbouring indices apart.
  freqs = jnp.pi * (1.0 + jnp.arange(half, dtype=jnp.float32))[None, :] / 2
  out = jnp.concatenate([jnp.sin(f * freqs), jnp.cos(f * freqs)], axis=-1)
  if dim % 2:
    out = jnp.pad(out, ((0, 0), (0, 1)))
  return out * np.sqrt(dim / half)  # each sin/cos pair has mean square 1/2


def add_to_frames(projected_bnd: jnp.ndarray, scale: float) -> jnp.ndarray:
  """Returns the projected frame tokens [B, N, D] with the time code added (N = 1: unchanged)."""
  n, d = projected_bnd.shape[1:]
  if n == 1 or not scale:
    return projected_bnd
  rms = jnp.sqrt(jnp.mean(jnp.square(projected_bnd.astype(jnp.float32)), axis=-1, keepdims=True))
  frames = code(jnp.arange(n) * (GRID / n), d)[None]
  return (projected_bnd + scale * rms * frames).astype(projected_bnd.dtype)


def init_time_pieces(model, piece_ids: list[int]) -> None:
  """Sets the input embeddings and output rows of the 100 index pieces (ids in time order) from the code."""
  d = model.config.hidden_size
  c = code(jnp.arange(GRID), d)
  ids = jnp.asarray(piece_ids)
  embed = model.model.embed_tokens
  embed[...] = embed[...].at[ids].set((c * EMBED_STD).astype(embed[...].dtype))
  kernel = model.lm_head.kernel
  kernel[...] = kernel[...].at[:, ids].set((c.T * OUTPUT_SCALE / np.sqrt(d)).astype(kernel[...].dtype))
