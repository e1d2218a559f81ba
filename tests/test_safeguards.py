"""Nothing silently wrong, nothing half-loaded: the mistakes a new user
makes that used to pass without a word."""

import csv
import warnings

import keras
import numpy as np
import pytest

import keras_sam
from conftest import bn_mlp, regression_data, tanh_mlp, weights64


def _values(model):
    return [np.array(v) for v in model.weights]


def _other_architecture(path):
    """A weights file whose first layer fits bn_mlp and whose rest does not:
    a loader that writes as it goes changes the first layer, then fails."""
    keras.utils.set_random_seed(9)
    other = keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(7), keras.layers.Dense(3)], name="net")
    other.save_weights(path)
    return other


# ------------------------------------------------------ half-loaded weights

@pytest.mark.parametrize("layout", ["sam", "plain"])
def test_a_failed_load_leaves_every_variable_as_it_was(tmp_path, layout):
    path = str(tmp_path / "other.weights.h5")
    if layout == "plain":
        _other_architecture(path)
    else:   # a SAMModel's weights file of another architecture
        keras.utils.set_random_seed(9)
        other = keras_sam.SAMModel(keras.Sequential([
            keras.Input((5,)), keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(7), keras.layers.Dense(3)], name="net"))
        other.save_weights(path)
    sam = keras_sam.SAMModel(bn_mlp(seed=1), rho=0.1)
    sam.compile(optimizer="adam", loss="mse")
    x, y = regression_data()
    sam.train_on_batch(x, y)   # optimizer state exists too
    before = _values(sam) + [np.array(v) for v in sam.optimizer.variables]
    with pytest.raises(ValueError, match="(?s)do not fit this model.*has"):
        sam.load_weights(path)
    after = _values(sam) + [np.array(v) for v in sam.optimizer.variables]
    for a, b in zip(before, after):
        np.testing.assert_array_equal(a, b)


def test_load_weights_for_any_model_is_all_or_nothing(tmp_path):
    """A plain model loading a file (SAM-format here) of another
    architecture: `keras_sam.load_weights` changes nothing and lists both
    sides."""
    path = str(tmp_path / "other.weights.h5")
    keras.utils.set_random_seed(9)
    keras_sam.SAMModel(keras.Sequential([
        keras.Input((5,)), keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(7), keras.layers.Dense(3)], name="net")
    ).save_weights(path)
    plain = bn_mlp(seed=1)
    before = _values(plain)
    with pytest.raises(ValueError, match="do not fit this model"):
        keras_sam.load_weights(plain, path)
    for a, b in zip(before, _values(plain)):
        np.testing.assert_array_equal(a, b)
    # A file that fits loads.
    fits = str(tmp_path / "fits.weights.h5")
    keras_sam.SAMModel(bn_mlp(seed=4)).save_weights(fits)
    keras_sam.load_weights(plain, fits)
    for a, b in zip(_values(plain), _values(bn_mlp(seed=4))):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------- a rho schedule gone bad

def test_a_schedule_bad_at_the_first_iteration_fails_at_construction():
    with pytest.raises(ValueError, match="returned -0.1 at iteration 0"):
        keras_sam.SAMModel(tanh_mlp(), rho=lambda t: -0.1 + 0.0 * t)
    with pytest.raises(ValueError, match="nan at iteration 0"):
        keras_sam.SAMModel(tanh_mlp(), rho=lambda t: float("nan"))


def _goes_negative(t):
    """0.1 for two steps, then negative."""
    t = keras.ops.cast(t, "float32")
    return keras.ops.where(t < 2.0, 0.1, -0.5)


