"""SAMModel around KerasHub tasks, on every backend: the task's own
preprocessing on raw inputs, its compile defaults, LoRA, causal LMs against
a float64 reference, saving (`.keras`, LoRA weights, presets)."""

import os
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest

keras_hub = pytest.importorskip("keras_hub")

import hub_models  # noqa: E402
import keras_sam  # noqa: E402
from keras_sam import hub  # noqa: E402

TASKS = {
    "text classifier": (hub_models.text_classifier,
                        lambda: hub_models.reviews(16)),
    "image classifier": (hub_models.image_classifier,
                         lambda: hub_models.raw_images(8)),
    "causal LM": (hub_models.causal_lm,
                  lambda: (hub_models.sentences(8), None)),
    "seq2seq LM": (hub_models.seq2seq_lm,
                   lambda: (hub_models.pairs(8), None)),
}


def _close(a, b, **kw):
    for u, v in zip(a, b):
        np.testing.assert_allclose(np.asarray(u), np.asarray(v), **kw)


# Every kind on TensorFlow, the text classifier on PyTorch (the suite's
# time on 2 cores); on JAX the causal LM's float64 test below covers raw
# strings through the task's pipeline into the step.
@pytest.mark.parametrize("kind", [
    pytest.param(k, marks=pytest.mark.backends(
        *(("tensorflow", "torch") if k == "text classifier"
          else ("tensorflow",)))) for k in TASKS])
def test_rho_0_trains_exactly_as_the_task_on_raw_inputs(kind):
    build, data = TASKS[kind]
    task, twin = build(), build()
    twin.set_weights(task.get_weights())
    x, y = data()
    sam = keras_sam.SAMModel(task, rho=0.0)
    sam.compile()   # the task's defaults, as task.compile() sets them
    assert type(sam.optimizer) is type(twin.optimizer)
    history = sam.fit(x, y, batch_size=4, epochs=1, verbose=0)
    expected = twin.fit(x, y, batch_size=4, epochs=1, verbose=0)
    _close(sam.model.get_weights(), twin.get_weights(), rtol=1e-5,
           atol=1e-6)
    assert history.history["loss"] == pytest.approx(
        expected.history["loss"], rel=1e-5)
    if kind in ("text classifier", "image classifier"):
        np.testing.assert_allclose(sam.predict(x, verbose=0),
                                   twin.predict(x, verbose=0), rtol=1e-5,
                                   atol=1e-6)
    if keras.backend.backend() == "tensorflow" and y is not None:
        assert sam.evaluate(x, y, verbose=0) == pytest.approx(
            twin.evaluate(x, y, verbose=0), rel=1e-5)


@pytest.mark.tensorflow_only
def test_every_input_form_of_task_fit():
    texts, labels = hub_models.reviews(24)
    weights = np.linspace(0.5, 1.5, 24).astype("float32")
    task, twin = hub_models.text_classifier(), hub_models.text_classifier()
    twin.set_weights(task.get_weights())
    sam = keras_sam.SAMModel(task, rho=0.0)
    sam.compile()
    import tensorflow as tf

    forms = [
        dict(x=texts, y=labels, sample_weight=weights, batch_size=8,
             validation_data=(texts[:8], labels[:8])),
        dict(x=texts, y=labels, batch_size=8, validation_split=0.25,
             class_weight={0: 1.0, 1: 3.0}),
        dict(x=tf.data.Dataset.from_tensor_slices((texts, labels)).batch(8),
             validation_data=tf.data.Dataset.from_tensor_slices(
                 (texts[:8], labels[:8])).batch(4)),
    ]
    for form in forms:
        logs = sam.fit(**form, epochs=1, verbose=0).history
        expected = twin.fit(**form, epochs=1, verbose=0).history
        assert set(logs) == set(expected) | {"sharpness"}
        for key in expected:
            assert logs[key] == pytest.approx(expected[key], rel=1e-5), key
    _close(sam.model.get_weights(), twin.get_weights(), rtol=1e-5,
           atol=1e-6)
    # One batch at a time, raw, as the task takes it.
    sam.train_on_batch(texts[:8], labels[:8])
    twin.train_on_batch(texts[:8], labels[:8])
    assert sam.test_on_batch(texts[:8], labels[:8]) == pytest.approx(
        twin.test_on_batch(texts[:8], labels[:8]), rel=1e-5)
    np.testing.assert_allclose(sam.predict_on_batch(texts[:4]),
                               twin.predict_on_batch(texts[:4]), rtol=1e-5,
                               atol=1e-6)


