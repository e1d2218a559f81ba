"""TensorFlow's autodiff for `keras_sam.analysis`: the loss, its gradient
and Hessian-vector products at given weights, batch by batch.

The weights are given as tensors and reach the model through a
`keras.StatelessScope`, so no variable is ever assigned. A Hessian-vector
product is a gradient of a gradient (forward-over-reverse is not needed):

    Hv = d/dw <grad L(w), v>

two backward passes, never the full Hessian.
"""

from __future__ import annotations

import keras
import tensorflow as tf


class ModelFunctions:
    """Loss, gradient and Hessian-vector product of `model`'s compiled loss
    (plus `model.losses`) at weights given as tensors, in inference mode."""

    def __init__(self, model: keras.Model):
        self.model = model
        self.variables = list(model.trainable_variables)
        # Functions of this instance: every model traces its own (about
        # twice: one batch shape, then any).
        self.loss = _function(self._loss)
        self.gradient = _function(self._gradient)
        self.hvp = _function(self._hvp)

    def loss_at(self, values, x, y, sample_weight):
        """L(values) on one batch, traced into the caller's graph."""
        mapping = list(zip(self.variables, values))
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
            y_pred = self.model(x, training=False)
            loss = self.model.compute_loss(x, y, y_pred, sample_weight,
                                           training=False)
        return tf.cast(loss, tf.float32)

    def _loss(self, values, x, y, sample_weight):
        return self.loss_at(values, x, y, sample_weight)

    def _gradient(self, values, x, y, sample_weight):
        with tf.GradientTape() as tape:
            tape.watch(values)
            loss = self.loss_at(values, x, y, sample_weight)
        return loss, _dense(tape.gradient(loss, values), values)

    def _hvp(self, values, vector, x, y, sample_weight):
        """(L(w), H v) on one batch."""
        with tf.GradientTape() as outer:
            outer.watch(values)
            with tf.GradientTape() as inner:
                inner.watch(values)
                loss = self.loss_at(values, x, y, sample_weight)
            grads = _dense(inner.gradient(loss, values), values)
            dot = tf.add_n([tf.reduce_sum(g * tf.cast(v, g.dtype))
                            for g, v in zip(grads, vector)])
        return loss, _dense(outer.gradient(dot, values), values)

    def weights(self) -> list:
        return [tf.identity(v.value) for v in self.variables]


def _function(method):
    """`method` as a tf.function of its own. TensorFlow warns about
    "excessive retracing" per code object, across instances: measuring
    several models (or one model, then a SAMModel around it) is not that,
    so this function does not take part in the count (a private flag of
    tf.function; without it, only the log line comes back)."""
    function = tf.function(method, reduce_retracing=True)
    if hasattr(function, "_omit_frequent_tracing_warning"):
        function._omit_frequent_tracing_warning = True
    return function


def _dense(grads, like):
    return [tf.zeros_like(w) if g is None else tf.convert_to_tensor(g)
            for g, w in zip(grads, like)]
