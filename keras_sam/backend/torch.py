"""The SAM training step on the PyTorch backend.

    pass 1   g, s' = grad L_B(w; s)            torch.autograd.grad
    e        = e(g)                            keras_sam.step
    pass 2   g_s   = grad L_B(w + e; s)        w + e are fresh leaf tensors
    update   w <- optimizer(w, d)              at the original w, no_grad

The variables hold w throughout: pass 2 differentiates tensors that a
`keras.StatelessScope` hands to the layers in place of the variables, so a
step that fails half-way leaves nothing at w + e. (keras_sam.backend.
stateless has the step; this file only says how PyTorch differentiates and
branches, and writes the results.) A non-finite g skips the update and every
state write; under a LossScaleOptimizer the optimizer skips it and lowers the
scale. Gradients that are None (variables the loss does not use) leave their
variable out of the update, as Keras's own PyTorch step does.

One device per process (CPU or CUDA), as Keras's PyTorch trainer; for
several GPUs see the README ("Backends").
"""

from __future__ import annotations

import keras
import torch

from keras_sam import _keras_compat, step
from keras_sam.backend import stateless


class _Autodiff(stateless.Autodiff):
    """Autograd, with torch's global random state rewound before each
    evaluation: Keras's unseeded dropout draws from it, and pass 2 must see
    pass 1's masks. The state then moves once per step, as pass 1 left it
    (`finish`)."""

    def __init__(self):
        super().__init__(value_and_grad=self._value_and_grad, cond=_cond)
        self._start, self._after = _rng_state(), None
        self.used = None   # per variable: does the loss use it (pass 1)

    def _value_and_grad(self, fn, weights, *args):
        _set_rng_state(self._start)
        leaves = [w.detach().requires_grad_(True) for w in weights]
        value, aux = fn(leaves, *args)
        if self._after is None:
            self._after = _rng_state()
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
        if self.used is None:
            self.used = [g is not None for g in grads]
        aux = keras.tree.map_structure(
            lambda t: t.detach() if isinstance(t, torch.Tensor) else t, aux)
        return (value.detach(), aux), [
            torch.zeros_like(w) if g is None else g
            for w, g in zip(leaves, grads)]

    def finish(self):
        if self._after is not None:
            _set_rng_state(self._after)


def _rng_state():
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() \
        else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state):
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def _cond(pred, true_fn, false_fn):
    return true_fn() if bool(pred) else false_fn()


def train_step(sam, data):
    """One SAM step of `sam` (a `keras_sam.SAMModel`) on one batch."""
    _keras_compat.ensure_built(sam, data)
    sam.build_sam_state()
    trainable_vars, state_vars, optimizer_vars, metric_vars = \
        stateless.variable_lists(sam)
    step.check_trainable(sam, trainable_vars)
    values = lambda vs: [v.value for v in vs]  # noqa: E731
    trainable, non_trainable = values(trainable_vars), values(state_vars)
    metric_values = values(metric_vars)
    autodiff = _Autodiff()
    result = stateless.sam_step(sam, trainable, non_trainable,
                                values(optimizer_vars), metric_values, data,
                                autodiff)
    autodiff.finish()
    optimizer = sam.optimizer
    is_lso = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    finite = bool(result.finite)
    if finite or is_lso:
        direction = result.direction
        if not finite:   # the optimizer skips and lowers the loss scale
            direction = [direction[0] * float("nan")] + direction[1:]
        pairs = [(d, v) for d, v, used in
                 zip(direction, trainable_vars, autodiff.used) if used]
        with torch.no_grad():
            # w <- optimizer(w, d), at the original w.
            optimizer.apply([d for d, _ in pairs], [v for _, v in pairs])
    if finite:
        for v, new in zip(state_vars,
                          stateless.new_state(sam, result, non_trainable)):
            v.assign(new)
    logs, metric_values = stateless.logs(sam, result, trainable,
                                         non_trainable, metric_values, data)
    for v, new in zip(metric_vars, metric_values):
        v.assign(new)
    return logs
