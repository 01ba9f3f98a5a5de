"""The decode and serve benchmarks run on CPU with the tiny preset; the bytes a decode call reads."""

import contextlib
import io
import json

import pytest

from vtimellm_jax.bench import decode


def test_decode_bench_smoke(capsys):
  assert decode.main(["--size", "tiny", "--prompt-len", "8", "--new-tokens", "3", "--repeats", "1"]) == 0
  lines = [json.loads(line) for line in capsys.readouterr().out.strip().split("\n")]
  assert [r["batch"] for r in lines] == [1]
  for r in lines:
    # No order between the two timings: each is one run, and on a busy machine 3 tokens can time
    # faster than 1 (CI saw 0.0084 s against 0.0115 s).
    assert r["new_tokens"] == 3 and r["size"] == "tiny" and r["tokens_per_s"] > 0 and r["s"] > 0 and r["prefill_s"] > 0


def test_decode_bytes_reads_weights_per_token_and_the_cache_up_to_each_position():
  # 3 new tokens after a 10-position prompt: 3 weight reads; decode steps 1 and 2 read 11 and 12 positions per row.
  assert decode.decode_bytes(1000, 7, 2, 10, 3) == 3 * 1000 + 2 * 7 * (11 + 12)
  assert decode.decode_bytes(1000, 7, 4, 10, 1) == 1000  # the prefill alone


def test_decode_bench_traces_one_call(tmp_path, capsys):
  assert decode.main(["--size", "tiny", "--prompt-len", "8", "--new-tokens", "3", "--repeats", "1",
                      "--profile-dir", str(tmp_path / "traces")]) == 0
  record = json.loads(capsys.readouterr().out)
  names = sorted(p.name for p in (tmp_path / "traces").iterdir())
  assert names == ["decode.perfetto.json.gz", "decode.xplane.pb"]  # flat: nothing else left behind
  want = ("decode.xplane.pb", "decode.perfetto.json.gz")
  assert record["trace_files"] == [str(tmp_path / "traces" / n) for n in want]
  assert record["read_gb_per_s"] >= record["weight_gb_per_s"] >= 0


@pytest.mark.parametrize("stream", [False, True])
def test_serve_bench_smoke(stream):
  from vtimellm_jax.bench import serve

  # Not capsys: uvicorn's logging set-up closes the old handlers, and absl's closes its stream (pytest's
  # capture of stderr) when that is no longer sys.stderr, which capsys would make it.
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    assert serve.main(["--size", "tiny", "--requests", "6", "--slots", "3", "--context", "640", "--max-tokens", "4"]
                      + ["--stream"] * stream) == 0
  alone, together, summary = [json.loads(line) for line in out.getvalue().strip().split("\n")]
  assert (alone["mode"], together["mode"]) == ("one_at_a_time", "concurrent")
  for r in (alone, together):
    assert r["requests"] == 6 and r["requests_per_s"] > 0 and r["size"] == "tiny" and r["dtype"] == "float32"
    assert r["decode_steps"] > 0 and r["weight_gb_per_s"] >= 0 and "hbm_fraction" not in r  # CPU: no bandwidth
    assert r["stream"] is stream
    # Streamed, the first text comes no later than the whole answer; unstreamed there is no such time.
    assert (0 < r["ttft_p50_s"] <= r["p50_s"] and r["ttft_p99_s"] <= r["p99_s"]) if stream else "ttft_p50_s" not in r
  # Concurrent rows share decode steps; every answer is the one it gets alone.
  assert together["decode_steps"] <= alone["decode_steps"] and summary["identical"] and summary["speedup"] > 0
  assert summary["stream"] is stream