def test_a_schedule_that_goes_bad_later_never_trains_silently():
    """TensorFlow stops with the iteration and the value; JAX and PyTorch
    skip the bad steps (the weights stay) and warn after the epoch."""
    x, y = regression_data(n=64)
    model = tanh_mlp()
    sam = keras_sam.SAMModel(model, rho=_goes_negative)
    sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    sam.fit(x[:32], y[:32], batch_size=16, verbose=0)   # iterations 0, 1
    before = weights64(model)
    if keras.backend.backend() == "tensorflow":
        with pytest.raises(Exception, match="iteration.*2.*-0.5"):
            sam.fit(x[:16], y[:16], batch_size=16, verbose=0)
        for a, b in zip(before, weights64(model)):
            np.testing.assert_array_equal(a, b)
        return
    with pytest.warns(UserWarning, match=r"returned -0.5 at iteration 2.*"
                                         "skipped"):
        sam.fit(x, y, batch_size=16, verbose=0)
    for a, b in zip(before, weights64(model)):
        np.testing.assert_array_equal(a, b)
    assert int(sam.optimizer.iterations) == 2   # no step was applied


def _python_only(t):
    """A schedule a user writes first: Python control flow on the step."""
    return 0.05 if t < 2 else 0.0


def test_a_python_only_schedule_is_refused_before_any_weight_changes():
    """TensorFlow and JAX trace the step, where `if t < 2` cannot run: a
    TypeError says how to write the schedule, and every variable (JAX's
    fit included, which holds them as values while it trains) is as it
    was. PyTorch runs the step eagerly, where the schedule works as
    written and trains."""
    x, y = regression_data(n=48)
    model = tanh_mlp()
    sam = keras_sam.SAMModel(model, rho=_python_only)
    sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = weights64(model)
    if keras.backend.backend() == "torch":
        sam.fit(x, y, batch_size=16, verbose=0)
        after = weights64(model)
        assert all(np.isfinite(w).all() for w in after)
        assert any(not np.array_equal(a, b) for a, b in zip(before, after))
        assert int(keras_sam._keras_compat.to_numpy(
            sam.optimizer.iterations)) == 3
        return
    with pytest.raises(TypeError, match=r"(?s)iteration as a scalar integer "
                       r"tensor.*keras\.ops.*No weight was changed"):
        sam.fit(x, y, batch_size=16, verbose=0)
    for a, b in zip(before, weights64(model)):
        np.testing.assert_array_equal(a, b)
    assert int(keras_sam._keras_compat.to_numpy(sam.optimizer.iterations)) == 0


def test_momentum_sam_left_at_the_default_rho_with_sgd_says_so():
    """At rho = 0.05 Momentum-SAM with SGD + momentum trains like SGD:
    left at the default with SGD, `compile` warns (once, at the user's
    line); a rho the user wrote, even 0.05, or an Adam-like optimizer
    (where a large rho can stall a Transformer), gives no warning."""
    def compiled(optimizer, **kwargs):
        sam = keras_sam.SAMModel(tanh_mlp(), direction="momentum", **kwargs)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sam.compile(optimizer=optimizer, loss="mse")
        return [w for w in caught if "Momentum-SAM" in str(w.message)]

    sgd = lambda: keras.optimizers.SGD(0.05, momentum=0.9)  # noqa: E731
    (warning,) = compiled(sgd())
    assert "rho=1.0" in str(warning.message)
    assert warning.filename == __file__
    assert compiled(sgd(), rho=0.05) == []
    assert compiled(sgd(), rho=1.0) == []
    assert compiled(keras.optimizers.Adam()) == []
    assert compiled(keras.optimizers.AdamW()) == []


# ---------------------------------------------- training that bypasses SAM

def _ours(caught, text):
    """The one warning in `caught` whose message holds `text`."""
    (warning,) = [w for w in caught if text in str(w.message)]
    return warning


def test_a_wrapped_model_with_its_own_train_step_is_refused():
    """SAM's step cannot run another step's logic (several optimizers, a
    GAN): such a model is refused before anything is built, with the way
    that does work (the loss in `compute_loss`)."""
    class Custom(keras.Model):
        def train_step(self, *args):
            return super().train_step(*args)

    inputs = keras.Input((5,))
    custom = Custom(inputs, keras.layers.Dense(3)(inputs), name="custom")
    weights = [w.copy() for w in custom.get_weights()]
    with pytest.raises(TypeError, match="'custom'.*own `train_step`.*"
                                        "`compute_loss"):
        keras_sam.SAMModel(custom)
    for before, after in zip(weights, custom.get_weights()):
        np.testing.assert_array_equal(before, after)


