"""SAMModel in the rest of the Keras training loop: stateful layers, XLA,
steps_per_execution, gradient accumulation, clipping, weight decay, sparse
gradients, frozen, shared and nested layers, add_loss, sample and class
weights."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam
import reference
from conftest import bn_mlp, regression_data, tanh_mlp, weights64


def _as64(batches):
    return [(np.asarray(x, np.float64), np.asarray(y, np.float64))
            for x, y in batches]


def _deep_bn_model(synchronized=False, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(8, activation="tanh", name="d1")(inputs)
    h = keras.layers.BatchNormalization(name="bn1",
                                        synchronized=synchronized)(h)
    h = keras.layers.Dense(6, activation="tanh", name="d2")(h)
    deep_input = h
    h = keras.layers.BatchNormalization(name="bn2",
                                        synchronized=synchronized)(h)
    outputs = keras.layers.Dense(3, name="out")(h)
    return keras.Model(inputs, outputs), keras.Model(inputs, deep_input)


@pytest.mark.parametrize("synchronized", [
    False, pytest.param(True, marks=pytest.mark.tensorflow_only)])
def test_batchnorm_statistics_move_once_from_the_clean_pass(synchronized):
    model, features = _deep_bn_model(synchronized)
    x, y = regression_data(n=32)
    # The input of bn2 at the initial weights, in training mode: pass 1.
    deep = keras.ops.convert_to_numpy(
        keras.ops.stop_gradient(features(x, training=True))).astype(np.float64)
    bn2 = model.get_layer("bn2")
    momentum = bn2.momentum
    mean0 = np.asarray(bn2.moving_mean, np.float64)
    var0 = np.asarray(bn2.moving_variance, np.float64)

    kernel0 = np.asarray(model.get_layer("d2").kernel)
    sam = keras_sam.SAMModel(model, rho=0.5)
    sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    sam.train_on_batch(x, y)
    # The weights moved, so statistics from pass 2 (at w + e) would differ.
    assert np.max(np.abs(np.asarray(model.get_layer("d2").kernel.numpy())
                         - kernel0)) > 1e-3

    np.testing.assert_allclose(
        bn2.moving_mean.numpy(), momentum * mean0 + (1 - momentum) * deep.mean(0),
        rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        bn2.moving_variance.numpy(),
        momentum * var0 + (1 - momentum) * deep.var(0), rtol=1e-5)


def test_dropout_seed_advances_once_per_step():
    def make():
        keras.utils.set_random_seed(3)
        return keras.Sequential([
            keras.Input((5,)), keras.layers.Dense(8),
            keras.layers.Dropout(0.5, seed=9), keras.layers.Dense(3)])

    x, y = regression_data()
    base, inner = make(), make()
    base.compile(optimizer="sgd", loss="mse")
    sam = keras_sam.SAMModel(inner, rho=0.2)
    sam.compile(optimizer="sgd", loss="mse")
    for _ in range(3):
        base.train_on_batch(x, y)
        sam.train_on_batch(x, y)
    seed_base = np.asarray(base.layers[1].seed_generator.state)
    seed_sam = np.asarray(inner.layers[1].seed_generator.state)
    np.testing.assert_array_equal(seed_base, seed_sam)
    assert not np.array_equal(seed_sam,
                              np.asarray(make().layers[1].seed_generator.state))


# ----------------------------------------------------------- mixed precision

def _mixed_mlp(seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(16, activation="relu"),
        keras.layers.Dense(3, dtype="float32"),
    ])


def test_mixed_float16_rho_zero_equals_base_with_loss_scaling():
    keras.mixed_precision.set_global_policy("mixed_float16")
    x, y = regression_data(n=64)
    base, sam = _mixed_mlp(), keras_sam.SAMModel(_mixed_mlp(), rho=0.0)
    for m in (base, sam):
        m.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                  loss="mse")
    assert isinstance(sam.optimizer, keras.optimizers.LossScaleOptimizer)
    base.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    sam.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(base.get_weights(), sam.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_mixed_float16_pass1_overflow_skips_the_step():
    keras.mixed_precision.set_global_policy("mixed_float16")
    x, y = regression_data()
    model = _mixed_mlp()
    sam = keras_sam.SAMModel(model, rho=0.05)
    sam.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    sam.train_on_batch(x, y)
    weights = model.get_weights()
    slots = [np.asarray(v) for v in sam.optimizer.inner_optimizer.variables]
    # A scale this large overflows float16 in the backward pass of pass 1.
    sam.optimizer.dynamic_scale.assign(1e30)
    sam.train_on_batch(x, y)
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(slots, sam.optimizer.inner_optimizer.variables):
        np.testing.assert_array_equal(a, np.asarray(b))
    np.testing.assert_allclose(float(sam.optimizer.dynamic_scale), 5e29,
                               rtol=1e-6)
    # Training goes on: the scale keeps halving until steps are taken again.
    history = sam.fit(x, y, batch_size=8, epochs=30, verbose=0)
    assert int(sam.optimizer.iterations) > 1
    assert np.isfinite(history.history["loss"][-1])
    assert all(np.all(np.isfinite(w)) for w in model.get_weights())


class Tripwire(keras.layers.Layer):
    """y = x * w + c |w - 1|^2: the extra term is exactly 0 at w = 1, and
    large enough at w + e that the scaled float16 backward pass overflows.
    Pass 1 is finite, pass 2 is not."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        gap = self.w - 1.0
        return x * self.w + 6e4 * keras.ops.sum(gap * gap)


