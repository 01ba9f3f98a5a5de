"""The grounding-in-text probe: its samples say the truth, and it runs end to end."""

import numpy as np

from data_pipelines.synthetic import position_probe as probe


def test_sample_answer_is_the_span_of_the_query_colour():
  rng = np.random.default_rng(0)
  prefix = np.arange(40, 40 + probe.PREFIX)
  for _ in range(50):
    tokens, labels = probe.sample(rng, prefix)
    frames = np.asarray(tokens[1 + probe.PREFIX:1 + probe.PREFIX + probe.FRAMES])
    query = tokens[1 + probe.PREFIX + probe.FRAMES + 1]
    answer = tokens[-probe.ANSWER:]
    start = (answer[1] - probe.DIGIT0) * 10 + answer[2] - probe.DIGIT0
    end = (answer[4] - probe.DIGIT0) * 10 + answer[5] - probe.DIGIT0
    on = np.flatnonzero(frames == query)
    assert (on.min(), on.max() + 1) == (start, end)
    assert labels[-probe.ANSWER:] == answer and set(labels[:-probe.ANSWER]) == {-100}


def test_probe_runs(capsys):
  assert probe.main(["--hidden", "32", "--layers", "1", "--heads", "2", "--steps", "2", "--batch", "2"]) == 0
  lines = capsys.readouterr().out.strip().splitlines()
  assert lines and lines[-1].startswith("step 2 ") and "R@0.5" in lines[-1]
