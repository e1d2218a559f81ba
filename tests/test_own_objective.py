"""SAMModel(model).fit trains what model.fit trains: the model's own
`compute_loss`, `compute_metrics`, `add_loss` and precision (the patterns
of Keras's own guides and docstrings), at rho = 0 bit for bit against the
model's fit, at rho > 0 against the float64 reference of its own loss."""

import keras
import numpy as np
import pytest
from keras import ops

import keras_sam
import reference
from conftest import regression_data, weights64

PENALTY = 3.0   # the own loss: compiled loss + PENALTY mean(y_pred^2)


@keras.saving.register_keras_serializable(package="keras_sam_tests")
class OwnLossMLP(keras.Sequential):
    """A model whose `compute_loss` adds a term to the compiled loss."""

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        loss = super().compute_loss(x, y, y_pred, sample_weight, training)
        return loss + PENALTY * ops.mean(ops.square(y_pred))


def own_loss_mlp(l2=0.0, seed=0):
    """conftest.tanh_mlp as an OwnLossMLP: reference.OwnLossTanhMLP."""
    keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(l2) if l2 else None
    return OwnLossMLP([
        keras.Input((5,)),
        keras.layers.Dense(7, activation="tanh", kernel_regularizer=reg,
                           bias_initializer="random_normal"),
        keras.layers.Dense(3, bias_initializer="random_normal"),
    ])


class TrackedLoss(keras.Model):
    """`keras.Model.compute_loss`'s docstring example: the loss and its
    tracker live in `compute_loss`; compiled with an optimizer only."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def compute_loss(self, x, y, y_pred, sample_weight, training=True):
        loss = ops.mean((y_pred - y) ** 2)
        if self.losses:
            loss += ops.sum(self.losses)
        self.loss_tracker.update_state(loss)
        return loss

    def reset_metrics(self):
        self.loss_tracker.reset_state()

    @property
    def metrics(self):
        return [self.loss_tracker]


def tracked_loss(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    return TrackedLoss(inputs, keras.layers.Dense(3)(inputs))


class LogitMagnitude(keras.Sequential):
    """A `compute_metrics` override that logs the mean |y_pred|."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.magnitude = keras.metrics.Mean(name="logit_magnitude")

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        logs = super().compute_metrics(x, y, y_pred, sample_weight)
        self.magnitude.update_state(ops.mean(ops.abs(y_pred)))
        logs["logit_magnitude"] = self.magnitude.result()
        return logs


def logit_magnitude(seed=0):
    keras.utils.set_random_seed(seed)
    return LogitMagnitude([keras.Input((5,)),
                           keras.layers.Dense(7, activation="tanh"),
                           keras.layers.Dense(3)])


def activity_loss(seed=0):
    """`add_loss` in a layer's call (Keras's activity regularization)."""
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    hidden = keras.layers.Dense(7, activation="tanh")(inputs)
    hidden = keras.layers.ActivityRegularization(l2=0.1)(hidden)
    return keras.Model(inputs, keras.layers.Dense(3)(hidden))


PATTERNS = {
    "compute_loss": (own_loss_mlp, dict(loss="mse", metrics=["mae"])),
    "loss tracker in compute_loss": (tracked_loss, {}),
    "compute_metrics": (logit_magnitude, dict(loss="mse")),
    "add_loss": (activity_loss, dict(loss="mse")),
}


@pytest.mark.parametrize("pattern", sorted(PATTERNS))
def test_rho_0_is_the_models_own_fit_bit_for_bit(pattern):
    build, arguments = PATTERNS[pattern]
    x, y = regression_data(n=48)
    own, wrapped = build(), build()
    own.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                **arguments)
    sam = keras_sam.SAMModel(wrapped, rho=0.0)
    sam.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                **arguments)
    expected = own.fit(x, y, batch_size=16, epochs=2, shuffle=False,
                       verbose=0).history
    got = sam.fit(x, y, batch_size=16, epochs=2, shuffle=False,
                  verbose=0).history
    assert sorted(got) == sorted([*expected, "sharpness"])
    for name, values in expected.items():
        assert got[name] == values, name
    for a, b in zip(wrapped.get_weights(), own.get_weights()):
        np.testing.assert_array_equal(a, b)
    # Evaluation reports the model's own logs too.
    assert sam.evaluate(x, y, verbose=0, return_dict=True) == \
        own.evaluate(x, y, verbose=0, return_dict=True)


@pytest.mark.parametrize("variant", ["sam", "jit_compile", "2 splits",
                                     "momentum"])
