"""The grounding-eval benchmark runs on CPU at tiny shapes: one JSON line per batch size, then the speedup."""

import json

from vtimellm_jax.bench import eval as eval_bench


def _lines(capsys) -> list[dict]:
  return [json.loads(line) for line in capsys.readouterr().out.strip().split("\n")]


def test_eval_bench_smoke(capsys):
  assert eval_bench.main(["--size", "tiny", "--queries", "3", "--batch-size", "2", "--max-new-tokens", "3"]) == 0
  *runs, speedup = _lines(capsys)
  assert [r["batch"] for r in runs] == [1, 2]
  for r in runs:
    assert r["what"] == "jax_grounding_eval" and r["size"] == "tiny" and r["max_new_tokens"] == 3
    assert r["s"] > 0 and r["queries_per_s"] > 0 and r["tokens_per_s"] > 0 and r["device"]
    # No token ends an answer: every one is exactly the budget, whatever the random model emits.
    assert r["answer_tokens"] == [3] and r["mean_answer_tokens"] == 3
    assert r["read_gb_per_s"] >= 0 and r["prompt_positions"] > 99
    assert "hbm_fraction" not in r  # a CPU has no bandwidth in the table
  # 3 queries in batches of 2: the short last batch is padded, and its filler rows are not counted.
  assert runs[0]["queries"] == runs[1]["queries"] == 3
  assert speedup["what"] == "jax_grounding_eval_speedup" and speedup["batch"] == 2 and speedup["speedup"] > 0


def test_eval_bench_times_a_few_queries_alone_at_a_long_budget(capsys):
  """The release's budget shape: one at a time on a few queries, batched on all; answers run the whole budget."""
  assert eval_bench.main(["--size", "tiny", "--queries", "4", "--alone-queries", "1", "--batch-size", "4",
                          "--max-new-tokens", "48"]) == 0
  alone, batched, speedup = _lines(capsys)
  assert (alone["batch"], alone["queries"]) == (1, 1) and (batched["batch"], batched["queries"]) == (4, 4)
  assert alone["answer_tokens"] == batched["answer_tokens"] == [48]
  assert speedup["alone_queries"] == 1 and speedup["max_new_tokens"] == 48 and speedup["speedup"] > 0


def test_batch_size_one_is_measured_once(capsys):
  assert eval_bench.main(["--size", "tiny", "--queries", "2", "--batch-size", "1", "--max-new-tokens", "2"]) == 0
  *runs, speedup = _lines(capsys)
  assert [r["batch"] for r in runs] == [1] and speedup["speedup"] == 1.0
