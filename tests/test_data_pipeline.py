"""The Grain pipeline: batch contract, epochs, bucketing, host shards, exact resume, bad records."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from data_fixtures import tiny_tokenizer_dir, write_stage2  # noqa: F401  pylint: disable=unused-import
from vtimellm_jax import errors
from vtimellm_jax.data import pipeline
from vtimellm_jax.data import records
from vtimellm_jax.data import templates
from vtimellm_jax.data import tokenizer as tokenizer_lib

N_RECORDS = 150


@pytest.fixture(scope="module")
def stage2(tmp_path_factory):
  return write_stage2(tmp_path_factory.mktemp("stage2"), N_RECORDS, seed=1)


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_dir):  # noqa: F811
  return tokenizer_lib.load_tokenizer(tiny_tokenizer_dir)


def build(stage2, tok, **kw):
  args = dict(template="v1", batch_size=4, seed=3, shard_index=0, shard_count=1)
  args.update(kw)
  return pipeline.build_pipeline(pipeline.JsonSource(*stage2), tok, **args)


def row_ids(batch: dict, features_by_id: dict) -> list[str]:
  """Identifies each valid row's record by its features (independent of the pipeline's plan)."""
  out = []
  for row in np.flatnonzero(batch["valid"]):
    key = batch["features"][row].tobytes()
    out.append(features_by_id[key])
  return out


@pytest.fixture(scope="module")
def features_by_id(stage2):
  _, feat = stage2
  return {np.load(p).tobytes(): p.stem for p in feat.glob("*.npy")}


def test_batches_follow_the_contract(stage2, tok, features_by_id):
  data, _ = stage2
  raw = {r["id"]: r for r in json.loads(data.read_text())}
  enc = tokenizer_lib.ReleaseEncoder(tok)
  max_length = 2048
  pipe = build(stage2, tok, num_epochs=1)
  seen = []
  for batch in pipe.iterator():
    b, t = batch["input_ids"].shape
    assert b == 4 and t in pipe.bucket_lengths and t - 1 + 100 <= max_length
    assert batch["input_ids"].dtype == np.int32 and batch["labels"].dtype == np.int32
    assert batch["attention_mask"].dtype == np.int32 and batch["valid"].dtype == np.int32
    assert batch["features"].shape == (4, 100, 768) and batch["features"].dtype == np.float16
    for row, rid in zip(np.flatnonzero(batch["valid"]), row_ids(batch, features_by_id)):
      prepared, _ = records.prepare(raw[rid])
      want = templates.tokenize(prepared.turns, "v1", enc)
      n = len(want.input_ids)
      assert batch["input_ids"][row, :n].tolist() == want.input_ids.tolist()
      assert batch["labels"][row, :n].tolist() == want.labels.tolist()
      assert (batch["input_ids"][row, n:] == tok.pad_token_id).all()
      assert (batch["labels"][row, n:] == -100).all()
      assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (t - n)
      assert (batch["input_ids"][row] == -200).sum() == 1
    for row in np.flatnonzero(batch["valid"] == 0):
      assert (batch["labels"][row] == -100).all() and (batch["attention_mask"][row] == 0).all()
    seen += row_ids(batch, features_by_id)
  assert sorted(seen) == sorted(raw)  # one epoch: every record exactly once


def test_epochs_reshuffle_and_seed_is_deterministic(stage2, tok, features_by_id):
  def order(seed):
    return [row_ids(b, features_by_id) for b in build(stage2, tok, seed=seed, num_epochs=2).iterator()]

  first = order(5)
  assert first == order(5)
  assert first != order(6)
  per_epoch = len(first) // 2
  epoch0 = [r for b in first[:per_epoch] for r in b]
  epoch1 = [r for b in first[per_epoch:] for r in b]
  assert sorted(epoch0) == sorted(epoch1) and len(epoch0) == N_RECORDS
  assert epoch0 != epoch1


def test_padding_fraction_is_small_on_a_stage2_like_mix(stage2, tok):
  pipe = build(stage2, tok, batch_size=8)
  pads = total = 0
  for batch in pipe.iterator():
    # Dummy rows of the last partial batch count as padding too.
    pads += batch["attention_mask"].size - batch["attention_mask"].sum()
    total += batch["attention_mask"].size
  assert pads / total < 0.15
  assert pipe.padding_fraction == pytest.approx(pads / total)
  assert len(pipe.bucket_lengths) <= 8


def test_two_hosts_get_disjoint_complete_shards_with_equal_shapes(stage2, tok, features_by_id):
  hosts = [list(build(stage2, tok, shard_index=p, shard_count=2, batch_size=3).iterator())
           for p in range(2)]
  assert len(hosts[0]) == len(hosts[1])
  ids = [[r for b in h for r in row_ids(b, features_by_id)] for h in hosts]
  assert not set(ids[0]) & set(ids[1])
  assert sorted(ids[0] + ids[1]) == sorted(features_by_id.values())
  for b0, b1 in zip(*hosts):
    assert b0["input_ids"].shape == b1["input_ids"].shape


RESUME_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from vtimellm_jax.data import pipeline, tokenizer

    def main():
      data, feat, tok_dir, state, out, workers = sys.argv[1:]
      pipe = pipeline.build_pipeline(
          pipeline.JsonSource(data, feat), tokenizer.load_tokenizer(tok_dir), template="v1",
          batch_size=4, seed=3, num_epochs=2, shard_index=0, shard_count=1,
          worker_count=int(workers))
      it = pipe.iterator()
      it.set_state(json.loads(open(state).read()))
      batches = [next(it) for _ in range(3)]
      np.savez(out, **{f"{k}_{i}": b[k] for i, b in enumerate(batches) for k in b})

    if __name__ == "__main__":  # Grain's workers are spawned and re-import this file
      main()
""")


