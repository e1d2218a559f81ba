"""SAM variants (p-balls, ASAM, GSAM, every-k, LookSAM, m-sharpness on one
device, rho schedules, perturbing a subset) against the float64 reference."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam
import reference
from conftest import bn_mlp, regression_data, tanh_mlp, weights64

OPTIMIZERS = {
    "sgd_momentum": (lambda: keras.optimizers.SGD(0.1, momentum=0.9),
                     lambda: reference.SGD(0.1, momentum=0.9)),
    "adam": (lambda: keras.optimizers.Adam(0.01),
             lambda: reference.Adam(0.01)),
}

NO_BIAS = [True, False, True, False]   # [W1, b1, W2, b2] of the TanhMLP


def _decay(step):
    return 0.2 * 0.5 ** (step / 4.0)


VARIANTS = {
    "p3": dict(p=3.0),
    "p_inf": dict(p=math.inf, rho=0.01),
    "asam": dict(adaptive=True, rho=0.5),
    "asam_p_inf": dict(adaptive=True, p=math.inf, rho=0.05),
    "gsam": dict(gsam_alpha=0.4),
    "every_2": dict(sam_every=2),
    "looksam": dict(sam_every=3, looksam_alpha=0.7),
    "splits_3": dict(num_batch_splits=3),
    "no_bias": dict(perturb=lambda v: len(v.shape) > 1),
    "schedule": dict(rho=keras.optimizers.schedules.ExponentialDecay(
        0.2, decay_steps=4, decay_rate=0.5)),
    "asam_gsam_looksam_schedule": dict(
        adaptive=True, gsam_alpha=0.3, sam_every=2, looksam_alpha=0.5,
        rho=keras.optimizers.schedules.ExponentialDecay(
            0.2, decay_steps=4, decay_rate=0.5)),
    "splits_gsam_p3_every_2": dict(num_batch_splits=2, gsam_alpha=0.2,
                                   p=3.0, sam_every=2),
}

REFERENCE_ARGS = {
    "schedule": dict(rho=_decay),
    "asam_gsam_looksam_schedule": dict(rho=_decay),
    "no_bias": dict(mask=NO_BIAS),
}


def _batches(steps, n=16):
    return [regression_data(n=n, seed=20 + i) for i in range(steps)]


def _as64(batches):
    return [(x.astype(np.float64), y.astype(np.float64)) for x, y in batches]


def _reference_kwargs(name):
    kwargs = dict(VARIANTS[name])
    kwargs.setdefault("rho", 0.1)
    kwargs.pop("perturb", None)
    kwargs.update(REFERENCE_ARGS.get(name, {}))
    return kwargs


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_matches_float64_reference(name, opt):
    make_keras_opt, make_ref_opt = OPTIMIZERS[opt]
    l2 = 0.01
    model = tanh_mlp(l2=l2)
    start = weights64(model)
    kwargs = dict(VARIANTS[name])
    kwargs.setdefault("rho", 0.1)
    sam = keras_sam.SAMModel(model, **kwargs)
    sam.compile(optimizer=make_keras_opt(), loss="mse")
    batches = _batches(5)
    logs = [sam.train_on_batch(x, y, return_dict=True) for x, y in batches]

    expected, sharpness, _ = reference.variant_train(
        reference.TanhMLP(l2=l2), make_ref_opt(), start, _as64(batches),
        **_reference_kwargs(name))
    for got, want in zip(weights64(model), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert max(np.max(np.abs(a - b)) for a, b in zip(expected, start)) > 1e-3
    # Sharpness is logged on the steps that ran a second pass only
    # (train_on_batch resets metrics each step: 0 on one-pass steps).
    every = kwargs.get("sam_every", 1)
    sam_logs = [log["sharpness"] for t, log in enumerate(logs)
                if t % every == 0]
    np.testing.assert_allclose(sam_logs, sharpness, rtol=1e-4, atol=1e-7)


def test_variant_differs_from_plain_sam():
    """Each variant changes the trajectory (the reference tests would pass
    for a variant silently ignored only if it equalled SAM)."""
    x, y = regression_data(n=16, seed=3)

    def weights(**kwargs):
        sam = keras_sam.SAMModel(tanh_mlp(l2=0.01), rho=0.1, **kwargs)
        sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        for _ in range(3):
            sam.train_on_batch(x, y)
        return weights64(sam.model)

    plain = weights()
    for kwargs in (dict(p=3.0), dict(adaptive=True), dict(gsam_alpha=0.5),
                   dict(sam_every=2), dict(num_batch_splits=2),
                   dict(perturb=lambda v: len(v.shape) > 1),
                   dict(sam_every=2, looksam_alpha=1.0)):
        diff = max(np.max(np.abs(a - b))
                   for a, b in zip(weights(**kwargs), plain))
        assert diff > 1e-6, kwargs


@pytest.mark.parametrize("kwargs", [
    dict(p=2, adaptive=False), dict(gsam_alpha=0.0), dict(sam_every=1),
    dict(num_batch_splits=1), dict(perturb=lambda v: True),
    dict(rho=keras.optimizers.schedules.PiecewiseConstantDecay(
        [2], [0.1, 0.1])),
    dict(rho=lambda step: 0.1),
])
def test_neutral_settings_equal_plain_sam_bit_for_bit(kwargs):
    x, y = regression_data(n=16, seed=4)

    def run(**kw):
        kw.setdefault("rho", 0.1)
        sam = keras_sam.SAMModel(tanh_mlp(l2=0.01), **kw)
        sam.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        logs = [sam.train_on_batch(x, y, return_dict=True) for _ in range(3)]
        return sam.get_weights(), logs

    want_w, want_logs = run()
    got_w, got_logs = run(**kwargs)
    for a, b in zip(got_w, want_w):
        np.testing.assert_array_equal(a, b)
    assert got_logs == want_logs


@pytest.mark.parametrize("kwargs", [
    dict(num_batch_splits=4), dict(sam_every=3),
    dict(sam_every=2, looksam_alpha=0.0), dict(gsam_alpha=0.3),
    dict(adaptive=True), dict(p=math.inf),
])
def test_rho_zero_is_the_base_optimizer(kwargs):
    """rho = 0 removes every variant's effect (GSAM: g_s = g, so g_perp = 0;
    splits: the size-weighted mean of chunk gradients is the batch's)."""
    x, y = regression_data(n=18, seed=5)
    base = tanh_mlp(l2=0.01)
    base.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                 loss="mse")
    sam = keras_sam.SAMModel(tanh_mlp(l2=0.01), rho=0.0, **kwargs)
    sam.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                loss="mse")
    for _ in range(4):
        base.train_on_batch(x, y)
        sam.train_on_batch(x, y)
    for a, b in zip(sam.model.get_weights(), base.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_splits_with_an_uneven_last_batch_match_the_reference():
    """19 examples, batch 8, 3 splits: chunks 3/3/2, 3/3/2, then 1/1/1."""
    x, y = regression_data(n=19, seed=6)
    model = tanh_mlp(l2=0.01)
    start = weights64(model)
    sam = keras_sam.SAMModel(model, rho=0.1, num_batch_splits=3)
    sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    sam.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 19, 8)]
    expected, _, _ = reference.variant_train(
        reference.TanhMLP(l2=0.01), reference.SGD(0.1), start,
        _as64(batches), 0.1, num_batch_splits=3)
    for got, want in zip(weights64(model), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_splits_larger_than_the_batch_leave_empty_chunks_out():
    x, y = regression_data(n=2, seed=7)
    model = tanh_mlp()
    start = weights64(model)
    sam = keras_sam.SAMModel(model, rho=0.1, num_batch_splits=4)
    sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    # A dataset has an unknown batch size: the chunks' bounds are computed
    # in the graph, and two of them are empty.
    history = sam.fit(tf.data.Dataset.from_tensor_slices((x, y)).batch(2),
                      epochs=1, verbose=0)
    logs = {k: v[0] for k, v in history.history.items()}
    assert all(np.isfinite(w).all() for w in sam.get_weights())
    expected, _, _ = reference.variant_train(
        reference.TanhMLP(), reference.SGD(0.1), start, _as64([(x, y)]),
        0.1, num_batch_splits=2)   # two chunks of one example
    for got, want in zip(weights64(model), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.isfinite(logs["loss"]) and np.isfinite(logs["sharpness"])


def test_splits_move_batchnorm_statistics_once():
    """Each chunk normalizes with its own statistics; the moving mean moves
    once, by the chunks' mean (= the batch mean for equal chunks)."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    bn = keras.layers.BatchNormalization(momentum=0.9)
    model = keras.Model(inputs, keras.layers.Dense(3)(bn(inputs)))
    x, y = regression_data(n=16, seed=8)
    sam = keras_sam.SAMModel(model, rho=0.1, num_batch_splits=2)
    sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    sam.train_on_batch(x, y)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(bn.moving_mean, 0.1 * x64.mean(0),
                               rtol=1e-5, atol=1e-7)
    chunk_var = (x64[:8].var(0) + x64[8:].var(0)) / 2
    np.testing.assert_allclose(bn.moving_variance, 0.9 + 0.1 * chunk_var,
                               rtol=1e-5)


def test_splits_keep_per_output_losses_and_metrics():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    model = keras.Model(inputs, {"a": keras.layers.Dense(2, name="a")(h),
                                 "b": keras.layers.Dense(1, name="b")(h)})
    x, y = regression_data(n=16, seed=9)
    targets = {"a": y[:, :2], "b": y[:, 2:]}
    sam = keras_sam.SAMModel(model, rho=0.05, num_batch_splits=2)
    sam.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse",
                metrics={"a": ["mae"], "b": ["mae"]})
    logs = sam.train_on_batch(x, targets, return_dict=True)
    pred = model.predict(x, verbose=0)
    want_a = np.mean((pred["a"] - targets["a"]) ** 2)
    want_b = np.mean((pred["b"] - targets["b"]) ** 2)
    np.testing.assert_allclose(logs["a_loss"], want_a, rtol=1e-5)
    np.testing.assert_allclose(logs["b_loss"], want_b, rtol=1e-5)
    np.testing.assert_allclose(logs["loss"], want_a + want_b, rtol=1e-5)
    np.testing.assert_allclose(
        logs["a_mae"], np.mean(np.abs(pred["a"] - targets["a"])), rtol=1e-5)


def test_sharpness_is_averaged_over_sam_steps_only():
    x, y = regression_data(n=64, seed=10)
    model = tanh_mlp(l2=0.01)
    start = weights64(model)
    sam = keras_sam.SAMModel(model, rho=0.1, sam_every=3)
    sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    history = sam.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]
    _, sharpness, _ = reference.variant_train(
        reference.TanhMLP(l2=0.01), reference.SGD(0.1), start,
        _as64(batches), 0.1, sam_every=3)
    assert len(sharpness) == 3   # steps 0, 3, 6
    np.testing.assert_allclose(history.history["sharpness"][0],
                               np.mean(sharpness), rtol=1e-4)


def test_sam_every_counts_from_the_optimizer_iterations_across_fits():
    x, y = regression_data(n=16, seed=11)
    model = tanh_mlp()
    start = weights64(model)
    sam = keras_sam.SAMModel(model, rho=0.1, sam_every=2,
                             looksam_alpha=0.5)
    sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    for _ in range(3):    # three separate fits of one step each
        sam.fit(x, y, batch_size=16, epochs=1, verbose=0)
    expected, _, g_v = reference.variant_train(
        reference.TanhMLP(), reference.SGD(0.1), start,
        _as64([(x, y)] * 3), 0.1, sam_every=2, looksam_alpha=0.5)
    for got, want in zip(weights64(model), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(sam._looksam_directions, g_v):
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4,
                                   atol=1e-7)


def test_normalization_only_perturbs_normalization_parameters():
    model = bn_mlp()
    sam = keras_sam.SAMModel(
        model, rho=0.1, perturb=keras_sam.selection.NormalizationOnly())
    mask = sam.perturbed_mask(model.trainable_variables)
    chosen = [v.path for v, m in zip(model.trainable_variables, mask) if m]
    assert sorted(p.rsplit("/", 1)[1] for p in chosen) == ["beta", "gamma"]
    mask = keras_sam.SAMModel(
        bn_mlp(), perturb=keras_sam.selection.NoBiasNoNormalization()
    ).perturbed_mask(model.trainable_variables)
    assert [len(v.shape) for v, m in zip(model.trainable_variables, mask)
            if m] == [2, 2]


@pytest.mark.tensorflow_only
def test_normalization_only_trains_against_the_reference():
    """SAM-ON on a LayerNorm MLP: only gamma and beta get e."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(6, activation="tanh")(inputs)
    h = keras.layers.LayerNormalization()(h)
    model = keras.Model(inputs, keras.layers.Dense(3)(h))
    x, y = regression_data(n=16, seed=12)
    sam = keras_sam.SAMModel(
        model, rho=0.3, perturb=keras_sam.selection.NormalizationOnly())
    sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    w = [np.asarray(v) for v in model.trainable_variables]
    clean = _loss_and_grads(model, x, y, w)[1]
    mask = [False, False, True, True, False, False]
    e = reference.perturbation([np.asarray(g, np.float64) for g in clean],
                               w, 0.3, mask=mask)
    moved = [a + d for a, d in zip(w, e)]
    g_s = _loss_and_grads(model, x, y, moved)[1]
    sam.train_on_batch(x, y)
    assert max(np.max(np.abs(d)) for d in e[2:4]) > 1e-3
    for v, a, g in zip(model.trainable_variables, w, g_s):
        np.testing.assert_allclose(np.asarray(v), a - 0.1 * np.asarray(g),
                                   rtol=1e-5, atol=1e-6)


def _loss_and_grads(model, x, y, values):
    values = [tf.constant(np.asarray(v, np.float32)) for v in values]
    with tf.GradientTape() as tape:
        tape.watch(values)
        with keras.StatelessScope(state_mapping=list(
                zip(model.trainable_variables, values))):
            loss = keras.losses.mean_squared_error(y, model(x))
            loss = tf.reduce_mean(loss)
    return float(loss), tape.gradient(loss, values)


def test_a_predicate_that_selects_nothing_is_refused():
    with pytest.raises(ValueError, match="`perturb`.*selects none"):
        keras_sam.SAMModel(tanh_mlp(),
                           perturb=keras_sam.selection.NormalizationOnly())


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(p=1.0), ValueError, "`p` must be > 1"),
    (dict(p=0.5), ValueError, "`p` must be > 1"),
    (dict(p=float("nan")), ValueError, "`p` must be > 1"),
    (dict(p="2"), TypeError, "`p` must be a real"),
    (dict(eta=-0.1), ValueError, "`eta` must be a finite number >= 0"),
    (dict(adaptive=1), TypeError, "`adaptive` must be True or False"),
    (dict(gsam_alpha=-1.0), ValueError, "`gsam_alpha`"),
    (dict(gsam_alpha=math.inf), ValueError, "`gsam_alpha`"),
    (dict(sam_every=0), ValueError, "`sam_every` must be an integer >= 1"),
    (dict(sam_every=2.5), TypeError, "`sam_every` must be an integer"),
    (dict(sam_every=True), TypeError, "`sam_every` must be an integer"),
    (dict(looksam_alpha=0.7), ValueError, "`looksam_alpha` needs `sam_every`"),
    (dict(sam_every=4, looksam_alpha=-0.5), ValueError, "`looksam_alpha`"),
    (dict(num_batch_splits=0), ValueError, "`num_batch_splits` must be"),
    (dict(num_batch_splits=1.5), TypeError, "`num_batch_splits` must be"),
    (dict(perturb="bias"), TypeError, "`perturb` must be None"),
    (dict(rho="0.05"), TypeError, "`rho` must be a real number >= 0, a"),
    (dict(rho=-0.1), ValueError, "`rho` must be a finite number"),
])
def test_bad_values_are_refused_at_construction(kwargs, error, match):
    model = tanh_mlp()
    before = [w.copy() for w in model.get_weights()]
    with pytest.raises(error, match=match):
        keras_sam.SAMModel(model, **kwargs)
    for a, b in zip(model.get_weights(), before):
        np.testing.assert_array_equal(a, b)


