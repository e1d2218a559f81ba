"""Backend-specific SAM training steps; one module per Keras backend."""

from __future__ import annotations

import keras

SUPPORTED_BACKENDS = ("tensorflow", "jax", "torch")


def get_train_step():
    """The SAM `train_step` for the active Keras backend: `(sam, data)` on
    TensorFlow and PyTorch, `(sam, state, data)` on JAX."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from keras_sam.backend import tensorflow

        return tensorflow.train_step
    if backend == "jax":
        from keras_sam.backend import jax

        return jax.train_step
    if backend == "torch":
        from keras_sam.backend import torch

        return torch.train_step
    raise NotImplementedError(
        f"keras_sam supports the Keras backends {SUPPORTED_BACKENDS}; the "
        f"active backend is '{backend}'. Set the environment variable "
        "KERAS_BACKEND to one of them before importing keras.")
