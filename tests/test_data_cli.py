"""`data check` finds one planted fault of each kind; `data preview --json` gives the release's values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_fixtures import tiny_tokenizer_dir  # noqa: F401  pylint: disable=unused-import
from test_data_templates import v1_reference
from test_tokenizer_legacy import _folder, release_v1
from vtimellm_jax import cli

import sentencepiece as spm


def video(rid, question="<video>\nWhat happens?", answer="From <s0> to <e0>.", token=None,
          duration=10.0):
  return {"id": rid, "conversations": [{"from": "human", "value": question},
                                       {"from": "gpt", "value": answer}],
          "meta": {"duration": duration, "token": token or {"<s0>": 1.0, "<e0>": 5.0}}}


# record id -> the fault (or note) that `data check` must report for it; None = clean.
PLANTED = {
    "good": None,
    "missing": "missing feature file",
    "garbage": "unreadable feature file",
    "truncated": "unreadable feature file",
    "shape": "wrong feature shape",
    "dtype": "wrong feature dtype",
    "nan": "non-finite feature values",
    "metatok": "missing meta token",
    "outside": "timestamp outside [0, duration]",
    "novideo": "no <video>",
    "twovideo": "more than one <video>",
    "empty": "empty answer",
    "malformed": "malformed record",
    "long": "note: over-length",
    "dropped": "note: release drops it (tokenization length mismatch)",
}


@pytest.fixture()
def faulty(tmp_path):
  feat = tmp_path / "feat"
  feat.mkdir()
  recs = [video(rid) for rid in PLANTED]
  by_id = {r["id"]: r for r in recs}
  by_id["metatok"]["conversations"][1]["value"] = "From <s0> to <e1>."
  by_id["outside"]["meta"]["token"]["<e0>"] = 12.5
  by_id["novideo"]["conversations"][0]["value"] = "What happens?"
  by_id["twovideo"]["conversations"][1]["value"] = "From <s0> to <e0>, see <video>."
  by_id["empty"]["conversations"][1]["value"] = "  "
  del by_id["malformed"]["conversations"]
  by_id["long"]["conversations"][1]["value"] = " ".join(["a man walks into the kitchen"] * 60)
  by_id["dropped"]["conversations"][0]["value"] = "<video>\nWhat is <unk> here?"
  rng = np.random.default_rng(0)
  for rid in PLANTED:
    if rid == "missing":
      continue
    shape, dtype = {"shape": ((50, 768), np.float16), "dtype": ((100, 768), np.float32)}.get(
        rid, ((100, 768), np.float16))
    np.save(feat / f"{rid}.npy", rng.standard_normal(shape).astype(dtype))
  (feat / "garbage.npy").write_bytes(b"\x00 definitely not numpy")
  nan = np.load(feat / "nan.npy")
  nan[37, 5], nan[60, 0] = np.nan, np.inf
  np.save(feat / "nan.npy", nan)
  full = (feat / "truncated.npy").read_bytes()
  (feat / "truncated.npy").write_bytes(full[:len(full) // 2])
  data = tmp_path / "data.json"
  data.write_text(json.dumps(recs))
  return data, feat


def test_check_finds_every_planted_fault(faulty, tiny_tokenizer_dir, capsys):  # noqa: F811
  data, feat = faulty
  rc = cli.main(["data", "check", "--data", str(data), "--features", str(feat), "--tokenizer",
                 str(tiny_tokenizer_dir), "--max-length", "300", "--json"])
  report = json.loads(capsys.readouterr().out)
  assert rc == 1
  found = {}
  for item in report["faults"]:
    found.setdefault(item["id"], set()).add(item["kind"])
  for item in report["notes"]:
    found.setdefault(item["id"], set()).add("note: " + item["kind"])
  assert found == {rid: {kind} for rid, kind in PLANTED.items() if kind}
  assert all(f["index"] == list(PLANTED).index(f["id"]) for f in report["faults"])
  assert report["unusable"] == 12 and report["noted"] == 2 and report["records"] == len(PLANTED)
  assert report["fault_counts"]["unreadable feature file"] == 2


def test_check_text_output_and_clean_exit(faulty, tmp_path, capsys):
  data, feat = faulty
  assert cli.main(["data", "check", "--data", str(data), "--features", str(feat)]) == 1
  out = capsys.readouterr().out
  assert "record 1 (id 'missing'): missing feature file" in out
  assert f"{len(PLANTED)} records, 12 unusable" in out
  assert "(id 'nan'): non-finite feature values: " in out and "NaN or inf in 2 of 76800 values (the first in row 37)" in out
  clean = tmp_path / "clean.json"
  clean.write_text(json.dumps([video("good")]))
  assert cli.main(["data", "check", "--data", str(clean), "--features", str(feat)]) == 0


def test_check_bad_data_file_is_a_user_error(tmp_path, capsys):
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  assert cli.main(["data", "check", "--data", str(bad), "--features", str(tmp_path)]) == 2
  assert "bad.json: not readable JSON" in capsys.readouterr().err


def test_preview_json_is_the_release_tokens(tmp_path, tiny_tokenizer_dir, capsys):  # noqa: F811
  rec = video("x", question="<video>\nDuring which frames can we see a dog?",
              answer="From <s0> to <e0>.", token={"<s0>": 0.0, "<e0>": 9.96})
  rec["conversations"] += [{"from": "human", "value": "And the man?"},
                           {"from": "gpt", "value": "Never."}]
  data = tmp_path / "d.json"
  data.write_text(json.dumps([video("first"), rec]))
  rc = cli.main(["data", "preview", "--data", str(data), "--tokenizer", str(tiny_tokenizer_dir),
                 "--template", "v1", "--index", "1", "--json"])
  lines = capsys.readouterr().out.splitlines()
  assert rc == 0 and len(lines) == 1
  got = json.loads(lines[0])
  sp = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer_dir / "tokenizer.model"))
  # The folder says `legacy: false`: the release's rules for that flag, labels counted per round.
  turns = [("human", "<video>\nDuring which frames can we see a dog?"), ("gpt", "From 00 to 99."),
           ("human", "And the man?"), ("gpt", "Never.")]
  ids, labels, _ = release_v1(sp, turns, legacy=False)
  assert got == {"input_ids": ids, "labels": labels}
  # Without the flag (legacy mode) the labels are the answers' tokens.
  legacy_dir = _folder(tiny_tokenizer_dir, tmp_path / "legacy", None)
  assert cli.main(["data", "preview", "--data", str(data), "--tokenizer", str(legacy_dir),
                   "--template", "v1", "--index", "1", "--json"]) == 0
  ids, labels = v1_reference(sp, [("<video>\nDuring which frames can we see a dog?",
                                   "From 00 to 99."), ("And the man?", "Never.")])
  assert json.loads(capsys.readouterr().out) == {"input_ids": ids, "labels": labels}
  assert cli.main(["data", "preview", "--data", str(data), "--tokenizer", str(legacy_dir),
                   "--template", "v1", "--index", "1"]) == 0
  assert "[[ From 00 to 99.</s>]]" in capsys.readouterr().out
