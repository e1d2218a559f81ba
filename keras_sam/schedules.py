"""Schedules for rho.

`SAMModel(rho=...)` takes a float, any
`keras.optimizers.schedules.LearningRateSchedule` (called with the 0-based
iteration, like a learning rate) or a serializable callable of the iteration.
GSAM (Zhuang et al., 2022) ties rho to the learning rate; that is one line:

    lr = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=10_000)
    rho = keras_sam.schedules.RhoFollowsLearningRate(lr, rho_max=0.05,
                                                     rho_min=0.01)
    sam = keras_sam.SAMModel(model, rho=rho, gsam_alpha=0.3)
"""

from __future__ import annotations

import keras
from keras import ops

from keras_sam._keras_compat import to_numpy

__all__ = ["RhoFollowsLearningRate"]


@keras.saving.register_keras_serializable(package="keras_sam")
class RhoFollowsLearningRate(keras.optimizers.schedules.LearningRateSchedule):
    """rho_t moves linearly with the learning rate lr_t (GSAM's schedule):

        rho_t = rho_min + (rho_max - rho_min)
                          * (lr_t - lr_min) / (lr_max - lr_min)

    with lr_max = lr_0 (the learning rate at iteration 0) and lr_min given
    (0 by default: rho reaches rho_min when the learning rate reaches 0).

    Args:
        learning_rate: the optimizer's own
            `keras.optimizers.schedules.LearningRateSchedule`.
        rho_max: rho at iteration 0, where the learning rate is largest.
        rho_min: rho where the learning rate reaches `lr_min`;
            0 <= rho_min <= rho_max.
        lr_min: the learning rate at which rho is `rho_min`, below lr_0.

    Raises:
        TypeError: `learning_rate` is not a `LearningRateSchedule`.
        ValueError: not 0 <= rho_min <= rho_max, or lr_0 <= lr_min.

    Example:

    ```python
    lr = keras.optimizers.schedules.CosineDecay(0.1, decay_steps=10_000)
    rho = keras_sam.schedules.RhoFollowsLearningRate(lr, rho_max=0.05,
                                                     rho_min=0.01)
    sam_model = keras_sam.SAMModel(model, rho=rho, gsam_alpha=0.3)
    sam_model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9),
                      loss="sparse_categorical_crossentropy")
    ```
    """

    def __init__(self, learning_rate, rho_max: float, rho_min: float = 0.0,
                 lr_min: float = 0.0):
        if not isinstance(learning_rate,
                          keras.optimizers.schedules.LearningRateSchedule):
            raise TypeError(
                "`learning_rate` must be a keras.optimizers.schedules."
                "LearningRateSchedule (the optimizer's own schedule); "
                f"received {learning_rate!r}.")
        if not 0.0 <= rho_min <= rho_max:
            raise ValueError(
                "`rho_min` and `rho_max` must satisfy 0 <= rho_min <= rho_max;"
                f" received rho_min={rho_min}, rho_max={rho_max}.")
        self.learning_rate = learning_rate
        self.rho_max, self.rho_min = float(rho_max), float(rho_min)
        self.lr_min = float(lr_min)
        self.lr_max = float(to_numpy(learning_rate(0)))
        if self.lr_max <= self.lr_min:
            raise ValueError(
                "The learning rate at iteration 0 must be above `lr_min` "
                f"(got lr_0={self.lr_max}, lr_min={self.lr_min}).")

    def __call__(self, step):
        lr = ops.cast(self.learning_rate(step), "float32")
        frac = (lr - self.lr_min) / (self.lr_max - self.lr_min)
        return self.rho_min + (self.rho_max - self.rho_min) * frac

    def get_config(self) -> dict:
        return {
            "learning_rate": keras.saving.serialize_keras_object(
                self.learning_rate),
            "rho_max": self.rho_max, "rho_min": self.rho_min,
            "lr_min": self.lr_min,
        }

    @classmethod
    def from_config(cls, config: dict):
        config = dict(config)
        config["learning_rate"] = keras.saving.deserialize_keras_object(
            config["learning_rate"])
        return cls(**config)
