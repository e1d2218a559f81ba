"""Several processes: MultiWorkerMirroredStrategy on 127.0.0.1, and a
training process killed with SIGKILL and resumed by BackupAndRestore."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

import harness
import jobs

JOBS = Path(__file__).with_name("jobs.py")
TIMEOUT = 240  # seconds for any one process


def _env(**extra):
    return harness.env("tensorflow", **extra)


def _run_workers(tmp_path, kind):
    cluster = {"worker": [f"127.0.0.1:{p}" for p in harness.free_ports(2)]}
    outs = [tmp_path / f"{kind}-{i}.npz" for i in range(2)]
    procs = []
    for i in range(2):
        tf_config = json.dumps({"cluster": cluster,
                                "task": {"type": "worker", "index": i}})
        procs.append(subprocess.Popen(
            [sys.executable, str(JOBS), "multi_worker", str(outs[i]), kind],
            env=_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    logs = harness.wait_all(procs, TIMEOUT)
    return [p.returncode for p in procs], logs, outs


def _weights(path):
    """(weights in order, everything in the file) from a job's .npz."""
    with np.load(path) as f:
        files = dict(f)
    count = sum(k.startswith("arr_") for k in files)
    return [files[f"arr_{i}"] for i in range(count)], files


def test_two_workers_train_sam_to_full_batch_sam(tmp_path):
    codes, logs, outs = _run_workers(tmp_path, "sam")
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    (w0, f0), (w1, f1) = _weights(outs[0]), _weights(outs[1])
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)  # identical on both workers
    np.testing.assert_array_equal(f0["loss"], f1["loss"])  # same logs
    # ... and equal to full-batch SAM in one process.
    x, y = jobs.data()
    single = jobs.compiled_sam()
    history = single.fit(x, y, batch_size=16, epochs=2, shuffle=False,
                         verbose=0)
    for a, b in zip(w0, single.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(f0["loss"], history.history["loss"],
                               rtol=1e-5)
    assert np.all(np.isfinite(f0["val_loss"]))


def test_keras_multi_worker_fit_still_needs_the_workaround(tmp_path):
    """Plain Keras `fit` fails under MultiWorkerMirroredStrategy
    (keras-team/keras issue 20585). When this test fails, Keras has fixed
    it: remove `symbolic_build_from_local_batch` and
    `logs_for_multi_worker` from keras_sam/_keras_compat.py."""
    codes, logs, _ = _run_workers(tmp_path, "plain")
    assert codes != [0, 0], (
        "Keras now trains under MultiWorkerMirroredStrategy by itself: "
        "the keras-team/keras#20585 workarounds can go.")
    text = "\n".join(logs)
    assert "PerReplica" in text or "Invalid reduction dimension" in text, \
        text[-3000:]


def _resumable(tmp_path, name, backup, kill_at_step=0):
    out = tmp_path / f"{name}.npz"
    args = [sys.executable, str(JOBS), "resumable", str(out), str(backup)]
    if kill_at_step:
        args += ["--kill-at-step", str(kill_at_step)]
    proc = subprocess.run(args, env=_env(), capture_output=True, text=True,
                          timeout=TIMEOUT)
    return proc, out


def test_process_killed_mid_run_resumes_to_the_uninterrupted_result(
        tmp_path):
    backup = tmp_path / "backup"
    # 4 steps an epoch: killed in the middle of epoch 3, after step 10.
    killed, out = _resumable(tmp_path, "killed", backup, kill_at_step=10)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not out.exists() and backup.exists()
    resumed, out = _resumable(tmp_path, "resumed", backup)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    weights, files = _weights(out)
    assert int(files["epochs_run"]) == 3  # epochs 3, 4 and 5
    assert not backup.exists()  # removed after a completed run

    whole, out = _resumable(tmp_path, "whole", tmp_path / "backup2")
    assert whole.returncode == 0, whole.stderr[-3000:]
    expected, files = _weights(out)
    assert int(files["epochs_run"]) == 5
    for a, b in zip(weights, expected):
        np.testing.assert_array_equal(a, b)
