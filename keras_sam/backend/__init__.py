"""The SAM training step, one package per Keras backend.

    tensorflow/   step.py (the step), passes.py (pass 1, whole or in chunks),
                  replicas.py (tf.distribute), gradients.py (sparse rows,
                  fused norm), analysis.py
    jax/, torch/  step.py (how the backend differentiates, branches and
                  writes back), analysis.py; jax/processes.py (failures
                  across processes); torch/compiled.py (jit_compile=True)
    shared by JAX and PyTorch, the step as a function of the model's state:
    stateless.py  the step (both passes, the variants)
    one_point.py  the one pass of Momentum-SAM and of a random e
    functional.py the state as values, the loss as a function of the weights
    writeback.py  the state, the skip and the logs after a step
"""

from __future__ import annotations

import importlib

import keras

SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")


def get_train_step():
    """The SAM `train_step` for the active Keras backend: `(sam, data)` on
    TensorFlow and PyTorch, `(sam, state, data)` on JAX."""
    backend = keras.backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise NotImplementedError(
            f"keras_sam supports the Keras backends {SUPPORTED_BACKENDS}; the "
            f"active backend is '{backend}'. Set the environment variable "
            "KERAS_BACKEND to one of them before importing keras.")
    return importlib.import_module(
        f"keras_sam.backend.{backend}.step").train_step


def compiled_train_function(sam):
    """PyTorch under `jit_compile=True`: the SAM step's compiled train
    function (keras_sam.backend.torch.compiled); None where Keras's own
    `make_train_function` already compiles the SAM step as it should."""
    if keras.backend.backend() != "torch" or not sam._should_torch_compile():
        return None
    from keras_sam.backend.torch import compiled

    return compiled.train_function(sam)


def explain_failure(error: BaseException):
    """A clearer error for a failure of `fit` that the backend can explain
    (a collective across JAX processes after one stopped), or None."""
    if keras.backend.backend() != "jax":
        return None
    from keras_sam.backend.jax.processes import explain

    return explain(error)


def check_rho_schedule(options) -> None:
    """Evaluate a rho schedule on a traced iteration now, before `fit`
    hands the variables' values to JAX's jitted step: a schedule that
    cannot be traced fails here with `options.rho_at`'s TypeError, with
    every variable as it was (TensorFlow raises the same error while
    tracing its first step; PyTorch runs the schedule eagerly)."""
    if keras.backend.backend() != "jax" or isinstance(options.rho, float):
        return
    import jax

    jax.eval_shape(options.rho_at, jax.ShapeDtypeStruct((), "int32"))
