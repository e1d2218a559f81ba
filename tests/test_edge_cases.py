"""Bad arguments, missing gradients, zero and non-finite gradients."""

import keras
import numpy as np
import pytest

import keras_sam
import reference
from conftest import bn_mlp, regression_data, tanh_mlp, weights64


@pytest.mark.parametrize("rho, error", [
    (-0.1, ValueError),
    (float("nan"), ValueError),
    (float("inf"), ValueError),
    ("0.05", TypeError),
    (True, TypeError),
    (None, TypeError),
    ([0.05], TypeError),
])
def test_bad_rho_is_rejected_at_construction(rho, error):
    model = tanh_mlp()
    before = model.get_weights()
    with pytest.raises(error, match="rho"):
        keras_sam.SAMModel(model, rho=rho)
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_sync_perturbation_must_be_a_bool(value):
    with pytest.raises(TypeError, match="sync_perturbation"):
        keras_sam.SAMModel(tanh_mlp(), sync_perturbation=value)


@pytest.mark.parametrize("rho", [0, 0.05, np.float32(0.1), np.int64(1)])
def test_rho_accepts_real_numbers(rho):
    sam = keras_sam.SAMModel(tanh_mlp(), rho=rho)
    assert isinstance(sam.rho, float) and sam.rho == float(rho)


@pytest.mark.parametrize("not_a_model", [
    keras.layers.Dense(3), lambda x: x, "model", None,
])
def test_wrapping_a_non_model_raises_type_error(not_a_model):
    with pytest.raises(TypeError, match="`model` must be a `keras.Model`"):
        keras_sam.SAMModel(not_a_model)


def test_model_without_trainable_variables_says_what_to_do():
    model = tanh_mlp()
    model.trainable = False
    sam = keras_sam.SAMModel(model)
    sam.compile(optimizer="sgd", loss="mse")
    x, y = regression_data()
    with pytest.raises(ValueError, match="no trainable variables"):
        sam.train_on_batch(x, y)


class WithUnusedBranch(keras.Model):
    """The TanhMLP plus a Dense layer that never touches the loss."""

    def __init__(self, mlp):
        super().__init__()
        self.mlp = mlp
        self.unused = keras.layers.Dense(4)
        self.unused.build((None, 5))

    def call(self, x, training=None):
        return self.mlp(x, training=training)


def test_variables_without_gradient_are_skipped():
    rho, l2 = 0.1, 0.01
    mlp = tanh_mlp(l2=l2, seed=2)
    model = WithUnusedBranch(mlp)
    start_mlp = weights64(mlp)
    start_unused = [np.asarray(w) for w in model.unused.get_weights()]
    sam = keras_sam.SAMModel(model, rho=rho)
    sam.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                loss="mse")
    batches = [regression_data(n=16, seed=s) for s in (1, 2)]
    for x, y in batches:
        sam.train_on_batch(x, y)
    expected, _ = reference.sam_train(
        reference.TanhMLP(l2=l2), reference.SGD(0.1, momentum=0.9),
        start_mlp, [(x.astype(float), y.astype(float)) for x, y in batches],
        rho)
    # The norm of g covers only the variables on the loss path.
    for got, want in zip(weights64(mlp), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(model.unused.get_weights(), start_unused):
        np.testing.assert_array_equal(got, want)


class UnknownWidth(keras.layers.Layer):
    """The identity, whose output's static width TensorFlow's graph loses:
    the next kernel's gradient then has static shape (None, units), and
    w + e for a (1, units) kernel broadcasts to (None, units)."""

    def call(self, x):
        import tensorflow as tf

        # A width that depends on the data, which shape inference cannot
        # fold (x has no NaN: the whole width).
        nan = tf.cast(tf.reduce_any(tf.math.is_nan(x)), "int32")
        return x[:, :tf.shape(x)[1] - nan]

    def compute_output_shape(self, input_shape):
        return input_shape


@pytest.mark.tensorflow_only
def test_a_gradient_without_static_shape_is_perturbed():
    # Gemma3n's LAuReL kernel, (1, 8), gets a (None, 8) gradient: w + e
    # must keep w's shape for the second pass's scope.
    rho = 0.1
    mlp = tanh_mlp(n_in=1, seed=3)
    start = weights64(mlp)
    model = keras.Sequential([keras.Input((1,)), UnknownWidth(), *mlp.layers])
    sam = keras_sam.SAMModel(model, rho=rho)
    sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = regression_data(n=16, n_in=1, seed=1)
    sam.train_on_batch(x, y)
    expected, _ = reference.sam_train(
        reference.TanhMLP(), reference.SGD(0.1), start,
        [(x.astype(float), y.astype(float))], rho)
    for got, want in zip(weights64(mlp), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_all_zero_gradient_gives_no_perturbation_and_no_nan():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)),
                              keras.layers.Dense(2, use_bias=False)])
    start = model.get_weights()
    sam = keras_sam.SAMModel(model, rho=0.05)
    sam.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                loss="mse")
    x = np.zeros((8, 4), "float32")  # dL/dW = x^T (...) = 0 exactly
    y = np.ones((8, 2), "float32")
    for _ in range(3):
        logs = sam.train_on_batch(x, y, return_dict=True)
    np.testing.assert_array_equal(model.get_weights()[0], start[0])
    assert logs["sharpness"] == 0.0
    np.testing.assert_allclose(logs["loss"], 1.0)
    assert int(sam.optimizer.iterations) == 3


