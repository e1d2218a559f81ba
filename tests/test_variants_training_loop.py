"""The core's guarantees, kept by every variant: skipped steps, loss
scaling, XLA, steps_per_execution, sparse gradients, saving, resumption."""

import keras
import numpy as np
import pytest

import keras_sam
import reference
from conftest import bn_mlp, regression_data, tanh_mlp, weights64
from test_saving import _StopAt
from test_training_loop import _embedding_model, _mixed_mlp, _token_batches

COMBINED = dict(adaptive=True, rho=0.5, gsam_alpha=0.3, sam_every=2,
                looksam_alpha=0.7, num_batch_splits=2)


def _looksam_state(sam):
    return [np.asarray(v) for v in sam._looksam_directions]


@pytest.mark.parametrize("kwargs", [
    dict(sam_every=2, looksam_alpha=0.7), dict(gsam_alpha=0.5),
    dict(num_batch_splits=2), dict(adaptive=True, p=3.0)])
def test_non_finite_gradient_skips_every_variant(kwargs):
    model = tanh_mlp(seed=5)
    sam = keras_sam.SAMModel(model, rho=0.05, **kwargs)
    sam.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    x, y = regression_data()
    sam.train_on_batch(x, y)
    weights = model.get_weights()
    slots = [np.asarray(v) for v in sam.optimizer.variables]
    state = _looksam_state(sam) if "looksam_alpha" in kwargs else []
    bad = x.copy()
    bad[3, 1] = np.nan
    for _ in range(2):   # a SAM step and (every-k) a one-pass step
        logs = sam.train_on_batch(bad, y, return_dict=True)
        assert np.isnan(logs["loss"]) and logs["sharpness"] == 0.0
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(slots, sam.optimizer.variables):
        np.testing.assert_array_equal(a, np.asarray(b))
    for a, b in zip(state, _looksam_state(sam) if state else []):
        np.testing.assert_array_equal(a, b)
    sam.train_on_batch(x, y)
    assert int(sam.optimizer.iterations) == 2
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_mixed_float16_overflow_skips_the_combined_variants():
    keras.mixed_precision.set_global_policy("mixed_float16")
    x, y = regression_data(n=32)
    model = _mixed_mlp()
    sam = keras_sam.SAMModel(model, **COMBINED)
    sam.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    assert isinstance(sam.optimizer, keras.optimizers.LossScaleOptimizer)
    sam.train_on_batch(x, y)
    weights, state = model.get_weights(), _looksam_state(sam)
    sam.optimizer.dynamic_scale.assign(1e30)
    sam.train_on_batch(x, y)
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(state, _looksam_state(sam)):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(float(sam.optimizer.dynamic_scale), 5e29,
                               rtol=1e-6)
    history = sam.fit(x, y, batch_size=8, epochs=30, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
    assert history.history["loss"][-1] < history.history["loss"][0]
    assert all(np.isfinite(w).all() for w in model.get_weights())


def test_mixed_float16_variants_match_float32_closely():
    """Loss scaling cancels in every variant's ratios: one step of the
    combined variants under mixed_float16 lands near the float32 step."""
    x, y = regression_data(n=32)
    results = []
    for policy in ("float32", "mixed_float16"):
        keras.mixed_precision.set_global_policy(policy)
        sam = keras_sam.SAMModel(_mixed_mlp(), **COMBINED)
        sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        for _ in range(3):
            sam.train_on_batch(x, y)
        results.append(sam.model.get_weights())
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=0.02, atol=0.01)


def test_jit_compile_matches_the_graph_step_for_the_combined_variants():
    x, y = regression_data(n=64)
    results = []
    for jit in (False, True):
        model = bn_mlp()
        sam = keras_sam.SAMModel(model, **COMBINED)
        sam.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse",
                    jit_compile=jit)
        history = sam.fit(x, y, batch_size=16, epochs=3, shuffle=False,
                          verbose=0)
        results.append((model.get_weights(), history.history,
                        _looksam_state(sam)))
    (w_graph, h_graph, s_graph), (w_xla, h_xla, s_xla) = results
    for a, b in zip(w_graph + s_graph, w_xla + s_xla):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(h_graph["sharpness"], h_xla["sharpness"],
                               rtol=1e-3)


