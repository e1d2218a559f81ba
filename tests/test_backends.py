"""What differs per backend, and files that move between backends.

The portable part of the suite runs on each backend in its own run
(`KERAS_SAM_TEST_BACKEND=jax|torch python -m pytest -n 2`, see conftest.py;
.ci/run runs all three). On TensorFlow these tests also move `.keras` files
to the other backends, in subprocesses; the rest runs on the backend named
in its marker.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_sam
import reference
from conftest import regression_data, tanh_mlp, weights64

HERE = os.path.dirname(os.path.abspath(__file__))
OTHER_BACKENDS = ("jax", "torch")


def _run(code_or_args, backend, timeout=900):
    env = dict(os.environ, KERAS_SAM_TEST_BACKEND=backend,
               KERAS_BACKEND=backend, PYTHONPATH=HERE)
    env.pop("PYTEST_XDIST_WORKER", None)
    args = (code_or_args if isinstance(code_or_args, list)
            else [sys.executable, "-c", textwrap.dedent(code_or_args)])
    return subprocess.run(args, env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=os.path.dirname(HERE))


def _train_and_save(path, steps):
    model = tanh_mlp(l2=0.01)
    sam = keras_sam.SAMModel(model, rho=0.1, gsam_alpha=0.2)
    sam.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    batches = [regression_data(n=16, seed=20 + i) for i in range(2 * steps)]
    for x, y in batches[:steps]:
        sam.train_on_batch(x, y)
    sam.save(path)
    return sam, batches[steps:]


@pytest.mark.tensorflow_only
@pytest.mark.parametrize("backend", OTHER_BACKENDS)
def test_keras_file_moves_to_another_backend_and_training_continues(
        tmp_path, backend):
    pytest.importorskip(backend)
    path = str(tmp_path / "sam.keras")
    sam, rest = _train_and_save(path, steps=2)
    np.save(tmp_path / "data.npy", np.stack(
        [np.concatenate([x, y], axis=1) for x, y in rest]))
    for x, y in rest:   # continue here, on TensorFlow
        sam.train_on_batch(x, y)
    done = _run(f"""
        import keras, numpy as np, keras_sam
        sam = keras.saving.load_model({path!r})
        assert isinstance(sam, keras_sam.SAMModel), type(sam)
        assert sam.options.gsam_alpha == 0.2
        for batch in np.load({str(tmp_path / "data.npy")!r}):
            sam.train_on_batch(batch[:, :5], batch[:, 5:])
        np.savez({str(tmp_path / "out.npz")!r},
                 *[np.asarray(w) for w in sam.get_weights()])
        print("OK", keras.backend.backend())
        """, backend)
    assert f"OK {backend}" in done.stdout, done.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    for k, want in enumerate(sam.get_weights()):
        np.testing.assert_allclose(out[f"arr_{k}"], want, rtol=1e-5,
                                   atol=1e-6)


def test_a_step_that_fails_half_way_leaves_the_weights_at_w():
    """An error in pass 2 (at w + e) leaves nothing at w + e: the
    variables are never written before the update."""
    class FailsOnSecondCall(keras.layers.Layer):
        calls = 0

        def call(self, x, training=None):
            if training:
                FailsOnSecondCall.calls += 1
                if FailsOnSecondCall.calls == 2:
                    raise RuntimeError("pass 2 failed")
            return x

    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(3),
                              FailsOnSecondCall()])
    sam = keras_sam.SAMModel(model, rho=0.5)
    sam.compile(optimizer="sgd", loss="mse", jit_compile=False)
    before = weights64(model)
    x, y = regression_data()
    with pytest.raises(RuntimeError, match="pass 2 failed"):
        sam.train_on_batch(x, y)
    for a, b in zip(weights64(model), before):
        np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------ JAX


@pytest.mark.backends("jax", "tensorflow")
def test_jitted_rho_zero_agrees_with_the_base_optimizer_to_rounding():
    """Eagerly (and in TensorFlow's graphs), rho = 0 is the base optimizer
    bit for bit on every backend (test_sam_step.py). Jitted, XLA fuses the
    SAM program differently from Keras's (on TensorFlow: the copy kept to
    roll back a non-finite step): the weights agree to float32 rounding."""
    x, y = regression_data(n=64)
    base, sam = tanh_mlp(seed=2), keras_sam.SAMModel(tanh_mlp(seed=2),
                                                     rho=0.0)
    for m in (base, sam):
        m.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9,
                                                 nesterov=True),
                  loss="mse", jit_compile=True)
        m.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    for a, b in zip(weights64(base), weights64(sam.model)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _data_parallel_run(sync_perturbation, steps=3):
    import jax

    assert len(jax.devices()) == 2, "conftest asks XLA for 2 CPU devices"
    batches = [regression_data(n=16, seed=30 + i) for i in range(steps)]
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices()))
    try:
        model = tanh_mlp(l2=0.01, seed=5)   # variables laid out for both
        start = weights64(model)
        sam = keras_sam.SAMModel(model, rho=0.2,
                                 sync_perturbation=sync_perturbation)
        sam.compile(optimizer=keras.optimizers.SGD(0.1, momentum=0.9),
                    loss="mse")
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        history = sam.fit(x, y, batch_size=16, shuffle=False, verbose=0)
    finally:
        keras.distribution.set_distribution(None)
    return weights64(model), start, batches, history


@pytest.mark.backends("jax")
@pytest.mark.parametrize("sync_perturbation", [True, False])
def test_data_parallel_on_two_devices_against_the_reference(
        sync_perturbation):
    """sync_perturbation=True: e of the whole batch, full-batch SAM.
    False: each device's e from its own half, g_s averaged (m-sharpness),
    as on TensorFlow's MirroredStrategy."""
    got, start, batches, history = _data_parallel_run(sync_perturbation)
    want, sharpness, _ = reference.variant_train(
        reference.TanhMLP(l2=0.01), reference.SGD(0.1, momentum=0.9), start,
        [(x.astype(np.float64), y.astype(np.float64)) for x, y in batches],
        0.2, num_batch_splits=1 if sync_perturbation else 2)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(history.history["sharpness"][-1],
                               np.mean(sharpness), rtol=1e-4)


