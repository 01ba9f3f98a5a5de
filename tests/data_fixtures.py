"""Shared test data for the data tests: a tiny LLaMA-like tokenizer and stage-1/2-like datasets.

Import the fixtures into a test module (`from data_fixtures import tiny_tokenizer_dir`) to use them.
"""

from __future__ import annotations

import json
import pathlib
import random

import numpy as np
import pytest

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_WORDS = ("the a man woman dog person is are counting money walks runs jumps into pool kitchen "
          "cooking video events from to during which frames can we see describe detail specific "
          "activities individuals surroundings interactions others output json format event "
          "timestamps USER ASSISTANT café naïve déjà vu 東京 音楽").split()


def corpus(n: int = 300, seed: int = 0) -> list[str]:
  """Returns `n` random sentences plus the prompt's fixed phrases (tokenizer training text)."""
  rng = random.Random(seed)
  lines = [SYSTEM, "USER: ASSISTANT: </s>"]
  for _ in range(n):
    words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
    lines.append(" ".join(words) + f" from {rng.randint(0, 99):02d} to {rng.randint(0, 99):02d}.")
  return lines


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> pathlib.Path:
  """A 600-piece LLaMA-like sentencepiece tokenizer directory, trained once per session."""
  from vtimellm_jax.data import tokenizer  # pylint: disable=g-import-not-at-top
  return tokenizer.train_tokenizer(corpus(), tmp_path_factory.mktemp("tok"), vocab_size=600)


def sentence(rng: random.Random, lo: int = 3, hi: int = 12) -> str:
  return " ".join(rng.choice(_WORDS) for _ in range(rng.randint(lo, hi)))


def stage2_record(rng: random.Random, rid: str, long_tail: bool = True) -> dict:
  """Returns a stage-2-like record: 20% single-turn dense captions, 80% multi-turn grounding."""
  duration = round(rng.uniform(10, 120), 1)
  n_events = rng.randint(2, 6)
  times = sorted(round(rng.uniform(0, duration), 1) for _ in range(2 * n_events))
  token = {}
  for k in range(n_events):
    token[f"<s{k}>"], token[f"<e{k}>"] = times[2 * k], times[2 * k + 1]
  if rng.random() < 0.2:
    answer = " ".join(f"From <s{k}> to <e{k}>, {sentence(rng, 4, 20 if long_tail else 10)}."
                      for k in range(n_events))
    convs = [{"from": "human", "value": "<video>\nCould you describe the events in the video?"},
             {"from": "gpt", "value": answer}]
  else:
    convs = []
    for k in range(n_events):
      q = f"During which frames can we see {sentence(rng)}?"
      if k == 0:
        q = "<video>\n" + q
      convs += [{"from": "human", "value": q},
                {"from": "gpt", "value": f"From <s{k}> to <e{k}>."}]
  return {"source": "internvid", "id": rid, "conversations": convs,
          "meta": {"split": [0, duration], "duration": duration, "token": token}}


def write_stage2(root: pathlib.Path, n: int, seed: int = 0) -> tuple[pathlib.Path, pathlib.Path]:
  """Returns (json path, feature dir) of `n` stage-2-like records with random float16 features."""
  rng = random.Random(seed)
  nprng = np.random.default_rng(seed)
  feats = root / "feat"
  feats.mkdir(parents=True, exist_ok=True)
  records = [stage2_record(rng, f"vid{k:05d}") for k in range(n)]
  for r in records:
    np.save(feats / f"{r['id']}.npy", nprng.standard_normal((100, 768)).astype(np.float16))
  path = root / "stage2.json"
  path.write_text(json.dumps(records))
  return path, feats
