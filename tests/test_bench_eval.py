"""The grounding-eval benchmark runs on CPU at tiny shapes: one JSON line per batch size, then the speedup."""

import json

from vtimellm_jax.bench import eval as eval_bench


def test_eval_bench_smoke(capsys):
  assert eval_bench.main(["--size", "tiny", "--queries", "3", "--batch-size", "2", "--max-new-tokens", "3"]) == 0
  *runs, speedup = [json.loads(line) for line in capsys.readouterr().out.strip().split("\n")]
  assert [r["batch"] for r in runs] == [1, 2]
  for r in runs:
    assert r["what"] == "jax_grounding_eval" and r["size"] == "tiny" and r["max_new_tokens"] == 3
    assert r["s"] > 0 and r["queries_per_s"] > 0 and r["tokens_per_s"] > 0 and r["device"]
    assert 0 < r["mean_answer_tokens"] <= 3
  # 3 queries in batches of 2: the short last batch is padded, and its filler rows are not counted.
  assert runs[0]["queries"] == runs[1]["queries"] == 3
  assert speedup["what"] == "jax_grounding_eval_speedup" and speedup["batch"] == 2 and speedup["speedup"] > 0