@pytest.mark.backends("jax")
def test_momentum_sam_under_data_parallel_equals_the_reference():
    """Momentum-SAM's e comes from the replicated momentum: on 2 devices it
    is full-batch MSAM."""
    import jax

    batches = [regression_data(n=16, seed=60 + i) for i in range(3)]
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices()))
    try:
        model = tanh_mlp(l2=0.01, seed=5)
        start = weights64(model)
        sam = keras_sam.SAMModel(model, rho=1.0, direction="momentum")
        sam.compile(optimizer=keras.optimizers.Adam(0.02), loss="mse")
        sam.fit(np.concatenate([b[0] for b in batches]),
                np.concatenate([b[1] for b in batches]), batch_size=16,
                shuffle=False, verbose=0)
        got = weights64(model)
    finally:
        keras.distribution.set_distribution(None)
    want, _ = reference.msam_train(
        reference.TanhMLP(l2=0.01), reference.Adam(0.02), start,
        [(x.astype(np.float64), y.astype(np.float64)) for x, y in batches],
        1.0)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.backends("jax")
def test_model_parallel_shards_the_weights_and_trains_like_one_device():
    import jax

    devices = jax.devices()
    mesh = keras.distribution.DeviceMesh((1, 2), ["batch", "model"],
                                         devices=devices)
    layout = keras.distribution.LayoutMap(mesh)
    layout["dense/kernel"] = (None, "model")
    layout["dense/bias"] = ("model",)
    x, y = regression_data(n=16, seed=40)

    def train():
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((5,)),
                                  keras.layers.Dense(8, activation="tanh",
                                                     name="dense"),
                                  keras.layers.Dense(3, name="out")])
        sam = keras_sam.SAMModel(model, rho=0.2)
        sam.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        sam.fit(x, y, batch_size=16, epochs=3, verbose=0)
        return model

    keras.distribution.set_distribution(keras.distribution.ModelParallel(
        layout_map=layout, batch_dim_name="batch"))
    try:
        sharded = train()
        kernel = sharded.get_layer("dense").kernel.value
        assert len(kernel.sharding.device_set) == 2   # really split
        got = weights64(sharded)
    finally:
        keras.distribution.set_distribution(None)
    for a, b in zip(got, weights64(train())):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# -------------------------------------------------------------- PyTorch


