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
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from keras_sam import analysis  # noqa: E402
from keras_sam.backend.tensorflow.analysis import ModelFunctions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.step_time import DEFAULT_MODELS, MODELS  # noqa: E402
from examples.mnist1d_sam import load_mnist1d, make_mlp  # noqa: E402


def _timed(fn, repeats):
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    tf.nest.map_structure(lambda t: t.numpy(), out)
    return (time.perf_counter() - start) / repeats


def hvp_over_gradient(name, rounds, seconds):
    keras.utils.set_random_seed(0)
    model, x, y = MODELS[name]()
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    fns = ModelFunctions(model)
    w = fns.weights()
    v = [tf.random.normal(t.shape, dtype=t.dtype) for t in w]
    x, y = tf.constant(x), tf.constant(y)
    grad = lambda: fns.gradient(w, x, y, None)[1]  # noqa: E731
    hvp = lambda: fns.hvp(w, v, x, y, None)[1]  # noqa: E731
    _timed(grad, 3), _timed(hvp, 3)   # trace and warm up
    repeats = max(3, int(seconds / _timed(hvp, 3)))
    ratios, g_times, h_times = [], [], []
    for r in range(rounds):
        pair = (grad, hvp) if r % 2 == 0 else (hvp, grad)
        t = [_timed(f, repeats) for f in pair]
        g, h = (t[0], t[1]) if r % 2 == 0 else (t[1], t[0])
        g_times.append(g), h_times.append(h), ratios.append(h / g)
    return (1e3 * np.median(g_times), 1e3 * np.median(h_times),
            float(np.median(ratios)))


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
    print(f"\nTensorFlow {tf.__version__}, Keras {keras.__version__}, "
          f"{os.cpu_count()} CPU cores; median of {rounds} alternating "
          "rounds\n")
    print("| model | gradient ms | Hessian-vector product ms | HVP / "
          "gradient |")
    print("|---|---|---|---|")
    for name in DEFAULT_MODELS:   # the KerasHub rows take dict inputs
        g, h, ratio = hvp_over_gradient(name, rounds, seconds)
        print(f"| {name} | {g:.2f} | {h:.2f} | {ratio:.2f} |", flush=True)
    seconds, top = eigenvalue_time()
    print(f"\nhessian_eigenvalues(k=1, tol=1e-3) of the MNIST-1D MLP "
          f"(after 5 epochs of SGD) on 2000 signals: {seconds:.1f} s, "
          f"lambda_max = {top:.3f}")


if __name__ == "__main__":
    main()
