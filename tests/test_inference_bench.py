"""The decode benchmark runs on CPU with the tiny preset and prints one JSON line per batch size."""

import json

from vtimellm_jax.bench import decode


def test_decode_bench_smoke(capsys):
  assert decode.main(["--size", "tiny", "--prompt-len", "8", "--new-tokens", "3", "--repeats", "1"]) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.strip().split("\n")]
  assert [r["batch"] for r in lines] == [1]
  for r in lines:
    assert r["new_tokens"] == 3 and r["size"] == "tiny" and r["tokens_per_s"] > 0 and r["s"] >= r["prefill_s"] > 0
