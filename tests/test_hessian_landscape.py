"""keras_sam.analysis: Hessian eigenvalues and trace against closed forms
and the exact Hessian, loss landscapes, plots and the training callback."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam
import reference
from conftest import regression_data, tanh_mlp, weights64
from keras_sam.analysis import (filter_normalized_direction,
                                hessian_eigenvalues, hessian_trace,
                                loss_landscape, sharpness)


def _softmax_regression(d=4, c=3, n=60, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype("float32")
    y = rng.integers(0, c, size=n)
    keras.utils.set_random_seed(seed)
    model = keras.Sequential([keras.Input((d,)),
                              keras.layers.Dense(c, use_bias=False,
                                                 kernel_initializer="random_normal")])
    model.compile(loss=keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    return model, x, y


def _softmax_hessian(model, x):
    """H = mean_i (x_i x_i^T) kron (diag(p_i) - p_i p_i^T), for the kernel
    flattened row-major (input index first, class index second)."""
    w = np.asarray(model.trainable_variables[0], np.float64)
    logits = x.astype(np.float64) @ w
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    return np.mean([np.kron(np.outer(xi, xi), np.diag(pi) - np.outer(pi, pi))
                    for xi, pi in zip(x.astype(np.float64), p)], axis=0)


def test_eigenvalues_of_softmax_regression_match_the_closed_form():
    model, x, y = _softmax_regression()
    exact = np.linalg.eigh(_softmax_hessian(model, x))
    before = weights64(model)
    values, vectors = hessian_eigenvalues(model, x, y, k=3, batch_size=16,
                                          tol=1e-6,
                                          return_eigenvectors=True)
    np.testing.assert_allclose(values, exact[0][::-1][:3], rtol=1e-3)
    assert np.all(np.diff(values) <= 0)
    top = np.ravel(vectors[0][0])
    assert abs(top @ exact[1][:, -1]) / np.linalg.norm(top) > 0.999
    for a, b in zip(weights64(model), before):
        np.testing.assert_array_equal(a, b)


def _exact_hessian(model, x, y):
    """The full Hessian of the compiled loss by autodiff (a Jacobian of the
    gradient), float64 model."""
    variables = model.trainable_variables
    with tf.GradientTape(persistent=True) as outer:
        with tf.GradientTape() as inner:
            loss = model.compute_loss(x, y, model(x, training=False),
                                      training=False)
        grads = inner.gradient(loss, variables)
        flat = tf.concat([tf.reshape(g, [-1]) for g in grads], 0)
    rows = outer.jacobian(flat, variables, experimental_use_pfor=False)
    return np.concatenate([np.reshape(np.asarray(r), (flat.shape[0], -1))
                           for r in rows], axis=1)


@pytest.fixture
def float64():
    keras.config.set_floatx("float64")
    yield
    keras.config.set_floatx("float32")


@pytest.mark.tensorflow_only
def test_eigenvalues_match_the_exact_hessian_of_an_mlp(float64):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([
        keras.Input((3,)),
        keras.layers.Dense(4, activation="tanh"),
        keras.layers.Dense(2)])
    model.compile(loss="mse")
    x, y = regression_data(n=24, n_in=3, n_out=2, seed=2)
    x, y = x.astype("float64"), y.astype("float64")
    exact = np.linalg.eigvalsh(_exact_hessian(model, x, y))[::-1]
    assert exact[-1] < 0   # an indefinite Hessian: negative eigenvalues too
    got = hessian_eigenvalues(model, x, y, k=3, batch_size=24, tol=1e-8)
    np.testing.assert_allclose(got, exact[:3], rtol=1e-3)


class Quadratic(keras.layers.Layer):
    """Outputs 0.5 w^T A w for every example: the loss is that quadratic,
    whose Hessian is A."""

    def __init__(self, matrix, **kwargs):
        super().__init__(**kwargs)
        self.matrix = np.asarray(matrix, "float32")

    def build(self, input_shape):
        self.w = self.add_weight(shape=(len(self.matrix),),
                                 initializer="ones")

    def call(self, x):
        a = keras.ops.convert_to_tensor(self.matrix)
        value = 0.5 * keras.ops.sum(self.w * keras.ops.matmul(a, self.w))
        return keras.ops.zeros_like(x[:, :1]) + value


def _quadratic_model(eigenvalues, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(len(eigenvalues),) * 2))
    matrix = q @ np.diag(eigenvalues) @ q.T
    model = keras.Sequential([keras.Input((1,)), Quadratic(matrix)])
    model.compile(loss=lambda y_true, y_pred: keras.ops.mean(y_pred))
    return model, matrix


def test_quadratic_with_known_spectrum_including_negative_eigenvalues():
    spectrum = [5.0, 2.0, 0.5, -1.0, -3.0]
    model, _ = _quadratic_model(spectrum)
    x, y = np.zeros((8, 1), "float32"), np.zeros((8, 1), "float32")
    np.testing.assert_allclose(hessian_eigenvalues(model, x, y, k=3),
                               [5.0, 2.0, 0.5], rtol=1e-3)
    # k = all: every eigenvalue, the negative ones included, descending.
    np.testing.assert_allclose(hessian_eigenvalues(model, x, y, k=5),
                               sorted(spectrum, reverse=True), rtol=1e-3,
                               atol=1e-4)


def test_trace_within_its_standard_error_of_the_exact_trace():
    model, x, y = _softmax_regression(d=6, c=4, n=80)
    exact = np.trace(_softmax_hessian(model, x))
    before = weights64(model)
    estimate, error = hessian_trace(model, x, y, probes=200, seed=3)
    assert 0 < error < 0.2 * exact
    assert abs(estimate - exact) < 3 * error
    for a, b in zip(weights64(model), before):
        np.testing.assert_array_equal(a, b)


def test_a_dataset_streams_and_gives_the_same_eigenvalue():
    model, x, y = _softmax_regression()
    arrays = hessian_eigenvalues(model, x, y, tol=1e-6, batch_size=7)
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(13)
    streamed = hessian_eigenvalues(model, dataset, tol=1e-6)
    np.testing.assert_allclose(streamed, arrays, rtol=1e-5)


@pytest.mark.parametrize("call, match", [
    (lambda m, x, y: hessian_eigenvalues(m, x, y, k=0), "`k`"),
    (lambda m, x, y: hessian_eigenvalues(m, x, y, k=99), "exceeds"),
    (lambda m, x, y: hessian_eigenvalues(m, x, y, max_iter=0), "max_iter"),
    (lambda m, x, y: hessian_trace(m, x, y, probes=1), "probes"),
    (lambda m, x, y: loss_landscape(m, x, y, dims=3), "`dims`"),
    (lambda m, x, y: loss_landscape(m, x, y, resolution=1), "resolution"),
    (lambda m, x, y: hessian_eigenvalues(m, x[:0], y[:0]), "no examples"),
])
def test_bad_arguments_are_explained(call, match):
    model, x, y = _softmax_regression()
    with pytest.raises(ValueError, match=match):
        call(model, x, y)


def test_an_uncompiled_model_is_refused():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    x, y = regression_data(n=8, n_in=3, n_out=2)
    for fn in (hessian_eigenvalues, hessian_trace, loss_landscape):
        with pytest.raises(ValueError, match="compile"):
            fn(model, x, y)


# ------------------------------------------------------------ landscapes

def test_filter_normalization_matches_each_filter_norm():
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(3, 3, 2, 5)), rng.normal(size=(5,)),
               rng.normal(size=(7, 4))]
    kernel, bias, dense = filter_normalized_direction(weights, seed=1)
    np.testing.assert_allclose(
        np.linalg.norm(kernel.reshape(-1, 5), axis=0),
        np.linalg.norm(weights[0].reshape(-1, 5), axis=0), rtol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(dense, axis=0),
                               np.linalg.norm(weights[2], axis=0),
                               rtol=1e-12)
    np.testing.assert_array_equal(bias, 0.0)


def test_landscape_center_is_the_loss_at_w_and_weights_are_untouched():
    model = tanh_mlp(l2=0.01)
    model.compile(loss="mse")
    x, y = regression_data(n=40)
    before = weights64(model)
    want = reference.TanhMLP(l2=0.01).loss(before, x.astype(float),
                                           y.astype(float))
    curve = loss_landscape(model, x, y, resolution=11, batch_size=16)
    np.testing.assert_allclose(curve["losses"][5], want, rtol=1e-5)
    np.testing.assert_allclose(curve["center_loss"], want, rtol=1e-5)
    assert curve["losses"].max() > want       # the loss rises around w
    # A point along the direction, against the reference.
    d = curve["directions"][0]
    at = [p + 0.4 * di for p, di in zip(before, d)]
    np.testing.assert_allclose(
        curve["losses"][7], reference.TanhMLP(l2=0.01).loss(
            at, x.astype(float), y.astype(float)), rtol=1e-5)
    grid = loss_landscape(model, x, y, dims=2, resolution=5)
    assert grid["losses"].shape == (5, 5)
    np.testing.assert_allclose(grid["losses"][2, 2], want, rtol=1e-5)
    for a, b in zip(weights64(model), before):
        np.testing.assert_array_equal(a, b)


def test_landscape_toward_other_weights_ends_at_their_loss():
    x, y = regression_data(n=40)
    a, b = tanh_mlp(seed=1), tanh_mlp(seed=2)
    a.compile(loss="mse")
    b.compile(loss="mse")
    line = loss_landscape(a, x, y, toward=b, extent=0.5, resolution=9)
    np.testing.assert_allclose(line["alphas"][[2, 6]], [0.0, 1.0])
    np.testing.assert_allclose(line["losses"][2], a.evaluate(x, y, verbose=0),
                               rtol=1e-5)
    np.testing.assert_allclose(line["losses"][6], b.evaluate(x, y, verbose=0),
                               rtol=1e-5)
    with pytest.raises(ValueError, match="same architecture"):
        loss_landscape(a, x, y, toward=keras.Sequential(
            [keras.Input((5,)), keras.layers.Dense(3)]))


def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    model = tanh_mlp()
    model.compile(loss="mse")
    x, y = regression_data(n=16)
    curve = loss_landscape(model, x, y, resolution=5)
    fig = keras_sam.analysis.plot_landscape_1d({"a": curve, "b": curve},
                                               tmp_path / "one.png")
    assert (tmp_path / "one.png").stat().st_size > 1000 and fig.axes
    grid = loss_landscape(model, x, y, dims=2, resolution=4)
    for kind in ("contour", "surface"):
        keras_sam.analysis.plot_landscape_2d(grid, tmp_path / f"{kind}.png",
                                             kind=kind)
        assert (tmp_path / f"{kind}.png").stat().st_size > 1000


# ------------------------------------------------ adaptive sharpness

def test_adaptive_sharpness_matches_the_reference():
    rho, eta = 0.5, 0.01
    x, y = regression_data(n=16, seed=4)
    model = tanh_mlp(l2=0.01, seed=6)
    model.compile(loss="mse")
    params = weights64(model)
    net = reference.TanhMLP(l2=0.01)
    g = net.grad(params, x.astype(float), y.astype(float))
    e = reference.perturbation(g, params, rho, adaptive=True, eta=eta)
    want = net.loss([p + d for p, d in zip(params, e)], x.astype(float),
                    y.astype(float)) - net.loss(params, x.astype(float),
                                                y.astype(float))
    got = sharpness(model, x, y, rho=rho, batch_size=16, adaptive=True,
                    eta=eta)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_adaptive_sharpness_is_invariant_to_rescaling_a_relu_layer():
    x, y = regression_data(n=32, seed=5)

    def relu_net(scale):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((5,)),
                                  keras.layers.Dense(8, activation="relu"),
                                  keras.layers.Dense(3)])
        w1, b1, w2, b2 = model.get_weights()
        model.set_weights([w1 * scale, b1 * scale, w2 / scale, b2])
        model.compile(loss="mse")
        return model

    a, b = relu_net(1.0), relu_net(4.0)
    np.testing.assert_allclose(a.predict(x, verbose=0),
                               b.predict(x, verbose=0), rtol=1e-4, atol=1e-5)
    adaptive = [sharpness(m, x, y, rho=0.5, adaptive=True, eta=0.0)
                for m in (a, b)]
    plain = [sharpness(m, x, y, rho=0.05) for m in (a, b)]
    np.testing.assert_allclose(adaptive[0], adaptive[1], rtol=1e-3)
    assert abs(plain[0] - plain[1]) > 0.2 * abs(plain[0])


# ------------------------------------------------------------- callback

def test_monitor_puts_its_measurements_in_the_history():
    x, y = regression_data(n=64)
    sam = keras_sam.SAMModel(tanh_mlp(), rho=0.05)
    sam.compile(optimizer="sgd", loss="mse")
    monitor = keras_sam.callbacks.SharpnessMonitor(x[:32], y[:32], every=2,
                                                   trace_probes=5)
    history = sam.fit(x, y, epochs=4, verbose=0, callbacks=[monitor])
    logs = history.history
    before = weights64(sam.model)
    monitor.measure()
    for a, b in zip(weights64(sam.model), before):
        np.testing.assert_array_equal(a, b)
    # Measured after epochs 2 and 4; NaN after 1 and 3, so that loggers
    # that fix their columns at the first epoch (CSVLogger) have them.
    for key in ("eval_sharpness", "hessian_max_eigenvalue", "hessian_trace"):
        assert len(logs[key]) == 4
        assert np.isnan(logs[key][0]) and np.isnan(logs[key][2])
        assert np.isfinite(logs[key][1]) and np.isfinite(logs[key][3])
    assert logs["eval_sharpness"][1] > 0 and logs["eval_sharpness"][3] > 0
    # What it logged is the measurement at the final weights.
    top = hessian_eigenvalues(sam, x[:32], y[:32], max_iter=20, tol=1e-2)
    np.testing.assert_allclose(logs["hessian_max_eigenvalue"][-1], top[0],
                               rtol=1e-3)
    with pytest.raises(ValueError, match="every"):
        keras_sam.callbacks.SharpnessMonitor(x, y, every=0)
