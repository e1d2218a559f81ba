"""Seeing the minima SGD and SAM find: sharpness, Hessian, loss landscapes.

    python examples/landscape.py                 # MNIST-1D, made offline
    python examples/landscape.py --epochs 10     # a quicker look

Needs: pip install -e ".[tensorflow,examples]" (mnist1d and matplotlib).

Trains the MLP of examples/mnist1d_sam.py twice from the same initial
weights and batches, with SGD + momentum and with SAM, on MNIST-1D with 25%
of the training labels flipped (the setting where SAM helped most in
benchmarks/generalization.py). Then it measures both minima on the same
2000 training signals: first-order sharpness (rho = 0.05), the top Hessian
eigenvalue (Lanczos) and the Hessian trace (Hutchinson), and draws:

    docs/figures/landscape_1d.png       both minima along one random
                                            filter-normalized direction
    docs/figures/landscape_2d_sgd.png   contour maps over two directions
    docs/figures/landscape_2d_sam.png
    docs/figures/interpolation.png      the loss on the line from SGD's
                                            minimum (t = 0) to SAM's (t = 1)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402
from keras_sam import analysis  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mnist1d_sam import (compile_sgd, flip_labels,  # noqa: E402
                         load_mnist1d, make_mlp)

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "figures"


def train(use_sam, data, args, initial):
    (x, y), _ = data
    keras.utils.set_random_seed(args.seed)   # same batches for both
    model = make_mlp(x.shape[1:])
    model.set_weights(initial)
    trained = keras_sam.SAMModel(model, rho=args.rho) if use_sam else model
    compile_sgd(trained, args.epochs * int(np.ceil(len(x) / 100)))
    trained.fit(x, y, batch_size=100, epochs=args.epochs, verbose=0)
    return trained


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--rho", type=float, default=0.2)
    parser.add_argument("--label-noise", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=25,
                        help="points per axis of the landscapes")
    parser.add_argument("--out", type=Path, default=FIGURES)
    args = parser.parse_args(argv)

    (x, y), (x_test, y_test) = load_mnist1d()
    y = flip_labels(y, args.label_noise)
    data = ((x, y), (x_test, y_test))
    keras.utils.set_random_seed(args.seed)
    initial = make_mlp(x.shape[1:]).get_weights()
    models = {"SGD": train(False, data, args, initial),
              f"SAM (rho={args.rho:g})": train(True, data, args, initial)}

    probe_x, probe_y = x[:2000], y[:2000]
    rows = {}
    for name, model in models.items():
        start = time.perf_counter()
        top = analysis.hessian_eigenvalues(model, probe_x, probe_y, k=1,
                                           batch_size=500, tol=1e-3)
        trace, trace_se = analysis.hessian_trace(
            model, probe_x, probe_y, probes=30, batch_size=500)
        rows[name] = {
            "test acc": model.evaluate(x_test, y_test, verbose=0)[1],
            "sharpness": analysis.sharpness(model, probe_x, probe_y,
                                            rho=0.05, batch_size=100),
            "lambda_max": float(top[0]), "trace": trace, "trace_se": trace_se,
            "seconds": time.perf_counter() - start}

    print(f"\nMNIST-1D MLP, {args.label_noise:.0%} of training labels "
          f"flipped, {args.epochs} epochs, seed {args.seed}; measured on "
          "2000 training signals")
    print("| optimizer | test acc | sharpness (rho=0.05) | top Hessian "
          "eigenvalue | Hessian trace |")
    print("|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['test acc']:.4f} | {r['sharpness']:.4f} | "
              f"{r['lambda_max']:.2f} | {r['trace']:.0f} +- "
              f"{r['trace_se']:.0f} |")

    args.out.mkdir(parents=True, exist_ok=True)
    kw = dict(batch_size=500, resolution=args.resolution)
    curves = {name: analysis.loss_landscape(m, probe_x, probe_y, **kw)
              for name, m in models.items()}
    analysis.plot_landscape_1d(curves, args.out / "landscape_1d.png",
                               title="one filter-normalized direction")
    grids = {name: analysis.loss_landscape(
        model, probe_x, probe_y, dims=2, batch_size=500,
        resolution=max(5, args.resolution // 2))
        for name, model in models.items()}
    # One colour scale for both maps, so that they compare.
    top = max(float(g["losses"].max()) for g in grids.values())
    levels = np.linspace(0.0, top, 21)
    for (name, grid), tag in zip(grids.items(), ("sgd", "sam")):
        analysis.plot_landscape_2d(grid, args.out / f"landscape_2d_{tag}.png",
                                   title=name, levels=levels)
    sgd, sam = models.values()
    line = analysis.loss_landscape(sgd, probe_x, probe_y, toward=sam,
                                   extent=0.5, **kw)
    analysis.plot_landscape_1d({"SGD (t=0) to SAM (t=1)": line},
                               args.out / "interpolation.png",
                               title="the line between the two minima")
    out = args.out.resolve()
    root = Path(__file__).resolve().parents[1]
    shown = out.relative_to(root) if out.is_relative_to(root) else out
    print(f"\nfigures in {shown}")
    return rows


if __name__ == "__main__":
    main()
