"""Dense-captioning metrics: answer reading, merging, SODA's matching and the tIoU protocol, vs hand references."""

import itertools
import json
import random
import re
import shutil
import string

import numpy as np
import pytest

from vtimellm_jax import cli
from vtimellm_jax.evaluation import annotations, answer_log, captioning, densevid, soda
from vtimellm_jax.evaluation.densevid import Event

C = captioning


def _item(event, stamps):
  return {"event": event, "timestamps": stamps}


@pytest.mark.parametrize("answer, items, problems", [
    ("Sure:\n" + json.dumps([_item("A man runs.", "from 00 to 29"), _item("He stops.", "from 30 to 99")]),
     [(0, 29, "A man runs."), (30, 99, "He stops.")], ()),
    ("I cannot answer in JSON.", [], (C.NO_JSON,)),
    ('[{"event": "cut", "timestamps": "from 10 to 20"}', [], (C.NO_JSON,)),  # torn, never closed
    ("[]", [], (C.NO_EVENTS,)),
    (json.dumps([_item("back", "from 50 to 20")]), [(50, 20, "back")], (C.REVERSED,)),
    # Read by position: characters 5-6 and the last two.
    (json.dumps([_item("big", "from 100 to 120")]), [(10, 20, "big")], (C.OVER_99,)),
    (json.dumps([_item("short", "from 5 to 9")]), [(5, 9, "short")], (C.NONSTANDARD,)),
    # An unreadable item ends the reading; the items before it stay.
    (json.dumps([_item("one", "from 01 to 10"), {"timestamps": "from 10 to 20"}, _item("three", "from 20 to 30")]),
     [(1, 10, "one")], (C.BAD_ITEM,)),
    (json.dumps([_item("one", "from 01 to 10"), _item("two", "soon")]), [(1, 10, "one")], (C.BAD_ITEM,)),
    (json.dumps([_item(7, "from 01 to 10")]), [], (C.BAD_ITEM,)),
    # The first [...] on one line is the list, even when it is not the events.
    ('see [1, 2]\n' + json.dumps([_item("x", "from 00 to 10")]), [], (C.BAD_ITEM,)),
    # A list spread over lines has no [...] on any single line.
    ('[\n{"event": "x", "timestamps": "from 00 to 10"}\n]', [], (C.NO_JSON,)),
])
def test_parse_answer(answer, items, problems):
  parsed = C.parse_answer(answer)
  assert list(parsed.items) == items
  assert set(parsed.problems) == set(problems)


def test_merge_similar():
  same = "A man is playing the guitar on stage."
  items = [(0, 10, same), (11, 30, same), (30, 40, same),  # gaps 1 and 0: one event 0-40
           (41, 50, "Completely different."), (53, 60, "Completely different."),  # gap 3: kept apart
           (60, 70, same + "!"), (69, 80, same + "!")]  # ratio < 1 but > 0.98, overlap of 1: merged
  assert C.merge_similar(items) == [(0, 40, same), (41, 50, "Completely different."),
                                    (53, 60, "Completely different."), (60, 80, same + "!")]
  # Sentences below the similarity bar are never merged, however close in time.
  assert C.merge_similar([(0, 10, "Same thing."), (10, 20, "Same thing!")]) == [(0, 10, "Same thing."),
                                                                                (10, 20, "Same thing!")]


def test_to_events_covers_the_end_frame():
  assert C.to_events([(0, 29, "a"), (71, 99, "b")], 50.0) == [Event(0.0, 15.0, "a"), Event(35.5, 50.0, "b")]


def test_segment_iou_hand_values():
  assert soda.segment_iou((0, 10), (5, 15)) == pytest.approx(5 / 15)
  assert soda.segment_iou((0, 5), (10, 20)) == 0.0
  assert soda.segment_iou((2, 4), (0, 10)) == pytest.approx(0.2)


def _brute_force_matching(scores):
  """The best sum over all sets of pairs increasing in both indices (exhaustive)."""
  g, p = scores.shape
  best = 0.0
  for k in range(1, min(g, p) + 1):
    for rows in itertools.combinations(range(g), k):
      for cols in itertools.combinations(range(p), k):
        best = max(best, sum(scores[r, c] for r, c in zip(rows, cols)))
  return best


def test_ordered_matching_equals_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(60):
    scores = rng.random((rng.integers(1, 6), rng.integers(1, 6))) * (rng.random() < 0.8)
    scores[rng.random(scores.shape) < 0.3] = 0.0
    assert soda.best_ordered_matching(scores) == pytest.approx(_brute_force_matching(scores))


def test_soda_c_video_by_hand():
  gts, preds = [(0.0, 10.0), (10.0, 20.0)], [(0.0, 10.0), (10.0, 20.0), (20.0, 30.0)]
  meteor = np.array([[0.5, 0.9, 0.0], [0.2, 0.4, 0.0]])
  # IoU is the identity on the first two predictions, so S = 0.5 + 0.4 (crossing pairs are not allowed).
  score = soda.soda_c_video(gts, preds, meteor)
  p, r = 0.9 / 3, 0.9 / 2
  assert (score.precision, score.recall) == pytest.approx((p, r), abs=1e-6)
  assert score.f1 == pytest.approx(2 * p * r / (p + r), abs=1e-6)
  assert soda.soda_c_video(gts, [], np.zeros((2, 0))).f1 == 0.0