@pytest.mark.backends("torch")
def test_torch_unused_variables_are_left_out_of_the_update():
    """A variable the loss never uses (gradient None) is not updated, not
    even by momentum or weight decay, as in Keras's own PyTorch step."""
    inputs = keras.Input((5,))
    used = keras.layers.Dense(3, name="used")(inputs)
    keras.layers.Dense(3, name="unused")  # never called
    model = keras.Model(inputs, used)
    extra = model.add_weight(shape=(2,), initializer="ones", name="extra")
    sam = keras_sam.SAMModel(model, rho=0.1)
    sam.compile(optimizer=keras.optimizers.AdamW(0.1, weight_decay=0.5),
                loss="mse")
    x, y = regression_data()
    sam.train_on_batch(x, y)
    np.testing.assert_array_equal(extra.numpy(), np.ones(2, np.float32))


@pytest.mark.backends("jax")
def test_jax_export_serves_the_same_outputs(tmp_path):
    """On JAX, `export` writes the wrapped model's SavedModel through
    jax2tf (TensorFlow installed); TensorFlow serves it."""
    tf = pytest.importorskip("tensorflow")
    sam = keras_sam.SAMModel(tanh_mlp(), rho=0.1)
    sam.compile(optimizer="sgd", loss="mse")
    x, y = regression_data()
    sam.fit(x, y, epochs=1, verbose=0)
    sam.export(str(tmp_path / "serving"))
    served = tf.saved_model.load(str(tmp_path / "serving"))
    np.testing.assert_allclose(np.asarray(served.serve(x)),
                               sam.predict(x, verbose=0), rtol=1e-5,
                               atol=1e-6)


@pytest.mark.backends("jax")
@pytest.mark.parametrize("sync_perturbation", [True, False])
def test_data_parallel_step_never_gathers_the_batch(sync_perturbation):
    """Per-device e is vmapped over the devices' shards, which stay where
    they are: the compiled step has all-reduces (the gradients' mean) and
    no all-gather."""
    import jax

    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices()))
    try:
        sam = keras_sam.SAMModel(tanh_mlp(n_hidden=32), rho=0.1,
                                 sync_perturbation=sync_perturbation)
        sam.compile(optimizer="sgd", loss="mse")
        x, y = regression_data(n=64)
        sam.fit(x, y, batch_size=64, verbose=0)
        layout = keras.distribution.distribution().get_data_layout
        data = tuple(jax.device_put(a, layout(a.shape).backend_layout)
                     for a in (x, y))
        state = tuple([v.value for v in vs] for vs in (
            sam.trainable_variables, sam.non_trainable_variables,
            sam.optimizer.variables, sam.metrics_variables))
        hlo = jax.jit(sam.train_step).lower(state, data).compile().as_text()
    finally:
        keras.distribution.set_distribution(None)
    assert "all-reduce" in hlo
    assert "all-gather" not in hlo


def _torch_host_work_per_step(wrapped, x, y, steps=10):
    """(host syncs, tensors made from host data) per `fit` step, counted by
    the profiler: `_local_scalar_dense` (.item(), float(t), bool(t)) waits
    for the device; `lift_fresh` is a tensor made from a
    Python scalar or array, a blocking host-to-device copy on a GPU."""
    import torch

    batch = len(x) // steps
    wrapped.fit(x, y, batch_size=batch, epochs=1, verbose=0)   # warm up
    with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        wrapped.fit(x, y, batch_size=batch, epochs=1, shuffle=False,
                    verbose=0)
    count = {e.key: e.count for e in prof.key_averages()}
    return (count.get("aten::_local_scalar_dense", 0) / steps,
            count.get("aten::lift_fresh", 0) / steps)


def _torch_select_on_device(monkeypatch):
    """Run the PyTorch step as on a GPU: the non-finite skip selected on
    the device, never read on the host (the CPU reads it: free there)."""
    from keras_sam.backend.torch import step as torch_step
    monkeypatch.setattr(torch_step, "host_reads_are_free", lambda t: False)


