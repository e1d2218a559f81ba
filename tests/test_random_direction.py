"""A random e (`direction="random"`, keras_sam.noise): the step against the
float64 reference, Flat-LoRA's noise on the merged weight, the draws, the
invariants, the errors and saving."""

import keras
import numpy as np
import pytest

import keras_sam
import reference
from conftest import dropout_bn_mlp, regression_data, tanh_mlp, weights64
from keras_sam import noise


def _batches(steps, seed=50):
    return [regression_data(n=16, seed=seed + i) for i in range(steps)]


def _f64(batches):
    return [(x.astype(np.float64), y.astype(np.float64)) for x, y in batches]


def _draws(sam, n, steps, jit=False):
    """The flat z of each step, drawn as the step draws them (XLA's
    stateless normal on TensorFlow is another generator than the eager
    op's)."""
    draw = sam.noise_seed.normal
    if jit and keras.backend.backend() == "tensorflow":
        import tensorflow as tf
        draw = tf.function(draw, jit_compile=True)
    return [np.asarray(keras.ops.convert_to_numpy(draw(n, t)), np.float64)
            for t in range(steps)]


def _lora_mlp(seed=3):
    model = tanh_mlp(seed=seed)
    model.layers[0].enable_lora(2)
    # B starts at 0; give it values so that W + s A B differs from W.
    b = model.layers[0].lora_kernel_b
    b.assign(np.random.default_rng(seed).normal(
        scale=0.3, size=b.shape).astype("float32"))
    return model


OPTIMIZERS = {
    "sgd_momentum": (lambda: keras.optimizers.SGD(0.1, momentum=0.9),
                     lambda: reference.SGD(0.1, momentum=0.9)),
    "adam": (lambda: keras.optimizers.Adam(0.02),
             lambda: reference.Adam(0.02)),
}


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_matches_float64_reference(name, jit):
    make_keras, make_ref = OPTIMIZERS[name]
    model = tanh_mlp(l2=0.01, seed=3)
    start = weights64(model)
    sam = keras_sam.SAMModel(model, rho=0.3, direction="random", seed=7)
    sam.compile(optimizer=make_keras(), loss="mse", jit_compile=jit)
    batches = _batches(4)
    logs = [sam.train_on_batch(x, y, return_dict=True) for x, y in batches]
    draws = _draws(sam, sum(w.size for w in start), 4, jit)
    want, losses = reference.rwp_train(
        reference.TanhMLP(l2=0.01), make_ref(), start, _f64(batches), 0.3,
        draws)
    for got, ref in zip(weights64(model), want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # `loss` is L(w + e), the loss of the step's one gradient; no sharpness.
    np.testing.assert_allclose([log["loss"] for log in logs], losses,
                               rtol=1e-5)
    assert all("sharpness" not in log for log in logs)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_flat_lora_perturbs_the_merged_weight_not_the_adapters(jit):
    model = _lora_mlp()
    w1 = np.asarray(model.layers[0]._kernel, np.float64)
    start = [np.asarray(v, np.float64) for v in model.trainable_variables]
    sam = keras_sam.SAMModel(model, rho=0.2, direction="random", seed=11)
    sam.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                loss="mse", jit_compile=jit)
    batches = _batches(3)
    logs = [sam.train_on_batch(x, y, return_dict=True) for x, y in batches]
    # The noise is drawn over b1, the merged W1 (in A's place), W2, b2.
    n = start[0].size + w1.size + start[3].size + start[4].size
    net = reference.LoRATanhMLP(w1, scale=model.layers[0].lora_alpha / 2)
    want, losses = reference.flat_lora_train(
        net, reference.SGD(0.1, momentum=0.9), start, _f64(batches), 0.2,
        _draws(sam, n, 3, jit))
    got = [np.asarray(v, np.float64) for v in model.trainable_variables]
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([log["loss"] for log in logs], losses,
                               rtol=1e-5)
    # The frozen W is read as W + e in the pass and never written.
    np.testing.assert_array_equal(
        np.asarray(model.layers[0]._kernel, np.float64), w1)
    assert not model.layers[0]._kernel.trainable


def test_targets_put_lora_adapters_on_their_layers_weight():
    model = _lora_mlp()
    variables = model.trainable_variables
    targets = noise.targets(model, variables, [True] * len(variables))
    layer = model.layers[0]
    assert [t.variable.path for t in targets] == [
        layer.bias.path, layer._kernel.path, model.layers[1].kernel.path,
        model.layers[1].bias.path]
    assert targets[1].adapters[:2] == (layer.lora_kernel_a,
                                       layer.lora_kernel_b)
    # `perturb` still decides: adapters rejected, no noise on the layer.
    mask = [not v.path.endswith(("lora_kernel_a", "lora_kernel_b"))
            for v in variables]
    assert [t.variable.path for t in noise.targets(model, variables, mask)] \
        == [layer.bias.path, model.layers[1].kernel.path,
            model.layers[1].bias.path]