def test_rho_follows_the_learning_rate():
    lr = keras.optimizers.schedules.PolynomialDecay(0.1, 10, 0.02)
    rho = keras_sam.schedules.RhoFollowsLearningRate(lr, rho_max=0.05,
                                                     rho_min=0.01)
    for step in (0, 5, 10):
        lr_t = float(lr(step))
        want = 0.01 + 0.04 * lr_t / 0.1
        np.testing.assert_allclose(float(rho(step)), want, rtol=1e-6)
    with pytest.raises(ValueError, match="rho_min"):
        keras_sam.schedules.RhoFollowsLearningRate(lr, rho_max=0.01,
                                                   rho_min=0.05)
    with pytest.raises(TypeError, match="LearningRateSchedule"):
        keras_sam.schedules.RhoFollowsLearningRate(0.1, rho_max=0.05)


def test_a_lazily_built_model_has_perturb_checked_at_the_first_step():
    class Lazy(keras.Model):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.dense = keras.layers.Dense(3)

        def call(self, x):
            return self.dense(x)

    model = Lazy()
    sam = keras_sam.SAMModel(
        model, perturb=keras_sam.selection.NormalizationOnly())
    sam.compile(optimizer="sgd", loss="mse")
    x, y = regression_data(n=8)
    with pytest.raises(ValueError, match="selects none"):
        sam.fit(x, y, verbose=0)
    assert not model.built or int(sam.optimizer.iterations) == 0
