"""SAMModel steps against the NumPy float64 reference in tests/reference.py."""

import keras
import numpy as np
import pytest

import keras_sam
import reference
from conftest import (dropout_bn_mlp, regression_data, tanh_mlp,
                      weights64)

OPTIMIZERS = {
    "sgd": (lambda: keras.optimizers.SGD(0.1),
            lambda: reference.SGD(0.1)),
    "sgd_momentum": (lambda: keras.optimizers.SGD(0.1, momentum=0.9),
                     lambda: reference.SGD(0.1, momentum=0.9)),
    "adam": (lambda: keras.optimizers.Adam(0.01),
             lambda: reference.Adam(0.01)),
}


def _batches(steps):
    return [regression_data(n=16, seed=10 + i) for i in range(steps)]


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_matches_float64_reference(name, steps):
    make_keras_opt, make_ref_opt = OPTIMIZERS[name]
    rho, l2 = 0.1, 0.01
    model = tanh_mlp(l2=l2)
    start = weights64(model)
    sam = keras_sam.SAMModel(model, rho=rho)
    sam.compile(optimizer=make_keras_opt(), loss="mse")
    batches = _batches(steps)
    logs = [sam.train_on_batch(x, y, return_dict=True) for x, y in batches]

    expected, sharpness = reference.sam_train(
        reference.TanhMLP(l2=l2), make_ref_opt(),
        start, [(x.astype(np.float64), y.astype(np.float64))
                for x, y in batches], rho)
    for got, want in zip(weights64(model), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The step moved the weights well beyond the tolerance.
    assert max(np.max(np.abs(a - b)) for a, b in zip(expected, start)) > 1e-3
    # Each step logs its own L(w + e) - L(w) (train_on_batch resets metrics).
    np.testing.assert_allclose([log["sharpness"] for log in logs], sharpness,
                               rtol=1e-4)


def test_sam_differs_from_base_step():
    """The second gradient is taken at w + e, not at w (an early TF port of
    SAM took both at w, which silently reduced it to the base optimizer)."""
    x, y = regression_data()
    base, sam_inner = tanh_mlp(seed=3), tanh_mlp(seed=3)
    base.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    sam = keras_sam.SAMModel(sam_inner, rho=0.5)
    sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    base.train_on_batch(x, y)
    sam.train_on_batch(x, y)
    diff = max(np.max(np.abs(a - b)) for a, b in
               zip(base.get_weights(), sam.get_weights()))
    assert diff > 1e-4


class _Counted(keras.layers.Layer):
    """The identity, counting the forward passes that run it (eagerly)."""

    calls = 0

    def call(self, x):
        type(self).calls += 1
        return x


@pytest.mark.backends("torch")
def test_rho_zero_takes_one_gradient_per_step():
    """A constant rho = 0 is the base step at its cost: one forward pass
    per step (e = 0, so g_sam = g); rho > 0 and a schedule take two."""
    x, y = regression_data(n=32)
    counts = {}
    for name, rho in (("zero", 0.0), ("sam", 0.05),
                      ("schedule", lambda t: 0.0 * t)):
        model = keras.Sequential([keras.Input((5,)), _Counted(),
                                  keras.layers.Dense(3)])
        sam = keras_sam.SAMModel(model, rho=rho)
        sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        sam.train_on_batch(x, y)   # builds
        _Counted.calls = 0
        sam.fit(x, y, batch_size=8, epochs=1, verbose=0)
        counts[name] = _Counted.calls
    assert counts == {"zero": 4, "sam": 8, "schedule": 8}


@pytest.mark.parametrize("optimizer", [
    lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1),
    lambda: keras.optimizers.RMSprop(0.01, clipnorm=0.5),
])
def test_rho_zero_is_the_base_optimizer_bit_for_bit(optimizer):
    """rho = 0 gives the same weights, slots and logs as the plain model,
    with Dropout and BatchNorm in the network."""
    x, y = regression_data(n=64)
    base = dropout_bn_mlp()
    sam = keras_sam.SAMModel(dropout_bn_mlp(), rho=0.0)
    # JAX: XLA fuses the jitted SAM step differently from Keras's (the last
    # bit may differ, see test_backends.py); the same ops run eagerly agree.
    jit = False if keras.backend.backend() == "jax" else "auto"
    for m in (base, sam):
        m.compile(optimizer=optimizer(), loss="mse", metrics=["mae"],
                  jit_compile=jit)
    hb = base.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    hs = sam.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    for a, b in zip(base.get_weights(), sam.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(base.optimizer.variables, sam.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # BatchNorm statistics and the dropout seed moved once per step, as in
    # the plain model.
    assert len(sam.non_trainable_variables) == 3
    for a, b in zip(base.non_trainable_variables,
                    sam.non_trainable_variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert hb.history["loss"] == hs.history["loss"]
    assert hb.history["mae"] == hs.history["mae"]
    assert hs.history["sharpness"] == [0.0, 0.0, 0.0]


def test_sharpness_log_is_perturbed_minus_clean_loss():
    rho = 0.2
    x, y = regression_data()
    model = tanh_mlp(l2=0.05, seed=4)
    w0 = [np.asarray(w) for w in model.get_weights()]
    sam = keras_sam.SAMModel(model, rho=rho)
    sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    logs = sam.train_on_batch(x, y, return_dict=True)

    # By hand: the losses from Keras's own forward pass, at w and at
    # w + rho g/||g||, with g from the float64 reference.
    probe = tanh_mlp(l2=0.05, seed=4)

    def keras_loss(weights):
        probe.set_weights([np.asarray(w, np.float32) for w in weights])
        mse = keras.ops.mean(keras.losses.mean_squared_error(y, probe(x)))
        return float(mse), float(mse + sum(probe.losses))

    clean, clean_total = keras_loss(w0)
    grads = reference.TanhMLP(l2=0.05).grad(
        [w.astype(np.float64) for w in w0], x.astype(np.float64),
        y.astype(np.float64))
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in grads))
    _, perturbed_total = keras_loss([w + rho * g / norm
                                     for w, g in zip(w0, grads)])
    assert clean > 0
    np.testing.assert_allclose(logs["loss"], clean_total, rtol=1e-6)
    np.testing.assert_allclose(logs["sharpness"],
                               perturbed_total - clean_total, rtol=1e-4)
    assert logs["sharpness"] > 0
