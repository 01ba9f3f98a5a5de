"""Can a small LLaMA learn the quickstart's grounding task at all? The task in pure text, no video.

  python -m data_pipelines.synthetic.position_probe --hidden 128 --layers 4 --lr 3e-3 --steps 600 \
      --rope-theta 500 --batch 16 --all-events --time-code 1

A sequence is a fixed 30-token "system prompt", 100 frame tokens (one colour token per frame where
an event is on screen, else a background token; events laid out as `vocabulary._layout` lays out
the corpus's), a query colour and the answer `from S S to E E` as digit tokens; `--all-events` asks
about every event in turn, as stage 2's multi-turn records do. Only the answers are trained. With
`--time-code S` the frames carry `vtimellm_jax/models/time_code.py`'s code and answers are single
index tokens whose rows start from it (what `LlamaConfig.time_code` does for a VTimeLLM). Every 10%
of the steps it prints the teacher-forced answer-token accuracy, R@0.5, mIoU and the share of
start indices that fall outside the asked event ("wrong event") on 256 fixed held-out sequences.

Why it exists: the quickstart's 1M-parameter model does not learn to ground in its CPU budget
(docs/synthetic.md). This isolates the task from features, adapters and templates and runs in
minutes. What it showed (docs/synthetic.md, "Fourth session"): reading positions out is learnt;
finding the asked event is not, because the token that predicts the start ("From") is not the query,
so two attention steps must form together. `--one-hop-steps N` trains first on turns where the query
itself predicts the start, `--gap G` puts G tokens between query and answer as the chat template does.
`--restate R` makes every answer restate the query first (trained and evaluated, R tokens before the
start index): with R = 0 the two-step task is learnt like the one-step one; with R = 1 or 2 it is not.
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
FILLER0, MAX_GAP = 30, 10  # --gap filler i is token FILLER0 + i
PIECE0 = 64  # with --time-code: index i (00-99) is the single token PIECE0 + i
VOCAB = PIECE0 + FRAMES
ANSWER = 7  # from d d to d d eos
PIECE_ANSWER = 5  # from ii to ii eos
TURNS = 4  # --all-events asks about every event; videos with fewer get masked filler turns


def _answer(start: int, end: int, pieces: bool) -> list[int]:
  if pieces:
    return [FROM, PIECE0 + start, TO, PIECE0 + min(end, FRAMES - 1), EOS]
  return [FROM, DIGIT0 + start // 10, DIGIT0 + start % 10, TO, DIGIT0 + end // 10, DIGIT0 + end % 10, EOS]


def sample(rng: np.random.Generator, prefix: np.ndarray, pieces: bool = False, all_events: bool = False,
           one_hop: bool = False, gap: int = 0, restate: int = -1) -> tuple[list[int], list[int]]:
  """Returns (tokens, labels) of one random video-as-text and grounding questions about its events.

  One question about a random event, or (`all_events`) one turn per event in random order padded to
  TURNS turns. Answers are digit tokens, or (`pieces`) one token per index as with a time code.
  A turn is `SEP colour [gap fillers] FROM start TO end EOS`: the token that predicts the start is
  not the query, so the model must first bring the query to it (two attention steps), as "From"
  must in the chat template. `one_hop` turns are `SEP [gap fillers] FROM colour start ...`: the
  query itself predicts the start (one step). Both have the same length. With `restate` >= 0 the
  answer first restates the query (a target, as "The red square ... from 05" would):
  `SEP colour [gap fillers] FROM colour' start ...` for 0, `SEP colour [gap fillers] colour' FROM
  [restate - 1 fillers] start ...` for more (1 is "red from 05" in a chat tokenizer whose index pieces
  carry the word marker, 2 "red from ▁ 05" with bare "05" pieces).
  """
  n = int(rng.integers(vocabulary.MIN_EVENTS, vocabulary.MAX_EVENTS + 1))
  frames = np.full(FRAMES, COLOUR0 + NUM_COLOURS)
  colours = rng.permutation(NUM_COLOURS)[:n]
  spans = []
  for colour, (p0, p1) in zip(colours, vocabulary._layout(rng, n)):  # pylint: disable=protected-access
    start, end = int(round(p0)), min(int(round(p1)), FRAMES - 1)
    frames[start:end] = COLOUR0 + colour
    spans.append((colour, start, end))
  tokens = [BOS, *prefix, *frames]
  labels = [-100] * len(tokens)
  order = rng.permutation(TURNS) if all_events else [int(rng.integers(n))]
  for k in order:
    colour, start, end = spans[k] if k < n else spans[0]
    answer = _answer(start, end, pieces)
    target = answer if k < n else [-100] * len(answer)
    fillers = list(range(FILLER0, FILLER0 + gap))
    if restate >= 0:
      query, tail = COLOUR0 + int(colour), list(range(FILLER0, FILLER0 + max(0, restate - 1)))
      said = [answer[0], query] if restate == 0 else [query, answer[0], *tail]
      tokens += [SEP, query, *fillers, *said, *answer[1:]]
      labels += [-100] * (gap + 2) + (said if k < n else [-100] * len(said)) + target[1:]
    elif one_hop:
      tokens += [SEP, *fillers, answer[0], COLOUR0 + int(colour), *answer[1:]]
      labels += [-100] * (gap + 1) + [target[0], -100, *target[1:]]
    else:
      tokens += [SEP, COLOUR0 + int(colour), *fillers, *answer]
      labels += [-100] * (gap + 2) + target
  return tokens, labels


def spans_of(tokens: np.ndarray, labels: np.ndarray, pieces: bool,
             skip: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Returns (start, end) int arrays, one per labelled answer, read from `tokens` at the answer slots.

  `skip`: tokens between FROM and the start index (1 for one-hop turns and `restate` 0, `restate` - 1
  for more)."""
  size = PIECE_ANSWER if pieces else ANSWER
  rows, cols = np.nonzero(labels == FROM)
  starts, ends = [], []
  for r, c in zip(rows, cols):
    t = np.delete(tokens[r, c:c + size + skip], slice(1, 1 + skip))
    if pieces:
      starts.append(t[1] - PIECE0)
      ends.append(t[3] - PIECE0)
    else:
      starts.append((t[1] - DIGIT0) * 10 + t[2] - DIGIT0)
      ends.append((t[4] - DIGIT0) * 10 + t[5] - DIGIT0)
  return np.asarray(starts), np.asarray(ends)


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
  parser.add_argument("--all-events", action="store_true", help="one question per event (as stage 2's multi-turn)")
  parser.add_argument("--time-code", type=float, default=0.0,
                      help="> 0: frames carry models/time_code.py's code at this relative size, answers are "
                           "single index tokens whose rows start from the code")
  parser.add_argument("--one-hop-steps", type=int, default=0,
                      help="train the first N steps on one-hop turns (the query right before the start "
                           "index), the rest on two-hop turns (what is evaluated unless --one-hop-eval)")
  parser.add_argument("--one-hop-eval", action="store_true",
                      help="evaluate on one-hop turns (what --one-hop-steps >= --steps trains)")
  parser.add_argument("--gap", type=int, default=0,
                      help=f"filler tokens (0-{MAX_GAP}) between the query and the answer, as '? ASSISTANT:' "
                           "sits between them in the chat template")
  parser.add_argument("--restate", type=int, default=-1,
                      help=">= 0: every answer first restates the query (a target; trained and evaluated), "
                           "this many tokens before the start index (0: right before it)")
  args = parser.parse_args(argv)
  if not -1 <= args.restate <= MAX_GAP:
    parser.error(f"--restate must be 0-{MAX_GAP}")
  if args.restate >= 0 and (args.one_hop_steps or args.one_hop_eval):
    parser.error("--restate replaces the turn format: it does not combine with --one-hop-steps/--one-hop-eval")
  if not 0 <= args.gap <= MAX_GAP:
    parser.error(f"--gap must be 0-{MAX_GAP}")

  import jax
  import jax.numpy as jnp
  import optax
  from flax import nnx

  from vtimellm_jax.models import time_code
  from vtimellm_jax.models.llama import LlamaConfig, LlamaForCausalLM

  pieces = args.time_code > 0
  prefix = np.random.default_rng(args.seed).integers(40, PIECE0, PREFIX)

  def batch(rng, size, one_hop=False):
    tokens, labels = zip(*[sample(rng, prefix, pieces, args.all_events, one_hop, args.gap, args.restate)
                           for _ in range(size)])
    return jnp.asarray(tokens), jnp.asarray(labels)

  config = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.7),
                       num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.heads,
                       rope_theta=args.rope_theta)
  model = LlamaForCausalLM(config, nnx.Rngs(args.seed))
  frame_code = jnp.zeros((FRAMES, args.hidden))
  if pieces:
    time_code.init_time_pieces(model, list(range(PIECE0, PIECE0 + FRAMES)))
    # Frame tokens are embeddings here, not adapter outputs: the code is sized against the embedding scale.
    frame_code = args.time_code * time_code.EMBED_STD * time_code.code(np.arange(FRAMES), args.hidden)
  frames = slice(1 + PREFIX, 1 + PREFIX + FRAMES)

  def logits_of(model, tokens):
    b, t = tokens.shape
    x = model.model.embed(tokens).at[:, frames].add(frame_code)
    hidden, _, _ = model.model(x, jnp.broadcast_to(jnp.arange(t), (b, t)), jnp.full((b,), t, jnp.int32))
    return model.lm_head(hidden)

  schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, max(1, args.steps * 3 // 100), args.steps)
  optimizer = nnx.Optimizer(model, optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=0.0)),
                            wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, tokens, labels):
    def loss_fn(model):
      logits, targets = logits_of(model, tokens[:, :-1]), labels[:, 1:]
      mask = targets >= 0
      nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), jnp.maximum(targets, 0)[..., None], -1)[..., 0]
      return (nll * mask).sum() / mask.sum()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  @nnx.jit
  def predict(model, tokens):
    return logits_of(model, tokens[:, :-1]).argmax(-1)

  def evaluate(tokens, labels):
    """Returns (answer-token accuracy, R@0.5, mIoU, wrong-event share) of teacher-forced answers.

    Wrong event: the predicted start is not inside the asked event (2 frames of slack before it),
    i.e. the model did not find which frames the query names, however well it reads positions.
    """
    tokens, labels = np.asarray(tokens), np.asarray(labels)
    predicted = tokens.copy()
    predicted[:, 1:] = np.asarray(predict(model, jnp.asarray(tokens)))
    answer = labels >= 0
    s, e = spans_of(predicted, labels, pieces, skip)
    s0, e0 = spans_of(tokens, labels, pieces, skip)
    inter = np.maximum(0, np.minimum(e, e0) - np.maximum(s, s0))
    union = np.maximum(e, e0) - np.minimum(s, s0)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    wrong = (s < s0 - 2) | (s > e0)
    return (predicted[answer] == tokens[answer]).mean(), (iou >= 0.5).mean(), iou.mean(), wrong.mean()

  skip = 1 if args.one_hop_eval or args.restate == 0 else max(0, args.restate - 1)
  held_out = batch(np.random.default_rng([args.seed, 1]), 256, one_hop=args.one_hop_eval)
  rng = np.random.default_rng([args.seed, 2])
  start = time.perf_counter()
  for step in range(1, args.steps + 1):
    loss = train_step(model, optimizer, *batch(rng, args.batch, one_hop=step <= args.one_hop_steps))
    if step % max(1, args.steps // 10) == 0 or step == args.steps:
      accuracy, r05, miou, wrong = evaluate(*held_out)
      print(f"step {step} loss {float(loss):.3f} answer-acc {accuracy:.3f} R@0.5 {r05:.3f} mIoU {miou:.3f} "
            f"wrong-event {wrong:.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
