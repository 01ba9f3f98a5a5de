"""`--config.key=value` overrides keep each field's type and refuse what does not parse."""

import pathlib

import pytest

from vtimellm_jax.errors import UserError
from vtimellm_jax.training import config_loading

STAGE2_TINY = str(pathlib.Path(__file__).resolve().parents[1] / "configs/stage2.py") + ":tiny"


@pytest.mark.parametrize("raw,want", [("true", True), ("True", True), ("1", True), ("false", False), ("False", False),
                                      ("0", False)])
def test_bool_fields_take_absl_and_python_spellings(raw, want):
  config = config_loading.load_config(STAGE2_TINY, [f"--config.data.skip_bad_records={raw}"])
  assert config.data.skip_bad_records is want


@pytest.mark.parametrize("override,message", [
    ("--config.data.skip_bad_records=maybe", "expected true or false"),
    ("--config.max_steps=2.5", "expected an integer"),
    ("--config.max_steps=many", "not a valid int"),
    ("--config.model.no_such_field=1", "no config field 'model.no_such_field'"),
    ("--config.max_steps", "must look like --config.key=value"),
])
def test_bad_overrides_are_user_errors_naming_the_field(override, message):
  with pytest.raises(UserError, match=message):
    config_loading.load_config(STAGE2_TINY, [override])


def test_numbers_and_lists_keep_their_types():
  config = config_loading.load_config(STAGE2_TINY, ["--config.optim.lr=3", "--config.lora.targets=q_proj, v_proj"])
  assert config.optim.lr == 3.0 and isinstance(config.optim.lr, float)
  assert config.lora.targets == ("q_proj", "v_proj")


@pytest.mark.parametrize("arg,message", [
    ("7B", "unknown size '7B'; choose from tiny, 7b, 13b"),
    ("huge", "unknown size 'huge'"),
    ("tiny,foo", "unknown size 'foo'"),
    ("size=13B", "unknown size '13B'"),
    ("tiny,runlocal=1", "unknown argument 'runlocal=1'"),
])
def test_a_size_that_is_not_known_is_refused_not_trained_as_tiny(arg, message):
  spec = STAGE2_TINY.rsplit(":", 1)[0] + ":" + arg
  with pytest.raises(UserError, match=message):
    config_loading.load_config(spec)


def test_known_sizes_load():
  base = STAGE2_TINY.rsplit(":", 1)[0]
  assert [config_loading.load_config(f"{base}:{arg}").size for arg in ("", "tiny", "7b", "size=13b")] == \
      ["tiny", "tiny", "7b", "13b"]
