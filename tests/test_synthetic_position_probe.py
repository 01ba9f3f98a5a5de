"""The grounding-in-text probe: its samples say the truth, and it runs end to end."""

import numpy as np
import pytest

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


def test_all_events_with_time_pieces_ask_about_every_event():
  rng = np.random.default_rng(1)
  prefix = np.arange(40, 40 + probe.PREFIX)
  for _ in range(30):
    tokens, labels = probe.sample(rng, prefix, pieces=True, all_events=True)
    frames = np.asarray(tokens[1 + probe.PREFIX:1 + probe.PREFIX + probe.FRAMES])
    starts, ends = probe.spans_of(np.asarray([tokens]), np.asarray([labels]), pieces=True)
    colours = {c for c in frames if c != probe.COLOUR0 + probe.NUM_COLOURS}
    assert len(starts) == len(colours)  # one labelled turn per event; filler turns are masked
    for start, end in zip(starts, ends):
      on = np.flatnonzero(frames == frames[start])
      assert on.min() == start and min(on.max() + 1, probe.FRAMES - 1) == end


def test_probe_runs_with_time_code(capsys):
  assert probe.main(["--hidden", "32", "--layers", "1", "--heads", "2", "--steps", "2", "--batch", "2",
                     "--all-events", "--time-code", "1"]) == 0
  assert capsys.readouterr().out.strip().splitlines()[-1].startswith("step 2 ")


def test_one_hop_turns_put_the_query_right_before_the_start_and_keep_the_length():
  prefix = np.arange(40, 40 + probe.PREFIX)
  for seed in range(20):
    two, two_labels = probe.sample(np.random.default_rng(seed), prefix, pieces=True, gap=3)
    one, one_labels = probe.sample(np.random.default_rng(seed), prefix, pieces=True, one_hop=True, gap=3)
    assert len(one) == len(two) and len(one_labels) == len(two_labels)
    frames = np.asarray(two[1 + probe.PREFIX:1 + probe.PREFIX + probe.FRAMES])
    # two-hop: SEP colour fillers FROM start ...; one-hop: SEP fillers FROM colour start ...
    turn2, turn1 = two[1 + probe.PREFIX + probe.FRAMES:], one[1 + probe.PREFIX + probe.FRAMES:]
    assert turn2[2:5] == [probe.FILLER0, probe.FILLER0 + 1, probe.FILLER0 + 2] and turn2[5] == probe.FROM
    colour, start = turn1[5], turn1[6] - probe.PIECE0
    assert turn1[4] == probe.FROM and colour == turn2[1] and start == turn2[6] - probe.PIECE0
    assert np.flatnonzero(frames == colour).min() == start
    assert one_labels[1 + probe.PREFIX + probe.FRAMES + 5] == -100  # the query is input, not a target
    assert one_labels[1 + probe.PREFIX + probe.FRAMES + 6] == turn1[6]


def test_probe_runs_a_one_hop_curriculum(capsys):
  assert probe.main(["--hidden", "32", "--layers", "1", "--heads", "2", "--steps", "2", "--batch", "2",
                     "--time-code", "1", "--one-hop-steps", "1", "--gap", "2"]) == 0
  last = capsys.readouterr().out.strip().splitlines()[-1]
  assert last.startswith("step 2 ") and "wrong-event" in last


def test_spans_of_reads_one_hop_turns_past_the_query():
  rng = np.random.default_rng(3)
  prefix = np.arange(40, 40 + probe.PREFIX)
  for _ in range(20):
    tokens, labels = probe.sample(rng, prefix, pieces=True, all_events=True, one_hop=True)
    frames = np.asarray(tokens[1 + probe.PREFIX:1 + probe.PREFIX + probe.FRAMES])
    starts, ends = probe.spans_of(np.asarray([tokens]), np.asarray([labels]), pieces=True, skip=1)
    assert len(starts) == len({c for c in frames if c != probe.COLOUR0 + probe.NUM_COLOURS})
    for start, end in zip(starts, ends):
      on = np.flatnonzero(frames == frames[start])
      assert on.min() == start and min(on.max() + 1, probe.FRAMES - 1) == end


@pytest.mark.parametrize("restate", [0, 2])
def test_restated_query_is_a_target_and_spans_read_past_it(restate):
  rng = np.random.default_rng(4)
  prefix = np.arange(40, 40 + probe.PREFIX)
  tokens, labels = probe.sample(rng, prefix, pieces=True, all_events=True, gap=1, restate=restate)
  tokens, labels = np.asarray(tokens), np.asarray(labels)
  frames = tokens[1 + probe.PREFIX:1 + probe.PREFIX + probe.FRAMES]
  starts, _ = probe.spans_of(tokens[None], labels[None], pieces=True, skip=1 if restate == 0 else restate - 1)
  froms = np.flatnonzero(labels == probe.FROM)
  assert len(froms) == len(starts) > 0
  for c, start in zip(froms, starts):
    query = tokens[c + 1] if restate == 0 else tokens[c - 1]
    assert labels[c + 1 if restate == 0 else c - 1] == query  # the restated query is trained
    assert tokens[c - 1 - 1 - (restate > 0)] == query  # ... and equals the question's (one filler between)
    assert np.flatnonzero(frames == query).min() == start
    start_slot = c + 1 + (1 if restate == 0 else restate - 1)
    assert tokens[start_slot] == probe.PIECE0 + start
    if restate == 0:
      assert start_slot - 1 == c + 1  # the query right before the start index


def test_restate_does_not_combine_with_one_hop_turns(capsys):
  with pytest.raises(SystemExit) as exit_info:
    probe.main(["--restate", "0", "--one-hop-eval"])
  assert exit_info.value.code == 2 and "does not combine" in capsys.readouterr().err
