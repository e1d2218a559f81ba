"""`SAMModel`: Sharpness-Aware Minimization for any Keras model."""

from __future__ import annotations

import math
import numbers
import os
from typing import Any

import keras

from keras_sam import _keras_compat
from keras_sam import backend as sam_backend
from keras_sam import saving


def validate_rho(rho: Any) -> float:
    """`rho` as a float, or an error that says what is wrong with it."""
    if isinstance(rho, bool) or not isinstance(rho, numbers.Real):
        raise TypeError(
            "`rho` must be a real number >= 0 (the radius of the "
            f"perturbation ball, e.g. rho=0.05); received {rho!r} of type "
            f"{type(rho).__name__}."
        )
    rho = float(rho)
    if not math.isfinite(rho) or rho < 0.0:
        raise ValueError(
            "`rho` must be a finite number >= 0 (the radius of the "
            "perturbation ball; 0.05 is the SAM paper's default, 0 trains "
            f"exactly like the base optimizer); received rho={rho}."
        )
    return rho


@keras.saving.register_keras_serializable(package="keras_sam")
class SAMModel(keras.Model):
    """Wraps a Keras model and trains it with Sharpness-Aware Minimization.

    SAM (Foret et al., ICLR 2021) minimizes the loss in the worst direction
    within a ball of radius `rho` around the weights w:

        min_w  max_{||e||_2 <= rho}  L(w + e)

    Each training step takes two gradients of the same batch:

        g     = grad L(w)                  pass 1, at w
        e     = rho * g / ||g||_2          global norm over all variables
        g_sam = grad L(w + e)              pass 2, at w + e
        w     = optimizer(w, g_sam)        the compiled optimizer, at w

    `call`, `evaluate` and `predict` are those of the wrapped model. The
    training logs report the loss and metrics of pass 1 (exactly what the
    wrapped model would report at the same weights) and `sharpness`,
    L(w + e) - L(w), the first-order sharpness of the batch.

    A step whose pass-1 gradient is not finite is skipped: the weights and
    the optimizer state stay untouched. With loss scaling, an overflow in
    either pass skips the step and lowers the scale. With `rho=0` training
    is bit for bit that of the base optimizer.

    Args:
        model: the `keras.Model` to train. Its layers and variables are
            shared, not copied: after training, `sam_model.model` is the
            trained plain model, ready to save and deploy without keras_sam.
        rho: radius of the L2 ball, a finite float >= 0. The paper uses 0.05
            (CIFAR-10, ImageNet) and 0.1 (CIFAR-100), searching
            {0.01, 0.02, 0.05, 0.1, 0.2, 0.5}.
        sync_perturbation: under a `tf.distribute` strategy with several
            replicas, False (the default, as in the paper) computes e on each
            replica from its own shard of the batch (m-sharpness with m = the
            per-replica batch) and averages the resulting g_sam; True
            all-reduces the pass-1 gradient first, so every replica uses the
            e of the whole batch (full-batch SAM, one more all-reduce per
            step). No effect on one replica.
        **kwargs: passed to `keras.Model` (`name`, ...).

    Example:

    ```python
    sam_model = keras_sam.SAMModel(model, rho=0.05)
    sam_model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy",
                      metrics=["accuracy"])
    sam_model.fit(x, y, epochs=10)   # logs: loss, accuracy, sharpness
    ```
    """

    def __init__(self, model: keras.Model, rho: float = 0.05,
                 sync_perturbation: bool = False, **kwargs):
        if not isinstance(model, keras.Model):
            raise TypeError(
                "`model` must be a `keras.Model` (Sequential, functional or "
                f"subclassed); received {model!r} of type "
                f"{type(model).__name__}. To train a single layer, wrap it: "
                "`keras.Sequential([layer])`."
            )
        rho = validate_rho(rho)
        if not isinstance(sync_perturbation, bool):
            raise TypeError(
                "`sync_perturbation` must be True or False; received "
                f"{sync_perturbation!r} of type "
                f"{type(sync_perturbation).__name__}.")
        self._sam_train_step = sam_backend.get_train_step()
        super().__init__(**kwargs)
        self.model = model
        self._rho = rho
        self._sync_perturbation = sync_perturbation
        self._sharpness_tracker = keras.metrics.Mean(name="sharpness")
        if model.built:
            self.built = True

    @property
    def rho(self) -> float:
        """Radius of the perturbation ball."""
        return self._rho

    @property
    def sync_perturbation(self) -> bool:
        """Whether replicas share the e of the whole batch."""
        return self._sync_perturbation

    def build(self, input_shape=None):
        # The wrapped model builds itself on its first call, as it would
        # unwrapped (a subclassed model's `build(shape)` may not create its
        # sublayers' variables).
        self.built = True

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)

    def train_step(self, data):
        logs = self._sam_train_step(self, data)
        return _keras_compat.logs_for_multi_worker(self, logs)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # keras-team/keras issue 20585: see _keras_compat.
        _keras_compat.symbolic_build_from_local_batch(self, iterator,
                                                      data_batch)

    def test_step(self, data):
        logs = super().test_step(data)
        # Sharpness is measured while training; evaluation does not move it.
        logs.pop(self._sharpness_tracker.name, None)
        return _keras_compat.logs_for_multi_worker(self, logs)

    def save(self, filepath, overwrite=True, zipped=None, **kwargs):
        """Saves the SAM model (wrapped model, `rho`, optimizer state) as a
        `.keras` file, to resume training. `keras.saving.load_model` reads it
        back once keras_sam is imported. To deploy, save the plain model
        instead: `sam_model.model.save("model.keras")`; to serve,
        `sam_model.export(dirpath)`."""
        saving.check_save_path(filepath)
        return super().save(filepath, overwrite=overwrite, zipped=zipped,
                            **kwargs)

    def export(self, filepath, format="tf_saved_model", verbose=None,
               input_signature=None, **kwargs):
        """Exports the wrapped model for inference (a SavedModel by default).

        SAM changes training only, so the artifact is the wrapped model's
        and its outputs equal `sam_model.predict`; serving it needs neither
        keras_sam nor this class.
        """
        return self.model.export(filepath, format=format, verbose=verbose,
                                 input_signature=input_signature, **kwargs)

    def load_weights(self, filepath, skip_mismatch=False, **kwargs):
        try:
            return super().load_weights(filepath, skip_mismatch=skip_mismatch,
                                        **kwargs)
        except ValueError as error:
            if not os.path.exists(filepath):
                raise
            raise ValueError(saving.describe_weight_mismatch(
                self, filepath, error)) from error

    def get_config(self) -> dict:
        return {
            "name": self.name,
            "trainable": self.trainable,
            "model": keras.saving.serialize_keras_object(self.model),
            "rho": self._rho,
            "sync_perturbation": self._sync_perturbation,
        }

    @classmethod
    def from_config(cls, config: dict, custom_objects=None) -> "SAMModel":
        config = dict(config)
        model = keras.saving.deserialize_keras_object(
            config.pop("model"), custom_objects=custom_objects
        )
        return cls(model=model, **config)
