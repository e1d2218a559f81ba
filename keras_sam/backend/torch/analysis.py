"""PyTorch's autodiff for `keras_sam.analysis`: the loss, its gradient and
Hessian-vector products at given weights, batch by batch.

The weights are leaf tensors that reach the model through a
`keras.StatelessScope`, so no variable is ever assigned. A Hessian-vector
product is a gradient of a gradient (double backward):

    Hv = d/dw <grad L(w), v>

never the full Hessian.
"""

from __future__ import annotations

import keras
import torch
from keras import ops


class ModelFunctions:
    """Loss, gradient and Hessian-vector product of `model`'s compiled loss
    (plus `model.losses`) at weights given as tensors, in inference mode."""

    def __init__(self, model: keras.Model):
        self.model = model
        self.variables = list(model.trainable_variables)

    def _loss_at(self, values, x, y, sample_weight):
        x, y, sample_weight = keras.tree.map_structure(
            lambda t: None if t is None else ops.convert_to_tensor(t),
            (x, y, sample_weight))
        mapping = list(zip(self.variables, values))
        with keras.StatelessScope(state_mapping=mapping, collect_losses=True):
            y_pred = self.model(x, training=False)
            loss = self.model.compute_loss(x, y, y_pred, sample_weight,
                                           training=False)
        return ops.cast(loss, "float32")

    def loss(self, values, x, y, sample_weight):
        with torch.no_grad():
            return self._loss_at(list(values), x, y, sample_weight)

    def gradient(self, values, x, y, sample_weight):
        leaves = _leaves(values)
        loss = self._loss_at(leaves, x, y, sample_weight)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        return loss.detach(), _dense(grads, leaves)

    def hvp(self, values, vector, x, y, sample_weight):
        """(L(w), H v) on one batch."""
        leaves = _leaves(values)
        loss = self._loss_at(leaves, x, y, sample_weight)
        grads = _dense(torch.autograd.grad(loss, leaves, create_graph=True,
                                           allow_unused=True), leaves,
                       detach=False)
        dot = sum(torch.sum(g * v.to(g.dtype)) for g, v in zip(grads, vector))
        if not dot.requires_grad:   # a loss linear in every weight
            return loss.detach(), [torch.zeros_like(w) for w in leaves]
        hv = torch.autograd.grad(dot, leaves, allow_unused=True)
        return loss.detach(), _dense(hv, leaves)

    def weights(self) -> list:
        return [v.value.detach().clone() for v in self.variables]


def _leaves(values) -> list:
    return [ops.convert_to_tensor(w).detach().requires_grad_(True)
            for w in values]


def _dense(grads, like, detach: bool = True) -> list:
    return [torch.zeros_like(w) if g is None else
            (g.detach() if detach else g) for g, w in zip(grads, like)]
