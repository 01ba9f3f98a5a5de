"""Can a small LLaMA learn the quickstart's grounding task at all? The task in pure text, no video.

  python -m data_pipelines.synthetic.position_probe --hidden 128 --layers 4 --lr 3e-3 --steps 600 \
      --rope-theta 500 --batch 16

A sequence is a fixed 30-token "system prompt", 100 frame tokens (one colour token per frame where
an event is on screen, else a background token; events laid out as `vocabulary._layout` lays out
the corpus's), a query colour and the answer `from S S to E E` as digit tokens. Only the four
digits are trained. Every 10% of the steps it prints the teacher-forced digit accuracy, R@0.5 and
mIoU on 256 fixed held-out sequences.

Why it exists: the quickstart's 1M-parameter model does not learn to ground in its CPU budget
(docs/synthetic.md). This isolates the part that is missing -- reading a frame's position out as
a two-digit number from RoPE alone -- from features, adapters and templates, and runs in minutes.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from data_pipelines.synthetic import vocabulary

PREFIX, FRAMES, NUM_COLOURS = 30, 100, len(vocabulary.COLOURS)
BOS, SEP, FROM, TO, EOS = 1, 2, 3, 4, 5
COLOUR0 = 10  # colour k is token COLOUR0 + k; the background is COLOUR0 + NUM_COLOURS
DIGIT0 = 20  # digit d is token DIGIT0 + d
VOCAB = 64
ANSWER = 7  # from d d to d d eos


def sample(rng: np.random.Generator, prefix: np.ndarray) -> tuple[list[int], list[int]]:
  """Returns (tokens, labels) of one random video-as-text and a grounding question about one event."""
  n = int(rng.integers(vocabulary.MIN_EVENTS, vocabulary.MAX_EVENTS + 1))
  frames = np.full(FRAMES, COLOUR0 + NUM_COLOURS)
  colours = rng.permutation(NUM_COLOURS)[:n]
  spans = []
  for colour, (p0, p1) in zip(colours, vocabulary._layout(rng, n)):  # pylint: disable=protected-access
    start, end = int(round(p0)), min(int(round(p1)), FRAMES - 1)
    frames[start:end] = COLOUR0 + colour
    spans.append((colour, start, end))
  colour, start, end = spans[int(rng.integers(n))]
  answer = [FROM, DIGIT0 + start // 10, DIGIT0 + start % 10, TO, DIGIT0 + end // 10, DIGIT0 + end % 10, EOS]
  tokens = [BOS, *prefix, *frames, SEP, COLOUR0 + int(colour), *answer]
  return tokens, [-100] * (len(tokens) - ANSWER) + answer


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m data_pipelines.synthetic.position_probe",
                                   description=__doc__.splitlines()[0])
  parser.add_argument("--hidden", type=int, default=128)
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--lr", type=float, default=3e-3)
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--rope-theta", type=float, default=10000.0)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from vtimellm_jax.models.llama import LlamaConfig, LlamaForCausalLM

  prefix = np.random.default_rng(args.seed).integers(40, VOCAB, PREFIX)

  def batch(rng, size):
    tokens, labels = zip(*[sample(rng, prefix) for _ in range(size)])
    return jnp.asarray(tokens), jnp.asarray(labels)

  config = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.7),
                       num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.heads,
                       rope_theta=args.rope_theta)
  model = LlamaForCausalLM(config, nnx.Rngs(args.seed))
  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps * 3 // 100), args.steps)
  optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0)),
                            wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, tokens, labels):
    def loss_fn(model):
      logits, targets = model(tokens[:, :-1]), labels[:, 1:]
      mask = targets >= 0
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(targets, 0)[..., None], -1)[..., 0]
      return (nll * mask).sum() / mask.sum()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def evaluate(model, tokens, labels):
    predicted = model(tokens[:, :-1]).argmax(-1)
    digits = jnp.array([1, 2, 4, 5]) + labels.shape[1] - 1 - ANSWER  # the answer's digit positions
    got, want = predicted[:, digits] - DIGIT0, labels[:, 1:][:, digits] - DIGIT0
    s, e = got[:, 0] * 10 + got[:, 1], got[:, 2] * 10 + got[:, 3]
    s0, e0 = want[:, 0] * 10 + want[:, 1], want[:, 2] * 10 + want[:, 3]
    inter = jnp.maximum(0, jnp.minimum(e, e0) - jnp.maximum(s, s0))
    union = jnp.maximum(e, e0) - jnp.minimum(s, s0)
    iou = jnp.where(union > 0, inter / jnp.maximum(union, 1), 0.0)
    return (got == want).mean(), (iou >= 0.5).mean(), iou.mean()

  held_out = batch(np.random.default_rng([args.seed, 1]), 256)
  rng = np.random.default_rng([args.seed, 2])
  start = time.perf_counter()
  for step in range(1, args.steps + 1):
    loss = train_step(model, optimizer, *batch(rng, args.batch))
    if step % max(1, args.steps // 10) == 0 or step == args.steps:
      digit_acc, r05, miou = (float(v) for v in evaluate(model, *held_out))
      print(f"step {step} loss {float(loss):.3f} digit-acc {digit_acc:.3f} R@0.5 {r05:.3f} mIoU {miou:.3f} "
            f"({time.perf_counter() - start:.0f} s)", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