def test_tiou_pairs_and_garbage():
  gts = [Event(0, 10, "g0"), Event(5, 15, "g1"), Event(40, 50, "g2")]
  preds = [Event(0, 12, "covers both"), Event(30, 35, "nowhere")]
  pairs = densevid.tiou_pairs(preds, gts, 0.3, random.Random(0))
  assert [(p.hypothesis, p.reference, p.matched) for p in pairs[:2]] == [("covers both", "g0", True),
                                                                      ("covers both", "g1", True)]
  garbage = pairs[2]
  assert not garbage.matched and garbage.hypothesis == "nowhere"
  assert 10 <= len(garbage.reference) <= 20 and set(garbage.reference) <= set(string.ascii_lowercase)
  again = densevid.tiou_pairs(preds, gts, 0.3, random.Random(0))
  assert again == pairs  # seeded: the same strings every run
  assert len(densevid.tiou_pairs(preds, gts, 0.9, random.Random(0))) == 2  # both unmatched at 0.9


def test_evaluate_averages_videos_then_tious():
  """Toy scorers (share of exact matches) make the protocol's bookkeeping checkable by hand."""
  gt = {"a": [Event(0, 10, "x"), Event(10, 20, "y")], "b": [Event(0, 10, "z")]}
  preds = {"a": [Event(0, 10, "x"), Event(10, 14, "y")], "b": []}
  exact = lambda pairs: sum(h == r for h, r in pairs) / len(pairs)
  scores = densevid.evaluate(preds, gt, lambda texts: list(texts), exact, exact, tious=(0.3, 0.5))
  # tIoU 0.3: both of video a match (IoU of [10, 14] with [10, 20] is 0.4) -> 1.0; b has no prediction -> 0.
  # tIoU 0.5: [10, 14] matches nothing -> a garbage pair -> 0.5; b -> 0. Mean over videos then tIoUs.
  assert scores.per_tiou[0.3]["METEOR"] == pytest.approx(0.5)
  assert scores.per_tiou[0.5]["METEOR"] == pytest.approx(0.25)
  assert scores.meteor == pytest.approx(0.375) and scores.cider == pytest.approx(0.375)


MALFORMED_AND_CLEAN = [
    # (malformed answer, the clean answer the release's rules make it equal to)
    ("No idea.", "[]"),
    ('[{"event": "A dog runs.", "timestamps": "from 100 to 150"}]', '[{"event": "A dog runs.", "timestamps": "from 10 to 50"}]'),
    ('[{"event": "A cat sits.", "timestamps": "from 05 to 40"}, {"event": "x"}, {"event": "late", "timestamps": "from 50 to 60"}]',
     '[{"event": "A cat sits.", "timestamps": "from 05 to 40"}]'),
    ('[{"event": "Backwards.", "timestamps": "from 70 to 20"}, {"event": "Fine.", "timestamps": "from 20 to 90"}]',
     '[{"event": "Backwards.", "timestamps": "from 70 to 20"}, {"event": "Fine.", "timestamps": "from 20 to 90"}]'),
    ('[{"event": "Short form.", "timestamps": "from 5 to 9"}]', '[{"event": "Short form.", "timestamps": "from 05 to 09"}]'),
]


def _captioning_files(tmp_path, name, answers):
  ann = {f"v{i}": {"duration": 30.0 + 7 * i, "timestamps": [[0.0, 10.0 + i], [8.0, 30.0]],
                   "sentences": ["A dog runs on the grass.", "A cat sits by the window."]} for i in range(len(answers))}
  data, log = tmp_path / f"{name}.json", tmp_path / f"{name}.jsonl"
  data.write_text(json.dumps(ann))
  log.write_text("".join(json.dumps({"video_id": f"v{i}", "task": "captioning", "query_id": 0, "answer": a}) + "\n"
                         for i, a in enumerate(answers)))
  return str(log), str(data)


def test_malformed_answers_read_like_their_clean_equivalents(tmp_path):
  bad = _captioning_files(tmp_path, "bad", [m for m, _ in MALFORMED_AND_CLEAN])
  good = _captioning_files(tmp_path, "good", [c for _, c in MALFORMED_AND_CLEAN])
  read = lambda files: C.read_predictions(answer_log.read_log(files[0]).records, annotations.read_activitynet(files[1]))
  bad_preds, problems, malformed = read(bad)
  good_preds, _, clean_malformed = read(good)
  assert bad_preds == good_preds
  assert malformed == 5 and clean_malformed == 2  # "[]" (no events) and the reversed span stay malformed
  assert problems == {C.NO_JSON: 1, C.OVER_99: 1, C.BAD_ITEM: 1, C.REVERSED: 1, C.NONSTANDARD: 1}


@pytest.mark.skipif(shutil.which("java") is None, reason="captioning metrics need Java")
def test_malformed_log_through_cli(tmp_path, capsys):
  bad = _captioning_files(tmp_path, "bad", [m for m, _ in MALFORMED_AND_CLEAN])
  assert cli.main(["metrics", "--task", "captioning", "--json", "--log", bad[0], "--data", bad[1]]) == 0
  out = capsys.readouterr()
  metrics = json.loads(out.out)
  assert set(metrics) == {"soda_c", "METEOR", "CIDEr"} and all(np.isfinite(v) and v >= 0 for v in metrics.values())
  assert metrics["METEOR"] > 0  # "A dog runs." over frames 10-50 matches the first moment of v1
  assert "5 of 5 answers malformed" in out.err
  assert re.search(r"1\s+value > 99", out.err)
