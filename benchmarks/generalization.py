"""What each SAM variant buys on MNIST-1D: test accuracy, sharpness, time.

    python benchmarks/generalization.py                 # full run (~25 min)
    python benchmarks/generalization.py --quick         # 1 seed, short runs
    python benchmarks/generalization.py --report        # table + plot again
                                                        # from the last run

MNIST-1D (the `mnist1d` package, generated offline): 4000 training signals,
of which 800 are set aside for validation, and 1000 test signals. Two
settings of the labels (clean, and 25% of the training labels flipped to
another class; validation and test labels stay clean) and two networks (an
MLP and the 1-D convnet of examples/mnist1d_sam.py), all trained with SGD +
momentum 0.9 and a cosine learning rate from 0.05, batch 100.

For every variant rho (and LookSAM's alpha) is chosen on the validation
split, with seed 0, from its own grid; never on the test set. The choice is
then trained with every seed (seed 0's run is reused). Per setting the table gives test
accuracy (mean and spread over seeds), the sharpness of the final weights
(keras_sam.analysis.sharpness at rho = 0.05 on 2000 training signals),
training time relative to the base optimizer and the number of seeds on
which the variant beat the base optimizer. The PNG plots test accuracy
against relative training time (`pip install matplotlib`).

Results go to benchmarks/results/generalization.json, so the table and the
plot can be made again without training (--report).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import keras_sam  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
import bench  # noqa: E402
from examples.mnist1d_sam import (compile_sgd, flip_labels,  # noqa: E402
                                  load_mnist1d, make_mlp, make_model)

RESULTS = ROOT / "benchmarks" / "results"

SAM_GRID = [0.02, 0.05, 0.1, 0.2, 0.5, 1.0]
CHEAP_GRID = [0.02, 0.05, 0.1, 0.2]   # GSAM, every-k, LookSAM
VARIANTS = {
    # name: (SAMModel arguments, grid of {argument: value} chosen on the
    # validation split); None: the base optimizer
    "SGD": (None, [{}]),
    "SAM": ({}, [{"rho": r} for r in SAM_GRID]),
    "ASAM": ({"adaptive": True},
             [{"rho": r} for r in (0.2, 0.5, 1.0, 2.0, 5.0, 10.0)]),
    "GSAM (alpha=0.2)": ({"gsam_alpha": 0.2},
                         [{"rho": r} for r in CHEAP_GRID]),
    "SAM every 4th step": ({"sam_every": 4},
                           [{"rho": r} for r in CHEAP_GRID]),
    "LookSAM (k=5)": ({"sam_every": 5},
                      [{"rho": r, "looksam_alpha": a} for r in CHEAP_GRID
                       for a in (0.2, 0.7)]),
    # Momentum-SAM: one gradient per step, rho far above SAM's.
    "MSAM": ({"direction": "momentum"},
             [{"rho": r} for r in (0.3, 1.0, 2.0, 3.0, 6.0)]),
}


MODELS = {"MLP": make_mlp, "convnet": make_model}


def datasets(noise):
    (x, y), (x_test, y_test) = load_mnist1d()
    x_val, y_val = x[:800], y[:800]
    x_train, y_train = x[800:], flip_labels(y[800:], noise)
    return (x_train, y_train), (x_val, y_val), (x_test, y_test)


def train_once(model_name, kwargs, chosen, data, seed, epochs,
               batch_size=100):
    (x, y), (x_val, y_val), (x_test, y_test) = data
    keras.utils.set_random_seed(seed)
    model = MODELS[model_name](x.shape[1:])
    trained = model if kwargs is None else keras_sam.SAMModel(
        model, **kwargs, **chosen)
    compile_sgd(trained, epochs * int(np.ceil(len(x) / batch_size)))
    start = time.perf_counter()
    trained.fit(x, y, batch_size=batch_size, epochs=epochs, verbose=0)
    seconds = time.perf_counter() - start
    val_acc = trained.evaluate(x_val, y_val, verbose=0)[1]
    test_acc = trained.evaluate(x_test, y_test, verbose=0)[1]
    sharp = keras_sam.analysis.sharpness(trained, x[:2000], y[:2000],
                                         rho=0.05, batch_size=100)
    return {"val_acc": val_acc, "test_acc": test_acc, "sharpness": sharp,
            "seconds": seconds, "chosen": chosen, "seed": seed}


def run(args):
    """Train every setting; with --variants only those, kept beside the
    saved results of the others (each entry records when it ran)."""
    saved = RESULTS / "generalization.json"
    results = (json.loads(saved.read_text())["results"]
               if args.variants and saved.exists() else {})
    stamp = time.strftime("%Y-%m-%d %H:%M")
    for noise in args.noise:
        for model_name in args.models:
            data = datasets(noise)
            key = f"{model_name}, {int(noise * 100)}% noise"
            results.setdefault(key, {})
            for name, (kwargs, grid) in VARIANTS.items():
                if args.variants and name not in args.variants:
                    continue
                # The settings on the validation split, seed 0.
                trials = [train_once(model_name, kwargs, chosen, data, 0,
                                     args.epochs) for chosen in grid]
                best = max(trials, key=lambda r: r["val_acc"])
                runs = [best] + [
                    train_once(model_name, kwargs, best["chosen"], data,
                               seed, args.epochs)
                    for seed in range(1, args.seeds)]
                if name == "SGD":   # kept rows keep their own run's SGD
                    old = results[key].get("SGD")
                    for entry in results[key].values():
                        if old is not None and "sgd_seconds" not in entry:
                            entry["sgd_seconds"] = _mean_seconds(old)
                results[key][name] = {
                    "grid": [(t["chosen"], t["val_acc"]) for t in trials],
                    "runs": runs, "ran": stamp}
                print(f"{key} | {name}: {best['chosen']} test "
                      f"{np.mean([r['test_acc'] for r in runs]):.4f}",
                      flush=True)
    for key in results:   # the order of VARIANTS, whenever each ran
        results[key] = {name: results[key][name] for name in VARIANTS
                        if name in results[key]}
    RESULTS.mkdir(exist_ok=True)
    meta = {"epochs": args.epochs, "seeds": args.seeds}
    (RESULTS / "generalization.json").write_text(
        json.dumps({"meta": meta, "results": results}, indent=1))
    return meta, results


def _mean_seconds(entry) -> float:
    return float(np.mean([r["seconds"] for r in entry["runs"]]))


def _relative_time(entry, base_time) -> float:
    """Time over SGD's, both from the same run."""
    return _mean_seconds(entry) / entry.get("sgd_seconds", base_time)


