"""The decode benchmark runs on CPU with the tiny preset and prints one JSON line per batch size."""

import json

from vtimellm_jax.bench import decode


def test_decode_bench_smoke(capsys):
  assert decode.main(["--size", "tiny", "--prompt-len", "8", "--new-tokens", "3", "--repeats", "1"]) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.strip().split("\n")]
  assert [r["batch"] for r in lines] == [1]
  for r in lines:
    # No order between the two timings: each is one run, and on a busy machine 3 tokens can time
    # faster than 1 (CI saw 0.0084 s against 0.0115 s).
    assert r["new_tokens"] == 3 and r["size"] == "tiny" and r["tokens_per_s"] > 0 and r["s"] > 0 and r["prefill_s"] > 0
