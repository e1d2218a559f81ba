"""The SAM training step on the PyTorch backend.

    pass 1   g, s' = grad L_B(w; s)            torch.autograd.grad
    e        = e(g)                            keras_sam.step
    pass 2   g_s   = grad L_B(w + e; s)        w + e are fresh leaf tensors
    update   w <- optimizer(w, d)              at the original w, no_grad

The variables hold w throughout: pass 2 differentiates tensors that a
`keras.StatelessScope` hands to the layers in place of the variables, so a
step that fails half-way leaves nothing at w + e. (keras_sam.backend.
stateless has the step; this file only says how PyTorch differentiates and
branches, and writes the results.)

Nothing in the step waits for the GPU: whether g was finite is never read
on the host. The update runs on every step and a non-finite g selects the
old values back on the device (`torch.where` against a snapshot of what the
optimizer writes); under a LossScaleOptimizer the optimizer skips the step
and lowers the scale itself. On the CPU, where a host read waits for
nothing, the step reads the flag and branches instead: the snapshot and the
selection would be pure memory traffic there. Norms and w + s g are fused
over all variables (`torch._foreach_*`); no scalar is copied from the host
during the step. Gradients that are None (variables the loss does not use) leave their
variable out of the update, as Keras's own PyTorch step does.

One device per process (CPU or CUDA), as Keras's PyTorch trainer; for
several GPUs see the README ("Backends").
"""

from __future__ import annotations

import keras
import torch

from keras_sam import _keras_compat, step
from keras_sam.backend import functional, stateless, writeback
from keras_sam.backend.torch import compiled
from keras_sam.perturbation import global_norm


class _Autodiff(functional.Autodiff):
    """Autograd, with pass 2 seeing pass 1's dropout masks. Keras's
    unseeded dropout draws from torch's global generator: eagerly, it is
    rewound before every evaluation but the first, and then moves once per
    step, as pass 1 left it (`finish`). Compiled, dropout draws its masks
    once per step instead (`compiled.SameMasks`), or, for a model that
    draws from the generator otherwise, the generator is rewound and stays
    as pass 2 left it (reading it again would break the graph)."""

    def __init__(self, in_graph: bool = False, rewind: bool = True):
        # Eagerly, ||g|| and w + s g as fused foreach kernels; compiled, as
        # plain ops, which inductor fuses itself.
        super().__init__(value_and_grad=self._value_and_grad, cond=_cond,
                         norm=global_norm if in_graph else _fused_norm,
                         add=step.add_scaled if in_graph else
                         _fused_add_scaled,
                         decide=bool, live=True)
        self._start = compiled.rng_state() if rewind else None
        self._masks = None if rewind else compiled.SameMasks()
        self._restore, self._after, self._evaluations = not in_graph, None, 0
        self.used = None   # per variable: does the loss use it (pass 1)

    def _value_and_grad(self, fn, weights, *args):
        rewind = self._start is not None
        if rewind and self._evaluations:
            compiled.set_rng_state(self._start)   # pass 1's masks again
        leaves = [w.detach().requires_grad_(True) for w in weights]
        if self._masks is None:
            value, aux = fn(leaves, *args)
        else:
            with self._masks.evaluation():
                value, aux = fn(leaves, *args)
        if rewind and self._restore and not self._evaluations:
            self._after = compiled.rng_state()
        self._evaluations += 1
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
            compiled.set_rng_state(self._after)


def _cond(pred, true_fn, false_fn):
    return true_fn() if bool(pred) else false_fn()


def _same_dtype(tensors) -> bool:
    return len({t.dtype for t in tensors}) == 1


def _fused_norm(tensors):
    """||g||_2 over all tensors, float32: one fused kernel for the
    per-tensor norms."""
    if not tensors or not _same_dtype(tensors) or \
            tensors[0].dtype != torch.float32:
        return global_norm(tensors)
    return torch.linalg.vector_norm(torch.stack(
        torch._foreach_norm(list(tensors))))


def _fused_add_scaled(weights, grads, scale):
    """[w + s g], two fused kernels for the whole list."""
    if not weights or not _same_dtype(list(weights) + list(grads)):
        return step.add_scaled(weights, grads, scale)
    scaled = torch._foreach_mul(list(grads), scale.to(grads[0].dtype))
    return torch._foreach_add(list(weights), scaled)


def host_reads_are_free(tensor) -> bool:
    """Whether reading `tensor` on the host costs no wait: a CPU tensor's
    value exists once the op returns; a GPU read stalls the queue."""
    return tensor.device.type == "cpu"


def train_step(sam, data):
    """One SAM step of `sam` (a `keras_sam.SAMModel`) on one batch."""
    _keras_compat.ensure_built(sam, data)
    sam.build_sam_state()
    optimizer = sam.optimizer
    if not optimizer.built:   # its state is snapshot and read below
        optimizer.build(sam.trainable_variables)
    variables = functional.variable_lists(sam)
    step.check_trainable(sam, variables.trainable)
    trainable, non_trainable, optimizer_values, metric_values = (
        [v.value for v in vs] for vs in variables)
    in_graph = compiled.compiling()
    autodiff = _Autodiff(in_graph, rewind=not in_graph or
                         compiled.rewinds_rng(sam))
    result = stateless.sam_step(sam, variables, trainable, non_trainable,
                                optimizer_values, metric_values, data,
                                autodiff)
    autodiff.finish()
    direction = result.direction
    is_lso = isinstance(optimizer, keras.optimizers.LossScaleOptimizer)
    if is_lso:   # a non-finite g: the optimizer skips and lowers the scale
        direction = writeback.mark_non_finite(direction, result.finite)
    pairs = [(d, v) for d, v, used in
             zip(direction, variables.trainable, autodiff.used) if used]
    written = [v for _, v in pairs]
    # A non-finite g keeps every value as it was: read on the host where
    # that is free (CPU, eagerly), otherwise selected on the device.
    branch = not is_lso and not in_graph and \
        host_reads_are_free(result.finite)
    select = not is_lso and not branch
    apply = not branch or bool(result.finite)
    with torch.no_grad():
        if select:
            written += variables.optimizer
            before = [v.value.clone() for v in written]
        if apply:   # w <- optimizer(w, d), at the original w.
            optimizer.apply([d for d, _ in pairs], [v for _, v in pairs])
        if select:
            for v, old in zip(written, before):
                torch.where(result.finite, v.value, old, out=v.value)
        new_state = writeback.new_state(sam, variables, result,
                                        non_trainable)
        for v, new, old in zip(variables.state, new_state, non_trainable):
            if new is old:   # only state the step wrote (BatchNorm, seeds)
                continue
            if not branch:
                v.assign(torch.where(result.finite, new, old))
            elif apply:
                v.assign(new)
    logs, new_metrics = writeback.logs(sam, variables, result, trainable,
                                       non_trainable, metric_values, data,
                                       live=True)
    for v, new, old in zip(variables.metrics, new_metrics, metric_values):
        if new is not old:
            v.assign(new)
    return logs
