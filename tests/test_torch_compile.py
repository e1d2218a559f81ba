"""PyTorch, `compile(jit_compile=True)`: the SAM step under torch.compile
(keras_sam/backend/torch/compiled.py) is one graph and keeps every
guarantee of the eager step."""

import keras
import numpy as np
import pytest

import keras_sam
import reference
from conftest import regression_data, tanh_mlp, weights64

pytestmark = pytest.mark.backends("torch")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles its own steps: no cache entry (nor recompile
    count) carried over from another test."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _mlp(dropout=0.3, batchnorm=True, seed=3):
    """Dense -> [BatchNorm] -> Dropout (unseeded: torch's global generator)
    -> Dense."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(16, activation="relu"),
        *([keras.layers.BatchNormalization()] if batchnorm else []),
        *([keras.layers.Dropout(dropout)] if dropout else []),
        keras.layers.Dense(3)])


def _fit_counting_breaks(wrapped, x, y, **kwargs):
    """fit; (graph breaks, graphs compiled) as dynamo counts them."""
    from torch._dynamo.utils import counters

    counters.clear()
    wrapped.fit(x, y, shuffle=False, verbose=0, **kwargs)
    reasons = {k.split("\n")[0]: v for k, v in
               counters["graph_break"].items()}
    return sum(reasons.values()), counters["stats"]["unique_graphs"], reasons


@pytest.mark.parametrize("kwargs", [{}, {"direction": "momentum"}])
def test_compiled_step_is_one_graph(kwargs):
    """BatchNorm and unseeded Dropout, Adam: both passes, the update and
    the metrics compile into one graph, with no break; Keras's own compiled
    step of the same model breaks at `loss.backward()`."""
    x, y = regression_data(n=64)
    sam = keras_sam.SAMModel(_mlp(), rho=0.1, **kwargs)
    sam.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse",
                jit_compile=True)
    breaks, graphs, reasons = _fit_counting_breaks(sam, x, y, batch_size=16,
                                                   epochs=2)
    assert (breaks, graphs) == (0, 1), reasons
    assert getattr(sam, "_keras_sam_rewinds_rng") is False
    assert int(sam.optimizer.iterations) == 8

    plain = _mlp()
    plain.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse",
                  jit_compile=True)
    plain_breaks, _, plain_reasons = _fit_counting_breaks(
        plain, x, y, batch_size=16, epochs=2)
    assert plain_breaks >= 1, plain_reasons


def test_compiled_step_breaks_only_where_keras_does():
    """SGD with momentum reads its learning rate as a Python float (a break
    in Keras's optimizer): the SAM step breaks there and nowhere else, no
    more often than Keras's own compiled step of the same model."""
    x, y = regression_data(n=64)
    counts = {}
    for name in ("plain", "SAM"):
        model = _mlp()
        wrapped = model if name == "plain" else keras_sam.SAMModel(
            model, rho=0.1)
        wrapped.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                        loss="mse", jit_compile=True)
        counts[name] = _fit_counting_breaks(wrapped, x, y, batch_size=16,
                                            epochs=2)
    breaks, _, reasons = counts["SAM"]
    assert breaks <= counts["plain"][0], counts
    assert set(reasons) <= {"Data dependent operator"}, reasons


@pytest.mark.parametrize("kwargs", [
    {"adaptive": True, "gsam_alpha": 0.3, "num_batch_splits": 2},
    {"sam_every": 2, "looksam_alpha": 0.5}])
