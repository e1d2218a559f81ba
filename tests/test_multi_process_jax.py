"""Several JAX processes: `keras.distribution.DataParallel` over the devices
of 2 processes on 127.0.0.1 (JAX's distributed runtime, gloo collectives on
the CPU), against the float64 reference and a single process."""

import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import harness
import reference

pytest.importorskip("jax")

JOBS = Path(__file__).with_name("jax_jobs.py")
TIMEOUT = 180   # seconds for any one process


def _env():
    env = harness.env("jax")
    env.pop("XLA_FLAGS", None)
    return env


def _run(tmp_path, name, processes=2, devices=2, port=None, **flags):
    """Start the processes, wait for all (at most TIMEOUT each), kill what
    is left: (return codes, outputs, result files, seconds)."""
    port = port or harness.free_ports(1)[0]
    outs = [tmp_path / f"{name}-{i}.npz" for i in range(processes)]
    procs = []
    start = time.monotonic()
    for i in range(processes):
        args = [sys.executable, str(JOBS), "train", str(outs[i]),
                "--process-id", str(i), "--processes", str(processes),
                "--port", str(port), "--devices", str(devices)]
        for key, value in flags.items():
            if value is True or value is False:
                args += [f"--{key.replace('_', '-')}"] if value else []
            elif value is not None and (i == 1 or key != "die_at_step"):
                args += [f"--{key.replace('_', '-')}", str(value)]
        procs.append(subprocess.Popen(
            args, env=_env(), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
        if i == 0:
            time.sleep(0.5)   # the coordinator listens first
    logs = harness.wait_all(procs, TIMEOUT)
    return ([p.returncode for p in procs], logs, outs,
            time.monotonic() - start)


def _load(path):
    with np.load(path) as f:
        files = dict(f)
    count = sum(k.startswith("arr_") for k in files)
    return [files[f"arr_{i}"] for i in range(count)], files


def _batches():
    import jax_jobs

    x, y = jax_jobs.data()
    n = jax_jobs.GLOBAL_BATCH
    return [(x[i:i + n].astype(np.float64), y[i:i + n].astype(np.float64))
            for i in range(0, len(x), n)]


def _start(files, like):
    flat, out, k = files["start"], [], 0
    for w in like:
        out.append(flat[k:k + w.size].reshape(w.shape).astype(np.float64))
        k += w.size
    return out


@pytest.mark.parametrize("sync", [True, False], ids=["synced", "per-device"])
def test_two_processes_train_like_the_reference(tmp_path, sync):
    """2 processes x 2 devices. Synchronized e: full-batch SAM. Per-device
    e (the default): the mean of per-shard SAM over the 4 devices of both
    processes (m-sharpness with m = 4). Both processes end equal."""
    codes, logs, outs, _ = _run(tmp_path, "dp", sync=sync)
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    (w0, f0), (w1, f1) = _load(outs[0]), _load(outs[1])
    assert int(f0["devices"]) == 4
    for a, b in zip(w0, w1):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(f0["loss"], f1["loss"])
    want, sharpness, _ = reference.variant_train(
        reference.TanhMLP(l2=0.01), reference.SGD(0.1, momentum=0.9),
        _start(f0, w0), _batches(), 0.2,
        num_batch_splits=1 if sync else 4)
    for a, b in zip(w0, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(f0["sharpness"][-1], np.mean(sharpness),
                               rtol=1e-4)


def test_a_keras_file_from_process_0_resumes_identically(tmp_path):
    """Process 0 saves after 3 of 5 steps; one process that loads the file
    and trains the last 2 global batches ends where both processes did."""
    path = tmp_path / "run.keras"
    codes, logs, outs, _ = _run(tmp_path, "save", sync=True, save=str(path))
    assert codes == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert path.exists()
    resumed_out = tmp_path / "resumed.npz"
    done = subprocess.run(
        [sys.executable, str(JOBS), "resume", str(resumed_out), str(path)],
        env=_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (both, _), (resumed, _) = _load(outs[0]), _load(resumed_out)
    for a, b in zip(both, resumed):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_process_that_dies_ends_the_others_in_bounded_time(tmp_path):
    """Process 1 exits at step 2 without cleanup. Process 0 does not wait
    forever: the step's collective fails, keras_sam says what happened, and
    JAX's distributed service, missing process 1's heartbeats (10 s here),
    names it and ends process 0."""
    codes, logs, _, seconds = _run(tmp_path, "dies", die_at_step=2,
                                   devices=1)
    assert codes[1] == 3, logs[1][-2000:]
    assert codes[0] != 0
    assert seconds < 90, seconds
    assert "another process stopped" in logs[0], logs[0][-3000:]
    assert "Task 1" in logs[0], logs[0][-3000:]   # the lost process, named


def test_a_busy_coordinator_port_fails_clearly(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        codes, logs, _, _ = _run(tmp_path, "busy", processes=1, devices=1,
                                 port=port)
    assert codes[0] != 0
    assert f"127.0.0.1:{port} is in use" in logs[0], logs[0][-2000:]
