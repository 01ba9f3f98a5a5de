"""Config files load by path: siblings import relatively, a user's own directory works, bare names find
the bundled ones."""

import pathlib
import shutil

import pytest

from vtimellm_jax.errors import UserError
from vtimellm_jax.training import config_files, config_loading

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def test_the_bundled_configs_are_the_repository_configs():
  bundled = sorted(p.name for p in config_files.CONFIGS_DIR.glob("*.py"))
  assert bundled == sorted(p.name for p in CONFIGS.glob("*.py"))
  assert (config_files.CONFIGS_DIR / "stage2.py").read_text() == (CONFIGS / "stage2.py").read_text()


@pytest.mark.parametrize("spelling", ["configs/stage2.py", "stage2.py"])
def test_a_missing_path_names_the_bundled_file_of_that_name(tmp_path, monkeypatch, spelling):
  monkeypatch.chdir(tmp_path)  # no configs/ here
  config = config_loading.load_config(f"{spelling}:tiny")
  assert config.stage == "stage2" and config.size == "tiny"


def test_a_local_file_wins_over_the_bundled_one(tmp_path, monkeypatch):
  (tmp_path / "configs").mkdir()
  shutil.copy(CONFIGS / "common.py", tmp_path / "configs")
  (tmp_path / "configs/stage2.py").write_text(
      "from . import common\n\ndef get_config(arg=None):\n"
      "  c = common.recipe('tiny')\n  c.stage = 'local'\n  return c\n")
  monkeypatch.chdir(tmp_path)
  assert config_loading.load_config("configs/stage2.py:tiny").stage == "local"


def test_unknown_config_names_what_is_bundled(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(UserError, match=r"config file stage9.py not found \(bundled configs: common.py, stage0.py"):
    config_loading.load_config("stage9.py:tiny")
  with pytest.raises(UserError, match="config file elsewhere/stage2.py not found"):
    config_loading.load_config("elsewhere/stage2.py:tiny")


def test_a_users_config_directory_imports_its_own_siblings(tmp_path):
  mine = tmp_path / "my_configs"
  mine.mkdir()
  (mine / "common.py").write_text((CONFIGS / "common.py").read_text().replace('c.seed = 0', 'c.seed = 1234'))
  assert "c.seed = 1234" in (mine / "common.py").read_text()  # the edit took
  shutil.copy(CONFIGS / "stage2.py", mine / "stage2_custom.py")
  assert config_loading.load_config(f"{mine / 'stage2_custom.py'}:tiny").seed == 1234
  assert config_loading.load_config(f"{CONFIGS / 'stage2.py'}:tiny").seed == 0  # ours keep our common


def test_a_users_config_can_import_the_bundled_common_by_package(tmp_path):
  (tmp_path / "mine.py").write_text("from vtimellm_jax.configs import common\n\ndef get_config(arg=None):\n"
                                    "  c = common.recipe('tiny')\n  c.stage = 'mine'\n  return c\n")
  assert config_loading.load_config(f"{tmp_path / 'mine.py'}").stage == "mine"


def test_an_unresolvable_import_is_a_user_error_naming_the_file(tmp_path):
  (tmp_path / "old.py").write_text("from my_configs import common\n\n"
                                   "def get_config(arg=None):\n  return common.recipe('tiny')\n")
  with pytest.raises(UserError, match=r"old.py: No module named 'my_configs'.*`from \. import common`"):
    config_loading.load_config(f"{tmp_path / 'old.py'}:tiny")
  (tmp_path / "lonely.py").write_text("from . import common\n")
  with pytest.raises(UserError, match="lonely.py: cannot import name 'common'"):
    config_loading.load_config(f"{tmp_path / 'lonely.py'}:tiny")


def test_a_config_file_is_read_afresh_on_each_load(tmp_path):
  path = tmp_path / "c.py"
  for stage in ("one", "two"):
    path.write_text(f"from vtimellm_jax.configs import common\n\ndef get_config(arg=None):\n"
                    f"  c = common.recipe('tiny')\n  c.stage = {stage!r}\n  return c\n")
    assert config_loading.load_config(str(path)).stage == stage
