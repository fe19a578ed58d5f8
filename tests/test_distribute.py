"""Several replicas and several workers: one decision to skip, one set of weights.

Each check runs in a fresh process: logical CPU devices and a multi-worker
cluster can only be set up before TensorFlow starts its runtime.
"""

import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import MIRRORED, ROOT, mirrored_check
from image_trees import make_folder_tree

TINY = [
    "--model=tiny",
    "--image_size=16",
    "--batch_size=16",
    "--train_examples=128",
    "--eval_examples=64",
    "--eval_batch_size=32",
    "--steps_per_loop=3",
]


@MIRRORED
@pytest.mark.parametrize("xla", ["noxla", "xla"])
@pytest.mark.parametrize("poisoned", [0, 1])
def test_one_replica_nonfinite_both_replicas_skip_and_back_off_once(poisoned, xla):
    # Replica 1 matters too: Keras' LossScaleOptimizer decides on replica 0's own
    # gradients and applies nan there (measured, see BUILD_NOTES.md).
    result = mirrored_check("skip_agreement", str(poisoned), "tiny", xla)
    assert result["replicas"] == 2
    assert result["copies_compared"] == [2]  # every variable: both replicas' copies
    assert result["skipped"] == 1
    assert result["scale"] == 2.0**14  # 2^15 halved once, not once per replica
    assert result["iterations"] == 0
    assert result["identical_across_replicas"] and result["unchanged"]


@MIRRORED
def test_documented_difference_keras_decides_on_replica_0_alone():
    # Pins what BUILD_NOTES.md reports of Keras 3's LossScaleOptimizer: if this
    # starts failing, Keras changed and the notes must change with it.
    bad_first = mirrored_check("keras_loss_scale_optimizer", "0")
    assert bad_first["weights"] == [[1.0, 1.0], [1.0, 1.0]] and bad_first["scale"] == [512.0] * 2
    bad_second = mirrored_check("keras_loss_scale_optimizer", "1")
    assert all(np.isnan(w).all() for w in bad_second["weights"])  # applied nan everywhere
    assert bad_second["scale"] == [1024.0] * 2  # and never backed off


@MIRRORED
def test_two_replicas_match_one_device_on_the_concatenated_batch():
    result = mirrored_check("matches_single_device")
    assert result["changed"]  # the step did update the weights
    assert result["replica_spread"] == 0.0  # replicas bit-identical
    assert result["max_diff"] < 1e-6


def _main(args, env=None):
    return subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "main.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _train(args, env=None):
    """Runs `main.py` to the end; asserts it succeeded and returns its stderr."""
    proc = _main(args, env=env)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    return stderr


@MIRRORED
@pytest.mark.parametrize("devices", [2, 1])
def test_mixed_xla_trains_end_to_end_under_mirrored(devices):
    # One replica too (MirroredStrategy on a one-GPU machine): its variables are
    # still mirrored, so its updates must not run inside the compiled step.
    result = mirrored_check("trains_end_to_end", str(devices))
    assert result == {"replicas": devices, "steps": 6, "finite_loss": True}


@MIRRORED
def test_a_replica_left_without_eval_examples_counts_none():
    # 3 eval images in batches of 8 over two replicas: one replica gets all three
    # and the other an empty batch, which a convolution used to reject.
    result = mirrored_check("eval_with_an_empty_replica")
    assert result["steps"] == 2 and result["eval_count"] == 3
    # The same accuracy as the run's checkpoint evaluated on one device: the
    # empty replica counted no example, the other all three.
    assert result["eval_accuracy"] == pytest.approx(result["accuracy_apart"], rel=1e-6)  # float32


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


# A port found free can be taken by another process before a worker binds it;
# the worker then fails to start its server (`bind` reports the address in use).
_PORT_TAKEN = re.compile(r"address already in use|Could not start gRPC server", re.I)


def _cluster(num_workers, args, attempts=3):
    """Runs `main.py` as every worker of a local cluster; returns (return codes, stderr).

    A start that lost a port to another process is retried on new ports.
    """
    for _ in range(attempts):
        cluster = {"worker": [f"localhost:{p}" for p in _free_ports(num_workers)]}
        procs = []
        for index in range(num_workers):
            task = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            procs.append(_main(args, env=dict(os.environ, TF_CONFIG=json.dumps(task))))
        logs = []
        try:
            for proc in procs:
                logs.append(proc.communicate(timeout=300)[1])
        finally:
            for proc in procs:
                proc.kill()
        if not any(_PORT_TAKEN.search(log) for log in logs):
            break
    return [proc.returncode for proc in procs], logs


