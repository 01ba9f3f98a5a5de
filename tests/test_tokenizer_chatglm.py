"""ChatGLM3's tokenizer and the release's `glm` labels, against a reference written here.

The reference follows the release's rules on the `sentencepiece` package directly:
- ChatGLM3's tokenizer (under transformers 4.31, which never splits a ChatGLM3 text at special-token
  strings) gives `[gMASK] sop` + sentencepiece's ids of the whole text; the 9 extra tokens
  `[MASK] [gMASK] [sMASK] sop eop <|system|> <|user|> <|assistant|> <|observation|>` take the ids
  after sentencepiece's last one;
- `tokenizer_image_token`: the text is split at `<video>`, every chunk tokenized with its prefix,
  the chunks joined by -200 and the prefix kept once; `preprocess_glm` drops that prefix again;
- `preprocess_glm`: `[gMASK] sop`, per turn the role token and the turn's ids, `</s>`; a loss mask
  that is 1 on assistant turns (role token included), shifted right by one;
- inference: the same for a conversation ending with a human turn, its last id replaced by
  `<|assistant|>`.
"""

from __future__ import annotations

import json
import pickle
import shutil

import numpy as np
import pytest
import sentencepiece as spm

from data_fixtures import tiny_tokenizer_dir  # noqa: F401  pylint: disable=unused-import
from vtimellm_jax import cli
from vtimellm_jax import errors
from vtimellm_jax.data import chatglm_tokenizer
from vtimellm_jax.data import pipeline
from vtimellm_jax.data import templates
from vtimellm_jax.data import tokenizer as tokenizer_lib
from vtimellm_jax.models import families

EXTRAS = ["[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
          "<|observation|>"]
IGNORE, VIDEO = -100, -200
BIG = 100_000  # a max_length that never cuts

CORPUS = [
    "视频中的男人正在厨房里做饭，然后走进游泳池。",
    "一只狗在草地上奔跑，女人在数钱。",
    "请详细描述视频中的事件。从 05 到 37，一个人走进房间。",
    "在哪些帧中我们可以看到一个人在跳舞？",
    "东京的音乐会很热闹，观众们在欢呼。",
    "The man walks into the kitchen and starts cooking dinner.",
    "A dog runs across the field while a woman counts money.",
    "During which frames can we see a person dancing? From 12 to 48.",
    "Could you please describe the events in the video in detail?",
] * 12


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory):
  return chatglm_tokenizer.train_chatglm_tokenizer(CORPUS, tmp_path_factory.mktemp("glm"),
                                                   vocab_size=400)


@pytest.fixture(scope="module")
def enc(glm_dir):
  return chatglm_tokenizer.ChatGLMEncoder(glm_dir)


@pytest.fixture(scope="module")
def sp(glm_dir):
  return spm.SentencePieceProcessor(model_file=str(glm_dir / "tokenizer.model"))


# ---- the reference, from the release's rules ----

def extra(sp, name: str) -> int:
  return sp.get_piece_size() + EXTRAS.index(name)


def ref_tokenizer(sp, text: str) -> list[int]:
  """`tokenizer(text).input_ids` of ChatGLM3's tokenizer under transformers 4.31."""
  return [extra(sp, "[gMASK]"), extra(sp, "sop")] + sp.encode(text)


def ref_image_token(sp, text: str) -> list[int]:
  """The release's tokenizer_image_token for a GLM tokenizer (offset 2)."""
  chunks = [ref_tokenizer(sp, c) for c in text.split("<video>")]
  ids = chunks[0][:2]
  for k, chunk in enumerate(chunks):
    if k:
      ids.append(VIDEO)
    ids.extend(chunk[2:])
  return ids


def ref_glm(sp, turns, shift: bool = True) -> tuple[list[int], list[int]]:
  """The release's preprocess_glm (with `shift` False: the loss mask left unshifted)."""
  tokens, mask = [extra(sp, "[gMASK]"), extra(sp, "sop")], [0, 0]
  for role, text in turns:
    turn = [extra(sp, "<|user|>" if role == "human" else "<|assistant|>")]
    turn += ref_image_token(sp, text)[2:]
    tokens += turn
    mask += [int(role != "human")] * len(turn)
  tokens.append(sp.eos_id())
  mask.append(0)
  if shift:
    mask = [0] + mask[:-1]
  return tokens, [t if m else IGNORE for t, m in zip(tokens, mask)]