def test_mixed_float16_pass2_overflow_skips_the_step():
    keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((3,)), Tripwire(),
                              keras.layers.Dense(1, dtype="float32")])
    sam = keras_sam.SAMModel(model, rho=0.05)
    sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = regression_data(n=8, n_in=3, n_out=1)
    weights = model.get_weights()
    scale = float(sam.optimizer.initial_scale)
    logs = sam.train_on_batch(x, y, return_dict=True)
    assert np.isfinite(logs["loss"])
    for a, b in zip(weights, model.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert float(sam.optimizer.dynamic_scale) == scale / 2
    assert int(sam.optimizer.iterations) == 0


def test_mixed_bfloat16_trains():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    x, y = regression_data(n=64)
    model = _mixed_mlp()
    sam = keras_sam.SAMModel(model, rho=0.05)
    sam.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    assert model.layers[0].compute_dtype == "bfloat16"
    history = sam.fit(x, y, batch_size=16, epochs=10, verbose=0)
    loss = history.history["loss"]
    assert loss[-1] < 0.8 * loss[0]
    assert all(s > 0 for s in history.history["sharpness"])
    assert model.weights[0].dtype == "float32"


# ------------------------------------------------ XLA, steps_per_execution

def test_jit_compile_matches_the_graph_step():
    x, y = regression_data(n=64)
    results = []
    for jit in (False, True):
        model = bn_mlp()
        sam = keras_sam.SAMModel(model, rho=0.1)
        sam.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse",
                    jit_compile=jit)
        assert sam.jit_compile is jit
        history = sam.fit(x, y, batch_size=16, epochs=3, shuffle=False,
                          verbose=0)
        results.append((model.get_weights(), history.history))
    (w_graph, h_graph), (w_xla, h_xla) = results
    for a, b in zip(w_graph, w_xla):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(h_graph["sharpness"], h_xla["sharpness"],
                               rtol=1e-3)


@pytest.mark.backends("tensorflow", "jax")   # Keras: torch runs 1
def test_steps_per_execution_gives_the_same_weights():
    x, y = regression_data(n=64)
    weights = []
    for n in (1, 4):
        model = bn_mlp()
        sam = keras_sam.SAMModel(model, rho=0.1)
        sam.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                    loss="mse", steps_per_execution=n)
        sam.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        weights.append(model.get_weights())
    for a, b in zip(*weights):
        np.testing.assert_array_equal(a, b)


# ---------------------------- optimizer features against the reference

def test_gradient_accumulation_gives_each_micro_batch_its_own_e():
    rho, lr, k = 0.1, 0.1, 3
    model = tanh_mlp(seed=1)
    start = weights64(model)
    sam = keras_sam.SAMModel(model, rho=rho)
    sam.compile(optimizer=keras.optimizers.SGD(
        lr, momentum=0.5, gradient_accumulation_steps=k), loss="mse")
    batches = [regression_data(n=8, seed=20 + i) for i in range(2 * k)]
    for x, y in batches:
        sam.train_on_batch(x, y)

    net, opt, params = reference.TanhMLP(), reference.SGD(lr, 0.5), start
    for first in (0, k):
        micro = _as64(batches[first:first + k])
        g_sams = [reference.sam_gradient(net, params, x, y, rho)[0]
                  for x, y in micro]  # each at the same w, its own e
        mean = [np.mean(gs, axis=0) for gs in zip(*g_sams)]
        params = opt.step(params, mean)
    for got, want in zip(weights64(model), params):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("clip", ["clipnorm", "global_clipnorm",
                                  "clipvalue"])
