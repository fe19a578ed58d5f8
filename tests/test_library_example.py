"""The README's library example runs as written and trains."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_example():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    section = readme.split("## Use it from your own script", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_library_example_trains_twenty_steps_with_a_dynamic_scale():
    check = (
        "\nimport math\n"
        "assert int(state.step.numpy()) == 20, state.step.numpy()\n"
        "assert int(optimizer.iterations.numpy()) == 20\n"
        "assert math.isfinite(float(model.trainable_variables[0].numpy().sum()))\n"
        "assert float(state.loss_scale.value) == 2.0**15\n"
        "print('EXAMPLE OK')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", _readme_example() + check],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "EXAMPLE OK" in proc.stdout
    assert "'finite_steps': np.int64(20)" in proc.stdout  # the example's own print