def ref_generation(sp, turns) -> list[int]:
  ids, _ = ref_glm(sp, turns)
  return ids[:-1] + [extra(sp, "<|assistant|>")]


RECORDS = {
    "zh_stage2": [("human", "<video>\n在哪些帧中我们可以看到一个人在跳舞？"),
                  ("gpt", "从 12 到 48。")],
    "zh_multi": [("human", "<video>\n请详细描述视频中的事件。"),
                 ("gpt", "从 05 到 37，一个人走进房间。从 40 到 99，狗在草地上奔跑。"),
                 ("human", "女人在做什么？"), ("gpt", "她在数钱。"),
                 ("human", "最后呢？"), ("gpt", "东京的音乐会。")],
    "en_multi": [("human", "<video>\nDuring which frames can we see a person dancing?"),
                 ("gpt", "From 12 to 48."), ("human", "And the dog?"),
                 ("gpt", "The dog runs across the field from 50 to 77.")],
    "video_middle": [("human", "Watch this <video> and describe it."), ("gpt", "A man cooks.")],
    "video_end": [("human", "描述这个视频<video>"), ("gpt", "一只狗在奔跑。")],
    "video_end_newline": [("human", "Describe this video:\n<video>\n"), ("gpt", "A dog.")],
    "video_no_newline": [("human", "<video>What happens?"), ("gpt", "Nothing at all.")],
    "video_only": [("human", "<video>"), ("gpt", "视频")],
    "stage1_caption": [("human", "<video>\n简要描述这张图片。"), ("gpt", "厨房里的男人在做饭")],
    "stage1_english": [("human", "<video>\nRender a clear and concise summary of the photo."),
                       ("gpt", "a woman counts money in a kitchen")],
    "unicode": [("human", "<video>\ncafé naïve 😀 déjà vu — “quotes” ①②"),
                ("gpt", "Ünïcödé ✓ 🎉 \t tabs  and   spaces ")],
    "digits": [("human", "<video>\n0123456789 1.5 2024-01-02"), ("gpt", "from 00 to 99, 100%")],
    "special_strings": [("human", "<video>\nwhat is </s> or <unk> or <|user|> or [gMASK]?"),
                        ("gpt", "<|assistant|> sop eop <s> ▁ done</s>")],
    "empty_answer_text": [("human", "<video>\n问题"), ("gpt", "")],
    "leading_space": [("human", " <video>\n 问题 "), ("gpt", " 回答 ")],
}


@pytest.mark.parametrize("name", sorted(RECORDS))
def test_ids_and_labels_equal_the_reference(enc, sp, name):
  turns = RECORDS[name]
  out = templates.tokenize(turns, "glm", enc, max_length=BIG, num_features=100)
  ids, labels = ref_glm(sp, turns)
  assert out.input_ids.tolist() == ids
  assert out.labels.tolist() == labels
  assert out.input_ids.dtype == np.int32 and not out.release_dropped and not out.truncated


def test_labels_train_answers_and_the_token_after_them(enc):
  turns = RECORDS["en_multi"]
  out = templates.tokenize(turns, "glm", enc, max_length=BIG)
  ids, labels = out.input_ids.tolist(), out.labels.tolist()
  trained = [i for i, l in zip(ids, labels) if l != IGNORE]
  # The two answers' ids, each followed by the role token or </s> that comes after it.
  answer1, answer2 = enc.encode(turns[1][1]), enc.encode(turns[3][1])
  assert trained == answer1 + [enc.user_id] + answer2 + [enc.eos_id]
  assert labels[ids.index(VIDEO)] == IGNORE and ids[:3] == [enc.gmask_id, enc.sop_id, enc.user_id]


def test_an_unshifted_mask_gives_other_labels(enc, sp):
  """The reference can tell the release's shifted mask from an unshifted one."""
  for name in ("zh_multi", "en_multi", "stage1_caption"):
    out = templates.tokenize(RECORDS[name], "glm", enc, max_length=BIG)
    assert out.labels.tolist() != ref_glm(sp, RECORDS[name], shift=False)[1]


