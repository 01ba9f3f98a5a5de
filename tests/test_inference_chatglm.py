"""A ChatGLM3-family VTimeLLM answers through `chat`, the Answerer and the serving engine as the
release's ChatGLM inference does: its prompt ids, its stop ids and its answer clean-up.

The reference is an HF `GlmForCausalLM` with the same weights, fed the prompt the release's rules
give (written here on `sentencepiece`), with the frame features projected by the same adapter.
"""

import json
import random

import numpy as np
import pytest
import sentencepiece
import torch

from hf_reference import hf_glm, jax_from_hf_glm
from vtimellm_jax import cli
from vtimellm_jax.data import chatglm_tokenizer
from vtimellm_jax.inference import answerer, batching, generate as gen
from vtimellm_jax.models import chatglm, load
from vtimellm_jax.models.vtimellm import VTimeLLM

_WORDS = ("the a man woman dog runs jumps pool kitchen video from to during which frames can we see "
          "一个 男子 在 厨房 里 做饭 视频 中 从 到 跑步 跳进 水池 哪些 帧 可以 看到").split()
EXTRA = {name: k for k, name in enumerate(chatglm_tokenizer.EXTRA_TOKENS)}


class _Tiny:
  """A saved tiny ChatGLM3 VTimeLLM, its HF twin and the release's prompt rules."""

  def __init__(self, root):
    rng = random.Random(0)
    lines = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) + f" {rng.randint(0, 99):02d}"
             for _ in range(300)]
    self.dir = chatglm_tokenizer.train_chatglm_tokenizer(lines, root, vocab_size=300)
    self.sp = sentencepiece.SentencePieceProcessor(model_file=str(root / "tokenizer.model"))
    n = self.sp.get_piece_size()
    self.ids = {name: n + k for name, k in EXTRA.items()}
    config = chatglm.tiny(vocab_size=n + len(EXTRA))
    self.hf = hf_glm(config, seed=1)
    with torch.no_grad():  # larger attention weights: answers depend on the whole prompt
      for name, p in self.hf.named_parameters():
        if name.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")):
          p.mul_(8.0)
    model = jax_from_hf_glm(self.hf, config, model_cls=VTimeLLM)
    r = np.random.RandomState(1)
    for variable, std in ((model.mm_projector.kernel, 0.2), (model.mm_projector.bias, 0.1)):
      variable.set_value(std * r.normal(size=variable[...].shape).astype(np.float32))
    self.kernel, self.bias = np.asarray(model.mm_projector.kernel[...]), np.asarray(model.mm_projector.bias[...])
    load.save_model(model, root)

  def prompt(self, turns):
    """The release's ids around the placeholder: [gMASK] sop, role + chunk ids per turn, <|assistant|>."""
    before, after = [self.ids["[gMASK]"], self.ids["sop"]], None
    for role, text in turns:
      role_id = self.ids["<|user|>" if role == "human" else "<|assistant|>"]
      chunks = [self.sp.encode(chunk) for chunk in text.split("<video>")]
      (before if after is None else after).extend([role_id] + chunks[0])
      if len(chunks) == 2:
        after = chunks[1]
    return before, after + [self.ids["<|assistant|>"]]

  def hf_greedy(self, turns, features, max_new_tokens):
    before, after = self.prompt(turns)
    embed = self.hf.get_input_embeddings()
    projected = torch.tensor(features.astype(np.float32) @ self.kernel + self.bias)
    with torch.no_grad():
      embeds = torch.cat([embed(torch.tensor(before)), projected, embed(torch.tensor(after))])[None]
      out = self.hf.generate(inputs_embeds=embeds, attention_mask=torch.ones(embeds.shape[:2], dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0,
                             eos_token_id=[self.ids["<|user|>"], 2])
    ids = out[0].tolist()
    return next((ids[:i] for i, t in enumerate(ids) if t in (self.ids["<|user|>"], 2)), ids)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  return _Tiny(tmp_path_factory.mktemp("tiny_chatglm"))


def _features(seed):
  return np.random.RandomState(seed).normal(0, 0.2, (100, 768)).astype(np.float16)


def test_answers_equal_hf_glm_with_the_release_prompt_and_stops(tiny):
  bot = answerer.load_answerer(tiny.dir)
  assert bot.encoder.family == "chatglm3" and bot.stop_ids == (tiny.ids["<|user|>"], 2)
  conversations = [([], "<video>\n哪些帧可以看到一个男子在跑步？"),
                   ([("<video>\nduring which frames can we see a dog", "from 05 to 20")], "男子 跳进 水池"),
                   ([], "describe the video <video>")]
  features = [_features(k) for k in range(3)]
  greedy = gen.GenerationConfig(max_new_tokens=10, temperature=0)
  answers = bot.answer(conversations, features, greedy)
  assert max(len(a.token_ids) for a in answers) >= 3, answers
  for (history, question), feats, answer in zip(conversations, features, answers):
    turns = [t for asked, said in history for t in (("human", asked), ("gpt", said))] + [("human", question)]
    assert bot.prompt_ids(history, question) == tiny.prompt(turns)[0] + [-200] + tiny.prompt(turns)[1]
    assert list(answer.token_ids) == tiny.hf_greedy(turns, feats, 10)
    assert answer.text == tiny.sp.decode([i for i in answer.token_ids if i < tiny.sp.get_piece_size()]).strip()


def test_serving_engine_answers_as_the_answerer(tiny):
  bot = answerer.load_answerer(tiny.dir)
  engine = batching.Engine(bot, slots=2, context=256)
  try:
    questions = ["<video>\n视频 中 从 几 到 几", "<video>\nthe man runs", "<video>\n一个 男子 在 厨房 里 做饭"]
    futures = [engine.submit(batching.Request(tuple(bot.prompt_ids([], q)), _features(k).astype(np.float32), 8))
               for k, q in enumerate(questions)]
    got = [f.result(timeout=300) for f in futures]
  finally:
    engine.close()
  want = bot.answer([([], q) for q in questions], [_features(k) for k in range(3)],
                    gen.GenerationConfig(max_new_tokens=8, temperature=0))
  assert got == [list(a.token_ids) for a in want]


def test_chat_cli_on_a_chatglm_model(tiny, tmp_path, capsys):
  np.save(tmp_path / "v.npy", _features(7))
  query = "哪些帧可以看到一个男子在跑步？"
  code = cli.main(["chat", "--model", str(tiny.dir), "--features", str(tmp_path / "v.npy"), "--query", query,
                   "--temperature", "0", "--max-new-tokens", "6", "--json"])
  out = capsys.readouterr().out
  assert code == 0
  assert json.loads(out)["token_ids"] == tiny.hf_greedy([("human", "<video>\n" + query)], _features(7), 6)
