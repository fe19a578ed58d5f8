"""`python -m engine.modes.input_benchmark`: its flags are checked before any image is written."""

import os
import subprocess
import sys

from conftest import ROOT


def test_pipeline_benchmark_refuses_a_bad_flag_in_one_line_before_writing_images(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}  # where its image tree would be written
    proc = subprocess.run(
        [sys.executable, "-m", "engine.modes.input_benchmark", "--precision=fp16"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.splitlines()[-1] == (
        "error: --precision='fp16' is not one of: auto, fp32, mixed, mixed_bf16"
    )
    assert "Traceback" not in proc.stderr and "wrote" not in proc.stdout