def test_encode_is_sentencepiece_and_special_strings_are_spelt_out(enc, sp):
  for text in ("你好，世界", " two  spaces ", "</s><unk><|user|>[gMASK]sop", "", "\n", "😀"):
    assert enc.encode(text) == sp.encode(text)
  assert enc.eos_id not in enc.encode("a </s> b") and enc.user_id not in enc.encode("<|user|>")


def test_encode_special_tokens_folder_gives_role_ids(glm_dir, sp, tmp_path):
  folder = shutil.copytree(glm_dir, tmp_path / "special")
  config = json.loads((folder / "tokenizer_config.json").read_text())
  (folder / "tokenizer_config.json").write_text(json.dumps(config | {"encode_special_tokens": True}))
  text = "ask<|user|> me <|assistant|>x</s>"
  want = sp.encode("ask") + [extra(sp, "<|user|>")] + sp.encode(" me ") + [extra(sp, "<|assistant|>")]
  want += sp.encode("x</s>")
  assert chatglm_tokenizer.ChatGLMEncoder(folder).encode(text) == want


def test_extra_token_ids_and_attributes(enc, sp):
  n = sp.get_piece_size()
  assert [enc.command(t) for t in EXTRAS] == list(range(n, n + 9))
  assert enc.vocab_size == len(enc) == n + 9
  assert (enc.gmask_id, enc.sop_id, enc.user_id, enc.assistant_id) == (n + 1, n + 3, n + 6, n + 7)
  assert (enc.eos_id, enc.pad_id, enc.unk_id) == (2, 0, 0) == (sp.eos_id(), sp.unk_id(), sp.unk_id())
  assert enc.stop_ids == (enc.user_id, enc.eos_id)
  assert enc.command("<eos>") == 2 and enc.command("<pad>") == 0
  assert enc.vocab["<|assistant|>"] == enc.assistant_id
  with pytest.raises(errors.UserError, match="not a ChatGLM3 special token"):
    enc.command("<|bogus|>")


def test_over_length_cut_and_error(enc, sp):
  turns = [("human", "<video>\n" + "请详细描述视频中的事件。" * 3),
           ("gpt", "从 05 到 37，一个人走进房间。" * 20)]
  ids, labels = ref_glm(sp, turns)
  max_length, n = 140, 100
  out = templates.tokenize(turns, "glm", enc, max_length=max_length, num_features=n)
  budget = max_length - n + 1
  assert len(ids) > budget and out.truncated and out.full_length == len(ids)
  assert out.input_ids.tolist() == ids[:budget] and out.labels.tolist() == labels[:budget]
  late = [("human", "一个问题 " * 30 + "<video>"), ("gpt", "回答")]
  with pytest.raises(templates.OverLengthError):
    templates.tokenize(late, "glm", enc, max_length=max_length, num_features=n)


@pytest.mark.parametrize("turns, message", [
    ([("human", "<video>\n问题"), ("gpt", "看 <video>")], "only a human turn"),
    ([("human", "<video>\n<video>"), ("gpt", "回答")], "2 <video> tags"),
    ([("human", "没有视频"), ("gpt", "回答")], "0 <video> tags"),
    ([("human", "<video>"), ("gpt", "a"), ("human", "<video>"), ("gpt", "b")], "2 <video> tags"),
])
def test_video_placement_errors(enc, turns, message):
  with pytest.raises(errors.UserError, match=message):
    templates.tokenize(turns, "glm", enc)


def test_video_in_a_later_human_turn(enc, sp):
  turns = [("human", "你好"), ("gpt", "你好！"), ("human", "<video>\n描述视频"), ("gpt", "一只狗")]
  out = templates.tokenize(turns, "glm", enc, max_length=BIG)
  assert (out.input_ids.tolist(), out.labels.tolist()) == ref_glm(sp, turns)


def test_generation_ids(enc, sp):
  first = [("human", "<video>\n描述视频中的事件。")]
  assert templates.glm_generation_ids(first, enc) == ref_generation(sp, first)
  more = first + [("gpt", "从 05 到 37，一个人走进房间。"), ("human", "然后呢？")]
  ids = templates.glm_generation_ids(more, enc)
  assert ids == ref_generation(sp, more) and ids[-1] == enc.assistant_id
  assert enc.eos_id not in ids
  with pytest.raises(errors.UserError, match="end with a human turn"):
    templates.glm_generation_ids(more[:2], enc)
  with pytest.raises(errors.UserError, match="0 <video> tags"):
    templates.glm_generation_ids([("human", "没有视频")], enc)
  assert templates.generation_ids(more, enc) == ids  # the family's template: glm