@pytest.mark.backends("torch")
@pytest.mark.parametrize("kwargs", [{}, {"sam_every": 2}])
@pytest.mark.parametrize("path", ["device", "cpu"])
def test_torch_step_adds_no_host_sync_and_no_host_scalars(kwargs, path,
                                                          monkeypatch):
    """The PyTorch SAM step never waits for the device mid-step: per `fit`
    step at most one host sync more than two plain gradients and an update
    (the floor; every-k reads its iteration once, before pass 1) and at most
    two more tensors made from host data (plain SAM: none more). On the CPU
    the step reads its finiteness flag (one sync, which waits for nothing
    there) instead of selecting."""
    import torch

    if path == "device":
        _torch_select_on_device(monkeypatch)

    class Floor(keras.Model):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def call(self, x, training=None):
            return self.model(x, training=training)

        def train_step(self, data):
            x, y = data
            variables = self.trainable_variables
            for _ in range(2):
                y_pred = self(x, training=True)
                loss = self._compute_loss(x=x, y=y, y_pred=y_pred,
                                          training=True)
                grads = torch.autograd.grad(loss, [v.value
                                                   for v in variables])
            self._loss_tracker.update_state(loss.detach(),
                                            sample_weight=len(x))
            with torch.no_grad():
                self.optimizer.apply(list(grads), variables)
            return self.compute_metrics(x, y, y_pred)

    x, y = regression_data(n=160)   # 10 steps of 16
    counts = {}
    for name in ("floor", "SAM"):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([   # dropout from torch's global RNG
            keras.Input((5,)), keras.layers.Dense(16, activation="relu"),
            keras.layers.Dropout(0.2), keras.layers.BatchNormalization(),
            keras.layers.Dense(3)])
        wrapped = Floor(model) if name == "floor" else keras_sam.SAMModel(
            model, rho=0.1, **kwargs)
        wrapped.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                        loss="mse")
        counts[name] = _torch_host_work_per_step(wrapped, x, y)
    (floor_syncs, floor_fresh), (syncs, fresh) = counts["floor"], \
        counts["SAM"]
    assert floor_syncs > 0   # the counter sees Keras's own syncs
    # every-k's read of its iteration; the CPU's read of the finite flag.
    allowed = floor_syncs + bool(kwargs) + (path == "cpu")
    assert syncs <= allowed, counts
    assert fresh <= floor_fresh + (2 if kwargs else 0.5), counts


@pytest.mark.backends("torch")
@pytest.mark.parametrize("kwargs", [{}, {"direction": "momentum"}])
def test_torch_device_select_equals_the_host_branch(kwargs, monkeypatch):
    """The GPU route (update always, select the old values back on a
    non-finite g) and the CPU route (read the flag, skip) train to the same
    bits, and a non-finite batch leaves weights, optimizer slots and
    BatchNorm statistics untouched on both."""
    from conftest import dropout_bn_mlp

    x, y = regression_data(n=64)
    bad = x.copy()
    bad[3, 1] = np.nan
    ends = {}
    for path in ("cpu", "device"):
        if path == "device":
            _torch_select_on_device(monkeypatch)
        model = dropout_bn_mlp()
        sam = keras_sam.SAMModel(model, rho=0.1, **kwargs)
        sam.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                    loss="mse")
        sam.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        before = ([np.asarray(v) for v in model.variables],
                  [np.asarray(v) for v in sam.optimizer.variables])
        logs = sam.train_on_batch(bad, y[:64], return_dict=True)
        assert np.isnan(logs["loss"])
        after = ([np.asarray(v) for v in model.variables],
                 [np.asarray(v) for v in sam.optimizer.variables])
        for a, b in zip(before[0] + before[1], after[0] + after[1]):
            np.testing.assert_array_equal(a, b)
        sam.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
        ends[path] = [np.asarray(v) for v in model.variables]
    assert int(sam.optimizer.iterations) == 8
    for a, b in zip(ends["cpu"], ends["device"]):
        np.testing.assert_array_equal(a, b)
