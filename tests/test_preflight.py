"""Start-up checks that touch the disk: a path the run could not write is refused first."""

import os
import re

import pytest
from conftest import tiny_config

from engine import preflight
from engine.config import Config, ConfigError


@pytest.mark.parametrize("spelling", ["export", "export/", "export/sub"])
def test_an_export_dir_linking_to_nothing_is_refused_at_start_up(tmp_path, spelling):
    (tmp_path / "export").symlink_to(tmp_path / "missing")
    config = Config(export_dir=f"{tmp_path}/{spelling}")  # pathlib would drop the trailing /
    with pytest.raises(ConfigError, match=r"is a symbolic link to .*missing, which does not exist"):
        preflight.check(config)


def test_export_dir_is_checked_where_an_export_is_written():
    under_a_file = f"{__file__}/export"
    with pytest.raises(ConfigError, match="is a file, so the folder cannot be made"):
        preflight.check(Config(export_dir=under_a_file))
    preflight.check(Config(mode="benchmark", export_dir=under_a_file))  # writes no export


def test_a_cache_folder_named_with_a_trailing_separator_must_exist(tmp_path):
    missing = tmp_path / "new"
    expected = f"--cache={missing}{os.sep}: folder {missing} does not exist; create it"
    with pytest.raises(ConfigError, match=re.escape(expected)):
        preflight.check(Config(cache=f"{missing}{os.sep}"))


def test_a_file_cache_in_a_missing_folder_is_refused():
    with pytest.raises(ConfigError, match="--cache=/no/such/dir/c: folder /no/such/dir"):
        preflight.check(Config(cache="/no/such/dir/c"))


def test_output_files_need_an_existing_folder(tmp_path):
    with pytest.raises(ConfigError, match=f"--predictions_csv={tmp_path} is a folder; give a"):
        preflight.check(Config(predictions_csv=str(tmp_path)))
    with pytest.raises(ConfigError, match=f"folder {tmp_path}/no does not exist; create it"):
        preflight.check(Config(benchmark_json=f"{tmp_path}/no/b.json"))
    preflight.check(Config(benchmark_json=f"{tmp_path}/b.json"))


def test_run_checks_the_paths_before_anything_runs(tmp_path):
    # A script calling the engine gets the command line's start-up checks.
    from engine import run

    config = tiny_config(cache=f"{tmp_path}/missing/", model_dir=str(tmp_path / "run"))
    with pytest.raises(run.UserError, match=r"--cache=.*missing/: folder .*missing does not"):
        run.run(config)
    assert not (tmp_path / "run").exists()
