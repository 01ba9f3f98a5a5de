"""`vtimellm-jax data preview`: one record's prompt, its tokens and which of them are trained.

Text output: the record's prompt after the release's rewrites, then the same text with every
trained span wrapped in `[[` `]]`, then the token table (position, id, piece, label). `--json`
prints a single line `{"input_ids": [...], "labels": [...]}` at token level before video expansion
(placeholder -200, ignored -100): the release's values (up to our over-length cut, docs/data.md).
"""

from __future__ import annotations

import argparse
import json
import re

from vtimellm_jax import cli_types

_BYTE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--data", required=True, help="release data JSON (stage 1, 2 or 3)")
  parser.add_argument("--tokenizer", required=True, help="tokenizer directory")
  parser.add_argument("--template", required=True, choices=("v1", "plain", "glm"),
                      help="plain for stage 1, v1 for stages 2 and 3 (LLaMA tokenizers); glm for "
                      "every stage with a ChatGLM3 tokenizer")
  parser.add_argument("--index", type=cli_types.int_at_least(0), default=0, help="record index in the JSON list")
  parser.add_argument("--max-length", type=cli_types.int_at_least(2), default=2048, help="model sequence limit")
  parser.add_argument("--json", action="store_true",
                      help='print {"input_ids": [...], "labels": [...]} on one line')


def run(args: argparse.Namespace) -> int:
  from vtimellm_jax import errors  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.data import records  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.data import templates  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  data = records.load_json_records(args.data)
  if not 0 <= args.index < len(data):
    raise errors.UserError(f"{args.data}: --index {args.index} is outside [0, {len(data)})")
  raw = data[args.index]
  name = records.record_name(raw, args.index)
  prepared, faults = records.prepare(raw)
  if prepared is None:
    raise errors.UserError(f"{args.data}: {name}: "
                           + "; ".join(f"{f.kind}: {f.message}" for f in faults))
  enc = tokenizer_lib.load_encoder(args.tokenizer)
  templates.check_encoder(args.template, enc)
  try:
    tok = templates.tokenize(prepared.turns, args.template, enc, max_length=args.max_length,
                             num_features=prepared.num_features)
  except errors.UserError as e:
    raise errors.UserError(f"{args.data}: {name}: {e}") from None
  ids, labels = tok.input_ids.tolist(), tok.labels.tolist()
  if args.json:
    print(json.dumps({"input_ids": ids, "labels": labels}))
    return 0

  render = {"plain": templates.plain_prompt, "v1": templates.v1_prompt, "glm": templates.glm_prompt}
  prompt = render[args.template](prepared.turns)
  pieces = enc.pieces(ids)
  print(f"{name}: template {args.template}, {len(ids)} text tokens"
        f" (+{prepared.num_features} features), {sum(l != -100 for l in labels)} trained")
  if tok.truncated:
    print(f"note: cut from {tok.full_length} tokens to fit --max-length {args.max_length}")
  if tok.release_dropped:
    print("note: the release ignores every label of this sample (its length-count mismatch)")
  print("--- prompt ---")
  print(prompt)
  print("--- trained spans in [[ ]] ---")
  print(_marked_text(pieces, [l != -100 for l in labels], glm=args.template == "glm"))
  print("--- tokens ---")
  for k, (i, p, l) in enumerate(zip(ids, pieces, labels)):
    print(f"{k:5d} {i:7d} {p!r:24} {'-' if l == -100 else l}")
  return 0


def _piece_bytes(piece: str, first: bool) -> bytes:
  match = _BYTE.fullmatch(piece)
  if match:
    return bytes([int(match.group(1), 16)])
  text = piece.replace("\u2581", " ")
  # The `▁` of a text's first piece is sentencepiece's dummy prefix, not a character of the prompt.
  return text[1:].encode() if first and text.startswith(" ") else text.encode()


def _marked_text(pieces: list[str], trained: list[bool], glm: bool = False) -> str:
  """Returns the text of `pieces` with trained runs wrapped in [[ ]] (a LLaMA BOS left out).

  With `glm` every message and `<video>` chunk is encoded on its own, so the piece after a special
  token or the placeholder starts a text; ChatGLM3's special tokens are shown by name.
  """
  from vtimellm_jax.data import chatglm_tokenizer  # pylint: disable=g-import-not-at-top

  starts = set(chatglm_tokenizer.EXTRA_TOKENS) | {"<video>"}
  out, run, state = [], b"", False
  for k, (piece, on) in enumerate(zip(pieces, trained)):
    if not glm and k == 0 and piece == "<s>":
      continue
    if on != state and run:
      out.append(("[[" if state else "") + run.decode(errors="replace") + ("]]" if state else ""))
      run = b""
    state = on
    first = k > 0 and pieces[k - 1] in starts and piece not in starts if glm else k == 1
    run += _piece_bytes(piece, first)
  if run:
    out.append(("[[" if state else "") + run.decode(errors="replace") + ("]]" if state else ""))
  return "".join(out)
