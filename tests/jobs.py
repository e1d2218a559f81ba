"""Training jobs that the tests run as separate processes.

    python tests/jobs.py multi_worker OUT.npz sam|plain   (TF_CONFIG set)
    python tests/jobs.py resumable OUT.npz BACKUP_DIR [--kill-at-step N]
"""

import argparse
import os
import signal
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_sam  # noqa: E402


def data(n=64):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5)).astype("float32")
    y = rng.normal(size=(n, 3)).astype("float32")
    return x, y


def model(seed=0):
    """Synchronized BatchNorm: its statistics come from the global batch, so
    every worker holds the same ones, equal to a single process's."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(16, activation="tanh"),
        keras.layers.BatchNormalization(synchronized=True),
        keras.layers.Dense(3),
    ])


def compiled_sam(sync=True):
    sam = keras_sam.SAMModel(model(), rho=0.1, sync_perturbation=sync)
    sam.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                loss="mse")
    return sam


def multi_worker(out, kind):
    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    x, y = data()
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(16)
    with strategy.scope():
        if kind == "sam":
            trained = compiled_sam()
        else:
            trained = model()
            trained.compile(optimizer="sgd", loss="mse")
    history = trained.fit(dataset, epochs=2, verbose=0,
                          validation_data=dataset)
    np.savez(out, *trained.get_weights(),
             loss=np.array(history.history["loss"]),
             val_loss=np.array(history.history["val_loss"]))


class KillAt(keras.callbacks.Callback):
    """SIGKILL this process after global step `step`: no cleanup runs."""

    def __init__(self, step):
        super().__init__()
        self.step, self.seen = step, 0

    def on_train_batch_end(self, batch, logs=None):
        self.seen += 1
        if self.seen == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def resumable(out, backup_dir, kill_at_step):
    x, y = data()
    sam = compiled_sam(sync=False)
    callbacks = [keras.callbacks.BackupAndRestore(backup_dir)]
    if kill_at_step:
        callbacks.append(KillAt(kill_at_step))
    history = sam.fit(x, y, batch_size=16, epochs=5, shuffle=False,
                      verbose=0, callbacks=callbacks)
    np.savez(out, *sam.get_weights(),
             epochs_run=np.array(len(history.history["loss"])))


def main(argv=None):
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="job", required=True)
    mw = sub.add_parser("multi_worker")
    mw.add_argument("out")
    mw.add_argument("kind", choices=["sam", "plain"])
    rs = sub.add_parser("resumable")
    rs.add_argument("out")
    rs.add_argument("backup_dir")
    rs.add_argument("--kill-at-step", type=int, default=0)
    args = parser.parse_args(argv)
    if args.job == "multi_worker":
        multi_worker(args.out, args.kind)
    else:
        resumable(args.out, args.backup_dir, args.kill_at_step)


if __name__ == "__main__":
    sys.exit(main())
