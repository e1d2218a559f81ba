"""Saving, loading, serving and resuming SAM models."""

import json
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam
from conftest import bn_mlp, regression_data


def _model(seed=0, dropout=False):
    """BatchNorm, an L2 regularizer and, on request, Dropout. Keras saves no
    seed-generator state (neither in `.keras` nor in `.weights.h5`), so a
    model with Dropout resumes with other masks, wrapped or not: the
    bit-for-bit resumption tests leave it out."""
    return bn_mlp(seed, dropout)


def _trained_sam(epochs=2, dropout=False):
    x, y = regression_data(n=64)
    sam = keras_sam.SAMModel(_model(dropout=dropout), rho=0.07)
    sam.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse",
                metrics=["mae"])
    sam.fit(x, y, batch_size=16, epochs=epochs, shuffle=False, verbose=0)
    return sam, x, y


def _assert_same_weights(a, b):
    wa, wb = a.get_weights(), b.get_weights()
    assert len(wa) == len(wb)
    for u, v in zip(wa, wb):
        np.testing.assert_array_equal(u, v)


def test_keras_file_resumes_bit_for_bit(tmp_path):
    sam, x, y = _trained_sam()
    sam.save(tmp_path / "run.keras")
    loaded = keras.saving.load_model(tmp_path / "run.keras")
    assert type(loaded) is keras_sam.SAMModel
    assert json.dumps(loaded.get_config()) == json.dumps(sam.get_config())
    assert isinstance(loaded.optimizer, keras.optimizers.Adam)
    _assert_same_weights(sam, loaded)  # includes BN statistics, seed state
    for a, b in zip(sam.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # Continuing both gives the same weights, bit for bit.
    h1 = sam.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    h2 = loaded.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    _assert_same_weights(sam, loaded)
    assert h1.history == h2.history


@pytest.mark.tensorflow_only
def test_export_serves_the_same_outputs(tmp_path):
    sam, x, _ = _trained_sam(dropout=True)
    sam.export(tmp_path / "serving", verbose=False)
    expected = sam.predict(x, verbose=0)
    served = tf.saved_model.load(str(tmp_path / "serving"))
    np.testing.assert_allclose(served.serve(x).numpy(), expected,
                               rtol=1e-6, atol=1e-6)
    layer = keras.layers.TFSMLayer(str(tmp_path / "serving"),
                                   call_endpoint="serve")
    np.testing.assert_allclose(np.asarray(layer(x)), expected, rtol=1e-6,
                               atol=1e-6)


def test_plain_model_loads_where_keras_sam_is_not_installed(tmp_path):
    sam, x, _ = _trained_sam(dropout=True)
    sam.model.save(tmp_path / "model.keras")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "expected.npy", sam.predict(x, verbose=0))
    code = textwrap.dedent(f"""
        import sys
        sys.modules["keras_sam"] = None  # importing keras_sam now fails
        import keras, numpy as np
        model = keras.saving.load_model({str(tmp_path / "model.keras")!r})
        out = model.predict(np.load({str(tmp_path / "x.npy")!r}), verbose=0)
        np.testing.assert_allclose(
            out, np.load({str(tmp_path / "expected.npy")!r}), rtol=1e-6)
        print("OK", type(model).__name__)
    """)
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend(),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, env=env, timeout=300)
    assert "OK Sequential" in out.stdout, out.stderr[-3000:]


def test_model_checkpoint_weights_only_and_full(tmp_path):
    x, y = regression_data(n=64)
    sam = keras_sam.SAMModel(_model(), rho=0.05)
    sam.compile(optimizer="sgd", loss="mse")
    callbacks = [
        keras.callbacks.ModelCheckpoint(
            str(tmp_path / "w-{epoch}.weights.h5"), save_weights_only=True),
        keras.callbacks.ModelCheckpoint(str(tmp_path / "m-{epoch}.keras")),
    ]
    sam.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=callbacks)
    full = keras.saving.load_model(tmp_path / "m-2.keras")
    assert type(full) is keras_sam.SAMModel
    _assert_same_weights(sam, full)
    fresh = keras_sam.SAMModel(_model(seed=1), rho=0.05)
    fresh.load_weights(tmp_path / "w-2.weights.h5")
    _assert_same_weights(sam, fresh)
    fresh.load_weights(tmp_path / "w-1.weights.h5")
    assert not np.array_equal(fresh.get_weights()[0], sam.get_weights()[0])


