"""Training logs describe the clean pass; configuration round-trips."""

import keras
import numpy as np
import pytest

import keras_sam
from conftest import regression_data, tanh_mlp


def _two_output_model(seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6,), name="features")
    h = keras.layers.Dense(8, activation="relu",
                           kernel_regularizer=keras.regularizers.L2(1e-3))(inputs)
    value = keras.layers.Dense(1, name="value")(h)
    label = keras.layers.Dense(4, name="label")(h)
    return keras.Model(inputs, {"value": value, "label": label})


def _two_output_data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 6)).astype("float32")
    y = {"value": rng.normal(size=(n, 1)).astype("float32"),
         "label": rng.integers(0, 4, size=(n,))}
    return x, y


def _compile(model):
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss={"value": "mse",
              "label": keras.losses.SparseCategoricalCrossentropy(
                  from_logits=True)},
        loss_weights={"value": 0.5, "label": 1.0},
        metrics={"value": ["mae"], "label": ["accuracy"]},
    )


def test_two_output_logs_equal_the_base_model_at_the_same_weights():
    base = _two_output_model()
    sam = keras_sam.SAMModel(_two_output_model(), rho=0.1)
    _compile(base)
    _compile(sam)
    batches = [_two_output_data(seed=s) for s in (1, 2, 3)]

    sam_logs = [sam.train_on_batch(x, y, return_dict=True)
                for x, y in batches]
    # Replay: the base model at SAM's weights before each step.
    sam2 = keras_sam.SAMModel(_two_output_model(), rho=0.1)
    _compile(sam2)
    for (x, y), logs in zip(batches, sam_logs):
        base.set_weights(sam2.get_weights())
        base_logs = base.train_on_batch(x, y, return_dict=True)
        assert set(logs) == set(base_logs) | {"sharpness"}
        for key, value in base_logs.items():
            np.testing.assert_allclose(logs[key], value, rtol=1e-6,
                                       err_msg=key)
        sam2.train_on_batch(x, y)
    assert {"value_loss", "label_loss", "value_mae",
            "label_accuracy"} <= set(sam_logs[0])


def test_per_output_losses_are_counted_once_over_an_epoch():
    """Each tracker averages one value per batch (the clean pass), not two."""
    x, y = _two_output_data(n=64, seed=4)
    sam = keras_sam.SAMModel(_two_output_model(seed=1), rho=0.2)
    _compile(sam)
    probe = _two_output_model(seed=1)
    _compile(probe)
    clean = {"loss": [], "value_loss": [], "label_loss": []}
    # Record the clean-pass losses batch by batch, then fit one epoch.
    weights = sam.get_weights()
    for start in range(0, 64, 16):
        xb = x[start:start + 16]
        yb = {k: v[start:start + 16] for k, v in y.items()}
        probe.set_weights(sam.get_weights())
        logs = probe.evaluate(xb, yb, verbose=0, return_dict=True)
        for key in clean:
            clean[key].append(logs[key])
        sam.train_on_batch(xb, yb)
    sam.set_weights(weights)
    sam.optimizer.iterations.assign(0)
    history = sam.fit(x, y, batch_size=16, epochs=1, shuffle=False,
                      verbose=0)
    for key, values in clean.items():
        np.testing.assert_allclose(history.history[key][0], np.mean(values),
                                   rtol=1e-5, err_msg=key)
    assert history.history["sharpness"][0] > 0


def test_evaluate_and_predict_are_those_of_the_wrapped_model():
    x, y = regression_data()
    model = tanh_mlp(seed=3)
    sam = keras_sam.SAMModel(model, rho=0.05)
    sam.compile(optimizer="sgd", loss="mse", metrics=["mae"])
    model.compile(loss="mse", metrics=["mae"])
    history = sam.fit(x, y, validation_data=(x, y), epochs=2, verbose=0)
    assert "val_sharpness" not in history.history
    assert sorted(history.history) == ["loss", "mae", "sharpness",
                                       "val_loss", "val_mae"]
    np.testing.assert_array_equal(sam.predict(x, verbose=0),
                                  model.predict(x, verbose=0))
    assert sam.evaluate(x, y, verbose=0, return_dict=True) == \
        model.evaluate(x, y, verbose=0, return_dict=True)


class TwoInputNet(keras.Model):
    def __init__(self):
        super().__init__()
        self.a = keras.layers.Dense(8, activation="relu")
        self.b = keras.layers.Dense(2)

    def call(self, inputs):
        left, right = inputs
        return self.b(self.a(keras.ops.concatenate([left, right], axis=-1)))


def test_subclassed_model_with_two_inputs_trains():
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(32, 3)).astype("float32"),
         rng.normal(size=(32, 4)).astype("float32"))
    y = rng.normal(size=(32, 2)).astype("float32")
    sam = keras_sam.SAMModel(TwoInputNet(), rho=0.05)
    sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    history = sam.fit(x, y, batch_size=8, epochs=5, verbose=0)
    loss = history.history["loss"]
    assert loss[-1] < loss[0]
    assert all(s > 0 for s in history.history["sharpness"])


def test_config_round_trip_keeps_every_argument():
    sam = keras_sam.SAMModel(tanh_mlp(), rho=0.123, name="my_sam")
    config = sam.get_config()
    assert config["rho"] == 0.123 and config["name"] == "my_sam"
    clone = keras_sam.SAMModel.from_config(config)
    assert isinstance(clone, keras_sam.SAMModel)
    assert clone.rho == 0.123 and clone.name == "my_sam"
    assert clone.get_config() == config
    # Every constructor argument is in the config.
    import inspect
    params = set(inspect.signature(keras_sam.SAMModel).parameters)
    assert params - {"kwargs"} <= set(config)


def test_keras_file_round_trip(tmp_path):
    x, y = regression_data()
    sam = keras_sam.SAMModel(tanh_mlp(l2=0.01), rho=0.07)
    sam.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    sam.fit(x, y, epochs=2, verbose=0)
    path = tmp_path / "sam.keras"
    sam.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is keras_sam.SAMModel and loaded.rho == 0.07
    for a, b in zip(sam.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(sam.optimizer.variables, loaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sharpness_shows_in_the_progress_bar(capsys):
    x, y = regression_data()
    sam = keras_sam.SAMModel(tanh_mlp(), rho=0.05)
    sam.compile(optimizer="sgd", loss="mse")
    sam.fit(x, y, epochs=1, verbose=1)
    assert "sharpness:" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [
    {"rho": -1.0}, {"rho": "big"},
])
def test_from_config_validates_too(bad):
    config = keras_sam.SAMModel(tanh_mlp()).get_config()
    config.update(bad)
    with pytest.raises((TypeError, ValueError), match="rho"):
        keras_sam.SAMModel.from_config(config)
