"""Train the same network with and without SAM and compare them.

    python examples/mnist1d_sam.py                    # MNIST-1D, made offline
    python examples/mnist1d_sam.py --label-noise 0    # clean labels
    python examples/mnist1d_sam.py --model convnet    # the 1-D convnet
    python examples/mnist1d_sam.py --dataset cifar10  # downloads CIFAR-10

MNIST-1D (Greydanus, 2020) is generated on the spot by the `mnist1d` package:
4000 training and 1000 test signals of length 40, ten classes, no download.
By default an MLP learns it with 25% of the training labels flipped to
another class (test labels stay clean): the setting where SAM helps most in
benchmarks/generalization.py, and a common one (labels are rarely clean).
Both runs start from the same initial weights and see the same batches; the
table at the end gives test accuracy and the sharpness of the final weights,
max_{||e|| <= rho} L(w + e) - L(w), measured the same way for both.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402
from keras_sam.analysis import sharpness  # noqa: E402


def load_mnist1d():
    """MNIST-1D: (x_train, y_train), (x_test, y_test), generated offline."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split = 5000, 0.8  # 4000 train, 1000 test
    data = make_dataset(args)
    x_train = data["x"][..., None].astype("float32")
    x_test = data["x_test"][..., None].astype("float32")
    return ((x_train, data["y"].astype("int64")),
            (x_test, data["y_test"].astype("int64")))


def load_cifar10():
    """CIFAR-10 through `keras.datasets` (downloads about 170 MB once)."""
    (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
    return ((x_train.astype("float32") / 255.0, y_train.ravel()),
            (x_test.astype("float32") / 255.0, y_test.ravel()))


def flip_labels(y, fraction, num_classes=10, seed=0):
    """`fraction` of the labels moved to another class, chosen at random."""
    rng = np.random.default_rng(seed)
    y = y.copy()
    idx = rng.choice(len(y), int(round(fraction * len(y))), replace=False)
    y[idx] = (y[idx] + rng.integers(1, num_classes, len(idx))) % num_classes
    return y


def make_mlp(input_shape, num_classes=10):
    return keras.Sequential([
        keras.Input(input_shape), keras.layers.Flatten(),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(256, activation="relu"),
        keras.layers.Dense(num_classes),
    ], name="mlp")


def make_model(input_shape, num_classes=10):
    conv = keras.layers.Conv1D if len(input_shape) == 2 else \
        keras.layers.Conv2D
    return keras.Sequential([
        keras.Input(input_shape),
        conv(32, 5, strides=2, padding="same", activation="relu"),
        keras.layers.BatchNormalization(),
        conv(32, 3, strides=2, padding="same", activation="relu"),
        keras.layers.BatchNormalization(),
        conv(32, 3, strides=2, padding="same", activation="relu"),
        keras.layers.Flatten(),
        keras.layers.Dropout(0.1),
        keras.layers.Dense(num_classes),
    ], name="convnet")


def compile_sgd(model, steps, learning_rate=0.05):
    """SGD + momentum 0.9, its learning rate on a cosine over `steps`;
    cross-entropy on logits; accuracy."""
    model.compile(
        optimizer=keras.optimizers.SGD(
            keras.optimizers.schedules.CosineDecay(learning_rate, steps),
            momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    return model


def train(model, data, args, use_sam):
    (x_train, y_train), (x_test, y_test) = data
    if use_sam:
        model = keras_sam.SAMModel(model, rho=args.rho)
    compile_sgd(model, args.epochs * int(np.ceil(len(x_train)
                                                 / args.batch_size)),
                args.learning_rate)
    print(f"\n== {'SAM (rho=%g)' % args.rho if use_sam else 'base SGD'} ==")
    start = time.perf_counter()
    model.fit(x_train, y_train, batch_size=args.batch_size,
              epochs=args.epochs, validation_data=(x_test, y_test),
              verbose=args.verbose)
    seconds = time.perf_counter() - start
    _, test_acc = model.evaluate(x_test, y_test, verbose=0)
    _, train_acc = model.evaluate(x_train, y_train, verbose=0)
    sharp = sharpness(model, x_train, y_train, rho=args.rho,
                      batch_size=args.batch_size)
    return {"train_acc": train_acc, "test_acc": test_acc,
            "sharpness": sharp, "seconds": seconds}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", choices=["mnist1d", "cifar10"],
                        default="mnist1d")
    parser.add_argument("--model", choices=["mlp", "convnet"], default="mlp")
    parser.add_argument("--label-noise", type=float, default=0.25,
                        help="fraction of training labels flipped")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--rho", type=float, default=0.2,
                        help="0.2 won on the validation split in "
                             "benchmarks/generalization.py")
    parser.add_argument("--seeds", type=int, default=3,
                        help="independent runs (initial weights, batches)")
    parser.add_argument("--verbose", type=int, default=2,
                        help="Keras verbosity: 1 progress bars, 2 one line "
                             "per epoch, 0 silent")
    args = parser.parse_args(argv)

    data = load_mnist1d() if args.dataset == "mnist1d" else load_cifar10()
    (x_train, y_train), test = data
    data = ((x_train, flip_labels(y_train, args.label_noise)), test)
    build = make_mlp if args.model == "mlp" else make_model
    results = {"SGD": [], "SAM": []}
    for seed in range(args.seeds):
        keras.utils.set_random_seed(seed)
        base_model = build(data[0][0].shape[1:])
        initial = base_model.get_weights()
        for use_sam in (False, True):
            keras.utils.set_random_seed(seed)  # same batches and dropout
            model = keras.models.clone_model(base_model)
            model.set_weights(initial)
            results["SAM" if use_sam else "SGD"].append(
                train(model, data, args, use_sam))

    print(f"\n{args.dataset}, {args.model}: {len(data[0][0])} train "
          f"({args.label_noise:.0%} of labels flipped) / {len(data[1][0])} "
          f"test, {args.epochs} epochs, batch {args.batch_size}, "
          f"{args.seeds} seeds (mean +- std); sharpness at rho={args.rho} "
          "on the training set")
    print("| optimizer | train acc (noisy labels) | test acc | sharpness | "
          "train time |")
    print("|---|---|---|---|---|")
    for name, runs in results.items():
        cells = []
        for key, fmt in (("train_acc", "{:.4f}"), ("test_acc", "{:.4f}"),
                         ("sharpness", "{:.4f}"), ("seconds", "{:.0f} s")):
            values = np.array([r[key] for r in runs])
            cell = fmt.format(values.mean())
            if len(values) > 1:
                cell += " +- " + fmt.format(values.std()).replace(" s", "")
            cells.append(cell)
        print(f"| {name} | " + " | ".join(cells) + " |")
    return results


if __name__ == "__main__":
    main()
