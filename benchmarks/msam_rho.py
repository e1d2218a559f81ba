"""Momentum-SAM's rho depends on the optimizer: SGD with momentum against Adam.

    python benchmarks/msam_rho.py            # MNIST-1D MLP, 2 optimizers, 2 seeds
    python benchmarks/msam_rho.py --quick    # 1 seed, 10 epochs

Momentum-SAM (`direction="momentum"`) steps to w + e with
e = -rho u / ||u||, u the optimizer's first moment, so rho is a distance in
weight space, as for SAM. What differs between optimizers is how far one
update moves: SGD with momentum moves lr ||u|| per step (large early on),
Adam about lr sqrt(n) per step whatever the gradient's scale. This trains the
MNIST-1D MLP of examples/mnist1d_sam.py (clean labels; 3200 training and
800 validation signals) with each optimizer and each rho, and prints the
validation accuracy (mean +- std over seeds) and the final training loss;
"at chance" counts the seeds whose training loss stayed within 2% of
ln 10. The Transformer with Adam is measured by
`python benchmarks/transformer_case.py --study --only "Adam (base)" "MSAM rho=0.05" "MSAM rho=0.3" "MSAM rho=2"`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import bench  # noqa: E402
from examples.mnist1d_sam import load_mnist1d, make_mlp  # noqa: E402

RHOS = [0.0, 0.01, 0.05, 0.3, 1.0, 2.0, 3.0]   # 0: the base optimizer


def optimizers(steps):
    return {
        "SGD, momentum 0.9, lr 0.05 (cosine)": lambda: keras.optimizers.SGD(
            keras.optimizers.schedules.CosineDecay(0.05, steps),
            momentum=0.9),
        "Adam, lr 1e-3": lambda: keras.optimizers.Adam(1e-3),
    }


def train(make_optimizer, rho, data, seed, epochs, batch_size=100):
    (x, y), (x_val, y_val) = data
    keras.utils.set_random_seed(seed)
    model = make_mlp(x.shape[1:])
    if rho:
        model = keras_sam.SAMModel(model, rho=rho, direction="momentum")
    model.compile(optimizer=make_optimizer(),
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True), metrics=["accuracy"])
    history = model.fit(x, y, batch_size=batch_size, epochs=epochs,
                        verbose=0)
    return history.history["loss"][-1], model.evaluate(x_val, y_val,
                                                       verbose=0)[1]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rhos", type=float, nargs="*", default=RHOS)
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 10 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = 1, 10
    (x, y), _ = load_mnist1d()
    data = (x[800:], y[800:]), (x[:800], y[:800])
    steps = args.epochs * int(np.ceil(len(data[0][0]) / 100))
    rows = []
    for name, make in optimizers(steps).items():
        for rho in args.rhos:
            loss, acc = np.array([train(make, rho, data, seed, args.epochs)
                                  for seed in range(args.seeds)]).T
            rows.append([
                name, f"{rho:g}" if rho else "0 (base optimizer)",
                f"{acc.mean():.4f} +- {acc.std():.4f}", f"{loss.mean():.4f}",
                f"{int(np.sum(loss > 0.98 * np.log(10)))}/{len(loss)}"])
            print(f"measured {name}, rho={rho:g}", file=sys.stderr)
    print(f"\nMNIST-1D MLP, clean labels, {args.epochs} epochs, batch 100, "
          f"seeds 0..{args.seeds - 1}; Keras {keras.__version__} "
          f"({keras.backend.backend()})")
    bench.table(["optimizer", "MSAM rho", "val acc", "final train loss",
                   "at chance"], rows)
    return rows


if __name__ == "__main__":
    main()