def test_a_wrapped_model_with_its_own_fit_is_refused():
    """`SAMModel(model).fit` is Keras's fit: another `fit` (KerasHub's
    inference-only tasks raise there) would be skipped, so it is refused."""
    class Custom(keras.Model):
        def fit(self, *args, **kwargs):
            raise NotImplementedError("inference only")

    inputs = keras.Input((5,))
    custom = Custom(inputs, keras.layers.Dense(3)(inputs), name="custom")
    with pytest.raises(TypeError, match="'custom'.*own `fit`"):
        keras_sam.SAMModel(custom)
    keras_sam.SAMModel(tanh_mlp())   # Keras's own fit: accepted


def test_wrapping_a_compiled_model_says_its_fit_skips_sam():
    model = tanh_mlp()
    model.compile(optimizer="sgd", loss="mse")
    with pytest.warns(UserWarning,
                      match="would train it without SAM") as caught:
        keras_sam.SAMModel(model)
    assert _ours(caught, "without SAM").filename == __file__   # not Keras's
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        keras_sam.SAMModel(tanh_mlp())   # an uncompiled model: no warning


# --------------------------------------------------------------- files

def test_saving_to_h5_is_refused_with_the_fix(tmp_path):
    sam = keras_sam.SAMModel(tanh_mlp())
    sam.compile(optimizer="sgd", loss="mse")
    path = tmp_path / "m.h5"
    with pytest.raises(ValueError, match=r"sam_model.save\('.*m.keras'\)"):
        sam.save(str(path))
    assert not path.exists()


# ------------------------------------------------------------ analysis

def test_landscape_toward_a_keras_file(tmp_path):
    x, y = regression_data(n=32)
    a, b = tanh_mlp(seed=1), tanh_mlp(seed=2)
    for m in (a, b):
        m.compile(loss="mse")
    b.save(str(tmp_path / "b.keras"))
    from_file = keras_sam.analysis.loss_landscape(
        a, x, y, toward=str(tmp_path / "b.keras"), steps=5)
    from_model = keras_sam.analysis.loss_landscape(a, x, y, toward=b,
                                                   steps=5)
    np.testing.assert_allclose(from_file["losses"], from_model["losses"],
                               rtol=1e-6)
    with pytest.raises(TypeError, match="keras.Model.*list.*`.keras` file"):
        keras_sam.analysis.loss_landscape(a, x, y, toward=3.0, steps=5)
    with pytest.raises(ValueError, match="`.keras` file"):
        keras_sam.analysis.loss_landscape(a, x, y, toward="w.weights.h5",
                                          steps=5)


def test_plots_name_the_plot_that_fits():
    pytest.importorskip("matplotlib")
    one = {"alphas": np.linspace(-1, 1, 3), "losses": np.ones(3)}
    with pytest.raises(ValueError, match="1-D.*plot_landscape_1d"):
        keras_sam.analysis.plot_landscape_2d(one)
    with pytest.raises(TypeError, match=r"\{label: result\}"):
        keras_sam.analysis.plot_landscape_1d(one)


def test_csv_logger_gets_the_monitor_columns_every_epoch(tmp_path):
    x, y = regression_data(n=32)
    sam = keras_sam.SAMModel(tanh_mlp(), rho=0.05)
    sam.compile(optimizer="sgd", loss="mse")
    monitor = keras_sam.callbacks.SharpnessMonitor(x, y, every=2,
                                                   hessian=False)
    path = tmp_path / "log.csv"
    sam.fit(x, y, epochs=4, verbose=0,
            callbacks=[monitor, keras.callbacks.CSVLogger(str(path))])
    rows = list(csv.DictReader(path.open()))
    assert len(rows) == 4 and "eval_sharpness" in rows[0]
    values = [float(r["eval_sharpness"]) for r in rows]
    assert np.isnan(values[0]) and np.isnan(values[2])
    assert values[1] > 0 and values[3] > 0


