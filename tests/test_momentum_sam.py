"""Momentum-SAM (`direction="momentum"`) against the float64 reference, its
invariants, its errors, and its place in the training loop."""

import keras
import numpy as np
import pytest

import keras_sam
import reference
from conftest import (dropout_bn_mlp, regression_data, tanh_mlp,
                      weights64)

OPTIMIZERS = {
    "sgd_momentum": (lambda: keras.optimizers.SGD(0.1, momentum=0.9),
                     lambda: reference.SGD(0.1, momentum=0.9)),
    "nesterov": (lambda: keras.optimizers.SGD(0.1, momentum=0.9,
                                              nesterov=True),
                 lambda: reference.SGD(0.1, momentum=0.9, nesterov=True)),
    "adam": (lambda: keras.optimizers.Adam(0.02),
             lambda: reference.Adam(0.02)),
}


def _batches(steps, seed=50):
    return [regression_data(n=16, seed=seed + i) for i in range(steps)]


def _f64(batches):
    return [(x.astype(np.float64), y.astype(np.float64)) for x, y in batches]


def _train(optimizer, steps=4, rho=1.0, **kwargs):
    model = tanh_mlp(l2=0.01, seed=3)
    start = weights64(model)
    sam = keras_sam.SAMModel(model, rho=rho, direction="momentum", **kwargs)
    sam.compile(optimizer=optimizer, loss="mse")
    batches = _batches(steps)
    logs = [sam.train_on_batch(x, y, return_dict=True) for x, y in batches]
    return sam, start, batches, logs


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_matches_float64_reference(name):
    make_keras, make_ref = OPTIMIZERS[name]
    sam, start, batches, logs = _train(make_keras())
    want, losses = reference.msam_train(
        reference.TanhMLP(l2=0.01), make_ref(), start, _f64(batches), 1.0)
    for got, ref in zip(weights64(sam.model), want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # `loss` is L(w + e), the loss the step's one gradient was taken of;
    # there is no sharpness (L(w) is never evaluated).
    np.testing.assert_allclose([log["loss"] for log in logs], losses,
                               rtol=1e-5)
    assert all("sharpness" not in log for log in logs)


@pytest.mark.parametrize("kwargs,ref_kwargs", [
    (dict(adaptive=True, eta=0.05), dict(adaptive=True, eta=0.05)),
    (dict(p=3.0), dict(p=3.0)),
    (dict(p=float("inf"), rho=0.01), dict(p=float("inf"))),
    (dict(perturb=lambda v: len(v.shape) > 1),
     dict(mask=[True, False, True, False])),
], ids=["adaptive", "p3", "pinf", "perturb"])
def test_ball_and_selection_match_the_reference(kwargs, ref_kwargs):
    rho = kwargs.pop("rho", 1.0)
    sam, start, batches, _ = _train(keras.optimizers.SGD(0.1, momentum=0.9),
                                    rho=rho, **kwargs)
    want, _ = reference.msam_train(
        reference.TanhMLP(l2=0.01), reference.SGD(0.1, momentum=0.9), start,
        _f64(batches), rho, **ref_kwargs)
    for got, ref in zip(weights64(sam.model), want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_a_rho_schedule_is_read_at_each_iteration():
    schedule = keras.optimizers.schedules.PiecewiseConstantDecay(
        [1, 2], [0.5, 2.0, 1.0])
    sam, start, batches, _ = _train(keras.optimizers.Adam(0.02),
                                    rho=schedule)
    want, _ = reference.msam_train(
        reference.TanhMLP(l2=0.01), reference.Adam(0.02), start,
        _f64(batches), lambda t: 0.5 if t <= 1 else (2.0 if t <= 2 else 1.0))
    for got, ref in zip(weights64(sam.model), want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_msam_differs_from_the_base_optimizer_and_from_sam():
    def weights(**kwargs):
        sam, *_ = _train(keras.optimizers.SGD(0.1, momentum=0.9), **kwargs)
        return weights64(sam.model)

    msam, base = weights(), weights(rho=0.0)
    sam = keras_sam.SAMModel(tanh_mlp(l2=0.01, seed=3), rho=1.0)
    sam.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                loss="mse")
    for x, y in _batches(4):
        sam.train_on_batch(x, y)
    for other in (base, weights64(sam.model)):
        assert max(np.max(np.abs(a - b)) for a, b in zip(msam, other)) > 1e-4


@pytest.mark.parametrize("name", ["sgd_momentum", "adam"])
def test_rho_zero_and_the_first_step_are_the_base_optimizer(name):
    """rho = 0 is the base optimizer; so is the first step at any rho
    (the momentum is still zero), with Dropout and BatchNorm in the net."""
    make_keras, _ = OPTIMIZERS[name]

    x, y = regression_data(n=64)
    jit = False if keras.backend.backend() == "jax" else "auto"
    for rho, epochs, batch in ((0.0, 3, 16), (5.0, 1, 64)):
        base = dropout_bn_mlp()
        msam = keras_sam.SAMModel(dropout_bn_mlp(), rho=rho,
                                  direction="momentum")
        for m in (base, msam):
            m.compile(optimizer=make_keras(), loss="mse", jit_compile=jit)
            m.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False,
                  verbose=0)
        for a, b in zip(base.get_weights(), msam.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
        for a, b in zip(base.optimizer.variables, msam.optimizer.variables):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                       rtol=1e-6, atol=1e-7)


def test_a_non_finite_gradient_skips_the_step():
    sam, *_ = _train(keras.optimizers.SGD(0.1, momentum=0.9), steps=2)
    weights = sam.model.get_weights()
    slots = [np.asarray(v) for v in sam.optimizer.variables]
    x, y = regression_data(n=16)
    x[2, 0] = np.nan
    logs = sam.train_on_batch(x, y, return_dict=True)
    assert not np.isfinite(logs["loss"])
    for a, b in zip(weights, sam.model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(slots, sam.optimizer.variables):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_mixed_float16_overflow_skips_the_step_and_lowers_the_scale():
    keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(8, activation="tanh"),
        keras.layers.Dense(3, dtype="float32")])
    sam = keras_sam.SAMModel(model, rho=1.0, direction="momentum")
    sam.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    assert isinstance(sam.optimizer, keras.optimizers.LossScaleOptimizer)
    x, y = regression_data()
    for _ in range(2):
        sam.train_on_batch(x, y)
    weights = model.get_weights()
    slots = [np.asarray(v) for v in sam.optimizer.inner_optimizer.variables]
    sam.optimizer.dynamic_scale.assign(1e30)   # overflows the backward pass
    sam.train_on_batch(x, y)
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(slots, sam.optimizer.inner_optimizer.variables):
        np.testing.assert_array_equal(a, np.asarray(b))
    np.testing.assert_allclose(float(sam.optimizer.dynamic_scale), 5e29,
                               rtol=1e-6)
    history = sam.fit(x, y, batch_size=8, epochs=30, verbose=0)
    assert np.isfinite(history.history["loss"][-1])