def test_generation_ids_refuse_the_other_family(enc, tiny_tokenizer_dir):  # noqa: F811
  llama = tokenizer_lib.load_encoder(tiny_tokenizer_dir)
  turns = [("human", "<video>\ndescribe")]
  with pytest.raises(errors.UserError, match="'glm' needs a ChatGLM3 tokenizer"):
    templates.glm_generation_ids(turns, llama)
  with pytest.raises(errors.UserError, match="template 'v1' is for LLaMA tokenizers"):
    templates.v1_generation_ids(turns, enc)


def test_decode(enc):
  for text in ("从 05 到 37，一个人走进房间。", "The dog runs. 😀", "  two spaces", "a\nb"):
    ids = enc.encode(text)
    assert enc.decode(ids) == text
    wrapped = [enc.gmask_id, enc.sop_id, enc.assistant_id] + ids + [enc.user_id, enc.eos_id, -200]
    assert enc.decode(wrapped) == text
  assert enc.decode([enc.unk_id, enc.eos_id] + enc.encode("ok")) == "ok"
  assert enc.pieces([enc.gmask_id, -200, enc.eos_id]) == ["[gMASK]", "<video>", "</s>"]


def test_pickling_keeps_the_encoder(enc):
  copy = pickle.loads(pickle.dumps(enc))
  text = "<|user|> 视频中的男人 walks 12"
  assert copy.encode(text) == enc.encode(text) and copy.stop_ids == enc.stop_ids
  assert copy.vocab_size == enc.vocab_size and copy.path == enc.path


def test_template_tokenizer_mismatch_is_refused(enc, tiny_tokenizer_dir):  # noqa: F811
  llama = tokenizer_lib.load_encoder(tiny_tokenizer_dir)
  assert isinstance(llama, tokenizer_lib.ReleaseEncoder)
  turns = RECORDS["stage1_english"]
  with pytest.raises(errors.UserError, match="'glm' needs a ChatGLM3 tokenizer"):
    templates.tokenize(turns, "glm", llama)
  for template in ("v1", "plain"):
    with pytest.raises(errors.UserError, match="ChatGLM3 tokenizer, which the release trains with"):
      templates.tokenize(turns, template, enc)
  assert templates.default_template(enc, True) == "glm"
  assert templates.default_template(llama, True) == "plain"


def test_load_encoder_picks_the_family(glm_dir, tiny_tokenizer_dir):  # noqa: F811
  glm = tokenizer_lib.load_encoder(glm_dir)
  assert isinstance(glm, chatglm_tokenizer.ChatGLMEncoder) and isinstance(glm, tokenizer_lib.Encoder)
  llama = tokenizer_lib.load_encoder(tiny_tokenizer_dir)
  assert isinstance(llama, tokenizer_lib.ReleaseEncoder) and len(llama) == len(llama.tokenizer)
  # Each encoder names its registry family, which holds the templates the release trains it with.
  assert templates.family_of(glm) is families.CHATGLM3 and templates.family_of(llama) is families.VICUNA


