"""What a run shows in TensorBoard: read from the event files and from a real server."""

import contextlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import main_flags, main_in_process, main_logged, read_scalars, read_texts, tiny_config
from image_trees import make_folder_tree

from engine import train

# Its module fixture runs once: under pytest-xdist, its tests share one worker.
pytestmark = pytest.mark.xdist_group("summaries")

RUN = "mixed-xla"
# Summaries every 3 steps (loops of at most 2): written at 1 (the first loop), 3, 6 and 7.
# Steps 2 and 5 get nan gradients in the `logits` layer only.
CONFIG = dict(
    precision="mixed",
    xla=True,
    train_steps=7,
    steps_per_loop=2,
    summary_every=3,
    histogram_every=3,
    precision_diagnostics=True,
    inject_nonfinite="2,5@logits",
    lr_schedule="constant",
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short mixed + XLA run with injected non-finite steps, shared by this module."""
    parent = tmp_path_factory.mktemp("logs")
    config = tiny_config(**CONFIG, model_dir=str(parent / RUN))
    result = train.train_and_evaluate(config, config.model_dir)
    return parent, config, result


def test_injected_steps_show_as_skipped_and_as_events_at_their_steps(trained):
    parent, _, result = trained
    scalars = read_scalars(parent / RUN)
    assert result.skipped_steps == 2
    assert scalars["train/skipped_steps"] == [(1, 0.0), (3, 1.0), (6, 2.0), (7, 2.0)]
    assert scalars["train/nonfinite_events"] == [(2, 1.0), (5, 1.0)]
    assert [v for _, v in scalars["train/skip_rate"]] == pytest.approx([0.0, 0.5, 1 / 3, 0.0])
    # Each skip halves the dynamic scale.
    assert [v for _, v in scalars["train/loss_scale"]] == [2.0**15, 2.0**14, 2.0**13, 2.0**13]


def test_the_injected_variables_are_named_at_their_steps(trained):
    parent, _, _ = trained
    texts = dict(read_texts(parent / RUN)["train/nonfinite_variables"])
    assert sorted(texts) == [2, 5]
    for text in texts.values():
        assert "`logits/kernel`" in text and "`logits/bias`" in text
        assert "conv" not in text


def test_summary_every_aligns_the_loops_and_diagnostics_are_written(trained):
    parent, _, _ = trained
    scalars = read_scalars(parent / RUN)
    assert [s for s, _ in scalars["train/loss"]] == [1, 3, 6, 7]
    underflow = [v for _, v in scalars["train/fp16_underflow_fraction"]]
    overflow = dict(scalars["train/fp16_overflow_fraction"])
    assert len(underflow) == 4 and all(0.0 <= v <= 1.0 for v in underflow)
    # Only the poisoned steps have out-of-range (nan) values.
    assert overflow[1] == 0.0 and overflow[3] > 0.0


def test_histograms_images_and_the_run_description_are_written(trained):
    from tensorboard.backend.event_processing import event_accumulator

    parent, _, _ = trained
    acc = event_accumulator.EventAccumulator(str(parent / RUN), size_guidance={"tensors": 0})
    acc.Reload()
    tags = set(acc.Tags()["tensors"])
    assert {"weights/conv/kernel", "gradients/conv/kernel", "input/train_batch"} <= tags
    assert [e.step for e in acc.Tensors("gradients/logits/kernel")] == [3, 6]
    texts = read_texts(parent / RUN)
    assert "| precision | mixed |" in texts["run/config"][0][1]
    environment = texts["run/environment"][0][1]
    assert "| tensorflow |" in environment and "| xla | True |" in environment


def test_saved_flagfile_reproduces_the_configuration(trained):
    parent, config, _ = trained
    with main_flags(f"--flagfile={parent / RUN / 'flags.txt'}") as main:
        # With what --preprocessing=auto decided, so a replay cannot decide otherwise.
        assert main.config_from_flags() == config.replace(preprocessing="scaled")


def test_the_flagfile_names_the_run_folder_absolutely(tmp_path, monkeypatch):
    # Replayed from another folder, it must resume this run, not start one there.
    monkeypatch.chdir(tmp_path)
    train.train_and_evaluate(tiny_config(train_steps=2), "relative/run")
    text = (tmp_path / "relative" / "run" / "flags.txt").read_text()
    assert f"--model_dir={tmp_path / 'relative' / 'run'}\n" in text, text


# No proxy: the server is on localhost, whatever the environment says.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _get(url, body=None):
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with _OPENER.open(request, timeout=10) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def _tensorboard(logdir, log_path):
    # --port=0: the server binds a port the system picks and prints its address,
    # so no other process can take the port between choosing and binding it.
    with open(log_path, "w") as log:
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tensorboard.main",
                f"--logdir={logdir}",
                "--host=127.0.0.1",  # localhost only
                "--port=0",
                "--load_fast=false",  # the Python data server; no Rust binary needed
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield _address(server, log_path), server
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def _address(server, log_path, timeout=120):
    """The http://127.0.0.1:PORT address the server prints once it listens."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and server.poll() is None:
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/", pathlib.Path(log_path).read_text())
        if found:
            return found.group(1)
        time.sleep(0.2)
    pytest.fail(f"tensorboard did not start:\n{pathlib.Path(log_path).read_text()[-2000:]}")


def _wait_for_run(base, server, run, log_path, timeout=120):
    """Polls /data/runs until `run` is listed; fails with the server's log otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            break
        with contextlib.suppress(OSError, ValueError):
            if run in _get(f"{base}/data/runs"):
                return
        time.sleep(0.5)
    with open(log_path) as log:
        pytest.fail(f"tensorboard did not list {run!r} in {timeout}s:\n{log.read()[-2000:]}")


def test_tensorboard_serves_the_runs_scalars_and_hparams(trained, tmp_path):
    parent, _, _ = trained
    log_path = tmp_path / "tensorboard.log"
    with _tensorboard(parent, log_path) as (base, server):
        _wait_for_run(base, server, RUN, log_path)
        tags = _get(f"{base}/data/plugin/scalars/tags")[RUN]
        assert {"train/loss_scale", "train/skipped_steps", "train/nonfinite_events"} <= set(tags)
        series = _get(f"{base}/data/plugin/scalars/scalars?run={RUN}&tag=train/skipped_steps")
        assert [(step, value) for _, step, value in series] == [(1, 0), (3, 1), (6, 2), (7, 2)]
        experiment = _get(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
        groups = _get(
            f"{base}/data/plugin/hparams/session_groups",
            {
                "experimentName": "",
                "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_RUNNING"],
                "startIndex": 0,
                "sliceSize": 10,
            },
        )["sessionGroups"]
    columns = {h["name"] for h in experiment["hparamInfos"]}
    assert {"precision", "xla", "model", "batch_size", "learning_rate"} <= columns
    (group,) = groups
    assert group["sessions"][0]["name"] == RUN
    # Grouped by the run's whole path: compare runs in two parents share base names.
    assert group["name"] == os.path.abspath(str(parent / RUN))
    assert group["hparams"]["precision"] == "mixed" and group["hparams"]["xla"] is True
    assert group["hparams"]["batch_size"] == 16
    metrics = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
    assert metrics["final/skipped_steps"] == 2
    assert 0.0 <= metrics["final/eval_accuracy"] <= 1.0
    assert metrics["final/examples_per_sec"] > 0


def test_the_flagfile_writes_local_relative_paths_absolutely(tmp_path, monkeypatch):
    from engine.run_paths import to_flagfile

    monkeypatch.chdir(tmp_path)
    (tmp_path / "caches").mkdir()
    config = tiny_config(
        dataset="folder:data/imgs",
        data_dir="tfds",
        cache="caches/",
        export_dir="out/export",
        benchmark_json="bench.json",
        predictions_csv="preds.csv",
    )
    lines = to_flagfile(config).splitlines()
    for line in (
        f"--dataset=folder:{tmp_path}/data/imgs",
        f"--data_dir={tmp_path}/tfds",
        f"--cache={tmp_path}/caches/",  # still a folder
        f"--export_dir={tmp_path}/out/export",
        f"--benchmark_json={tmp_path}/bench.json",
        f"--predictions_csv={tmp_path}/preds.csv",
        "--predict_csv=",  # empty stays empty
    ):
        assert line in lines
    remote = tiny_config(dataset="ships:gs://b/ships", export_dir="gs://b/e", data_dir="~/tfds")
    lines = to_flagfile(remote).splitlines()
    assert "--dataset=ships:gs://b/ships" in lines and "--export_dir=gs://b/e" in lines
    # The command line expands `~` (run_paths.expand_home); a Config built in Python
    # keeps it, and TFDS, which does not expand it, reads ./~/tfds.
    assert f"--data_dir={tmp_path}/~/tfds" in lines
    assert "--cache=auto" in lines and "--dataset=shapes" in to_flagfile(tiny_config())


def test_a_flagfile_replayed_from_another_folder_resumes_with_the_runs_files(
    tmp_path, monkeypatch, caplog
):
    # Started with relative paths in one folder, replayed from another: the data,
    # the cache (the same files) and the export are the run's own, and the
    # relative --dataset in config.json matches its absolute spelling in flags.txt.
    # In this process (main.py's own path, without a new TensorFlow), in each folder.
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    make_folder_tree(first / "data", per_class=6, classes=("red", "green"))
    (first / "cache").mkdir()
    elsewhere.mkdir()
    common = ["--model=tiny", "--image_size=16", "--batch_size=8", "--precision=fp32"]
    monkeypatch.chdir(first)
    status = main_in_process(
        *common,
        "--dataset=folder:data",
        "--model_dir=run",
        "--cache=cache/",
        "--export_dir=export",
        "--train_steps=2",
        "--steps_per_loop=2",
    )
    assert status == 0
    caches = sorted(os.listdir(first / "cache"))
    shutil.rmtree(first / "export")
    monkeypatch.chdir(elsewhere)
    log = main_logged(caplog, f"--flagfile={first / 'run' / 'flags.txt'}", "--train_steps=4")
    assert any(m.startswith("resuming from") for m in log)
    assert (first / "run" / "checkpoints" / "ckpt-4.index").exists()
    assert (first / "export" / "saved_model.pb").exists()
    assert os.listdir(elsewhere) == []
    assert sorted(os.listdir(first / "cache")) == caches  # read back, not written again


def test_every_scalar_explains_itself_and_the_layout_groups_mixed_precision(trained):
    import re

    from tensorboard.backend.event_processing import plugin_event_accumulator
    from tensorboard.plugins.custom_scalar import layout_pb2, metadata

    parent, _, _ = trained
    acc = plugin_event_accumulator.EventAccumulator(str(parent / RUN), size_guidance={"tensors": 0})
    acc.Reload()
    tags = acc.Tags()["tensors"]
    scalars = sorted(read_scalars(parent / RUN))
    assert {"train/loss_scale", "train/fp16_underflow_fraction", "eval/accuracy"} <= set(scalars)
    # No image was skipped: no lone 0 among the first cards TensorBoard shows.
    assert "data/skipped_images" not in scalars
    for tag in scalars:
        description = acc.SummaryMetadata(tag).summary_description
        assert len(description) > 20, tag  # what it is and how to read it
    assert (
        "halves on every skipped step"
        in acc.SummaryMetadata("train/loss_scale").summary_description
    )
    (event,) = acc.Tensors(metadata.CONFIG_SUMMARY_TAG)
    layout = layout_pb2.Layout.FromString(event.tensor_proto.string_val[0])
    assert [c.title for c in layout.category] == ["Mixed precision", "Training"]
    charts = {chart.title: chart.multiline.tag for c in layout.category for chart in c.chart}
    assert "Loss scale" in charts and "float16 underflow and overflow" in charts
    for title, patterns in charts.items():  # every chart draws something this run wrote
        assert any(re.search(p, tag) for p in patterns for tag in scalars), title
    assert metadata.CONFIG_SUMMARY_TAG in tags
