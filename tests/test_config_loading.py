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
    ("chatglm3,7b", "chatglm3 has no size '7b'; choose from 6b, tiny"),
    ("6b", "vicuna has no size '6b'"),
    ("family=glm", "unknown family 'glm'; choose from vicuna, chatglm3"),
])
def test_a_size_that_is_not_known_is_refused_not_trained_as_tiny(arg, message):
  spec = STAGE2_TINY.rsplit(":", 1)[0] + ":" + arg
  with pytest.raises(UserError, match=message):
    config_loading.load_config(spec)


def test_known_sizes_load():
  base = STAGE2_TINY.rsplit(":", 1)[0]
  assert [config_loading.load_config(f"{base}:{arg}").size for arg in ("", "tiny", "7b", "size=13b")] == \
      ["tiny", "tiny", "7b", "13b"]


@pytest.mark.parametrize("arg,size,preset", [("chatglm3", "6b", "chatglm3_6b"), ("chatglm3,tiny", "tiny", "chatglm3_tiny"),
                                             ("size=tiny,family=chatglm3", "tiny", "chatglm3_tiny")])
def test_chatglm3_configs_take_the_release_glm_recipe(arg, size, preset):
  configs = pathlib.Path(STAGE2_TINY).parent
  stages = {n: config_loading.load_config(f"{configs}/stage{n}.py:{arg}") for n in (1, 2, 3)}
  vicuna = {n: config_loading.load_config(f"{configs}/stage{n}.py:{'7b' if size == '6b' else 'tiny'}") for n in (1, 2, 3)}
  for n, c in stages.items():
    assert (c.family, c.size, c.model.preset) == ("chatglm3", size, preset)
    # preprocess_glm builds every stage's samples, stage 1's included.
    assert c.data.template == "glm"
    assert c.lora.targets == ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head")
    assert c.model.loss_chunk == 0  # LoRA dropout on lm_head, as the release trains it
    # The _glm.sh scripts' hyperparameters are the Vicuna scripts'.
    for key in ("trainable", "epochs", "optim.lr", "global_batch", "lora.rank", "lora.alpha", "lora.dropout",
                "optim.warmup_ratio", "data.max_length"):
      get = lambda cfg, k=key: cfg[k.split(".")[0]][k.split(".")[1]] if "." in k else cfg[k]  # noqa: E731
      assert get(c) == get(vicuna[n]), (n, key)


def test_every_problem_of_a_config_is_listed_at_once():
  bad = ["--config.micro_batch=0", "--config.checkpoint.every_steps=0", "--config.lora.rank=0",
         "--config.max_steps=-5", "--config.optim.lr=-1", "--config.optim.warmup_ratio=2",
         "--config.mesh.devices=-3", "--config.lora.dropout=1", "--config.trainable=most",
         "--config.model.remat=some", "--config.lora.targets=q_proj,qkv", "--config.optim.eps=1e999"]
  with pytest.raises(UserError) as e:
    config_loading.load_config(STAGE2_TINY, bad)
  lines = str(e.value).splitlines()
  assert lines[0] == f"{STAGE2_TINY}: {len(bad)} setting(s) cannot run:"
  assert sorted(line.split(" = ")[0].strip() for line in lines[1:]) == sorted(o[9:].split("=")[0] for o in bad)
  assert "  optim.warmup_ratio = 2.0: must be a number in [0, 1]" in lines
  assert "  trainable = 'most': must be one of adapter, lora, all" in lines


@pytest.mark.parametrize("overrides,message", [
    (["--config.global_batch=10", "--config.micro_batch=4"], "global_batch = 10 is not a multiple of micro_batch = 4"),
    (["--config.mesh.data=-1", "--config.mesh.fsdp=-1"], "at most one axis may be -1"),
    (["--config.lora.targets=q_proj, lm_head", "--config.lora.dropout=0.05", "--config.model.loss_chunk=8"],
     "LoRA dropout on lm_head needs model.loss_chunk = 0"),
])
def test_rules_between_fields(overrides, message):
  with pytest.raises(UserError, match=message):
    config_loading.load_config(STAGE2_TINY, overrides)


def test_every_shipped_config_passes_the_checks():
  configs = pathlib.Path(STAGE2_TINY).parent
  for stage in ("stage0", "stage1", "stage2", "stage3"):
    for size in ("tiny", "7b", "13b", "chatglm3", "chatglm3,tiny"):
      assert config_loading.config_problems(config_loading.load_config(f"{configs / stage}.py:{size}")) == []


def test_train_refuses_bad_settings_with_exit_2_and_no_traceback(tmp_path, capsys):
  from vtimellm_jax import cli  # pylint: disable=import-outside-toplevel
  rc = cli.main(["train", "--config", STAGE2_TINY, "--workdir", str(tmp_path / "w"), "--config.micro_batch=0",
                 "--config.lora.rank=0"])
  err = capsys.readouterr().err
  assert rc == 2 and "micro_batch = 0: must be an integer >= 1" in err and "lora.rank = 0" in err
  assert "Traceback" not in err and not (tmp_path / "w").exists()


def test_more_mesh_devices_than_the_job_has_is_refused():
  from vtimellm_jax import sharding  # pylint: disable=import-outside-toplevel
  with pytest.raises(UserError, match="mesh.devices = 9 but this job has 8 cpu device"):
    sharding.first_devices(9)
  assert len(sharding.first_devices(0)) == 8 and len(sharding.first_devices(3)) == 3