def test_bad_folders_are_user_errors(glm_dir, tmp_path):
  with pytest.raises(errors.UserError, match="not a tokenizer folder"):
    tokenizer_lib.load_encoder(tmp_path / "absent")
  missing = shutil.copytree(glm_dir, tmp_path / "missing")
  (missing / "tokenizer.model").unlink()
  with pytest.raises(errors.UserError, match="cannot read the sentencepiece model"):
    tokenizer_lib.load_encoder(missing)
  corrupt = shutil.copytree(glm_dir, tmp_path / "corrupt")
  (corrupt / "tokenizer.model").write_bytes(b"not a model")
  with pytest.raises(errors.UserError, match="not a sentencepiece model"):
    tokenizer_lib.load_encoder(corrupt)
  bad_json = shutil.copytree(glm_dir, tmp_path / "json")
  (bad_json / "tokenizer_config.json").write_text("{oops")
  with pytest.raises(errors.UserError, match="cannot read the tokenizer settings"):
    tokenizer_lib.load_encoder(bad_json)
  no_config = shutil.copytree(glm_dir, tmp_path / "no_config")
  (no_config / "tokenizer_config.json").unlink()
  with pytest.raises(errors.UserError, match="no tokenizer_config.json"):
    chatglm_tokenizer.ChatGLMEncoder(no_config)
  (no_config / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
  with pytest.raises(errors.UserError, match="not 'ChatGLMTokenizer'"):
    chatglm_tokenizer.ChatGLMEncoder(no_config)


def test_training_needs_room_and_text(tmp_path):
  with pytest.raises(errors.UserError, match="too small"):
    chatglm_tokenizer.train_chatglm_tokenizer(CORPUS, tmp_path / "a", vocab_size=260)
  with pytest.raises(errors.UserError, match="empty"):
    chatglm_tokenizer.train_chatglm_tokenizer(["", "  "], tmp_path / "b", vocab_size=400)


def _write_dataset(tmp_path):
  feat = tmp_path / "feat"
  feat.mkdir()
  recs = [{"id": f"v{k}", "conversations": [{"from": "human", "value": "<video>\n描述视频中的事件。"},
                                            {"from": "gpt", "value": "从 <s0> 到 <e0>，狗在奔跑。" * (k + 1)}],
           "meta": {"duration": 10.0, "token": {"<s0>": 1.0, "<e0>": 5.0}}} for k in range(3)]
  for r in recs:
    np.save(feat / f"{r['id']}.npy", np.ones((100, 768), np.float16))
  data = tmp_path / "data.json"
  data.write_text(json.dumps(recs, ensure_ascii=False))
  return data, feat, recs


def test_pipeline_batches_hold_the_release_labels(glm_dir, sp, tmp_path, tiny_tokenizer_dir):  # noqa: F811
  data, feat, recs = _write_dataset(tmp_path)
  source = pipeline.JsonSource(data, feat)
  pipe = pipeline.build_pipeline(source, glm_dir, template="glm", batch_size=3, shard_index=0,
                                 shard_count=1, bucket_boundaries=[128])
  batch = next(pipe.iterator())
  for row, index in enumerate(batch["index"].tolist()):
    answer = recs[index]["conversations"][1]["value"].replace("<s0>", "10").replace("<e0>", "50")
    ids, labels = ref_glm(sp, [("human", "<video>\n描述视频中的事件。"), ("gpt", answer)])
    n = len(ids)
    assert batch["input_ids"][row, :n].tolist() == ids and batch["labels"][row, :n].tolist() == labels
    assert (batch["input_ids"][row, n:] == 0).all() and batch["attention_mask"][row].sum() == n
  with pytest.raises(errors.UserError, match="template 'v1' is for LLaMA tokenizers"):
    pipeline.build_pipeline(source, glm_dir, template="v1", batch_size=3, shard_index=0, shard_count=1)
  with pytest.raises(errors.UserError, match="'glm' needs a ChatGLM3 tokenizer"):
    pipeline.build_pipeline(source, tiny_tokenizer_dir, template="glm", batch_size=3, shard_index=0,
                            shard_count=1)


def test_data_preview_and_check_accept_glm(glm_dir, sp, tmp_path, capsys):
  data, feat, recs = _write_dataset(tmp_path)
  args = ["data", "preview", "--data", str(data), "--tokenizer", str(glm_dir), "--index", "1"]
  assert cli.main(args + ["--template", "glm", "--json"]) == 0
  got = json.loads(capsys.readouterr().out)
  answer = "从 10 到 50，狗在奔跑。" * 2
  ids, labels = ref_glm(sp, [("human", "<video>\n描述视频中的事件。"), ("gpt", answer)])
  assert got == {"input_ids": ids, "labels": labels}
  assert cli.main(args + ["--template", "glm"]) == 0
  out = capsys.readouterr().out
  assert "[gMASK]sop<|user|><video>\n描述视频中的事件。<|assistant|>从 10 到 50" in out
  assert "[[从 10 到 50，狗在奔跑。从 10 到 50，狗在奔跑。</s>]]" in out
  assert cli.main(args + ["--template", "v1"]) == 2
  assert "ChatGLM3 tokenizer" in capsys.readouterr().err
  check = ["data", "check", "--data", str(data), "--features", str(feat), "--tokenizer", str(glm_dir)]
  assert cli.main(check + ["--json"]) == 0  # the template defaults to glm
  assert json.loads(capsys.readouterr().out)["unusable"] == 0
  assert cli.main(check + ["--template", "plain"]) == 2