def report(meta, results):
    print(f"\nMNIST-1D, 3200 train / 800 validation / 1000 test, "
          f"{meta['epochs']} epochs, {meta['seeds']} seeds (mean +- std); "
          "rho chosen on validation; sharpness at rho=0.05 on 2000 training "
          "signals; time relative to SGD on the same setting")
    for key, variants in results.items():
        base = variants.get("SGD")
        base_runs = base["runs"] if base else None
        base_time = np.mean([r["seconds"] for r in base_runs]) \
            if base_runs else float("nan")
        rows = []
        for name, entry in variants.items():
            runs = entry["runs"]
            acc = np.array([r["test_acc"] for r in runs])
            won = "" if name == "SGD" or not base_runs else "{}/{}".format(
                sum(a > b["test_acc"] for a, b in zip(acc, base_runs)),
                len(runs))
            rows.append([
                name, ", ".join(f"{k}={v:g}" for k, v in
                                runs[0]["chosen"].items()),
                f"{acc.mean():.4f} +- {acc.std():.4f}",
                f"{np.mean([r['sharpness'] for r in runs]):.4f}",
                f"{_relative_time(entry, base_time):.2f}", won,
                entry.get("ran", "earlier run")])
        bench.table(["optimizer", "chosen on validation", "test acc",
                       "sharpness", "time / SGD", "seeds won vs SGD", "ran"],
                      rows, caption=key)
    plot(results)


def plot(results):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(no plot: pip install matplotlib)")
        return
    keys = list(results)
    cols = min(2, len(keys))
    rows = int(np.ceil(len(keys) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows),
                             squeeze=False)
    markers = "os^vDP*"
    for ax, key in zip(axes.flat, keys):
        variants = results[key]
        base_time = np.mean([r["seconds"] for r in variants["SGD"]["runs"]])
        for (name, entry), marker in zip(variants.items(), markers):
            runs = entry["runs"]
            acc = [r["test_acc"] for r in runs]
            rel = _relative_time(entry, base_time)
            ax.errorbar(rel, np.mean(acc), yerr=np.std(acc), fmt=marker,
                        capsize=3, label=name)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("training time / SGD")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = ROOT / "docs" / "figures" / "generalization.png"
    fig.savefig(path, dpi=90)
    print(f"\nplot: {path.relative_to(ROOT)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--noise", type=float, nargs="*", default=[0.0, 0.25])
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--variants", nargs="*", default=None,
                        help="run only these; the others' saved results "
                        "stay")
    parser.add_argument("--quick", action="store_true",
                        help="1 seed, 5 epochs, MLP, no noise: a smoke run")
    parser.add_argument("--report", action="store_true",
                        help="table and plot from the saved results")
    args = parser.parse_args(argv)
    if args.report:
        saved = json.loads((RESULTS / "generalization.json").read_text())
        return report(saved["meta"], saved["results"])
    if args.quick:
        args.seeds, args.epochs, args.noise, args.models = 1, 5, [0.0], ["MLP"]
    report(*run(args))


if __name__ == "__main__":
    main()
