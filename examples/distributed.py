"""SAM on several devices and several machines: tf.distribute on
TensorFlow, keras.distribution across processes on JAX.

    python examples/distributed.py                  # 2 devices, one process
    python examples/distributed.py --workers 2      # 2 local worker processes
    python examples/distributed.py --jax-processes 2  # JAX: 2 local processes

Needs: pip install -e ".[tensorflow,examples]" for the tf.distribute runs,
pip install -e ".[jax,examples]" for the JAX ones (no TensorFlow needed).

Several devices: MirroredStrategy over the GPUs, or, without GPUs, over the
CPU split into `--devices` logical devices. Several machines:
MultiWorkerMirroredStrategy; `--workers N` starts N worker processes on this
machine with TF_CONFIG set for 127.0.0.1. On a real cluster set TF_CONFIG on
each machine yourself and run `python examples/distributed.py --multi-worker`
on every one of them.

Each run trains the same network twice, with `sync_perturbation=False` (each
replica perturbs with the e of its own shard: m-sharpness, the paper's
setting) and `sync_perturbation=True` (one e from the whole batch), and
prints test accuracy and final sharpness for both.

JAX across processes (`--jax-processes N` starts N on this machine, each
with 2 CPU devices unless there are GPUs): every process runs this script
with the same coordinator address and its own process id, which on a real
cluster is, on machine I of N,

    KERAS_BACKEND=jax python examples/distributed.py \
        --jax-coordinator HOST0:PORT --jax-num-processes N --jax-process-id I

Each process calls `keras.distribution.initialize` (JAX's distributed
runtime; on CPUs the collectives need `jax_cpu_collectives_implementation`
"gloo"), then trains under `DataParallel` over the devices of all processes,
feeding only its own rows of each global batch (`auto_shard_dataset =
False`): the model, its e and its update are the same on every process.
Only process 0 prints. If a process dies, the others' step fails within
seconds and JAX's distributed service ends them after its heartbeat timeout
(100 s by default), naming the lost process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time

import numpy as np

JAX_RUN = any(a.startswith("--jax-") for a in sys.argv)
os.environ.setdefault("KERAS_BACKEND", "jax" if JAX_RUN else "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if not JAX_RUN:
    import tensorflow as tf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def make_strategy(args):
    if args.multi_worker:
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_physical_devices("GPU")
    if len(gpus) >= 2:
        return tf.distribute.MirroredStrategy()
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * args.devices)
    return tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(args.devices)])


def train(strategy, data, sync, args):
    import keras

    import keras_sam
    from keras_sam.analysis import sharpness
    from mnist1d_sam import make_model

    (x_train, y_train), (x_test, y_test) = data
    batch = args.batch_size  # global batch, split over the replicas
    train_ds = tf.data.Dataset.from_tensor_slices((x_train, y_train)) \
        .shuffle(4000, seed=0).batch(batch)
    test_ds = tf.data.Dataset.from_tensor_slices((x_test, y_test)) \
        .batch(batch)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        sam = keras_sam.SAMModel(make_model(x_train.shape[1:]),
                                 rho=args.rho, sync_perturbation=sync)
        sam.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                    loss=keras.losses.SparseCategoricalCrossentropy(
                        from_logits=True),
                    metrics=["accuracy"])
    start = time.perf_counter()
    sam.fit(train_ds, epochs=args.epochs, verbose=args.verbose)
    seconds = time.perf_counter() - start
    _, test_acc = sam.evaluate(test_ds, verbose=0)
    sharp = sharpness(sam, x_train, y_train, rho=args.rho,
                      batch_size=batch)
    return {"test_acc": test_acc, "sharpness": sharp, "seconds": seconds}


def launch_local_workers(n, args):
    """Run this script as n workers of one cluster on 127.0.0.1."""
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    cluster = {"worker": [f"127.0.0.1:{s.getsockname()[1]}"
                          for s in sockets]}
    for s in sockets:
        s.close()
    passed = ["--epochs", str(args.epochs), "--batch-size",
              str(args.batch_size), "--rho", str(args.rho), "--verbose",
              str(args.verbose)]
    procs = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--multi-worker",
             *passed],
            env={**os.environ, "TF_CONFIG": json.dumps(
                {"cluster": cluster, "task": {"type": "worker",
                                              "index": i}})})
        for i in range(n)
    ]
    return max(p.wait() for p in procs)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_local_jax_processes(n, args):
    """Run this script as n JAX processes of one job on 127.0.0.1."""
    coordinator = f"127.0.0.1:{_free_port()}"
    passed = ["--epochs", str(args.epochs), "--batch-size",
              str(args.batch_size), "--rho", str(args.rho), "--verbose",
              str(args.verbose)]
    procs = [subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), "--jax-coordinator",
         coordinator, "--jax-num-processes", str(n), "--jax-process-id",
         str(i), *passed], env={**os.environ, "KERAS_BACKEND": "jax",
                               "XLA_FLAGS": os.environ.get(
                                   "XLA_FLAGS", "--xla_force_host_platform_"
                                   "device_count=2")})
        for i in range(n)]
    return max(p.wait() for p in procs)


def train_jax_process(args):
    """One process of a JAX job: keras.distribution across processes."""
    import jax

    # Collectives between the CPU devices of several processes (GPUs use
    # NCCL by themselves); set before JAX starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    import keras

    import keras_sam
    from mnist1d_sam import load_mnist1d, make_model

    keras.distribution.initialize(args.jax_coordinator,
                                  args.jax_num_processes,
                                  args.jax_process_id)
    distribution = keras.distribution.DataParallel(devices=jax.devices())
    distribution.auto_shard_dataset = False   # each feeds its own rows
    keras.distribution.set_distribution(distribution)
    (x_train, y_train), (x_test, y_test) = load_mnist1d()
    n, me = args.jax_num_processes, args.jax_process_id
    local = args.batch_size // n   # this process's rows of a global batch

    def own(x, y):   # the rows of each global batch this process feeds
        keep = np.concatenate([np.arange(b + me * local, b + (me + 1) * local)
                               for b in range(0, len(x) - args.batch_size
                                              + 1, args.batch_size)])
        return x[keep], y[keep]

    results = {}
    for sync in (False, True):
        keras.utils.set_random_seed(0)
        sam = keras_sam.SAMModel(make_model(x_train.shape[1:]),
                                 rho=args.rho, sync_perturbation=sync)
        sam.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                    loss=keras.losses.SparseCategoricalCrossentropy(
                        from_logits=True), metrics=["accuracy"])
        start = time.perf_counter()
        sam.fit(*own(x_train, y_train), batch_size=local, epochs=args.epochs,
                shuffle=False, verbose=args.verbose)
        seconds = time.perf_counter() - start
        _, test_acc = sam.evaluate(*own(x_test, y_test), batch_size=local,
                                   verbose=0)
        results[sync] = {"test_acc": test_acc, "seconds": seconds}
    if me == 0:
        print_results(f"JAX DataParallel over {jax.device_count()} devices "
                      f"of {n} processes", results, "device", args)
    return 0


def cpu_name() -> str:
    """The CPU's model name (Linux), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_results(title, results, unit, args):
    """The table of one run per `sync_perturbation` mode, with the CPU that
    ran it: another CPU's kernels round differently, and over 10 epochs
    that moves the test accuracy by up to about 2 points."""
    print(f"\n{title}, global batch {args.batch_size}, {args.epochs} epochs, "
          f"on {cpu_name()}")
    extra = ["sharpness"] if "sharpness" in results[True] else []
    print("| sync_perturbation | e from | test acc | " +
          "".join(f"{c} | " for c in extra) + "time |")
    print("|---|---|---|" + "---|" * len(extra) + "---|")
    for sync, r in results.items():
        source = "whole batch" if sync else f"each {unit}'s shard"
        print(f"| {sync} | {source} | {r['test_acc']:.4f} | " +
              "".join(f"{r[c]:.4f} | " for c in extra) +
              f"{r['seconds']:.0f} s |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=2,
                        help="logical CPU devices when there are no GPUs")
    parser.add_argument("--workers", type=int, default=1,
                        help="start this many local worker processes")
    parser.add_argument("--multi-worker", action="store_true",
                        help="run as one worker of the cluster in TF_CONFIG")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--verbose", type=int, default=0)
    parser.add_argument("--jax-processes", type=int, default=0,
                        help="JAX: start this many local processes")
    parser.add_argument("--jax-coordinator", default=None,
                        help="JAX: HOST:PORT of process 0")
    parser.add_argument("--jax-num-processes", type=int, default=1)
    parser.add_argument("--jax-process-id", type=int, default=0)
    args = parser.parse_args(argv)
    if args.workers > 1:
        return launch_local_workers(args.workers, args)
    if args.jax_processes > 1:
        return launch_local_jax_processes(args.jax_processes, args)
    if args.jax_coordinator:
        return train_jax_process(args)

    from mnist1d_sam import load_mnist1d

    strategy = make_strategy(args)
    data = load_mnist1d()
    results = {sync: train(strategy, data, sync, args)
               for sync in (False, True)}
    task = json.loads(os.environ.get("TF_CONFIG", "{}")).get("task", {})
    if task.get("index", 0) != 0:
        return 0  # one worker reports
    print_results(f"{type(strategy).__name__}, "
                  f"{strategy.num_replicas_in_sync} replicas", results,
                  "replica", args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
