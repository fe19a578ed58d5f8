"""`python main.py --mode=input_benchmark`: the pipeline's images/s beside the train step's."""

import os
import re
import subprocess
import sys

from conftest import ROOT


def test_the_input_benchmark_times_every_path_on_a_small_generated_set(tmp_path):
    args = ["--num_images=20", "--model=tiny", "--image_size=16", "--batch_size=4"]
    timing = ["--pipeline_batches=3", "--benchmark_steps=2", "--steps_per_loop=1"]
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "main.py"), "--mode=input_benchmark", *args, *timing],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "TMPDIR": str(tmp_path)},  # where its temporary files go
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for row in ("streamed from the files", "decoded cache on disk", "memory cache", "train step"):
        assert re.search(rf"{row}[^:]*:\s+\d+\.\d images/s", proc.stdout), proc.stdout
    assert re.search(r"ratio pipeline / train step: [\d.]+x streamed, [\d.]+x from", proc.stdout)
    assert "wrote 20 210x140 JPEGs" in proc.stderr
    assert os.listdir(tmp_path) == []  # the images and the cache were temporary; no run folder