def test_compiled_step_matches_the_float64_reference(kwargs):
    rho, lr = 0.3, 0.1
    model = tanh_mlp(l2=0.0, seed=4)
    start = weights64(model)
    sam = keras_sam.SAMModel(model, rho=rho, **kwargs)
    sam.compile(optimizer=keras.optimizers.SGD(lr), loss="mse",
                jit_compile=True)
    batches = [regression_data(n=16, seed=40 + i) for i in range(4)]
    for x, y in batches:
        sam.train_on_batch(x, y)
    want, _, _ = reference.variant_train(
        reference.TanhMLP(), reference.SGD(lr), start,
        [(x.astype(np.float64), y.astype(np.float64)) for x, y in batches],
        rho, **kwargs)
    for got, expected in zip(weights64(model), want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_compiled_momentum_sam_matches_the_float64_reference():
    rho, lr = 0.5, 0.05
    model = tanh_mlp(seed=6)
    start = weights64(model)
    sam = keras_sam.SAMModel(model, rho=rho, direction="momentum")
    sam.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9),
                loss="mse", jit_compile=True)
    batches = [regression_data(n=16, seed=50 + i) for i in range(4)]
    for x, y in batches:
        sam.train_on_batch(x, y)
    want, _ = reference.msam_train(
        reference.TanhMLP(), reference.SGD(lr, momentum=0.9), start,
        [(x.astype(np.float64), y.astype(np.float64)) for x, y in batches],
        rho)
    for got, expected in zip(weights64(model), want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


class _TorchNoise(keras.layers.Layer):
    """Multiplicative noise drawn with torch.rand: torch's global
    generator, outside `torch.nn.functional.dropout`."""

    def call(self, x, training=None):
        import torch

        if not training:
            return x
        return x * (0.5 + torch.rand_like(x))


@pytest.mark.parametrize("layer, splits", [("dropout", 2),
                                           ("torch_rand", 1)])
def test_compiled_passes_see_the_same_random_draws(layer, splits):
    """Dropout(0.5) and a layer drawing with torch.rand: with rho tiny, the
    logged sharpness L(w + e) - L(w) is ~ rho ||g|| when both passes draw
    the same masks, and of the order of the loss when they do not. Batch
    splits of unequal size (9 and 8 rows) each keep their own masks."""
    x, y = regression_data(n=17)
    keras.utils.set_random_seed(2)
    noise = (keras.layers.Dropout(0.5) if layer == "dropout"
             else _TorchNoise())
    model = keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(32, activation="relu"),
        noise, keras.layers.Dense(3)])
    # Two draws of the masks give losses this far apart: what a mismatch
    # between the passes would log.
    def mse():
        import torch

        with torch.no_grad():
            return float(keras.ops.mean(keras.ops.square(
                model(x, training=True) - y)))

    gap = abs(mse() - mse())
    assert gap > 1e-3
    sam = keras_sam.SAMModel(model, rho=1e-6, num_batch_splits=splits)
    sam.compile(optimizer=keras.optimizers.Adam(1e-3), loss="mse",
                jit_compile=True)
    breaks, _, reasons = _fit_counting_breaks(sam, x, y, batch_size=17,
                                              epochs=3)
    sharpness = sam.history.history["sharpness"]
    assert all(0.0 <= s < 1e-5 for s in sharpness), (sharpness, gap)
    rewinds = layer == "torch_rand"   # torch.rand: rewind the generator
    assert getattr(sam, "_keras_sam_rewinds_rng") is rewinds
    if not rewinds:
        assert breaks == 0, reasons


@pytest.mark.parametrize("loss_scale", [False, True])
def test_compiled_step_skips_a_non_finite_batch(loss_scale):
    """A NaN in the batch: weights, optimizer slots and BatchNorm statistics
    stay as they were (under a LossScaleOptimizer the scale halves), and
    the next steps train."""
    x, y = regression_data(n=32)
    model = _mlp(dropout=0.0)
    optimizer = keras.optimizers.Adam(0.01)
    if loss_scale:
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
    sam = keras_sam.SAMModel(model, rho=0.1)
    sam.compile(optimizer=optimizer, loss="mse", jit_compile=True)
    sam.train_on_batch(x, y)
    before = [np.asarray(v) for v in model.variables + sam.optimizer.variables
              if not _loss_scale_state(v)]
    scale = float(sam.optimizer.dynamic_scale) if loss_scale else None
    bad = x.copy()
    bad[3, 1] = np.nan
    logs = sam.train_on_batch(bad, y, return_dict=True)
    assert np.isnan(logs["loss"])
    after = [np.asarray(v) for v in model.variables + sam.optimizer.variables
             if not _loss_scale_state(v)]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)
    if loss_scale:
        assert float(sam.optimizer.dynamic_scale) == scale / 2
    sam.train_on_batch(x, y)
    assert all(np.isfinite(w).all() for w in model.get_weights())
    assert any(not np.array_equal(a, np.asarray(b)) for a, b in
               zip(before, model.variables))


def _loss_scale_state(variable) -> bool:
    """A LossScaleOptimizer's own scale and finite-step counter."""
    return "dynamic_scale" in variable.path or \
        "step_counter" in variable.path