# ---------------------------------------- a loss held where it started

class _Flattening(keras.Model):
    """A loss that stays at 0.6931 (to 1e-4) while its gradient vanishes,
    as a model that SAM has made a constant predictor: 0.6931 plus 1e-4 of
    the squared error of a linear fit that SGD(3000) solves in a few steps."""

    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(1)

    def call(self, x):
        return self.dense(x)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None,
                     training=True):
        residual = (keras.ops.squeeze(y_pred, -1)
                    - keras.ops.convert_to_tensor(y, y_pred.dtype))
        return 0.6931 + 1e-4 * keras.ops.mean(residual * residual)


def _flattening(rho=0.05):
    keras.utils.set_random_seed(0)
    sam = keras_sam.SAMModel(_Flattening(), rho=rho)
    sam.compile(optimizer=keras.optimizers.SGD(3000.0))
    return sam


def _line_data():
    x = np.random.default_rng(0).normal(size=(64, 5)).astype("float32")
    return x, x @ np.arange(1, 6, dtype="float32")


def _stuck():
    """A SAM model whose loss cannot move: a zero learning rate."""
    frozen = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)])
    frozen.layers[0].kernel.assign(np.zeros((5, 3)))
    stuck = keras_sam.SAMModel(frozen, rho=0.05)
    stuck.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
    return stuck


