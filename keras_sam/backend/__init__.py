"""Backend-specific SAM training steps; one module per Keras backend."""

from __future__ import annotations

import keras

SUPPORTED_BACKENDS = ("tensorflow",)


def get_train_step():
    """The SAM `train_step(sam_model, data)` for the active Keras backend."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        from keras_sam.backend import tensorflow

        return tensorflow.train_step
    raise NotImplementedError(
        f"keras_sam supports the Keras backends {SUPPORTED_BACKENDS}; the "
        f"active backend is '{backend}'. Set the environment variable "
        "KERAS_BACKEND=tensorflow before importing keras."
    )
