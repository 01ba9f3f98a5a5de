"""The two Java programs of the COCO caption toolkit: Stanford PTB tokenization and METEOR 1.5.

The release scores captions with pycocoevalcap, whose tokenizer and METEOR are Java jars shipped in
that package. We run the same jars (so scores are the same to the printed digit) but drive them
ourselves: one METEOR process for a whole evaluation (it spends ~10 s loading its paraphrase table),
stats cached per (hypothesis, reference), temporary files outside site-packages, and a clear error
when Java or pycocoevalcap is missing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Sequence

from vtimellm_jax.errors import UserError

# What pycocoevalcap's PTBTokenizer drops after tokenizing (punctuation tokens).
_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                          ".", "?", "!", ",", ":", "-", "--", "...", ";"])


class JavaMissingError(UserError):
  """Captioning metrics were asked for but Java or the pycocoevalcap jars are not available."""


def _package_dir() -> str:
  try:
    import pycocoevalcap.meteor.meteor as meteor_module  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise JavaMissingError("captioning metrics need the pycocoevalcap package (it ships the METEOR 1.5 and "
                           "Stanford PTB tokenizer jars): pip install pycocoevalcap") from None
  return os.path.dirname(os.path.dirname(os.path.abspath(meteor_module.__file__)))


def java_command() -> str:
  """Returns the path of `java`, or raises JavaMissingError saying captioning metrics need it."""
  java = shutil.which("java")
  if java is None:
    raise JavaMissingError("captioning metrics (SODA_c, METEOR, CIDEr) need Java: METEOR 1.5 and the Stanford "
                           "PTB tokenizer are Java programs. Install a Java runtime (e.g. `apt-get install "
                           "default-jre-headless`) so that `java` is on PATH. Grounding metrics do not need it.")
  return java


def clean_text(text: str) -> str:
  """Returns `text` as the release feeds it to the tokenizer: non-ASCII characters and line breaks as spaces."""
  # The tokenizer works line by line; any line break inside a caption would shift every later caption.
  return "".join(c if ord(c) < 128 and c not in "\r\n\x0b\x0c" else " " for c in text)


def ptb_tokenize(sentences: Sequence[str]) -> list[str]:
  """Returns each sentence PTB-tokenized, lower-cased and stripped of punctuation tokens (pycocoevalcap's rule)."""
  if not sentences:
    return []
  jar = os.path.join(_package_dir(), "tokenizer", "stanford-corenlp-3.4.1.jar")
  with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="ascii") as f:
    f.write("\n".join(clean_text(s) for s in sentences))
    name = f.name
  try:
    out = subprocess.run([java_command(), "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer",
                          "-preserveLines", "-lowerCase", name],
                         capture_output=True, check=False)
  finally:
    os.remove(name)
  if out.returncode != 0:
    raise RuntimeError(f"PTB tokenizer failed ({out.returncode}): {out.stderr.decode(errors='replace')[-2000:]}")
  lines = out.stdout.decode().split("\n")
  # -preserveLines keeps one output line per input line (blank ones included); a trailing newline may follow.
  if len(lines) < len(sentences) or any(line.strip() for line in lines[len(sentences):]):
    raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(sentences)} sentences")
  return [" ".join(w for w in line.rstrip().split(" ") if w not in _PUNCTUATION) for line in lines[: len(sentences)]]


class Meteor:
  """A running METEOR 1.5 process (`-l en -norm`, as pycocoevalcap runs it). Use as a context manager."""

  def __init__(self):
    jar_dir = os.path.join(_package_dir(), "meteor")
    self._process = subprocess.Popen(
        [java_command(), "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"],
        cwd=jar_dir, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    self._stats: dict[tuple[str, tuple[str, ...]], str] = {}

  def __enter__(self) -> "Meteor":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    if self._process.poll() is None:
      self._process.stdin.close()
      self._process.kill()
      self._process.wait()

  def _ask(self, line: str) -> str:
    self._process.stdin.write((line + "\n").encode())
    self._process.stdin.flush()
    answer = self._process.stdout.readline().decode().strip()
    if not answer:
      raise RuntimeError(f"METEOR stopped answering (exit code {self._process.poll()})")
    return answer

  def stats(self, hypothesis: str, references: Sequence[str]) -> str:
    """Returns METEOR's sufficient statistics line for one hypothesis against its references."""
    key = (hypothesis, tuple(references))
    if key not in self._stats:
      # pycocoevalcap strips the field separator from hypotheses only.
      hyp = hypothesis.replace("|||", "").replace("  ", " ")
      self._stats[key] = self._ask(" ||| ".join(("SCORE", " ||| ".join(references), hyp)))
    return self._stats[key]

  def evaluate(self, stats: Sequence[str]) -> tuple[float, list[float]]:
    """Returns (corpus METEOR over all the segments, each segment's METEOR) for statistics lines."""
    if not stats:
      raise ValueError("no segments to score")
    self._process.stdin.write(("EVAL ||| " + " ||| ".join(stats) + "\n").encode())
    self._process.stdin.flush()
    segments = [float(self._process.stdout.readline().strip()) for _ in stats]
    return float(self._process.stdout.readline().strip()), segments

  def segment_scores(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
    """Returns METEOR of each (hypothesis, reference) pair on its own."""
    if not pairs:
      return []
    return self.evaluate([self.stats(hyp, [ref]) for hyp, ref in pairs])[1]

  def corpus_score(self, pairs: Sequence[tuple[str, str]]) -> float:
    """Returns the corpus-level METEOR of (hypothesis, reference) pairs (pycocoevalcap's `compute_score` value)."""
    return self.evaluate([self.stats(hyp, [ref]) for hyp, ref in pairs])[0]
