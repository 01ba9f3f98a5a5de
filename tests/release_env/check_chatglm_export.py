"""ChatGLM3 exports in the release's own code under transformers 4.31.0: loaded strictly, run, the same logits as ours.

Not a pytest test: it needs a second Python environment with the release's pinned transformers and
the release's source, which the test suite has neither of. Set up once, outside the repository:

  python3 -m venv /tmp/glm431
  /tmp/glm431/bin/pip install "torch==2.13.0+cpu" transformers==4.31.0 sentencepiece accelerate peft==0.4.0

and have a copy of the release's repository (huangb23/VTimeLLM) as a git directory (a clone's
.git, or a bare mirror). Then, from the repository root with the project's environment active:

  python tests/release_env/check_chatglm_export.py --release-git <git dir> [--python /tmp/glm431/bin/python]

What it does, in a scratch folder (`--work`, default a new folder under the system's temp dir):
  1. extracts the release's `vtimellm/` package there (`git archive`), and trains a small
     ChatGLM3-style tokenizer (`train_chatglm_tokenizer`, THUDM's tokenizer_config.json auto_map);
  2. in the release's environment (release_side.py make): the user's side, made by the release's
     code: a multi-query ChatGLM3-shaped folder and one with `multi_query_attention: false`, random
     weights, biases and norms, each with the release's remote-code files beside it; a projector and
     stage-2/3 LoRA folders; the release's logits on fixed inputs;
  3. here: `convert chatglm` of both folders and `convert release` of the set (merged, and with
     --keep-lora), our logits, and the exports: `--format chatglm` of each, `--format release
     --with-base` of the kept one;
  4. in the release's environment (release_side.py check): each exported ChatGLM3 directory loaded
     into the release's ChatGLMForConditionalGeneration with a strict state dict and run, loaded
     with `from_pretrained` and run (the plain forward), and the VTimeLLM exports through the
     release's `load_pretrained_model` (its ChatGLM branch: tokenizer by trust_remote_code from the
     export, projector, the exported LoRA merged) run on `<video>` prompts;
  5. compares every pair of logits (max |a - b| / max |b|, all in float32) and prints a table;
     exits 1 if any differs by more than 1e-5 or a load reported a problem.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
TOLERANCE = 1e-5
FRAMES = 4
VIDEO_TOKEN = -200  # the release's IMAGE_TOKEN_INDEX, where `<video>` stood


def _inputs(vocab: int) -> dict[str, np.ndarray]:
  """Returns fixed text ids int[2, 12], `<video>` ids int[2, 10] and frame features float[2, FRAMES, 768]."""
  rng = np.random.RandomState(0)
  video = rng.randint(3, vocab, (2, 10))
  video[0, 2] = video[1, 6] = VIDEO_TOKEN
  return {"text_ids": rng.randint(3, vocab, (2, 12)), "video_ids": video,
          "features": rng.normal(size=(2, FRAMES, 768)).astype(np.float32)}


def _tokenizer(folder: pathlib.Path) -> None:
  """Trains a small ChatGLM3-style tokenizer whose tokenizer_config.json names the remote class, as THUDM's does."""
  from vtimellm_jax.data.chatglm_tokenizer import train_chatglm_tokenizer

  lines = [f"the video shows {w} from {i} to {i + 7} 视频 第 {i} 秒 {w}" for i in range(60)
           for w in ("a man walks", "a dog runs", "people talk", "someone cooks")]
  train_chatglm_tokenizer(lines, folder, vocab_size=300)
  config = json.loads((folder / "tokenizer_config.json").read_text())
  config["auto_map"] = {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]}
  (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _release_side(python: str, step: str, work: pathlib.Path) -> None:
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  env.update(HF_HOME=str(work / "hf-home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
  subprocess.run([python, str(HERE / "release_side.py"), step, str(work)], check=True, env=env, cwd=work)


def _cli(*argv) -> None:
  from vtimellm_jax import cli

  if cli.main([str(a) for a in argv]) != 0:
    raise SystemExit(f"vtimellm-jax {' '.join(map(str, argv))} failed")


def _text_logits(model_dir: pathlib.Path, ids: np.ndarray) -> np.ndarray:
  """Returns our float32[B, T, V] logits of the LLM in a model directory (VTimeLLM's too, without video)."""
  import jax.numpy as jnp

  from vtimellm_jax.models.load import load_model

  model = load_model(model_dir)
  b, t = ids.shape
  hidden = model.model(model.model.embed(jnp.asarray(ids)), jnp.broadcast_to(jnp.arange(t), (b, t)),
                       jnp.full((b,), t, jnp.int32))[0]
  return np.asarray(model.lm_head(hidden), np.float32)


def _video_logits(model_dir: pathlib.Path, inputs: dict) -> np.ndarray:
  """Returns our float32[B, T - 1 + FRAMES, V] logits of a VTimeLLM directory, frames spliced at `<video>`."""
  import jax.numpy as jnp

  from vtimellm_jax.models.load import load_model

  ids = inputs["video_ids"]
  logits, _ = load_model(model_dir)(jnp.asarray(ids), jnp.ones(ids.shape, jnp.int32), jnp.asarray(inputs["features"]))
  return np.asarray(logits, np.float32)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.abs(a - b).max() / np.abs(b).max()) if a.shape == b.shape else float("inf")


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--release-git", required=True, help="git directory of the release's repository")
  parser.add_argument("--python", default="/tmp/glm431/bin/python", help="python of the transformers 4.31.0 env")
  parser.add_argument("--work", default=None, help="scratch folder (default: a new temp folder)")
  args = parser.parse_args(argv)
  import jax

  jax.config.update("jax_default_matmul_precision", "highest")
  work = pathlib.Path(args.work or tempfile.mkdtemp(prefix="glm-release-check-")).absolute()
  (work / "release").mkdir(parents=True, exist_ok=True)
  archive = subprocess.run(["git", "--git-dir", args.release_git, "archive", "HEAD", "vtimellm"], check=True,
                           capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", str(work / "release")], input=archive, check=True)
  inputs = _inputs(vocab=300)  # ids the tokenizer has; the model's vocabulary is 512
  np.savez(work / "inputs.npz", **inputs)
  _tokenizer(work / "tokenizer")
  _release_side(args.python, "make", work)

  # Ours: the conversions, their logits and the exports.
  ours = {}
  for name in ("chatglm3-src", "chatglm3-src-mha"):
    _cli("convert", "chatglm", "--src", work / name, "--out", work / f"ours-{name}", "--dtype", "float32")
    ours[f"text:{name}"] = _text_logits(work / f"ours-{name}", inputs["text_ids"])
    _cli("export", "--model", work / f"ours-{name}", "--format", "chatglm", "--out", work / f"export-{name}")
  release_set = ["--base", work / "chatglm3-src", "--projector", work / "mm_projector.bin", "--stage2",
                 work / "stage2", "--stage3", work / "stage3", "--dtype", "float32"]
  _cli("convert", "release", *release_set, "--out", work / "ours-vtimellm")
  _cli("convert", "release", *release_set, "--keep-lora", "--out", work / "ours-vtimellm-kept")
  ours["text:vtimellm"] = _text_logits(work / "ours-vtimellm", inputs["text_ids"])
  ours["video:vtimellm"] = _video_logits(work / "ours-vtimellm", inputs)
  ours["video:vtimellm-kept"] = _video_logits(work / "ours-vtimellm-kept", inputs)
  _cli("export", "--model", work / "ours-vtimellm", "--format", "chatglm", "--out", work / "export-chatglm3-vtimellm")
  _cli("export", "--model", work / "ours-vtimellm-kept", "--format", "release", "--with-base", "--dtype", "float32",
       "--out", work / "export-release")
  plan = {
      "strict": [str(work / f) for f in ("export-chatglm3-src", "export-chatglm3-src-mha", "export-chatglm3-vtimellm",
                                         "export-release/chatglm3-base")],
      "loader": {"merged": [str(work / "export-chatglm3-vtimellm"), str(work / "export-chatglm3-vtimellm" /
                                                                         "mm_projector.bin"), None],
                 "release-format": [str(work / "export-release" / "chatglm3-base"),
                                    str(work / "export-release" / "mm_projector.bin"), str(work / "export-release" /
                                                                                           "lora")]},
  }
  (work / "plan.json").write_text(json.dumps(plan, indent=2))
  _release_side(args.python, "check", work)

  reference, loaded = dict(np.load(work / "reference.npz")), dict(np.load(work / "loaded.npz"))
  report = json.loads((work / "loaded.json").read_text())
  pairs = [
      ("convert chatglm (multi-query) vs the release on its source", ours["text:chatglm3-src"],
       reference["text:chatglm3-src"]),
      ("convert chatglm (multi_query_attention false) vs the release on its source", ours["text:chatglm3-src-mha"],
       reference["text:chatglm3-src-mha"]),
      ("convert release (stages merged) vs the release's load_pretrained_model on its set",
       ours["video:vtimellm"], reference["video:release-set"]),
      ("convert release --keep-lora vs the release's load_pretrained_model on its set",
       ours["video:vtimellm-kept"], reference["video:release-set"]),
  ]
  for name in ("chatglm3-src", "chatglm3-src-mha"):
    for how in ("strict", "plain"):
      pairs.append((f"export of ours-{name}, {how} load in the release vs ours", loaded[f"{how}:export-{name}"],
                    ours[f"text:{name}"]))
  for how in ("strict", "plain"):
    pairs.append((f"export of ours-vtimellm (LLM), {how} load in the release vs ours",
                  loaded[f"{how}:export-chatglm3-vtimellm"], ours["text:vtimellm"]))
  pairs += [
      ("export of ours-vtimellm via the release's load_pretrained_model, with video, vs ours",
       loaded["loader:merged"], ours["video:vtimellm"]),
      ("export --format release --with-base via load_pretrained_model(stage2=lora/), with video, vs ours",
       loaded["loader:release-format"], ours["video:vtimellm-kept"]),
  ]
  failed = False
  print(f"\nwork folder: {work}\n")
  for what, a, b in pairs:
    err = _rel(a, b)
    failed |= not err <= TOLERANCE
    print(f"{'ok ' if err <= TOLERANCE else 'BAD'}  {err:.1e}  {what}  {tuple(a.shape)}")
  for key, entry in report.items():
    bad = entry.get("missing") or entry.get("unequal") or (entry.get("tokenizer", "ChatGLMTokenizer")
                                                          != "ChatGLMTokenizer")
    failed |= bool(bad)
    print(f"{'BAD' if bad else 'ok '}  {key}: {json.dumps(entry)}")
  print("\nFAILED" if failed else f"\nall logits within {TOLERANCE:g} relative; every load strict and complete")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
