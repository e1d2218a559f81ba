"""JAX's autodiff for `keras_sam.analysis`: the loss, its gradient and
Hessian-vector products at given weights, batch by batch, jitted.

The weights (and the layer state, read at each call) reach the model through
a `keras.StatelessScope`, so no variable is ever assigned. A Hessian-vector
product is forward-over-reverse, `jax.jvp` of `jax.grad`:

    Hv = d/dt grad L(w + t v) at t = 0

one forward and one backward pass with tangents, never the full Hessian.
"""

from __future__ import annotations

import jax
import keras
from keras import ops


class ModelFunctions:
    """Loss, gradient and Hessian-vector product of `model`'s compiled loss
    (plus `model.losses`) at weights given as arrays, in inference mode."""

    def __init__(self, model: keras.Model):
        self.model = model
        self.variables = list(model.trainable_variables)
        self._loss = jax.jit(self._loss_at)
        self._gradient = jax.jit(jax.value_and_grad(self._loss_at))

        def hvp(values, vector, state, x, y, sample_weight):
            def grad(w):
                return jax.grad(self._loss_at)(w, state, x, y, sample_weight)
            loss = self._loss_at(values, state, x, y, sample_weight)
            return loss, jax.jvp(grad, (values,), (vector,))[1]

        self._hvp = jax.jit(hvp)

    def _loss_at(self, values, state, x, y, sample_weight):
        mapping = list(zip(self.variables, values))
        mapping += list(zip(self.model.non_trainable_variables, state))
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
            y_pred = self.model(x, training=False)
            loss = self.model.compute_loss(x, y, y_pred, sample_weight,
                                           training=False)
        return ops.cast(loss, "float32")

    def _state(self):
        return [v.value for v in self.model.non_trainable_variables]

    def loss(self, values, x, y, sample_weight):
        return self._loss(list(values), self._state(), x, y, sample_weight)

    def gradient(self, values, x, y, sample_weight):
        return self._gradient(list(values), self._state(), x, y,
                              sample_weight)

    def hvp(self, values, vector, x, y, sample_weight):
        """(L(w), H v) on one batch."""
        return self._hvp(list(values), list(vector), self._state(), x, y,
                         sample_weight)

    def weights(self) -> list:
        return [ops.convert_to_tensor(v.value) for v in self.variables]