def test_own_loss_steps_match_the_float64_reference(variant):
    """Both passes (every chunk; Momentum-SAM's one pass) differentiate the
    model's own loss, regularization included."""
    rho, l2, lr = 0.1, 0.01, 0.1
    model = own_loss_mlp(l2=l2)
    start = weights64(model)
    options = {"2 splits": dict(num_batch_splits=2),
               "momentum": dict(direction="momentum")}.get(variant, {})
    momentum = 0.9 if variant == "momentum" else 0.0
    sam = keras_sam.SAMModel(model, rho=rho, **options)
    sam.compile(optimizer=keras.optimizers.SGD(lr, momentum=momentum),
                loss="mse", jit_compile=variant == "jit_compile")
    batches = [regression_data(n=16, seed=10 + i) for i in range(3)]
    logs = [sam.train_on_batch(x, y, return_dict=True) for x, y in batches]

    net = reference.OwnLossTanhMLP(PENALTY, l2=l2)
    batches64 = [(x.astype(np.float64), y.astype(np.float64))
                 for x, y in batches]
    optimizer = reference.SGD(lr, momentum=momentum)
    if variant == "momentum":
        expected, logged = reference.msam_train(net, optimizer, start,
                                                batches64, rho)
    else:
        expected, sharpness, _ = reference.variant_train(
            net, optimizer, start, batches64, rho,
            num_batch_splits=options.get("num_batch_splits", 1))
        np.testing.assert_allclose([log["sharpness"] for log in logs],
                                   sharpness, rtol=1e-4)
        # The logged loss is L(w) at the weights each step started from.
        splits = options.get("num_batch_splits", 1)
        logged = [net.loss(reference.variant_train(
            net, reference.SGD(lr), start, batches64[:t], rho,
            num_batch_splits=splits)[0] if t else start, *batches64[t])
            for t in range(len(batches64))]
    np.testing.assert_allclose([log["loss"] for log in logs], logged,
                               rtol=1e-5)
    for got, want in zip(weights64(model), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert max(np.max(np.abs(a - b)) for a, b in zip(expected, start)) > 1e-3


def test_a_loss_tracker_in_compute_loss_moves_once_per_step_from_pass_1():
    """The docstring example at rho = 0.5: the logged loss is L(w), and the
    tracker counted one update for the step, not two."""
    x, y = regression_data(n=16)
    model = tracked_loss()
    at_w = float(np.mean((np.asarray(model.predict(x, verbose=0)) - y) ** 2))
    sam = keras_sam.SAMModel(model, rho=0.5)
    sam.compile(optimizer=keras.optimizers.SGD(0.1))
    history = sam.fit(x, y, batch_size=16, epochs=1, verbose=0).history
    assert history["loss"][0] == pytest.approx(at_w, rel=1e-5)
    assert float(keras_sam._keras_compat.to_numpy(
        model.loss_tracker.count)) == 1.0
    assert history["sharpness"][0] > 1e-3   # pass 2 ran, at w + e


def test_the_optimizer_scales_the_loss_as_the_models_own_compile_would():
    """A mixed_float16 model wrapped while the global policy is float32
    gets a LossScaleOptimizer; a float32 model wrapped under a mixed global
    policy does not."""
    keras.mixed_precision.set_global_policy("mixed_float16")
    mixed = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    keras.mixed_precision.set_global_policy("float32")
    single = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    x, y = regression_data()
    for model, scaled in ((mixed, True), (single, False)):
        model.compile(optimizer="sgd", loss="mse")   # the model's own
        own = type(model.optimizer)
        keras.mixed_precision.set_global_policy(
            "float32" if scaled else "mixed_float16")
        with pytest.warns(UserWarning, match="is compiled"):
            sam = keras_sam.SAMModel(model)
        sam.compile(optimizer="sgd", loss="mse")
        keras.mixed_precision.set_global_policy("float32")
        assert type(sam.optimizer) is own
        assert isinstance(sam.optimizer,
                          keras.optimizers.LossScaleOptimizer) == scaled
        assert sam.dtype_policy.name == model.dtype_policy.name
        history = sam.fit(x, y, epochs=2, verbose=0).history
        assert np.all(np.isfinite(history["loss"]))


def test_an_own_loss_model_saves_and_resumes_with_its_objective(tmp_path):
    x, y = regression_data(n=32)
    sam = keras_sam.SAMModel(own_loss_mlp(), rho=0.1)
    sam.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse",
                metrics=["mae"])
    sam.fit(x, y, batch_size=16, epochs=1, verbose=0)
    path = str(tmp_path / "own.keras")
    sam.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.model, OwnLossMLP)
    assert loaded.model.compiled and loaded.model.loss == "mse"
    for model in (sam, loaded):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(loaded.get_weights(), sam.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert loaded.evaluate(x, y, verbose=0, return_dict=True) == \
        pytest.approx(sam.evaluate(x, y, verbose=0, return_dict=True))
    # The wrapped model holds the objective: it evaluates alone.
    assert sam.model.evaluate(x, y, verbose=0, return_dict=True) == \
        pytest.approx(sam.evaluate(x, y, verbose=0, return_dict=True))


def test_compile_takes_kerass_positional_arguments():
    sam = keras_sam.SAMModel(own_loss_mlp())
    sam.compile("sgd", "mse", None, ["mae"])
    assert sam.model.loss == "mse" and sam.optimizer.name == "SGD".lower()
    with pytest.raises(TypeError, match="multiple values for 'loss'"):
        sam.compile("sgd", "mse", loss="mae")
