"""Our driver of the PTB tokenizer jar agrees with pycocoevalcap's wrapper (METEOR's is checked by the release numbers)."""

import shutil

import pytest

from vtimellm_jax.evaluation import coco_java

pytestmark = pytest.mark.skipif(shutil.which("java") is None, reason="captioning metrics need Java")

SENTENCES = [
    "A man's \"dog\" (runs) fast; then stops...",
    "He holds a.",  # the line after decides whether this "a." ends a sentence
    "A boy runs, cannot stop!",
    "",
    "Apples, pears etc.",
    "then a lower-case line, with café au lait",
    "Line\nbreak inside",
]


def test_ptb_tokenize_matches_pycocoevalcap():
  from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # pylint: disable=import-outside-toplevel
  # pycocoevalcap gets non-ASCII already blanked by the evaluators; give it the same input.
  ascii_only = ["".join(c if ord(c) < 128 else " " for c in s) for s in SENTENCES]
  reference = PTBTokenizer().tokenize({i: [{"caption": s}] for i, s in enumerate(ascii_only)})
  ours = coco_java.ptb_tokenize(SENTENCES)
  assert ours == [reference[i][0] for i in range(len(SENTENCES))]
  assert ours[3] == "" and "," not in ours[0] and ours[2] == "a boy runs can not stop"


def test_missing_java_is_a_clear_user_error(monkeypatch, tmp_path):
  monkeypatch.setenv("PATH", str(tmp_path))
  with pytest.raises(coco_java.JavaMissingError, match="need Java"):
    coco_java.ptb_tokenize(["a sentence"])