def test_clipping_applies_to_the_sam_gradient(clip):
    rho, lr, c = 0.1, 0.5, 0.05
    model = tanh_mlp(seed=2)
    start = weights64(model)
    sam = keras_sam.SAMModel(model, rho=rho)
    sam.compile(optimizer=keras.optimizers.SGD(lr, **{clip: c}), loss="mse")
    batches = [regression_data(n=16, seed=40 + i) for i in range(2)]
    for x, y in batches:
        sam.train_on_batch(x, y)

    clip_fn = {
        "clipnorm": lambda g: reference.clip_by_norm(g, c),
        "global_clipnorm": lambda g: reference.clip_by_global_norm(g, c),
        "clipvalue": lambda g: [np.clip(gi, -c, c) for gi in g],
    }[clip]
    params, net = start, reference.TanhMLP()
    for x, y in _as64(batches):
        g_sam, _ = reference.sam_gradient(net, params, x, y, rho)
        clipped = clip_fn(g_sam)
        assert any(not np.allclose(a, b) for a, b in zip(clipped, g_sam))
        params = [p - lr * g for p, g in zip(params, clipped)]
    for got, want in zip(weights64(model), params):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_adamw_weight_decay_is_decoupled_from_e():
    rho, l2 = 0.1, 0.01
    model = tanh_mlp(l2=l2, seed=3)
    start = weights64(model)
    sam = keras_sam.SAMModel(model, rho=rho)
    sam.compile(optimizer=keras.optimizers.AdamW(0.01, weight_decay=0.1),
                loss="mse")
    batches = [regression_data(n=16, seed=50 + i) for i in range(3)]
    for x, y in batches:
        sam.train_on_batch(x, y)
    expected, _ = reference.sam_train(
        reference.TanhMLP(l2=l2), reference.AdamW(0.01, 0.1), start,
        _as64(batches), rho)
    for got, want in zip(weights64(model), expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------ sparse gradients

class _RecordingSGD(keras.optimizers.SGD):
    """SGD that records the types of the gradients it is handed."""

    seen = []

    def apply(self, grads, trainable_variables=None):
        _RecordingSGD.seen.append([type(g).__name__ for g in grads])
        return super().apply(grads, trainable_variables)


def _embedding_model(vocab=50, dim=4, seed=0):
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((6,), dtype="int32"),
        keras.layers.Embedding(vocab, dim,
                               embeddings_initializer="random_normal"),
        keras.layers.GlobalAveragePooling1D(),
        keras.layers.Dense(2, bias_initializer="random_normal"),
    ])


def _token_batches(steps, vocab=50):
    rng = np.random.default_rng(0)
    out = []
    for _ in range(steps):
        tokens = rng.integers(0, 12, size=(8, 6)).astype("int32")
        tokens[:, 0] = tokens[:, 1]  # repeated rows within an example too
        out.append((tokens, rng.normal(size=(8, 2)).astype("float32")))
    return out


@pytest.mark.parametrize("jit", [False, True])
def test_embedding_gradients_against_reference(jit):
    rho, lr = 0.2, 0.5
    model = _embedding_model()
    start = weights64(model)
    _RecordingSGD.seen = []
    sam = keras_sam.SAMModel(model, rho=rho)
    sam.compile(optimizer=_RecordingSGD(lr), loss="mse", jit_compile=jit)
    batches = _token_batches(3)
    for tokens, y in batches:
        sam.train_on_batch(tokens, y)
    net, params = reference.EmbeddingBag(), start
    for tokens, y in batches:
        g_sam, _ = reference.sam_gradient(net, params, tokens,
                                          y.astype(np.float64), rho)
        params = [p - lr * g for p, g in zip(params, g_sam)]
    for got, want in zip(weights64(model), params):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Rows never looked up stay untouched (sparse update).
    np.testing.assert_array_equal(weights64(model)[0][12:], start[0][12:])
    if not jit and keras.backend.backend() == "tensorflow":
        # The optimizer receives the table's gradient as IndexedSlices.
        assert _RecordingSGD.seen[0][0] == "IndexedSlices"


# ----------------------- frozen, shared, nested layers; add_loss; weights

def test_frozen_layer_is_neither_perturbed_nor_counted_in_the_norm():
    rho, lr = 0.2, 0.3
    model = tanh_mlp(seed=4)
    start = weights64(model)
    model.layers[0].trainable = False
    sam = keras_sam.SAMModel(model, rho=rho)
    sam.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    batches = [regression_data(n=16, seed=60 + i) for i in range(2)]
    for x, y in batches:
        sam.train_on_batch(x, y)
    params, net, mask = start, reference.TanhMLP(), [False, False, True,
                                                     True]
    for x, y in _as64(batches):
        g_sam = reference.sam_gradient_masked(net, params, x, y, rho, mask)
        params = [p - lr * g if t else p
                  for p, g, t in zip(params, g_sam, mask)]
    got = weights64(model)
    np.testing.assert_array_equal(got[0], start[0])
    for g, w in zip(got, params):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)


