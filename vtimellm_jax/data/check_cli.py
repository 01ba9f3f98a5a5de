"""`vtimellm-jax data check`: report every unusable record of a dataset, with counts.

Exit status: 0 when every record is usable, 1 when at least one is not (each is listed), 2 on bad
arguments or an unreadable data file. Records that are usable but noteworthy (cut to fit
`--max-length`, or ones the release would silently ignore because of its tokenization length
mismatch) are listed and counted as notes; they change the exit status only with `--strict`.

Checks: missing or unreadable feature file, wrong feature shape or dtype, a `<sN>/<eN>` token
without a `meta.token` value, a timestamp outside [0, duration], no `<video>`/`<image>`, an empty
answer, malformed records; with `--tokenizer` also over-length and the release's drop.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys

from vtimellm_jax import cli_types


def add_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--data", required=True, help="release data JSON (stage 1, 2 or 3)")
  parser.add_argument("--features", required=True, help="folder of {id}.npy feature files")
  parser.add_argument("--tokenizer", help="tokenizer directory: also check lengths and the "
                      "release's label mismatch")
  parser.add_argument("--template", choices=("plain", "v1", "glm"),
                      help="prompt template (default: glm with a ChatGLM3 tokenizer, else plain for "
                      "image records and v1 for videos)")
  parser.add_argument("--max-length", type=cli_types.int_at_least(2), default=2048,
                      help="model sequence limit: text tokens - 1 + features (default 2048)")
  parser.add_argument("--strict", action="store_true", help="notes also make the exit status 1")
  parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def run(args: argparse.Namespace) -> int:
  from vtimellm_jax.data import audit  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.data import records  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.data import templates  # pylint: disable=g-import-not-at-top
  from vtimellm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top

  data = records.load_json_records(args.data)
  enc = None
  if args.tokenizer:
    enc = tokenizer_lib.load_encoder(args.tokenizer)
    if args.template:
      templates.check_encoder(args.template, enc)

  def feature_faults(prepared):
    return records.check_feature_file(records.feature_path(args.features, prepared.id),
                                      prepared.is_image, values=True)

  bad, noted = [], []
  fault_counts, note_counts = collections.Counter(), collections.Counter()
  for index, raw in enumerate(data):
    found = audit.audit_record(raw, feature_faults=feature_faults, enc=enc,
                               template=args.template, max_length=args.max_length)
    name = records.record_name(raw, index)
    if found.faults:
      bad.append((index, name, found.faults))
      fault_counts.update({f.kind for f in found.faults})
    if found.notes:
      noted.append((index, name, found.notes))
      note_counts.update({f.kind for f in found.notes})

  if args.json:
    print(json.dumps({
        "records": len(data), "unusable": len(bad), "noted": len(noted),
        "fault_counts": dict(fault_counts), "note_counts": dict(note_counts),
        "faults": [{"index": i, "id": _rid(data[i]), "kind": f.kind, "message": f.message}
                   for i, _, fs in bad for f in fs],
        "notes": [{"index": i, "id": _rid(data[i]), "kind": f.kind, "message": f.message}
                  for i, _, fs in noted for f in fs]}))
  else:
    out = sys.stdout
    for _, name, faults in bad:
      for f in faults:
        print(f"{args.data}: {name}: {f.kind}: {f.message}", file=out)
    for _, name, notes in noted:
      for f in notes:
        print(f"{args.data}: {name}: note: {f.kind}: {f.message}", file=out)
    print(f"{len(data)} records, {len(bad)} unusable, {len(noted)} with notes", file=out)
    for kind, count in sorted(fault_counts.items()):
      print(f"  {count:8d}  {kind}", file=out)
    for kind, count in sorted(note_counts.items()):
      print(f"  {count:8d}  note: {kind}", file=out)
    if not args.tokenizer:
      print("  (no --tokenizer: lengths and the release's label mismatch were not checked)", file=out)
  return 1 if bad or (args.strict and noted) else 0


def _rid(raw):
  return raw.get("id") if isinstance(raw, dict) else None
