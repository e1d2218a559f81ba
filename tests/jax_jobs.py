"""JAX training jobs that the tests run as separate processes, each with its
own CPU devices, joined by JAX's distributed runtime on 127.0.0.1.

    python tests/jax_jobs.py train OUT.npz --process-id I --processes N
        --port P [--devices D] [--sync] [--save PATH] [--die-at-step S]
    python tests/jax_jobs.py resume OUT.npz PATH     (one process)

Every process builds the same global batches and feeds its own rows of each
(process p: rows [p n / N, (p + 1) n / N)), as a multi-host input pipeline
does; `keras.distribution.DataParallel` lays them out over every device of
every process.
"""

import argparse
import os
import socket
import sys

GLOBAL_BATCH, STEPS, SAVE_AFTER = 16, 5, 3


def data():
    import numpy as np

    rng = np.random.default_rng(30)
    x = rng.normal(size=(GLOBAL_BATCH * STEPS, 5)).astype("float32")
    y = rng.normal(size=(GLOBAL_BATCH * STEPS, 3)).astype("float32")
    return x, y


def model(seed=5):
    """Dense(7, tanh, L2 0.01) -> Dense(3): tests/reference.py's TanhMLP."""
    import keras

    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(7, activation="tanh",
                           kernel_regularizer=keras.regularizers.L2(0.01),
                           bias_initializer="random_normal"),
        keras.layers.Dense(3, bias_initializer="random_normal"),
    ])


def compiled(sync):
    import keras

    import keras_sam

    sam = keras_sam.SAMModel(model(), rho=0.2, sync_perturbation=sync)
    sam.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                loss="mse")
    return sam


def _port_is_free(port) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def train(args):
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={args.devices}")
    if args.process_id == 0 and not _port_is_free(args.port):
        sys.exit(f"jax_jobs: the coordinator port 127.0.0.1:{args.port} is "
                 "in use by another program; pick a free port.")
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # Bounded waits: a process that stops sending heartbeats for this long
    # is declared lost, and the others end.
    jax.distributed.initialize(
        f"127.0.0.1:{args.port}", args.processes, args.process_id,
        initialization_timeout=60,
        heartbeat_timeout_seconds=args.heartbeat)
    import keras
    import numpy as np

    distribution = keras.distribution.DataParallel(devices=jax.devices())
    distribution.auto_shard_dataset = False   # each feeds its own rows
    keras.distribution.set_distribution(distribution)
    x, y = data()
    local = GLOBAL_BATCH // args.processes
    rows = np.concatenate([
        np.arange(b + args.process_id * local, b + (args.process_id + 1)
                  * local) for b in range(0, len(x), GLOBAL_BATCH)])
    x, y = x[rows], y[rows]
    sam = compiled(args.sync)
    start = [np.asarray(w) for w in sam.get_weights()]

    class DieAt(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch + 1 == args.die_at_step:
                print(f"process {args.process_id} exits", flush=True)
                os._exit(3)   # no cleanup, as a crash

    callbacks = [DieAt()] if args.die_at_step else []
    n = SAVE_AFTER * local if args.save else len(x)
    history = sam.fit(x[:n], y[:n], batch_size=local, shuffle=False,
                      verbose=0, callbacks=callbacks)
    losses = list(history.history["loss"])
    if args.save:
        # Every process saves (reading the state is collective); only
        # process 0's file is the run's.
        sam.save(args.save if args.process_id == 0 else
                 f"{args.save}.process{args.process_id}.keras")
        more = sam.fit(x[n:], y[n:], batch_size=local, shuffle=False,
                       verbose=0)
        losses += more.history["loss"]
    np.savez(args.out, *[np.asarray(w) for w in sam.get_weights()],
             start=np.concatenate([w.ravel() for w in start]),
             devices=jax.device_count(), loss=np.array(losses),
             sharpness=np.array(history.history["sharpness"]))


def resume(args):
    """One process, one device: the saved run's last global batches."""
    import keras
    import numpy as np

    import keras_sam  # noqa: F401  (registers SAMModel)

    sam = keras.saving.load_model(args.path)
    x, y = data()
    n = SAVE_AFTER * GLOBAL_BATCH
    sam.fit(x[n:], y[n:], batch_size=GLOBAL_BATCH, shuffle=False,
            verbose=0)
    np.savez(args.out, *[np.asarray(w) for w in sam.get_weights()])


def main(argv=None):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="job", required=True)
    tr = sub.add_parser("train")
    tr.add_argument("out")
    tr.add_argument("--process-id", type=int, required=True)
    tr.add_argument("--processes", type=int, required=True)
    tr.add_argument("--port", type=int, required=True)
    tr.add_argument("--devices", type=int, default=1)
    tr.add_argument("--sync", action="store_true")
    tr.add_argument("--save", default=None)
    tr.add_argument("--die-at-step", type=int, default=0)
    tr.add_argument("--heartbeat", type=int, default=10)
    rs = sub.add_parser("resume")
    rs.add_argument("out")
    rs.add_argument("path")
    args = parser.parse_args(argv)
    os.environ["KERAS_BACKEND"] = "jax"
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if args.job == "train":
        train(args)
    else:
        resume(args)


if __name__ == "__main__":
    sys.exit(main())
