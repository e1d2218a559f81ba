"""SAMModel under tf.distribute.MirroredStrategy on two logical CPUs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import keras_sam
import reference
from conftest import bn_mlp, regression_data, tanh_mlp, weights64

DEVICES = ["/cpu:0", "/cpu:1"]


@pytest.fixture(scope="module")
def strategy():
    """One strategy for the module: TensorFlow numbers collective instances
    per strategy, and two strategies in one process would collide."""
    return tf.distribute.MirroredStrategy(DEVICES)


def _dataset(x, y, batch):
    return tf.data.Dataset.from_tensor_slices((x, y)).batch(batch)


def _mirrored_sam(strategy, sync, seed=0, l2=0.0, optimizer=None):
    with strategy.scope():
        sam = keras_sam.SAMModel(tanh_mlp(l2=l2, seed=seed), rho=0.2,
                                 sync_perturbation=sync)
        sam.compile(optimizer=optimizer() if optimizer else
                    keras.optimizers.SGD(0.3), loss="mse")
    return sam


def test_per_replica_perturbation_is_the_mean_of_per_shard_sam(strategy):
    x, y = regression_data(n=32, seed=1)
    sam = _mirrored_sam(strategy, sync=False, l2=0.01)
    start = weights64(sam.model)
    sam.fit(_dataset(x, y, 16), epochs=1, verbose=0)  # two global steps

    net, params = reference.TanhMLP(l2=0.01), start
    for first in (0, 16):
        shards = [(x[first + i:first + i + 8].astype(float),
                   y[first + i:first + i + 8].astype(float)) for i in (0, 8)]
        g_sams = [reference.sam_gradient(net, params, xs, ys, 0.2)[0]
                  for xs, ys in shards]  # each shard its own e
        params = [p - 0.3 * np.mean(g, axis=0)
                  for p, g in zip(params, zip(*g_sams))]
    for got, want in zip(weights64(sam.model), params):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_synchronized_perturbation_equals_full_batch_sam(strategy):
    x, y = regression_data(n=32, seed=2)
    sam = _mirrored_sam(strategy, sync=True, l2=0.01)
    single = keras_sam.SAMModel(tanh_mlp(l2=0.01, seed=0), rho=0.2)
    single.compile(optimizer=keras.optimizers.SGD(0.3), loss="mse")
    history = sam.fit(_dataset(x, y, 16), epochs=1, verbose=0)
    single_history = single.fit(x, y, batch_size=16, epochs=1,
                                shuffle=False, verbose=0)
    for a, b in zip(sam.model.get_weights(), single.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(history.history["loss"],
                               single_history.history["loss"], rtol=1e-5)
    np.testing.assert_allclose(history.history["sharpness"],
                               single_history.history["sharpness"],
                               rtol=1e-4)
    # ... and differs from the per-replica default.
    unsynced = _mirrored_sam(strategy, sync=False, l2=0.01)
    unsynced.fit(_dataset(x, y, 16), epochs=1, verbose=0)
    assert not np.allclose(unsynced.model.get_weights()[0],
                           sam.model.get_weights()[0], rtol=1e-6)


def _replica_values(variable):
    return [np.asarray(v) for v in variable.value.values]


@pytest.mark.parametrize("sync", [False, True])
def test_replicas_never_drift_apart(strategy, sync):
    x, y = regression_data(n=400, seed=3)
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((5,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.2),
            keras.layers.BatchNormalization(),
            keras.layers.Dense(3),
        ])
        sam = keras_sam.SAMModel(model, rho=0.1, sync_perturbation=sync)
        sam.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    sam.fit(_dataset(x, y, 8), epochs=1, verbose=0)  # 50 steps
    assert int(sam.optimizer.iterations.numpy()) == 50
    for v in sam.model.trainable_variables:
        first, second = _replica_values(v)
        np.testing.assert_array_equal(first, second)


def test_overflow_on_one_replica_skips_the_step_on_all(strategy):
    keras.mixed_precision.set_global_policy("mixed_float16")
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([
            keras.Input((3,)),
            keras.layers.Dense(4),
            keras.layers.Dense(1, dtype="float32"),
        ])
        sam = keras_sam.SAMModel(model, rho=0.05)
        sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 3)).astype("float32")
    y = rng.normal(size=(16, 1)).astype("float32")
    sam.fit(_dataset(x, y, 16), epochs=1, verbose=0)  # builds; one step
    weights = [_replica_values(v) for v in model.trainable_variables]
    scale = float(sam.optimizer.dynamic_scale.numpy())
    # Replica 1 gets the second half of the batch: only it overflows.
    x_bad = x.copy()
    x_bad[8:] *= 3e4
    sam.fit(_dataset(x_bad, y, 16), epochs=1, verbose=0)
    for v, before in zip(model.trainable_variables, weights):
        for now, then in zip(_replica_values(v), before):
            np.testing.assert_array_equal(now, then)
    assert float(sam.optimizer.dynamic_scale.numpy()) == scale / 2
    assert int(sam.optimizer.iterations.numpy()) == 1


class _ShardTripwire(keras.layers.Layer):
    """y = x * w + c |w - 1|^2 x_0: zero at w = 1 (pass 1); at w + e it
    overflows float16 only on examples whose first feature is not 0."""

    def build(self, input_shape):
        self.w = self.add_weight(shape=(input_shape[-1],), initializer="ones")

    def call(self, x):
        gap = self.w - keras.ops.ones_like(self.w)
        return x * self.w + 6e4 * keras.ops.sum(gap * gap) * x[:, :1]


def test_pass2_overflow_on_one_replica_skips_the_step_on_all(strategy):
    keras.mixed_precision.set_global_policy("mixed_float16")
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((3,)), _ShardTripwire(),
                                  keras.layers.Dense(1, dtype="float32")])
        sam = keras_sam.SAMModel(model, rho=0.05)
        sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(16, 3)).astype("float32")
    x[:8, 0] = 0.0  # replica 0: the tripwire term vanishes
    y = rng.normal(size=(16, 1)).astype("float32")
    weights = [_replica_values(v) for v in model.trainable_variables]
    scale = float(sam.optimizer.initial_scale)
    logs = sam.fit(_dataset(x, y, 16), epochs=1, verbose=0).history
    assert np.isfinite(logs["loss"][0])  # pass 1 was fine everywhere
    for v, before in zip(model.trainable_variables, weights):
        for now, then in zip(_replica_values(v), before):
            np.testing.assert_array_equal(now, then)
    assert float(sam.optimizer.dynamic_scale.numpy()) == scale / 2
    assert int(sam.optimizer.iterations.numpy()) == 0


def test_nan_on_one_replica_skips_a_plain_optimizer_step_on_all(strategy):
    with strategy.scope():
        sam = keras_sam.SAMModel(tanh_mlp(seed=2), rho=0.1)
        sam.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                    loss="mse")
    x, y = regression_data(n=16, seed=4)
    sam.fit(_dataset(x, y, 16), epochs=1, verbose=0)
    weights = [_replica_values(v) for v in sam.model.trainable_variables]
    slots = [np.asarray(v.numpy()) for v in sam.optimizer.variables]
    x_bad = x.copy()
    x_bad[12, 0] = np.nan  # in replica 1's half only
    sam.fit(_dataset(x_bad, y, 16), epochs=1, verbose=0)
    for v, before in zip(sam.model.trainable_variables, weights):
        for now, then in zip(_replica_values(v), before):
            np.testing.assert_array_equal(now, then)
    for v, before in zip(sam.optimizer.variables, slots):
        np.testing.assert_array_equal(np.asarray(v.numpy()), before)
    assert int(sam.optimizer.iterations.numpy()) == 1


@pytest.mark.parametrize("rho", [0.1, 0.0])
def test_a_skipped_step_keeps_the_batchnorm_statistics_on_all(strategy, rho):
    """A NaN in replica 1's half: both replicas skip the step and keep their
    moving statistics (pass 1 took NaN ones from the bad half)."""
    with strategy.scope():
        sam = keras_sam.SAMModel(bn_mlp(seed=3), rho=rho)
        sam.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x, y = regression_data(n=16, seed=4)
    sam.fit(_dataset(x, y, 16), epochs=1, verbose=0)
    state = [_replica_values(v) for v in sam.model.non_trainable_variables]
    x_bad = x.copy()
    x_bad[12, 0] = np.nan
    sam.fit(_dataset(x_bad, y, 16), epochs=1, verbose=0)
    for v, before in zip(sam.model.non_trainable_variables, state):
        for now, then in zip(_replica_values(v), before):
            np.testing.assert_array_equal(now, then)
    assert np.all(np.isfinite(sam.predict(x, verbose=0)))


def test_synchronized_perturbation_with_sparse_embedding_gradients(strategy):
    """The all-reduced pass-1 gradient of an Embedding stays sparse and
    gives full-batch SAM."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 20, size=(32, 6)).astype("int32")
    y = rng.normal(size=(32, 2)).astype("float32")

    def make():
        keras.utils.set_random_seed(0)
        return keras.Sequential([
            keras.Input((6,), dtype="int32"), keras.layers.Embedding(50, 4),
            keras.layers.GlobalAveragePooling1D(), keras.layers.Dense(2)])

    with strategy.scope():
        mirrored = keras_sam.SAMModel(make(), rho=0.5,
                                      sync_perturbation=True)
        mirrored.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    single = keras_sam.SAMModel(make(), rho=0.5)
    single.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse")
    mirrored.fit(_dataset(x, y, 16), epochs=2, verbose=0)
    single.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    start = make().get_weights()
    assert not np.allclose(single.model.get_weights()[0], start[0])
    for a, b in zip(mirrored.model.get_weights(), single.model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_variants_per_replica_and_replicas_agree(strategy):
    """GSAM + LookSAM + every-k under MirroredStrategy: each replica takes
    its own e, g_s and GSAM direction from its shard; the replicas agree on
    which steps are SAM steps and hold the same g_v (their mean)."""
    x, y = regression_data(n=64, seed=13)
    with strategy.scope():
        sam = keras_sam.SAMModel(tanh_mlp(l2=0.01), rho=0.2, gsam_alpha=0.3,
                                 sam_every=2, looksam_alpha=0.7)
        sam.compile(optimizer=keras.optimizers.SGD(0.3), loss="mse")
    start = weights64(sam.model)
    sam.fit(_dataset(x, y, 16), epochs=1, verbose=0)   # 4 global steps

    net, params = reference.TanhMLP(l2=0.01), start
    dot = lambda a, b: sum(float(np.sum(u * v)) for u, v in zip(a, b))  # noqa: E731
    g_v = None
    for step, first in enumerate(range(0, 64, 16)):
        shards = [(x[first + i:first + i + 8].astype(float),
                   y[first + i:first + i + 8].astype(float)) for i in (0, 8)]
        directions, components = [], []
        for xs, ys in shards:
            g = net.grad(params, xs, ys)
            if step % 2 == 0:
                g_s = reference.sam_gradient(net, params, xs, ys, 0.2)[0]
                c = dot(g, g_s) / dot(g_s, g_s)
                directions.append([s - 0.3 * (a - c * s)
                                   for a, s in zip(g, g_s)])
                c = dot(g, g_s) / dot(g, g)
                components.append([s - c * a for a, s in zip(g, g_s)])
            else:
                ratio = 0.7 * np.sqrt(dot(g, g) / dot(g_v, g_v))
                directions.append([a + ratio * v for a, v in zip(g, g_v)])
        if components:
            g_v = [np.mean(v, axis=0) for v in zip(*components)]
        params = [p - 0.3 * np.mean(d, axis=0)
                  for p, d in zip(params, zip(*directions))]
    for got, want in zip(weights64(sam.model), params):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for v in sam.model.trainable_variables + sam._looksam_directions:
        first, second = _replica_values(v)
        np.testing.assert_array_equal(first, second)
    # Stored g_v is the replicas' mean (up to the 1/replicas loss scale).
    got = [np.asarray(v) for v in sam._looksam_directions]
    cos = dot(got, g_v) / np.sqrt(dot(got, got) * dot(g_v, g_v))
    np.testing.assert_allclose(cos, 1.0, rtol=1e-5)


def test_momentum_sam_on_two_replicas_equals_the_reference(strategy):
    """Momentum-SAM's e comes from the optimizer's momentum, the same on
    every replica: two replicas train like full-batch MSAM, and stay
    equal."""
    x, y = regression_data(n=48, seed=7)
    with strategy.scope():
        model = tanh_mlp(l2=0.01, seed=2)
        start = weights64(model)
        sam = keras_sam.SAMModel(model, rho=1.0, direction="momentum")
        sam.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                    loss="mse")
    history = sam.fit(_dataset(x, y, 16), epochs=1, verbose=0)
    batches = [(x[i:i + 16].astype(float), y[i:i + 16].astype(float))
               for i in (0, 16, 32)]
    want, losses = reference.msam_train(
        reference.TanhMLP(l2=0.01), reference.SGD(0.1, momentum=0.9), start,
        batches, 1.0)
    for got, ref in zip(weights64(model), want):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(history.history["loss"][0], np.mean(losses),
                               rtol=1e-5)
    for v in model.trainable_variables:
        a, b = (np.asarray(t) for t in v.value.values)
        np.testing.assert_array_equal(a, b)