def test_save_and_load_mid_training_resumes_identically(tmp_path):
    """The momentum, hence e, is optimizer state: saved and restored."""
    sam, _, _, _ = _train(keras.optimizers.Adam(0.02), steps=3)
    path = str(tmp_path / "msam.keras")
    sam.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.options.direction == "momentum"
    for x, y in _batches(3, seed=90):
        sam.train_on_batch(x, y)
        loaded.train_on_batch(x, y)
    for a, b in zip(sam.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kwargs", [
    dict(sam_every=2), dict(gsam_alpha=0.1),
    dict(sam_every=3, looksam_alpha=0.5), dict(num_batch_splits=2)])
def test_two_gradient_variants_are_refused_at_construction(kwargs):
    name = sorted(kwargs)[-1] if "looksam_alpha" not in kwargs else \
        "looksam_alpha"
    with pytest.raises(ValueError, match=f"{name}=.*no meaning"):
        keras_sam.SAMModel(tanh_mlp(), rho=1.0, direction="momentum",
                           **kwargs)


def test_a_bad_direction_is_refused():
    with pytest.raises(ValueError, match="'gradient'.*'momentum'.*'adam'"):
        keras_sam.SAMModel(tanh_mlp(), direction="adam")


@pytest.mark.parametrize("optimizer,what", [
    ("sgd", "SGD without momentum"), ("rmsprop", "RMSprop"),
    (keras.optimizers.Adagrad(), "Adagrad")])
def test_an_optimizer_without_a_first_moment_is_refused_at_compile(
        optimizer, what):
    model = tanh_mlp()
    before = weights64(model)
    sam = keras_sam.SAMModel(model, rho=1.0, direction="momentum")
    with pytest.raises(ValueError, match=f"{what} keeps none.*SGD\\(momentum"
                                         ".*Adam"):
        sam.compile(optimizer=optimizer, loss="mse")
    for a, b in zip(before, weights64(model)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("optimizer", [
    keras.optimizers.AdamW(0.01, weight_decay=0.01), keras.optimizers.Nadam(),
    keras.optimizers.Adamax(), keras.optimizers.Lion(1e-3)])
def test_every_optimizer_with_a_first_moment_trains(optimizer):
    model = tanh_mlp()
    sam = keras_sam.SAMModel(model, rho=1.0, direction="momentum")
    sam.compile(optimizer=optimizer, loss="mse")
    x, y = regression_data(n=64)
    history = sam.fit(x, y, batch_size=16, epochs=3, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert history.history["loss"][-1] < history.history["loss"][0]


def test_config_round_trip_keeps_the_direction():
    sam = keras_sam.SAMModel(tanh_mlp(), rho=2.0, direction="momentum")
    config = sam.get_config()
    assert config["direction"] == "momentum"
    again = keras_sam.SAMModel.from_config(config)
    assert again.options.direction == "momentum" and again.rho == 2.0
