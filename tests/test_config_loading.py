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