@pytest.mark.parametrize("rho", [0.05, 0.0])
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_non_finite_gradient_skips_the_step(optimizer, rho):
    """Weights and the optimizer's state as before the step; at rho = 0
    (Keras's own step on TensorFlow) the step is rolled back."""
    model = tanh_mlp(seed=5)
    sam = keras_sam.SAMModel(model, rho=rho)
    sam.compile(optimizer=optimizer, loss="mse")
    x, y = regression_data()
    sam.train_on_batch(x, y)
    weights = model.get_weights()
    slots = [np.asarray(v) for v in sam.optimizer.variables]
    bad = x.copy()
    bad[3, 1] = np.nan
    logs = sam.train_on_batch(bad, y, return_dict=True)
    assert np.isnan(logs["loss"])  # reported, as Keras reports it
    assert logs["sharpness"] == 0.0  # a skipped step adds no sharpness
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(slots, sam.optimizer.variables):
        np.testing.assert_array_equal(a, np.asarray(b))
    # Training goes on from the same weights.
    logs = sam.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"]) and int(sam.optimizer.iterations) == 2
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("rho", [0.05, 0.0])
def test_a_skipped_step_keeps_the_batchnorm_statistics(rho, scaled):
    """A NaN in the batch: pass 1 computed NaN batch statistics, and the
    skipped step leaves the moving ones (and every other variable) as they
    were, so the model still predicts; with a LossScaleOptimizer too."""
    sam = keras_sam.SAMModel(bn_mlp(seed=3), rho=rho)
    optimizer = keras.optimizers.SGD(0.01)
    sam.compile(optimizer=keras.optimizers.LossScaleOptimizer(optimizer)
                if scaled else optimizer, loss="mse")
    x, y = regression_data()
    sam.fit(x, y, batch_size=8, epochs=1, verbose=0)
    before = [np.array(v) for v in sam.model.weights]
    bad = x[:8].copy()
    bad[0, 0] = np.nan
    sam.train_on_batch(bad, y[:8])
    for a, v in zip(before, sam.model.weights):
        np.testing.assert_array_equal(a, np.array(v), err_msg=v.path)
    assert np.all(np.isfinite(sam.predict(x, verbose=0)))


def test_an_unsupported_backend_gets_a_clear_error(monkeypatch):
    """TensorFlow, JAX and PyTorch are supported; elsewhere (Keras's NumPy
    backend, which cannot train) construction says so."""
    model = tanh_mlp()
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    with pytest.raises(NotImplementedError,
                       match="'numpy'.*KERAS_BACKEND"):
        keras_sam.SAMModel(model)
