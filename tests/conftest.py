import os
import sys
import warnings

# The suite runs once per Keras backend, one run each, as Keras's own CI
# does: TensorFlow by default, JAX or PyTorch with
# KERAS_SAM_TEST_BACKEND=jax|torch (the tests that are not TF-only).
# .ci/run runs all three.
BACKEND = os.environ.get("KERAS_SAM_TEST_BACKEND", "tensorflow")
os.environ["KERAS_BACKEND"] = BACKEND
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
if BACKEND == "jax":
    # Two CPU devices, for keras.distribution.DataParallel.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               " --xla_force_host_platform_device_count=2")
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

if BACKEND == "tensorflow":
    import tensorflow as tf

    # Two logical CPU devices, for the tests that run tf.distribute
    # strategies on one machine. Must happen before TensorFlow initializes
    # its devices.
    tf.config.set_logical_device_configuration(
        tf.config.list_physical_devices("CPU")[0],
        [tf.config.LogicalDeviceConfiguration()] * 2,
    )

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# On a GPU the suite runs its float32 matmuls and convolutions in full
# float32: JAX's default there is TF32 (10-bit mantissa), which moves the
# steps by 5e-5..1e-3 against the float64 reference; PyTorch's cuDNN
# convolutions default to TF32 as well.
if BACKEND == "jax":
    import jax

    if jax.default_backend() == "gpu":
        jax.config.update("jax_default_matmul_precision", "highest")
elif BACKEND == "torch":
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

# Files whose tests run on every backend; their TensorFlow-only tests carry
# @pytest.mark.tensorflow_only.
PORTABLE = {
    "test_sam_step.py", "test_variants.py", "test_variants_training_loop.py",
    "test_training_loop.py", "test_edge_cases.py", "test_logs_and_config.py",
    "test_hessian_landscape.py", "test_analysis.py", "test_new_user.py",
    "test_saving.py", "test_backends.py", "test_momentum_sam.py",
    "test_safeguards.py", "test_kerashub.py", "test_torch_compile.py",
    "test_own_objective.py", "test_random_direction.py",
}


def pytest_ignore_collect(collection_path, config):
    if BACKEND != "tensorflow" and collection_path.suffix == ".py" and \
            collection_path.name.startswith("test_"):
        return collection_path.name not in PORTABLE
    return None


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "tensorflow_only: runs on the TensorFlow backend only")
    config.addinivalue_line(
        "markers", "backends(*names): runs on these backends only")


def pytest_collection_modifyitems(config, items):
    for item in items:
        marker = item.get_closest_marker("backends")
        allowed = marker.args if marker else None
        if item.get_closest_marker("tensorflow_only"):
            allowed = ("tensorflow",)
        if allowed is not None and BACKEND not in allowed:
            item.add_marker(pytest.mark.skip(
                reason=f"runs on {', '.join(allowed)}, not {BACKEND}"))


NAMES = {"tensorflow": "TensorFlow", "jax": "JAX", "torch": "PyTorch"}
INSTALL = {"tensorflow": "tensorflow", "jax": "jax",
           "torch": "torch==2.13.0 (CPU build: --index-url "
                    "https://download.pytorch.org/whl/cpu)"}


# Warnings, counted by the library whose line raised them. The expected
# ones (keras_sam's own warnings) are asserted by the tests that cause
# them; pytest's list of the rest is off (--disable-warnings in
# pyproject.toml) and the run ends with their count in one line.
_ORIGINS = {"keras_sam": "keras_sam", "keras_hub": "KerasHub",
            "keras": "Keras", "tensorflow": "TensorFlow", "jax": "JAX",
            "jaxlib": "JAX", "torch": "PyTorch", "numpy": "NumPy",
            "tests": "the tests"}
_WARNINGS: dict = {}


def pytest_warning_recorded(warning_message, when, nodeid, location):
    parts = os.path.normpath(warning_message.filename).split(os.sep)
    for marker in ("site-packages", "dist-packages"):
        if marker in parts:   # an installed library: the folder after it
            parts = parts[parts.index(marker) + 1:][:1]
    origin = next((_ORIGINS[p] for p in parts if p in _ORIGINS), "other")
    _WARNINGS[origin] = _WARNINGS.get(origin, 0) + 1