def _stall_warnings(fit, calls):
    """The stall warnings of `calls` calls of `fit()`, every one recorded
    (not only the first per line, as Python's default filter would)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(calls):
            fit()
    return [w for w in caught if "still where it started" in str(w.message)]


def test_a_loss_held_where_it_started_is_warned_about_with_its_evidence():
    """A loss that stays at its start while ||g|| collapses trips the
    warning after epoch 2, at the user's `fit` line, with the figures it
    saw; the same model at rho = 0, a model that nothing moves (||g||
    unchanged) and a model that learns give none."""
    x, y = _line_data()
    flat = _flattening()
    with pytest.warns(UserWarning, match=r"training loss (rose|did not "
                      r"change|fell by only .*%) over epoch [23] .*still where "
                      r"it started \(epoch 1: 0\.69.*\|\|g\|\| fell from "
                      r".* in epoch 1 to .*adaptive=True.*transformers-adam"
                      r"\.md") as caught:
        flat.fit(x, y, batch_size=16, epochs=3, verbose=0)
    # The user's line, not Keras's callbacks/callback_list.py.
    assert _ours(caught, "still where it started").filename == __file__
    norms = flat._watch_record.norms
    assert norms[1] <= keras_sam.watch.COLLAPSE * norms[0]
    off = _flattening(rho=0.0)
    assert _stall_warnings(lambda: off.fit(x, y, batch_size=16, epochs=3,
                                           verbose=0), 1) == []
    xs, ys = regression_data(n=64)
    stuck = _stuck()
    assert _stall_warnings(lambda: stuck.fit(xs, ys, batch_size=16, epochs=3,
                                             shuffle=False, verbose=0),
                           1) == []
    norms = stuck._watch_record.norms   # the same batches at the same w
    assert len(norms) == 3 and norms[2] == pytest.approx(norms[0], rel=1e-4)
    learns = keras_sam.SAMModel(tanh_mlp(), rho=0.05)
    learns.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        learns.fit(xs, ys, batch_size=16, epochs=3, verbose=0)


def test_the_stall_message_says_what_the_loss_did():
    """Exact words for a loss that rose, stayed, fell too little; nothing
    for one that fell by STALL or more, left where it started, or kept its
    gradient."""
    message = keras_sam.watch.stall_message
    assert message([0.7, 0.6931, 0.6932], [2.0, 0.1, 0.05]).startswith(
        "The training loss rose over epoch 3 (0.6931 -> 0.6932), still "
        "where it started (epoch 1: 0.7), while the clean gradient "
        "shrank: its mean norm ||g|| fell from 2 in epoch 1 to 0.05.")
    assert message([0.6931, 0.6931], [2.0, 0.1]).startswith(
        "The training loss did not change over epoch 2 (0.6931), still "
        "where it started (epoch 1: 0.6931)")
    assert message([0.7, 0.6931, 0.6930], [2.0, 0.1, 0.05]).startswith(
        "The training loss fell by only 0.014% over epoch 3 (0.6931 -> "
        "0.693), ")
    assert message([0.7, 0.6931, 0.68], [2.0, 0.1, 0.05]) is None  # fell
    assert message([0.7, 0.5, 0.5], [2.0, 0.1, 0.05]) is None   # left start
    assert message([0.7, 0.7, 0.7], [2.0, 1.5, 1.2]) is None    # g kept
    nan = float("nan")
    assert message([0.7, 0.7], [nan, nan]) is None              # rho = 0


def test_the_stall_check_sees_one_run_across_fit_calls():
    """Five `fit(epochs=1)` calls (a loop with its own evaluation) are one
    run to the check, as `fit(epochs=5)` is: a held model warns once, a
    learning one never; a new optimizer starts the check again."""
    x, y = _line_data()
    flat = _flattening()
    fit = lambda: flat.fit(x, y, batch_size=16, epochs=1, verbose=0)
    stalls = _stall_warnings(fit, 5)
    assert len(stalls) == 1 and stalls[0].filename == __file__
    flat.compile(optimizer=keras.optimizers.SGD(3000.0))
    flat.model.dense.kernel.assign(np.zeros((5, 1)))
    assert len(_stall_warnings(fit, 1)) == 0            # one epoch: no basis
    assert len(_stall_warnings(fit, 1)) == 1
    xs, ys = regression_data(n=64)
    learns = keras_sam.SAMModel(tanh_mlp(), rho=0.05)
    learns.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    assert _stall_warnings(
        lambda: learns.fit(xs, ys, batch_size=16, epochs=1, verbose=0),
        5) == []


def test_epochs_that_do_not_follow_on_start_a_new_check():
    """Steps taken outside `fit` between two epochs break the run: the
    epochs before them do not count with those after."""
    x, y = _line_data()
    flat = _flattening()
    fit = lambda: flat.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert len(_stall_warnings(fit, 1)) == 0
    flat.model.dense.kernel.assign(np.zeros((5, 1)))
    flat.train_on_batch(x[:16], y[:16])
    assert len(_stall_warnings(fit, 1)) == 0            # a new first epoch
    assert len(_stall_warnings(fit, 1)) == 1


def _warnings_of(fit) -> set:
    """(category, file, line, message) of every warning `fit()` gives."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit()
    return {(w.category.__name__, w.filename, w.lineno, str(w.message))
            for w in caught}


def test_a_healthy_run_gives_no_warning_the_plain_model_does_not():
    """Several epochs with validation, over one `fit` and then two more,
    with a constant rho and with a rho schedule (which the epoch-end check
    evaluates on the host): every warning is one the same run of the plain
    model gives too. On TensorFlow and JAX that is none; on PyTorch, Keras's
    callbacks convert each torch log value with `np.array`, which NumPy 2
    deprecates, for the plain model's logs as for SAM's."""
    x, y = regression_data(n=64)

    def run(model):
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.fit(x, y, batch_size=16, epochs=4, verbose=0,
                  validation_data=(x, y))
        for _ in range(2):
            model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        assert int(model.optimizer.iterations.value) == 24

    plain = _warnings_of(lambda: run(tanh_mlp()))
    if keras.backend.backend() != "torch":
        assert plain == set()
    for rho in (0.05, lambda t: 0.05 * keras.ops.exp(-0.01 * t)):
        ours = _warnings_of(lambda: run(keras_sam.SAMModel(tanh_mlp(),
                                                           rho=rho)))
        assert sorted(ours - plain) == []
