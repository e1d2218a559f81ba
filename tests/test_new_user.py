"""What a new user meets first: weights files between the plain and the SAM
model, compile mistakes, sharpness on datasets, summary, packaging."""

import re
import tomllib
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam
from conftest import bn_mlp, regression_data

ROOT = Path(__file__).parents[1]


def _fit_sam(model, **kwargs):
    x, y = regression_data(n=32)
    sam = keras_sam.SAMModel(model, rho=0.1, **kwargs)
    sam.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    sam.fit(x, y, batch_size=8, epochs=1, verbose=0)
    return sam


def _same(a_weights, b_weights):
    assert len(a_weights) == len(b_weights)
    for a, b in zip(a_weights, b_weights):
        np.testing.assert_array_equal(a, b)


# -------------------------------------------------- weights files, both ways

def test_plain_weights_file_loads_into_the_sam_model(tmp_path):
    pretrained = bn_mlp(seed=1)
    pretrained.save_weights(tmp_path / "p.weights.h5")
    sam = keras_sam.SAMModel(bn_mlp(seed=2), rho=0.05)
    sam.load_weights(tmp_path / "p.weights.h5")
    _same(sam.model.get_weights(), pretrained.get_weights())
    # ... and fine-tuning starts from them.
    sam.compile(optimizer="sgd", loss="mse")
    x, y = regression_data(n=16)
    sam.fit(x, y, epochs=1, verbose=0)


def test_sam_weights_file_loads_into_the_plain_model(tmp_path):
    sam = _fit_sam(bn_mlp(seed=1), sam_every=2, looksam_alpha=0.5)
    sam.save_weights(tmp_path / "s.weights.h5")
    plain = bn_mlp(seed=2)
    plain.load_weights(tmp_path / "s.weights.h5")
    _same(plain.get_weights(), sam.model.get_weights())
    # ... and the SAM model still reads its own file, state included.
    again = keras_sam.SAMModel(bn_mlp(seed=3), rho=0.1, sam_every=2,
                               looksam_alpha=0.5)
    again.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    again.optimizer.build(again.trainable_variables)
    again.load_weights(tmp_path / "s.weights.h5")
    _same(again.get_weights(), sam.get_weights())


def test_model_checkpoint_weights_go_to_a_plain_model(tmp_path):
    x, y = regression_data(n=32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)),
                              keras.layers.Dense(8, activation="relu"),
                              keras.layers.Dense(3)])
    sam = keras_sam.SAMModel(model, rho=0.05)
    sam.compile(optimizer="adam", loss="mse")
    sam.fit(x, y, epochs=2, verbose=0, callbacks=[
        keras.callbacks.ModelCheckpoint(str(tmp_path / "w-{epoch}.weights.h5"),
                                        save_weights_only=True)])
    deploy = keras.Sequential([keras.Input((5,)), keras.layers.Dense(8),
                               keras.layers.Dense(3)])
    deploy.load_weights(tmp_path / "w-2.weights.h5")
    _same(deploy.get_weights(), model.get_weights())


def test_functional_models_round_trip_both_ways(tmp_path):
    def make(seed):
        keras.utils.set_random_seed(seed)
        a, b = keras.Input((5,), name="a"), keras.Input((2,), name="b")
        h = keras.layers.Dense(4)(keras.layers.Concatenate()([a, b]))
        return keras.Model([a, b], [keras.layers.Dense(1)(h),
                                    keras.layers.Dense(2)(h)])

    plain = make(1)
    plain.save_weights(tmp_path / "p.weights.h5")
    sam = keras_sam.SAMModel(make(2))
    sam.load_weights(tmp_path / "p.weights.h5")
    _same(sam.model.get_weights(), plain.get_weights())
    sam.save_weights(tmp_path / "s.weights.h5")
    other = make(3)
    other.load_weights(tmp_path / "s.weights.h5")
    _same(other.get_weights(), plain.get_weights())


