"""What the Hessian tools cost: one Hessian-vector product against one
gradient, and `hessian_eigenvalues(k=1)` on the MNIST-1D example.

    python benchmarks/hessian_cost.py
    python benchmarks/hessian_cost.py --quick

The models are those of benchmarks/step_time.py (an MLP, a CNN with
BatchNorm, a small Transformer), each on its benchmark batch. Both
functions are traced once and timed in alternating rounds; the ratio is the
median over rounds of the per-round ratio. A Hessian-vector product is a
gradient of a gradient: about two to three gradients' work is expected.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

import bench  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from examples.mnist1d_sam import load_mnist1d, make_mlp  # noqa: E402
from keras_sam import analysis  # noqa: E402
from keras_sam.backend.tensorflow.analysis import ModelFunctions  # noqa: E402
from step_time import DEFAULT_MODELS, MODELS  # noqa: E402


def hvp_over_gradient(name, rounds, seconds):
    keras.utils.set_random_seed(0)
    model, x, y = MODELS[name]()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    fns = ModelFunctions(model)
    w = fns.weights()
    v = [tf.random.normal(t.shape, dtype=t.dtype) for t in w]
    x, y = tf.constant(x), tf.constant(y)
    sync = lambda out: tf.nest.map_structure(lambda t: t.numpy(), out)  # noqa
    runs = {"gradient": bench.timed(
                lambda: fns.gradient(w, x, y, None)[1], sync),
            "hvp": bench.timed(lambda: fns.hvp(w, v, x, y, None)[1], sync)}
    for run in runs.values():
        run(3)   # trace and warm up
    t = bench.alternate(runs, rounds,
                          bench.steps_for(runs["hvp"], seconds, probe=3,
                                            multiple=3))
    return (bench.ms(t["gradient"]), bench.ms(t["hvp"]),
            bench.ratio(t, "hvp", "gradient"))


def eigenvalue_time():
    (x, y), _ = load_mnist1d()
    keras.utils.set_random_seed(0)
    model = make_mlp(x.shape[1:])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    model.fit(x, y, batch_size=100, epochs=5, verbose=0)
    start = time.perf_counter()
    top = analysis.hessian_eigenvalues(model, x[:2000], y[:2000], k=1,
                                       batch_size=500, tol=1e-3)
    return time.perf_counter() - start, float(top[0])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    rounds, seconds = (3, 0.5) if args.quick else (9, 1.5)
    rows = []
    for name in DEFAULT_MODELS:   # the KerasHub rows take dict inputs
        g, h, ratio = hvp_over_gradient(name, rounds, seconds)
        rows.append([name, f"{g:.2f}", f"{h:.2f}", f"{ratio:.2f}"])
    bench.table(["model", "gradient ms", "Hessian-vector product ms",
                   "HVP / gradient"], rows,
                  caption=f"{bench.device()}; median of {rounds} "
                  "alternating rounds")
    seconds, top = eigenvalue_time()
    print(f"\nhessian_eigenvalues(k=1, tol=1e-3) of the MNIST-1D MLP "
          f"(after 5 epochs of SGD) on 2000 signals: {seconds:.1f} s, "
          f"lambda_max = {top:.3f}")


if __name__ == "__main__":
    main()