def _two_workers(args):
    """Runs `main.py` as both workers of a local cluster; returns their stderr, chief first."""
    codes, logs = _cluster(2, ["--strategy=multi_worker", *args])
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    return logs


_DONE = re.compile(r"done: (\d+) steps \((\d+) skipped\).*loss scale (\S+), weights (\w+)")


@pytest.fixture(scope="module")
def two_worker_runs(tmp_path_factory):
    """Two workers train one run on image files twice: the first start writes the file
    cache (and skips an injected step), the second reads it. {steps: (logs, ...)}."""
    tmp_path = tmp_path_factory.mktemp("two_workers")
    root = make_folder_tree(tmp_path / "data", per_class=8)
    cache = tmp_path / "cache" / "images"
    cache.parent.mkdir()
    args = [
        f"--dataset=folder:{root}",
        "--eval_fraction=0.25",
        f"--cache={cache}",
        "--model=tiny",
        "--image_size=16",
        "--batch_size=8",
        "--eval_batch_size=8",
        "--steps_per_loop=1",
        "--precision=mixed",
        "--inject_nonfinite=2",
        f"--model_dir={tmp_path / 'run'}",
    ]
    logs, written = {}, {}
    for steps in (2, 4):  # the first start writes the cache, the second reads it
        logs[steps] = _two_workers([*args, f"--train_steps={steps}"])
        written[steps] = {p.name: p.stat().st_mtime_ns for p in cache.parent.iterdir()}
    return logs, tmp_path / "run", written


@pytest.mark.xdist_group("two_workers")  # one cluster run, shared
def test_two_workers_end_identical_and_only_the_chief_writes(two_worker_runs):
    logs, model_dir, _ = two_worker_runs
    for steps, (chief, other) in logs.items():
        done = [_DONE.search(log) for log in (chief, other)]
        assert all(done), chief[-2000:]
        assert done[0].groups() == done[1].groups()  # same skips, scale and weights
        assert done[0].group(1) == str(steps) and int(done[0].group(2)) == 1  # step 2 skipped
        temp = re.search(r"writing to temporary (\S+),", other)
        assert temp and not os.path.exists(temp.group(1))
    # Only the chief (worker 0) wrote summaries and checkpoints, into model_dir.
    assert len(list(model_dir.glob("events.out.tfevents.*"))) == 2  # one per start
    assert list((model_dir / "checkpoints").glob("ckpt-4.index"))


@pytest.mark.xdist_group("two_workers")  # one cluster run, shared
def test_two_workers_write_one_file_cache_on_their_first_run(two_worker_runs):
    # Each worker caches its own shard. The run-start image batch used to
    # decode and cache the whole set in every worker, all into one file name.
    _, _, written = two_worker_runs
    names = sorted(written[2])
    assert any(n.endswith(".array_record") for n in names), names  # the training images'
    assert not any(name.endswith(".lockfile") for name in names), names
    assert written[4] == written[2]  # the second start read them: nothing written again


def test_a_one_worker_cluster_trains(tmp_path):
    # One worker means one replica, but MultiWorkerMirroredStrategy still mirrors
    # its variables: the update must go through the strategy, as with several.
    args = [*TINY, "--strategy=multi_worker", "--optimizer=adamw", "--weight_decay=0.01"]
    codes, (stderr,) = _cluster(1, [*args, "--train_steps=6", f"--model_dir={tmp_path}"])
    assert codes == [0], stderr[-3000:]
    assert "done: 6 steps (0 skipped)" in stderr


def test_a_worker_whose_port_is_taken_is_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        cluster = {"worker": [f"localhost:{taken.getsockname()[1]}"]}
        task = {"cluster": cluster, "task": {"type": "worker", "index": 0}}
        env = dict(os.environ, TF_CONFIG=json.dumps(task))
        proc = _main([*TINY, "--strategy=multi_worker", f"--model_dir={tmp_path}"], env=env)
        _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: --strategy=multi_worker: this worker cannot start its server (Could not start "
        "gRPC server); the address TF_CONFIG gives it must be a free port on this machine"
    ]
    assert "Traceback" not in stderr and not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "tf_config, message",
    [
        (None, "needs the TF_CONFIG environment variable"),
        ("{not json", "TF_CONFIG is not a valid cluster spec"),
    ],
)
def test_multi_worker_without_a_cluster_is_one_line(tmp_path, tf_config, message):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    if tf_config:
        env["TF_CONFIG"] = tf_config
    proc = _main([*TINY, "--strategy=multi_worker", f"--model_dir={tmp_path}"], env=env)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in stderr