@pytest.mark.parametrize("workers", [1])
def test_resume_in_a_new_process_gives_the_next_batches(stage2, tok, tiny_tokenizer_dir,  # noqa: F811
                                                        tmp_path, workers):
  pipe = build(stage2, tok, num_epochs=2, worker_count=workers)
  it = pipe.iterator()
  k = len(pipe) // 2 - 1  # crosses the epoch boundary on resume
  for _ in range(k):
    next(it)
  state = tmp_path / "state.json"
  state.write_text(json.dumps(it.get_state()))
  want = [next(it) for _ in range(3)]
  script = tmp_path / "resume.py"
  script.write_text(RESUME_SCRIPT)
  out = tmp_path / "next.npz"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, str(script), str(stage2[0]), str(stage2[1]), str(tiny_tokenizer_dir),
                  str(state), str(out), str(workers)], check=True, env=env,
                 cwd=pathlib.Path(__file__).parents[1], timeout=300)
  got = np.load(out)
  for i, batch in enumerate(want):
    for key, value in batch.items():
      np.testing.assert_array_equal(got[f"{key}_{i}"], value)


def test_bad_records_raise_naming_the_record_or_are_skipped(tmp_path, tok):
  data, feat = write_stage2(tmp_path, 12, seed=2)
  recs = json.loads(data.read_text())
  (feat / f"{recs[4]['id']}.npy").unlink()
  recs[7]["conversations"][0]["value"] = recs[7]["conversations"][0]["value"].replace("<video>", "")
  data.write_text(json.dumps(recs))
  with pytest.raises(errors.UserError, match=rf"stage2.json: record 4 \(id '{recs[4]['id']}'\).*"
                     "missing feature file"):
    build((data, feat), tok)
  pipe = build((data, feat), tok, skip_bad_records=True)
  assert pipe.stats["skipped"] == 2
  assert pipe.stats["skipped: missing feature file"] == 1 and pipe.stats["skipped: no <video>"] == 1
  assert sum(int(b["valid"].sum()) for b in pipe.iterator()) == 10


def test_feature_broken_after_planning_is_an_error_or_a_dummy_row(tmp_path, tok):
  data, feat = write_stage2(tmp_path, 6, seed=4)
  pipes = [build((data, feat), tok, skip_bad_records=skip, batch_size=6) for skip in (False, True)]
  victim = json.loads(data.read_text())[2]["id"]
  (feat / f"{victim}.npy").write_bytes(b"not a npy file")
  with pytest.raises(errors.UserError, match=rf"record 2 \(id '{victim}'\).*unreadable feature"):
    next(pipes[0].iterator())
  batch = next(pipes[1].iterator())
  assert batch["valid"].sum() == 5  # left out, not replaced by another record


def test_nan_features_are_an_error_naming_the_record_or_a_dummy_row(tmp_path, tok):
  data, feat = write_stage2(tmp_path, 6, seed=5)
  victim = json.loads(data.read_text())[3]["id"]
  values = np.load(feat / f"{victim}.npy")
  values[10, 3] = np.nan
  np.save(feat / f"{victim}.npy", values)
  # Planning reads headers only; the values are checked when the batch loads.
  pipes = [build((data, feat), tok, skip_bad_records=skip, batch_size=6) for skip in (False, True)]
  with pytest.raises(errors.UserError, match=rf"record 3 \(id '{victim}'\).*non-finite feature values.*"
                     rf"{victim}.npy: NaN or inf in 1 of 76800 values \(the first in row 10\)"):
    next(pipes[0].iterator())
  batch = next(pipes[1].iterator())
  assert batch["valid"].sum() == 5 and np.isfinite(batch["features"]).all()


def test_stage1_images_batch_with_one_feature_row(tmp_path, tok):
  feat = tmp_path / "feat"
  feat.mkdir()
  rng = np.random.default_rng(0)
  recs = []
  for k in range(7):
    rid = f"{k:09d}"
    recs.append({"id": rid, "image": f"x/{rid}.jpg", "conversations": [
        {"from": "human", "value": "Describe the image briefly.\n<image>"},
        {"from": "gpt", "value": f"a dog runs into the pool {k}"}]})
    shape = (768,) if k % 2 else (1, 768)
    np.save(feat / f"{rid}.npy", rng.standard_normal(shape).astype(np.float16))
  data = tmp_path / "stage1.json"
  data.write_text(json.dumps(recs))
  pipe = build((data, feat), tok, template="plain", batch_size=4)
  assert pipe.num_features == 1
  batches = list(pipe.iterator())
  assert [int(b["valid"].sum()) for b in batches] == [4, 3]
  for batch in batches:
    assert batch["features"].shape == (4, 1, 768)
    for row in np.flatnonzero(batch["valid"]):
      feats = batch["features"][row, 0]
      match = [r["id"] for r in recs if np.array_equal(np.load(feat / f"{r['id']}.npy").reshape(-1),
                                                        feats)]
      assert len(match) == 1
      labels = batch["labels"][row][batch["attention_mask"][row] == 1]
      # "<video>\n" (BOS, placeholder, dummy prefix, newline) is never trained; the caption is.
      assert (labels[:4] == -100).all() and (labels[4:] != -100).all()
