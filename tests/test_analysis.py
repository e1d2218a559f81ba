"""keras_sam.analysis.sharpness against the NumPy float64 reference."""

import numpy as np
import pytest

import keras_sam
import reference
from conftest import regression_data, tanh_mlp, weights64
from keras_sam.analysis import sharpness


def _pga_sharpness(net, params, x, y, rho, steps):
    """max_{||e|| <= rho} L(w + e) - L(w) by projected normalized ascent."""
    e = [np.zeros_like(p) for p in params]
    for _ in range(steps):
        g = net.grad([p + d for p, d in zip(params, e)], x, y)
        norm = np.sqrt(sum(np.sum(gi**2) for gi in g))
        e = [d + (rho / steps) * gi / norm for d, gi in zip(e, g)]
        e_norm = np.sqrt(sum(np.sum(d**2) for d in e))
        e = [d * min(1.0, rho / e_norm) for d in e]
    return net.loss([p + d for p, d in zip(params, e)], x, y) - \
        net.loss(params, x, y)


@pytest.mark.parametrize("steps", [1, 4])
def test_sharpness_matches_reference(steps):
    rho, l2 = 0.3, 0.01
    x, y = regression_data(n=48, seed=3)
    model = tanh_mlp(l2=l2, seed=6)
    model.compile(loss="mse")
    params = weights64(model)
    net = reference.TanhMLP(l2=l2)
    got = sharpness(model, x, y, rho=rho, batch_size=16, ascent_steps=steps)
    want = np.mean([
        _pga_sharpness(net, params, x[i:i + 16].astype(float),
                       y[i:i + 16].astype(float), rho, steps)
        for i in (0, 16, 32)])
    np.testing.assert_allclose(got, want, rtol=1e-4)
    assert got > 0
    # Weights untouched.
    for a, b in zip(weights64(model), params):
        np.testing.assert_array_equal(a, b)


def test_sharpness_of_sam_model_equals_that_of_the_wrapped_model():
    x, y = regression_data()
    model = tanh_mlp()
    model.compile(loss="mse")
    with pytest.warns(UserWarning, match="'sequential' is compiled"):
        sam = keras_sam.SAMModel(model)
    sam.compile(optimizer="sgd", loss="mse")
    assert sharpness(sam, x, y, rho=0.1) == pytest.approx(
        sharpness(model, x, y, rho=0.1), rel=1e-6)


def test_sharpness_grows_with_rho_and_is_zero_at_zero():
    x, y = regression_data()
    model = tanh_mlp()
    model.compile(loss="mse")
    values = [sharpness(model, x, y, rho=r) for r in (0.0, 0.05, 0.2)]
    assert values[0] == 0.0
    assert 0 < values[1] < values[2]


@pytest.mark.parametrize("kwargs, match", [
    ({"rho": -1.0}, "rho"),
    ({"batch_size": 0}, "batch_size"),
    ({"ascent_steps": 0}, "ascent_steps"),
])
def test_bad_arguments(kwargs, match):
    x, y = regression_data()
    model = tanh_mlp()
    model.compile(loss="mse")
    with pytest.raises((TypeError, ValueError), match=match):
        sharpness(model, x, y, **kwargs)


def test_uncompiled_model_is_rejected():
    x, y = regression_data()
    with pytest.raises(ValueError, match="compiled"):
        sharpness(tanh_mlp(), x, y)


@pytest.mark.tensorflow_only
def test_measuring_every_epoch_traces_once_per_model_and_logs_no_retracing(
        caplog):
    """A SharpnessMonitor measures every epoch, on several models in one
    process: each model's functions are traced about twice (one batch
    shape, then any), reused across measurements, and TensorFlow logs no
    "excessive retracing" warning."""
    import logging

    import keras

    from keras_sam.analysis import _data

    x, y = regression_data(n=96)
    caplog.set_level(logging.WARNING, logger="tensorflow")
    for seed in range(3):
        sam = keras_sam.SAMModel(tanh_mlp(seed=seed), rho=0.05)
        sam.compile(optimizer="sgd", loss="mse")
        monitor = keras_sam.callbacks.SharpnessMonitor(x[:32], y[:32],
                                                       trace_probes=2)
        sam.fit(x, y, epochs=2, batch_size=32, verbose=0,
                callbacks=[monitor])
        sharpness(sam, x, y, batch_size=40)    # another batch shape
        functions = _data.functions(sam)
        assert functions is _data.functions(sam)
        for name in ("loss", "gradient", "hvp"):
            assert getattr(functions, name).experimental_get_tracing_count() \
                <= 2, name
    sam.model.layers[0].trainable = False   # other variables: new functions
    assert _data.functions(sam) is not functions
    assert not [r for r in caplog.records if "retracing" in r.getMessage()]
    keras.backend.clear_session()
