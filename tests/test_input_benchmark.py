"""`python -m engine.modes.input_benchmark`: its flags are checked before any image is written."""

import os
import re
import subprocess
import sys

from conftest import ROOT


def _benchmark(tmp_dir, *args, timeout=300):
    """Runs the input benchmark with `args`; `tmp_dir` is where its temporary files go."""
    return subprocess.run(
        [sys.executable, "-m", "engine.modes.input_benchmark", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "TMPDIR": str(tmp_dir)},
        timeout=timeout,
    )


def test_pipeline_benchmark_refuses_a_bad_flag_in_one_line_before_writing_images(tmp_path):
    proc = _benchmark(
        tmp_path, "--precision=fp16", timeout=120
    )  # tmp_path: where its images would go
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (
        "error: --precision='fp16' is not one of: auto, fp32, mixed, mixed_bf16"
    )
    assert "Traceback" not in proc.stderr and "wrote" not in proc.stdout


def test_pipeline_benchmark_times_every_path_on_a_small_set(tmp_path):
    args = ["--num_images=20", "--model=tiny", "--image_size=16", "--batch_size=4"]
    proc = _benchmark(
        tmp_path, *args, "--pipeline_batches=3", "--train_steps=2", "--precision=fp32"
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for row in ("streamed from the files", "decoded cache on disk", "memory cache", "train step"):
        assert re.search(rf"{row}[^:]*:\s+\d+\.\d images/s", proc.stdout), proc.stdout
    assert re.search(r"ratio pipeline / train step: [\d.]+x streamed, [\d.]+x from", proc.stdout)
    assert os.listdir(tmp_path) == []  # the images and the cache were temporary