class RecordingSAM(keras_sam.SAMModel):
    """Keeps the inputs of every training step (run eagerly)."""

    def train_step(self, *args):
        data = args[-1]
        self.seen.append(np.asarray(keras.utils.unpack_x_y_sample_weight(
            data)[0]))
        return super().train_step(*args)


@pytest.mark.tensorflow_only
def test_raw_images_reach_the_step_resized_and_rescaled():
    images, labels = hub_models.raw_images(8)
    task = hub_models.image_classifier()
    sam = RecordingSAM(task, rho=0.05)
    sam.seen = []
    sam.compile(run_eagerly=True)
    sam.fit(images, labels, batch_size=4, epochs=1, verbose=0)
    assert [b.shape for b in sam.seen] == [(4, 16, 16, 3)] * 2
    for k, batch in enumerate(sam.seen):
        expected = np.asarray(task.preprocessor(images[4 * k:4 * k + 4]))
        np.testing.assert_allclose(batch, expected, atol=1 / 255)
    assert max(b.max() for b in sam.seen) <= 1.0   # rescaled, not 0..255


def _value_and_grad64(model, x, y, sample_weight, weights):
    """L and dL/dw of `model` (float64) at `weights`, the causal LM's loss:
    Keras's sparse cross-entropy from logits, weighted by the padding
    mask, by the backend's own autodiff."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    variables = model.trainable_variables
    for v, w in zip(variables, weights):
        v.assign(w)
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(y, model(x), sample_weight=sample_weight)
        grads = tape.gradient(loss, [v.value for v in variables])
    elif backend == "jax":
        import jax

        def f(values):
            out, _ = model.stateless_call(
                values, [v.value for v in model.non_trainable_variables], x)
            return loss_fn(y, out, sample_weight=sample_weight)

        loss, grads = jax.jit(jax.value_and_grad(f))(
            [v.value for v in variables])
    else:
        import torch

        loss = loss_fn(y, model(x), sample_weight=sample_weight)
        grads = torch.autograd.grad(loss, [v.value for v in variables])
    return (float(keras.ops.convert_to_numpy(loss)),
            [np.asarray(keras.ops.convert_to_numpy(g), np.float64)
             for g in grads])


def _reference_sam_step(model64, x, y, mask, weights, rho, lr):
    """One SAM step with SGD, in float64: e = rho g/||g||, w - lr g(w+e)."""
    _, g = _value_and_grad64(model64, x, y, mask, weights)
    scale = rho / np.sqrt(sum(np.sum(gi ** 2) for gi in g))
    climbed = [w + scale * gi for w, gi in zip(weights, g)]   # w + e
    _, g_sam = _value_and_grad64(model64, x, y, mask, climbed)
    return [w - lr * gi for w, gi in zip(weights, g_sam)]


def _float64_context():
    if keras.backend.backend() == "jax":
        import jax

        return jax.enable_x64(True)
    import contextlib

    return contextlib.nullcontext()


def test_causal_lm_step_honours_the_padding_mask_against_float64():
    texts = hub_models.sentences(6, seed=3)
    lm = hub_models.causal_lm()
    x, y, mask = lm.preprocessor(list(texts))
    mask = np.asarray(mask)
    assert 0 < mask.mean() < 1   # padding to ignore
    weights = [np.asarray(w, np.float64) for w in lm.get_weights()]
    rho, lr = 0.5, 0.5
    sam = keras_sam.SAMModel(lm, rho=rho)
    sam.compile(optimizer=keras.optimizers.SGD(lr))
    sam.train_on_batch(list(texts))   # raw strings, as lm.train_on_batch takes
    got = [np.asarray(w, np.float64) for w in lm.trainable_weights]

    with _float64_context():
        lm64 = hub_models.causal_lm(dtype="float64")
        lm64.set_weights(weights)
        start = [np.asarray(w, np.float64) for w in lm64.trainable_weights]
        x64 = {k: keras.ops.convert_to_tensor(np.asarray(v))
               for k, v in x.items()}
        y64 = keras.ops.convert_to_tensor(np.asarray(y))
        expected = _reference_sam_step(lm64, x64, y64, mask, start, rho, lr)
        unmasked = _reference_sam_step(lm64, x64, y64, np.ones_like(mask),
                                       start, rho, lr)
    step = [e - s for e, s in zip(expected, start)]
    error = max(np.abs(g - e).max() for g, e in zip(got, expected))
    scale = max(np.abs(s).max() for s in step)
    assert error < 1e-4 * scale + 1e-7, (error, scale)
    # The test can tell: the mask moves the step by far more than that.
    gap = max(np.abs(u - e).max() for u, e in zip(unmasked, expected))
    assert gap > 100 * error


@pytest.mark.tensorflow_only
def test_causal_lm_compiles_with_its_defaults_and_generates():
    lm = hub_models.causal_lm()
    sam = keras_sam.SAMModel(lm, rho=0.05)
    sam.compile(optimizer=keras.optimizers.Adam(1e-2))
    config = sam.get_compile_config()
    assert config["loss"]["config"]["from_logits"] is True
    assert [m["class_name"] for m in config["weighted_metrics"]] == [
        "SparseCategoricalAccuracy"]
    logs = sam.fit(hub_models.sentences(16), batch_size=4, epochs=2,
                   verbose=0).history
    assert logs["loss"][1] < logs["loss"][0]
    assert "sparse_categorical_accuracy" in logs and "sharpness" in logs
    out = lm.generate(["a b"], max_length=8)   # on the task: same weights
    assert isinstance(out[0], str) and out[0].startswith("a b")


def test_no_warning_for_a_task_that_compiled_itself():
    task = hub_models.text_classifier()
    assert task.compiled
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        keras_sam.SAMModel(task)
    with pytest.raises(ValueError, match=r"sam_model\.compile\(\)` sets"):
        keras_sam.SAMModel(task).fit(*hub_models.reviews(4), verbose=0)
    task.compile(optimizer=keras.optimizers.SGD(0.1))   # the user's choice
    with pytest.warns(UserWarning, match="is compiled"):
        keras_sam.SAMModel(task)


@pytest.mark.tensorflow_only
def test_a_task_without_preprocessor_trains_as_its_own_fit():
    """Model-ready tensors, through the task's pipeline as `task.fit` takes
    them (its dataset's static shapes change TensorFlow's graph rewrites):
    bit for bit at rho = 0."""
    task = hub_models.text_classifier(preprocessor=False)
    twin = hub_models.text_classifier(preprocessor=False)
    twin.set_weights(task.get_weights())
    texts, labels = hub_models.reviews(8)
    tokens = hub_models.text_classifier().preprocessor(texts)
    sam = keras_sam.SAMModel(twin, rho=0.0)
    assert hub.pipeline(sam) is not None
    sam.compile()
    for model in (task, sam):
        model.fit(tokens, labels, batch_size=4, epochs=2, verbose=0)
    for a, b in zip(twin.get_weights(), task.get_weights()):
        np.testing.assert_array_equal(a, b)
    plain = keras_sam.SAMModel(keras.Sequential([keras.layers.Dense(1)]))
    assert hub.pipeline(plain) is None


def _lora_setup(rank=2):
    task = hub_models.text_classifier()
    task.backbone.enable_lora(rank)
    return task


@pytest.mark.parametrize("direction", [
    "gradient", pytest.param("momentum", marks=pytest.mark.tensorflow_only)])
def test_lora_perturbs_and_trains_only_the_lora_weights(tmp_path, direction):
    task = _lora_setup()
    frozen = {v.path: np.asarray(v) for v in task.backbone.weights
              if not v.trainable}
    lora = [v for v in task.trainable_variables if "lora" in v.path]
    assert lora and len(lora) < len(task.trainable_variables)
    rho = 0.05 if direction == "gradient" else 1.0
    sam = keras_sam.SAMModel(task, rho=rho, direction=direction)
    sam.compile(optimizer=keras.optimizers.Adam(5e-2))
    assert len(sam.trainable_variables) == len(task.trainable_variables)
    before = [np.asarray(v) for v in lora]
    texts, labels = hub_models.reviews(16)
    sam.fit(texts, labels, batch_size=8, epochs=2, verbose=0)
    for v in task.backbone.weights:
        if v.path in frozen:
            np.testing.assert_array_equal(np.asarray(v), frozen[v.path])
    assert all(np.abs(np.asarray(v) - b).max() > 0
               for v, b in zip(lora, before))
    # save_lora_weights / load_lora_weights round-trip after SAM.
    path = str(tmp_path / "adapter.lora.h5")
    task.backbone.save_lora_weights(path)
    fresh = _lora_setup()   # the LoRA weights at their initial values
    for v, w in zip(fresh.weights, task.weights):
        if "lora" not in v.path:   # the base weights and the head
            v.assign(np.asarray(w))
    assert np.abs(fresh.predict(texts, verbose=0)
                  - sam.predict(texts, verbose=0)).max() > 1e-5
    fresh.backbone.load_lora_weights(path)
    np.testing.assert_allclose(fresh.predict(texts, verbose=0),
                               sam.predict(texts, verbose=0), rtol=0,
                               atol=1e-7)


@pytest.mark.tensorflow_only
def test_keras_file_and_preset_round_trip_on_raw_inputs(tmp_path):
    task = hub_models.text_classifier()
    sam = keras_sam.SAMModel(task, rho=0.05)
    sam.compile()
    texts, labels = hub_models.reviews(16)
    sam.fit(texts, labels, batch_size=8, epochs=1, verbose=0)
    expected = sam.predict(texts, verbose=0)
    path = str(tmp_path / "sam.keras")
    sam.save(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        back = keras.saving.load_model(path)   # no custom_objects
    assert not [w for w in caught if "is compiled" in str(w.message)]
    assert isinstance(back, keras_sam.SAMModel)
    assert isinstance(back.model, keras_hub.models.BertTextClassifier)
    np.testing.assert_allclose(back.predict(texts, verbose=0), expected,
                               rtol=1e-6, atol=1e-7)
    back.fit(texts, labels, batch_size=8, epochs=1, verbose=0)   # resumes
    preset = str(tmp_path / "preset")
    task.save_to_preset(preset)
    loaded = keras_hub.models.TextClassifier.from_preset(preset)
    assert type(loaded) is type(task)
    np.testing.assert_allclose(loaded.predict(texts, verbose=0), expected,
                               rtol=1e-6, atol=1e-7)


def test_compile_auto_without_a_task_is_keras_default():
    sam = keras_sam.SAMModel(keras.Sequential([keras.layers.Dense(1)]))
    sam.compile(loss="mse")
    assert isinstance(sam.optimizer, keras.optimizers.RMSprop)


@pytest.mark.tensorflow_only
def test_importing_keras_sam_does_not_import_keras_hub():
    code = ("import sys, keras_sam; "
            "assert 'keras_hub' not in sys.modules, 'imported'; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, env=dict(os.environ), timeout=300)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.backends("tensorflow", "torch")
def test_a_task_with_its_own_compute_loss_trains_its_own_objective():
    """BASNet sums the loss of 8 outputs in its `compute_loss`, running
    the backbone again: at rho = 0 the SAM model trains exactly as
    `task.fit`; at rho > 0 its logged loss is that objective at w."""
    x, y = hub_models.masks(8)
    task, twin = hub_models.basnet(), hub_models.basnet()
    twin.compile(optimizer=keras.optimizers.SGD(0.01))
    sam = keras_sam.SAMModel(task, rho=0.0)
    sam.compile(optimizer=keras.optimizers.SGD(0.01))
    got = sam.fit(x, y, batch_size=4, epochs=1, shuffle=False,
                  verbose=0).history
    expected = twin.fit(x, y, batch_size=4, epochs=1, shuffle=False,
                        verbose=0).history
    assert got["loss"] == expected["loss"] and expected["loss"][0] > 4.0
    for a, b in zip(task.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)
    sam = keras_sam.SAMModel(hub_models.basnet(), rho=0.05)
    sam.compile(optimizer=keras.optimizers.SGD(0.01))
    before = [np.array(w) for w in sam.model.get_weights()]
    logs = sam.train_on_batch(x[:4], y[:4], return_dict=True)
    assert np.isfinite(logs["loss"]) and logs["loss"] > 4.0
    assert logs["sharpness"] > 0.0
    assert max(np.max(np.abs(a - b)) for a, b in
               zip(before, sam.model.get_weights())) > 0.0


def test_compile_passes_a_tasks_own_arguments():
    """A causal LM's `compile(sampler=...)` is KerasHub's, and SAM's."""
    sam = keras_sam.SAMModel(hub_models.causal_lm(), rho=0.05)
    sam.compile(sampler="greedy")
    assert type(sam.model.sampler).__name__ == "GreedySampler"
    assert sam.get_compile_config()["sampler"] == "greedy"