def _manual_sam_sgd(model, x, y, rho, lr, sample_weight=None):
    """SAM with SGD written out with tf.GradientTape on the plain model."""
    variables = model.trainable_variables
    mse = keras.losses.MeanSquaredError()

    def loss_and_grad():
        with tf.GradientTape() as tape:
            loss = mse(y, model(x, training=True), sample_weight)
            if model.losses:
                loss += tf.add_n(model.losses)
        return tape.gradient(loss, variables)

    w = [v.numpy() for v in variables]
    g = loss_and_grad()
    norm = np.sqrt(sum(np.sum(np.square(gi)) for gi in g))
    for v, wi, gi in zip(variables, w, g):
        v.assign(wi + rho * gi.numpy() / norm)
    g_sam = loss_and_grad()
    for v, wi, gi in zip(variables, w, g_sam):
        v.assign(wi - lr * gi.numpy())


class _ActivityPenalty(keras.layers.Layer):
    def call(self, x):
        self.add_loss(0.05 * keras.ops.mean(keras.ops.square(x)))
        return x


def _shared_model():
    inputs = keras.Input((5,))
    shared = keras.layers.Dense(5, activation="tanh", name="shared")
    h = shared(shared(inputs))  # the same kernel used twice
    return keras.Model(inputs, keras.layers.Dense(3)(h))


def _nested_model():
    inner = keras.Sequential([keras.Input((5,)),
                              keras.layers.Dense(6, activation="tanh")],
                             name="inner")
    inputs = keras.Input((5,))
    h = _ActivityPenalty()(inner(inputs))
    return keras.Model(inputs, keras.layers.Dense(3)(h))


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("make", [_shared_model, _nested_model],
                         ids=["shared_layer", "nested_model_with_add_loss"])
def test_against_a_hand_written_sam_step(make):
    rho, lr = 0.2, 0.3
    x, y = regression_data(seed=7)
    keras.utils.set_random_seed(0)
    model = make()
    keras.utils.set_random_seed(0)
    manual = make()
    manual.set_weights(model.get_weights())
    sam = keras_sam.SAMModel(model, rho=rho)
    sam.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    for _ in range(2):
        sam.train_on_batch(x, y)
        _manual_sam_sgd(manual, x, y, rho, lr)
    for a, b in zip(model.get_weights(), manual.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if make is _nested_model:
        model(x)
        assert len(model.losses) == 1  # the penalty was in both references


def test_sample_weight_against_reference():
    rho, lr = 0.2, 0.3
    model = tanh_mlp(seed=8)
    start = weights64(model)
    x, y = regression_data(n=16, seed=9)
    sw = np.linspace(0.1, 2.0, 16).astype("float32")
    sam = keras_sam.SAMModel(model, rho=rho)
    sam.compile(optimizer=keras.optimizers.SGD(lr), loss="mse")
    logs = [sam.train_on_batch(x, y, sample_weight=sw, return_dict=True)
            for _ in range(2)]
    net, params = reference.WeightedTanhMLP(sw), start
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    for log in logs:
        np.testing.assert_allclose(log["loss"], net.loss(params, x64, y64),
                                   rtol=1e-5)
        g_sam, sharp = reference.sam_gradient(net, params, x64, y64, rho)
        np.testing.assert_allclose(log["sharpness"], sharp, rtol=1e-4)
        params = [p - lr * g for p, g in zip(params, g_sam)]
    for got, want in zip(weights64(model), params):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_class_weight_equals_the_matching_sample_weight():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 5)).astype("float32")
    y = rng.integers(0, 3, size=(32,))
    class_weight = {0: 0.2, 1: 1.0, 2: 3.0}
    weights = []
    for use_class_weight in (True, False):
        model = tanh_mlp(seed=9)
        sam = keras_sam.SAMModel(model, rho=0.1)
        sam.compile(optimizer=keras.optimizers.SGD(0.2), loss=keras.losses.
                    SparseCategoricalCrossentropy(from_logits=True))
        if use_class_weight:
            sam.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                    class_weight=class_weight)
        else:
            sw = np.array([class_weight[c] for c in y], "float32")
            sam.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0,
                    sample_weight=sw)
        weights.append(model.get_weights())
    unweighted = tanh_mlp(seed=9)
    for a, b, c in zip(*weights, unweighted.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert any(not np.allclose(a, c) for a, c in
               zip(weights[0], unweighted.get_weights()))
