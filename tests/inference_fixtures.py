"""Shared test data for the inference tests: a tiny VTimeLLM model directory and its HF twin.

The directory holds a random-weight tiny VTimeLLM whose LLaMA part is a copy of an HF
`LlamaForCausalLM` (so HF `generate` is an independent reference) and a small sentencepiece
tokenizer trained here. References are built from the HF model, the projector weights and the
`sentencepiece` package, never from our own generation code.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import random

import numpy as np
import pytest
import torch

from hf_reference import hf_llama, jax_from_hf

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
_WORDS = ("the a man woman dog is counting money walks runs jumps into pool kitchen cooking video "
          "events from to during which frames can we see describe detail json event timestamps").split()


def _corpus(n: int = 200, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  lines = [SYSTEM, "USER: ASSISTANT: </s>"]
  for _ in range(n):
    words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
    lines.append(f"{words} from {rng.randint(0, 99):02d} to {rng.randint(0, 99):02d}.")
  return lines


@dataclasses.dataclass
class TinyVTimeLLM:
  """A saved tiny VTimeLLM directory plus what the tests need to rebuild its answers independently."""

  model_dir: pathlib.Path
  hf: object  # transformers.LlamaForCausalLM with the same LLaMA weights
  projector_kernel: np.ndarray  # float32[768, D]
  projector_bias: np.ndarray  # float32[D]
  sp: object  # sentencepiece.SentencePieceProcessor of the tokenizer

  def video_ids(self, prompt: str) -> tuple[list[int], list[int]]:
    """Returns the ids before and after `<video>` as the release's slow tokenizer gives them.

    Each chunk is split at `</s>` (a special token the slow tokenizer never feeds to
    sentencepiece) and every piece is encoded with sentencepiece; only the first chunk keeps BOS.
    The folder says `legacy: false`: a piece after `</s>` that does not start with a space loses the
    `▁` of its first sentencepiece token (a bare `▁` goes; the rest is looked up, unknown = 0).
    """
    legacy = json.loads((self.model_dir / "tokenizer_config.json").read_text()).get("legacy", True)

    def chunk_ids(text):
      ids = []
      for k, piece in enumerate(text.split("</s>")):
        if k:
          ids.append(2)
        if not piece:
          continue
        pieces = self.sp.encode(piece, out_type=str)
        if k and not legacy and not piece.startswith(" ") and pieces[0].startswith("\u2581"):
          pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
        ids += [self.sp.piece_to_id(x) for x in pieces]
      return ids
    before, after = prompt.split("<video>")
    return [1] + chunk_ids(before), chunk_ids(after)

  def hf_greedy(self, prompt: str, features: np.ndarray, max_new_tokens: int) -> list[int]:
    """Returns HF greedy `generate` ids (eos dropped) for a v1 prompt with `<video>` and features[N, 768]."""
    before, after = self.video_ids(prompt)
    embed = self.hf.get_input_embeddings()
    projected = torch.tensor(features.astype(np.float32) @ self.projector_kernel + self.projector_bias)
    with torch.no_grad():
      embeds = torch.cat([embed(torch.tensor(before)), projected, embed(torch.tensor(after))])[None]
      out = self.hf.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)
    ids = out[0].tolist()
    return ids[:ids.index(2)] if 2 in ids else ids


@pytest.fixture(scope="session")
def tiny_vtimellm(tmp_path_factory) -> TinyVTimeLLM:
  """A tiny VTimeLLM model directory (model.json, params/, tokenizer files), built once per session."""
  import sentencepiece
  from vtimellm_jax.data import tokenizer as tokenizer_lib
  from vtimellm_jax.models import llama, load
  from vtimellm_jax.models.vtimellm import VTimeLLM

  model_dir = tmp_path_factory.mktemp("tiny_vtimellm")
  tokenizer_lib.train_tokenizer(_corpus(), model_dir, vocab_size=400)
  sp = sentencepiece.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
  config = llama.tiny(vocab_size=sp.get_piece_size())
  hf = hf_llama(config)
  with torch.no_grad():
    # HF's init (std 0.02) leaves attention outputs so small that a tiny model's next token hardly
    # depends on anything but the last input; larger weights make answers depend on the whole prompt.
    for name, p in hf.named_parameters():
      if name.endswith(("v_proj.weight", "o_proj.weight", "q_proj.weight", "k_proj.weight")):
        p.mul_(8.0)
  model = jax_from_hf(hf, config, model_cls=VTimeLLM)
  # The projector from numpy, not from the model's own init: answers must depend on the frames
  # whatever the initialisers draw. A non-zero bias, so a projector applied without it would be caught.
  rng = np.random.RandomState(1)
  for variable, std in ((model.mm_projector.kernel, 0.2), (model.mm_projector.bias, 0.1)):
    variable.set_value(std * rng.normal(size=variable[...].shape).astype(np.float32))
  load.save_model(model, model_dir)
  return TinyVTimeLLM(model_dir, hf, np.asarray(model.mm_projector.kernel[...]),
                      np.asarray(model.mm_projector.bias[...]), sp)


def write_features(folder: pathlib.Path, video_ids, seed: int = 0) -> dict[str, np.ndarray]:
  """Writes float16 [100, 768] `{id}.npy` files; returns them."""
  folder.mkdir(parents=True, exist_ok=True)
  rng = np.random.RandomState(seed)
  out = {}
  for vid in video_ids:
    # Not much larger than token embeddings, so the answers depend on the text as well.
    out[vid] = rng.normal(0, 0.2, (100, 768)).astype(np.float16)
    np.save(folder / f"{vid}.npy", out[vid])
  return out