@pytest.mark.tensorflow_only
def test_tf_train_checkpoint_round_trip(tmp_path):
    sam, x, y = _trained_sam()
    ckpt = tf.train.Checkpoint(model=sam, optimizer=sam.optimizer)
    path = ckpt.save(str(tmp_path / "ckpt"))
    saved = [w.copy() for w in sam.get_weights()]
    saved_slots = [np.asarray(v).copy() for v in sam.optimizer.variables]
    sam.fit(x, y, epochs=1, verbose=0)
    assert not np.array_equal(sam.get_weights()[0], saved[0])
    ckpt.restore(path).assert_existing_objects_matched()
    for a, b in zip(sam.get_weights(), saved):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(sam.optimizer.variables, saved_slots):
        np.testing.assert_array_equal(np.asarray(a), b)


class _StopAt(keras.callbacks.Callback):
    """Interrupts training at the start of an epoch, as a crash would."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            raise RuntimeError("interrupted")


def test_backup_and_restore_resumes_an_interrupted_run(tmp_path):
    x, y = regression_data(n=64)

    def fresh():
        sam = keras_sam.SAMModel(_model(), rho=0.05)
        sam.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                    loss="mse")
        return sam

    reference = fresh()
    reference.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0)

    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    first = fresh()
    with pytest.raises(RuntimeError, match="interrupted"):
        first.fit(x, y, batch_size=16, epochs=4, shuffle=False, verbose=0,
                  callbacks=[backup, _StopAt(2)])
    resumed = fresh()
    history = resumed.fit(x, y, batch_size=16, epochs=4, shuffle=False,
                          verbose=0, callbacks=[backup])
    assert len(history.history["loss"]) == 2  # epochs 3 and 4 only
    _assert_same_weights(reference, resumed)


def test_save_without_extension_explains_the_formats(tmp_path):
    sam, _, _ = _trained_sam(epochs=1)
    with pytest.raises(ValueError, match=r"\.keras.*export"):
        sam.save(tmp_path / "dir")
    assert not (tmp_path / "dir").exists()


def test_loading_before_import_says_what_is_missing(tmp_path):
    sam, _, _ = _trained_sam(epochs=1)
    sam.save(tmp_path / "run.keras")
    code = (
        "import keras\n"
        f"try:\n    keras.saving.load_model({str(tmp_path / 'run.keras')!r})\n"
        "except TypeError as e:\n    print('ERROR', e)\n"
        "import keras_sam\n"
        f"m = keras.saving.load_model({str(tmp_path / 'run.keras')!r})\n"
        "print('LOADED', type(m).__name__)\n")
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend(),
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True,
                         text=True, env=env, timeout=300).stdout
    # Keras names the class and its module; importing keras_sam fixes it.
    assert re.search(r"ERROR Could not locate class 'SAMModel'.*keras_sam",
                     out), out
    assert "LOADED SAMModel" in out


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupted_file_gets_a_clear_error(tmp_path, damage):
    sam, _, _ = _trained_sam(epochs=1)
    good = tmp_path / "run.keras"
    sam.save(good)
    bad = tmp_path / "bad.keras"
    data = good.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated"
                    else b"not a zip archive")
    with pytest.raises(ValueError, match="truncated or corrupted"):
        keras_sam.load_model(bad)
    assert type(keras_sam.load_model(good)) is keras_sam.SAMModel


@pytest.mark.backends("tensorflow", "jax")   # exports a SavedModel
def test_load_model_errors_for_missing_file_and_savedmodel_dir(tmp_path):
    sam, _, _ = _trained_sam(epochs=1)
    with pytest.raises(FileNotFoundError, match="No file"):
        keras_sam.load_model(tmp_path / "nope.keras")
    sam.export(tmp_path / "serving", verbose=False)
    with pytest.raises(ValueError, match="tf.saved_model.load"):
        keras_sam.load_model(tmp_path / "serving")


def test_weights_of_another_architecture_are_explained(tmp_path):
    sam, _, _ = _trained_sam(epochs=1)
    sam.save_weights(tmp_path / "w.weights.h5")
    keras.utils.set_random_seed(0)
    other = keras_sam.SAMModel(keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(7), keras.layers.Dense(3)]))
    before = other.get_weights()
    with pytest.raises(ValueError, match="different architecture") as info:
        other.load_weights(tmp_path / "w.weights.h5")
    assert "(5, 7)" in str(info.value) and "(5, 16)" in str(info.value)
    for a, b in zip(before, other.get_weights()):
        np.testing.assert_array_equal(a, b)


