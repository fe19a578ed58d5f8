"""Start-up checks that touch the disk: a path the run could not write is refused first.

Each refusal as the user meets it (one line, exit 2) is in tests/test_mistakes.py.
"""

import tempfile
from unittest import mock

import pytest
from conftest import tiny_config

from engine import preflight
from engine.config import Config, ConfigError


def test_export_dir_is_checked_where_an_export_is_written():
    under_a_file = f"{__file__}/export"
    with pytest.raises(ConfigError, match="is a file, so the folder cannot be made"):
        preflight.check(Config(export_dir=under_a_file))
    preflight.check(Config(mode="benchmark", export_dir=under_a_file))  # writes no export


@pytest.mark.parametrize(
    "export_dir, written_in",
    [("new/export", "."), ("existing", "existing"), ("existing/export", "existing")],
)
def test_the_export_dir_is_tried_by_writing_and_nothing_is_left(tmp_path, export_dir, written_in):
    # os.access would say yes to root: the check writes a file where the export would go.
    (tmp_path / "existing").mkdir()
    tried = []
    real = tempfile.NamedTemporaryFile

    def recorded(*args, dir=None, **kwargs):
        tried.append(dir)
        return real(*args, dir=dir, **kwargs)

    before = sorted(tmp_path.rglob("*"))
    with mock.patch.object(tempfile, "NamedTemporaryFile", recorded):
        preflight.check(Config(export_dir=str(tmp_path / export_dir)))
    assert tried == [str(tmp_path / written_in)]  # the nearest folder that exists
    assert sorted(tmp_path.rglob("*")) == before  # no export folder made, no test file left


def test_output_files_in_an_existing_folder_pass(tmp_path):
    # Their refusals (a folder, a missing folder) are in tests/test_mistakes.py.
    preflight.check(
        Config(benchmark_json=f"{tmp_path}/b.json", predictions_csv=f"{tmp_path}/p.csv")
    )


def test_run_checks_the_paths_before_anything_runs(tmp_path):
    # A script calling the engine gets the command line's start-up checks.
    from engine import run

    config = tiny_config(cache=f"{tmp_path}/missing/", model_dir=str(tmp_path / "run"))
    with pytest.raises(run.UserError, match=r"--cache=.*missing/: folder .*missing does not"):
        run.run(config)
    assert not (tmp_path / "run").exists()
