"""The floor of a SAM step, per backend: two gradients of the same batch in
sequence and one optimizer update, nothing else (what any SAM step must at
least cost).

Compilers prune a gradient whose value is never used and merge two
identical passes. So the second pass reads its input through a
multiplication by a runtime 1.0 that depends on the first gradient: both
passes run in full, one after the other, for the price of a few scalar ops.
On PyTorch with `jit_compile=True` the floor is compiled as the SAM step is
(keras_sam's compiled step).
"""

from __future__ import annotations

import keras


def floor_model(model: keras.Model) -> keras.Model:
    return {"tensorflow": TensorFlowFloor, "jax": JaxFloor,
            "torch": TorchFloor}[keras.backend.backend()](model)


class _Floor(keras.Model):
    def __init__(self, model, **kwargs):
        super().__init__(**kwargs)
        self.model = model

    def call(self, inputs, training=None):
        return self.model(inputs, training=training)


def _times(x, one):
    """x, each tensor multiplied by the runtime 1.0 `one`."""
    return keras.tree.map_structure(
        lambda t: t * keras.ops.cast(one, t.dtype), x)


class TensorFlowFloor(_Floor):
    def __init__(self, model, **kwargs):
        import tensorflow as tf

        super().__init__(model, **kwargs)
        self._one = tf.Variable(1.0, trainable=False)

    def train_step(self, data):
        import tensorflow as tf

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_variables

        def gradient(x):
            with tf.GradientTape() as tape:
                y_pred = self(x, training=True)
                loss = self._compute_loss(x=x, y=y, y_pred=y_pred,
                                          sample_weight=sample_weight,
                                          training=True)
            return y_pred, loss, tape.gradient(loss, variables)

        y_pred, loss, first = gradient(x)
        self._loss_tracker.update_state(
            loss, sample_weight=tf.shape(keras.tree.flatten(x)[0])[0])
        tie = tf.add_n([tf.reshape(getattr(g, "values", g), [-1])[0]
                        for g in first])
        _, _, second = gradient(_times(x, self._one + 0.0 * tie))
        self.optimizer.apply(second, variables)
        return self.compute_metrics(x, y, y_pred, sample_weight)


class JaxFloor(_Floor):
    def train_step(self, state, data):
        import jax
        import jax.numpy as jnp

        trainable, non_trainable, opt, metrics = state
        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        grad_fn = jax.value_and_grad(self.compute_loss_and_updates,
                                     has_aux=True)

        def gradient(inputs):
            return grad_fn(trainable, non_trainable, metrics, inputs, y, sw,
                           training=True, optimizer_variables=opt)

        (_, aux), first = gradient(x)
        unscaled, y_pred, new_non_trainable, new_metrics = aux
        tie = sum(jnp.ravel(g)[0] for g in first)
        _, second = gradient(_times(x, 1.0 + 0.0 * tie))
        trainable, opt = self.optimizer.stateless_apply(opt, second,
                                                        trainable)
        logs, new_metrics = self._update_metrics_variables(
            new_metrics, unscaled, x, y, y_pred, sw)
        return logs, (trainable, new_non_trainable, opt, new_metrics)


class TorchFloor(_Floor):
    def make_train_function(self, force=False):
        if self.train_function is not None and not force:
            return self.train_function
        super().make_train_function(force=force)
        if self.jit_compile:
            from keras_sam.backend.torch import compiled

            self.train_function = compiled.train_function(self)
        return self.train_function

    def train_step(self, data):
        import torch

        x, y, sw = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_variables
        leaves = [v.value for v in variables]
        inputs = x
        for _ in range(2):
            y_pred = self(inputs, training=True)
            loss = self._compute_loss(x=x, y=y, y_pred=y_pred,
                                      sample_weight=sw, training=True)
            grads = torch.autograd.grad(loss, leaves)
            inputs = _times(x, 1.0 + 0.0 * grads[0].reshape(-1)[0])
        self._loss_tracker.update_state(loss.detach(),
                                        sample_weight=y_pred.shape[0])
        with torch.no_grad():
            self.optimizer.apply(list(grads), variables)
        return self.compute_metrics(x, y, y_pred, sw)