def test_perturb_selects_what_gets_noise():
    model = tanh_mlp(seed=3)
    start = weights64(model)
    sam = keras_sam.SAMModel(model, rho=0.3, direction="random", seed=5,
                             perturb=lambda v: len(v.shape) > 1)
    sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    batches = _batches(3)
    for x, y in batches:
        sam.train_on_batch(x, y)
    n = start[0].size + start[2].size
    want, _ = reference.rwp_train(
        reference.TanhMLP(), reference.SGD(0.1), start, _f64(batches), 0.3,
        _draws(sam, n, 3), mask=[True, False, True, False])
    for got, ref in zip(weights64(model), want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_the_noise_is_rho_times_each_filters_rms():
    rng = np.random.default_rng(0)
    w = (rng.normal(size=(400, 3)) * np.array([0.1, 1.0, 10.0])).astype(
        "float32")
    seed = noise.Seed(3)
    z = keras.ops.convert_to_numpy(seed.normal(w.size, 0))
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1.0) < 0.05
    (e,) = noise.random_perturbation([keras.ops.convert_to_tensor(w)], 0.05,
                                     keras.ops.convert_to_tensor(z))
    e = keras.ops.convert_to_numpy(e)
    rms = np.sqrt(np.mean(w.astype(np.float64) ** 2, axis=0))
    # Each column is a filter: ||e_f|| is about rho ||w_f||.
    np.testing.assert_allclose(np.sqrt(np.mean(e**2, axis=0)), 0.05 * rms,
                               rtol=0.1)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(noise.filter_rms(w)).ravel(), rms,
        rtol=1e-6)
    # A new draw each iteration, the same draw for the same key.
    again = keras.ops.convert_to_numpy(noise.Seed(3).normal(w.size, 0))
    np.testing.assert_array_equal(z, again)
    later = keras.ops.convert_to_numpy(seed.normal(w.size, 1))
    assert abs(np.corrcoef(z, later)[0, 1]) < 0.1


def test_rho_zero_is_the_base_optimizer_bit_for_bit():
    x, y = regression_data(n=64)
    base = dropout_bn_mlp()
    sam = keras_sam.SAMModel(dropout_bn_mlp(), rho=0.0, direction="random")
    # JAX: jitted, XLA fuses the two programs differently (the last bit may
    # differ, test_backends.py); run eagerly they agree.
    jit = False if keras.backend.backend() == "jax" else "auto"
    logs = []
    for m in (base, sam):
        m.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse",
                  jit_compile=jit)
        logs.append(m.fit(x, y, batch_size=16, epochs=2, shuffle=False,
                          verbose=0).history)
    assert logs[0] == logs[1]
    for a, b in zip(base.get_weights(), sam.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_state_moves_once_per_step_and_training_differs_from_the_base():
    """BatchNorm statistics move as under a clean pass; the noise changes
    the weights' path."""
    x, y = regression_data(n=64)
    base = dropout_bn_mlp()
    sam = keras_sam.SAMModel(dropout_bn_mlp(), rho=0.5, direction="random")
    for m in (base, sam):
        m.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
        m.fit(x, y, batch_size=64, epochs=1, shuffle=False, verbose=0)
    bn_base, bn_sam = base.layers[2], sam.model.layers[2]
    np.testing.assert_allclose(np.asarray(bn_sam.moving_mean),
                               np.asarray(bn_base.moving_mean), atol=0.05)
    assert not np.allclose(np.asarray(bn_sam.moving_mean), 0.0)
    assert not np.allclose(base.layers[0].get_weights()[0],
                           sam.model.layers[0].get_weights()[0], atol=1e-6)


def test_a_non_finite_gradient_skips_the_step():
    model = _lora_mlp()
    sam = keras_sam.SAMModel(model, rho=0.2, direction="random")
    sam.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    x, y = regression_data(n=16)
    sam.train_on_batch(x, y)
    weights = model.get_weights()
    slots = [np.asarray(v) for v in sam.optimizer.variables]
    x[2, 0] = np.nan
    logs = sam.train_on_batch(x, y, return_dict=True)
    assert not np.isfinite(logs["loss"])
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(slots[1:], sam.optimizer.variables[1:]):
        np.testing.assert_array_equal(a, np.asarray(b))


@pytest.mark.parametrize("kwargs", [
    dict(sam_every=2), dict(gsam_alpha=0.1), dict(num_batch_splits=2),
    dict(p=3.0), dict(adaptive=True)])
def test_what_a_random_e_cannot_take_is_refused(kwargs):
    name = sorted(kwargs)[-1]
    with pytest.raises(ValueError, match=f"{name}=.*no meaning"):
        keras_sam.SAMModel(tanh_mlp(), direction="random", **kwargs)


def test_a_seed_without_a_random_direction_is_refused():
    with pytest.raises(ValueError, match="seed.*direction='random'"):
        keras_sam.SAMModel(tanh_mlp(), seed=3)
    with pytest.raises(TypeError, match="`seed` must be an integer"):
        keras_sam.SAMModel(tanh_mlp(), direction="random", seed=1.5)


def test_save_and_load_mid_training_resumes_identically(tmp_path):
    """The seed is in the config, so a loaded model draws the same e."""
    sam = keras_sam.SAMModel(tanh_mlp(seed=3), rho=0.2, direction="random")
    sam.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
    for x, y in _batches(2):
        sam.train_on_batch(x, y)
    path = str(tmp_path / "random.keras")
    sam.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.options.direction == "random"
    assert loaded.options.seed == sam.options.seed
    for x, y in _batches(2, seed=90):
        sam.train_on_batch(x, y)
        loaded.train_on_batch(x, y)
    for a, b in zip(sam.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
