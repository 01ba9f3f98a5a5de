"""A small stage-1/2/3 style dataset built in the test: tokenizer, JSON records, feature files."""

from __future__ import annotations

import json
import pathlib

import numpy as np

from vtimellm_jax.data import tokenizer as tokenizer_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]

COLORS = ("red", "blue", "green", "yellow")
SHAPES = ("square", "circle", "triangle")


def _caption(rng) -> tuple[str, int, int]:
  c, s = rng.randint(len(COLORS)), rng.randint(len(SHAPES))
  return f"a {COLORS[c]} {SHAPES[s]} moves", c, s


def make_dataset(root: pathlib.Path, records: int = 24, seed: int = 0) -> dict[str, pathlib.Path]:
  """Writes tokenizer/, features/, stage1.json (plain) and stage2.json (v1, with meta) under root."""
  rng = np.random.RandomState(seed)
  root.mkdir(parents=True, exist_ok=True)
  features = root / "features"
  features.mkdir(exist_ok=True)
  # Features encode the caption's colour and shape, so the adapter has something to learn.
  basis = rng.randn(len(COLORS) + len(SHAPES), 768).astype(np.float32)
  stage1, stage2, texts = [], [], []
  for i in range(records):
    caption, c, s = _caption(rng)
    feat = basis[c] + basis[len(COLORS) + s] + 0.1 * rng.randn(768)
    np.save(features / f"img{i}.npy", feat.astype(np.float16))
    stage1.append({"id": f"img{i}", "image": f"img{i}.jpg",
                   "conversations": [{"from": "human", "value": "<image>\n"},
                                     {"from": "gpt", "value": caption}]})
    video = np.repeat(feat[None], 100, axis=0) + 0.1 * rng.randn(100, 768)
    start = int(rng.randint(0, 40))
    np.save(features / f"vid{i}.npy", video.astype(np.float16))
    duration = 20.0
    stage2.append({"id": f"vid{i}", "source": "test",
                   "conversations": [{"from": "human", "value": f"<video>\nWhen does {caption}?"},
                                     {"from": "gpt", "value": f"From <s0> to <e0>, {caption}."}],
                   "meta": {"duration": duration, "token": {"<s0>": start * duration / 100,
                                                             "<e0>": (start + 30) * duration / 100}}})
    texts += [caption, f"When does {caption}? From {start:02d} to {start + 30:02d}."]
  texts += ["A chat between a curious user and an artificial intelligence assistant. The assistant gives "
            "helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:"] * 5
  tok = tokenizer_lib.train_tokenizer(texts * 4, root / "tokenizer", vocab_size=400)
  (root / "stage1.json").write_text(json.dumps(stage1))
  (root / "stage2.json").write_text(json.dumps(stage2))
  return {"root": root, "tokenizer": tok, "features": features, "stage1": root / "stage1.json",
          "stage2": root / "stage2.json"}


def stage_config(stage: str, dataset: dict[str, pathlib.Path], *overrides: str):
  """Returns configs/{stage}.py:tiny on `make_dataset`'s files, logging rarely, with `overrides`."""
  from vtimellm_jax.training import config_loading

  data = dataset["stage1" if stage == "stage1" else "stage2"]
  return config_loading.load_config(str(ROOT / f"configs/{stage}.py") + ":tiny", [
      f"--config.data.json={data}", f"--config.data.features={dataset['features']}",
      f"--config.data.tokenizer={dataset['tokenizer']}", "--config.log_every=1000", *overrides])


def logged_losses(workdir) -> list[float]:
  """Returns the loss of every step a run logged (its metrics.jsonl)."""
  return [json.loads(line)["loss"] for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