class _OwnVariables(keras.Model):
    """A subclassed model with a variable of its own, outside any layer."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.dense = keras.layers.Dense(3)

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(3,), initializer="ones")
        self.dense.build(input_shape)

    def call(self, x):
        return self.dense(x) * self.scale


def test_subclassed_model_with_its_own_variables_both_ways(tmp_path):
    x, y = regression_data(n=16)
    model = _OwnVariables()
    model.build((None, 5))
    sam = keras_sam.SAMModel(model, rho=0.1)
    sam.compile(optimizer="sgd", loss="mse")
    sam.fit(x, y, verbose=0)
    sam.save_weights(tmp_path / "s.weights.h5")
    plain = _OwnVariables()
    plain.build((None, 5))
    plain.load_weights(tmp_path / "s.weights.h5")
    _same(plain.get_weights(), model.get_weights())
    again = keras_sam.SAMModel(_OwnVariables(), rho=0.1)
    again.model.build((None, 5))
    again.load_weights(tmp_path / "s.weights.h5")
    _same(again.model.get_weights(), model.get_weights())


def test_weights_of_another_architecture_never_advise_skip_mismatch(tmp_path):
    keras.Sequential([keras.Input((5,)), keras.layers.Dense(9)]).save_weights(
        tmp_path / "other.weights.h5")
    sam = keras_sam.SAMModel(bn_mlp())
    before = sam.get_weights()
    with pytest.raises(ValueError) as info:
        sam.load_weights(tmp_path / "other.weights.h5")
    assert "skip_mismatch" not in str(info.value).split("Keras said")[0]
    _same(sam.get_weights(), before)


# ------------------------------------------------------- compile mistakes

def test_compiling_the_wrapped_model_says_to_compile_the_sam_model():
    model = bn_mlp()
    model.compile(optimizer="sgd", loss="mse")
    with pytest.warns(UserWarning, match="'net' is compiled"):
        sam = keras_sam.SAMModel(model)
    x, y = regression_data()
    with pytest.raises(ValueError, match=r"SAMModel is not compiled, but "
                       r"the model it wraps \('net'\) is.*sam_model.compile"):
        sam.fit(x, y, verbose=0)
    with pytest.raises(ValueError, match="Compile the SAMModel"):
        keras_sam.SAMModel(bn_mlp()).fit(x, y, verbose=0)


def test_wrapping_a_sam_model_is_refused():
    sam = keras_sam.SAMModel(bn_mlp())
    with pytest.raises(TypeError, match="already a SAMModel.*sam_model.model"):
        keras_sam.SAMModel(sam)


# ---------------------------------------------------------- sharpness input

def _compiled(loss="sparse_categorical_crossentropy"):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4)])
    model.compile(loss=keras.losses.get(loss) if loss != "cce_logits" else
                  keras.losses.CategoricalCrossentropy(from_logits=True))
    return model


def test_sharpness_accepts_what_evaluate_accepts():
    model = _compiled(keras.losses.SparseCategoricalCrossentropy(
        from_logits=True))
    x, _ = regression_data(n=40)
    y = np.arange(40) % 4
    want = keras_sam.analysis.sharpness(model, x, y, rho=0.1, batch_size=10)
    assert want > 0
    dataset = tf.data.Dataset.from_tensor_slices((x, y)).batch(10)
    assert keras_sam.analysis.sharpness(model, dataset, rho=0.1) == \
        pytest.approx(want, rel=1e-6)

    class Batches(keras.utils.PyDataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return x[10 * i:10 * i + 10], y[10 * i:10 * i + 10]

    assert keras_sam.analysis.sharpness(model, Batches(), rho=0.1) == \
        pytest.approx(want, rel=1e-6)
    # The first two batches only.
    first = keras_sam.analysis.sharpness(model, x[:20], y[:20], rho=0.1,
                                         batch_size=10)
    assert keras_sam.analysis.sharpness(model, dataset, rho=0.1, steps=2) \
        == pytest.approx(first, rel=1e-6)


def test_sharpness_explains_one_hot_labels_with_a_sparse_loss():
    model = _compiled()
    x, _ = regression_data(n=20)
    one_hot = np.eye(4)[np.arange(20) % 4]
    with pytest.raises(ValueError, match="one-hot labels with a sparse loss"):
        keras_sam.analysis.sharpness(model, x, one_hot, batch_size=10)


def test_sharpness_on_empty_data_says_so():
    model = _compiled()
    with pytest.raises(ValueError, match="no examples"):
        keras_sam.analysis.sharpness(
            model, tf.data.Dataset.from_tensor_slices(
                (np.zeros((0, 5), "float32"), np.zeros((0,)))).batch(4))


def test_dotted_names_from_the_readme_resolve():
    import subprocess
    import sys
    code = ("import keras_sam; keras_sam.analysis.sharpness; "
            "keras_sam.selection.NormalizationOnly; "
            "keras_sam.schedules.RhoFollowsLearningRate")
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------- summary

def test_summary_shows_the_wrapped_layers_and_the_settings():
    sam = keras_sam.SAMModel(bn_mlp(), rho=0.1, adaptive=True, sam_every=2)
    lines = []
    sam.summary(print_fn=lambda line, *args, **kwargs: lines.append(line))
    text = "\n".join(lines)
    assert "batch_normalization" in text and "dense" in text
    assert "SAM settings: rho=0.1, adaptive=True, sam_every=2" in text


# --------------------------------------------------------------- packaging

def test_package_metadata():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert meta["license"] == "Apache-2.0"
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert meta["license-files"] == ["LICENSE"]
    assert meta["urls"] and meta["authors"]
    versions = [c for c in meta["classifiers"]
                if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)]
    assert len(versions) >= 3
    # TensorFlow is an extra, so that tensorflow-cpu users get no second copy.
    assert not any(d.startswith("tensorflow") for d in meta["dependencies"])
    extras = meta["optional-dependencies"]
    assert any(d.startswith("tensorflow>=") for d in extras["tensorflow"])
    assert any(d.startswith("tensorflow-cpu>=") for d in extras["cpu"])


def test_the_readme_quickstart_runs_verbatim(tmp_path):
    """The first Python block of the README is a whole program."""
    import subprocess
    import sys

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Quickstart"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    done = subprocess.run([sys.executable, "-c", code], cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "sharpness" in done.stdout
    assert (tmp_path / "model.keras").exists()
