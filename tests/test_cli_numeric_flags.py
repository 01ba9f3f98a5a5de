"""A numeric flag out of range is a usage error naming the flag (exit 2), for every command."""

import pytest

from vtimellm_jax import cli


@pytest.mark.parametrize("argv,message", [
    (["eval", "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
    (["eval", "--max-batches", "-2"], "argument --max-batches: must be >= 1, got -2"),
    (["chat", "--top-p", "1.5"], "argument --top-p: must be in (0, 1], got 1.5"),
    (["chat", "--temperature", "nan"], "argument --temperature: must be in [0, inf), got nan"),
    (["chat", "--max-new-tokens", "many"], "argument --max-new-tokens: expected an integer, got 'many'"),
    (["extract-features", "--workers", "0"], "argument --workers: must be >= 1, got 0"),
    (["train", "--seq-len", "-3"], "argument --seq-len: must be >= 0, got -3"),
    (["data", "check", "--max-length", "0"], "argument --max-length: must be >= 2, got 0"),
    (["quickstart", "--train-videos", "0"], "argument --train-videos: must be >= 1, got 0"),
    (["export", "--step", "-1"], "argument --step: must be >= 0, got -1"),
    (["bench", "decode", "--new-tokens", "0"], "argument --new-tokens: must be >= 1, got 0"),
])
def test_out_of_range_values_are_usage_errors(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    cli.main(argv)
  err = capsys.readouterr().err
  assert e.value.code == 2 and message in err, err
  assert "Traceback" not in err