def installed(name: str) -> bool:
    """Whether `import name` can work here."""
    import importlib.util

    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):   # e.g. sys.modules[name] is None
        return False


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line on the warnings, one on what this run covered."""
    if _WARNINGS:
        counts = ", ".join(f"{name} {n}" for name, n in sorted(
            _WARNINGS.items(), key=lambda kv: -kv[1]))
        terminalreporter.write_line(
            f"keras_sam: {sum(_WARNINGS.values())} warnings, by the "
            f"library that raised them: {counts}. To list them: "
            f"the same command with -o addopts= (pytest lists them).")

    others = []
    for name in NAMES:
        if name == BACKEND:
            continue
        how = f"KERAS_SAM_TEST_BACKEND={name} python -m pytest -n 2"
        if not installed(name):
            how = f"not installed: pip install {INSTALL[name]}, then {how}"
        others.append(f"{NAMES[name]} ({how})")
    terminalreporter.write_line(
        f"keras_sam: this run is the suite on {NAMES[BACKEND]}. Not run "
        f"here: {'; '.join(others)}. .ci/run runs all three.")


# Where keras_sam's code lives: a DeprecationWarning raised while a frame of
# it is the nearest caller outside the libraries it calls is keras_sam's.
KERAS_SAM = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "keras_sam") + os.sep
_LIBRARIES = ("keras", "tensorflow", "jax", "jaxlib", "torch", "numpy",
              "optree", "keras_hub", "h5py", "warnings", "contextlib",
              "functools")


# Keras wraps each public entry point (`fit`, `save_weights`, a layer's
# call, ...) in this module's error handler. A warning raised under one
# that keras_sam called is Keras's work on the model (Keras's own saving and
# callbacks raise NumPy 2's `__array__` DeprecationWarning for a plain
# model too), not keras_sam's.
_KERAS_ENTRY = "keras.src.utils.traceback_utils"


def _culprit(frame):
    """The nearest frame to `frame` (the warning's) outside `_LIBRARIES`,
    or None if a Keras entry point lies between them, or if that frame
    only hands on to the same-named method below it (`SAMModel.export`
    calling `super().export`: what Keras does for the plain model)."""
    inner = None
    while frame is not None and frame.f_globals.get(
            "__name__", "").split(".")[0] in _LIBRARIES:
        if frame.f_globals["__name__"] == _KERAS_ENTRY:
            return None
        frame, inner = frame.f_back, frame
    if frame is not None and inner is not None and (
            inner.f_code.co_name == frame.f_code.co_name or
            # `optimizer.apply`, which Keras's own step calls the same way
            # (Nadam reads a variable through `np.array` on PyTorch).
            ".optimizers." in inner.f_globals.get("__name__", "")):
        return None
    return frame


@pytest.fixture(autouse=True)
def _deprecations_caused_by_keras_sam_fail(monkeypatch):
    """A DeprecationWarning whose nearest non-library caller is keras_sam
    (e.g. NumPy 2's, when keras_sam reads a variable through
    `convert_to_numpy`) fails the test, wherever the warning is raised:
    the filter `error::DeprecationWarning:keras_sam` catches only those
    attributed to keras_sam's own lines."""
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, *args, **kwargs):
        culprit = _culprit(sys._getframe(1))
        if issubclass(category, DeprecationWarning) and culprit is not None \
                and culprit.f_code.co_filename.startswith(KERAS_SAM):
            if os.environ.get("KERAS_SAM_LIST_DEPRECATIONS"):
                with open(os.environ["KERAS_SAM_LIST_DEPRECATIONS"], "a") as f:
                    f.write(f"{culprit.f_code.co_filename}:{culprit.f_lineno}"
                            f" <- {filename}:{lineno}: {message}\n")
            else:
                raise category(
                    f"{message} (raised at {filename}:{lineno}, from "
                    f"{culprit.f_code.co_filename}:{culprit.f_lineno})")
        show(message, category, filename, lineno, *args, **kwargs)

    monkeypatch.setattr(warnings, "showwarning", showwarning)


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    """Each test starts from the same seeds and the float32 policy."""
    keras.mixed_precision.set_global_policy("float32")
    keras.utils.set_random_seed(1234)
    yield
    keras.mixed_precision.set_global_policy("float32")
    keras.backend.clear_session()


def tanh_mlp(n_in=5, n_hidden=7, n_out=3, l2=0.0, seed=0):
    """Sequential(Dense(tanh, L2 on the kernel), Dense): tests/reference.py's
    TanhMLP, with weights drawn from `seed`."""
    keras.utils.set_random_seed(seed)
    reg = keras.regularizers.L2(l2) if l2 else None
    return keras.Sequential([
        keras.Input((n_in,)),
        keras.layers.Dense(n_hidden, activation="tanh",
                           kernel_regularizer=reg,
                           bias_initializer="random_normal"),
        keras.layers.Dense(n_out, bias_initializer="random_normal"),
    ])


def bn_mlp(seed=0, dropout=False):
    """Dense(relu, L2) -> [Dropout] -> BatchNorm -> Dense, on 5 inputs."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(16, activation="relu",
                           kernel_regularizer=keras.regularizers.L2(1e-3)),
        *([keras.layers.Dropout(0.2, seed=5)] if dropout else []),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(3),
    ], name="net")


def dropout_bn_mlp(seed=7):
    """Dense(relu, L2) -> Dropout(seeded) -> BatchNorm -> Dense: state that
    must move once per step (the dropout seed, the moving statistics)."""
    keras.utils.set_random_seed(seed)
    return keras.Sequential([
        keras.Input((5,)),
        keras.layers.Dense(16, activation="relu",
                           kernel_regularizer=keras.regularizers.L2(1e-3)),
        keras.layers.Dropout(0.3, seed=11),
        keras.layers.BatchNormalization(),
        keras.layers.Dense(3),
    ])


def regression_data(n=32, n_in=5, n_out=3, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, n_in)).astype("float32")
    y = rng.normal(size=(n, n_out)).astype("float32")
    return x, y


def weights64(model):
    return [np.asarray(w, np.float64) for w in model.get_weights()]