@pytest.mark.backends("tensorflow", "jax")   # Keras: torch runs 1
def test_steps_per_execution_is_bit_for_bit_with_variants():
    x, y = regression_data(n=64)
    weights = []
    for n in (1, 4):
        model = bn_mlp()
        sam = keras_sam.SAMModel(model, rho=0.1, sam_every=3,
                                 looksam_alpha=0.5, gsam_alpha=0.2)
        sam.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                    loss="mse", steps_per_execution=n)
        sam.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights() + _looksam_state(sam))
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("jit", [False, True])
def test_embedding_with_asam_and_gsam_against_reference(jit):
    """Sparse Embedding gradients: ASAM's T on the table's rows, GSAM's
    projections on the densified gradient."""
    model = _embedding_model()
    start = weights64(model)
    sam = keras_sam.SAMModel(model, rho=0.5, adaptive=True, gsam_alpha=0.3)
    sam.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse",
                jit_compile=jit)
    batches = _token_batches(3)
    for tokens, y in batches:
        sam.train_on_batch(tokens, y)
    expected, _, _ = reference.variant_train(
        reference.EmbeddingBag(), reference.SGD(0.5), start,
        [(t, y.astype(np.float64)) for t, y in batches], 0.5, adaptive=True,
        gsam_alpha=0.3)
    for got, want in zip(weights64(model), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_embedding_with_adaptive_sparse_rows_against_reference():
    """ASAM alone keeps the table's gradient sparse: T is gathered on the
    looked-up rows only."""
    model = _embedding_model()
    start = weights64(model)
    sam = keras_sam.SAMModel(model, rho=0.5, adaptive=True, p=3.0)
    sam.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    batches = _token_batches(2)
    for tokens, y in batches:
        sam.train_on_batch(tokens, y)
    expected, _, _ = reference.variant_train(
        reference.EmbeddingBag(), reference.SGD(0.5), start,
        [(t, y.astype(np.float64)) for t, y in batches], 0.5, adaptive=True,
        p=3.0)
    for got, want in zip(weights64(model), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(weights64(model)[0][12:], start[0][12:])


def _looksam_sam(rho_schedule=False):
    rho = (keras.optimizers.schedules.ExponentialDecay(0.1, 5, 0.5)
           if rho_schedule else 0.1)
    sam = keras_sam.SAMModel(bn_mlp(), rho=rho, sam_every=3,
                             looksam_alpha=0.7, adaptive=True,
                             perturb=keras_sam.selection.NoBiasNoNormalization(),
                             num_batch_splits=2, gsam_alpha=0.1)
    sam.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                loss="mse")
    return sam


def test_keras_file_round_trips_every_argument_and_looksam_state(tmp_path):
    x, y = regression_data(n=64)
    sam = _looksam_sam(rho_schedule=True)
    sam.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert np.abs(_looksam_state(sam)[0]).max() > 0
    sam.save(tmp_path / "run.keras")
    loaded = keras.saving.load_model(tmp_path / "run.keras")
    config, loaded_config = sam.get_config(), loaded.get_config()
    config.pop("model"), loaded_config.pop("model")
    assert loaded_config == config
    assert set(config) >= {"rho", "p", "adaptive", "eta", "gsam_alpha",
                           "sam_every", "looksam_alpha", "num_batch_splits",
                           "perturb", "sync_perturbation"}
    assert isinstance(loaded.options.perturb,
                      keras_sam.selection.NoBiasNoNormalization)
    assert isinstance(loaded.rho,
                      keras.optimizers.schedules.ExponentialDecay)
    for a, b in zip(_looksam_state(sam), _looksam_state(loaded)):
        np.testing.assert_array_equal(a, b)
    sam.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(sam.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_a_lambda_predicate_saves_and_loads_with_safe_mode_off(tmp_path):
    sam = keras_sam.SAMModel(tanh_mlp(), perturb=lambda v: len(v.shape) > 1)
    sam.compile(optimizer="sgd", loss="mse")
    with pytest.warns(UserWarning, match="includes a `lambda`"):
        sam.save(tmp_path / "run.keras")   # Keras's own warning
    with pytest.raises(ValueError, match="lambda"):
        keras.saving.load_model(tmp_path / "run.keras")
    loaded = keras.saving.load_model(tmp_path / "run.keras", safe_mode=False)
    variables = loaded.model.trainable_variables
    assert loaded.perturbed_mask(variables) == [True, False, True, False]


def test_backup_and_restore_resumes_looksam_bit_for_bit(tmp_path):
    x, y = regression_data(n=64)
    reference_run = _looksam_sam()
    reference_run.fit(x, y, batch_size=16, epochs=4, shuffle=False,
                      verbose=0)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    first = _looksam_sam()
    with pytest.raises(RuntimeError, match="interrupted"):
        first.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0,
                  callbacks=[backup, _StopAt(2)])
    resumed = _looksam_sam()
    history = resumed.fit(x, y, batch_size=16, epochs=4, shuffle=False,
                          verbose=0, callbacks=[backup])
    assert len(history.history["loss"]) == 2
    for a, b in zip(reference_run.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(_looksam_state(reference_run), _looksam_state(resumed)):
        np.testing.assert_array_equal(a, b)


def test_looksam_keeps_exactly_one_copy_of_the_trainable_weights():
    sam = keras_sam.SAMModel(bn_mlp(), sam_every=3, looksam_alpha=0.5)
    size = lambda vs: sum(int(np.prod(v.shape)) for v in vs)  # noqa: E731
    assert size(sam._looksam_directions) == size(sam.trainable_variables)
    assert size(sam.looksam_state.weights) == \
        size(sam.trainable_variables) + 1        # and ||g_v||
